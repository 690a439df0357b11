"""arraybn: Keras-exact batch normalization on any Array API namespace.

The reference implementation of ``tf.compat.v1.keras.layers.BatchNormalization``
written once against the Python Array API standard: NumPy, CuPy, PyTorch, JAX,
dask.array and array-api-strict run the same code. Importing arraybn imports no
array library.
"""

from . import constraints, initializers, regularizers
from ._backward import BNContext, BNGrads, batch_norm_backward, batch_norm_forward, batch_norm_vjp
from ._functional import BNConfig, BNParams, BNState, batch_norm
from ._layer import BatchNormalization
from ._policy import Policy

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
    "batch_norm",
    "batch_norm_backward",
    "batch_norm_forward",
    "batch_norm_vjp",
    "constraints",
    "initializers",
    "regularizers",
]
