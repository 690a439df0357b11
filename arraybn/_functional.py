"""Pure functional core: batch normalization as TensorFlow's v1 Keras layer computes it.

Every function takes arrays and returns new arrays; nothing is mutated, so the
same code runs on immutable namespaces (JAX) and lazy ones (dask). No function
here imports a backend, branches on the backend, or reads an array's value on
the host: every decision is made from shapes, dtypes and Python settings.

The order of operations copies the TensorFlow code paths it mirrors
(``tf.nn.moments``, ``tf.nn.weighted_moments``, ``tf.nn.batch_normalization``,
``BatchNormalizationBase._assign_moving_average``, the ``FusedBatchNormV3`` CPU
kernel, ``_renorm_correction_and_moments``), so that float32 results agree with
TensorFlow to a few units in the last place.
"""

from __future__ import annotations

import functools
import math
import numbers
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any, NamedTuple

from . import _accelerator, _streaming
from ._namespace import (
    array_device,
    array_namespace,
    dtype_from_name,
    is_compiling,
    optional_dtype,
    prefers_blocked_reductions,
    stop_gradient,
)
from ._validation import require_known_sizes, unknown_size

Array = Any

__all__ = [
    "BNConfig",
    "BNParams",
    "BNState",
    "assign_moving_average",
    "batch_norm",
    "fused_moving_update",
    "moments",
    "normalize",
    "renorm_correction",
    "weighted_moments",
]


class BNParams(NamedTuple):
    """Trainable parameters; ``None`` where ``scale``/``center`` is off."""

    gamma: Array | None
    beta: Array | None


class BNState(NamedTuple):
    """Non-trainable state. The renorm fields are ``None`` unless ``renorm=True``."""

    moving_mean: Array
    moving_variance: Array
    moving_stddev: Array | None = None
    renorm_mean: Array | None = None
    renorm_stddev: Array | None = None


@dataclass(frozen=True)
class BNConfig:
    """Everything the computation needs to know, resolved once at build time.

    ``axis`` is normalized (non-negative) and relative to the caller's input,
    before any virtual-batch reshape. ``fused`` is the *effective* value TF's
    ``build`` resolves (see ``arraybn._validation.resolve_fused``).
    """

    axis: tuple[int, ...]
    rank: int
    param_shape: tuple[int, ...]
    momentum: float = 0.99
    epsilon: float = 1e-3
    fused: bool = False
    fused_avg_updates: bool = True
    renorm: bool = False
    renorm_clipping: Any = ()  # a dict is accepted and stored as sorted (key, value) pairs
    renorm_momentum: float = 0.99
    virtual_batch_size: int | None = None
    compute_dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self) -> None:
        # Hashable, so that the config can be a static argument of jax.jit.
        clipping = self.renorm_clipping
        items = clipping.items() if isinstance(clipping, dict) else clipping
        object.__setattr__(self, "renorm_clipping", tuple(sorted((str(k), v) for k, v in items)))
        vbs = self.virtual_batch_size
        if isinstance(vbs, numbers.Integral) and not isinstance(vbs, bool):
            object.__setattr__(self, "virtual_batch_size", int(vbs))  # a NumPy integer works in TF too
        if self.epsilon is None and self.fused:
            # TF passes epsilon=None through to the FusedBatchNormV3 op, which takes its attribute's
            # default (1e-4); the non-fused path fails on it (the layer raises before any work)
            object.__setattr__(self, "epsilon", 1e-4)
        if isinstance(self.epsilon, numbers.Real):
            # TF converts epsilon to the variance's dtype (or the fused kernel's float32 attribute)
            # whatever its type: a NumPy float64 epsilon must not make float32 arithmetic float64
            object.__setattr__(self, "epsilon", float(self.epsilon))
        object.__setattr__(self, "axis", tuple(self.axis))
        object.__setattr__(self, "param_shape", tuple(self.param_shape))


# ---------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------


def _f32_round(value: float, xp: ModuleType, device: Any) -> Array:
    """``tf.convert_to_tensor(python_float)``: a float32 0-d array."""
    return xp.full((), value, dtype=xp.float32, device=device)


def float32_value(value: float) -> float:
    """A Python number rounded to float32 and back (``convert_to_tensor``, ``cast_to_floatx``).

    Beyond float32's range the result is an infinity, as NumPy's and TF's casts give.
    """
    try:
        return float(struct.unpack("f", struct.pack("f", float(value)))[0])
    except OverflowError:
        return math.copysign(math.inf, float(value))


def _host_f32(value: Any) -> float | None:
    """``value`` rounded to float32 (``tf.convert_to_tensor``), as a Python float; None for arrays.

    Exact: a float32 value is a float64 value, and a sum, difference or product
    of two float32 values computed in float64 and rounded once to float32 is the
    float32 operation's result, so small constants can be formed on the host.
    """
    return float32_value(value) if isinstance(value, numbers.Real) else None


def _f32_const(value: Any, dtype: Any, xp: ModuleType, device: Any) -> Any:
    """``tf.cast(tf.convert_to_tensor(value), dtype)`` as an operand for arrays of ``dtype``.

    A Python float for float32 and float64 arrays: the Array API converts it to
    the array's dtype (exactly, as it holds a float32 value), so the result is
    the 0-d array's, without creating one (a kernel launch on a GPU). A 0-d
    array otherwise (16-bit dtypes, where some libraries would compute with the
    unrounded scalar; array-valued ``value``).
    """
    host = _host_f32(value)
    if host is not None and (dtype == xp.float32 or dtype == xp.float64):
        return host
    return _cast(_f32_round(value, xp, device), dtype, xp)


def _decay(momentum: float, dtype: Any, xp: ModuleType, device: Any) -> Any:
    """TF's ``decay = cast(convert_to_tensor(1.0 - momentum), variable.dtype)``.

    The subtraction happens in Python (float64), the result is rounded to
    float32 by ``convert_to_tensor`` and only then cast to the variable's
    dtype, so a float64 variable sees ``float64(float32(1 - momentum))``. A NumPy
    float64 ``momentum`` (``1.0 - momentum`` is one too) converts to a float64
    tensor instead: a float64 variable then decays by ``1 - momentum`` unrounded,
    a float32 one by its float32 rounding (the cast), as for a Python float.
    """
    host = _host_decay(momentum, dtype == xp.float64) if dtype in (xp.float32, xp.float64) else None
    return host if host is not None else _f32_const(1.0 - momentum, dtype, xp, device)


def _host_decay(momentum: Any, float64_variable: bool) -> float | None:
    """`_decay` as a Python float (None where momentum is not a host number)."""
    value = 1.0 - momentum
    if float64_variable and str(getattr(value, "dtype", "")) == "float64":
        return float(value)
    return _host_f32(value)


def _updated(state: BNState, **changes: Array) -> BNState:
    """``state._replace(**changes)`` spelled out field by field: torch.compile (2.11) rebuilds
    ``_replace``'s result with fields missing."""
    return BNState(
        changes.get("moving_mean", state.moving_mean),
        changes.get("moving_variance", state.moving_variance),
        changes.get("moving_stddev", state.moving_stddev),
        changes.get("renorm_mean", state.renorm_mean),
        changes.get("renorm_stddev", state.renorm_stddev),
    )


def _cast(a: Array, dtype: Any, xp: ModuleType) -> Array:
    """``a`` in ``dtype``: ``a`` itself when it already is (``xp.astype`` would copy it, a kernel launch on a GPU)."""
    return a if a.dtype == dtype else xp.astype(a, dtype)


def _div_no_nan(a: Array, b: Array, xp: ModuleType) -> Array:
    """``tf.math.div_no_nan``: 0 where ``b == 0``."""
    zero = b == 0
    return xp.where(zero, xp.zeros_like(a), a / xp.where(zero, xp.ones_like(b), b))


def _reshape_param(v: Array | None, shape: tuple[int, ...], xp: ModuleType) -> Array | None:
    if v is None or tuple(v.shape) == shape:
        return v
    return xp.reshape(v, shape)


# ---------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------


def moments(x: Array, axes: Sequence[int], *, xp: ModuleType) -> tuple[Array, Array]:
    """Two-pass mean and biased variance, kept as broadcastable (keepdims) arrays.

    Mirrors ``tf.nn.moments``: ``mean = reduce_mean(x)``, ``variance =
    reduce_mean(squared_difference(x, mean))``. Reducing over no axis gives
    the input itself and ``(x - x) ** 2`` as the variance (zero, or NaN for
    infinite and NaN values), as in TF.
    """
    axes = tuple(axes)
    if not axes:  # TF: reduce_mean over no axis is x, the variance (x - x) ** 2 (NaN for inf and NaN)
        return x, _accelerator.squared_difference(x, x, xp)
    kept_axes = set(range(x.ndim)) - {a % x.ndim for a in axes}
    if len(kept_axes) == 1:
        (channel,) = kept_axes
        per_channel = None
        if _accelerator.uses_matmul_sums(x, channel, xp):
            per_channel = _accelerator.channel_moments(x, channel, xp)
        elif (lay := _streaming.layout(x, channel, xp)) is not None:
            per_channel = _streaming.channel_moments(x, lay, xp)
        if per_channel is not None:
            kept = tuple(x.shape[i] if i == channel else 1 for i in range(x.ndim))
            return xp.reshape(per_channel[0], kept), xp.reshape(per_channel[1], kept)
    spans = _stat_spans(x, axes, xp)
    if len(spans) <= 1:
        mean = mean_over(x, axes, xp)
        variance = mean_over(_accelerator.squared_difference(x, mean, xp), axes, xp)
        return mean, variance
    # Large eager inputs: the same two passes, slice by slice along the first
    # reduced axis so that the second pass reads the slice from cache, and the
    # slices merged exactly (Chan, Golub & LeVeque): x is read from memory once
    # and no input-sized temporary is made. Same accuracy class as two-pass.
    lead = axes[0]
    count, mean, m2 = 0, None, None
    for start, stop in spans:
        xk = x[(slice(None),) * lead + (slice(start, stop), ...)]
        nk = math.prod([xk.shape[i] for i in axes])
        mk = xp.mean(xk, axis=axes, keepdims=True)
        dk = xk - mk
        m2k = xp.sum(dk * dk, axis=axes, keepdims=True)
        if mean is None:
            count, mean, m2 = nk, mk, m2k
            continue
        total = count + nk
        delta = mk - mean
        mean = mean + delta * (nk / total)
        m2 = m2 + m2k + delta * delta * (count * nk / total)
        count = total
    return mean, m2 / count


def mean_over(x: Array, axes: Sequence[int], xp: ModuleType) -> Array:
    """``xp.mean(x, axis=axes, keepdims=True)``; over an empty axis NaN without a word, as in TF
    (NumPy's mean warns "Mean of empty slice": a sum divided by zero, in the caller's errstate)."""
    axes = tuple(axes)
    if any(x.shape[a] == 0 for a in axes):  # NaN from a multiplication: no warning, even when a lazy
        return xp.sum(x, axis=axes, keepdims=True) * float("nan")  # library computes outside our errstate
    return xp.mean(x, axis=axes, keepdims=True)


_STAT_CHUNK_BYTES = 1 << 20  # a slice that stays in a CPU's L2 cache between the two passes


def _stat_spans(x: Array, axes: tuple[int, ...], xp: ModuleType) -> list[tuple[int, int]]:
    """``[start, stop)`` slices of the first reduced axis, each about ``_STAT_CHUNK_BYTES`` of ``x``.

    Only eager CPU arrays are sliced: lazy arrays (dask, JAX under ``jit``,
    ``torch.compile``) have a scheduler or compiler that plans the passes, and
    on GPUs the slices would only add kernel launches.
    """
    n = x.shape[axes[0]]
    size = math.prod(x.shape) if None not in x.shape else None
    if n is None or size is None or n == 0 or size == 0 or not prefers_blocked_reductions(x):
        return [(0, n)]
    row_bytes = size // n * (xp.finfo(x.dtype).bits // 8)
    rows = max(1, _STAT_CHUNK_BYTES // row_bytes)
    return [(i, min(i + rows, n)) for i in range(0, n, rows)]


def weighted_moments(x: Array, axes: Sequence[int], frequency_weights: Array, *, xp: ModuleType) -> tuple[Array, Array]:
    """Frequency-weighted mean and variance, as ``tf.nn.weighted_moments``.

    The sum of weights is taken over the weights broadcast to ``x``'s shape,
    and both divisions are ``div_no_nan`` (a fully masked channel gives 0, not
    NaN).
    """
    axes = tuple(axes)
    w = _cast(frequency_weights, x.dtype, xp)
    weighted_sum = xp.sum(w * x, axis=axes, keepdims=True)
    broadcast_w = w + xp.zeros_like(x)
    sum_of_weights = xp.sum(broadcast_w, axis=axes, keepdims=True)
    mean = _div_no_nan(weighted_sum, sum_of_weights, xp)
    centered = x - mean
    distsq = xp.sum(w * (centered * centered), axis=axes, keepdims=True)
    variance = _div_no_nan(distsq, sum_of_weights, xp)
    return mean, variance


# ---------------------------------------------------------------------------
# Output transform
# ---------------------------------------------------------------------------


def normalize(
    x: Array,
    mean: Array,
    variance: Array,
    offset: Array | None,
    scale: Array | None,
    epsilon: float,
    *,
    xp: ModuleType,
) -> Array:
    """``tf.nn.batch_normalization``, in TF's order of operations.

    ``inv = rsqrt(variance + epsilon) * scale``;
    ``y = x * inv + (offset - mean * inv)``: one multiply-add per element.
    """
    inv = 1.0 / xp.sqrt(variance + epsilon)
    if scale is not None:
        inv = inv * scale
    shift = -mean * inv if offset is None else offset - mean * inv
    return scale_shift(x, _cast(inv, x.dtype, xp), _cast(shift, x.dtype, xp), xp=xp)


def scale_shift(x: Array, scale: Array, shift: Array, *, xp: ModuleType) -> Array:
    """``y = x * scale`` then ``y += shift``: TF's two roundings, one output array, no other input-sized one.

    ``scale`` and ``shift`` broadcast against ``x``; large CuPy arrays take one
    elementwise kernel (:mod:`arraybn._accelerator`) and, when both vary along one
    channel axis only, eager CPU arrays the cache-blocked schedule of
    :mod:`arraybn._streaming` (same operations, same roundings, either way).
    """
    fused = _accelerator.multiply_add(x, scale, shift, xp)
    if fused is not None:
        return fused
    channel = _channel_axis_of(x.shape, scale.shape, shift.shape)
    lay = None if channel is None else _streaming.layout(x, channel, xp)
    if lay is not None:
        kept = tuple(x.shape[i] if i == channel else 1 for i in range(x.ndim))
        flat = [xp.reshape(xp.broadcast_to(v, kept), (-1,)) for v in (scale, shift)]
        return _streaming.scale_shift(x, flat[0], flat[1], lay, xp)
    y = x * scale
    y += shift  # in place on our own temporary: no second input-sized array
    return y


def _channel_axis_of(shape: tuple[int, ...], *param_shapes: tuple[int, ...]) -> int | None:
    """The one axis along which keepdims-shaped parameters vary, or None."""
    varying = set()
    for p in param_shapes:
        if len(p) != len(shape):
            return None
        for i, (n, m) in enumerate(zip(shape, p)):
            if m != 1:
                if m != n:
                    return None
                varying.add(i)
    return varying.pop() if len(varying) == 1 else None


def compose_transforms(
    scale: Array | float | None,
    offset: Array | float | None,
    then_scale: Array | None,
    then_offset: Array | None,
) -> tuple[Any, Any]:
    """Compose ``y*scale + offset`` followed by ``*then_scale + then_offset`` (tf-keras)."""
    if then_scale is not None:
        scale = scale * then_scale
        offset = offset * then_scale
    if then_offset is not None:
        offset = offset + then_offset
    return scale, offset


# ---------------------------------------------------------------------------
# Moving statistics
# ---------------------------------------------------------------------------


def assign_moving_average(variable: Array, value: Array, momentum: float, *, xp: ModuleType) -> Array:
    """New value of a moving average, in TF's ``assign_sub`` form.

    ``variable - (variable - value) * (1 - momentum)``, which rounds
    differently from ``variable * momentum + value * (1 - momentum)``.
    """
    dev = array_device(variable)
    decay = _decay(momentum, variable.dtype, xp, dev)
    return variable - (variable - _cast(value, variable.dtype, xp)) * decay


def fused_moving_update(
    variable: Array, batch_value: Array, momentum: float, *, bessel: float = 1.0, xp: ModuleType
) -> Array:
    """The fused kernel's running-statistic update (``exponential_avg_factor``).

    ``(1 - f) * old + (f * bessel) * batch`` with ``f = float32(1 - momentum)``
    computed in float32 like the kernel's attribute; ``bessel`` is
    ``n / max(n - 1, 1)`` for the variance and 1 for the mean.
    """
    dev = array_device(variable)
    dt = variable.dtype
    batch = _cast(_cast(batch_value, xp.float32, xp), dt, xp)
    if bessel == 1.0 or not is_compiling(variable):
        keep, factor = _fused_factors(float(momentum), float(bessel))
        return _f32_const(keep, dt, xp, dev) * variable + _f32_const(factor, dt, xp, dev) * batch
    # under torch.compile n may be symbolic (a dynamic batch size): the same float32 roundings,
    # the last one by a float32 0-d array (a product of two float32 values, rounded once)
    keep, f = _fused_factors(float(momentum), 1.0)
    factor = _cast(_f32_round(bessel, xp, dev) * f, dt, xp)
    return _f32_const(keep, dt, xp, dev) * variable + factor * batch


@functools.lru_cache(maxsize=256)
def _fused_factors(momentum: float, bessel: float) -> tuple[float, float]:
    """``(1 - f, f * bessel)`` of the fused kernel's update, each rounded to float32 (on the host).

    ``f = float32(1 - momentum)`` is the kernel's float32 attribute; with
    ``bessel = 1`` the second factor is ``f`` itself. Kept per (momentum, bessel):
    both are the same on every call of a layer.
    """
    f = float32_value(1.0 - momentum)
    return float32_value(1.0 - f), float32_value(f * float32_value(bessel))


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
    """Batch-renorm corrections ``(r, d)`` and the batch stddev.

    Uses the pre-update renorm statistics, as TF does:
    ``stddev = sqrt(var + eps)``, ``s = max(renorm_stddev, sqrt(eps))``,
    ``r = clip(stddev / s, rmin, rmax)``, ``d = clip((mean - renorm_mean) / s, -dmax, dmax)``.
    ``r`` and ``d`` are constants for the gradient (``stop_gradient`` in TF).
    """
    stddev = xp.sqrt(variance + epsilon)
    floor = xp.sqrt(xp.full((), epsilon, dtype=renorm_stddev.dtype, device=array_device(renorm_stddev)))
    s = xp.maximum(renorm_stddev, floor)
    r = stddev / s
    d = (mean - renorm_mean) / s
    clipping = dict(clipping)  # a dict, or BNConfig's (key, value) pairs
    rmin, rmax, dmax = (clipping.get(k) for k in ("rmin", "rmax", "dmax"))
    if rmin is not None:
        r = xp.maximum(r, _as_like(rmin, r, xp))
    if rmax is not None:
        r = xp.minimum(r, _as_like(rmax, r, xp))
    if dmax is not None:
        d = xp.maximum(d, -_as_like(dmax, d, xp))
        d = xp.minimum(d, _as_like(dmax, d, xp))
    return r, d, stddev


def _as_like(value: Any, like: Array, xp: ModuleType) -> Array:
    return xp.full((), value, dtype=like.dtype, device=array_device(like))


# ---------------------------------------------------------------------------
# The entry point
# ---------------------------------------------------------------------------


def _reduction_axes(ndim: int, axis: Sequence[int], virtual: bool) -> list[int]:
    axes = [i for i in range(ndim) if i not in axis]
    if virtual:
        del axes[1]  # the ghost-batch axis is kept
    return axes


def _broadcast_shape(ndim: int, axis: Sequence[int], shape: Sequence[int]) -> tuple[int, ...]:
    return tuple(shape[i] if i in axis else 1 for i in range(ndim))


def batch_norm(
    x: Array,
    params: BNParams,
    state: BNState,
    /,
    *,
    training: bool,
    config: BNConfig,
    mask: Array | None = None,
    adjustment: Callable[[tuple[int, ...]], tuple[Any, Any]] | None = None,
    trainable: bool = True,
    xp: ModuleType | None = None,
) -> tuple[Array, BNState]:
    """Batch-normalize ``x``; return the output and the new non-trainable state.

    Reproduces ``tf.compat.v1.keras.layers.BatchNormalization.call`` for an
    already built layer.

    Parameters
    ----------
    x
        Input of rank ``config.rank``; cast to ``config.compute_dtype`` first
        (Keras autocasting).
    params, state
        Weights in ``config.param_dtype`` with shape ``config.param_shape``.
    training
        ``True``: batch statistics (and state updates); ``False``: moving
        statistics. (The layer maps ``None`` to ``False`` as the v1 layer does.)
    config
        Resolved settings; see `BNConfig`.
    mask
        Optional weights broadcastable to ``x`` after a trailing axis is added
        (``x.shape[:-1]`` usually); non-fused only, as in TF (the fused path
        ignores it and the layer warns).
    adjustment
        ``adjustment(shape) -> (scale, bias)``, applied in training only.
    trainable
        ``False`` reproduces a frozen v1 layer: batch statistics are still used
        in training, but the moving mean/variance (and renorm's moving stddev)
        are not updated. Renorm's own ``renorm_mean``/``renorm_stddev`` still
        are, as in tf-keras, where those updates bypass ``add_update``.

    Returns
    -------
    y, new_state
        ``y`` has ``x``'s shape and ``config.compute_dtype``; ``new_state`` holds new
        arrays (the inputs are never mutated), held constant for autodiff (torch's
        ``detach``, JAX's ``stop_gradient``): like TF's moving-average assignments,
        they carry no gradient back to ``x``.
    """
    if xp is None:
        xp = array_namespace(x, *[a for a in (*params, *state) if a is not None])
    compute_dtype = dtype_from_name(xp, config.compute_dtype)
    param_dtype = dtype_from_name(xp, config.param_dtype)
    if x.dtype != compute_dtype:
        x = xp.astype(x, compute_dtype)
    if config.fused:
        y, new_state = _fused(x, params, state, training=training, config=config, trainable=trainable, xp=xp)
    else:
        y, new_state = _non_fused(
            x,
            params,
            state,
            training=training,
            config=config,
            mask=mask,
            adjustment=adjustment,
            trainable=trainable,
            param_dtype=param_dtype,
            xp=xp,
        )
    # The new statistics are constants for autodiff (torch, JAX), as TF's assigned variables are:
    # no gradient flows from a later use of the moving statistics back into this batch.
    return y, BNState(*(new if new is old else stop_gradient(new) for new, old in zip(new_state, state, strict=True)))


def _fused(
    x: Array, params: BNParams, state: BNState, *, training: bool, config: BNConfig, trainable: bool, xp: ModuleType
) -> tuple[Array, BNState]:
    """The ``FusedBatchNormV3`` kernel's arithmetic (float32 accumulation)."""
    (ch,) = config.axis
    ndim = x.ndim
    out_dtype = x.dtype
    xf = x if x.dtype == xp.float32 else xp.astype(x, xp.float32)
    axes = tuple(i for i in range(ndim) if i != ch)
    update = training and trainable
    if update:
        require_known_sizes(x.shape, "The fused path's moving variance (Bessel's correction n / (n - 1))")
    n = math.prod([x.shape[i] for i in axes])
    bessel = 1.0 if unknown_size(n) else n / max(n - 1, 1)  # n unknown (dask) only outside an update
    if _accelerator.takes_kernels(xf, xp) and (config.fused_avg_updates or not update):
        momentum = float(config.momentum) if update else 0.0
        keep, mean_factor = _fused_factors(momentum, 1.0) if update else (0.0, 0.0)
        variance_factor = _fused_factors(momentum, bessel)[1] if update else 0.0
        fast = _accelerator.batch_norm(
            xf,
            *params,
            state.moving_mean,
            state.moving_variance,
            axes=axes,
            fused=True,
            training=training,
            update=update,
            epsilon=float32_value(config.epsilon),
            factors=(keep, mean_factor, variance_factor),
            xp=xp,
        )
        if fast is not None:
            return _from_kernels(fast, state, out_dtype, xp)
    bshape = tuple(x.shape[i] if i == ch else 1 for i in range(ndim))
    dev = array_device(x)
    gamma, beta = params
    if gamma is None:
        gamma = xp.ones(config.param_shape, dtype=xp.float32, device=dev)
    if beta is None:
        beta = xp.zeros(config.param_shape, dtype=xp.float32, device=dev)
    gamma = xp.reshape(_cast(gamma, xp.float32, xp), bshape)
    beta = xp.reshape(_cast(beta, xp.float32, xp), bshape)
    eps = _f32_const(config.epsilon, xp.float32, xp, dev)
    if training:
        mean, variance = moments(xf, axes, xp=xp)
        scaling = gamma / xp.sqrt(variance + eps)
        # (x - mean) * scaling + beta folded into one multiply-add per element
        y = scale_shift(xf, scaling, beta - mean * scaling, xp=xp)
        new_state = state
        if trainable:
            bmean = xp.reshape(mean, config.param_shape)
            bvar = xp.reshape(variance, config.param_shape)
            if config.fused_avg_updates:
                new_mean = fused_moving_update(state.moving_mean, bmean, config.momentum, xp=xp)
                new_var = fused_moving_update(state.moving_variance, bvar, config.momentum, bessel=bessel, xp=xp)
            else:  # momentum given as a non-Python number: the assign_sub form
                bvar = bvar * xp.full((), bessel, dtype=bvar.dtype, device=dev)
                new_mean = assign_moving_average(state.moving_mean, bmean, config.momentum, xp=xp)
                new_var = assign_moving_average(state.moving_variance, bvar, config.momentum, xp=xp)
            new_state = _updated(state, moving_mean=new_mean, moving_variance=new_var)
    else:
        mean = xp.reshape(_cast(state.moving_mean, xp.float32, xp), bshape)
        variance = xp.reshape(_cast(state.moving_variance, xp.float32, xp), bshape)
        scaling = gamma / xp.sqrt(variance + eps)
        y = scale_shift(xf, scaling, beta - mean * scaling, xp=xp)
        new_state = state
    if y.dtype != out_dtype:
        y = xp.astype(y, out_dtype)
    return y, new_state


def _from_kernels(
    fast: tuple[Array, tuple[Array, Array] | None], state: BNState, out_dtype: Any, xp: ModuleType
) -> tuple[Array, BNState]:
    """The layer's result from :func:`arraybn._accelerator.batch_norm`'s: output cast back, new state."""
    y, moving = fast
    new_state = state if moving is None else _updated(state, moving_mean=moving[0], moving_variance=moving[1])
    return _cast(y, out_dtype, xp), new_state


def _non_fused(
    x: Array,
    params: BNParams,
    state: BNState,
    *,
    training: bool,
    config: BNConfig,
    mask: Array | None,
    adjustment: Callable[[tuple[int, ...]], tuple[Any, Any]] | None,
    trainable: bool,
    param_dtype: Any,
    xp: ModuleType,
) -> tuple[Array, BNState]:
    """tf-keras's non-fused path: moments, moving averages, renorm, ghost batches."""
    vbs = config.virtual_batch_size
    original_shape = tuple(x.shape)
    axis = tuple(config.axis)
    if vbs is not None:
        if not isinstance(vbs, int) or isinstance(vbs, bool):
            msg = f"virtual_batch_size must be an integer; received virtual_batch_size={vbs!r}."
            raise ValueError(msg)
        batch = original_shape[0]
        require_known_sizes(original_shape, "virtual_batch_size (the ghost batches' reshape)")
        if training:
            if batch % vbs != 0:
                msg = (
                    f"virtual_batch_size={vbs} must divide the batch size, but the input has "
                    f"batch size {batch} (shape {original_shape}). Use a batch whose size is a "
                    f"multiple of {vbs}."
                )
                raise ValueError(msg)
            x = xp.reshape(x, (vbs, batch // vbs, *original_shape[1:]))
        else:
            x = xp.reshape(x, (batch, 1, *original_shape[1:]))
        axis = tuple(a + 1 for a in axis)
    out_dtype = x.dtype
    if _is_half(out_dtype, xp):  # all math in float32 for 16-bit inputs, as tf-keras
        x = xp.astype(x, xp.float32)
    ndim = x.ndim
    reduction_axes = _reduction_axes(ndim, axis, vbs is not None)
    plain = vbs is None and not (training and (mask is not None or adjustment is not None or config.renorm))
    if plain and x.dtype == param_dtype and _accelerator.takes_kernels(x, xp):
        update = training and trainable
        decay = _host_decay(config.momentum, x.dtype == xp.float64) if update else 0.0
        fast = None
        if decay is not None:
            fast = _accelerator.batch_norm(
                x,
                *params,
                state.moving_mean,
                state.moving_variance,
                axes=tuple(reduction_axes),
                fused=False,
                training=training,
                update=update,
                epsilon=float32_value(config.epsilon) if x.dtype == xp.float32 else config.epsilon,  # a float
                factors=(decay,),
                xp=xp,
            )
        if fast is not None:
            return _from_kernels(fast, state, out_dtype, xp)
    bshape = _broadcast_shape(ndim, axis, x.shape)
    gamma, beta = params
    scale = _reshape_param(gamma, bshape, xp)
    offset = _reshape_param(beta, bshape, xp)
    new_state = state
    if not training:
        mean = _reshape_param(state.moving_mean, bshape, xp)
        variance = _reshape_param(state.moving_variance, bshape, xp)
    else:
        if adjustment is not None:
            adj_scale, adj_bias = adjustment(tuple(x.shape))
            scale, offset = compose_transforms(_as_array(adj_scale, x, xp), _as_array(adj_bias, x, xp), scale, offset)
        xs = x if x.dtype == param_dtype else xp.astype(x, param_dtype)
        if mask is None:
            mean, variance = moments(xs, reduction_axes, xp=xp)
        else:
            weights = _mask_weights(mask, xs, config, xp)
            mean, variance = weighted_moments(xs, reduction_axes, weights, xp=xp)
        if vbs is not None:
            new_mean = mean_over(mean, (1,), xp)
            new_variance = mean_over(variance, (1,), xp)
        else:
            new_mean, new_variance = mean, variance
        new_mean = xp.reshape(new_mean, config.param_shape)
        new_variance = xp.reshape(new_variance, config.param_shape)

        if config.renorm:
            r, d, stddev = renorm_correction(
                new_mean,
                new_variance,
                state.renorm_mean,
                state.renorm_stddev,
                epsilon=config.epsilon,
                clipping=dict(config.renorm_clipping),
                xp=xp,
            )
            r, d = stop_gradient(r), stop_gradient(d)  # constants for gradients, as in TF
            new_state = _updated(
                new_state,
                renorm_mean=assign_moving_average(state.renorm_mean, new_mean, config.renorm_momentum, xp=xp),
                renorm_stddev=assign_moving_average(state.renorm_stddev, stddev, config.renorm_momentum, xp=xp),
            )
            scale, offset = compose_transforms(
                _reshape_param(r, bshape, xp), _reshape_param(d, bshape, xp), scale, offset
            )

        if trainable:
            moving_mean = assign_moving_average(state.moving_mean, new_mean, config.momentum, xp=xp)
            if config.renorm:
                moving_stddev = assign_moving_average(
                    state.moving_stddev, xp.sqrt(new_variance + config.epsilon), config.momentum, xp=xp
                )
                sq = moving_stddev * moving_stddev - config.epsilon
                moving_variance = xp.maximum(sq, xp.zeros_like(sq))  # relu; NaN stays NaN as in TF
                new_state = _updated(new_state, moving_stddev=moving_stddev)
            else:
                moving_variance = assign_moving_average(state.moving_variance, new_variance, config.momentum, xp=xp)
            new_state = _updated(new_state, moving_mean=moving_mean, moving_variance=moving_variance)

    mean = _cast(mean, x.dtype, xp)
    variance = _cast(variance, x.dtype, xp)
    if offset is not None:
        offset = _cast_like_tf(offset, x, xp)
    if scale is not None:
        scale = _cast_like_tf(scale, x, xp)
    y = normalize(x, mean, variance, offset, scale, config.epsilon, xp=xp)
    if y.dtype != out_dtype:
        y = xp.astype(y, out_dtype)
    if vbs is not None:
        y = xp.reshape(y, original_shape)
    return y, new_state


def _is_half(dtype: Any, xp: ModuleType) -> bool:
    """float16 or bfloat16 where ``xp`` has them (the standard has neither).

    Compared one by one: ``numpy.dtype(...) == None`` is True for float64.
    """
    for name in ("float16", "bfloat16"):  # a plain loop: torch.compile (2.11) cannot trace a walrus in a genexpr
        half = optional_dtype(xp, name)
        if half is not None and dtype == half:
            return True
    return False


def _as_array(value: Any, like: Array, xp: ModuleType) -> Any:
    """An adjustment result: Python numbers stay numbers (see `_cast_like_tf`), arrays take ``like``'s dtype."""
    if isinstance(value, (int, float)):
        return value
    return _cast(value, like.dtype, xp)


def _cast_like_tf(value: Any, like: Array, xp: ModuleType) -> Array:
    """``tf.cast(value, like.dtype)``: a Python number becomes a float32 tensor first.

    Only an adjustment's plain-number scale or bias can reach the final cast
    without having met a weight (which would have given it the weight's dtype).
    """
    if isinstance(value, (int, float)):
        return _cast(xp.full((), value, dtype=xp.float32, device=array_device(like)), like.dtype, xp)
    return _cast(value, like.dtype, xp)


def _mask_weights(mask: Array, x: Array, config: BNConfig, xp: ModuleType) -> Array:
    """``expand_dims(cast(mask, compute_dtype), -1)``, checked to broadcast with ``x``."""
    compute_dtype = dtype_from_name(xp, config.compute_dtype)
    w = mask if mask.dtype == compute_dtype else xp.astype(mask, compute_dtype)
    w = xp.expand_dims(w, axis=-1)
    require_known_sizes((*mask.shape, *x.shape), "A mask (its broadcast against the input)")
    try:
        if _broadcast_shapes(tuple(w.shape), tuple(x.shape)) != tuple(x.shape):
            msg = "the broadcast result is larger than the input"
            raise ValueError(msg)
    except ValueError as err:
        msg = (
            f"The mask of shape {tuple(mask.shape)} does not broadcast against the input of shape "
            f"{tuple(x.shape)} once a trailing axis is added (TensorFlow expands the mask with "
            "expand_dims(mask, -1)). Pass a mask of the input's shape without its last axis."
        )
        raise ValueError(msg) from err
    return _cast(w, x.dtype, xp)


def _broadcast_shapes(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    n = max(len(a), len(b))
    a = (1,) * (n - len(a)) + a
    b = (1,) * (n - len(b)) + b
    out = []
    for p, q in zip(a, b, strict=True):
        if p != q and p != 1 and q != 1:
            msg = f"shapes {a} and {b} do not broadcast"
            raise ValueError(msg)
        out.append(q if p == 1 else p)
    return tuple(out)
