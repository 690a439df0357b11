"""TensorFlow's arithmetic for ``tf.compat.v1.keras.layers.BatchNormalization``: the specification.

This module *is* arraybn's definition of the layer's numbers: the forward of
both of TensorFlow's code paths, the moving-statistic updates and the
vector-Jacobian product, in plain Array API expressions and in TensorFlow's
order of operations, each step named as TensorFlow names it and pointing to
the section of ``docs/semantics.md`` that pins it with conformance cases. A
port to another language can be written from this file alone.

Reading order: `batch_norm` (the entry point) → `fused_forward` (the
``FusedBatchNormV3`` kernel) and `non_fused_forward` (``tf.nn.moments`` +
``tf.nn.batch_normalization``, with masks, ghost batches, ``adjustment`` and
batch renormalization), whose inference calls are `inference_map` (a
per-channel map of the input, fixed by the weights) → `batch_norm_vjp` (the
gradient).

Every function takes arrays and returns new arrays; nothing is mutated, so the
same code runs on immutable (JAX) and lazy (dask) namespaces. No function here
imports a backend, reads an array's value on the host, or knows any schedule:
the few bulk operations that faster schedules may replace (per-channel
moments, the output's scale-and-shift, the per-channel coefficients, the
backward's sums and its elementwise gradient) are methods of `Ops`, whose
methods here are the reference ones. A schedule (``arraybn._schedules``) is a
subclass chosen once per call, held to these methods' results by
``tests/test_schedules.py``.

Accuracy. TensorFlow's reductions are tree reductions; a reduction that adds
values one after the other into a single float32 accumulator (NumPy's
reduction over leading axes does) loses the data's spread on inputs of a
million values with a large mean. `Ops.sum` therefore adds at most
`SUM_LEAF` values into any partial sum and adds the partial sums the same way:
its error grows with the logarithm of the count, as a tree reduction's does,
so arraybn is never less accurate than TensorFlow (``docs/semantics.md`` §14).
"""

from __future__ import annotations

import functools
import math
import numbers
import struct
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any, NamedTuple

from ._namespace import array_device, dtype_from_name, is_compiling, optional_dtype, stop_gradient, wider_float
from ._types import BNConfig, BNContext, BNGrads, BNParams, BNState
from ._validation import (
    check_ghost_batches,
    check_mask_broadcasts,
    check_vjp_arguments,
    require_known_sizes,
    unknown_size,
)

Array = Any
Adjustment = Callable[[tuple[int, ...]], tuple[Any, Any]]

__all__ = [
    "REFERENCE",
    "SUM_LEAF",
    "Coefficients",
    "InferenceMap",
    "MovingUpdate",
    "Ops",
    "apply_map",
    "assign_moving_average",
    "batch_norm",
    "batch_norm_vjp",
    "fused_forward",
    "fused_moving_update",
    "inference_map",
    "moments",
    "non_fused_forward",
    "renorm_correction",
    "weighted_moments",
]

SUM_LEAF = 64  # no partial sum of `Ops.sum` adds more than this many values one after the other


# ---------------------------------------------------------------------------
# Numbers TensorFlow forms on the host (docs/semantics.md §3)
# ---------------------------------------------------------------------------


def float32_value(value: float) -> float:
    """A Python number rounded to float32 and back (``tf.convert_to_tensor``, ``cast_to_floatx``).

    Beyond float32's range the result is an infinity, as NumPy's and TF's casts give.
    """
    try:
        return float(struct.unpack("f", struct.pack("f", float(value)))[0])
    except OverflowError:
        return math.copysign(math.inf, float(value))


def f32_operand(value: Any, dtype: Any, xp: ModuleType, device: Any) -> Any:
    """``tf.cast(tf.convert_to_tensor(value), dtype)`` as an operand for arrays of ``dtype``.

    A Python float for float32 and float64 arrays: the Array API converts it to
    the array's dtype (exactly, as it holds a float32 value). A 0-d array for
    16-bit dtypes, where some libraries would compute with the unrounded scalar.
    """
    if isinstance(value, numbers.Real) and (dtype == xp.float32 or dtype == xp.float64):
        return float32_value(value)  # exact as a float64 number: still TF's float32 tensor
    return cast(xp.full((), value, dtype=xp.float32, device=device), dtype, xp)


def decay_operand(momentum: Any, dtype: Any, xp: ModuleType, device: Any) -> Any:
    """TF's ``decay = cast(convert_to_tensor(1.0 - momentum), variable.dtype)``.

    The subtraction happens in Python (float64) and ``convert_to_tensor`` rounds
    it to float32: a float64 variable decays by ``float64(float32(1 - momentum))``.
    A NumPy float64 ``momentum`` makes ``1.0 - momentum`` a NumPy float64, which
    converts to a float64 tensor: a float64 variable then decays by it unrounded.
    """
    value = 1.0 - momentum
    if dtype == xp.float64 and str(getattr(value, "dtype", "")) == "float64":
        return float(value)
    return f32_operand(value, dtype, xp, device)


@functools.lru_cache(maxsize=256)
def fused_factors(momentum: float, bessel: float) -> tuple[float, float, bool]:
    """``(1 - f, f * bessel, f == 1)`` of the fused kernel's update, rounded to float32 on the host.

    ``f = float32(1 - momentum)`` is the kernel's float32 ``exponential_avg_factor``;
    ``bessel`` its ``rest_size_adjust``. With ``f == 1`` the kernel replaces the
    moving statistics by the batch's (no multiply of the old value: a NaN or an
    infinity there does not survive).
    """
    f = float32_value(1.0 - momentum)
    return float32_value(1.0 - f), float32_value(f * float32_value(bessel)), f == 1.0


# ---------------------------------------------------------------------------
# Array helpers
# ---------------------------------------------------------------------------


def cast(a: Array, dtype: Any, xp: ModuleType) -> Array:
    """``tf.cast(a, dtype)``; ``a`` itself where it already has ``dtype``.

    TF converts float64 to a 16-bit float through float32 (two roundings); a
    direct cast rounds once and can differ by one 16-bit ulp, so it is done in
    the same two steps here.
    """
    if a.dtype == dtype:
        return a
    if a.dtype == optional_dtype(xp, "float64") and is_half(dtype, xp):
        a = xp.astype(a, xp.float32)
    return xp.astype(a, dtype)


def is_half(dtype: Any, xp: ModuleType) -> bool:
    """float16 or bfloat16 where ``xp`` has them (the standard has neither).

    Compared one by one: ``numpy.dtype(...) == None`` is True for float64.
    """
    for name in ("float16", "bfloat16"):  # a plain loop: torch.compile cannot trace a walrus in a genexpr
        half = optional_dtype(xp, name)
        if half is not None and dtype == half:
            return True
    return False


def div_no_nan(a: Array, b: Array, xp: ModuleType) -> Array:
    """``tf.math.div_no_nan``: 0 where ``b == 0``."""
    zero = b == 0
    return xp.where(zero, xp.zeros_like(a), a / xp.where(zero, xp.ones_like(b), b))


def count_of(shape: Sequence[Any], axes: Sequence[int]) -> Any:
    """How many values a reduction over ``axes`` adds per output (an int; symbolic under compilers)."""
    return math.prod([shape[a] for a in axes])


def _divisor(n: Any) -> Any:
    """``n`` as a weak scalar divisor: a Python float (a NumPy or CuPy int would promote float32
    to float64 on some versions), a symbolic size as it is."""
    return float(n) if isinstance(n, int) else n


def _reshaped(v: Array | None, shape: tuple[int, ...], xp: ModuleType) -> Array | None:
    if v is None or tuple(v.shape) == shape:
        return v
    return xp.reshape(v, shape)


def _updated(state: BNState, **changes: Array) -> BNState:
    """``state._replace(**changes)`` written out: torch.compile rebuilds ``_replace``'s result with fields missing."""
    return BNState(*(changes.get(name, getattr(state, name)) for name in BNState._fields))


def keepdims_shape(shape: Sequence[int], axes: Sequence[int]) -> tuple[int, ...]:
    """``shape`` with the sizes along ``axes`` replaced by 1."""
    return tuple(1 if i in axes else n for i, n in enumerate(shape))


# ---------------------------------------------------------------------------
# The bulk operations a schedule may replace
# ---------------------------------------------------------------------------


class Coefficients(NamedTuple):
    """The per-channel result of a call between its passes over the input.

    The output is ``(x - center) * scale + shift`` (``center`` None: ``x * scale +
    shift``), each operation rounded on its own; ``moving_mean`` and
    ``moving_variance`` are the new moving statistics (None without an update).
    """

    center: Array | None
    scale: Array
    shift: Array
    moving_mean: Array | None
    moving_variance: Array | None


class MovingUpdate(NamedTuple):
    """A moving-statistic update: the old statistics (``param_shape``) and its rule's numbers.

    ``rule`` is "fused" (the kernel's ``exponential_avg_factor`` form, with
    ``bessel``) or "assign_sub" (``_assign_moving_average``; the fused path
    takes it too when ``momentum`` is no Python number, with the Bessel-corrected
    variance).
    """

    moving_mean: Array
    moving_variance: Array
    momentum: Any
    rule: str
    bessel: Any = 1.0


class Ops:
    """The bulk operations of a call, in the reference arithmetic.

    A schedule subclasses this class and overrides some methods with a faster
    computation of the same arithmetic; where it does not apply to the arrays
    given, it calls the method here. ``name`` identifies the schedule and
    ``bounds`` declares, per method, ``"bitwise"`` (the reference's bits) or a
    bound on the difference (``tests/test_schedules.py`` holds each schedule to it).
    """

    name = "reference"
    bounds: dict[str, str] = {}

    def sum(self, x: Array, axes: Sequence[int], xp: ModuleType) -> Array:
        """Sum over ``axes``, kept as size-1 axes; blocked so that no partial sum adds more than `SUM_LEAF` values.

        The axes are summed one after the other, the last first. An axis of
        ``n > SUM_LEAF`` values is cut into ``n // SUM_LEAF`` blocks of
        `SUM_LEAF` (a reshape of a slice) and a shorter rest; the blocks' sums
        are summed the same way, then the rest's sum is added. Sizes that are
        not known (dask's NaN) fall back to the namespace's own sum.
        """
        n = count_of(x.shape, axes)
        # one partial sum holds them all (not under a compiler: a symbolic size would be guarded on)
        if unknown_size(n) or (not is_compiling(x) and n <= SUM_LEAF):
            return xp.sum(x, axis=tuple(axes), keepdims=True)
        for axis in sorted(axes, reverse=True):
            x = self._sum_axis(x, axis, xp)
        return x

    def _sum_axis(self, x: Array, axis: int, xp: ModuleType) -> Array:
        n = x.shape[axis]
        if unknown_size(n) or n <= SUM_LEAF:
            return xp.sum(x, axis=axis, keepdims=True)
        blocks = n // SUM_LEAF
        head = x[(slice(None),) * axis + (slice(0, blocks * SUM_LEAF), ...)]
        head = xp.reshape(head, (*x.shape[:axis], blocks, SUM_LEAF, *x.shape[axis + 1 :]))
        total = self._sum_axis(xp.sum(head, axis=axis + 1), axis, xp)
        if blocks * SUM_LEAF < n:
            rest = x[(slice(None),) * axis + (slice(blocks * SUM_LEAF, None), ...)]
            total = total + xp.sum(rest, axis=axis, keepdims=True)
        return total

    def moments(self, x: Array, axes: Sequence[int], xp: ModuleType) -> tuple[Array, Array]:
        """``tf.nn.moments`` over ``axes`` (non-empty), kept as size-1 axes: two passes, the mean corrected.

        TF: ``mean = sum(x) / n``, ``variance = sum((x - mean) ** 2) / n``. The
        second pass also sums ``d = x - mean``, whose exact sum is zero: what
        it holds is the first pass's rounding error, removed from both
        statistics (`corrected_moments`). The result is TF's formula without
        its rounding error (Chan, Golub and LeVeque's corrected two-pass
        algorithm). An empty reduction gives NaN statistics without a warning.
        """
        n = count_of(x.shape, axes)
        if unknown_size(n):  # dask's unknown chunk sizes: the namespace knows the count when it computes
            mean = xp.mean(x, axis=tuple(axes), keepdims=True)
            d = x - mean
            return corrected_moments(mean, xp.mean(d, axis=tuple(axes), keepdims=True),
                                     xp.mean(d * d, axis=tuple(axes), keepdims=True), 1, xp)  # fmt: skip
        if n == 0:  # NaN from a multiplication: no "Mean of empty slice" warning
            nan = self.sum(x, axes, xp) * float("nan")
            return nan, nan
        mean = self.sum(x, axes, xp) / _divisor(n)
        d = x - mean
        return corrected_moments(mean, self.sum(d, axes, xp), self.sum(d * d, axes, xp), n, xp)

    def affine(self, x: Array, scale: Array, shift: Array, center: Array | None, xp: ModuleType) -> Array:
        """``(x - center) * scale + shift`` (``center`` None: ``x * scale + shift``), rounded per operation.

        The parameters broadcast against ``x`` and have its dtype.
        """
        y = x * scale if center is None else (x - center) * scale
        return y + shift

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
        """The per-channel arithmetic between the passes: the output's coefficients and the new moving statistics.

        ``rule`` "fused" is the ``FusedBatchNormV3`` kernel (§1): the output is
        ``(x - mean) * inv + beta``, gamma and beta always present. "non_fused"
        is ``tf.nn.batch_normalization``: output ``x * inv + (beta - mean * inv)``,
        either weight may be absent. ``inv = rsqrt(variance + epsilon) * gamma``
        (`inverse_stddev`). ``mean`` and ``variance`` have
        the output's broadcast shape; an ``update`` moves the moving statistics
        towards them (reshaped to the moving statistics' shape).
        """
        inv = inverse_stddev(variance + epsilon, gamma, xp)
        if rule == "fused":
            center, shift = mean, beta
        else:
            center, shift = None, (-mean * inv if beta is None else beta - mean * inv)
        if update is None:
            return Coefficients(center, inv, shift, None, None)
        shape = tuple(update.moving_mean.shape)
        new_mean, new_variance = moving_averages(
            update, xp.reshape(mean, shape), xp.reshape(variance, shape), xp=xp
        )
        return Coefficients(center, inv, shift, new_mean, new_variance)

    def backward_sums(
        self, x: Array, dy: Array, mean: Array, axes: Sequence[int], xp: ModuleType
    ) -> tuple[Array, Array, Array]:
        """``sum(x - mean)``, ``sum(dy)``, ``sum(dy * (x - mean))`` over ``axes``, kept as size-1 axes."""
        xc = x - mean
        return self.sum(xc, axes, xp), self.sum(dy, axes, xp), self.sum(dy * xc, axes, xp)

    def backward_dx(self, x: Array, dy: Array, mean: Array, k: Array, p: Array, q: Array, xp: ModuleType) -> Array:
        """The training gradient ``dy * k + ((x - mean) * p + q)``, rounded per operation."""
        t = (x - mean) * p
        return dy * k + (t + q)


REFERENCE = Ops()


def inverse_stddev(variance: Array, gamma: Array | None, xp: ModuleType) -> Array:
    """TF's ``rsqrt(variance) * gamma`` (``variance`` with epsilon added), rounded once.

    TF's ``rsqrt`` is not correctly rounded, nor is some libraries' float32
    ``sqrt`` (torch's); ``gamma / sqrt(variance)`` is formed in float64 for
    float32 vectors where the namespace has float64 and rounded once to
    float32, the most accurate value of the formula (a per-channel vector:
    the cost is nothing).
    """
    wide = wider_float(xp, variance.dtype, array_device(variance))
    v = variance if wide is None else xp.astype(variance, wide)
    g = None if gamma is None else (gamma if wide is None else xp.astype(gamma, wide))
    root = xp.sqrt(v)
    inv = 1.0 / root if g is None else g / root
    return inv if wide is None else xp.astype(inv, variance.dtype)


def corrected_moments(mean: Array, sum_d: Array, sum_d2: Array, n: Any, xp: ModuleType) -> tuple[Array, Array]:
    """The two-pass statistics from the first pass's ``mean`` and the second pass's sums over ``d = x - mean``.

    ``c = sum(d) / n`` is the mean's own rounding error; ``mean + c`` and
    ``sum(d ** 2) / n - c ** 2`` (never below 0) are TF's statistics computed
    without it. A ``c`` that is not finite (an infinite or NaN input) is
    dropped, so infinities and NaN propagate as in TF.
    """
    c = sum_d / _divisor(n)
    c = xp.where(xp.isfinite(c), c, xp.zeros_like(c))
    variance = sum_d2 / _divisor(n) - c * c
    return mean + c, xp.where(variance < 0, xp.zeros_like(variance), variance)


# ---------------------------------------------------------------------------
# Statistics (§2)
# ---------------------------------------------------------------------------


def moments(x: Array, axes: Sequence[int], *, ops: Ops = REFERENCE, xp: ModuleType) -> tuple[Array, Array]:
    """``tf.nn.moments(x, axes, keepdims=True)``: two-pass mean and biased variance.

    Reducing over no axis gives the input itself and ``(x - x) ** 2`` as the
    variance (zero, or NaN for infinite and NaN values), as in TF.
    """
    if not axes:
        d = x - x
        return x, d * d
    return ops.moments(x, tuple(axes), xp)


class RecordedMoments(NamedTuple):
    """The statistics a forward's `moments` computed, and what decided them (`BNContext.moments`)."""

    ops: Ops
    axes: tuple[int, ...]
    shape: tuple[int, ...]
    dtype: Any
    mean: Array
    variance: Array


def _batch_moments(ctx: BNContext, x: Array, axes: Sequence[int], ops: Ops, xp: ModuleType) -> tuple[Array, Array]:
    """``moments(x, axes)`` for the backward: the forward's own statistics where it computed these (the same
    operations over the same axes of an input of the same shape and dtype: the same values), else recomputed."""
    r = ctx.moments
    if (
        isinstance(r, RecordedMoments) and r.ops is ops and r.axes == tuple(axes)
        and r.shape == tuple(x.shape) and r.dtype == x.dtype
    ):  # fmt: skip
        return r.mean, r.variance
    return moments(x, axes, ops=ops, xp=xp)


def weighted_moments(
    x: Array, axes: Sequence[int], frequency_weights: Array, *, ops: Ops = REFERENCE, xp: ModuleType
) -> tuple[Array, Array]:
    """``tf.nn.weighted_moments(x, axes, frequency_weights, keepdims=True)``.

    The sum of weights is taken over the weights broadcast to ``x``'s shape,
    and the divisions are ``div_no_nan`` (a fully masked channel gives 0, not
    NaN). The mean is corrected as in `Ops.moments`.
    """
    axes = tuple(axes)
    w = cast(frequency_weights, x.dtype, xp)
    sum_of_weights = ops.sum(w + xp.zeros_like(x), axes, xp)
    mean = div_no_nan(ops.sum(w * x, axes, xp), sum_of_weights, xp)
    centered = x - mean
    # as in `Ops.moments`: the weighted sum of ``x - mean`` is the mean's rounding error, removed
    c = div_no_nan(ops.sum(w * centered, axes, xp), sum_of_weights, xp)
    c = xp.where(xp.isfinite(c), c, xp.zeros_like(c))
    variance = div_no_nan(ops.sum(w * (centered * centered), axes, xp), sum_of_weights, xp) - c * c
    return mean + c, xp.where(variance < 0, xp.zeros_like(variance), variance)


def mask_weights(
    mask: Array, x: Array, compute_dtype: Any, xp: ModuleType, virtual_batch_size: int | None = None
) -> Array:
    """The frequency weights of a mask: ``expand_dims(cast(mask, compute_dtype), -1)`` in ``x``'s dtype (§2).

    ``x`` is the input as the statistics see it (the ghost-batch view with ``virtual_batch_size``).
    """
    check_mask_broadcasts(tuple(mask.shape), tuple(x.shape), virtual_batch_size)
    w = xp.expand_dims(cast(mask, compute_dtype, xp), axis=-1)
    return cast(w, x.dtype, xp)


def ghost_batch_shape(shape: tuple[int, ...], virtual_batch_size: int, training: bool) -> tuple[int, ...]:
    """The ghost-batch view's shape (§8): ``(vbs, batch // vbs, ...)`` in training, ``(batch, 1, ...)`` otherwise.

    The statistics keep the view's axis 1: ghost batch ``j`` holds the samples
    ``j, j + G, j + 2G, ...`` (``G = batch // vbs``), TF's strided groups.
    """
    batch = shape[0]
    if training:
        return (virtual_batch_size, batch // virtual_batch_size, *shape[1:])
    return (batch, 1, *shape[1:])


def reduction_axes(rank: int, axis: Sequence[int], ghost_batches: bool) -> list[int]:
    """The axes the statistics reduce: every axis but the normalized ones (and the ghost-batch axis, 1)."""
    axes = [i for i in range(rank) if i not in axis]
    if ghost_batches:
        del axes[1]
    return axes


def broadcast_shape(rank: int, axis: Sequence[int], shape: Sequence[int]) -> tuple[int, ...]:
    """The shape per-channel values take to broadcast against the (viewed) input."""
    return tuple(shape[i] if i in axis else 1 for i in range(rank))


# ---------------------------------------------------------------------------
# Moving statistics (§3) and batch renormalization (§9)
# ---------------------------------------------------------------------------


def assign_moving_average(variable: Array, value: Array, momentum: Any, *, xp: ModuleType) -> Array:
    """``_assign_moving_average``: ``variable - (variable - value) * decay``, TF's ``assign_sub`` form.

    Rounds differently from ``variable * momentum + value * (1 - momentum)``.
    """
    decay = decay_operand(momentum, variable.dtype, xp, array_device(variable))
    return variable - (variable - cast(value, variable.dtype, xp)) * decay


def fused_moving_update(
    variable: Array, batch_value: Array, momentum: float, *, bessel: Any = 1.0, xp: ModuleType
) -> Array:
    """The fused kernel's update: ``(1 - f) * old + (f * bessel) * batch``, or ``bessel * batch`` when ``f == 1``.

    ``f = float32(1 - momentum)``; ``bessel`` is ``n / max(n - 1, 1)`` for the
    variance and 1 for the mean (§1).
    """
    dev = array_device(variable)
    dt = variable.dtype
    batch = cast(cast(batch_value, xp.float32, xp), dt, xp)
    if not is_compiling(variable) or (isinstance(bessel, (int, float)) and bessel == 1.0):
        keep, factor, replace = fused_factors(float(momentum), float(bessel))
        if replace:  # exponential_avg_factor == 1: the batch's statistics (times Bessel's factor) replace the old
            return batch if factor == 1.0 else f32_operand(factor, dt, xp, dev) * batch
        return f32_operand(keep, dt, xp, dev) * variable + f32_operand(factor, dt, xp, dev) * batch
    # under torch.compile n may be symbolic (a dynamic batch): the same float32 roundings,
    # the product by a float32 0-d array (two float32 values multiplied, rounded once)
    keep, f, replace = fused_factors(float(momentum), 1.0)
    factor = cast(xp.full((), bessel, dtype=xp.float32, device=dev) * f, dt, xp)
    if replace:
        return factor * batch
    return f32_operand(keep, dt, xp, dev) * variable + factor * batch


def moving_averages(update: MovingUpdate, mean: Array, variance: Array, *, xp: ModuleType) -> tuple[Array, Array]:
    """The new moving mean and variance from the batch's ``mean`` and ``variance`` (the moving statistics' shape)."""
    if update.rule == "fused":
        return (
            fused_moving_update(update.moving_mean, mean, update.momentum, xp=xp),
            fused_moving_update(update.moving_variance, variance, update.momentum, bessel=update.bessel, xp=xp),
        )
    if update.bessel != 1.0:  # the fused kernel's variance, updated in the assign_sub form
        variance = variance * xp.full((), update.bessel, dtype=variance.dtype, device=array_device(variance))
    return (
        assign_moving_average(update.moving_mean, mean, update.momentum, xp=xp),
        assign_moving_average(update.moving_variance, variance, update.momentum, xp=xp),
    )


def renorm_correction(
    mean: Array,
    variance: Array,
    renorm_mean: Array,
    renorm_stddev: Array,
    *,
    epsilon: float,
    clipping: dict[str, Any] | tuple[tuple[str, Any], ...],
    xp: ModuleType,
) -> tuple[Array, Array, Array]:
    """``_renorm_correction_and_moments``' corrections ``(r, d)`` and the batch stddev.

    From the pre-update renorm statistics: ``stddev = sqrt(var + eps)``,
    ``s = max(renorm_stddev, sqrt(eps))``, ``r = clip(stddev / s, rmin, rmax)``,
    ``d = clip((mean - renorm_mean) / s, -dmax, dmax)``.
    """
    stddev = xp.sqrt(variance + epsilon)
    floor = xp.sqrt(xp.full((), epsilon, dtype=renorm_stddev.dtype, device=array_device(renorm_stddev)))
    s = xp.maximum(renorm_stddev, floor)
    r = stddev / s
    d = (mean - renorm_mean) / s
    limits = dict(clipping)
    rmin, rmax, dmax = (limits.get(k) for k in ("rmin", "rmax", "dmax"))

    def like(value: Any, a: Array) -> Array:
        return xp.full((), value, dtype=a.dtype, device=array_device(a))

    if rmin is not None:
        r = xp.maximum(r, like(rmin, r))
    if rmax is not None:
        r = xp.minimum(r, like(rmax, r))
    if dmax is not None:
        d = xp.minimum(xp.maximum(d, -like(dmax, d)), like(dmax, d))
    return r, d, stddev


def compose_transforms(scale: Any, offset: Any, then_scale: Array | None, then_offset: Array | None) -> tuple[Any, Any]:
    """``y * scale + offset`` followed by ``* then_scale + then_offset``, as one transform (tf-keras)."""
    if then_scale is not None:
        scale = scale * then_scale
        offset = offset * then_scale
    if then_offset is not None:
        offset = offset + then_offset
    return scale, offset


# ---------------------------------------------------------------------------
# The forward
# ---------------------------------------------------------------------------


def batch_norm(
    x: Array,
    params: BNParams,
    state: BNState,
    /,
    *,
    training: bool,
    config: BNConfig,
    mask: Array | None = None,
    adjustment: Adjustment | None = None,
    trainable: bool = True,
    ops: Ops = REFERENCE,
    xp: ModuleType,
) -> tuple[Array, BNState]:
    """``BatchNormalization.call`` of a built v1 layer: the output and the new non-trainable state.

    ``x`` is first cast to the policy's compute dtype (Keras autocasting, §6).
    The new state's arrays are constants for autodiff, as TF's assigned
    variables are (torch ``detach``, JAX ``stop_gradient``).
    """
    x = cast(x, dtype_from_name(xp, config.compute_dtype), xp)
    if config.fused:  # build's resolution (§1); the mask is ignored there (the layer warns)
        y, new_state = fused_forward(x, params, state, training=training, config=config, trainable=trainable, ops=ops, xp=xp)
    else:
        y, new_state = non_fused_forward(
            x, params, state, training=training, config=config, mask=mask, adjustment=adjustment,
            trainable=trainable, ops=ops, xp=xp,
        )  # fmt: skip
    return y, BNState(*(new if new is old else stop_gradient(new) for new, old in zip(new_state, state, strict=True)))


def fused_forward(
    x: Array, params: BNParams, state: BNState, *, training: bool, config: BNConfig, trainable: bool,
    ops: Ops = REFERENCE, xp: ModuleType,
) -> tuple[Array, BNState]:  # fmt: skip
    """The ``FusedBatchNormV3`` CPU kernel (§1): float32 arithmetic, whatever the input's dtype.

    ``y = (x - mean) * (rsqrt(variance + epsilon) * gamma) + beta`` with the batch's
    statistics in training and the moving ones otherwise (`inference_map`); gamma and beta are 1
    and 0 where ``scale``/``center`` is off (read on every call). The moving
    variance takes Bessel's correction ``n / max(n - 1, 1)``.
    """
    if not training:
        return _inference(x, params, state, config, ops, xp)
    (channel,) = config.axis
    out_dtype = x.dtype
    x = cast(x, xp.float32, xp)
    axes = tuple(i for i in range(x.ndim) if i != channel)
    kept = keepdims_shape(x.shape, axes)
    gamma, beta = _fused_weights(params, config, kept, xp, array_device(x))
    mean, variance = moments(x, axes, ops=ops, xp=xp)
    update = None
    if trainable:
        require_known_sizes(x.shape, "The fused path's moving variance (Bessel's correction n / (n - 1))")
        n = count_of(x.shape, axes)
        bessel = n / max(n - 1, 1)  # the CPU kernel's guard: a batch of one value gives 1
        rule = "fused" if config.fused_avg_updates else "assign_sub"
        update = MovingUpdate(state.moving_mean, state.moving_variance, config.momentum, rule, bessel)
    epsilon = f32_operand(config.epsilon, xp.float32, xp, array_device(x))  # the kernel's float32 attribute
    c = ops.coefficients("fused", mean, variance, gamma, beta, epsilon, update, xp)
    y = cast(ops.affine(x, c.scale, c.shift, c.center, xp), out_dtype, xp)
    if update is None:
        return y, state
    return y, _updated(state, moving_mean=c.moving_mean, moving_variance=c.moving_variance)


def _inference(x: Array, params: BNParams, state: BNState, config: BNConfig, ops: Ops, xp: ModuleType) -> tuple[Array, BNState]:
    """An inference call of either path: `inference_map` applied to ``x``; the state unchanged."""
    m = inference_map(tuple(x.shape), x.dtype, params, state, config=config, ops=ops, xp=xp, device=array_device(x))
    return apply_map(x, m, ops=ops, xp=xp), state


def _fused_weights(params: BNParams, config: BNConfig, kept: tuple[int, ...], xp: ModuleType, device: Any) -> tuple[Array, Array]:
    """The fused kernel's float32 gamma and beta, shaped to broadcast: 1 and 0 where ``scale``/``center`` is off."""
    gamma, beta = params
    gamma = gamma if config.scale and gamma is not None else xp.ones(config.param_shape, dtype=xp.float32, device=device)
    beta = beta if config.center and beta is not None else xp.zeros(config.param_shape, dtype=xp.float32, device=device)
    return xp.reshape(cast(gamma, xp.float32, xp), kept), xp.reshape(cast(beta, xp.float32, xp), kept)


def non_fused_forward(
    x: Array, params: BNParams, state: BNState, *, training: bool, config: BNConfig, mask: Array | None,
    adjustment: Adjustment | None, trainable: bool, ops: Ops = REFERENCE, xp: ModuleType,
) -> tuple[Array, BNState]:  # fmt: skip
    """tf-keras's non-fused path: ``tf.nn.moments`` (or weighted moments) and ``tf.nn.batch_normalization``.

    16-bit inputs are computed in float32 (§6); the statistics in the weights'
    dtype; ghost batches (§8) reshape the input around a ghost-batch axis;
    ``adjustment`` (§10) and batch renormalization (§9) compose into gamma and
    beta; the moving statistics move in the ``assign_sub`` form (§3).
    """
    if not training:
        return _inference(x, params, state, config, ops, xp)
    original_shape = tuple(x.shape)
    vbs = config.virtual_batch_size
    axis = tuple(config.axis)
    if vbs is not None:
        check_ghost_batches(vbs, original_shape, training)
        x = xp.reshape(x, ghost_batch_shape(original_shape, vbs, training))
        axis = tuple(a + 1 for a in axis)
    out_dtype = x.dtype
    if is_half(out_dtype, xp):
        x = xp.astype(x, xp.float32)
    param_dtype = dtype_from_name(xp, config.param_dtype)
    axes = reduction_axes(x.ndim, axis, vbs is not None)
    bshape = broadcast_shape(x.ndim, axis, x.shape)
    scale, offset = (_reshaped(w, bshape, xp) for w in params)
    new_state, update = state, None
    if adjustment is not None:
        adj_scale, adj_bias = (_adjustment_value(v, x, xp) for v in adjustment(tuple(x.shape)))
        scale, offset = compose_transforms(adj_scale, adj_bias, scale, offset)
    xs = cast(x, param_dtype, xp)
    if mask is None:
        mean, variance = moments(xs, axes, ops=ops, xp=xp)
    else:
        weights = mask_weights(mask, xs, dtype_from_name(xp, config.compute_dtype), xp, vbs)
        mean, variance = weighted_moments(xs, axes, weights, ops=ops, xp=xp)
    # the moving statistics move towards the mean of the ghost batches' statistics, in one update
    batch_mean = _mean_over_ghost_batches(mean, xp) if vbs is not None else mean
    batch_variance = _mean_over_ghost_batches(variance, xp) if vbs is not None else variance
    batch_mean, batch_variance = (xp.reshape(v, config.param_shape) for v in (batch_mean, batch_variance))
    if config.renorm:
        r, d, new_state = _renorm(batch_mean, batch_variance, state, config=config, trainable=trainable, xp=xp)
        scale, offset = compose_transforms(_reshaped(r, bshape, xp), _reshaped(d, bshape, xp), scale, offset)
    elif trainable and vbs is None:
        update = MovingUpdate(state.moving_mean, state.moving_variance, config.momentum, "assign_sub")
    elif trainable:
        moving_mean, moving_variance = moving_averages(
            MovingUpdate(state.moving_mean, state.moving_variance, config.momentum, "assign_sub"),
            batch_mean, batch_variance, xp=xp,
        )  # fmt: skip
        new_state = _updated(state, moving_mean=moving_mean, moving_variance=moving_variance)
    mean, variance = cast(mean, x.dtype, xp), cast(variance, x.dtype, xp)
    scale = None if scale is None else _as_operand(scale, x, xp)
    offset = None if offset is None else _as_operand(offset, x, xp)
    c = ops.coefficients("non_fused", mean, variance, scale, offset, config.epsilon, update, xp)
    if update is not None:
        new_state = _updated(state, moving_mean=c.moving_mean, moving_variance=c.moving_variance)
    y = cast(ops.affine(x, c.scale, c.shift, c.center, xp), out_dtype, xp)
    return (y if vbs is None else xp.reshape(y, original_shape)), new_state


class InferenceMap(NamedTuple):
    """An inference call's output as a per-channel map of its input (`inference_map`).

    The input, seen with shape ``view`` (ghost batches; None: as it is) and cast
    to ``dtype``, maps to ``(x - center) * scale + shift`` (``center`` None:
    ``x * scale + shift``), each operation rounded on its own, and back to the
    input's dtype and shape (`apply_map`).
    """

    center: Array | None
    scale: Array
    shift: Array
    dtype: Any
    view: tuple[int, ...] | None


def inference_map(
    shape: tuple[int, ...], dtype: Any, params: BNParams, state: BNState, *, config: BNConfig,
    ops: Ops = REFERENCE, xp: ModuleType, device: Any,
) -> InferenceMap:  # fmt: skip
    """The map an inference call applies to an input of ``shape`` and ``dtype`` (the compute dtype).

    Inference normalizes with the moving statistics, so its output is a fixed
    per-channel map of the input: the fused kernel's ``(x - mean) * (rsqrt(variance
    + epsilon) * gamma) + beta`` in float32 (§1, gamma and beta 1 and 0 where
    ``scale``/``center`` is off), or ``tf.nn.batch_normalization``'s ``x * inv +
    (beta - mean * inv)`` in the input's dtype (float32 for 16-bit inputs, §6), on
    the ghost-batch view of one sample per ghost batch (§8). Its coefficients
    depend on the weights, the settings and the input's shape and dtype only; a
    caller may keep the map while none of those changes (the layer does).
    """
    if config.fused:
        (channel,) = config.axis
        kept = broadcast_shape(len(shape), (channel,), shape)
        gamma, beta = _fused_weights(params, config, kept, xp, device)
        mean, variance = (xp.reshape(cast(v, xp.float32, xp), kept) for v in state[:2])
        epsilon = f32_operand(config.epsilon, xp.float32, xp, device)  # the kernel's float32 attribute
        c = ops.coefficients("fused", mean, variance, gamma, beta, epsilon, None, xp)
        return InferenceMap(c.center, c.scale, c.shift, xp.float32, None)
    axis, view = tuple(config.axis), None
    if config.virtual_batch_size is not None:
        check_ghost_batches(config.virtual_batch_size, shape, False)
        view = ghost_batch_shape(shape, config.virtual_batch_size, False)
        axis = tuple(a + 1 for a in axis)
    dtype = xp.float32 if is_half(dtype, xp) else dtype
    bshape = broadcast_shape(len(view or shape), axis, view or shape)
    scale, offset = (None if w is None else cast(_reshaped(w, bshape, xp), dtype, xp) for w in params)
    mean, variance = (cast(_reshaped(v, bshape, xp), dtype, xp) for v in state[:2])
    c = ops.coefficients("non_fused", mean, variance, scale, offset, config.epsilon, None, xp)
    return InferenceMap(c.center, c.scale, c.shift, dtype, view)


def apply_map(x: Array, m: InferenceMap, *, ops: Ops = REFERENCE, xp: ModuleType) -> Array:
    """`inference_map`'s map applied to ``x``: in ``m.dtype`` on ``m.view``, back in ``x``'s dtype and shape."""
    shape, out_dtype = tuple(x.shape), x.dtype
    v = x if m.view is None else xp.reshape(x, m.view)
    y = cast(ops.affine(cast(v, m.dtype, xp), m.scale, m.shift, m.center, xp), out_dtype, xp)
    return y if m.view is None else xp.reshape(y, shape)


def _mean_over_ghost_batches(v: Array, xp: ModuleType) -> Array:
    """``reduce_mean(v, axis=1, keepdims=True)`` over the ghost-batch statistics (NaN without a word when empty)."""
    if v.shape[1] == 0:
        return xp.sum(v, axis=1, keepdims=True) * float("nan")
    return xp.mean(v, axis=1, keepdims=True)


def _renorm(
    batch_mean: Array, batch_variance: Array, state: BNState, *, config: BNConfig, trainable: bool, xp: ModuleType
) -> tuple[Array, Array, BNState]:
    """Batch renormalization (§9): the constant corrections ``r``, ``d`` and the new state.

    ``renorm_mean``/``renorm_stddev`` move with ``renorm_momentum`` even in a
    frozen layer (tf-keras updates them outside ``add_update``); the moving
    mean moves as usual, the moving stddev towards ``sqrt(var + eps)``, and the
    moving variance becomes ``relu(moving_stddev ** 2 - eps)``.
    """
    eps = config.epsilon
    r, d, stddev = renorm_correction(
        batch_mean, batch_variance, state.renorm_mean, state.renorm_stddev,
        epsilon=eps, clipping=config.renorm_clipping, xp=xp,
    )  # fmt: skip
    new_state = _updated(
        state,
        renorm_mean=assign_moving_average(state.renorm_mean, batch_mean, config.renorm_momentum, xp=xp),
        renorm_stddev=assign_moving_average(state.renorm_stddev, stddev, config.renorm_momentum, xp=xp),
    )
    if trainable:
        moving_stddev = assign_moving_average(state.moving_stddev, xp.sqrt(batch_variance + eps), config.momentum, xp=xp)
        squared = moving_stddev * moving_stddev - eps
        new_state = _updated(
            new_state,
            moving_mean=assign_moving_average(state.moving_mean, batch_mean, config.momentum, xp=xp),
            moving_stddev=moving_stddev,
            moving_variance=xp.maximum(squared, xp.zeros_like(squared)),  # relu; NaN stays NaN as in TF
        )
    return stop_gradient(r), stop_gradient(d), new_state


def _adjustment_value(value: Any, like: Array, xp: ModuleType) -> Any:
    """An adjustment's scale or bias: Python numbers stay numbers (see `_as_operand`), arrays take ``like``'s dtype."""
    return value if isinstance(value, (int, float)) else cast(value, like.dtype, xp)


def _as_operand(value: Any, like: Array, xp: ModuleType) -> Array:
    """``tf.cast(value, like.dtype)``: a Python number becomes a float32 tensor first.

    Only an adjustment's plain-number scale or bias can reach this cast without
    having met a weight (which would have given it the weight's dtype).
    """
    if isinstance(value, (int, float)):
        value = xp.full((), value, dtype=xp.float32, device=array_device(like))
    return cast(value, like.dtype, xp)


# ---------------------------------------------------------------------------
# The gradient (docs/backward.md)
# ---------------------------------------------------------------------------


class _Factors(NamedTuple):
    """What the gradient needs of a forward, in the work dtype, broadcast against the (viewed) input.

    The output is ``y = gamma * (a * xhat + b) + beta``, ``xhat = (x - mean) * inv``;
    ``a``, ``b`` are the constant renorm/adjustment factors (None: 1 and 0);
    ``w`` the mask's weights (None without a mask).
    """

    mean: Array
    variance: Array
    gamma: Array | None
    a: Array | None
    b: Array | None
    w: Array | None


def batch_norm_vjp(ctx: BNContext, dy: Array, *, ops: Ops = REFERENCE) -> BNGrads:
    """The vector-Jacobian product of `batch_norm`: ``(dx, dgamma, dbeta)`` for the upstream gradient ``dy``.

    With ``inv = 1/sqrt(var + epsilon)``, ``k = gamma * a * inv``, mask weights
    ``w`` (1 without a mask) and their sum ``W`` per statistic::

        training:   dx = k * (dy - w * sum(dy) / W - w * xhat * sum(dy * xhat) / W)
        inference:  dx = k * dy
        dgamma = sum(dy * (a * xhat + b))       dbeta = sum(dy)

    Sums run over the statistics' axes (per ghost batch) for ``dx`` and over
    every non-channel axis for ``dgamma``/``dbeta``. The batch statistics are
    the forward's (`BNContext.moments`), or recomputed from ``x`` with the
    forward's own functions: the same values.
    """
    xp, config = ctx.xp, ctx.config
    check_vjp_arguments(dy, ctx.x, xp, training=ctx.training)
    x, dy, axis, work = _vjp_inputs(ctx, dy)
    param_axes = [i for i in range(x.ndim) if i not in axis]
    stat_axes = param_axes if config.fused else reduction_axes(x.ndim, axis, config.virtual_batch_size is not None)
    f = _vjp_factors(ctx, x, axis, stat_axes, work, ops)
    if ctx.training:
        dx, sum_dy, sum_dy_xhat = _training_dx(x, dy, f, stat_axes, config, ops, xp)
        rest_axes = [i for i in param_axes if i not in stat_axes]
    else:
        sum_xc, sum_dy, sum_dy_xc = ops.backward_sums(x, dy, f.mean, param_axes, xp)
        inv = 1.0 / xp.sqrt(f.variance + _epsilon(config, x, xp))
        dx, sum_dy_xhat, rest_axes = dy * _k(inv, f), inv * sum_dy_xc, []
    dgamma, dbeta = _parameter_gradients(ctx, f, sum_dy, sum_dy_xhat, rest_axes, xp)
    if ctx.config.fused and ctx.training and dgamma is not None and math.prod(ctx.x.shape) == 0:
        dgamma = xp.zeros_like(dgamma)  # an empty batch: TF's fused gradient kernel returns zeros
    dx = cast(dx, dtype_from_name(xp, config.compute_dtype), xp)
    if config.virtual_batch_size is not None and not config.fused:
        dx = xp.reshape(dx, tuple(ctx.x.shape))
    return BNGrads(cast(dx, ctx.x.dtype, xp), dgamma, dbeta)  # the autocast's gradient: back to x's dtype


def _vjp_inputs(ctx: BNContext, dy: Array) -> tuple[Array, Array, tuple[int, ...], Any]:
    """``x`` and ``dy`` as the forward computed with them: compute dtype, ghost-batch view, work dtype."""
    xp, config = ctx.xp, ctx.config
    compute_dtype = dtype_from_name(xp, config.compute_dtype)
    x, dy = cast(ctx.x, compute_dtype, xp), cast(dy, compute_dtype, xp)  # dy is the cotangent of y (compute dtype)
    axis = tuple(config.axis)
    if config.fused:
        work = xp.float32
    else:
        if config.virtual_batch_size is not None:
            check_ghost_batches(config.virtual_batch_size, tuple(x.shape), ctx.training)
            shape = ghost_batch_shape(tuple(x.shape), config.virtual_batch_size, ctx.training)
            x, dy = xp.reshape(x, shape), xp.reshape(dy, shape)
            axis = tuple(a + 1 for a in axis)
        work = xp.float32 if is_half(compute_dtype, xp) else compute_dtype
    return cast(x, work, xp), cast(dy, work, xp), axis, work


def _epsilon(config: BNConfig, x: Array, xp: ModuleType) -> Any:
    return f32_operand(config.epsilon, xp.float32, xp, array_device(x)) if config.fused else config.epsilon


def _vjp_factors(
    ctx: BNContext, x: Array, axis: tuple[int, ...], stat_axes: list[int], work: Any, ops: Ops
) -> _Factors:
    """The forward's statistics and constant factors, recomputed (training) or read (inference)."""
    xp, config = ctx.xp, ctx.config
    bshape = broadcast_shape(x.ndim, axis, x.shape)
    gamma = ctx.params.gamma if (not config.fused or config.scale) else None
    gamma = None if gamma is None else _reshaped(cast(gamma, work, xp), bshape, xp)
    if not ctx.training:
        mean, variance = (cast(_reshaped(v, bshape, xp), work, xp) for v in ctx.state[:2])
        return _Factors(mean, variance, gamma, None, None, None)
    if config.fused:
        mean, variance = _batch_moments(ctx, x, stat_axes, ops, xp)
        return _Factors(mean, variance, gamma, None, None, None)
    xs = cast(x, dtype_from_name(xp, config.param_dtype), xp)
    w = None
    if ctx.mask is None:
        mean, variance = _batch_moments(ctx, xs, stat_axes, ops, xp)
    else:
        w = mask_weights(ctx.mask, xs, dtype_from_name(xp, config.compute_dtype), xp, config.virtual_batch_size)
        mean, variance = weighted_moments(xs, stat_axes, w, ops=ops, xp=xp)
        w = cast(w, work, xp)
    a = b = None
    if ctx.adjustment is not None:
        a, b = (_constant(v, work, xp, array_device(x)) for v in ctx.adjustment)
    if config.renorm:
        vbs = config.virtual_batch_size is not None
        batch_mean = _mean_over_ghost_batches(mean, xp) if vbs else mean
        batch_variance = _mean_over_ghost_batches(variance, xp) if vbs else variance
        r, d, _ = renorm_correction(
            xp.reshape(batch_mean, config.param_shape), xp.reshape(batch_variance, config.param_shape),
            ctx.state.renorm_mean, ctx.state.renorm_stddev,
            epsilon=config.epsilon, clipping=config.renorm_clipping, xp=xp,
        )  # fmt: skip
        r, d = (cast(_reshaped(v, bshape, xp), work, xp) for v in (r, d))
        # renorm composes after the adjustment: a <- r * a, b <- d * a + b
        da = d if a is None else d * a
        b = da if b is None else da + b
        a = r if a is None else r * a
    return _Factors(cast(mean, work, xp), cast(variance, work, xp), gamma, a, b, w)


def _constant(value: Any, dtype: Any, xp: ModuleType, device: Any) -> Array:
    if isinstance(value, (int, float)):
        return xp.full((), float(value), dtype=dtype, device=device)
    return xp.astype(value, dtype)


def _k(inv: Array, f: _Factors) -> Array:
    """``k = gamma * a * inv``: the output's derivative along ``xhat`` times ``inv``."""
    k = inv if f.gamma is None else inv * f.gamma
    return k if f.a is None else k * f.a


def _training_dx(
    x: Array, dy: Array, f: _Factors, stat_axes: list[int], config: BNConfig, ops: Ops, xp: ModuleType
) -> tuple[Array, Array, Array]:
    """``dx`` of a training call, and the per-statistic ``sum(dy)`` and ``sum(dy * xhat)``.

    Corrected two-pass statistics: ``delta = mean(x - mean)`` is the rounding
    error of the mean, removed from the centring and from the variance
    (``mean((x - m) ** 2) = var + delta ** 2`` exactly), so that the gradient
    keeps its accuracy when ``|mean| >> std``.
    """
    n = _divisor(count_of(x.shape, stat_axes))
    if f.w is None:
        sum_xc, s1, sum_dy_xc = ops.backward_sums(x, dy, f.mean, stat_axes, xp)
        count = None
        delta = sum_xc / n
    else:
        xc = x - f.mean
        sum_xc, s1, sum_dy_xc = ops.sum(f.w * xc, stat_axes, xp), ops.sum(dy, stat_axes, xp), ops.sum(dy * xc, stat_axes, xp)
        count = ops.sum(f.w + xp.zeros_like(x), stat_axes, xp)
        delta = div_no_nan(sum_xc, count, xp)
    variance = f.variance - delta * delta
    variance = xp.where(variance > 0, variance, xp.zeros_like(variance))
    inv = 1.0 / xp.sqrt(variance + _epsilon(config, x, xp))
    k = _k(inv, f)
    s2 = sum_dy_xc - delta * s1  # sum(dy * (x - mean - delta))
    c1, c2 = (v / n for v in (s1, s2)) if count is None else (div_no_nan(v, count, xp) for v in (s1, s2))
    p = -(k * inv * inv * c2)
    q = -(k * c1) - delta * p
    if f.w is None:
        dx = ops.backward_dx(x, dy, f.mean, k, p, q, xp)
    else:
        dx = dy * k + f.w * ((x - f.mean) * p + q)
    return dx, s1, inv * s2


def _parameter_gradients(
    ctx: BNContext, f: _Factors, sum_dy: Array, sum_dy_xhat: Array, rest_axes: list[int], xp: ModuleType
) -> tuple[Array | None, Array | None]:
    """``dgamma = sum(dy * (a * xhat + b))``, ``dbeta = sum(dy)``, from the per-statistic sums."""
    config = ctx.config
    param_dtype = dtype_from_name(xp, config.param_dtype)

    def finish(per_statistic: Array) -> Array:
        total = xp.sum(per_statistic, axis=tuple(rest_axes), keepdims=True) if rest_axes else per_statistic
        return cast(xp.reshape(total, config.param_shape), param_dtype, xp)

    # the fused path replaces a weight by a constant once `scale`/`center` is off: it gets no gradient
    dgamma = dbeta = None
    if ctx.params.gamma is not None and (config.scale or not config.fused):
        gsum = sum_dy_xhat if f.a is None else f.a * sum_dy_xhat
        if f.b is not None:
            gsum = gsum + f.b * sum_dy
        dgamma = finish(gsum)
    if ctx.params.beta is not None and (config.center or not config.fused):
        dbeta = finish(sum_dy)
    return dgamma, dbeta
