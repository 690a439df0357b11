"""Gradient goldens: TensorFlow's gradients of the v1 layer, and a checker for arraybn's.

Usage::

    python -m conformance.gradients generate [--out conformance/goldens_grad]   # needs TensorFlow
    python -m conformance.gradients check [--backend numpy]                      # needs arraybn

``generate`` runs ``tf.compat.v1.keras.layers.BatchNormalization`` (tf-keras,
``TF_USE_LEGACY_KERAS=1``) under ``tf.GradientTape`` on every case of
`cases()` and records, for a fixed upstream gradient ``dy``, the
vector-Jacobian product ``tape.gradient(y, [x, gamma, beta],
output_gradients=dy)``. It writes two files into ``goldens_grad/``:

* ``gradients.json.gz``: the case list (definition, TF's resolved ``fused``,
  array dtypes/shapes, status) and the versions that produced it;
* ``gradients.npz``: every array, keyed ``<case index>.<name>`` (``x``,
  ``dy``, ``mask``, ``w.<weight name>``, ``y``, ``dx``, ``dgamma``,
  ``dbeta``), written without pickle and with fixed zip timestamps.

Both are byte-for-byte deterministic. Nothing here imports TensorFlow except
`generate`, and nothing imports arraybn except `run_case`/`check`.

`check` (also used by ``tests/test_backward.py``) replays every case with
arraybn's VJP on a given namespace and compares with `compare`, whose
per-dtype tolerances `TOLERANCES` are justified in ``docs/backward.md``.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import platform
import sys
import time
from typing import Any

import numpy as np

from . import adjustments
from .adjustments import ADJUSTMENTS
from .generate import WEIGHT_GRIDS, write_npz

FORMAT_VERSION = 1
GOLDEN_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "goldens_grad")
JSON_NAME = "gradients.json.gz"
NPZ_NAME = "gradients.npz"

# --------------------------------------------------------------------------- #
# Adjustments (shape-only, Python-float constants)
# --------------------------------------------------------------------------- #


# The named adjustments are the main suite's (conformance/adjustments.py).
_tf_adjustment = adjustments.tf_impl


# --------------------------------------------------------------------------- #
# The case grid (plain data)
# --------------------------------------------------------------------------- #

SHAPES = {1: (6,), 2: (8, 3), 3: (6, 4, 3), 4: (4, 3, 2, 5), 5: (4, 3, 2, 2, 3)}

#: (rank, axis): every axis form: int, negative int, list, batch axis, any rank.
AXES = [
    (1, -1),
    (2, -1),
    (2, [1]),
    (2, 0),
    (3, 1),
    (3, -1),
    (3, [1, 2]),
    (4, -1),
    (4, 1),
    (4, 2),
    (4, [1, 2]),
    (4, [-1, -3]),
    (5, 1),
    (5, -1),
    (5, [1, 3]),
]
FUSABLE = [(4, -1), (4, 1), (5, 1), (5, -1)]
POLICIES = ["float32", "float64", "float16", "mixed_float16"]
COMPUTE = {"float32": "float32", "float64": "float64", "float16": "float16", "mixed_float16": "float16"}
CLIPPINGS = {
    "none": {},
    "tight": {"rmax": 1.05, "rmin": 0.95, "dmax": 0.05},
    "loose": {"rmax": 3.0, "rmin": 0.3, "dmax": 3.0},
}


def _axis_str(axis: Any) -> str:
    return "[" + ",".join(str(a) for a in axis) + "]" if isinstance(axis, list) else str(axis)


def _case(group: str, rank: int, axis: Any, training: bool, policy: str = "float32", **opt: Any) -> dict[str, Any]:
    """One case; ``opt``: center, scale, fused, renorm (clipping name), vbs, mask, adjustment,
    epsilon, trainable, input_dtype, shape."""
    kwargs: dict[str, Any] = {"axis": axis, "dtype": policy}
    for key in ("center", "scale", "fused", "epsilon", "trainable"):
        if key in opt:
            kwargs[key] = opt[key]
    if "renorm" in opt:
        kwargs["renorm"] = True
        kwargs["renorm_clipping"] = CLIPPINGS[opt["renorm"]]
        kwargs["renorm_momentum"] = 0.9
    if "vbs" in opt:
        kwargs["virtual_batch_size"] = opt["vbs"]
    if "adjustment" in opt:
        kwargs["adjustment"] = {"__adjustment__": opt["adjustment"]}
    shape = list(opt.get("shape", SHAPES[rank]))
    parts = [group, f"r{rank}", f"ax{_axis_str(axis)}", "train" if training else "infer", policy]
    for key in ("center", "scale", "fused", "renorm", "vbs", "mask", "adjustment", "epsilon", "trainable"):
        if key in opt:
            parts.append(f"{key}={opt[key]}")
    if "input_dtype" in opt:
        parts.append(f"in={opt['input_dtype']}")
    if "shape" in opt:
        parts.append("shape=" + "x".join(str(s) for s in shape))
    cid = "/".join(parts)
    return {
        "id": cid,
        "group": group,
        "init_kwargs": kwargs,
        "input_shape": shape,
        "input_dtype": opt.get("input_dtype", COMPUTE[policy]),
        "training": training,
        "mask": opt.get("mask"),
        "seed": int.from_bytes(hashlib.sha256(cid.encode()).digest()[:4], "little"),
    }


def cases() -> list[dict[str, Any]]:
    """The grid: a few hundred cases, each a JSON-serializable dict."""
    out = []
    tf_ = (True, False)
    for tr in tf_:
        for pol in POLICIES:
            for rank, axis in AXES:
                out.append(_case("axes", rank, axis, tr, pol))
            for rank, axis in FUSABLE:
                if pol != "float64":
                    out.append(_case("axes", rank, axis, tr, pol, fused=False))
        for pol in ("float32", "mixed_float16"):
            for rank, axis in [(2, -1), (4, 1), (4, -1), (3, [1, 2])]:
                for center, scale in [(False, True), (True, False), (False, False)]:
                    out.append(_case("affine", rank, axis, tr, pol, center=center, scale=scale))
        for pol in ("float32", "float64", "mixed_float16"):
            for clip in CLIPPINGS:
                for rank, axis in [(2, -1), (3, [1, 2]), (4, 1)]:
                    out.append(_case("renorm", rank, axis, tr, pol, renorm=clip))
        out.append(_case("renorm", 2, -1, tr, "float32", renorm="loose", center=False))
        out.append(_case("renorm", 3, 1, tr, "float32", renorm="tight", scale=False))
        for pol in ("float32", "float64", "mixed_float16"):
            for rank, axis, sizes in [(2, -1, (2, 4)), (3, 1, (2, 3)), (3, [1, 2], (3,)), (4, -1, (2,))]:
                for vbs in sizes:
                    out.append(_case("vbs", rank, axis, tr, pol, vbs=vbs))
        for clip in ("tight", "loose"):
            out.append(_case("vbs", 2, -1, tr, "float32", vbs=2, renorm=clip))
            out.append(_case("vbs", 3, [1, 2], tr, "float64", vbs=3, renorm=clip))
        for pol in ("float32", "float64", "mixed_float16"):
            for rank, axis in [(2, -1), (3, -1), (3, 1), (4, 2), (3, [1, 2]), (4, -1)]:
                out.append(_case("mask", rank, axis, tr, pol, mask="rows"))
        for rank, axis in [(2, -1), (3, 1)]:
            out.append(_case("mask", rank, axis, tr, "float32", mask="all"))
            out.append(_case("mask", rank, axis, tr, "float32", mask="channel"))
        out.append(_case("mask", 3, -1, tr, "float32", mask="rows", renorm="loose"))
        out.append(_case("mask", 4, [1, 2], tr, "float64", mask="rows", renorm="tight"))
        for pol in ("float32", "float64"):
            for adj in ADJUSTMENTS:
                for rank, axis in [(2, -1), (3, 1), (4, [1, 2]), (4, -1)]:
                    out.append(_case("adjust", rank, axis, tr, pol, adjustment=adj))
        for center, scale in [(False, True), (True, False), (False, False)]:
            out.append(_case("adjust", 3, -1, tr, "float32", adjustment="batch_affine", center=center, scale=scale))
        out.append(_case("adjust", 2, -1, tr, "mixed_float16", adjustment="batch_affine"))
        out.append(_case("adjust", 3, 1, tr, "float32", adjustment="last_dim_affine", renorm="loose"))
        out.append(_case("adjust", 3, -1, tr, "float64", adjustment="batch_affine", renorm="tight", mask="rows"))
        out.append(_case("adjust", 4, 2, tr, "float32", adjustment="batch_affine", mask="rows"))
        for rank, axis in [(2, -1), (4, 1)]:
            out.append(_case("autocast", rank, axis, tr, "float32", input_dtype="float64"))
            out.append(_case("autocast", rank, axis, tr, "float32", input_dtype="float16"))
            out.append(_case("autocast", rank, axis, tr, "mixed_float16", input_dtype="float32"))
        for eps in (0.25, 1e-6):
            out.append(_case("misc", 2, -1, tr, "float32", epsilon=eps))
            out.append(_case("misc", 4, 1, tr, "float32", epsilon=eps))
        out.append(_case("misc", 2, -1, tr, "float32", trainable=False))
        out.append(_case("misc", 4, -1, tr, "float32", trainable=False))
        out.append(_case("misc", 2, -1, tr, "float32", shape=(64, 4)))
        out.append(_case("misc", 4, 1, tr, "float32", shape=(8, 4, 5, 5)))
    ids = [c["id"] for c in out]
    assert len(ids) == len(set(ids)), "duplicate case ids"
    return out


def _definition_hash(cs: list[dict[str, Any]]) -> str:
    text = json.dumps(cs, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(f"fmt{FORMAT_VERSION}:{text}".encode()).hexdigest()


# --------------------------------------------------------------------------- #
# Data (pure NumPy, seeded per case; values exact in float16)
# --------------------------------------------------------------------------- #

# WEIGHT_GRIDS (value grids exact in float16) are the main generator's.


def make_input(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Multiples of 1/32 within +-8 (exact in float16), a different offset per last-axis entry."""
    k = rng.integers(-150, 151, size=shape)
    off = rng.integers(-100, 101, size=shape[-1:])
    return (k + off) / 32.0


def make_dy(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Multiples of 1/16 within +-2 (exact in float16)."""
    return rng.integers(-32, 33, size=shape) / 16.0


def make_mask(rng: np.random.Generator, shape: tuple[int, ...], kind: str) -> np.ndarray:
    """``rows``: random, two samples always on, one position off; ``all``: fully masked;
    ``channel``: random, but every position of the second-to-last axis' first entry off."""
    shape = tuple(shape[:-1])
    if kind == "all":
        return np.zeros(shape, bool)
    m = rng.random(shape) < 0.6
    m[:2] = True
    m.reshape(-1)[-1] = False
    if kind == "channel":
        m[..., 0] = False
    return m


def make_weight(rng: np.random.Generator, name: str, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    lo, hi, den, excl = WEIGHT_GRIDS[name]
    k = rng.integers(lo, hi + 1, size=shape)
    if excl:
        k = np.where(np.abs(k) < excl, np.sign(k + 0.5) * excl, k)
    return np.asarray(k / den, dtype)


# --------------------------------------------------------------------------- #
# Files
# --------------------------------------------------------------------------- #


def _write_npz(path: str, arrays: dict[str, np.ndarray]) -> None:
    write_npz(path, {k: np.ascontiguousarray(v) for k, v in arrays.items()})


def _write_json_gz(path: str, obj: Any) -> None:
    tmp = path + ".part"
    text = json.dumps(obj, sort_keys=True, indent=0, separators=(",", ":"), allow_nan=False) + "\n"
    with open(tmp, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as f:
        f.write(text.encode())
    os.replace(tmp, path)


def load(directory: str = GOLDEN_DIR) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """``(document, arrays)``: the JSON document and every array of the npz (no pickle)."""
    with gzip.open(os.path.join(directory, JSON_NAME), "rt") as f:
        doc = json.load(f)
    with np.load(os.path.join(directory, NPZ_NAME), allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    return doc, arrays


# --------------------------------------------------------------------------- #
# Generation (TensorFlow)
# --------------------------------------------------------------------------- #


def _setup_tf() -> tuple[Any, Any]:
    os.environ["TF_USE_LEGACY_KERAS"] = "1"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ["TF_DETERMINISTIC_OPS"] = "1"
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    import tensorflow as tf

    try:
        tf.config.threading.set_inter_op_parallelism_threads(1)
        tf.config.threading.set_intra_op_parallelism_threads(1)
    except RuntimeError:
        pass
    tf.get_logger().setLevel("ERROR")
    bn = tf.compat.v1.keras.layers.BatchNormalization
    mod = bn.__module__
    if not (mod.startswith("tf_keras") and mod.endswith("batch_normalization_v1")):
        msg = f"expected tf-keras's v1 BatchNormalization, got {mod}; set TF_USE_LEGACY_KERAS=1 and install tf-keras"
        raise RuntimeError(msg)
    return tf, bn


def versions() -> dict[str, str]:
    tf, _ = _setup_tf()
    import tf_keras

    return {
        "tensorflow": tf.__version__,
        "tf_keras": tf_keras.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": f"{platform.system()}-{platform.machine()}",
        "layer": "tf.compat.v1.keras.layers.BatchNormalization (tf_keras v1)",
    }


def _run_tf_case(tf: Any, bn: Any, case: dict[str, Any], idx: int, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    import warnings

    tf.keras.backend.clear_session()
    rng = np.random.default_rng(case["seed"])
    p = f"{idx:04d}."
    shape = tuple(case["input_shape"])
    kwargs = dict(case["init_kwargs"])
    adj = kwargs.get("adjustment")
    if isinstance(adj, dict):
        kwargs["adjustment"] = _tf_adjustment(adj["__adjustment__"])
    rec: dict[str, Any] = {"status": "ok", "error": None}
    x = np.asarray(make_input(rng, shape), case["input_dtype"])
    mask = make_mask(rng, shape, case["mask"]) if case["mask"] else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            layer = bn(**kwargs)
            layer.build(shape)
            names = [v.name.split("/")[-1].split(":")[0] for v in layer.weights]
            ws = [make_weight(rng, n, tuple(v.shape), v.dtype.name) for n, v in zip(names, layer.weights)]
            layer.set_weights(ws)
            xt = tf.constant(x)
            params = [v for v in (getattr(layer, "gamma", None), getattr(layer, "beta", None)) if v is not None]
            with tf.GradientTape() as tape:
                tape.watch(xt)
                for v in params:
                    tape.watch(v)
                kw: dict[str, Any] = {"training": case["training"]}
                if mask is not None:
                    kw["mask"] = tf.constant(mask)
                y = layer(xt, **kw)
            dy = np.asarray(make_dy(rng, tuple(y.shape)), y.dtype.name)
            grads = tape.gradient(y, [xt, *params], output_gradients=tf.constant(dy))
    except Exception as exc:  # noqa: BLE001 - recorded, the checker skips it
        rec.update(status="error", error=f"{type(exc).__name__}: {str(exc)[:500]}")
        return rec
    arrays[p + "x"] = x
    arrays[p + "dy"] = dy
    arrays[p + "y"] = y.numpy()
    if mask is not None:
        arrays[p + "mask"] = mask
    for n, w in zip(names, ws):
        arrays[p + "w." + n] = w
    arrays[p + "dx"] = grads[0].numpy()
    pnames = [n for n in ("gamma", "beta") if n in names]
    for n, g in zip(pnames, grads[1:]):
        arrays[p + "d" + n] = g.numpy()
    rec.update(
        fused=bool(layer.fused),
        weight_names=names,
        y_dtype=y.dtype.name,
        dx_dtype=grads[0].dtype.name,
        param_dtype=ws[names.index("moving_mean")].dtype.name,
        arrays=sorted(k[len(p) :] for k in arrays if k.startswith(p)),
    )
    return rec


def generate(out: str = GOLDEN_DIR) -> dict[str, Any]:
    tf, bn = _setup_tf()
    os.makedirs(out, exist_ok=True)
    cs = cases()
    arrays: dict[str, np.ndarray] = {}
    records = []
    for i, case in enumerate(cs):
        rec = _run_tf_case(tf, bn, case, i, arrays)
        records.append({**case, "index": i, "result": rec})
    doc = {
        "format_version": FORMAT_VERSION,
        "definition_hash": _definition_hash(cs),
        "versions": versions(),
        "determinism": {"TF_DETERMINISTIC_OPS": "1", "inter_op_threads": 1, "intra_op_threads": 1},
        "recorded": "tape.gradient(y, [x, gamma, beta], output_gradients=dy)",
        "adjustments": {k: v.__doc__ for k, v in ADJUSTMENTS.items()},
        "status_counts": {
            s: sum(1 for r in records if r["result"]["status"] == s) for s in ("ok", "error")
        },
        "cases": records,
    }
    _write_npz(os.path.join(out, NPZ_NAME), arrays)
    _write_json_gz(os.path.join(out, JSON_NAME), doc)
    return doc


# --------------------------------------------------------------------------- #
# Checking (arraybn)
# --------------------------------------------------------------------------- #

#: dtype of the golden array -> (rtol, atol relative to the array's largest magnitude).
TOLERANCES = {
    "float64": (1e-12, 1e-12),
    "float32": (4e-6, 4e-6),
    "float16": (2e-3, 2e-3),
}


_PRECISION = {"float16": 0, "bfloat16": 0, "float32": 1, "float64": 2}


def tolerance_dtype(*dtypes: str) -> str:
    """The least precise of ``dtypes``: a float64 ``dx`` of a float32 layer is float32-accurate."""
    return min(dtypes, key=lambda d: _PRECISION[d])


def compare(name: str, got: np.ndarray, want: np.ndarray, *, tol_dtype: str | None = None, scale: float = 0.0) -> str | None:
    """``None`` when ``got`` matches ``want`` within `TOLERANCES`; else a message.

    Element-wise ``|got - want| <= rtol * |want| + atol * max(scale, max|want|)``
    in float64 (``rtol, atol = TOLERANCES[tol_dtype]``, by default the golden's
    dtype), after checking shape and dtype.
    """
    got = np.asarray(got)
    if got.shape != want.shape:
        return f"{name}: shape {got.shape} != golden {want.shape}"
    if got.dtype != want.dtype:
        return f"{name}: dtype {got.dtype} != golden {want.dtype}"
    rtol, atol = TOLERANCES[tol_dtype or str(want.dtype)]
    g = got.astype(np.float64)
    w = want.astype(np.float64)
    scale = max(scale, float(np.max(np.abs(w))) if w.size else 0.0)
    err = np.abs(g - w)
    bound = rtol * np.abs(w) + atol * scale
    if not np.all(np.isfinite(g)) or np.any(err > bound):
        i = int(np.argmax(err - bound))
        return (
            f"{name}: max error {float(np.max(err)):.3g} (at flat index {i}: got {g.reshape(-1)[i]!r}, "
            f"golden {w.reshape(-1)[i]!r}); tolerance rtol={rtol} atol={atol}*{scale:.3g}"
        )
    return None


def case_inputs(case: dict[str, Any], arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """The NumPy inputs of a recorded case: x, dy, mask, weights {name: array}, kwargs."""
    p = f"{case['index']:04d}."
    kwargs = dict(case["init_kwargs"])
    adj = kwargs.get("adjustment")
    if isinstance(adj, dict):
        kwargs["adjustment"] = ADJUSTMENTS[adj["__adjustment__"]]
    names = case["result"]["weight_names"]
    return {
        "kwargs": kwargs,
        "x": arrays[p + "x"],
        "dy": arrays[p + "dy"],
        "mask": arrays.get(p + "mask"),
        "weights": {n: arrays[p + "w." + n] for n in names},
        "training": case["training"],
    }


def golden_outputs(case: dict[str, Any], arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    p = f"{case['index']:04d}."
    return {k: arrays[p + k] for k in ("y", "dx", "dgamma", "dbeta") if p + k in arrays}


def build_layer(case: dict[str, Any], arrays: dict[str, np.ndarray], xp: Any, device: Any = None) -> Any:
    """An arraybn layer built on ``xp``/``device`` with the case's weights set."""
    import arraybn

    inp = case_inputs(case, arrays)
    layer = arraybn.BatchNormalization(**inp["kwargs"])
    layer.build(tuple(case["input_shape"]), xp=xp, device=device)
    layer.set_weights([inp["weights"][n] for n in case["result"]["weight_names"]])
    return layer


def to_backend(a: np.ndarray, xp: Any, device: Any = None) -> Any:
    return xp.asarray(a, device=device) if device is not None else xp.asarray(a)


def run_case(case: dict[str, Any], arrays: dict[str, np.ndarray], xp: Any, device: Any = None) -> dict[str, Any]:
    """arraybn's ``y`` and VJP for a case (``batch_norm_forward`` + ``batch_norm_backward``), as NumPy."""
    from arraybn import BNParams, BNState, batch_norm_backward, batch_norm_forward
    from arraybn._namespace import to_numpy

    layer = build_layer(case, arrays, xp, device)
    inp = case_inputs(case, arrays)
    config = layer._config
    if bool(case["result"]["fused"]) != config.fused:
        msg = f"arraybn resolved fused={config.fused}, TensorFlow fused={case['result']['fused']}"
        raise AssertionError(msg)
    v = layer._vars
    params = BNParams(v.get("gamma"), v.get("beta"))
    state = BNState(
        v["moving_mean"], v["moving_variance"], v.get("moving_stddev"), v.get("renorm_mean"), v.get("renorm_stddev")
    )
    x = to_backend(inp["x"], xp, device)
    dy = to_backend(inp["dy"], xp, device)
    mask = None if inp["mask"] is None else to_backend(inp["mask"], xp, device)
    y, _, ctx = batch_norm_forward(
        x,
        params,
        state,
        training=inp["training"],
        config=config,
        mask=mask,
        adjustment=inp["kwargs"].get("adjustment"),
        trainable=bool(layer.trainable),
        xp=xp,
    )
    dx, dgamma, dbeta = batch_norm_backward(ctx, dy)
    out = {"y": to_numpy(y), "dx": to_numpy(dx)}
    if dgamma is not None:
        out["dgamma"] = to_numpy(dgamma)
    if dbeta is not None:
        out["dbeta"] = to_numpy(dbeta)
    return out


def supported(case: dict[str, Any], xp: Any) -> str | None:
    """Why ``xp`` cannot run ``case`` (a dtype it lacks: the standard has no float16), or ``None``."""
    needed = {case["input_dtype"], COMPUTE[case["init_kwargs"]["dtype"]]}
    missing = sorted(d for d in needed if getattr(xp, d, None) is None)
    return f"{getattr(xp, '__name__', xp)} has no {', '.join(missing)}" if missing else None


def check_case(case: dict[str, Any], arrays: dict[str, np.ndarray], results: dict[str, Any]) -> list[str]:
    """Mismatches between ``results`` ({"y", "dx", "dgamma", "dbeta"} as NumPy) and the goldens.

    ``y`` and ``dx`` are held to the tolerance of the least precise of their
    dtype and the compute dtype; ``dx``'s absolute term is relative to at least
    ``max|dy| * max(1, max|gamma|)``, the size of the terms it is the difference of.
    """
    want = golden_outputs(case, arrays)
    inp = case_inputs(case, arrays)
    compute = COMPUTE[case["init_kwargs"]["dtype"]]
    gamma = inp["weights"].get("gamma")
    dx_scale = float(np.max(np.abs(inp["dy"].astype(np.float64))))
    dx_scale *= max(1.0, float(np.max(np.abs(gamma))) if gamma is not None else 1.0)
    problems = []
    for k, w in want.items():
        if k not in results:
            if k != "y":
                problems.append(f"{k}: missing")
            continue
        tol = tolerance_dtype(str(w.dtype), compute) if k in ("y", "dx") else str(w.dtype)
        msg = compare(k, results[k], w, tol_dtype=tol, scale=dx_scale if k == "dx" else 0.0)
        if msg:
            problems.append(msg)
    problems.extend(f"{k}: not in the goldens" for k in results if k not in want)
    return problems


def check(xp: Any = None, device: Any = None, directory: str = GOLDEN_DIR) -> dict[str, list[str]]:
    """Replay every recorded case on ``xp`` (default NumPy); ``{case id: problems}`` for failures."""
    if xp is None:
        import array_api_compat

        xp = array_api_compat.array_namespace(np.empty(0))
    doc, arrays = load(directory)
    failures = {}
    for case in doc["cases"]:
        if case["result"]["status"] != "ok" or supported(case, xp):
            continue
        try:
            problems = check_case(case, arrays, run_case(case, arrays, xp, device))
        except Exception as exc:  # noqa: BLE001 - reported per case
            problems = [f"raised {type(exc).__name__}: {exc}"]
        if problems:
            failures[case["id"]] = problems
    return failures


def run_port_case(case: dict[str, Any], arrays: dict[str, np.ndarray], factory: Any, xp: Any,
                  device: Any = None) -> dict[str, Any]:
    """A port's ``y`` and VJP for a case through the public layer protocol only (the main suite's
    ``--impl`` factory, plus ``forward``/``backward``):

    ``layer = factory(init_kwargs)``; ``layer.build(input_shape, xp=..., device=...)``;
    ``layer.set_weights([...])`` in ``weight_names`` order; ``y, ctx = layer.forward(x, training=...,
    mask=...)``; ``dx, grads = layer.backward(ctx, dy)`` with ``grads`` ``{"gamma": ..., "beta": ...}``
    (empty for a frozen layer). Returns NumPy ``{"y", "dx", "dgamma", "dbeta"}``; ``layer.fused``,
    where the port has it, must be TF's.
    """
    import warnings

    from .runner import to_numpy

    inp = case_inputs(case, arrays)
    layer = factory(inp["kwargs"])
    layer.build(tuple(case["input_shape"]), xp=xp, device=device)
    layer.set_weights([inp["weights"][n] for n in case["result"]["weight_names"]])
    fused = getattr(layer, "fused", None)
    if fused is not None and bool(fused) != bool(case["result"]["fused"]):
        msg = f"fused={fused!r}, TensorFlow fused={case['result']['fused']!r}"
        raise AssertionError(msg)
    x = to_backend(inp["x"], xp, device)
    dy = to_backend(inp["dy"], xp, device)
    mask = None if inp["mask"] is None else to_backend(inp["mask"], xp, device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TF warns too (a mask on the fused path)
        y, ctx = layer.forward(x, training=inp["training"], mask=mask)
        dx, grads = layer.backward(ctx, dy)
    out = {"y": to_numpy(y)[0], "dx": to_numpy(dx)[0]}
    out.update({"d" + k: to_numpy(v)[0] for k, v in grads.items()})
    return out


def check_port(factory: Any, xp: Any = None, device: Any = None, directory: str = GOLDEN_DIR) -> dict[str, Any]:
    """Replay every recorded case through `run_port_case`; ``{"failures": {id: problems},
    "unsupported": {id: reason}, "ran": n}``. A frozen layer's missing ``dgamma``/``dbeta`` is not a problem."""
    if xp is None:
        import array_api_compat

        xp = array_api_compat.array_namespace(np.empty(0))
    doc, arrays = load(directory)
    failures, unsupported, ran = {}, {}, 0
    for case in doc["cases"]:
        if case["result"]["status"] != "ok" or supported(case, xp):
            continue
        ran += 1
        try:
            res = run_port_case(case, arrays, factory, xp, device)
        except NotImplementedError as exc:
            unsupported[case["id"]] = str(exc)[:200]
            continue
        except Exception as exc:  # noqa: BLE001 - reported per case
            failures[case["id"]] = [f"raised {type(exc).__name__}: {exc}"]
            continue
        problems = check_case(case, arrays, res)
        if case["init_kwargs"].get("trainable") is False:
            problems = [p for p in problems if p not in ("dgamma: missing", "dbeta: missing")]
        if problems:
            failures[case["id"]] = problems
    return {"failures": failures, "unsupported": unsupported, "ran": ran}


def _exec_request(items: list[dict[str, Any]], arrays: dict[str, np.ndarray]) -> tuple[dict, dict]:
    req = {"format_version": FORMAT_VERSION, "kind": "gradients", "cases": []}
    out = {}
    for case in items:
        p = f"{case['index']:04d}."
        names = case["result"]["weight_names"]
        ref = {}
        for k in ["x", "dy", "mask"] + ["w." + n for n in names]:
            if p + k in arrays:
                out[p + k] = arrays[p + k]
                ref[k] = {"key": p + k, "index": None}
        req["cases"].append({
            "id": case["id"], "init_kwargs": case["init_kwargs"], "input_shape": case["input_shape"],
            "input_dtype": case["input_dtype"], "training": case["training"], "weight_names": names,
            "x": ref["x"], "dy": ref["dy"], "mask": ref.get("mask"),
            "weights": [ref["w." + n] for n in names],
        })
    return req, out


def _exec_batch(cmd: str, items: list[dict[str, Any]], arrays: dict[str, np.ndarray], workdir: str,
                timeout: float | None) -> dict[str, Any]:
    import shlex
    import subprocess

    os.makedirs(workdir, exist_ok=True)
    req, inputs = _exec_request(items, arrays)
    with open(os.path.join(workdir, "request.json"), "w") as f:
        json.dump(req, f, sort_keys=True)
    np.savez(os.path.join(workdir, "inputs.npz"), **inputs)
    try:
        proc = subprocess.run([*shlex.split(cmd), workdir], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"no answer within {timeout} s") from None
    if proc.returncode != 0:
        raise RuntimeError(f"exit status {proc.returncode}: {proc.stderr[-1000:].strip()}")
    with open(os.path.join(workdir, "response.json")) as f:
        resp = json.load(f)["cases"]
    with np.load(os.path.join(workdir, "outputs.npz"), allow_pickle=False) as z:
        got = {k: z[k] for k in z.files}
    results = {}
    for case in items:
        r = resp.get(case["id"])
        if r is None:
            results[case["id"]] = {"problems": ["no result"]}
        elif r.get("unsupported") or (r.get("error") or {}).get("type") == "NotImplementedError":
            results[case["id"]] = {"unsupported": str(r.get("unsupported") or r["error"].get("message", ""))}
        elif r.get("error"):
            results[case["id"]] = {"problems": [f"raised {r['error'].get('type')}: {r['error'].get('message', '')}"]}
        else:
            results[case["id"]] = {"results": {k: got[v] for k, v in r.items() if k in ("y", "dx", "dgamma", "dbeta")}}
    return results


def check_exec(cmd: str, directory: str = GOLDEN_DIR, batch: int = 200, timeout: float | None = None,
               dtypes: tuple[str, ...] = ("float16", "float32", "float64")) -> dict[str, Any]:
    """Replay the gradient goldens through an external program (docs/conformance.md, "Gradients"):
    ``CMD DIR`` with ``DIR/request.json`` + ``inputs.npz``; the program writes ``response.json``
    (``{"cases": {id: {"y": KEY, "dx": KEY, "dgamma": KEY, "dbeta": KEY} | {"unsupported": why} |
    {"error": {...}}}}``) and ``outputs.npz``. A batch on which the program crashes is rerun case by
    case; a case it crashes on alone fails. Returns the same dict as `check_port`."""
    import shutil
    import tempfile

    doc, arrays = load(directory)
    todo = [c for c in doc["cases"] if c["result"]["status"] == "ok"
            and {c["input_dtype"], COMPUTE[c["init_kwargs"]["dtype"]]} <= set(dtypes)]
    failures, unsupported = {}, {}
    tmp = tempfile.mkdtemp(prefix="conformance-grad-exec-")

    def run(items, wd):
        try:
            return _exec_batch(cmd, items, arrays, wd, timeout)
        except (RuntimeError, OSError, ValueError, KeyError) as e:
            if len(items) == 1:
                return {items[0]["id"]: {"problems": [f"external program failed on this case alone: {e}"]}}
            out = {}
            for i, c in enumerate(items):
                out.update(run([c], f"{wd}.{i}"))
            return out

    try:
        for s0 in range(0, len(todo), batch):
            items = todo[s0:s0 + batch]
            res = run(items, os.path.join(tmp, f"b{s0}"))
            for case in items:
                r = res[case["id"]]
                if "unsupported" in r:
                    unsupported[case["id"]] = r["unsupported"]
                    continue
                problems = r.get("problems") or check_case(case, arrays, r["results"])
                if case["init_kwargs"].get("trainable") is False:
                    problems = [p for p in problems if p not in ("dgamma: missing", "dbeta: missing")]
                if problems:
                    failures[case["id"]] = problems
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"failures": failures, "unsupported": unsupported, "ran": len(todo)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m conformance.gradients", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="record the goldens with TensorFlow")
    g.add_argument("--out", default=GOLDEN_DIR)
    c = sub.add_parser("check", help="replay the goldens with arraybn")
    c.add_argument("--dir", default=GOLDEN_DIR)
    c.add_argument("--backend", default="numpy", help="numpy, array_api_strict, torch, dask")
    c.add_argument("--impl", default=None, metavar="PKG.MOD:FACTORY",
                   help="check a port through its public forward/backward (default: arraybn's functional core)")
    c.add_argument("--exec", dest="exec_cmd", default=None, metavar="CMD",
                   help="check an external program (called as CMD DIR; docs/conformance.md, 'Gradients')")
    args = ap.parse_args(argv)
    if args.cmd == "generate":
        t0 = time.perf_counter()
        doc = generate(args.out)
        dt = time.perf_counter() - t0
        print(f"{len(doc['cases'])} cases {doc['status_counts']} in {dt:.1f} s", file=sys.stderr)
        return 0
    import importlib

    import array_api_compat

    mod = importlib.import_module({"dask": "dask.array"}.get(args.backend, args.backend))
    xp = mod if args.backend == "array_api_strict" else array_api_compat.array_namespace(mod.asarray([1.0]))
    if args.impl or args.exec_cmd:
        from .runner import load_factory

        r = (check_exec(args.exec_cmd, directory=args.dir) if args.exec_cmd
             else check_port(load_factory(args.impl), xp, directory=args.dir))
        for cid, probs in r["failures"].items():
            print(cid, *probs, sep="\n  ")
        print(f"{r['ran']} cases: {r['ran'] - len(r['failures']) - len(r['unsupported'])} pass, "
              f"{len(r['failures'])} fail, {len(r['unsupported'])} unsupported", file=sys.stderr)
        return 1 if r["failures"] else 0
    failures = check(xp, directory=args.dir)
    for cid, probs in failures.items():
        print(cid, *probs, sep="\n  ")
    print(f"{len(failures)} failing case(s)", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
