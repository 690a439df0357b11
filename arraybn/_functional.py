"""The public functional API: `batch_norm`, its forward-with-context and its vector-Jacobian product.

Each function finds the namespace of its arrays, picks the schedule for the
call once (``arraybn._schedules.select``) and hands both to the reference
arithmetic (``arraybn._reference``), which defines every number computed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

from . import _reference
from ._namespace import array_device, array_namespace, dtype_from_name
from ._reference import InferenceMap, Ops
from ._schedules import select
from ._types import BNConfig, BNContext, BNGrads, BNParams, BNState

Array = Any
Adjustment = Callable[[tuple[int, ...]], tuple[Any, Any]]

__all__ = ["batch_norm", "batch_norm_backward", "batch_norm_forward", "batch_norm_vjp"]


def _namespace_of(x: Array, params: BNParams, state: BNState, mask: Array | None = None) -> ModuleType:
    arrays = [x, *(a for a in (*params, *state) if a is not None)]
    if mask is not None:
        arrays.append(mask)
    return array_namespace(*arrays)


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
    xp
        The arrays' namespace; found from the arrays when omitted.

    Returns
    -------
    y, new_state
        ``y`` has ``x``'s shape and ``config.compute_dtype``; ``new_state`` holds new
        arrays (the inputs are never mutated), held constant for autodiff (torch's
        ``detach``, JAX's ``stop_gradient``): like TF's moving-average assignments,
        they carry no gradient back to ``x``.

    Notes
    -----
    The arithmetic is ``arraybn._reference.batch_norm``'s; the call runs under
    the schedule `arraybn.schedule` selects for ``x``'s library.
    """
    return _batch_norm(
        x, params, state, training=training, config=config, mask=mask, adjustment=adjustment,
        trainable=trainable, xp=xp, record=None,
    )  # fmt: skip


def _batch_norm(
    x: Array, params: BNParams, state: BNState, /, *, training: bool, config: BNConfig, mask: Array | None,
    adjustment: Adjustment | None, trainable: bool, xp: ModuleType | None, record: list[_MomentsRecorder] | None,
) -> tuple[Array, BNState]:  # fmt: skip
    """`batch_norm`; with ``record`` (a list), a training call under a schedule appends the recorder of its
    operations, which keeps the batch statistics for the backward (`BNContext.moments`). Under the
    reference's operations (``torch.compile`` among them) nothing is recorded: the backward recomputes."""
    if xp is None:
        xp = _namespace_of(x, params, state)
    ops = select(x, xp)
    if record is not None and training and ops is not _reference.REFERENCE:
        ops = _MomentsRecorder(ops)
        record.append(ops)
    return _reference.batch_norm(
        x, params, state, training=training, config=config, mask=mask, adjustment=adjustment,
        trainable=trainable, ops=ops, xp=xp,
    )  # fmt: skip


def inference_map(
    x: Array, params: BNParams, state: BNState, /, *, config: BNConfig, xp: ModuleType | None = None
) -> tuple[Ops, InferenceMap]:
    """The schedule for ``x`` and the per-channel map an inference call applies to it.

    `batch_norm` in inference is ``apply_inference_map(x, *inference_map(x, ...))``: the map's
    coefficients depend on the weights, ``config`` and ``x``'s shape and dtype only
    (``arraybn._reference.inference_map``), so a caller may apply one map to many inputs.
    """
    if xp is None:
        xp = _namespace_of(x, params, state)
    ops = select(x, xp)
    dtype = dtype_from_name(xp, config.compute_dtype)  # x's after Keras's autocast
    m = _reference.inference_map(tuple(x.shape), dtype, params, state, config=config, ops=ops, xp=xp,
                                 device=array_device(x))  # fmt: skip
    return ops, m


def apply_inference_map(x: Array, ops: Ops, m: InferenceMap, *, config: BNConfig, xp: ModuleType) -> Array:
    """`inference_map`'s map applied to ``x`` (cast to the compute dtype first, as `batch_norm` does)."""
    x = _reference.cast(x, dtype_from_name(xp, config.compute_dtype), xp)
    return _reference.apply_map(x, m, ops=ops, xp=xp)


class _MomentsRecorder(Ops):
    """The operations ``ops`` of one call, keeping the batch statistics their `moments` computed."""

    def __init__(self, ops: Ops) -> None:
        self.ops = ops
        self.name, self.bounds = ops.name, ops.bounds
        self.seen: list[_reference.RecordedMoments] = []

    def sum(self, x: Array, axes: Sequence[int], xp: ModuleType) -> Array:
        return self.ops.sum(x, axes, xp)

    def moments(self, x: Array, axes: Sequence[int], xp: ModuleType) -> tuple[Array, Array]:
        mean, variance = self.ops.moments(x, axes, xp)
        self.seen.append(_reference.RecordedMoments(self.ops, tuple(axes), tuple(x.shape), x.dtype, mean, variance))
        return mean, variance

    def affine(self, x: Array, scale: Array, shift: Array, center: Array | None, xp: ModuleType) -> Array:
        return self.ops.affine(x, scale, shift, center, xp)

    def coefficients(self, *args: Any) -> _reference.Coefficients:
        return self.ops.coefficients(*args)

    def backward_sums(
        self, x: Array, dy: Array, mean: Array, axes: Sequence[int], xp: ModuleType
    ) -> tuple[Array, Array, Array]:
        return self.ops.backward_sums(x, dy, mean, axes, xp)

    def backward_dx(self, x: Array, dy: Array, mean: Array, k: Array, p: Array, q: Array, xp: ModuleType) -> Array:
        return self.ops.backward_dx(x, dy, mean, k, p, q, xp)


def recorded_moments(recorders: list[_MomentsRecorder]) -> _reference.RecordedMoments | None:
    """The batch statistics of the one training call recorded in ``recorders`` (`_batch_norm`'s ``record``),
    where it computed one set (a mask's weighted statistics are not `moments`); else None."""
    if len(recorders) == 1 and len(recorders[0].seen) == 1:
        return recorders[0].seen[0]
    return None


class _Recorder:
    """Wraps an adjustment function and keeps what it returned."""

    def __init__(self, fn: Adjustment) -> None:
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
    adjustment: Adjustment | None = None,
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
    recorded: list[_MomentsRecorder] = []
    y, new_state = _batch_norm(
        x, params, state, training=training, config=config, mask=mask, adjustment=recorder,
        trainable=trainable, xp=xp, record=recorded,
    )  # fmt: skip
    ctx = BNContext(
        x=x,
        params=params,
        state=state,
        training=bool(training),
        config=config,
        mask=None if config.fused else mask,
        adjustment=recorder.value if recorder is not None else None,
        xp=xp,
        moments=recorded_moments(recorded),
    )
    return y, new_state, ctx


def batch_norm_backward(ctx: BNContext, dy: Array) -> BNGrads:
    """The vector-Jacobian product: ``(dx, dgamma, dbeta)`` for the upstream gradient ``dy``.

    The formulas, the dtype rules and the tolerances against TensorFlow are in
    ``docs/backward.md``; the arithmetic is ``arraybn._reference.batch_norm_vjp``'s.
    """
    return _reference.batch_norm_vjp(ctx, dy, ops=select(ctx.x, ctx.xp))


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
    adjustment: Adjustment | None = None,
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
