"""Per-channel sums, the output's multiply-add and the per-channel arithmetic, scheduled for GPUs.

The plain Array API expressions are exact but, on a GPU, three things in them
run far below memory speed:

* a reduction over the leading axes (``xp.sum(x, axis=(0, 1, 2))`` for
  channels-last data, ``axis=(0, 2, 3)`` for channels in the middle) keeps only
  one output per channel, and CuPy's generic reduction kernel gives each output
  one thread block: with 64 channels most of the GPU idles (about 5 ms for the
  25 MB that a copy moves in 0.06 ms on an H100);
* ``y = x * a`` then ``y += b`` reads and writes the tensor twice;
* every operation is a kernel launch of its own (about 17 us of host time on
  CuPy): a training call made about 18, most of them on vectors of ``C``
  elements, so that the host, not the memory, set its pace.

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
  bit-identical to the two-operation forms; the squared difference also
  takes the sums and their count, so that the mean needs no kernel of its own;
* between the passes, the per-channel arithmetic of a training call (the
  statistics' divisions, the output's ``scale``/``shift``, the moving averages;
  about a dozen operations on vectors of ``C`` elements, each a kernel launch
  costing more host time than a pass over the input) is one kernel,
  ``_kernels.cu``, in both of TensorFlow's rules (fused and non-fused), again
  rounded operation by operation: bit-identical to the Array API code. A
  channels-last training call is five launches (sum, squared difference, sum,
  per-channel kernel, multiply-add), an inference call two.

Eager CuPy arrays of float32/float64 take the kernels at any size
(``ARRAYBN_CUDA_KERNELS=0`` turns them off: CuPy then runs the Array API code, which gives the
same bits, with more launches); the matmul sums need at least 1 MiB and ``matmul`` in full float32 (``CUPY_TF32`` unset).
Other namespaces run the reference or their own schedule (:mod:`arraybn._schedules`:
torch tensors, CUDA ones included, take ``torch-eager``; dask arrays ``dask-chunked``); JAX and
``torch.compile`` plan their own passes.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from .._namespace import array_device, is_cupy_array
from .._reference import Coefficients, MovingUpdate, Ops, corrected_moments, fused_factors
from . import falls_back

Array = Any

_MIN_BYTES = 1 << 20  # the matmul sums below this: CuPy's reduction is as fast
_MAX_LAST = 256  # longer channel vectors give CuPy's own reduction enough outputs to fill the GPU
_ONES_KEPT = 8  # vectors of ones kept for the matmul sums (one per input shape in use, about 0.4 MiB each)
_THREADS = 128  # threads per block of the per-channel kernel

# flags of the per-channel kernels (_kernels.cu)
_HAS_GAMMA, _HAS_BETA, _UPDATE, _REPLACE = 1, 2, 4, 8


def _float_itemsize(x: Array, xp: ModuleType) -> int | None:
    if x.dtype == xp.float32:
        return 4
    if x.dtype == xp.float64:
        return 8
    return None


def takes_kernels(x: Array, xp: ModuleType) -> bool:
    """True for eager, non-empty CuPy float32/float64 arrays (from types and shapes only), unless
    ``ARRAYBN_CUDA_KERNELS=0`` (read on every call) sends CuPy to the Array API code."""
    return (
        is_cupy_array(x)
        and _float_itemsize(x, xp) is not None
        and math.prod(x.shape) > 0
        and os.environ.get("ARRAYBN_CUDA_KERNELS", "1") != "0"
    )


def uses_matmul_sums(x: Array, channel: int, xp: ModuleType) -> bool:
    """True where :func:`channel_sums` is the faster schedule: channels-last CuPy data of at least
    ``_MIN_BYTES``, full float32 matmul."""
    c = x.shape[channel]
    return (
        takes_kernels(x, xp)
        and math.prod(x.shape) * x.dtype.itemsize >= _MIN_BYTES
        and channel % x.ndim == x.ndim - 1
        and 0 < c <= _MAX_LAST
        and os.environ.get("CUPY_TF32", "0") != "1"
    )


_ONES: OrderedDict[tuple[Any, ...], Array] = OrderedDict()
_ONES_LOCK = threading.Lock()


def _ones(n: int, x: Array, xp: ModuleType) -> Array:
    """A vector of ``n`` ones in ``x``'s dtype on its device; CuPy's are kept (a fill kernel saved per call).

    Kept per device and per stream: a vector filled on one stream is only read on that stream
    (no ordering is needed against its fill kernel, nor against the pool's reuse of its memory).
    """
    if not is_cupy_array(x):
        return xp.ones((n,), dtype=x.dtype, device=array_device(x))
    import cupy

    with x.device:  # CuPy allocates and fills on the current device, whatever device= says
        key = (n, str(x.dtype), x.device.id, cupy.cuda.get_current_stream().ptr)
        with _ONES_LOCK:
            ones = _ONES.get(key)
            if ones is not None:
                _ONES.move_to_end(key)
                return ones
        ones = cupy.ones(n, dtype=x.dtype)
        with _ONES_LOCK:
            _ONES[key] = ones
            while len(_ONES) > _ONES_KEPT:
                _ONES.popitem(last=False)
        return ones


def _device_of(x: Array) -> Any:
    """CuPy's device of ``x`` as a context: CuPy allocates and launches raw kernels on the *current*
    device, not on the arrays'. A no-op context for other arrays."""
    return x.device if is_cupy_array(x) else contextlib.nullcontext()


def channel_sums(x: Array, channel: int, xp: ModuleType, ones: Array | None = None) -> Array:
    """Sum over every axis but the last one, shape ``(C,)``: ``ones(A) @ reshape(x, (A, C))``."""
    c = x.shape[channel]
    a = math.prod(x.shape) // c
    if ones is None:
        ones = _ones(a, x, xp)
    return ones @ (x.reshape(a, c) if is_cupy_array(x) else xp.reshape(x, (a, c)))


def channel_raw_moments(x: Array, channel: int, xp: ModuleType) -> tuple[Array, Array, int]:
    """``(sum, centred sum of squares, n)`` per channel (shape ``(C,)``), for ``mean = sum / n`` and
    ``variance = squares / n``: the two passes of ``tf.nn.moments`` before their divisions."""
    c = x.shape[channel]
    n = math.prod(x.shape) // c
    ones = _ones(n, x, xp)
    sums = channel_sums(x, channel, xp, ones)
    squares = channel_sums(squared_difference(x, sums, xp, count=n), channel, xp, ones)
    return sums, squares, n


# ---------------------------------------------------------------------------
# CuPy kernels
# ---------------------------------------------------------------------------

_SOURCE_PATH = Path(__file__).with_name("_kernels.cu")
_KERNELS: dict[str, Any] = {}


def kernel_source() -> str:
    """The CUDA source of the per-channel kernels and of the rounded operations (``_kernels.cu``)."""
    return _SOURCE_PATH.read_text(encoding="utf-8")


def _kernel(name: str) -> Any:
    kernel = _KERNELS.get(name)
    if kernel is None:
        import cupy

        if name == "centred_multiply_add":
            kernel = cupy.ElementwiseKernel(
                "T x, T c, T a, T b",
                "T y",
                "y = add_rn(mul_rn(sub_rn(x, c), a), b)",
                "arraybn_centred_multiply_add",
                preamble=kernel_source(),
            )
        elif name == "multiply_add":
            kernel = cupy.ElementwiseKernel(
                "T x, T a, T b", "T y", "y = add_rn(mul_rn(x, a), b)", "arraybn_multiply_add", preamble=kernel_source()
            )
        elif name == "squared_difference":
            kernel = cupy.ElementwiseKernel(
                "T x, T s, T count",
                "T y",
                "T d = sub_rn(x, div_rn(s, count)); y = mul_rn(d, d)",
                "arraybn_squared_difference",
                preamble=kernel_source(),
            )
        else:  # a per-channel kernel of _kernels.cu
            module = _KERNELS.get("module")
            if module is None:
                module = _KERNELS["module"] = cupy.RawModule(code=kernel_source())
            kernel = module.get_function(name)
        _KERNELS[name] = kernel
    return kernel


def multiply_add(x: Array, scale: Array, shift: Array, xp: ModuleType) -> Array | None:
    """``x * scale + shift`` rounded as ``y = x * scale; y += shift``, in one pass; None where not CuPy."""
    if not (takes_kernels(x, xp) and scale.dtype == shift.dtype == x.dtype):
        return None
    return _kernel("multiply_add")(x, scale, shift)


def squared_difference(x: Array, m: Array, xp: ModuleType, *, count: int = 1) -> Array:
    """``(x - m / count) ** 2`` as ``d = x - m / count; d * d``: one pass on CuPy, the operations elsewhere.

    ``count`` lets ``m`` be a sum whose mean is formed on the fly (``m / 1`` is ``m`` exactly).
    """
    if takes_kernels(x, xp) and m.dtype == x.dtype:
        return _kernel("squared_difference")(x, m, x.dtype.type(count))
    d = x - (m if count == 1 else m / count)
    return d * d


def centred_multiply_add(x: Array, center: Array, scale: Array, shift: Array) -> Array:
    """``(x - center) * scale + shift``, each operation rounded on its own, in one pass."""
    return _kernel("centred_multiply_add")(x, center, scale, shift)


class CupyKernels(Ops):
    """Eager CuPy arrays of float32/float64 (module docstring); ``ARRAYBN_CUDA_KERNELS=0`` switches it off.

    The output's scale-and-shift and the per-channel coefficients are the
    reference's operations, bit for bit; the sums are CuPy's tree reductions
    (or cuBLAS matrix-vector products for channels-last data), which add the
    same terms in another order.
    """

    name = "cupy-kernels"
    bounds = {
        "sum": "sum order",
        "moments": "sum order",
        "affine": "bitwise",
        "coefficients": "bitwise",
        "backward_sums": "sum order",
        "backward_dx": "bitwise",
    }

    @falls_back
    def sum(self, x: Array, axes: Sequence[int], xp: ModuleType) -> Array:
        if not takes_kernels(x, xp):
            return super().sum(x, axes, xp)
        kept = [i for i in range(x.ndim) if i not in {a % x.ndim for a in axes}]
        if kept == [x.ndim - 1] and uses_matmul_sums(x, kept[0], xp):  # one channel axis, the last
            return channel_sums(x, kept[0], xp).reshape(tuple(1 if i in axes else n for i, n in enumerate(x.shape)))
        return xp.sum(x, axis=tuple(axes), keepdims=True)  # CuPy's reduction adds along a tree

    @falls_back
    def moments(self, x: Array, axes: Sequence[int], xp: ModuleType) -> tuple[Array, Array]:
        if not takes_kernels(x, xp):
            return super().moments(x, axes, xp)
        kept = tuple(1 if i in axes else n for i, n in enumerate(x.shape))
        n = math.prod(x.shape) // math.prod(kept)
        with _device_of(x):
            # n as a Python float: a weak scalar (CuPy 13 promotes float32 / int to float64 for n >= 65536)
            mean = self.sum(x, axes, xp) / float(n)
            return corrected_moments(
                mean, self.sum(x - mean, axes, xp), self.sum(squared_difference(x, mean, xp), axes, xp), n, xp
            )

    @falls_back
    def affine(self, x: Array, scale: Array, shift: Array, center: Array | None, xp: ModuleType) -> Array:
        params = (scale, shift) if center is None else (scale, shift, center)
        if not (takes_kernels(x, xp) and all(is_cupy_array(p) and p.dtype == x.dtype for p in params)):
            return super().affine(x, scale, shift, center, xp)
        with _device_of(x):
            return multiply_add(x, scale, shift, xp) if center is None else centred_multiply_add(x, center, scale, shift)

    @falls_back
    def coefficients(
        self,
        rule: str,
        mean: Array,
        variance: Array,
        gamma: Array | None,
        beta: Array | None,
        epsilon: Any,
        update: MovingUpdate | None,
        xp: ModuleType,
    ) -> Coefficients:
        weights = [a for a in (mean, variance, gamma, beta) if a is not None]
        if update is not None:
            weights += [update.moving_mean, update.moving_variance]
        dtype = mean.dtype
        host_numbers = isinstance(epsilon, float) and (update is None or isinstance(update.momentum, (int, float)))
        kernel_rule = update is None or update.rule == ("fused" if rule == "fused" else "assign_sub")
        if not (
            takes_kernels(mean, xp)
            and host_numbers
            and kernel_rule
            and (rule == "non_fused" or dtype == xp.float32)
            and all(is_cupy_array(a) and a.dtype == dtype and a.size == mean.size for a in weights)
        ):
            return super().coefficients(rule, mean, variance, gamma, beta, epsilon, update, xp)
        return _launch_coefficients(rule, mean, variance, gamma, beta, epsilon, update, xp)

    @falls_back
    def backward_sums(
        self, x: Array, dy: Array, mean: Array, axes: Sequence[int], xp: ModuleType
    ) -> tuple[Array, Array, Array]:
        xc = x - mean
        return self.sum(xc, axes, xp), self.sum(dy, axes, xp), self.sum(dy * xc, axes, xp)


def _launch_coefficients(
    rule: str,
    mean: Array,
    variance: Array,
    gamma: Array | None,
    beta: Array | None,
    epsilon: float,
    update: MovingUpdate | None,
    xp: ModuleType,
) -> Coefficients:
    """`CupyKernels.coefficients` as one launch of the rule's kernel of ``_kernels.cu``."""
    import cupy
    import numpy as np

    dtype = mean.dtype
    dt = dtype.type
    p = mean.size
    with _device_of(mean):  # allocations and the raw launch go to the current device: make it the arrays'
        scale, shift = cupy.empty(p, dtype), cupy.empty(p, dtype)
        center = cupy.empty(p, dtype) if rule == "fused" else scale  # not written by the non-fused rule
        flags = (_HAS_GAMMA if gamma is not None else 0) | (_HAS_BETA if beta is not None else 0)
        if update is None:
            moving = [scale, shift]  # not read
            new_mean, new_variance = scale, shift  # not written
            factors: tuple[float, ...] = (0.0, 0.0, 0.0) if rule == "fused" else (0.0,)
        else:
            moving = [cupy.ascontiguousarray(a.reshape(p)) for a in (update.moving_mean, update.moving_variance)]
            new_mean, new_variance = cupy.empty(p, dtype), cupy.empty(p, dtype)
            flags |= _UPDATE
            if rule == "fused":
                keep, mean_factor, replace = fused_factors(float(update.momentum), 1.0)
                variance_factor = fused_factors(float(update.momentum), float(update.bessel))[1]
                factors = (keep, mean_factor, variance_factor)
                flags |= _REPLACE if replace else 0
            else:
                factors = (_host_decay(update.momentum, dtype == xp.float64),)
        # contiguous (p,) views (copies where a weight is strided); an absent weight is not read
        vectors = [scale if a is None else cupy.ascontiguousarray(a.reshape(p)) for a in (mean, variance, gamma, beta)]
        outputs = ([center] if rule == "fused" else []) + [scale, shift, new_mean, new_variance]
        args = (np.int64(p), np.int32(flags), *vectors, *moving, dt(epsilon), *[dt(f) for f in factors], *outputs)
        name = "arraybn_fused_coefficients_" if rule == "fused" else "arraybn_coefficients_"
        blocks = min(-(-p // _THREADS), 1 << 16)  # a grid-stride loop covers the rest
        _kernel(name + ("f32" if dtype == xp.float32 else "f64"))((blocks,), (_THREADS,), args)
    shape = tuple(mean.shape)
    result = Coefficients(
        center.reshape(shape) if rule == "fused" else None,
        scale.reshape(shape),
        shift.reshape(shape),
        None if update is None else new_mean.reshape(update.moving_mean.shape),
        None if update is None else new_variance.reshape(update.moving_variance.shape),
    )
    return result


def _host_decay(momentum: Any, float64_variable: bool) -> float:
    """``decay_operand`` of the reference as a Python float (momentum is a host number here)."""
    from .._reference import float32_value

    value = 1.0 - momentum
    if float64_variable and str(getattr(value, "dtype", "")) == "float64":
        return float(value)
    return float32_value(value)
