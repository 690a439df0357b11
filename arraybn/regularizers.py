"""Weight regularizers with Keras's names, factors and configs.

A regularizer maps a weight array to a 0-d array (the penalty); the layer's
``losses`` lists them in TF's order (gamma's, then beta's). As in Keras, the
factors are stored rounded to float32 (``backend.cast_to_floatx``), which is
also what ``get_config`` reports.
"""

from __future__ import annotations

import math
from typing import Any

from ._reference import float32_value
from ._namespace import array_device, array_namespace
from ._serialization import Registry

__all__ = ["L1", "L1L2", "L2", "Regularizer", "deserialize", "get", "serialize"]


def _check_penalty_number(x: Any) -> None:
    if not isinstance(x, (float, int)) or isinstance(x, bool):
        msg = f"Value {x} is not a valid regularization penalty number, expected an int or float value."
        raise ValueError(msg)
    if math.isinf(x) or math.isnan(x):
        msg = (
            f"Value {x} is not a valid regularization penalty number, "
            "an infinite number or NaN are not valid values."
        )
        raise ValueError(msg)


class Regularizer:
    """Base class: ``__call__(w) -> 0-d array``."""

    def __call__(self, w: Any) -> Any:
        return 0.0

    def get_config(self) -> dict[str, Any]:
        return {}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Regularizer:
        return cls(**config)


_registry = Registry("regularizer", "keras.regularizers", Regularizer)


def _xp(w: Any) -> Any:
    return array_namespace(w)


def _l2_loss(w: Any, xp: Any) -> Any:
    """``tf.nn.l2_loss``: ``sum(w**2 * 0.5)``, each square halved before the sum (TF's kernel), so
    a float16 sum overflows where TF's does (at twice the squares' 65504), not sooner."""
    return xp.sum(w * w * 0.5)


@_registry.register()
class L1L2(Regularizer):
    """``l1 * sum(|w|) + l2 * sum(w**2)`` (class defaults 0; the name ``"l1_l2"`` means 0.01 each)."""

    def __init__(self, l1: float = 0.0, l2: float = 0.0) -> None:
        l1 = 0.0 if l1 is None else l1
        l2 = 0.0 if l2 is None else l2
        _check_penalty_number(l1)
        _check_penalty_number(l2)
        self.l1, self.l2 = float32_value(l1), float32_value(l2)

    def __call__(self, w: Any) -> Any:
        xp = _xp(w)
        reg = xp.zeros((), dtype=w.dtype, device=array_device(w))
        if self.l1:
            reg = reg + self.l1 * xp.sum(xp.abs(w))
        if self.l2:
            reg = reg + (2.0 * self.l2) * _l2_loss(w, xp)  # TF: 2.0 * l2 * tf.nn.l2_loss(w)
        return reg

    def get_config(self) -> dict[str, Any]:
        return {"l1": self.l1, "l2": self.l2}


@_registry.register()
class L1(Regularizer):
    """``l1 * sum(|w|)`` (default 0.01)."""

    def __init__(self, l1: float = 0.01, **kwargs: Any) -> None:
        l1 = kwargs.pop("l", l1)
        if kwargs:
            msg = f"Argument(s) not recognized: {kwargs}"
            raise TypeError(msg)
        l1 = 0.01 if l1 is None else l1
        _check_penalty_number(l1)
        self.l1 = float32_value(l1)

    def __call__(self, w: Any) -> Any:
        xp = _xp(w)
        return self.l1 * xp.sum(xp.abs(w))

    def get_config(self) -> dict[str, Any]:
        return {"l1": self.l1}


@_registry.register()
class L2(Regularizer):
    """``l2 * sum(w**2)`` (default 0.01), computed as TF does: ``2 * l2 * l2_loss(w)``."""

    def __init__(self, l2: float = 0.01, **kwargs: Any) -> None:
        l2 = kwargs.pop("l", l2)
        if kwargs:
            msg = f"Argument(s) not recognized: {kwargs}"
            raise TypeError(msg)
        l2 = 0.01 if l2 is None else l2
        _check_penalty_number(l2)
        self.l2 = float32_value(l2)

    def __call__(self, w: Any) -> Any:
        return (2.0 * self.l2) * _l2_loss(w, _xp(w))  # TF: 2.0 * l2 * tf.nn.l2_loss(w)

    def get_config(self) -> dict[str, Any]:
        return {"l2": self.l2}


class UnknownRegularizer(Regularizer):
    """An unrecognized regularizer name.

    tf-keras keeps such a name as it is and fails only when the penalty is
    computed (``layer.losses``), with a ``TypeError``; arraybn does the same,
    with a message that names the problem.
    """

    def __init__(self, name: str) -> None:
        self.name = name

    def __bool__(self) -> bool:
        return bool(self.name)  # tf-keras tests ``if self._activity_regularizer:``: "" is none

    def __call__(self, w: Any) -> Any:
        known = sorted(k for k in _registry.classes if k.islower())
        msg = f"Unknown regularizer: {self.name!r} cannot compute a penalty. Known names: {known}."
        raise TypeError(msg)


def get(identifier: Any) -> Any:
    """A regularizer from a name (``"l1"``, ``"l2"``, ``"l1_l2"``), config, instance or callable."""
    if identifier == "l1_l2":
        return deserialize(identifier)
    if isinstance(identifier, str) and identifier not in _registry.classes:
        return UnknownRegularizer(identifier)
    return _registry.get(identifier)


def serialize(regularizer: Any) -> Any:
    if isinstance(regularizer, UnknownRegularizer):
        return regularizer.name
    return _registry.serialize(regularizer)


def deserialize(config: Any) -> Any:
    if config == "l1_l2":  # the name's defaults differ from the class's (Keras)
        return L1L2(l1=0.01, l2=0.01)
    return _registry.deserialize(config)
