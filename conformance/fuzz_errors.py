"""A seeded differential fuzzer of bad input: arraybn's layer against TensorFlow's v1 layer.

Usage (one process imports both; needs TensorFlow 2.21 with tf-keras and arraybn's dependencies)::

    TF_USE_LEGACY_KERAS=1 python -m conformance.fuzz_errors [--n 3000] [--seed 0] [--json out.json]

Each case starts from a valid layer and changes one thing: a constructor argument, the input, the
mask, ``training``, ``set_weights``'s list, a ``from_config`` key, an attribute set after build, the
shape given to ``build``, or what ``adjustment`` returns. Both layers run the same steps (construct,
build/call in training, call in inference, ``losses``, a constraint step, ``get_weights``); a case's
outcome is the first step that raises and the exception's class (TensorFlow's ``OpError`` counts as
``ValueError``, as docs/semantics.md says). It prints these measures:

* the same exception class where both raise (and the same step);
* arraybn raises where TensorFlow does not, and accepts where TensorFlow raises, less the cases
  docs/semantics.md §13 lists as deliberate differences (counted apart);
* arraybn's weights changed by a step that raised;
* arraybn's messages naming the argument, and showing the received value;
* values that differ where both succeed (outputs, weights; float32 tolerance).

The case list depends on ``--seed`` and ``--n`` only.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import math
import os
import random
import re
import sys
import warnings
from typing import Any

import numpy as np

SHAPES = [(6, 3), (4, 5, 3), (2, 3, 4, 3), (2, 2, 3, 3, 3), (6, 3, 1)]


class _Obj:
    def __repr__(self) -> str:
        return "<Obj>"


# ------------------------------------------------------------------ value pools
GENERIC = [
    None, True, False, 0, 1, 2, -1, 0.0, 0.5, 0.99, 1.5, -0.5, 1e308, -1e308, float("nan"), float("inf"),
    "foo", "", "1", np.bool_(False), np.bool_(True), np.float32(0.9), np.int64(1), np.float64(0.5), [1], [],
    (1, 2), {}, {"rmax": 1.0}, {"foo": 1}, 3.5, _Obj(), b"x", 1j, np.array([0.5, 0.5]),
]
POOLS: dict[str, list[Any]] = {
    "axis": [-1, 1, 0, 3, -5, 7, [1, 2], [1, 1], [], (1,), "a", 1.0, None, [1.0], np.int64(1), True, [True]],
    "momentum": [0.0, 1.0, 0.5, -1.0, 2.0, 1e308, -1e308, float("nan"), float("inf"), None, "0.9", True,
                 np.float32(0.9), np.float64(0.9), [0.9], 1j, np.array(0.9)],
    "epsilon": [0.0, -1.0, 1e-3, 1e308, float("nan"), float("inf"), None, "1e-3", True, np.float32(1e-3),
                np.float64(1e-3), [1e-3], -1e-3, 1j, np.array(1e-3)],
    "center": [True, False, 0, 1, "", "yes", None, np.bool_(False), 2, []],
    "scale": [True, False, 0, 1, "", "yes", None, np.bool_(False), 2, []],
    "initializer": ["zeros", "ones", "foo", "", None, 1, 0.5, {"class_name": "Constant", "config": {"value": 2.0}},
                    {"class_name": "Foo", "config": {}}, {"class_name": "Constant"}, {"config": {}},
                    {"class_name": "Constant", "config": {"bar": 1}}, {"class_name": "Constant", "config": None},
                    "RandomNormal", "glorot_uniform", "Zeros", [1], _Obj(),
                    {"class_name": "Constant", "config": {"value": "x"}}],
    "regularizer": ["l2", "l1", "l1_l2", "foo", "", 1, 0.5, {"class_name": "L2", "config": {"l2": 0.1}},
                    {"class_name": "L2", "config": {"l2": -1.0}}, {"class_name": "L2", "config": {"l2": "x"}},
                    {"class_name": "Foo", "config": {}}, {"class_name": "L1L2", "config": {"l1": None}},
                    [1], _Obj(), {"class_name": "L2", "config": {"bar": 1}}],
    "constraint": ["non_neg", "max_norm", "unit_norm", "min_max_norm", "foo", "", 1, [1], _Obj(),
                   {"class_name": "MinMaxNorm", "config": {"min_value": 2.0, "max_value": 1.0}},
                   {"class_name": "MinMaxNorm", "config": {"min_value": 0.5, "max_value": 1.5, "rate": 2.0}},
                   {"class_name": "MaxNorm", "config": {"max_value": -1.0}},
                   {"class_name": "MaxNorm", "config": {"max_value": "x"}},
                   {"class_name": "MaxNorm", "config": {"axis": 5}},
                   {"class_name": "Foo", "config": {}}],
    "renorm": [True, False, 0, 1, "", "yes", None, np.bool_(True), np.bool_(False)],
    "renorm_clipping": [None, {}, {"rmax": 3.0, "rmin": 0.3, "dmax": 5.0}, {"rmax": 0.5, "rmin": 2.0},
                        {"foo": 1}, "foo", "", [], ["rmax"], 1, {"rmax": "x"}, {"dmax": -1.0},
                        {"rmax": None}, {"rmin": float("nan")}],
    "renorm_momentum": [0.0, 1.0, -1.0, 2.0, 1e308, None, "0.9", True, float("nan"), np.float32(0.9)],
    "fused": [None, True, False, 0, 1, 2, "", "yes", np.bool_(False), np.bool_(True), [], [0], 0.0, -1],
    "trainable": [True, False, 0, 1, "", "yes", None, np.bool_(False), 2],
    "virtual_batch_size": [None, 1, 2, 3, 0, -1, 2.0, "2", True, [2], 4, np.int64(2)],
    "name": [None, "bn", "", 1, ["a"], "a b", "x/y"],
    "dtype": ["float32", "float64", "float16", "mixed_float16", "mixed_bfloat16", "int32", "complex64",
              "bool", "foo", "", 1, np.float32, np.dtype("float64"), None, "bfloat16", "string"],
    "unknown_kwarg": ["foo", "input_dim", "synchronized"],
}
INIT_ARGS = [
    "axis", "momentum", "epsilon", "center", "scale", "beta_initializer", "gamma_initializer",
    "moving_mean_initializer", "moving_variance_initializer", "beta_regularizer", "gamma_regularizer",
    "beta_constraint", "gamma_constraint", "renorm", "renorm_clipping", "renorm_momentum", "fused",
    "trainable", "virtual_batch_size", "name", "dtype", "unknown_kwarg", "activity_regularizer",
]
ATTRS_AFTER_BUILD = ["momentum", "epsilon", "fused", "renorm_clipping", "renorm_momentum", "trainable",
                     "center", "scale", "virtual_batch_size", "axis"]
CONFIG_KEYS = ["axis", "momentum", "epsilon", "center", "scale", "beta_initializer", "gamma_initializer",
               "moving_mean_initializer", "beta_regularizer", "gamma_constraint", "renorm", "renorm_clipping",
               "virtual_batch_size", "dtype", "name", "trainable"]
TRAINING = [True, False, None, 1, 0, 1.0, "yes", 2, 0.5, np.bool_(True), np.array(True), [True], "", -1]
BUILD_SHAPES = [None, (4, 3.5), (), 3, "ab", (4, None), (None, 3), (4, -1), (4, 0), [4, 3], np.array([4, 3]),
                (4.0, 3.0), (4, "3"), (4, True), ((4,), 3), (np.int64(4), np.int64(3)), (4, 3, None),
                (4, float("nan")), (4, 1e10)]


def pool_for(arg: str) -> list[Any]:
    for suffix in ("initializer", "regularizer", "constraint"):
        if arg.endswith(suffix):
            return POOLS[suffix]
    return POOLS.get(arg, GENERIC)


def describe(v: Any) -> list[str]:
    """Strings any of which, found in a message, show the received value ``v``."""
    if isinstance(v, np.ndarray):
        out = [str(v.dtype), str(tuple(v.shape))]
        if v.ndim == 0 or v.size < 4:
            out += [repr(v), str(v)]
        return out
    if isinstance(v, dict) and v:
        return [repr(v), str(v)] + [s for x in v.values() for s in describe(x)]
    if isinstance(v, (list, tuple)) and len(repr(v)) > 60:
        return [repr(v)[:40]]
    if isinstance(v, float) and math.isfinite(v) and v != int(v) and abs(v) < 1e6:
        return [repr(v), str(v), f"{v:g}"]
    if isinstance(v, type):
        return [v.__name__, repr(v)]
    return [repr(v), str(v)]


# ------------------------------------------------------------------ case generation
def make_input(rng: random.Random, shape: tuple[int, ...], dtype: str = "float32") -> np.ndarray:
    g = np.random.default_rng(rng.randrange(2**32))
    return (g.integers(-8, 9, size=shape) / 4.0 + 0.25 * g.integers(0, 2, size=shape[-1:])).astype(dtype)


def bad_inputs(rng: random.Random, shape: tuple[int, ...]) -> list[tuple[str, Any]]:
    x = make_input(rng, shape)
    other = (shape[0], *shape[1:-1], shape[-1] + 1)
    return [
        ("list", x.tolist()),
        ("object", x.astype(object)),
        ("int32", x.astype("int32")),
        ("int64", x.astype("int64")),
        ("bool", x > 0),
        ("complex64", x.astype("complex64")),
        ("str", x.astype(str)),
        ("float16", x.astype("float16")),
        ("float64", x.astype("float64")),
        ("rank0", np.float32(1.0)),
        ("pyfloat", 1.5),
        ("none", None),
        ("channels", make_input(rng, other)),
        ("rank+1", x[..., None]),
        ("rank-1", x[0]),
        ("empty", x[:0]),
        ("nan", np.where(x > 0, np.float32("nan"), x)),
        ("inf", np.where(x > 0, np.float32("inf"), x)),
        ("huge", np.full(shape, 3e38, "float32")),
        ("tuple", tuple(map(tuple, x.reshape(shape[0], -1).tolist())) if len(shape) == 2 else x.tolist()),
        ("strlist", [["a"] * shape[-1]] * shape[0]),
        ("ragged", [[1.0] * shape[-1], [1.0]] if len(shape) == 2 else [[1.0]]),
    ]


def bad_masks(rng: random.Random, shape: tuple[int, ...]) -> list[tuple[str, Any]]:
    g = np.random.default_rng(rng.randrange(2**32))
    m = g.integers(0, 2, size=shape[:-1]).astype(bool)
    m.flat[0] = True
    return [
        ("bool", m), ("float", m.astype("float32")), ("int", m.astype("int32")), ("object", m.astype(object)),
        ("list", m.tolist()), ("scalar", True), ("wrongshape", np.ones((shape[0] + 1,), bool)),
        ("full", np.ones(shape, bool)), ("str", m.astype(str)), ("rank0", np.bool_(True)),
        ("extra", m[..., None, None]), ("complex", m.astype("complex64")), ("float64", m.astype("float64")),
        ("none_list", [None] * shape[0]),
    ]


def bad_weight_lists(rng: random.Random, n: int, c: int) -> list[tuple[str, Any]]:
    good = [np.full((c,), 0.5 + i, "float32") for i in range(n)]
    out = [("good", good), ("short", good[:-1]), ("long", [*good, good[0]]), ("empty", []),
           ("tuple", tuple(good)), ("lists", [w.tolist() for w in good]), ("float64", [w.astype("float64") for w in good]),
           ("int", [w.astype("int32") for w in good])]
    i = rng.randrange(n)
    for tag, bad in [("wrongshape", np.ones((c + 1,), "float32")), ("2d", np.ones((1, c), "float32")),
                     ("none", None), ("str", "abc"), ("scalar", 1.0), ("object", np.ones((c,), object)),
                     ("strarr", np.array(["a"] * c)), ("nan", np.full((c,), np.nan, "float32")),
                     ("complex", np.ones((c,), "complex64")), ("bool", np.ones((c,), bool)),
                     ("nested", [[1.0] * c])]:
        lst = list(good)
        lst[i] = bad
        out.append((f"{tag}@{i}", lst))
    return out


def adjustment_fns(c: int) -> list[tuple[str, Any]]:
    return [
        ("ok_scalars", lambda s: (1.5, 0.25)),
        ("ok_arrays", lambda s: (np.full((c,), 1.5, "float32"), np.full((c,), 0.25, "float32"))),
        ("wrong3", lambda s: (np.ones((3,), "float32"), np.zeros((3,), "float32"))),
        ("wrong5", lambda s: (np.ones((5,), "float32"), np.zeros((5,), "float32"))),
        ("rank2", lambda s: (np.ones((2, c), "float32"), np.zeros((2, c), "float32"))),
        ("none", lambda s: None),
        ("one", lambda s: (1.0,)),
        ("three", lambda s: (1.0, 0.0, 0.0)),
        ("strs", lambda s: ("a", "b")),
        ("nones", lambda s: (None, None)),
        ("raises", lambda s: 1 / 0),
        ("float64", lambda s: (np.ones((c,), "float64"), np.zeros((c,), "float64"))),
        ("int", lambda s: (np.ones((c,), "int32"), np.zeros((c,), "int32"))),
        ("notcallable", 3),
        ("str", "foo"),
    ]


def generate(n: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    kinds = ["init", "init", "init", "input", "mask", "training", "set_weights", "from_config", "attr", "build",
             "adjustment", "constraint_step"]
    cases = []
    for i in range(n):
        kind = kinds[i % len(kinds)] if i < len(kinds) else rng.choice(kinds)
        shape = rng.choice(SHAPES)
        base: dict[str, Any] = {}
        if rng.random() < 0.3:
            base["fused"] = rng.choice([False, True, None])
        if rng.random() < 0.15:
            base["renorm"] = True
        if rng.random() < 0.1:
            base["center"] = False
        case: dict[str, Any] = {"id": i, "kind": kind, "shape": shape, "kwargs": base, "seed": rng.randrange(2**31)}
        if kind == "init":
            arg = rng.choice(INIT_ARGS)
            value = rng.choice(pool_for(arg)) if rng.random() < 0.85 else rng.choice(GENERIC)
            if arg == "unknown_kwarg":
                value = rng.choice(POOLS["unknown_kwarg"])
                case["kwargs"] = {**base, value: 1}
                case.update(arg=value, value=1)
            else:
                case["kwargs"] = {**base, arg: value}
                case.update(arg=arg, value=value)
            case["mask"] = rng.random() < 0.2
        elif kind == "input":
            tag_value = rng.choice(bad_inputs(rng, shape))
            case.update(arg="input", tag=tag_value[0], value=tag_value[1], first=rng.random() < 0.5,
                        training=rng.choice([True, False]))
        elif kind == "mask":
            case["kwargs"] = {**base, "fused": rng.choice([False, False, None])}
            tag_value = rng.choice(bad_masks(rng, shape))
            case.update(arg="mask", tag=tag_value[0], value=tag_value[1], training=rng.choice([True, False]))
        elif kind == "training":
            case.update(arg="training", value=rng.choice(TRAINING))
        elif kind == "set_weights":
            n_w = (2 - bool(base.get("center") is False)) + 2 + (3 if base.get("renorm") else 0)
            ax = shape[-1]
            tag_value = rng.choice(bad_weight_lists(rng, n_w, ax))
            case.update(arg="weights", tag=tag_value[0], value=tag_value[1])
        elif kind == "from_config":
            key = rng.choice([*CONFIG_KEYS, "__drop__", "__unknown__", "__notdict__"])
            if key in ("__drop__",):
                value = rng.choice(CONFIG_KEYS)
            elif key == "__notdict__":
                value = rng.choice([None, [], "config", 1])
            elif key == "__unknown__":
                value = rng.choice(["foo", "bar"])
            else:
                value = rng.choice(pool_for(key)) if rng.random() < 0.85 else rng.choice(GENERIC)
            case.update(arg=key, value=value)
        elif kind == "attr":
            attr = rng.choice(ATTRS_AFTER_BUILD)
            if attr.startswith("renorm"):
                case["kwargs"] = {**base, "renorm": True}
            value = rng.choice(pool_for(attr)) if rng.random() < 0.85 else rng.choice(GENERIC)
            case.update(arg=attr, value=value, training=rng.choice([True, False]))
        elif kind == "build":
            case.update(arg="input_shape", value=rng.choice(BUILD_SHAPES))
            case["shape"] = (4, 3)
        elif kind == "adjustment":
            ax = shape[-1]
            tag_value = rng.choice(adjustment_fns(ax))
            case["kwargs"] = {k: v for k, v in base.items() if k != "renorm"}
            case.update(arg="adjustment", tag=tag_value[0], value=tag_value[1], training=rng.choice([True, False]))
        elif kind == "constraint_step":
            target = rng.choice(["gamma_constraint", "beta_constraint"])
            case["kwargs"] = {**base, "center": True, "scale": True, target: rng.choice(POOLS["constraint"])}
            case.update(arg=target, value=case["kwargs"][target])
        cases.append(case)
    return cases


# ------------------------------------------------------------------ the two libraries
class Lib:
    name = ""

    def __init__(self) -> None:
        self.BN: Any = None

    def layer(self, kwargs: dict[str, Any]) -> Any:
        return self.BN(**kwargs)

    def out(self, y: Any) -> np.ndarray:
        return np.asarray(y)

    def weights(self, layer: Any) -> list[np.ndarray] | None:
        return [np.array(w, copy=True) for w in layer.get_weights()] if layer.built else None

    def losses(self, layer: Any) -> list[float]:
        return [float(np.asarray(v)) for v in layer.losses]


class TFLib(Lib):
    name = "tf"

    def __init__(self) -> None:
        super().__init__()
        import tensorflow as tf

        self.tf = tf
        self.BN = tf.compat.v1.keras.layers.BatchNormalization

    def out(self, y: Any) -> np.ndarray:
        return y.numpy() if hasattr(y, "numpy") else np.asarray(y)

    def constrain(self, layer: Any) -> None:
        for w, c in ((layer.gamma, layer.gamma_constraint), (layer.beta, layer.beta_constraint)):
            if w is not None and c is not None:
                w.assign(c(w))

    def losses(self, layer: Any) -> list[float]:
        return [float(v.numpy()) for v in layer.losses]


class ABLib(Lib):
    name = "ab"

    def __init__(self) -> None:
        super().__init__()
        import arraybn

        self.BN = arraybn.BatchNormalization

    def constrain(self, layer: Any) -> None:
        layer.apply_constraints()


def exc_class(lib: Lib, e: BaseException) -> str:
    if isinstance(lib, TFLib) and isinstance(e, lib.tf.errors.OpError):
        return "ValueError"
    return type(e).__name__


def run(lib: Lib, case: dict[str, Any]) -> dict[str, Any]:
    """Run ``case``'s steps on ``lib``; the first step that raises ends it."""
    rng = random.Random(case["seed"])
    shape = tuple(case["shape"])
    x = make_input(rng, shape)
    g = np.random.default_rng(case["seed"])
    mask0 = g.integers(0, 2, size=shape[:-1]).astype(bool)
    mask0.flat[0] = True
    res: dict[str, Any] = {"stage": None, "cls": None, "msg": None, "changed": None, "outs": []}
    layer = None
    step = "init"
    before = None

    def snapshot() -> None:
        nonlocal before
        before = lib.weights(layer) if layer is not None else None

    try:
        kind = case["kind"]
        kwargs = dict(case["kwargs"])
        if kind == "adjustment":
            kwargs["adjustment"] = case["value"]
        if kind == "from_config":
            step = "from_config"
            cfg = lib.BN(**kwargs).get_config()
            cfg.pop("name", None)
            k, v = case["arg"], case["value"]
            if k == "__drop__":
                cfg.pop(v, None)
            elif k == "__unknown__":
                cfg[v] = 1
            elif k == "__notdict__":
                cfg = v
            else:
                cfg[k] = v
            layer = lib.BN.from_config(cfg)
        else:
            step = "init"
            layer = lib.layer(kwargs)
        if kind == "build":
            step = "build"
            layer.build(case["value"])
            snapshot()
        step = "call"
        training = case.get("training", True)
        if kind == "training":
            training = case["value"]
        mask = mask0 if case.get("mask") else None
        if kind == "mask":
            mask = case["value"]
        xin = x
        if kind == "input":
            if not case["first"]:
                res["outs"].append(lib.out(layer(x, training=True)))
            xin = case["value"]
        if kind == "set_weights":
            layer(x, training=True)
            snapshot()
            step = "set_weights"
            layer.set_weights(case["value"])
            step = "call"
        if kind == "attr":
            layer(x, training=True)
            snapshot()
            step = "setattr"
            setattr(layer, case["arg"], case["value"])
            step = "call"
        snapshot()
        res["outs"].append(lib.out(layer(xin, training=training, mask=mask)))
        snapshot()
        step = "call2"
        res["outs"].append(lib.out(layer(x, training=False)))
        step = "losses"
        res["outs"].extend(np.asarray(v) for v in lib.losses(layer))
        step = "constraint"
        snapshot()
        lib.constrain(layer)
        step = "get_weights"
        res["outs"].extend(lib.weights(layer) or [])
    except Exception as e:  # noqa: BLE001 - recorded
        res.update(stage=step, cls=exc_class(lib, e), msg=str(e)[:600])
        if before is not None and layer is not None:
            try:
                after = lib.weights(layer)
                res["changed"] = after is None or len(after) != len(before) or any(
                    a.shape != b.shape or not np.array_equal(a, b, equal_nan=True)
                    for a, b in zip(after, before, strict=True))
            except Exception:  # noqa: BLE001 - a poisoned layer
                res["changed"] = True
    return res


def same_values(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    if len(a) != len(b):
        return False
    for p, q in zip(a, b, strict=True):
        p, q = np.asarray(p), np.asarray(q)
        if p.shape != q.shape:
            return False
        if p.dtype.kind not in "fc" or q.dtype.kind not in "fc":
            if not np.array_equal(p, q):
                return False
            continue
        tol = 2e-2 if "float16" in (p.dtype.name, q.dtype.name) or p.dtype.name == "bfloat16" else 1e-4
        p64, q64 = p.astype("float64"), q.astype("float64")
        if not np.allclose(p64, q64, rtol=tol, atol=tol, equal_nan=True):
            return False
    return True


# ------------------------------------------------------------------ deliberate differences (§13)
def documented(case: dict[str, Any], tf: dict[str, Any], ab: dict[str, Any]) -> str | None:
    """The docs/semantics.md §13 row that explains a difference, or None."""
    kw = case["kwargs"]
    arg, value = case.get("arg"), case.get("value")
    if tf["cls"] and tf["cls"] == ab["cls"]:
        return None
    if tf["msg"] and re.search(r"expected to be a \w+ tensor but is a \w+ tensor|cannot compute \w+ as input", tf["msg"]):
        return "TF dtype defect inside the layer (§9, §13)"
    if arg == "epsilon" and value is True or (type(value).__name__ == "bool" and arg == "epsilon" and bool(value)):
        if kw.get("renorm") and tf["cls"] and not ab["cls"]:
            return "epsilon=True under renorm: TF's tf.sqrt(epsilon) dtype defect (§13)"
    if arg == "virtual_batch_size" and isinstance(value, float):
        return "virtual_batch_size float (§13)"
    if arg == "virtual_batch_size" and isinstance(value, (list, tuple)) and ab["cls"] and not tf["cls"]:
        return "virtual_batch_size a list, set after build (§13)"
    if arg in ("epsilon", "momentum", "renorm_momentum") and ab["cls"] and not tf["cls"] and (
        isinstance(value, (list, tuple, complex, np.ndarray))
    ):
        return "a list, array or complex number as momentum/epsilon (§13)"
    if arg == "dtype" and ab["cls"] and not tf["cls"] and (
        "complex" in str(value) or "bfloat16" in str(value)
    ):
        return "complex dtype policy; bfloat16 on NumPy (§13)"
    if ab["cls"] is None and tf["cls"] == "ValueError" and "UnimplementedError" in str(tf.get("raw", "")):
        return "rank-6 broadcast (§13)"
    return None


# ------------------------------------------------------------------ measuring
def names_argument(case: dict[str, Any], msg: str) -> bool:
    arg = case.get("arg") or ""
    low = msg.lower()
    if case["kind"] == "input":
        return "input" in low
    if case["kind"] == "from_config":
        if arg in ("__notdict__",):
            return "config" in low
        if arg in ("__drop__", "__unknown__"):
            return str(case["value"]).lower() in low
    if case["kind"] == "build":
        return "input_shape" in low or "shape" in low
    if case["kind"] == "set_weights":
        return "weight" in low
    return arg.lower() in low


def shows_value(case: dict[str, Any], msg: str, stage: str | None = None) -> bool:
    v = case.get("value")
    if stage in ("call", "call2") and case["kind"] == "build" or stage == "call2" and case["kind"] == "input":
        return "shape" in msg  # the valid input of the second call: the message shows its shape
    if case["kind"] in ("adjustment", "set_weights", "from_config") and case.get("tag") is not None:
        return True  # the value is a function or a list: the message shows what was wrong inside it instead
    if case["kind"] == "from_config" and case["arg"] in ("__drop__", "__unknown__"):
        return str(v) in msg
    return any(s and s in msg for s in describe(v))


def _random_init(case: dict[str, Any]) -> bool:
    """Random initial weights (a random initializer, or None: Keras's glorot_uniform default)."""
    if any(k.endswith("_initializer") and v is None for k, v in case["kwargs"].items()):
        return True
    if case["kind"] == "from_config" and case["arg"].endswith("_initializer") and case["value"] is None:
        return True
    return any(isinstance(v, str) and v.lower().replace("_", "") in ("randomnormal", "glorotuniform")
               for v in (*case["kwargs"].values(), case.get("value") if case["kind"] == "from_config" else None))


def measure(cases: list[dict[str, Any]], results: list[tuple[dict[str, Any], dict[str, Any]]]) -> dict[str, Any]:
    m = collections.Counter()
    rows = collections.defaultdict(list)
    for case, (tf, ab) in zip(cases, results, strict=True):
        if tf["cls"] and ab["cls"]:
            m["both_raise"] += 1
            if tf["cls"] == ab["cls"]:
                m["same_class"] += 1
                m["same_stage"] += tf["stage"] == ab["stage"]
            else:
                doc = documented(case, tf, ab)
                if doc:
                    m["documented"] += 1
                else:
                    rows["class_mismatch"].append((case, tf, ab))
        elif ab["cls"] and not tf["cls"]:
            doc = documented(case, tf, ab)
            m["documented" if doc else "ab_raises_only"] += 1
            if not doc:
                rows["ab_raises_only"].append((case, tf, ab))
        elif tf["cls"] and not ab["cls"]:
            doc = documented(case, tf, ab)
            m["documented" if doc else "tf_raises_only"] += 1
            if not doc:
                rows["tf_raises_only"].append((case, tf, ab))
        else:
            m["both_ok"] += 1
            if _random_init(case):
                continue  # random initial weights: the values cannot agree
            if not same_values(tf["outs"], ab["outs"]):
                m["value_mismatch"] += 1
                rows["value_mismatch"].append((case, tf, ab))
        if ab["cls"]:
            m["ab_errors"] += 1
            if ab["changed"] is not None:
                m["ab_errors_after_build"] += 1
                m["weights_changed"] += bool(ab["changed"])
                if ab["changed"]:
                    rows["weights_changed"].append((case, tf, ab))
            m["names_arg"] += names_argument(case, ab["msg"])
            m["shows_value"] += shows_value(case, ab["msg"], ab["stage"])
            if not names_argument(case, ab["msg"]) or not shows_value(case, ab["msg"], ab["stage"]):
                rows["message"].append((case, tf, ab))
    return {"counts": dict(m), "rows": rows}


def _short(v: Any) -> str:
    s = repr(v) if not callable(v) or isinstance(v, type) else f"<fn {getattr(v, '__name__', '?')}>"
    return s if len(s) < 80 else s[:77] + "..."


def report(cases: list[dict[str, Any]], measured: dict[str, Any], show: int) -> str:
    c = collections.Counter(measured["counts"])
    lines = [f"cases: {len(cases)}"]
    br = c["both_raise"] or 1
    lines.append(f"same exception class where both raise: {c['same_class']}/{c['both_raise']} "
                 f"({100 * c['same_class'] / br:.1f}%), same step {c['same_stage']}")
    lines.append(f"arraybn raises where TF does not: {c['ab_raises_only']}")
    lines.append(f"arraybn accepts where TF raises: {c['tf_raises_only']}")
    lines.append(f"documented differences (§13): {c['documented']}")
    lines.append(f"weights changed after an arraybn error: {c['weights_changed']} of {c['ab_errors_after_build']}")
    ae = c["ab_errors"] or 1
    lines.append(f"arraybn messages naming the argument: {c['names_arg']}/{c['ab_errors']} ({100 * c['names_arg'] / ae:.0f}%), "
                 f"showing the value: {c['shows_value']}/{c['ab_errors']} ({100 * c['shows_value'] / ae:.0f}%)")
    lines.append(f"both succeed: {c['both_ok']}, values differ: {c['value_mismatch']}")
    for key, rows in measured["rows"].items():
        if not rows or show <= 0:
            continue
        lines.append(f"--- {key} ({len(rows)})")
        seen = set()
        for case, tf, ab in rows:
            sig = (case["kind"], case.get("arg"), case.get("tag"), _short(case.get("value")), tf["cls"], ab["cls"])
            if sig in seen:
                continue
            seen.add(sig)
            lines.append(f"  #{case['id']} {case['kind']} {case.get('arg')}={_short(case.get('value'))} "
                         f"tag={case.get('tag')} kw={_short(case['kwargs'])} shape={case['shape']}")
            lines.append(f"     tf: {tf['stage']} {tf['cls']}: {(tf['msg'] or '')[:160]!r}")
            lines.append(f"     ab: {ab['stage']} {ab['cls']}: {(ab['msg'] or '')[:160]!r}")
            if len(seen) >= show:
                break
    return "\n".join(lines)


@contextlib.contextmanager
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import logging

        logging.disable(logging.CRITICAL)
        try:
            yield
        finally:
            logging.disable(logging.NOTSET)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=3000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--show", type=int, default=25, help="distinct examples listed per mismatch kind")
    p.add_argument("--only", default=None, help="run only this kind of case")
    p.add_argument("--json", default=None, help="write the per-case outcomes here")
    args = p.parse_args(argv)
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    cases = generate(args.n, args.seed)
    if args.only:
        cases = [c for c in cases if c["kind"] == args.only]
    with _quiet():
        tf_lib, ab_lib = TFLib(), ABLib()
        results = []
        for i, case in enumerate(cases):
            if i % 250 == 0:
                tf_lib.tf.keras.backend.clear_session()
            results.append((run(tf_lib, case), run(ab_lib, case)))
    measured = measure(cases, results)
    print(report(cases, measured, args.show))
    if args.json:
        out = [{"id": c["id"], "kind": c["kind"], "arg": c.get("arg"), "value": _short(c.get("value")),
                "tf": {k: t[k] for k in ("stage", "cls", "msg")}, "ab": {k: a[k] for k in ("stage", "cls", "msg", "changed")}}
               for c, (t, a) in zip(cases, results, strict=True)]
        with open(args.json, "w") as f:
            json.dump({"seed": args.seed, "n": args.n, "counts": measured["counts"], "cases": out}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
