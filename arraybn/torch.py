"""``arraybn.torch.BatchNormalization``: TensorFlow's v1 layer as a ``torch.nn.Module``.

For torch models that need TF's exact batch normalization (to port a TF model, or to
reproduce its numbers): gamma and beta are ``nn.Parameter``s, the moving statistics
buffers, so ``parameters()``, ``state_dict()``/``load_state_dict()``, ``.to(device)``,
``torch.optim`` and ``train()``/``eval()`` work as for ``torch.nn.BatchNorm2d``. The
arithmetic is arraybn's (`arraybn.batch_norm` on torch tensors); gradients come from torch
autograd through it.

Importing this module imports torch; ``import arraybn`` does not.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from ._layer import BatchNormalization as _Layer
from ._layer import _initialize
from ._namespace import compat_namespace, dtype_from_name
from .interop import SemanticsWarning, config_from_torch

__all__ = ["BatchNormalization"]

_STATE = ("moving_mean", "moving_variance", "moving_stddev", "renorm_mean", "renorm_stddev")


class BatchNormalization(nn.Module):
    """``tf.compat.v1.keras.layers.BatchNormalization`` as a torch module, over ``num_features`` channels.

    Parameters
    ----------
    num_features
        The size of the channel axis (torch's first argument; the weights are made now,
        so that an optimizer can take ``parameters()`` before the first call).
    axis
        The channel axis of the inputs, **1 by default** (torch's NCHW layout; the Keras
        layer's default is -1). One axis; Keras's list of axes is not supported here.
    momentum, epsilon
        The Keras layer's (``momentum=0.99`` is torch's ``momentum=0.01``; see
        `arraybn.interop`).
    trainable
        ``False`` is the v1 meaning: moving statistics frozen, gamma and beta without
        gradients (``requires_grad=False``), batch statistics still used in training mode.
    device
        Where the weights are made (``.to(device)`` moves them later).
    **kwargs
        The Keras layer's other arguments (``center``, ``scale``, ``fused``, ``renorm``,
        initializers, regularizers, constraints, ...), with its defaults and meanings.
        ``dtype`` is a Keras dtype policy (``"float32"``, ``"float64"``,
        ``"mixed_float16"``, ...): it fixes the weights' dtype, so make the module with
        ``dtype=`` rather than converting it with ``.double()``.

    Notes
    -----
    ``module.train()`` (the default) normalizes with batch statistics and updates the
    moving statistics, as ``layer(x, training=True)``; ``module.eval()`` uses the moving
    statistics, as ``layer(x, training=False)``. ``forward(x, training=...)`` overrides the
    mode for one call.

    Examples
    --------
    >>> import torch, arraybn.torch
    >>> bn = arraybn.torch.BatchNormalization(3)          # axis=1, momentum=0.99, epsilon=1e-3
    >>> y = bn(torch.ones(4, 3, 2, 2))
    >>> sorted(bn.state_dict())
    ['beta', 'gamma', 'moving_mean', 'moving_variance']
    """

    def __init__(
        self,
        num_features: int,
        *,
        axis: int = 1,
        momentum: float = 0.99,
        epsilon: float = 1e-3,
        trainable: bool = True,
        device: Any = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if isinstance(axis, bool) or not isinstance(axis, int):
            msg = f"axis must be one int (the channel axis); got {axis!r}."
            raise TypeError(msg)
        if kwargs.get("virtual_batch_size") is not None:
            msg = "virtual_batch_size gives the weights another shape: use arraybn.BatchNormalization for it."
            raise ValueError(msg)
        # the Keras layer checks the arguments (TypeError for unknown ones, as Keras)
        self._template = _Layer(axis=axis, momentum=momentum, epsilon=epsilon, trainable=trainable, **kwargs)
        self._kwargs = {k: v for k, v in kwargs.items() if k != "name"}
        self.num_features = int(num_features)
        self.axis = axis
        self.momentum = momentum
        self.epsilon = epsilon
        self.trainable = trainable
        self._layers: dict[int, _Layer] = {}  # one built layer per input rank (the fused rule depends on it)
        self._last: _Layer | None = None
        xp = compat_namespace(torch)
        t = self._template
        dtype = dtype_from_name(xp, t.dtype_policy.param_dtype)
        shape = (self.num_features,)
        dev = torch.device(device) if device is not None else torch.device("cpu")

        def make(init: Any) -> torch.Tensor:
            return torch.as_tensor(_initialize(init, shape, dtype, xp, dev)).detach().clone()

        for name, on, init in (("gamma", t.scale, t.gamma_initializer), ("beta", t.center, t.beta_initializer)):
            if on:
                self.register_parameter(name, nn.Parameter(make(init), requires_grad=bool(trainable)))
            else:
                self.register_parameter(name, None)
        self.register_buffer("moving_mean", make(t.moving_mean_initializer))
        self.register_buffer("moving_variance", make(t.moving_variance_initializer))
        if t.renorm:
            self.register_buffer("moving_stddev", torch.sqrt(make(t.moving_variance_initializer)))
            self.register_buffer("renorm_mean", make(t.moving_mean_initializer))
            self.register_buffer("renorm_stddev", torch.sqrt(make(t.moving_variance_initializer)))

    @classmethod
    def from_torch(cls, module: nn.Module, **kwargs: Any) -> BatchNormalization:
        """This module with a ``torch.nn.BatchNorm{1,2,3}d``'s settings and weights.

        Momentum ``1 - module.momentum``, its eps, its affine, channel axis 1 (see
        `arraybn.interop.config_from_torch`); ``kwargs`` add Keras arguments. Warns
        (`arraybn.interop.SemanticsWarning`) for ``BatchNorm1d``: its 2-D and 3-D inputs
        take TF's non-fused path, whose moving variance averages the biased batch
        variance where torch's averages the unbiased one.
        """
        config = {**config_from_torch(module), **kwargs}
        new = cls(module.num_features, device=module.running_mean.device, **config)
        with torch.no_grad():
            if new.gamma is not None:
                new.gamma.copy_(module.weight if module.affine else torch.ones_like(new.gamma))
            if new.beta is not None:
                new.beta.copy_(module.bias if module.affine else torch.zeros_like(new.beta))
            new.moving_mean.copy_(module.running_mean)
            new.moving_variance.copy_(module.running_var)
        if isinstance(module, nn.BatchNorm1d) and new.trainable:
            warnings.warn(
                "BatchNorm1d's inputs take TensorFlow's non-fused path, whose moving variance averages "
                "the biased batch variance; torch's averages the unbiased one. The weights convert exactly.",
                SemanticsWarning,
                stacklevel=2,
            )
        return new

    # ------------------------------------------------------------------ call
    def _layer_for(self, x: torch.Tensor) -> _Layer:
        layer = self._layers.get(x.ndim)
        if layer is None:
            layer = _Layer(axis=self.axis, momentum=self.momentum, epsilon=self.epsilon, trainable=self.trainable,
                           name=self._template.name, **self._kwargs)
            layer.build(tuple(x.shape), xp=compat_namespace(torch), device=self.moving_mean.device)
            if tuple(layer.moving_mean.shape) != (self.num_features,):
                msg = (
                    f"Expected axis {self.axis} of the input to have {self.num_features} channels; "
                    f"got input shape {tuple(x.shape)}."
                )
                raise ValueError(msg)
            self._layers[x.ndim] = layer
        expected = dtype_from_name(compat_namespace(torch), layer.dtype_policy.param_dtype)
        if self.moving_mean.dtype != expected:
            msg = (
                f"The weights are {self.moving_mean.dtype} but the dtype policy "
                f"{layer.dtype_policy.name!r} keeps them in {expected}: make the module with "
                "dtype='float64' (or another policy) instead of converting it with .double()/.half()."
            )
            raise TypeError(msg)
        layer.momentum, layer.epsilon, layer.trainable = self.momentum, self.epsilon, self.trainable
        layer._device = self.moving_mean.device  # follows .to(device)
        layer._vars = {
            name: t
            for name in ("gamma", "beta", *_STATE)
            if (t := getattr(self, name, None)) is not None
        }
        return layer

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, training: bool | None = None) -> torch.Tensor:
        """Normalize ``x``: batch statistics in training mode (``self.training``, or ``training``), else moving ones."""
        layer = self._layer_for(x)
        training = self.training if training is None else bool(training)
        before = dict(layer._vars)
        y = layer(x, training=training, mask=mask)
        with torch.no_grad():
            for name in _STATE:
                new = layer._vars.get(name)
                if new is not None and new is not before[name]:
                    before[name].copy_(new)  # in place, as torch.nn.BatchNorm updates its buffers
        layer._vars = before
        self._last = layer
        return y

    @property
    def losses(self) -> list[torch.Tensor]:
        """The Keras layer's penalties (activity regularizer of the last call, gamma's and beta's
        regularizers); differentiable in gamma and beta, to add to a loss."""
        if self._last is None:  # no call yet: no activity loss, the weights' penalties already
            t = self._template
            out = []
            if self.gamma is not None and t.gamma_regularizer is not None:
                out.append(t.gamma_regularizer(self.gamma))
            if self.beta is not None and t.beta_regularizer is not None:
                out.append(t.beta_regularizer(self.beta))
            return out
        self._last._vars = {
            name: t for name in ("gamma", "beta", *_STATE) if (t := getattr(self, name, None)) is not None
        }
        return self._last.losses

    def apply_constraints(self) -> None:
        """Project gamma and beta with their constraints in place, as Keras's optimizer does after a step."""
        t = self._template
        with torch.no_grad():
            if self.gamma is not None and t.gamma_constraint is not None:
                self.gamma.copy_(t.gamma_constraint(self.gamma.detach()))
            if self.beta is not None and t.beta_constraint is not None:
                self.beta.copy_(t.beta_constraint(self.beta.detach()))

    def __getstate__(self) -> dict[str, Any]:
        """For ``copy.deepcopy`` and ``torch.save(module)``: the built layers (which hold the array
        namespace, a module object) are left out and rebuilt by the next call."""
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__
        state = dict(state)
        state["_layers"] = {}
        state["_last"] = None
        return state

    def extra_repr(self) -> str:
        return f"{self.num_features}, axis={self.axis}, momentum={self.momentum}, epsilon={self.epsilon}"
