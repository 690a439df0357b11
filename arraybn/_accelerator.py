"""Per-channel sums and the output's multiply-add, scheduled for GPUs.

The plain Array API expressions are exact but, on a GPU, two of them run far
below memory speed:

* a reduction over the leading axes (``xp.sum(x, axis=(0, 1, 2))`` for
  channels-last data, ``axis=(0, 2, 3)`` for channels in the middle) keeps only
  one output per channel, and CuPy's generic reduction kernel gives each output
  one thread block: with 64 channels most of the GPU idles (about 5 ms for the
  25 MB that a copy moves in 0.06 ms on an H100);
* ``y = x * a`` then ``y += b`` reads and writes the tensor twice.

Here, for CuPy arrays:

* channels-last data (the channel axis last, at most 256 channels) is summed
  through ``matmul`` with a vector of ones (cuBLAS GEMV, at memory speed):
  ``ones(A) @ reshape(x, (A, C))``. The arithmetic is what ``tf.nn.moments``
  does (the mean, then the mean of the squared differences from it: two
  passes), in the input's dtype; only the order of the additions differs, as it
  does between any two reduction kernels. Channels in the middle (NCHW) keep
  CuPy's own reduction, which reads each channel's contiguous rows well, and so
  do long channel vectors (enough outputs to fill the GPU);
* ``y = x * a + b`` and ``(x - m) ** 2`` are one elementwise kernel each, every
  operation rounded as the separate Array API operations round
  (``__fmul_rn``/``__fadd_rn``/``__fsub_rn`` and their double versions: the
  compiler may not contract them to a fused multiply-add), so the results are
  bit-identical to the two-operation forms.

Only eager CuPy arrays of float32/float64 of at least 1 MiB take these, and the
sums only while ``matmul`` computes in full float32 (``CUPY_TF32`` unset).
torch CUDA keeps the plain expressions: its own reduction and elementwise
kernels measured faster than these schedules (docs/performance.md). CPU
namespaces run the plain expressions or :mod:`arraybn._streaming`; lazy and
compiled namespaces (dask, JAX, ``torch.compile``) plan their own passes.
"""

from __future__ import annotations

import math
import os
from types import ModuleType
from typing import Any

from ._namespace import array_device, is_cupy_array

Array = Any

_MIN_BYTES = 1 << 20  # below this the plain expressions are as fast (fewer kernel launches)
_MAX_LAST = 256  # longer channel vectors give CuPy's own reduction enough outputs to fill the GPU


def _float_itemsize(x: Array, xp: ModuleType) -> int | None:
    if x.dtype == xp.float32:
        return 4
    if x.dtype == xp.float64:
        return 8
    return None


def takes_kernels(x: Array, xp: ModuleType) -> bool:
    """True for eager CuPy float32/float64 arrays of at least ``_MIN_BYTES`` (from types and shapes only)."""
    if not is_cupy_array(x):
        return False
    size = _float_itemsize(x, xp)
    return size is not None and math.prod(x.shape) * size >= _MIN_BYTES


def uses_matmul_sums(x: Array, channel: int, xp: ModuleType) -> bool:
    """True where :func:`channel_sums` is the faster schedule: channels-last CuPy data, full float32 matmul."""
    c = x.shape[channel]
    return (
        takes_kernels(x, xp)
        and channel % x.ndim == x.ndim - 1
        and 0 < c <= _MAX_LAST
        and os.environ.get("CUPY_TF32", "0") != "1"
    )


def channel_sums(x: Array, channel: int, xp: ModuleType, ones: Array | None = None) -> Array:
    """Sum over every axis but the last one, shape ``(C,)``: ``ones(A) @ reshape(x, (A, C))``."""
    c = x.shape[channel]
    a = math.prod(x.shape) // c
    if ones is None:
        ones = xp.ones((a,), dtype=x.dtype, device=array_device(x))
    return ones @ xp.reshape(x, (a, c))


def channel_moments(x: Array, channel: int, xp: ModuleType) -> tuple[Array, Array]:
    """Mean and biased variance per channel (shape ``(C,)``): two passes, as ``tf.nn.moments``."""
    c = x.shape[channel]
    n = math.prod(x.shape) // c
    ones = xp.ones((n,), dtype=x.dtype, device=array_device(x))
    mean = channel_sums(x, channel, xp, ones) / n
    d = squared_difference(x, mean, xp)  # the channel axis is last: (C,) broadcasts
    variance = channel_sums(d, channel, xp, ones) / n
    return mean, variance


# ---------------------------------------------------------------------------
# CuPy elementwise kernels
# ---------------------------------------------------------------------------

_ROUNDED = r"""
__device__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ float sub_rn(float a, float b) { return __fsub_rn(a, b); }
__device__ double sub_rn(double a, double b) { return __dsub_rn(a, b); }
"""

_KERNELS: dict[str, Any] = {}


def _kernel(name: str) -> Any:
    kernel = _KERNELS.get(name)
    if kernel is None:
        import cupy

        if name == "multiply_add":
            kernel = cupy.ElementwiseKernel(
                "T x, T a, T b", "T y", "y = add_rn(mul_rn(x, a), b)", "arraybn_multiply_add", preamble=_ROUNDED
            )
        else:
            kernel = cupy.ElementwiseKernel(
                "T x, T m",
                "T y",
                "T d = sub_rn(x, m); y = mul_rn(d, d)",
                "arraybn_squared_difference",
                preamble=_ROUNDED,
            )
        _KERNELS[name] = kernel
    return kernel


def multiply_add(x: Array, scale: Array, shift: Array, xp: ModuleType) -> Array | None:
    """``x * scale + shift`` rounded as ``y = x * scale; y += shift``, in one pass; None where not CuPy."""
    if not (takes_kernels(x, xp) and scale.dtype == shift.dtype == x.dtype):
        return None
    return _kernel("multiply_add")(x, scale, shift)


def squared_difference(x: Array, m: Array, xp: ModuleType) -> Array:
    """``(x - m) * (x - m)``: one pass on CuPy, the two operations elsewhere."""
    if takes_kernels(x, xp) and m.dtype == x.dtype:
        return _kernel("squared_difference")(x, m)
    d = x - m
    return d * d
