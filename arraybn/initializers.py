"""Weight initializers with Keras's names, arguments and configs.

An initializer is called as ``init(shape, dtype, *, xp, device)`` and returns an
array of namespace ``xp`` on ``device``. Plain callables ``(shape, dtype) ->
array`` are accepted too (the layer converts what they return).

Random initializers are deterministic for a given ``seed`` (NumPy's PCG64
generator, then one copy to the target device at build time). They cannot
reproduce TensorFlow's random streams; the distributions are the same
(tested by their moments), the numbers are not.
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any

from ._serialization import Registry

__all__ = [
    "Constant",
    "GlorotNormal",
    "GlorotUniform",
    "HeNormal",
    "HeUniform",
    "Initializer",
    "LecunNormal",
    "LecunUniform",
    "Ones",
    "RandomNormal",
    "RandomUniform",
    "TruncatedNormal",
    "VarianceScaling",
    "Zeros",
    "deserialize",
    "get",
    "serialize",
]


class Initializer:
    """Base class: ``__call__(shape, dtype, *, xp, device=None)``."""

    def __call__(self, shape: tuple[int, ...], dtype: Any = None, *, xp: ModuleType, device: Any = None) -> Any:
        raise NotImplementedError

    def get_config(self) -> dict[str, Any]:
        return {}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Initializer:
        return cls(**config)


_registry = Registry("initializer", "keras.initializers", Initializer)


@_registry.register()
class Zeros(Initializer):
    """All zeros."""

    def __call__(self, shape, dtype=None, *, xp, device=None):  # type: ignore[no-untyped-def]
        return xp.zeros(tuple(shape), dtype=dtype, device=device)


@_registry.register()
class Ones(Initializer):
    """All ones."""

    def __call__(self, shape, dtype=None, *, xp, device=None):  # type: ignore[no-untyped-def]
        return xp.ones(tuple(shape), dtype=dtype, device=device)


@_registry.register()
class Constant(Initializer):
    """A constant ``value`` (a Python number)."""

    def __init__(self, value: float = 0) -> None:
        self.value = value  # checked where TF converts it: when the weights are created

    def __call__(self, shape, dtype=None, *, xp, device=None):  # type: ignore[no-untyped-def]
        value = self.value
        if isinstance(value, bool):
            value = int(value)  # tf.constant(True, float32) is 1.0
        if not isinstance(value, (int, float)):
            msg = (
                "Constant initializer only supports scalar values; "
                f"received value={value!r} of type {type(value).__name__}."
            )
            raise TypeError(msg)
        return xp.full(tuple(shape), value, dtype=dtype, device=device)

    def get_config(self) -> dict[str, Any]:
        return {"value": self.value}


class _Random(Initializer):
    def __init__(self, seed: int | None = None) -> None:
        self.seed = seed

    def _rng(self) -> Any:
        import numpy as np  # build-time only, never in the forward pass

        return np.random.default_rng(self.seed)

    def _sample(self, shape: tuple[int, ...]) -> Any:
        raise NotImplementedError

    def __call__(self, shape, dtype=None, *, xp, device=None):  # type: ignore[no-untyped-def]
        values = self._sample(tuple(shape))
        out = xp.asarray(values.astype("float64"), device=device)
        return xp.astype(out, dtype) if dtype is not None else out


def _truncated_normal(rng: Any, shape: tuple[int, ...], mean: float, stddev: float) -> Any:
    """Normal samples redrawn until within two standard deviations (TF's rule)."""
    out = rng.standard_normal(shape)
    bad = abs(out) > 2.0
    while bad.any():
        out[bad] = rng.standard_normal(int(bad.sum()))
        bad = abs(out) > 2.0
    return mean + stddev * out


@_registry.register()
class RandomNormal(_Random):
    """Normal samples with ``mean`` and ``stddev``."""

    def __init__(self, mean: float = 0.0, stddev: float = 0.05, seed: int | None = None) -> None:
        super().__init__(seed)
        self.mean, self.stddev = mean, stddev

    def _sample(self, shape):  # type: ignore[no-untyped-def]
        return self._rng().normal(self.mean, self.stddev, shape)

    def get_config(self) -> dict[str, Any]:
        return {"mean": self.mean, "stddev": self.stddev, "seed": self.seed}


@_registry.register()
class RandomUniform(_Random):
    """Uniform samples in ``[minval, maxval)``."""

    def __init__(self, minval: float = -0.05, maxval: float = 0.05, seed: int | None = None) -> None:
        super().__init__(seed)
        self.minval, self.maxval = minval, maxval

    def _sample(self, shape):  # type: ignore[no-untyped-def]
        return self._rng().uniform(self.minval, self.maxval, shape)

    def get_config(self) -> dict[str, Any]:
        return {"minval": self.minval, "maxval": self.maxval, "seed": self.seed}


@_registry.register()
class TruncatedNormal(_Random):
    """Normal samples, redrawn outside two standard deviations."""

    def __init__(self, mean: float = 0.0, stddev: float = 0.05, seed: int | None = None) -> None:
        super().__init__(seed)
        self.mean, self.stddev = mean, stddev

    def _sample(self, shape):  # type: ignore[no-untyped-def]
        return _truncated_normal(self._rng(), shape, self.mean, self.stddev)

    def get_config(self) -> dict[str, Any]:
        return {"mean": self.mean, "stddev": self.stddev, "seed": self.seed}


def _compute_fans(shape: tuple[int, ...]) -> tuple[int, int]:
    """Keras's fan computation (a 1-D weight has fan_in = fan_out = its length)."""
    if len(shape) < 1:
        return 1, 1
    if len(shape) == 1:
        return shape[0], shape[0]
    if len(shape) == 2:
        return shape[0], shape[1]
    receptive = math.prod(shape[:-2])
    return shape[-2] * receptive, shape[-1] * receptive


@_registry.register()
class VarianceScaling(_Random):
    """Keras's variance scaling (``mode`` fan_in/fan_out/fan_avg; ``distribution``)."""

    _MODES = ("fan_in", "fan_out", "fan_avg")
    _DISTRIBUTIONS = ("normal", "truncated_normal", "untruncated_normal", "uniform")

    def __init__(
        self,
        scale: float = 1.0,
        mode: str = "fan_in",
        distribution: str = "truncated_normal",
        seed: int | None = None,
    ) -> None:
        super().__init__(seed)
        if scale <= 0.0:
            msg = f"`scale` must be positive float. Received: scale={scale}."
            raise ValueError(msg)
        mode = mode.lower()
        if mode not in self._MODES:
            msg = f"Invalid `mode` argument: {mode}. Please use one of the {list(self._MODES)}."
            raise ValueError(msg)
        distribution = distribution.lower()
        if distribution == "normal":
            distribution = "truncated_normal"
        if distribution not in self._DISTRIBUTIONS:
            msg = f"Invalid `distribution` argument: {distribution}. Allowed distributions: {list(self._DISTRIBUTIONS)}."
            raise ValueError(msg)
        self.scale, self.mode, self.distribution = scale, mode, distribution

    def _sample(self, shape):  # type: ignore[no-untyped-def]
        fan_in, fan_out = _compute_fans(shape)
        scale = self.scale
        if self.mode == "fan_in":
            scale /= max(1.0, fan_in)
        elif self.mode == "fan_out":
            scale /= max(1.0, fan_out)
        else:
            scale /= max(1.0, (fan_in + fan_out) / 2.0)
        rng = self._rng()
        if self.distribution == "truncated_normal":
            # 0.879... = stddev of a standard normal truncated to (-2, 2)
            return _truncated_normal(rng, shape, 0.0, math.sqrt(scale) / 0.87962566103423978)
        if self.distribution == "untruncated_normal":
            return rng.normal(0.0, math.sqrt(scale), shape)
        limit = math.sqrt(3.0 * scale)
        return rng.uniform(-limit, limit, shape)

    def get_config(self) -> dict[str, Any]:
        return {"scale": self.scale, "mode": self.mode, "distribution": self.distribution, "seed": self.seed}


def _preset(name: str, scale: float, mode: str, distribution: str) -> type:
    def __init__(self: VarianceScaling, seed: int | None = None) -> None:
        VarianceScaling.__init__(self, scale=scale, mode=mode, distribution=distribution, seed=seed)

    def get_config(self: VarianceScaling) -> dict[str, Any]:
        return {"seed": self.seed}

    cls = type(name, (VarianceScaling,), {"__init__": __init__, "get_config": get_config})
    cls.__doc__ = f"``VarianceScaling(scale={scale}, mode={mode!r}, distribution={distribution!r})``."
    cls.__module__ = __name__
    return _registry.register()(cls)


GlorotUniform = _preset("GlorotUniform", 1.0, "fan_avg", "uniform")
GlorotNormal = _preset("GlorotNormal", 1.0, "fan_avg", "truncated_normal")
HeNormal = _preset("HeNormal", 2.0, "fan_in", "truncated_normal")
HeUniform = _preset("HeUniform", 2.0, "fan_in", "uniform")
LecunNormal = _preset("LecunNormal", 1.0, "fan_in", "truncated_normal")
LecunUniform = _preset("LecunUniform", 1.0, "fan_in", "uniform")

_registry.classes.update({"zero": Zeros, "one": Ones, "normal": RandomNormal, "uniform": RandomUniform})


def get(identifier: Any) -> Any:
    """An initializer from a name, config dict, instance or callable (Keras's ``get``)."""
    return _registry.get(identifier)


def serialize(initializer: Any) -> Any:
    return _registry.serialize(initializer)


def deserialize(config: Any) -> Any:
    return _registry.deserialize(config)
