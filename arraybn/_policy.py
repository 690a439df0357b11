"""Keras dtype policies: which dtype the layer computes in and stores its weights in."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["Policy", "get_policy"]

_POLICIES = {
    "float32": ("float32", "float32"),
    "float64": ("float64", "float64"),
    "float16": ("float16", "float16"),
    "bfloat16": ("bfloat16", "bfloat16"),
    "mixed_float16": ("float16", "float32"),
    "mixed_bfloat16": ("bfloat16", "float32"),
}
_ALIASES = {"double": "float64", "half": "float16", "float": "float32"}
# Dtypes TF accepts as a layer dtype although batch normalization cannot run in them:
# the error comes when the layer is called (TF: InvalidArgumentError from its kernels).
_NON_FLOAT = frozenset(
    {"int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "bool", "complex64", "complex128", "string"}
)
# TensorFlow's DataType enum values, which ``tf.as_dtype`` accepts as a layer dtype (True is 1)
_DTYPE_ENUM = {1: "float32", 2: "float64", 3: "int32", 4: "uint8", 5: "int16", 6: "int8", 7: "string", 8: "complex64",
               9: "int64", 10: "bool", 14: "bfloat16", 17: "uint16", 18: "complex128", 19: "float16", 22: "uint32",
               23: "uint64"}


@dataclass(frozen=True)
class Policy:
    """A dtype policy (``tf.keras.mixed_precision.Policy``).

    ``compute_dtype`` is what inputs are cast to and what the layer returns;
    ``variable_dtype`` is the policy's weight dtype. Batch normalization
    stores its weights in float32 whenever the policy's dtype is 16-bit
    (``param_dtype``), as tf-keras does.
    """

    name: str

    @property
    def compute_dtype(self) -> str:
        return _POLICIES.get(self.name, (self.name, self.name))[0]

    @property
    def variable_dtype(self) -> str:
        return _POLICIES.get(self.name, (self.name, self.name))[1]

    @property
    def is_floating(self) -> bool:
        return self.name in _POLICIES

    @property
    def param_dtype(self) -> str:
        v = self.variable_dtype
        return "float32" if v in ("float16", "bfloat16") else v

    @property
    def is_mixed(self) -> bool:
        return self.name.startswith("mixed_")

    def serialize(self) -> Any:
        """What a Keras layer's ``get_config()["dtype"]`` holds for this policy."""
        if not self.is_mixed:
            return self.name
        return {
            "module": "keras.mixed_precision",
            "class_name": "Policy",
            "config": {"name": self.name},
            "registered_name": None,
        }


def _falsy(dtype: Any) -> bool:
    try:
        return not dtype
    except (TypeError, ValueError) as err:  # an array: Keras tests ``if dtype``
        msg = f"Cannot use dtype={dtype!r} as a dtype policy: its truth value is ambiguous ({err}); a dtype name is allowed."
        raise ValueError(msg) from err


def get_policy(dtype: Any) -> Policy:
    """A `Policy` from ``None`` (float32), a name, a Policy, its config dict, or a dtype object."""
    if isinstance(dtype, Policy):
        return dtype
    if isinstance(dtype, dict):
        name = (dtype.get("config") or {}).get("name") if isinstance(dtype.get("config"), dict) else None
        if name is None:
            msg = f"Unknown `config` as a `dict`: received dtype={dtype!r}; a dtype policy config is allowed."
            raise ValueError(msg)
    elif _falsy(dtype):
        return Policy("float32")  # Keras: a falsy dtype (None, '', 0, False) is the default policy
    elif isinstance(dtype, str):
        name = dtype
    elif (hasattr(dtype, "__index__") or type(dtype).__name__ == "bool") and not isinstance(dtype, type):  # TF's DataType enum (True, np.int64(1) are 1)
        name = _DTYPE_ENUM.get(int(dtype), repr(dtype))
    elif hasattr(dtype, "dtype") and not isinstance(dtype, type):  # a NumPy scalar: tf.as_dtype takes its dtype
        name = str(dtype.dtype)
    else:  # a dtype object of some library: numpy.float64, torch.float16, ...
        name = getattr(dtype, "__name__", None) or str(dtype).rsplit(".", 1)[-1]
    name = _ALIASES.get(name, name)
    if name not in _POLICIES and name not in _NON_FLOAT:
        msg = (
            f"Cannot convert dtype={dtype!r} to a dtype policy. Use one of {sorted(_POLICIES)} "
            "(or None for float32)."
        )
        raise TypeError(msg)
    return Policy(name)
