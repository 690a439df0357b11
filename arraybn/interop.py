"""Converters between arraybn and the batch normalization of PyTorch, Keras 3 and tf-keras.

Nothing here imports torch or TensorFlow at module level: the torch functions import
torch when they are called (and only where they return torch tensors).

What maps exactly and what does not:

* **Momentum.** ``torch.nn.BatchNorm*d(momentum=m)`` updates
  ``running = (1 - m) * running + m * batch``; TF and Keras update
  ``moving = momentum * moving + (1 - momentum) * batch``. torch's ``m`` is
  ``1 - momentum`` (torch's default 0.1 is Keras's 0.9; Keras's default 0.99 is
  torch's 0.01). torch's ``momentum=None`` (a cumulative average over
  ``num_batches_tracked`` batches) has no Keras counterpart: `config_from_torch`
  raises ValueError.
* **Running variance.** torch updates ``running_var`` with the unbiased batch variance
  (Bessel's correction ``n / (n - 1)``). TF's v1 layer does so on its fused path only
  (4-D or 5-D input, channel axis 1 or last, no renorm, no ghost batches, no adjustment);
  its non-fused path, and Keras 3's layer always, use the biased variance. The stored
  values mean the same thing (inference normalizes with them identically), so converting
  weights is exact; training further after a conversion accumulates a different estimate.
  The converters warn (`SemanticsWarning`) where the two sides differ.
* **Epsilon.** torch's default is ``1e-5``, Keras's ``1e-3``: carried over by the config
  converters.
* **Weights.** torch's ``weight``/``bias`` are Keras's ``gamma``/``beta``, present both or
  neither (``affine``); Keras drops ``gamma`` with ``scale=False`` and ``beta`` with
  ``center=False``. A missing torch affine is exactly ``gamma = 1``, ``beta = 0``.
  ``num_batches_tracked`` has no Keras counterpart: ignored on import, written on export.
* **Weight lists.** tf-keras (its v1 and v2 layers) and Keras 3 (checked with 3.15.1)
  order the weights ``gamma, beta, moving_mean, moving_variance`` (absent ones left out),
  then renorm's ``moving_stddev, renorm_mean, renorm_stddev``, as arraybn does.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ._layer import BatchNormalization
from ._namespace import to_numpy

__all__ = [
    "SemanticsWarning",
    "config_from_torch",
    "keras_weights",
    "load_keras_weights",
    "load_torch_state_dict",
    "momentum_from_torch",
    "momentum_to_torch",
    "torch_kwargs",
    "torch_state_dict",
    "weights_from_torch_state_dict",
]

_TORCH_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


class SemanticsWarning(UserWarning):
    """A convention that does not map exactly between two frameworks (see `arraybn.interop`)."""


# --------------------------------------------------------------------------- #
# Conventions
# --------------------------------------------------------------------------- #


def momentum_from_torch(momentum: float | None) -> float:
    """Keras's momentum for torch's: ``1 - momentum`` (torch's 0.1 is Keras's 0.9).

    Raises ValueError for ``None`` (torch's cumulative moving average), which Keras lacks.
    """
    if momentum is None:
        msg = (
            "torch's momentum=None (a cumulative average over num_batches_tracked batches) has no "
            "Keras counterpart; give the module a number."
        )
        raise ValueError(msg)
    return 1.0 - float(momentum)


def momentum_to_torch(momentum: float) -> float:
    """torch's momentum for Keras's: ``1 - momentum`` (Keras's 0.99 is torch's 0.01)."""
    return 1.0 - float(momentum)


def config_from_torch(module: Any) -> dict[str, Any]:
    """`BatchNormalization` keyword arguments equivalent to a ``torch.nn.BatchNorm{1,2,3}d``.

    ``axis=1`` (torch's channel axis), ``momentum=1 - module.momentum``,
    ``epsilon=module.eps``, ``center=scale=module.affine``. Raises ValueError for
    ``momentum=None`` and for ``track_running_stats=False`` (the Keras layer always keeps
    moving statistics and uses them in inference).
    """
    if not getattr(module, "track_running_stats", True):
        msg = (
            "track_running_stats=False normalizes with batch statistics in inference too; the Keras "
            "layer always uses its moving statistics there."
        )
        raise ValueError(msg)
    affine = bool(module.affine)
    return {
        "axis": 1,
        "momentum": momentum_from_torch(module.momentum),
        "epsilon": float(module.eps),
        "center": affine,
        "scale": affine,
    }


def torch_kwargs(layer: BatchNormalization) -> dict[str, Any]:
    """``torch.nn.BatchNorm*d`` keyword arguments equivalent to a built `BatchNormalization`.

    ``num_features``, ``eps``, ``momentum=1 - layer.momentum``, ``affine`` (True when
    the layer has gamma or beta: the missing one is exported as ones or zeros). Raises
    ValueError for layers torch's module cannot express: several channel axes, ghost
    batches, renorm. The channel axis must be 1 in the input torch gets (torch's layout).
    """
    _check_torch_expressible(layer)
    return {
        "num_features": int(layer.moving_mean.shape[0]),
        "eps": float(layer.epsilon),
        "momentum": momentum_to_torch(layer.momentum),
        "affine": bool(layer.center or layer.scale),
    }


def _check_torch_expressible(layer: BatchNormalization) -> None:
    if not layer.built:
        msg = f"Layer {layer.name!r} is not built: call it (or `build`) first."
        raise ValueError(msg)
    if layer.renorm or layer.virtual_batch_size is not None or len(layer.moving_mean.shape) != 1:
        msg = (
            f"Layer {layer.name!r} uses renorm, ghost batches or several axes: torch.nn.BatchNorm "
            "has one channel axis and no renormalization."
        )
        raise ValueError(msg)


def _fused(layer: BatchNormalization) -> bool:
    config = layer._config
    return bool(config is not None and config.fused and layer.fused)


def _warn_variance(layer: BatchNormalization, *, other: str, other_unbiased: bool) -> None:
    if not layer.trainable or _fused(layer) == other_unbiased:
        return
    ours = "unbiased (Bessel's n/(n-1), the fused path)" if _fused(layer) else "biased (the non-fused path)"
    theirs = "unbiased (Bessel's n/(n-1))" if other_unbiased else "biased"
    warnings.warn(
        f"The weights convert exactly, but further training updates the moving variance differently: "
        f"layer {layer.name!r} averages the {ours} batch variance, {other} the {theirs} one.",
        SemanticsWarning,
        stacklevel=3,
    )


# --------------------------------------------------------------------------- #
# torch state dicts
# --------------------------------------------------------------------------- #


def weights_from_torch_state_dict(
    state_dict: Mapping[str, Any], *, prefix: str = "", center: bool = True, scale: bool = True
) -> list[np.ndarray]:
    """A torch BatchNorm's state dict as a Keras weight list (NumPy, float32 unless given otherwise).

    The list suits a layer with the given ``center``/``scale``:
    ``[gamma, beta, moving_mean, moving_variance]`` without the ones switched off. A
    module without affine (``affine=False``) gives ``gamma = 1`` and ``beta = 0``, which is
    exact; a weight the layer has no place for must be the identity (gamma all ones, beta
    all zeros), else ValueError. ``prefix`` is the module's key prefix in a model's state
    dict (``"bn1."``). Keys other than torch's five are ignored only outside the prefix.
    """
    sd = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    unknown = sorted(k for k in sd if k not in _TORCH_KEYS and "." not in k)
    if unknown:
        msg = f"Not a torch BatchNorm state dict: unexpected keys {unknown} (under prefix {prefix!r})."
        raise ValueError(msg)
    for k in ("running_mean", "running_var"):
        if k not in sd:
            msg = (
                f"The state dict has no {prefix}{k}: a module with track_running_stats=False has no "
                "moving statistics to convert."
            )
            raise ValueError(msg)
    mean = to_numpy(sd["running_mean"])
    var = to_numpy(sd["running_var"])
    if mean.ndim != 1 or var.shape != mean.shape:
        msg = f"running_mean and running_var must be vectors of one shape; got {mean.shape} and {var.shape}."
        raise ValueError(msg)
    gamma = to_numpy(sd["weight"]) if "weight" in sd else np.ones_like(mean)
    beta = to_numpy(sd["bias"]) if "bias" in sd else np.zeros_like(mean)
    if not scale and not np.all(gamma == 1):
        msg = "The module's weight is not all ones, but the layer has no gamma (scale=False)."
        raise ValueError(msg)
    if not center and not np.all(beta == 0):
        msg = "The module's bias is not all zeros, but the layer has no beta (center=False)."
        raise ValueError(msg)
    out = ([gamma] if scale else []) + ([beta] if center else []) + [mean, var]
    return [np.array(a, copy=True) for a in out]


def load_torch_state_dict(layer: BatchNormalization, state_dict: Mapping[str, Any], *, prefix: str = "") -> None:
    """Set a built layer's weights from a torch BatchNorm's state dict (see `weights_from_torch_state_dict`).

    Warns (`SemanticsWarning`) when the layer is trainable and runs TF's non-fused path,
    whose moving variance averages the biased batch variance where torch's averages the
    unbiased one. The momentum and epsilon are the layer's own: build it with
    ``BatchNormalization(**config_from_torch(module))`` to carry them over.
    """
    _check_torch_expressible(layer)
    weights = weights_from_torch_state_dict(state_dict, prefix=prefix, center=layer.center, scale=layer.scale)
    layer.set_weights(weights)
    _warn_variance(layer, other="torch", other_unbiased=True)


def torch_state_dict(
    layer: BatchNormalization, *, prefix: str = "", num_batches_tracked: int = 0, device: Any = None
) -> dict[str, Any]:
    """A built layer's weights as a ``torch.nn.BatchNorm*d`` state dict of CPU (or ``device``) tensors.

    Keys ``weight, bias, running_mean, running_var, num_batches_tracked`` (after
    ``prefix``), for a module made with ``torch_kwargs(layer)``. A layer without gamma or
    beta exports ones or zeros (exact); with neither, the module has ``affine=False`` and
    the dict no ``weight``/``bias``. ``num_batches_tracked`` is torch's own counter (used
    only by ``momentum=None``). Warns (`SemanticsWarning`) like `load_torch_state_dict`.
    """
    import torch

    _check_torch_expressible(layer)
    names = layer.weight_names
    w = dict(zip(names, layer.get_weights(), strict=True))
    mean = w["moving_mean"]
    out: dict[str, Any] = {}
    if layer.center or layer.scale:
        out["weight"] = w.get("gamma", np.ones_like(mean))
        out["bias"] = w.get("beta", np.zeros_like(mean))
    out["running_mean"] = mean
    out["running_var"] = w["moving_variance"]
    result = {prefix + k: torch.as_tensor(np.array(v, copy=True), device=device) for k, v in out.items()}
    result[prefix + "num_batches_tracked"] = torch.tensor(int(num_batches_tracked), dtype=torch.long, device=device)
    _warn_variance(layer, other="torch", other_unbiased=True)
    return result


# --------------------------------------------------------------------------- #
# Keras 3 and tf-keras weight lists
# --------------------------------------------------------------------------- #


def keras_weights(layer: BatchNormalization, *, keras3: bool = False) -> list[np.ndarray]:
    """The weight list ``set_weights`` of Keras's layer takes (NumPy copies).

    Both tf-keras and Keras 3 take ``layer.get_weights()`` as it is (``gamma, beta,
    moving_mean, moving_variance``, then renorm's three). With ``keras3=True``, a trainable
    layer on TF's fused path warns (`SemanticsWarning`): Keras 3 averages the biased batch
    variance everywhere, so further training accumulates a different moving variance.
    """
    if not layer.built:
        msg = f"Layer {layer.name!r} is not built: call it (or `build`) first."
        raise ValueError(msg)
    if keras3:
        _warn_variance(layer, other="Keras 3's layer", other_unbiased=False)
    return layer.get_weights()


def load_keras_weights(layer: BatchNormalization, weights: Sequence[Any], *, keras3: bool = False) -> None:
    """Set a built layer's weights from Keras's ``get_weights()`` list (tf-keras or Keras 3).

    The count must be the layer's (``center``/``scale`` decide whether gamma and beta are
    in it); ValueError names the expected weights otherwise. Warns like `keras_weights`.
    """
    if not layer.built:
        msg = f"Layer {layer.name!r} is not built: call it (or `build`) first."
        raise ValueError(msg)
    names = layer.weight_names
    if len(weights) != len(names):
        msg = (
            f"Expected {len(names)} weights ({', '.join(names)}) for layer {layer.name!r} "
            f"(center={layer.center}, scale={layer.scale}); got {len(weights)}."
        )
        raise ValueError(msg)
    layer.set_weights(list(weights))  # NumPy arrays, or anything NumPy converts (Keras variables)
    if keras3:
        _warn_variance(layer, other="Keras 3's layer", other_unbiased=False)


def __getattr__(name: str) -> Any:
    if name == "TorchBatchNorm":  # imports torch
        from .torch import BatchNormalization as TorchBatchNorm

        return TorchBatchNorm
    msg = f"module {__name__!r} has no attribute {name!r}"
    raise AttributeError(msg)
