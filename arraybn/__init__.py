"""arraybn: Keras-exact batch normalization on any Array API namespace.

The reference implementation of ``tf.compat.v1.keras.layers.BatchNormalization``
written once against the Python Array API standard: NumPy, CuPy, PyTorch, JAX,
dask.array and array-api-strict run the same code. Importing arraybn imports no
array library.
"""

from . import constraints, initializers, regularizers
from ._functional import batch_norm, batch_norm_backward, batch_norm_forward, batch_norm_vjp
from ._layer import BatchNormalization
from ._policy import Policy
from ._schedules import available_schedules, get_schedule, schedule
from ._types import BNConfig, BNContext, BNGrads, BNParams, BNState

__version__ = "0.1.0"

__all__ = [
    "BNConfig",
    "BNContext",
    "BNGrads",
    "BNParams",
    "BNState",
    "BatchNormalization",
    "Policy",
    "__version__",
    "available_schedules",
    "batch_norm",
    "batch_norm_backward",
    "batch_norm_forward",
    "batch_norm_vjp",
    "constraints",
    "get_schedule",
    "initializers",
    "regularizers",
    "schedule",
]
