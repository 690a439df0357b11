"""The data the functional core passes around: settings, weights, state, the backward's context.

Plain containers, no arithmetic: `BNConfig` is resolved once by the layer's
``build`` (or by a caller of the functional core), `BNParams` and `BNState`
hold the layer's weights, `BNContext` what a backward needs from its forward.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from types import ModuleType
from typing import Any, NamedTuple

Array = Any

__all__ = ["BNConfig", "BNContext", "BNGrads", "BNParams", "BNState"]


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
    ``build`` resolves (see ``arraybn._validation.resolve_fused``). ``center``
    and ``scale`` say whether the call uses beta and gamma: TF reads them on
    every call, so a layer built with a weight can drop it later (the weight
    stays, unused).
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
    center: bool = True
    scale: bool = True

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
    """What a backward needs from its forward: references, no copies.

    ``state`` is the state *before* the forward's update (renorm's ``r`` and
    ``d`` use it). ``adjustment`` holds the ``(scale, bias)`` the adjustment
    function returned during the forward (``None`` without one or outside
    training), so that a random adjustment is differentiated with the values
    the forward used. ``mask`` is ``None`` on the fused path, which ignores it.
    ``moments`` holds the batch statistics a training forward computed
    (``arraybn._reference.RecordedMoments``: the per-channel mean and variance,
    the operations that computed them and the input they saw); the backward
    uses them where it would compute the very same ones, and recomputes them
    from ``x`` otherwise (``None``: a context made by hand, an inference call,
    a forward under the reference's operations, a mask's weighted statistics).
    """

    x: Array
    params: BNParams
    state: BNState
    training: bool
    config: BNConfig
    mask: Array | None
    adjustment: tuple[Any, Any] | None
    xp: ModuleType
    moments: Any = None
