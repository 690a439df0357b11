"""Keras-style registries: ``get`` / ``serialize`` / ``deserialize`` for named objects.

Shared by initializers, regularizers and constraints, which all accept the
same identifiers as Keras: ``None``, a name (``"zeros"``, ``"Zeros"``), a
config dict (``{"class_name": "Constant", "config": {"value": 0.5}}``, with
or without ``"module"``), an instance, or any callable.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any


def snake_case(name: str) -> str:
    """``"RandomNormal"`` -> ``"random_normal"`` (Keras's ``to_snake_case``)."""
    s = re.sub(r"(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", s).lower()


class Registry:
    """Name -> class table for one kind of object (``"initializer"``, ...)."""

    def __init__(self, kind: str, module: str, base: type) -> None:
        self.kind = kind
        self.module = module
        self.base = base
        self.classes: dict[str, Callable[..., Any]] = {}

    def register(self, *aliases: str) -> Callable[[type], type]:
        def deco(cls: type) -> type:
            self.classes[cls.__name__] = cls
            self.classes[snake_case(cls.__name__)] = cls
            for alias in aliases:
                self.classes[alias] = cls
            return cls

        return deco

    def get(self, identifier: Any) -> Any:
        if identifier is None:
            return None
        if isinstance(identifier, dict):
            return self.deserialize(identifier)
        if isinstance(identifier, str):
            return self.deserialize(identifier)
        if callable(identifier):
            return identifier
        msg = f"Could not interpret {self.kind} identifier: {identifier}"
        raise ValueError(msg)

    def deserialize(self, config: Any) -> Any:
        if isinstance(config, str):
            name, kwargs = config, {}
        elif isinstance(config, dict):
            if "class_name" not in config or "config" not in config:
                msg = (
                    f"Improper config format for {config}. Expecting python dict contains `class_name` "
                    "and `config` as keys"
                )
                raise ValueError(msg)
            name, kwargs = config["class_name"], config["config"]
            if kwargs is None:  # Keras iterates it (``config["config"].items()``)
                msg = f"'NoneType' object has no attribute 'items': the {self.kind} config {config!r} has config=None; a dict is allowed."
                raise AttributeError(msg)
        else:
            msg = f"Could not interpret {self.kind} identifier: {config!r}"
            raise ValueError(msg)
        cls = self.classes.get(name)
        if cls is None:
            known = sorted(k for k in self.classes if k == snake_case(k))
            msg = f"Unknown {self.kind}: '{name}'. Known names: {known}."
            raise ValueError(msg)
        if not isinstance(kwargs, dict):
            msg = f"The config of {self.kind} '{name}' must be a dict; got {kwargs!r}."
            raise TypeError(msg)
        return cls(**kwargs)

    def serialize(self, obj: Any) -> Any:
        """Keras 2.13+ serialization format (``module``/``class_name``/``config``/``registered_name``)."""
        if obj is None:
            return None
        if isinstance(obj, self.base):
            return {
                "module": self.module,
                "class_name": type(obj).__name__,
                "config": obj.get_config(),
                "registered_name": None,
            }
        # A plain callable: Keras records its name and cannot rebuild it elsewhere.
        name = getattr(obj, "__name__", type(obj).__name__)
        return {
            "module": getattr(obj, "__module__", None),
            "class_name": "function",
            "config": name,
            "registered_name": name,
        }
