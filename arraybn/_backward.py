"""The layer's gradient API: ``y, ctx = layer.forward(x)`` and ``dx, grads = layer.backward(ctx, dy)``.

The Array API has no automatic differentiation, so arraybn ships the gradient
of its forward written out by hand (``arraybn._reference.batch_norm_vjp``):
the gradients ``tf.GradientTape`` gives for the v1 Keras layer. Torch and JAX
users may instead differentiate straight through the forward with their own
autodiff; both give the same gradients (``docs/backward.md``).
"""

from __future__ import annotations

from typing import Any

from ._functional import _Recorder, batch_norm_backward, recorded_moments
from ._namespace import array_device, array_namespace, float_errors_ignored
from ._types import BNConfig, BNContext, BNParams, BNState
from ._validation import check_rank_defined

Array = Any

__all__ = ["layer_backward", "layer_forward"]


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
    recorded: list[Any] = []
    layer._recording = recorded  # the training call's batch statistics, for the backward (BNContext.moments)
    try:
        y = layer(x, training=training, mask=mask)
    finally:
        layer._recording = None
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
        moments=recorded_moments(recorded),
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
