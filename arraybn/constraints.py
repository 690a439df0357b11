"""Weight constraints with Keras's names, arguments and configs.

A constraint maps a weight array to its projection; Keras applies it in the
optimizer right after each update. arraybn applies it when
``BatchNormalization.apply_constraints()`` is called (after your update step),
or through the functional ``constrain``. Norms are taken along ``axis`` with
``keepdims``, and Keras's fuzz factor ``epsilon() = 1e-7`` guards divisions.
"""

from __future__ import annotations

from typing import Any

from ._namespace import array_namespace
from ._serialization import Registry

__all__ = ["Constraint", "MaxNorm", "MinMaxNorm", "NonNeg", "UnitNorm", "constrain", "deserialize", "get", "serialize"]

EPSILON = 1e-7  # tf.keras.backend.epsilon()


class Constraint:
    """Base class: identity projection."""

    def __call__(self, w: Any) -> Any:
        return w

    def get_config(self) -> dict[str, Any]:
        return {}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Constraint:
        return cls(**config)


_registry = Registry("constraint", "keras.constraints", Constraint)


def _xp(w: Any) -> Any:
    return array_namespace(w)


def _norms(w: Any, axis: Any, xp: Any) -> Any:
    axes = tuple(axis) if isinstance(axis, (list, tuple)) else (axis,)
    for a in axes:
        if not -w.ndim <= a < w.ndim:
            msg = (
                f"Constraint axis {axis!r} is out of range for a weight of shape {tuple(w.shape)}; "
                f"use axes in [-{w.ndim}, {w.ndim})."
            )
            raise ValueError(msg)
    return xp.sqrt(xp.sum(w * w, axis=axes, keepdims=True))


def _number(owner: Any, name: str) -> float:
    value = getattr(owner, name)
    if isinstance(value, (str, bytes)) or value is None:
        msg = f"Cannot convert {value!r} to a float: {type(owner).__name__}'s {name}={value!r}; a real number is allowed."
        raise TypeError(msg)
    try:
        return float(value)
    except (TypeError, ValueError) as err:
        msg = f"Cannot convert {value!r} to a float: {type(owner).__name__}'s {name}={value!r}; a real number is allowed."
        raise TypeError(msg) from err


def _clip(x: Any, lo: float, hi: float, xp: Any) -> Any:
    """Keras's ``backend.clip``: a maximum below the minimum is raised to it; then ``tf.clip_by_value``."""
    hi = max(hi, lo)
    return xp.maximum(xp.minimum(x, hi), lo)


@_registry.register("non_neg")
class NonNeg(Constraint):
    """Zero out negative entries: ``w * (w >= 0)``."""

    def __call__(self, w: Any) -> Any:
        xp = _xp(w)
        return w * xp.astype(w >= 0, w.dtype)


@_registry.register("max_norm")
class MaxNorm(Constraint):
    """Rescale so that the norm along ``axis`` is at most ``max_value``."""

    def __init__(self, max_value: float = 2, axis: Any = 0) -> None:
        self.max_value, self.axis = max_value, axis

    def __call__(self, w: Any) -> Any:
        xp = _xp(w)
        norms = _norms(w, self.axis, xp)
        desired = _clip(norms, 0.0, _number(self, "max_value"), xp)
        return w * (desired / (EPSILON + norms))

    def get_config(self) -> dict[str, Any]:
        return {"max_value": self.max_value, "axis": self.axis}


@_registry.register("unit_norm")
class UnitNorm(Constraint):
    """Divide by the norm along ``axis``."""

    def __init__(self, axis: Any = 0) -> None:
        self.axis = axis

    def __call__(self, w: Any) -> Any:
        xp = _xp(w)
        return w / (EPSILON + _norms(w, self.axis, xp))

    def get_config(self) -> dict[str, Any]:
        return {"axis": self.axis}


@_registry.register("min_max_norm")
class MinMaxNorm(Constraint):
    """Move the norm along ``axis`` towards ``[min_value, max_value]`` at ``rate``."""

    def __init__(self, min_value: float = 0.0, max_value: float = 1.0, rate: float = 1.0, axis: Any = 0) -> None:
        self.min_value, self.max_value, self.rate, self.axis = min_value, max_value, rate, axis

    def __call__(self, w: Any) -> Any:
        xp = _xp(w)
        norms = _norms(w, self.axis, xp)
        lo, hi, rate = _number(self, "min_value"), _number(self, "max_value"), _number(self, "rate")
        desired = rate * _clip(norms, lo, hi, xp) + (1 - rate) * norms
        return w * (desired / (EPSILON + norms))

    def get_config(self) -> dict[str, Any]:
        return {"min_value": self.min_value, "max_value": self.max_value, "rate": self.rate, "axis": self.axis}


_registry.classes.update({"nonneg": NonNeg, "maxnorm": MaxNorm, "unitnorm": UnitNorm, "min_max_norm": MinMaxNorm})


def constrain(w: Any, constraint: Any) -> Any:
    """Apply ``constraint`` (anything ``get`` accepts) to ``w``; ``None`` leaves it as is."""
    c = get(constraint)
    return w if c is None else c(w)


def get(identifier: Any) -> Any:
    """A constraint from a name (``"non_neg"``, ``"max_norm"``, ...), config, instance or callable."""
    return _registry.get(identifier)


def serialize(constraint: Any) -> Any:
    return _registry.serialize(constraint)


def deserialize(config: Any) -> Any:
    return _registry.deserialize(config)
