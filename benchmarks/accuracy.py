"""``python -m benchmarks.accuracy``: arraybn's and TensorFlow's errors against a float64 recomputation of the layer.

For inputs of a few MiB with a large mean and a small spread (``1000 + 0.1 *
N(0, 1)`` in float32), in every path the layer takes (fused training and
inference, NCHW, non-fused 2-D, a mask, several axes, ghost batches), this
computes the layer's output and moving statistics

* in float64, with plain NumPy code written here from the formulas of
  ``docs/semantics.md`` (independent of arraybn), fed the same float32 inputs;
* with TensorFlow's v1 layer (``--tf-python`` names an interpreter with
  tensorflow and tf-keras, run in a subprocess);
* with arraybn on every installed namespace, under ``schedule("reference")``,
  ``schedule("auto")`` and each schedule made for the namespace by name;

and reports each one's largest error against float64: the output's (absolute;
the output is of order 1), the moving mean's (absolute) and the moving
variance's (relative). arraybn is never to be less accurate than TensorFlow.
Errors are measured, never asserted here; ``tests/test_schedules.py`` holds
arraybn to bounds of its own.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

MOMENTUM = 0.0  # the moving statistics become the batch's: their error is the statistics' own
EPSILON = 1e-3

# name, layer kwargs, input shape, training, mask (None or "random"), chunks for dask (along axis 0)
CASES: list[dict[str, Any]] = [
    {"name": "NHWC fused, training", "kwargs": {"axis": -1}, "shape": (16, 32, 32, 64), "training": True},
    {"name": "NHWC fused, inference", "kwargs": {"axis": -1}, "shape": (16, 32, 32, 64), "training": False},
    {"name": "NCHW fused, training", "kwargs": {"axis": 1}, "shape": (16, 64, 32, 32), "training": True},
    {"name": "NCHW fused, inference", "kwargs": {"axis": 1}, "shape": (16, 64, 32, 32), "training": False},
    {"name": "2-D non-fused, training", "kwargs": {"axis": -1}, "shape": (16384, 64), "training": True},
    {"name": "2-D non-fused, 2**18 rows", "kwargs": {"axis": -1}, "shape": (262144, 64), "training": True},
    {"name": "NHWC non-fused, training", "kwargs": {"axis": -1, "fused": False}, "shape": (16, 32, 32, 64), "training": True},
    {"name": "mask (rank 3), training", "kwargs": {"axis": -1}, "shape": (256, 64, 64), "training": True, "mask": True},
    {"name": "axis=[1, 3], training", "kwargs": {"axis": [1, 3]}, "shape": (128, 16, 64, 8), "training": True},
    {"name": "ghost batches (vbs=8), training", "kwargs": {"axis": -1, "virtual_batch_size": 8},
     "shape": (64, 32, 32, 16), "training": True},
]  # fmt: skip


def make_case(case: dict[str, Any], seed: int) -> dict[str, np.ndarray]:
    """Inputs and weights of ``case``: float32, the input ``1000 + 0.1 * N(0, 1)``."""
    rng = np.random.default_rng(seed)
    shape = tuple(case["shape"])
    x = (1000.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
    pshape = _param_shape(case)
    gamma = rng.uniform(0.5, 1.5, pshape).astype(np.float32)
    beta = rng.uniform(-0.5, 0.5, pshape).astype(np.float32)
    if case["training"]:
        moving_mean = np.zeros(pshape, np.float32)
        moving_variance = np.ones(pshape, np.float32)
    else:  # the data's own statistics, as after training on it
        axes = _reduce_axes(case)
        moving_mean = x.astype(np.float64).mean(axis=axes).reshape(pshape).astype(np.float32)
        moving_variance = x.astype(np.float64).var(axis=axes).reshape(pshape).astype(np.float32)
    out = {"x": x, "gamma": gamma, "beta": beta, "moving_mean": moving_mean, "moving_variance": moving_variance}
    if case.get("mask"):
        out["mask"] = rng.random(shape[:-1]) < 0.7
    return out


def _axes(case: dict[str, Any]) -> list[int]:
    rank = len(case["shape"])
    axis = case["kwargs"]["axis"]
    return sorted(a % rank for a in ([axis] if isinstance(axis, int) else axis))


def _reduce_axes(case: dict[str, Any]) -> tuple[int, ...]:
    return tuple(i for i in range(len(case["shape"])) if i not in _axes(case))


def _param_shape(case: dict[str, Any]) -> tuple[int, ...]:
    shape, axes = case["shape"], _axes(case)
    vbs = case["kwargs"].get("virtual_batch_size")
    if len(axes) == 1 and vbs is None:
        return (shape[axes[0]],)
    out = [shape[i] if i in axes else 1 for i in range(len(shape))]
    if vbs is not None:
        out.insert(1, 1)
    return tuple(out)


def _fused(case: dict[str, Any]) -> bool:
    kw = case["kwargs"]
    rank = len(case["shape"])
    axes = _axes(case)
    return (
        kw.get("fused", True) is not False
        and rank in (4, 5)
        and len(axes) == 1
        and axes[0] in ((1, 3) if rank == 4 else (1, 4))
        and kw.get("virtual_batch_size") is None
    )


def float64_layer(case: dict[str, Any], data: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The layer's output and moving statistics in float64 (docs/semantics.md, independent of arraybn)."""
    x = data["x"].astype(np.float64)
    pshape = _param_shape(case)
    g, b = (data[k].astype(np.float64) for k in ("gamma", "beta"))
    mm, mv = (data[k].astype(np.float64) for k in ("moving_mean", "moving_variance"))
    vbs = case["kwargs"].get("virtual_batch_size")
    shape = x.shape
    if vbs is not None:  # ghost batches: (vbs, B / vbs, ...), statistics per index of axis 1
        x = x.reshape(vbs, shape[0] // vbs, *shape[1:])
    axes = tuple(i for i in range(x.ndim) if i not in [a + (vbs is not None) for a in _axes(case)])
    if vbs is not None:
        axes = tuple(a for a in axes if a != 1)
    bshape = [1] * x.ndim
    for a in _axes(case):
        bshape[a + (vbs is not None)] = x.shape[a + (vbs is not None)]
    g, b, mmb, mvb = (v.reshape(bshape) for v in (g, b, mm, mv))
    if not case["training"]:
        mean, var = mmb, mvb
    elif "mask" in data:
        w = data["mask"].astype(np.float64)[..., None] + np.zeros_like(x)
        mean = (w * x).sum(axis=axes, keepdims=True) / w.sum(axis=axes, keepdims=True)
        var = (w * (x - mean) ** 2).sum(axis=axes, keepdims=True) / w.sum(axis=axes, keepdims=True)
    else:
        mean = x.mean(axis=axes, keepdims=True)
        var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
    y = ((x - mean) / np.sqrt(var + EPSILON) * g + b).reshape(shape)
    out = {"y": y, "moving_mean": mm, "moving_variance": mv}
    if case["training"]:
        batch_mean = mean.mean(axis=1, keepdims=True) if vbs is not None else mean
        batch_var = var.mean(axis=1, keepdims=True) if vbs is not None else var
        n = x.size // mean.size
        bessel = n / max(n - 1, 1) if _fused(case) else 1.0
        f = 1.0 - MOMENTUM
        out["moving_mean"] = ((1 - f) * mm.reshape(batch_mean.shape) + f * batch_mean).reshape(pshape)
        out["moving_variance"] = ((1 - f) * mv.reshape(batch_var.shape) + f * bessel * batch_var).reshape(pshape)
    return out


def errors(got: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> dict[str, float]:
    """Largest absolute error of the output and of the moving mean, largest relative error of the moving variance."""
    def err(a: np.ndarray, b: np.ndarray, relative: bool = False) -> float:
        d = np.abs(np.asarray(a, np.float64) - b)
        return float(np.max(d / np.abs(b) if relative else d))

    return {
        "y": err(got["y"], ref["y"]),
        "moving_mean": err(got["moving_mean"], ref["moving_mean"]),
        "moving_variance": err(got["moving_variance"], ref["moving_variance"], relative=True),
    }


# --------------------------------------------------------------------------- #
# TensorFlow (in a subprocess when --tf-python names another interpreter)
# --------------------------------------------------------------------------- #


def run_tf(case: dict[str, Any], data: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    import tensorflow as tf

    tf.keras.backend.clear_session()
    layer = tf.compat.v1.keras.layers.BatchNormalization(momentum=MOMENTUM, epsilon=EPSILON, **case["kwargs"])
    layer.build(data["x"].shape)
    layer.set_weights([data[k] for k in ("gamma", "beta", "moving_mean", "moving_variance")])
    mask = tf.constant(data["mask"]) if "mask" in data else None
    y = layer(tf.constant(data["x"]), training=case["training"], mask=mask)
    w = layer.get_weights()
    return {"y": y.numpy(), "moving_mean": w[2], "moving_variance": w[3]}


def _tf_main(path: str) -> None:
    with np.load(path + ".in.npz") as arrays:
        cases = json.loads(str(arrays["cases"]))
        out = {}
        for i, case in enumerate(cases):
            data = {k.split("/", 1)[1]: arrays[k] for k in arrays.files if k.startswith(f"{i}/")}
            for key, value in run_tf(case, data).items():
                out[f"{i}/{key}"] = value
        import tensorflow as tf

        out["versions"] = np.array(json.dumps({"tensorflow": tf.__version__, "numpy": np.__version__}))
    np.savez(path + ".out.npz", **out)


def tf_results(cases: list[dict[str, Any]], datas: list[dict[str, np.ndarray]], python: str | None) -> Any:
    if python is None:
        return [run_tf(c, d) for c, d in zip(cases, datas, strict=True)], {}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "tf")
        arrays = {f"{i}/{k}": v for i, d in enumerate(datas) for k, v in d.items()}
        np.savez(path + ".in.npz", cases=np.array(json.dumps(cases)), **arrays)
        env = {**os.environ, "TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
        root = str(Path(__file__).resolve().parent.parent)
        subprocess.run([python, "-m", "benchmarks.accuracy", "--tf-worker", path], check=True, cwd=root, env=env)
        with np.load(path + ".out.npz") as out:
            results = [
                {k: out[f"{i}/{k}"] for k in ("y", "moving_mean", "moving_variance")} for i in range(len(cases))
            ]
            versions = json.loads(str(out["versions"]))
    return results, versions


# --------------------------------------------------------------------------- #
# arraybn
# --------------------------------------------------------------------------- #


def namespaces(names: list[str]) -> dict[str, Any]:
    """``name -> (to_backend(np_array), description)`` for the namespaces installed here."""
    out: dict[str, Any] = {}
    for name in names:
        try:
            if name == "numpy":
                out[name] = lambda a: a
            elif name == "torch":
                import torch

                out[name] = lambda a, torch=torch: torch.from_numpy(np.ascontiguousarray(a))
            elif name == "array_api_strict":
                import array_api_strict

                out[name] = lambda a, s=array_api_strict: s.asarray(a)
            elif name == "dask":
                import dask.array as da

                out[name] = lambda a, da=da: da.from_array(a, chunks=(max(1, a.shape[0] // 4), *a.shape[1:]))
            elif name == "jax":
                import jax

                jax.config.update("jax_enable_x64", True)
                import jax.numpy as jnp

                out[name] = lambda a, jnp=jnp: jnp.asarray(a)
        except ImportError:
            print(f"{name}: not installed, skipped", file=sys.stderr)
    return out


# every schedule made for a namespace, besides the one "auto" picks (each also runs under its own name)
_NAMED = {"numpy": ("numpy-blocked", "numba-kernels"), "torch": ("torch-eager", "numba-kernels")}


def run_arraybn(case: dict[str, Any], data: dict[str, np.ndarray], convert: Any, schedule: str) -> dict[str, np.ndarray]:
    import arraybn
    from arraybn._namespace import array_device, array_namespace, to_numpy

    x = convert(data["x"])
    layer = arraybn.BatchNormalization(momentum=MOMENTUM, epsilon=EPSILON, **case["kwargs"])
    layer.build(data["x"].shape, xp=array_namespace(x), device=array_device(x))
    layer.set_weights([data[k] for k in ("gamma", "beta", "moving_mean", "moving_variance")])
    mask = convert(data["mask"]) if "mask" in data else None
    with arraybn.schedule(schedule):
        y = layer(x, training=case["training"], mask=mask)
    w = layer.get_weights()
    return {"y": to_numpy(y), "moving_mean": w[2], "moving_variance": w[3]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.accuracy", description=__doc__.split("\n\n")[0])
    p.add_argument("--tf-python", default=None, metavar="PYTHON", help="interpreter with tensorflow + tf-keras")
    p.add_argument("--no-tf", action="store_true", help="arraybn only")
    p.add_argument("--backends", default="numpy,torch,array_api_strict,dask,jax")
    p.add_argument("--json", type=Path, default=None, help="also write the errors as JSON")
    p.add_argument("--tf-worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.tf_worker:
        _tf_main(args.tf_worker)
        return 0
    datas = [make_case(c, seed) for seed, c in enumerate(CASES)]
    refs = [float64_layer(c, d) for c, d in zip(CASES, datas, strict=True)]
    table: dict[str, dict[str, dict[str, float]]] = {c["name"]: {} for c in CASES}
    versions: dict[str, str] = {}
    if not args.no_tf:
        tf_out, versions = tf_results(CASES, datas, args.tf_python)
        for case, got, ref in zip(CASES, tf_out, refs, strict=True):
            table[case["name"]]["TF"] = errors(got, ref)
    for name, convert in namespaces(args.backends.split(",")).items():
        for schedule in ("reference", "auto", *_NAMED.get(name, ())):
            for case, data, ref in zip(CASES, datas, refs, strict=True):
                if name == "array_api_strict" and case.get("mask"):
                    data = {**data, "mask": data["mask"]}
                got = run_arraybn(case, data, convert, schedule)
                table[case["name"]][f"{name} ({schedule})"] = errors(got, ref)
    import arraybn

    versions.update({"arraybn": arraybn.__version__, "numpy (arraybn)": np.__version__, "python": platform.python_version()})
    print(f"versions: {versions}; machine: {platform.processor() or platform.machine()}")
    columns = sorted({col for row in table.values() for col in row}, key=lambda c: (c != "TF", c))
    for what, label in (("y", "output, max abs error"), ("moving_mean", "moving mean, max abs error"),
                        ("moving_variance", "moving variance, max relative error")):  # fmt: skip
        print(f"\n### {label}\n")
        print("| case | " + " | ".join(columns) + " |")
        print("|---|" + "---:|" * len(columns))
        for case_name, row in table.items():
            cells = [f"{row[c][what]:.1e}" if c in row else "" for c in columns]
            print(f"| {case_name} | " + " | ".join(cells) + " |")
    worse = [
        (case_name, col, what)
        for case_name, row in table.items()
        if "TF" in row
        for col in row
        if col != "TF"
        for what in ("y", "moving_mean", "moving_variance")
        if row[col][what] > 2 * row["TF"][what] + 1e-12
    ]
    print(f"\narraybn more than 2x TF's error: {len(worse)}")
    for w in worse:
        print("  ", *w)
    if args.json:
        args.json.write_text(json.dumps({"versions": versions, "errors": table}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
