"""The only module that talks to array-api-compat: namespaces, devices, host copies.

Everything else in arraybn receives an ``xp`` namespace and never imports a
backend. Backend-specific knowledge (how to get a NumPy copy of a CuPy, torch,
dask or array-api-strict array) lives here and nowhere else.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import array_api_compat
from array_api_compat import device as array_device
from array_api_compat import to_device

__all__ = [
    "array_device",
    "array_namespace",
    "compat_namespace",
    "dtype_from_name",
    "float_error_settings",
    "float_errors_ignored",
    "is_array",
    "is_dask_namespace",
    "is_compiling",
    "is_cupy_array",
    "is_torch_array",
    "is_dask_array",
    "is_numpy_array",
    "is_jax_namespace",
    "is_traced",
    "multiply_into",
    "numpy_namespace",
    "optional_dtype",
    "stop_gradient",
    "stored",
    "streams_through_cache",
    "subtract_into",
    "to_device",
    "to_numpy",
    "wider_float",
]

_FLOAT_NAMES = ("float16", "bfloat16", "float32", "float64")


def array_namespace(*arrays: Any) -> ModuleType:
    """Return the (compat-wrapped where needed) namespace shared by ``arrays``.

    Raises ``TypeError`` when the arrays come from different libraries, with a
    message that names them.
    """
    try:
        return array_api_compat.array_namespace(*arrays)
    except TypeError as err:
        kinds = sorted({type(a).__module__ + "." + type(a).__name__ for a in arrays if a is not None})
        msg = (
            "arraybn needs every array of one call (input, mask and the layer's weights) "
            f"to come from one array library; got {', '.join(kinds)}. Convert the input "
            "to the library the layer was built with, or build a new layer. "
            f"({err})"
        )
        raise TypeError(msg) from err


def float_errors_ignored(xp: ModuleType) -> Any:
    """A context where NumPy-backed namespaces compute NaN/inf silently, as TensorFlow does.

    NumPy (and CuPy, dask on NumPy chunks) warn on invalid values such as
    ``sqrt(-1)``; TensorFlow returns NaN without a word, and so does arraybn.
    """
    import contextlib

    name = xp.__name__
    if "numpy" in name or "dask" in name or "array_api_strict" in name:
        import numpy as np

        return np.errstate(all="ignore")
    return contextlib.nullcontext()


def stop_gradient(x: Any) -> Any:
    """``x`` as a constant for autodiff namespaces (torch, JAX); other arrays as they are.

    Batch renorm's ``r`` and ``d`` are ``tf.stop_gradient``-ed in TensorFlow.
    """
    if array_api_compat.is_torch_array(x):
        return x.detach()
    if array_api_compat.is_jax_array(x):
        import jax

        return jax.lax.stop_gradient(x)
    return x


def is_traced(x: Any) -> bool:
    """True for a JAX tracer: an array of a function that ``jax.jit``, ``jax.grad``, ``jax.vmap``
    (...) is transforming, which has no value or device outside that transformation."""
    if not array_api_compat.is_jax_array(x):
        return False
    import jax

    return isinstance(x, jax.core.Tracer)


def is_jax_namespace(xp: ModuleType) -> bool:
    """JAX's namespace: the only one whose arrays may be tracers of a transformation."""
    return xp.__name__.startswith("jax")


def is_compiling(x: Any) -> bool:
    """True for a torch tensor that ``torch.compile`` is tracing (its sizes may be symbolic there)."""
    if not array_api_compat.is_torch_array(x):
        return False
    import sys

    return bool(sys.modules["torch"].compiler.is_compiling())


def stored(x: Any) -> Any:
    """``x`` as a layer keeps it: outside autograd, as TF's variables are, and for torch never an
    inference tensor (one made under ``torch.inference_mode``, which autograd refuses later;
    ``torch.nn.BatchNorm`` updates its buffers in place, so they stay normal tensors)."""
    if not array_api_compat.is_torch_array(x):
        return x
    import sys

    if x.requires_grad:
        x = x.detach()
    if not is_compiling(x) and x.is_inference():
        with sys.modules["torch"].inference_mode(False):
            x = x.clone()
    return x


def is_numpy_array(x: Any) -> bool:
    """True for a NumPy array (from its type)."""
    return bool(array_api_compat.is_numpy_array(x))


def is_torch_array(x: Any) -> bool:
    """True for a torch tensor (from its type: torch is not imported for the check)."""
    return bool(array_api_compat.is_torch_array(x))


def is_dask_array(x: Any) -> bool:
    """True for a dask array (from its type: dask is not imported for the check)."""
    return bool(array_api_compat.is_dask_array(x))


def is_cupy_array(x: Any) -> bool:
    """True for a CuPy array (from its type: CuPy is not imported for the check)."""
    return bool(array_api_compat.is_cupy_array(x))


def streams_through_cache(x: Any) -> bool:
    """True where arraybn's cache-blocked CPU schedule (``arraybn._schedules.numpy_blocked``) pays off.

    Eager, C-contiguous NumPy arrays: there a reshape is a view, a slice of
    the result can be written in place, ``matmul`` runs in BLAS, and NumPy's
    own broadcasts over leading axes are slower than memory. Decided from the
    type and the strides only: no array value is read.
    """
    return bool(array_api_compat.is_numpy_array(x) and x.flags.c_contiguous)


def multiply_into(x: Any, factor: Any, out: Any) -> None:
    """``out[...] = x * factor``, without a temporary where the library has ``out=`` (NumPy)."""
    if array_api_compat.is_numpy_array(out):
        import numpy as np

        np.multiply(x, factor, out=out)
    else:
        out[...] = x * factor


def subtract_into(x: Any, other: Any, out: Any) -> None:
    """``out[...] = x - other``, without a temporary where the library has ``out=`` (NumPy)."""
    if array_api_compat.is_numpy_array(out):
        import numpy as np

        np.subtract(x, other, out=out)
    else:
        out[...] = x - other


def float_error_settings() -> Any:
    """A factory of contexts that re-enter the calling thread's NumPy floating-point error settings.

    NumPy keeps ``errstate`` per thread (per context since NumPy 2), so work
    handed to another thread would otherwise warn where the caller silenced it.
    """
    import numpy as np

    settings = np.geterr()
    return lambda: np.errstate(**settings)


def is_dask_namespace(xp: Any) -> bool:
    """True for dask.array (wrapped or not): a lazy library whose computations may fail later."""
    return bool(array_api_compat.is_dask_namespace(xp))


def is_array(x: Any) -> bool:
    """True for an array of any namespace array-api-compat knows."""
    return bool(array_api_compat.is_array_api_obj(x))


_WRAPPED = frozenset({"numpy", "torch", "cupy", "dask.array"})  # the libraries array-api-compat wraps


def compat_namespace(xp: ModuleType) -> ModuleType:
    """The namespace arraybn computes with for ``xp``: array-api-compat's wrapper of a library given
    as itself (``numpy``, ``torch``, ``cupy``, ``dask.array``), the one ``array_namespace`` returns
    for its arrays; any other namespace (already compliant, or already wrapped) as it is."""
    if xp.__name__ not in _WRAPPED:
        return xp
    import importlib

    return importlib.import_module(f"array_api_compat.{xp.__name__}")


def numpy_namespace() -> ModuleType:
    """The compat-wrapped NumPy namespace (the default for ``build`` without ``xp``)."""
    import numpy as np  # local: ``import arraybn`` must not import a backend

    return array_api_compat.array_namespace(np.empty(0))


def optional_dtype(xp: ModuleType, name: str) -> Any:
    """The dtype of ``xp`` called ``name``, or None where ``xp`` has none (the standard has no 16-bit floats)."""
    dtype = getattr(xp, name, None)
    if dtype is None and name == "float16" and "dask" in xp.__name__:
        import numpy as np  # dask arrays take NumPy dtypes; the compat namespace omits float16

        dtype = np.dtype(name)
    return dtype


def wider_float(xp: ModuleType, dtype: Any, device: Any) -> Any:
    """float64 where ``dtype`` is float32 and ``xp`` computes float64 on ``device``, else None.

    JAX computes float64 only with ``jax_enable_x64``; torch has no float64 on
    Apple's MPS devices.
    """
    if dtype != getattr(xp, "float32", None):
        return None
    if is_jax_namespace(xp):
        import jax

        if not jax.config.read("jax_enable_x64"):
            return None
    if getattr(device, "type", None) == "mps":
        return None
    return getattr(xp, "float64", None)


def dtype_from_name(xp: ModuleType, name: str) -> Any:
    """The dtype object of ``xp`` called ``name``; a clear error where ``xp`` lacks it."""
    dtype = optional_dtype(xp, name)
    if name == "float64" and is_jax_namespace(xp):
        import jax

        if not jax.config.read("jax_enable_x64"):  # JAX would make float32 arrays, with a warning
            msg = (
                "JAX computes float64 only with `jax.config.update('jax_enable_x64', True)`; without it "
                "the float64 policy of this layer would silently run in float32. Enable it, or use "
                "another dtype policy."
            )
            raise TypeError(msg)
    if dtype is None:
        msg = (
            f"The array namespace {xp.__name__} has no {name} dtype; the dtype policy of this "
            "layer needs it. Use a namespace that has it (torch and JAX have bfloat16) or "
            "another dtype policy."
        )
        raise TypeError(msg)
    return dtype


def to_numpy(x: Any) -> Any:
    """A NumPy copy of an array from any namespace (host copy for GPU arrays).

    bfloat16 arrays (torch, JAX) come back as float32, NumPy having no bfloat16.
    """
    import numpy as np

    if isinstance(x, np.ndarray):
        return x.copy()
    if array_api_compat.is_torch_array(x):
        import torch

        t = x.detach()
        if t.dtype == torch.bfloat16:
            t = t.float()
        return t.cpu().numpy().copy()
    if array_api_compat.is_cupy_array(x):
        return x.get()
    if array_api_compat.is_dask_array(x):
        return np.array(x.compute(), copy=True)
    if array_api_compat.is_jax_array(x):
        if str(x.dtype) == "bfloat16":
            x = x.astype("float32")
        return np.array(x, copy=True)
    mod = type(x).__module__
    if mod.startswith("array_api_strict"):
        import array_api_strict

        x = x.to_device(array_api_strict.Device("CPU_DEVICE"))
        return np.array(x, copy=True)
    return np.array(x, copy=True)
