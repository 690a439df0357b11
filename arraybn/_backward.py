"""Backward pass: the analytic vector-Jacobian product of `batch_norm`.

The Array API has no automatic differentiation, so arraybn ships the gradient
of its forward pass written out by hand, on the same namespaces as the forward.
The gradients are those ``tf.GradientTape`` gives for the v1 Keras layer:

* training (batch statistics): the gradient flows through the batch mean and
  variance (weighted ones with a mask, per ghost batch with a virtual batch
  size); renorm's ``r`` and ``d`` are constants (``tf.stop_gradient``), as are
  the ``(scale, bias)`` an ``adjustment`` returns;
* inference (moving statistics): the moving mean and variance are constants.

Usage::

    y, new_state, ctx = batch_norm_forward(x, params, state, training=True, config=config)
    dx, dgamma, dbeta = batch_norm_backward(ctx, dy)

or, in one call that does not compute ``y``, ``batch_norm_vjp(x, params,
state, dy, ...)``. For a `BatchNormalization` layer: ``y, ctx =
layer_forward(layer, x)`` and ``dx, grads = layer_backward(layer, ctx, dy)``.

The formulas, the dtype rules and the tolerances against TensorFlow are in
``docs/backward.md``. Torch and JAX users may instead differentiate straight
through `batch_norm` with their own autodiff; both give the same gradients.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any, NamedTuple

from . import _accelerator, _streaming
from ._functional import (
    BNConfig,
    BNParams,
    BNState,
    _div_no_nan,
    _is_half,
    batch_norm,
    mean_over,
    moments,
    renorm_correction,
    weighted_moments,
)
from ._namespace import array_device, array_namespace, dtype_from_name, float_errors_ignored, is_array
from ._validation import check_rank_defined, require_known_sizes, unknown_size

Array = Any

__all__ = [
    "BNContext",
    "BNGrads",
    "batch_norm_backward",
    "batch_norm_forward",
    "batch_norm_vjp",
    "layer_backward",
    "layer_forward",
]


class BNGrads(NamedTuple):
    """Gradients of a scalar loss with respect to the forward's inputs.

    ``dx`` has the shape and dtype of the ``x`` given to the forward.
    ``dgamma``/``dbeta`` have ``config.param_shape`` and ``config.param_dtype``,
    and are ``None`` where ``scale``/``center`` is off.
    """

    dx: Array
    dgamma: Array | None
    dbeta: Array | None


@dataclass(frozen=True)
class BNContext:
    """What `batch_norm_backward` needs from the forward: references, no copies.

    ``state`` is the state *before* the forward's update (renorm's ``r`` and
    ``d`` use it). ``adjustment`` holds the ``(scale, bias)`` the adjustment
    function returned during the forward (``None`` without one or outside
    training), so that a random adjustment is differentiated with the values
    the forward used. ``mask`` is ``None`` on the fused path, which ignores it.
    The batch statistics are recomputed by the backward from ``x`` rather than
    stored.
    """

    x: Array
    params: BNParams
    state: BNState
    training: bool
    config: BNConfig
    mask: Array | None
    adjustment: tuple[Any, Any] | None
    xp: ModuleType


# ---------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------


def _namespace_of(x: Array, params: BNParams, state: BNState, mask: Array | None) -> ModuleType:
    arrays = [x, *(p for p in params if p is not None), *(s for s in state if s is not None)]
    if mask is not None:
        arrays.append(mask)
    return array_namespace(*arrays)


class _Recorder:
    """Wraps an adjustment function and keeps what it returned."""

    def __init__(self, fn: Callable[[tuple[int, ...]], tuple[Any, Any]]) -> None:
        self.fn = fn
        self.value: tuple[Any, Any] | None = None

    def __call__(self, shape: tuple[int, ...]) -> tuple[Any, Any]:
        self.value = self.fn(shape)
        return self.value


def batch_norm_forward(
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
) -> tuple[Array, BNState, BNContext]:
    """`batch_norm`, plus the context its backward needs.

    ``y`` and ``new_state`` are exactly `batch_norm`'s (this calls it). The
    returned `BNContext` holds references to the inputs (no input-sized copy).
    """
    if xp is None:
        xp = _namespace_of(x, params, state, mask)
    recorder = _Recorder(adjustment) if adjustment is not None else None
    y, new_state = batch_norm(
        x,
        params,
        state,
        training=training,
        config=config,
        mask=mask,
        adjustment=recorder,
        trainable=trainable,
        xp=xp,
    )
    ctx = BNContext(
        x=x,
        params=params,
        state=state,
        training=bool(training),
        config=config,
        mask=None if config.fused else mask,
        adjustment=recorder.value if recorder is not None else None,
        xp=xp,
    )
    return y, new_state, ctx


def batch_norm_vjp(
    x: Array,
    params: BNParams,
    state: BNState,
    dy: Array,
    /,
    *,
    training: bool,
    config: BNConfig,
    mask: Array | None = None,
    adjustment: Callable[[tuple[int, ...]], tuple[Any, Any]] | None = None,
    xp: ModuleType | None = None,
) -> BNGrads:
    """Gradients of ``sum(batch_norm(x, ...)[0] * dy)`` without computing ``y``.

    Same arguments as `batch_norm`, plus the upstream gradient ``dy`` (shape of
    ``x``). ``adjustment`` is called once, as the forward would call it.
    """
    if xp is None:
        xp = _namespace_of(x, params, state, mask)
    adj = None
    if adjustment is not None and training and not config.fused:
        adj = adjustment(tuple(x.shape))
    ctx = BNContext(
        x=x,
        params=params,
        state=state,
        training=bool(training),
        config=config,
        mask=None if config.fused else mask,
        adjustment=adj,
        xp=xp,
    )
    return batch_norm_backward(ctx, dy)


# ---------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------


def _sum(a: Array, axes: Sequence[int], xp: ModuleType) -> Array:
    """Keepdims sum; over no axis, the array itself."""
    axes = tuple(axes)
    if not axes:
        return a
    kept = [i for i in range(a.ndim) if i not in {j % a.ndim for j in axes}]
    if len(kept) == 1 and _accelerator.uses_matmul_sums(a, kept[0], xp):  # GPUs: sums at memory speed
        keepdims = tuple(a.shape[i] if i in kept else 1 for i in range(a.ndim))
        return xp.reshape(_accelerator.channel_sums(a, kept[0], xp), keepdims)
    return xp.sum(a, axis=axes, keepdims=True)


def _const(value: Any, dtype: Any, xp: ModuleType, device: Any) -> Array:
    if isinstance(value, (int, float)):
        return xp.full((), float(value), dtype=dtype, device=device)
    return xp.astype(value, dtype)


def _reshape(v: Array, shape: tuple[int, ...], xp: ModuleType) -> Array:
    return v if tuple(v.shape) == shape else xp.reshape(v, shape)


def _same_shape(a: Sequence[Any], b: Sequence[Any]) -> bool:
    """Equal shapes, an unknown size (dask's NaN, None) matching an unknown one."""
    return len(a) == len(b) and all(p == q or (unknown_size(p) and unknown_size(q)) for p, q in zip(a, b, strict=True))


def batch_norm_backward(ctx: BNContext, dy: Array) -> BNGrads:
    """The vector-Jacobian product: ``(dx, dgamma, dbeta)`` for upstream gradient ``dy``.

    With ``xhat = (x - mean) * inv``, ``inv = 1/sqrt(var + epsilon)`` and the
    output ``y = gamma * (A * xhat + B) + beta`` (``A``, ``B``: the constant
    renorm/adjustment factors; 1 and 0 without them)::

        dgamma = sum(dy * (A * xhat + B))       dbeta = sum(dy)
        k      = gamma * A * inv
        training:   dx = k * (dy - w * sum(dy) / W - w * xhat * sum(dy * xhat) / W)
        inference:  dx = k * dy

    where ``w`` are the mask weights (1 without a mask) and ``W = sum(w)`` the
    count per statistic (``div_no_nan``: a fully masked channel gives
    ``dx = k * dy``). Sums run over the statistics' reduction axes (per ghost
    batch with a virtual batch size) for ``dx`` and over every non-channel axis
    for ``dgamma``/``dbeta``.

    Numerics: the centered values ``x - mean`` are formed once, so inputs with
    a large mean and a small variance lose nothing to cancellation; the batch
    statistics are recomputed from ``x`` with the forward's own functions.
    16-bit inputs (and the fused path) compute in float32, as the forward does.

    Memory: at most three input-sized arrays are alive at once, ``dx``
    included (``x - mean``, one product, the result), plus a float32 copy of
    ``x`` and of ``dy`` when they are 16-bit (or when ``dy``'s dtype differs
    from the compute dtype) and the final cast of ``dx`` to a 16-bit dtype.
    Reshapes for virtual batches are views where the namespace allows. Large
    eager NumPy inputs with one channel axis and no mask or virtual batch make
    no input-sized array besides ``dx`` (:mod:`arraybn._streaming`).
    """
    xp = ctx.xp
    config = ctx.config
    x_in = ctx.x
    in_dtype = x_in.dtype
    compute_dtype = dtype_from_name(xp, config.compute_dtype)
    param_dtype = dtype_from_name(xp, config.param_dtype)
    if not is_array(dy) or array_namespace(dy).__name__ != xp.__name__:
        kind = f"{type(dy).__module__}.{type(dy).__name__}"
        msg = f"dy must be an array of the forward's library ({xp.__name__}); got {kind}. Convert it first."
        raise TypeError(msg)
    if ctx.training:
        require_known_sizes(x_in.shape, "The backward of a training call (its counts per statistic)")
    if not _same_shape(dy.shape, x_in.shape):
        msg = f"dy has shape {tuple(dy.shape)} but the forward's input had shape {tuple(x_in.shape)}; they must match."
        raise ValueError(msg)
    x = x_in if in_dtype == compute_dtype else xp.astype(x_in, compute_dtype)
    if dy.dtype != compute_dtype:  # the cotangent of y, which has the compute dtype
        dy = xp.astype(dy, compute_dtype)
    dev = array_device(x)
    original_shape = tuple(x.shape)
    out_dtype = compute_dtype
    gamma, beta = ctx.params
    training = ctx.training

    if config.fused:
        (ch,) = config.axis
        axis = (ch,)
        work = xp.float32
        eps: Any = xp.full((), config.epsilon, dtype=xp.float32, device=dev)
    else:
        axis = tuple(config.axis)
        vbs = config.virtual_batch_size
        if vbs is not None:
            batch = original_shape[0]
            if training:
                if batch % vbs != 0:
                    msg = f"virtual_batch_size={vbs} must divide the batch size {batch}."
                    raise ValueError(msg)
                vshape = (vbs, batch // vbs, *original_shape[1:])
            else:
                vshape = (batch, 1, *original_shape[1:])
            x = xp.reshape(x, vshape)
            dy = xp.reshape(dy, vshape)
            axis = tuple(a + 1 for a in axis)
        work = xp.float32 if _is_half(compute_dtype, xp) else compute_dtype
        eps = config.epsilon
    if x.dtype != work:
        x = xp.astype(x, work)
    if dy.dtype != work:
        dy = xp.astype(dy, work)

    ndim = x.ndim
    bshape = tuple(x.shape[i] if i in axis else 1 for i in range(ndim))
    param_axes = [i for i in range(ndim) if i not in axis]
    if config.fused or config.virtual_batch_size is None:
        stat_axes = list(param_axes)
    else:
        stat_axes = [i for i in param_axes if i != 1]  # the ghost-batch axis keeps its statistics
    rest_axes = [i for i in param_axes if i not in stat_axes]

    g = None if gamma is None else _reshape(xp.astype(gamma, work), bshape, xp)
    a_factor: Array | None = None  # y = gamma * (A * xhat + B) + beta
    b_factor: Array | None = None
    w = None
    if not training:
        mean = xp.astype(_reshape(ctx.state.moving_mean, bshape, xp), work)
        variance = xp.astype(_reshape(ctx.state.moving_variance, bshape, xp), work)
    elif config.fused:
        mean, variance = moments(x, stat_axes, xp=xp)
    else:
        xs = x if x.dtype == param_dtype else xp.astype(x, param_dtype)
        if ctx.mask is None:
            mean, variance = moments(xs, stat_axes, xp=xp)
        else:
            w = _mask_weights(ctx.mask, xs, compute_dtype, xp)
            mean, variance = weighted_moments(xs, stat_axes, w, xp=xp)
            w = xp.astype(w, work)
        del xs
        if ctx.adjustment is not None:
            adj_scale, adj_bias = ctx.adjustment
            a_factor = _const(adj_scale, work, xp, dev)
            b_factor = _const(adj_bias, work, xp, dev)
        if config.renorm:
            if config.virtual_batch_size is not None:
                new_mean = mean_over(mean, (1,), xp)
                new_variance = mean_over(variance, (1,), xp)
            else:
                new_mean, new_variance = mean, variance
            r, d, _ = renorm_correction(
                xp.reshape(new_mean, config.param_shape),
                xp.reshape(new_variance, config.param_shape),
                ctx.state.renorm_mean,
                ctx.state.renorm_stddev,
                epsilon=config.epsilon,
                clipping=dict(config.renorm_clipping),
                xp=xp,
            )
            r = xp.astype(_reshape(r, bshape, xp), work)
            d = xp.astype(_reshape(d, bshape, xp), work)
            # renorm composes after the adjustment: A <- r * A, B <- d * A + B
            da = d if a_factor is None else d * a_factor
            b_factor = da if b_factor is None else da + b_factor
            a_factor = r if a_factor is None else r * a_factor
        mean = xp.astype(mean, work)
        variance = xp.astype(variance, work)

    # Large eager CPU arrays with one channel axis: the three sums and dx block
    # by block (arraybn._streaming), with the same per-channel arithmetic.
    # (x and dy have one shape and, here, one dtype: dy only needs to be laid out as x is)
    lay = None
    if w is None and len(axis) == 1 and stat_axes == param_axes and _streaming.layout(dy, axis[0], xp) is not None:
        lay = _streaming.layout(x, axis[0], xp)
    xc = sum_xc = sum_dy = sum_dy_xc = None
    if lay is not None:
        per_channel = _streaming.centred_sums(x, dy, xp.reshape(mean, (-1,)), lay, xp)
        sum_xc, sum_dy, sum_dy_xc = (xp.reshape(v, bshape) for v in per_channel)
    else:
        xc = x - mean
    if training:
        # Corrected two-pass statistics: ``delta`` is the rounding error of the
        # mean (the mean of the centered values), removed from the centering
        # and from the variance, so the gradient keeps its accuracy when
        # |mean| >> std (``mean((x - m)^2) = var + delta^2`` exactly).
        # a Python float: a weak scalar everywhere (CuPy 13 makes float32 / int >= 65536 float64)
        n = float(math.prod([x.shape[i] for i in stat_axes]))
        if w is None:
            count = None
            delta = (_sum(xc, stat_axes, xp) if sum_xc is None else sum_xc) / n
        else:
            count = _sum(w + xp.zeros_like(x), stat_axes, xp)
            delta = _div_no_nan(_sum(w * xc, stat_axes, xp), count, xp)
        variance = variance - delta * delta
        variance = xp.where(variance > 0, variance, xp.zeros_like(variance))
    inv = 1.0 / xp.sqrt(variance + eps)
    k = inv
    if g is not None:
        k = k * g
    if a_factor is not None:
        k = k * a_factor

    if training:
        s1 = _sum(dy, stat_axes, xp) if sum_dy is None else sum_dy  # per statistic: sum(dy)
        s2 = (_sum(dy * xc, stat_axes, xp) if sum_dy_xc is None else sum_dy_xc) - delta * s1  # sum(dy * (x - mean))
        if count is None:
            c1 = s1 / n
            c2 = s2 / n
        else:
            c1 = _div_no_nan(s1, count, xp)
            c2 = _div_no_nan(s2, count, xp)
        p = -(k * inv * inv * c2)
        q = -(k * c1) - delta * p
        if lay is not None:  # dy * k + ((x - mean) * p + q), block by block
            flat = [xp.reshape(xp.broadcast_to(v, bshape), (-1,)) for v in (mean, k, p, q)]
            dx = _streaming.centred_affine(x, dy, *flat, lay, xp)
        else:
            t = xc * p
            del xc
            t = t + q  # = p * (x - mean - delta) - k * c1
            if w is not None:
                t = w * t
            dx = dy * k + t
            del t
        # per statistic sum(dy * xhat) = inv * s2; A and B are per channel
        sum_dy_xhat = inv * s2
    else:
        s1 = sum_dy  # the blocked pass took it anyway (None otherwise)
        sum_dy_xhat = inv * (_sum(dy * xc, param_axes, xp) if sum_dy_xc is None else sum_dy_xc)
        del xc
        dx = dy * k

    dgamma = dbeta = None
    if gamma is not None:
        gsum = sum_dy_xhat if a_factor is None else a_factor * sum_dy_xhat
        if b_factor is not None:
            gsum = gsum + b_factor * (s1 if s1 is not None else _sum(dy, param_axes, xp))
        if training:
            gsum = _sum(gsum, rest_axes, xp)
        dgamma = xp.astype(xp.reshape(gsum, config.param_shape), param_dtype)
        if config.fused and training and math.prod(original_shape) == 0:
            # an empty batch: TF's fused gradient kernel returns zeros (the non-fused path's sums
            # give NaN there, as arraybn's do: 0 * (NaN statistics))
            dgamma = xp.zeros_like(dgamma)
    if beta is not None:
        bsum = _sum(s1, rest_axes, xp) if s1 is not None else _sum(dy, param_axes, xp)
        dbeta = xp.astype(xp.reshape(bsum, config.param_shape), param_dtype)

    if dx.dtype != out_dtype:
        dx = xp.astype(dx, out_dtype)
    if not _same_shape(dx.shape, original_shape):
        dx = xp.reshape(dx, original_shape)
    if dx.dtype != in_dtype:  # the gradient of the autocast back to the input's dtype
        dx = xp.astype(dx, in_dtype)
    return BNGrads(dx, dgamma, dbeta)


def _mask_weights(mask: Array, x: Array, compute_dtype: Any, xp: ModuleType) -> Array:
    """``expand_dims(cast(mask, compute_dtype), -1)`` in ``x``'s dtype (as the forward)."""
    w = mask if mask.dtype == compute_dtype else xp.astype(mask, compute_dtype)
    w = xp.expand_dims(w, axis=-1)
    return xp.astype(w, x.dtype)


# ---------------------------------------------------------------------------
# Layer-facing API (wired into BatchNormalization as ``forward`` / ``backward``)
# ---------------------------------------------------------------------------


def layer_forward(layer: Any, x: Array, training: Any = True, mask: Array | None = None) -> tuple[Array, BNContext]:
    """``y, ctx = layer.forward(x, training=True, mask=None)``.

    Runs ``layer(x, training=training, mask=mask)`` itself, so the output, the
    weight creation on the first call, the input checks, the fused-path mask
    warning and the state update are exactly those of a plain call; it only
    records what `layer_backward` needs (the pre-call weights and what an
    ``adjustment`` returned). Note the default ``training=True``, unlike
    ``layer(x)`` whose ``None`` means inference.
    """
    check_rank_defined(x)  # as layer(x) does, before the namespace is asked for
    xp = array_namespace(x) if mask is None else array_namespace(x, mask)
    if not layer.built:  # what the first call does, done first so the pre-call weights are known
        layer.build(tuple(x.shape), xp=xp, device=array_device(x))
    before = dict(layer._vars)
    adjustment = layer.adjustment
    recorder = _Recorder(adjustment) if adjustment is not None else None
    if recorder is not None:
        layer.adjustment = recorder
    try:
        y = layer(x, training=training, mask=mask)
    finally:
        if recorder is not None:
            layer.adjustment = adjustment
    config: BNConfig = layer._config
    is_training = False if training is None else bool(training)
    ctx = BNContext(
        x=x,
        params=BNParams(before.get("gamma"), before.get("beta")),
        state=BNState(
            before["moving_mean"],
            before["moving_variance"],
            before.get("moving_stddev"),
            before.get("renorm_mean"),
            before.get("renorm_stddev"),
        ),
        training=is_training,
        config=config,
        mask=None if config.fused else mask,
        adjustment=recorder.value if (recorder is not None and is_training) else None,
        xp=xp,
    )
    return y, ctx


def layer_backward(layer: Any, ctx: BNContext, dy: Array) -> tuple[Array, dict[str, Array]]:
    """``dx, grads = layer.backward(ctx, dy)``.

    ``grads`` maps the names of the layer's trainable weights (``"gamma"``,
    ``"beta"``, those that exist) to their gradients: empty for a layer with
    ``trainable=False``, like ``tape.gradient(loss, layer.trainable_weights)``.
    Regularization penalties (``layer.losses``) are not included; add their
    gradients yourself.
    """
    if ctx.config is not layer._config:
        msg = (
            "This context was not produced by this layer's forward (or the layer's momentum, epsilon or "
            "fused changed since); pass the ctx that layer.forward returned."
        )
        raise ValueError(msg)
    with float_errors_ignored(ctx.xp):  # NaN/inf without a word, as the forward (and TF)
        dx, dgamma, dbeta = batch_norm_backward(ctx, dy)
    grads: dict[str, Array] = {}
    if bool(layer.trainable):
        if dgamma is not None:
            grads["gamma"] = dgamma
        if dbeta is not None:
            grads["beta"] = dbeta
    return dx, grads
