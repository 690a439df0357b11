"""Replay the conformance goldens against an implementation.

The runner is independent of arraybn's internals: it drives an
implementation through a *factory* ``factory(init_kwargs) -> layer`` (arraybn's
``BatchNormalization`` by default, any ``pkg.module:factory`` with ``--impl``)
or through an external program (``--exec``, see docs/conformance.md, "External
program protocol").

Everything an implementation produces is first turned into a plain *result*
dict of NumPy arrays (``drive_case`` in-process, or read back from the external
program), then ``compare_case`` checks the result against the golden record.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field

import numpy as np

from . import FORMAT_VERSION, adjustments, deep, read_json

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_GOLDENS = os.path.join(HERE, "goldens")
DEFAULT_XFAILS = os.path.join(HERE, "xfails", "arraybn.txt")

BACKENDS = ["numpy", "array_api_strict", "torch", "cupy", "jax", "dask"]
#: dtypes a backend cannot represent: cases that need them are skipped (and counted)
UNSUPPORTED_DTYPES = {
    "numpy": {"bfloat16"}, "cupy": {"bfloat16"}, "dask": {"bfloat16"},
    "array_api_strict": {"bfloat16", "float16"},
    "torch": set(), "jax": set(),
}

# --------------------------------------------------------------------------- #
# Tolerances (justified in docs/conformance.md, "Tolerances")
# --------------------------------------------------------------------------- #

EPS = {
    "float64": float(np.finfo(np.float64).eps),   # 2.2e-16
    "float32": float(np.finfo(np.float32).eps),   # 1.2e-7
    "float16": float(np.finfo(np.float16).eps),   # 9.8e-4
    "bfloat16": 2.0 ** -7,                         # 7.8e-3
}

#: |impl - ref| <= atol * S + rtol * |ref|,  S = max(1, max |ref| of the array)
TOLERANCES = {
    # exact up to reduction order and the algebraic form of the normalization
    "float64": {"rtol": 64 * EPS["float64"], "atol": 256 * EPS["float64"]},
    # a few ulp of float32 relative to the array's scale
    "float32": {"rtol": 16 * EPS["float32"], "atol": 64 * EPS["float32"]},
    # results are computed in float32 and rounded once to half: 1 ulp of half
    # (a float32 difference may flip the rounding) plus the float32 budget
    "float16": {"rtol": EPS["float16"], "atol": 64 * EPS["float32"]},
    "bfloat16": {"rtol": EPS["bfloat16"], "atol": 64 * EPS["float32"]},
}
LOSS_TOL = {"rtol": 1e-5, "atol": 1e-7}
#: float16 penalties (activity regularizers under 16-bit policies) are sums of float16 values,
#: rounded at every addition in an order that differs between libraries: a few float16 ulps
LOSS_TOL_HALF = {"rtol": 8 * 2.0**-10, "atol": 1e-3}
CONFIG_FLOAT_RTOL = 1e-6

#: Deep groups (docs/conformance.md, "Tolerances of the deep groups"): a value passes when
#: |impl - TF| <= max(the dtype's tolerance above, DEEP_K * TF's own error against float64)
DEEP_K = 4.0
#: the features of the golden format this runner reads (a chunk lists those it needs)
FEATURES = {"seeded_arrays", "sampled_outputs", "set_between_calls", "tf_error"}

#: TensorFlow exception class -> exception class a port must raise.
ERROR_MAP = {"InvalidArgumentError": "ValueError"}


# --------------------------------------------------------------------------- #
# Goldens
# --------------------------------------------------------------------------- #

class Chunk:
    def __init__(self, goldens, entry):
        self.doc = read_json(os.path.join(goldens, entry["json"]))
        if self.doc["format_version"] != FORMAT_VERSION:
            raise ValueError(f"unsupported format_version {self.doc['format_version']}")
        missing = set(self.doc.get("features", [])) - FEATURES
        if missing:
            raise ValueError(f"{entry['json']}: unsupported format features {sorted(missing)}")
        self.npz = np.load(os.path.join(goldens, entry["npz"]), allow_pickle=False)
        self.group = self.doc["group"]
        self._cache = {}

    def arr(self, ref, as_float=True):
        """Array of a reference ``{"key", "index"}`` (or a seeded ``{"gen", "sha256"}`` one)."""
        if ref is None:
            return None
        if "gen" in ref:
            return self.generated(ref)
        key = ref["key"]
        a = self._cache.get(key)
        if a is None:
            a = self._cache[key] = self.npz[key]
        if ref.get("index") is not None:
            a = a[ref["index"]]
        return a

    def generated(self, ref):
        """Regenerate a seeded array; its checksum must match the one TF's inputs had."""
        key = "gen:" + ref["sha256"]
        a = self._cache.get(key)
        if a is None:
            a = deep.make_array(ref["gen"])
            if deep.checksum(a) != ref["sha256"]:
                raise ValueError(f"regenerated array {ref['gen']} does not match its checksum (NumPy's random "
                                 "stream changed?): the deep goldens cannot be replayed with this NumPy")
            if len(self._cache) > 8:  # the deep groups' inputs reach megabytes: keep a few
                self._cache = {k: v for k, v in self._cache.items() if not k.startswith("gen:")}
            self._cache[key] = a
        return a


def ref_dtype(case, ref):
    """The dtype tag of an array reference (a seeded one carries its own)."""
    return ref["dtype"] if "gen" in ref else case["arrays"][ref["key"]]["dtype"]


def load_manifest(goldens=DEFAULT_GOLDENS):
    return read_json(os.path.join(goldens, "manifest.json"))


def iter_cases(goldens=DEFAULT_GOLDENS, include=None, exclude=None, stride=1):
    """Yield ``(chunk, case)`` for every golden case matching the filters.

    ``stride=k`` keeps every k-th matching case of each group (deterministic), for
    backends where a full run is slow (dask builds a task graph per operation).
    """
    man = load_manifest(goldens)
    inc = re.compile(include) if include else None
    exc = re.compile(exclude) if exclude else None
    seen = {}
    for entry in man["files"]:
        ch = Chunk(goldens, entry)
        for case in ch.doc["cases"]:
            if inc and not inc.search(case["id"]):
                continue
            if exc and exc.search(case["id"]):
                continue
            k = seen.get(ch.group, 0)
            seen[ch.group] = k + 1
            if k % stride:
                continue
            yield ch, case


def bf16_bits_to_f32(bits):
    return (np.asarray(bits, np.uint16).astype(np.uint32) << 16).view(np.float32)


def golden_values(chunk, case, ref):
    """Float view of a golden array (bf16 decoded)."""
    a = chunk.arr(ref)
    if a is None:
        return None
    if ref_dtype(case, ref) == "bfloat16":
        return bf16_bits_to_f32(a)
    return a


# --------------------------------------------------------------------------- #
# Backends
# --------------------------------------------------------------------------- #

@dataclass
class Backend:
    name: str
    xp: object
    device: object = None

    @property
    def unsupported(self):
        return UNSUPPORTED_DTYPES.get(self.name, set())

    def asarray(self, a, dtype_tag=None):
        """NumPy array (bf16 given as uint16 bits + tag) -> backend array."""
        if dtype_tag == "bfloat16":
            f = bf16_bits_to_f32(a)
            if self.name == "torch":
                import torch

                t = torch.asarray(f).to(torch.bfloat16)
                return t if self.device is None else t.to(self.device)
            if self.name == "jax":
                import jax.numpy as jnp

                return jnp.asarray(f).astype(jnp.bfloat16)
            raise TypeError(f"{self.name} has no bfloat16")
        if self.device is not None:
            return self.xp.asarray(a, device=self.device)
        return self.xp.asarray(a)

    def namespace_name(self, x):
        import array_api_compat

        return array_api_compat.array_namespace(x).__name__


def backend_from_namespace(xp):
    """Map an (array-api-compat wrapped) namespace to a backend name."""
    n = getattr(xp, "__name__", str(xp))
    for key, name in [("array_api_strict", "array_api_strict"), ("torch", "torch"), ("cupy", "cupy"),
                      ("jax", "jax"), ("dask", "dask"), ("numpy", "numpy")]:
        if key in n:
            return name
    raise ValueError(f"unknown namespace {n}")


def get_backend(name=None, xp=None, device=None):
    if name == "torch_cuda":
        import torch

        name, device = "torch", device or torch.device("cuda")
    if xp is not None:
        name = name or backend_from_namespace(xp)
    if name == "numpy":
        import array_api_compat.numpy as m
        xp = xp or m
    elif name == "array_api_strict":
        import array_api_strict as m
        xp = xp or m
    elif name == "torch":
        import array_api_compat.torch as m
        xp = xp or m
    elif name == "cupy":
        import array_api_compat.cupy as m
        xp = xp or m
    elif name == "jax":
        import jax

        jax.config.update("jax_enable_x64", True)
        import jax.numpy as m
        xp = xp or m
    elif name == "dask":
        import array_api_compat.dask.array as m
        xp = xp or m
    else:
        raise ValueError(f"unknown backend {name!r}; choose from {BACKENDS}")
    return Backend(name, xp, device)


def dtype_name(x):
    return str(getattr(x, "dtype", type(x))).split(".")[-1].replace("dtype('", "").replace("')", "")


def to_numpy(x):
    """Any supported array (or Python scalar) -> (numpy array, dtype name).

    bfloat16 arrays are returned as float32 values (exact) with name "bfloat16".
    """
    if isinstance(x, (int, float, bool, np.ndarray, np.generic)):
        a = np.asarray(x)
        return a, str(a.dtype)
    name = dtype_name(x)
    mod = type(x).__module__
    if mod.startswith("torch"):
        import torch

        t = x.detach().to("cpu")
        if t.dtype == torch.bfloat16:
            t = t.to(torch.float32)
        return t.numpy().copy(), name
    if mod.startswith("cupy"):
        return x.get(), name
    if mod.startswith("dask"):
        a = np.asarray(x.compute())
        return a, str(a.dtype)
    if mod.startswith("array_api_strict"):
        import array_api_strict

        x = x.to_device(array_api_strict.Device("CPU_DEVICE")) if hasattr(x, "to_device") else x
        try:
            a = np.asarray(x)
        except (TypeError, ValueError, RuntimeError):
            a = np.from_dlpack(x)
        return np.array(a), str(a.dtype)
    if mod.startswith(("jax", "jaxlib")):
        if "bfloat16" in name:
            import jax.numpy as jnp

            return np.asarray(x.astype(jnp.float32)), "bfloat16"
        return np.asarray(x), name
    import array_api_compat

    a = np.asarray(array_api_compat.to_device(x, "cpu"))
    return a, str(a.dtype)


# --------------------------------------------------------------------------- #
# Driving an in-process implementation
# --------------------------------------------------------------------------- #

def load_factory(spec=None):
    """``None`` -> arraybn.BatchNormalization; ``"pkg.mod:attr"`` -> that callable."""
    if spec is None:
        import arraybn

        return lambda kwargs: arraybn.BatchNormalization(**kwargs)
    mod, _, attr = spec.partition(":")
    obj = importlib.import_module(mod)
    for part in (attr or "factory").split("."):
        obj = getattr(obj, part)
    return obj


def _err(stage, exc, call_index=None):
    return {"stage": stage, "call_index": call_index, "type": type(exc).__name__,
            "mro": [c.__name__ for c in type(exc).__mro__], "message": str(exc)[:500]}


def _stack(arrs):
    return np.stack([np.asarray(a) for a in arrs]) if arrs else np.zeros((0,))


def drive_case(factory, backend, chunk, case):
    """Run one case in-process; return a result dict of NumPy data."""
    res = {"error": None, "calls": [], "step": None}
    kwargs = adjustments.resolve(case["init_kwargs"])
    try:
        layer = factory(kwargs)
    except Exception as e:  # noqa: BLE001
        res["error"] = _err("init", e)
        return res
    try:
        layer.build(tuple(case["input_shape"]), xp=backend.xp, device=backend.device)
    except Exception as e:  # noqa: BLE001
        res["error"] = _err("build", e)
        return res
    try:
        res["weights_after_build"] = [np.asarray(w) for w in layer.get_weights()]
        iw = case.get("initial_weights")
        if iw is not None:
            refs = iw if isinstance(iw, list) else None
            if refs is None:
                stacked = chunk.arr(iw)
                ws = [np.array(w) for w in stacked]
            else:
                ws = [np.array(chunk.arr(r)) for r in refs]
            try:
                layer.set_weights(ws)
            except Exception as e:  # noqa: BLE001
                res["error"] = _err("set_weights", e)
                return res
        res["fused"] = layer.fused
        res["config"] = layer.get_config()
        res["weight_names"] = list(layer.weight_names)
        weights = list(layer.weights)

        def names_of(sub):
            out = []
            for w in sub:
                idx = next((i for i, v in enumerate(weights) if v is w), None)
                out.append(res["weight_names"][idx] if idx is not None else "?")
            return out

        res["trainable_weight_names"] = names_of(layer.trainable_weights)
        res["non_trainable_weight_names"] = names_of(layer.non_trainable_weights)
        res["layer_trainable"] = bool(layer.trainable)
        try:
            losses = [to_numpy(l) for l in layer.losses]
        except Exception as e:  # noqa: BLE001
            res["error"] = _err("losses", e)
            return res
        res["losses"] = [float(np.asarray(a, np.float64)) for a, _ in losses]
        res["loss_dtypes"] = [t for _, t in losses]
        try:
            res["weight_namespaces"] = sorted({backend.namespace_name(w) for w in weights})
        except Exception as e:  # noqa: BLE001 - weights that are no array of any namespace (a framework's variables)
            res["weight_namespaces"] = [f"?{type(e).__name__}"]
        try:
            roundtrip = type(layer).from_config(res["config"]).get_config() if hasattr(type(layer), "from_config") else None
        except Exception as e:  # noqa: BLE001
            roundtrip = {"__error__": f"{type(e).__name__}: {e}"}
        res["config_roundtrip"] = roundtrip
    except Exception as e:  # noqa: BLE001 - an attribute of the public surface is broken
        res["error"] = _err("resolve", e)
        return res
    for i, c in enumerate(case["calls"]):
        tag = ref_dtype(case, c["x"])
        x = backend.asarray(np.array(chunk.arr(c["x"])), tag)
        m = None
        if c["mask"] is not None:
            m = backend.asarray(np.array(chunk.arr(c["mask"])))
        try:
            # attributes TF reads on every call, set after build (an adjustment by name, as in init_kwargs)
            for k, v in adjustments.resolve(c.get("set") or {}).items():
                setattr(layer, k, v)
            if c.get("set_weights") is not None:
                layer.set_weights([np.array(w) for w in chunk.arr(c["set_weights"])])
        except Exception as e:  # noqa: BLE001
            res["error"] = _err("set", e, i)
            return res
        try:
            y = layer(x, training=c["training"], mask=m)
        except Exception as e:  # noqa: BLE001
            res["error"] = _err("call", e, i)
            return res
        ya, yt = to_numpy(y)
        entry = {"y": ya, "y_dtype": yt, "y_shape": list(getattr(y, "shape", ())),
                 "weights": _stack(layer.get_weights())}
        if "losses" in c:  # TF recorded layer.losses after this call (an activity regularizer)
            try:
                call_losses = [to_numpy(v) for v in layer.losses]
                entry["losses"] = [float(np.asarray(a, np.float64)) for a, _ in call_losses]
                entry["loss_dtypes"] = [t for _, t in call_losses]
            except Exception as e:  # noqa: BLE001
                res["error"] = _err("losses", e, i)
                return res
        try:
            entry["namespace"] = backend.namespace_name(y)
            entry["input_namespace"] = backend.namespace_name(x)
        except Exception as e:  # noqa: BLE001
            entry["namespace"] = f"?{type(e).__name__}"
            entry["input_namespace"] = backend.namespace_name(x)
        res["calls"].append(entry)
    st = case.get("step")
    if st is not None:
        tag = case["arrays"][st["x"]["key"]]["dtype"]
        x = backend.asarray(np.array(chunk.arr(st["x"])), tag)
        try:
            y = layer(x, training=True)
            ws = [np.array(w) for w in layer.get_weights()]
            before = chunk.arr(st["weights_before"])
            names = res["weight_names"]
            if st.get("grads") is not None:
                grads = chunk.arr(st["grads"])
                # TF's optimizer keeps the learning rate as a float32 variable
                lr = np.asarray(np.float32(st["learning_rate"]), before.dtype)
                for gname, g in zip(st["grad_names"], grads):
                    j = names.index(gname)
                    ws[j] = (before[j] - lr * g).astype(before.dtype)
            layer.set_weights(ws)
            layer.apply_constraints()
        except Exception as e:  # noqa: BLE001
            res["error"] = _err("step", e)
            return res
        ya, yt = to_numpy(y)
        res["step"] = {"y": ya, "y_dtype": yt, "weights_after": _stack(layer.get_weights())}
    return res


# --------------------------------------------------------------------------- #
# External program protocol
# --------------------------------------------------------------------------- #

INPUT_FIELDS = ("x", "mask")


def _request_case(case):
    """The golden record without any expected outputs."""
    out = {k: case[k] for k in ("id", "init_kwargs", "input_shape", "input_dtype", "weights")}
    out["initial_weights"] = case.get("initial_weights")

    def plain(ref):  # a seeded array travels as an ordinary array of the request
        return {"key": "gen/" + ref["sha256"], "index": None} if ref is not None and "gen" in ref else ref

    out["calls"] = [{"training": c["training"], "x": plain(c["x"]), "mask": plain(c["mask"]),
                     **({"losses": True} if "losses" in c else {}),
                     **({"set": c["set"]} if c.get("set") else {}),
                     **({"set_weights": c["set_weights"]} if c.get("set_weights") else {})}
                    for c in case["calls"]]
    st = case.get("step")
    out["step"] = None if st is None else {k: st[k] for k in ("learning_rate", "x", "weights_before", "grads",
                                                               "grad_names")}
    keys = set()
    gen_meta = {}
    for c, gc in zip(out["calls"], case["calls"]):
        for f in INPUT_FIELDS:
            if c[f] is not None:
                keys.add(c[f]["key"])
                if "gen" in gc[f]:
                    gen_meta[c[f]["key"]] = {"dtype": gc[f]["dtype"], "shape": list(gc[f]["gen"]["shape"]),
                                             "ref": gc[f]}
        if c.get("set_weights") is not None:
            keys.add(c["set_weights"]["key"])
    iw = out["initial_weights"]
    for r in (iw if isinstance(iw, list) else [iw] if iw else []):
        keys.add(r["key"])
    if st is not None:
        for f in ("x", "weights_before", "grads"):
            if st.get(f) is not None:
                keys.add(st[f]["key"])
    out["arrays"] = {k: ({"dtype": gen_meta[k]["dtype"], "shape": gen_meta[k]["shape"]} if k in gen_meta
                         else case["arrays"][k]) for k in sorted(keys)}
    return out, keys, {k: m["ref"] for k, m in gen_meta.items()}


def run_exec_batch(cmd, backend_name, items, workdir, timeout=None):
    """Write one request for ``items`` [(chunk, case)], run ``cmd``, read results."""
    req = {"format_version": FORMAT_VERSION, "backend": backend_name, "cases": []}
    arrays = {}
    for n, (chunk, case) in enumerate(items):
        rc, keys, generated = _request_case(case)
        # keys are made unique across chunks by prefixing the case number
        ren = {k: f"{n:05d}/{k}" for k in keys}
        rc = json.loads(json.dumps(rc))

        def fix(ref):
            if isinstance(ref, dict) and "key" in ref:
                ref["key"] = ren[ref["key"]]
            return ref

        for c in rc["calls"]:
            fix(c["x"]), fix(c["mask"]), fix(c.get("set_weights"))
        iw = rc["initial_weights"]
        for r in (iw if isinstance(iw, list) else [iw] if iw else []):
            fix(r)
        if rc["step"]:
            for f in ("x", "weights_before", "grads"):
                fix(rc["step"].get(f))
        rc["arrays"] = {ren[k]: v for k, v in rc["arrays"].items()}
        for k in keys:
            arrays[ren[k]] = chunk.arr(generated[k]) if k in generated else chunk.npz[k]
        req["cases"].append(rc)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "request.json"), "w") as f:
        json.dump(req, f, sort_keys=True)
    np.savez(os.path.join(workdir, "inputs.npz"), **arrays)
    try:
        proc = subprocess.run(shlex.split(cmd) + [workdir], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ExecFailure(f"no answer within {timeout} s") from None
    except OSError as e:
        raise ExecFailure(f"cannot start the program: {e}") from None
    if proc.returncode != 0:
        raise ExecFailure(f"exit status {proc.returncode}: {proc.stderr[-1500:].strip()}")
    try:
        with open(os.path.join(workdir, "response.json")) as f:
            resp = json.load(f)
        out = np.load(os.path.join(workdir, "outputs.npz"), allow_pickle=False)
        return _read_response(resp, out, items)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ExecFailure(f"unreadable response: {type(e).__name__}: {e}") from None


def _bits(a, dtype):
    a = np.asarray(a)
    return bf16_bits_to_f32(a) if dtype == "bfloat16" and a.dtype == np.uint16 else a


def _read_response(resp, out, items):
    results = {}
    for chunk, case in items:
        r = resp["cases"].get(case["id"])
        if r is None:
            results[case["id"]] = {"error": {"stage": "exec", "type": "MissingResult", "message": "no result",
                                             "call_index": None}, "calls": [], "step": None}
            continue
        if r.get("unsupported"):
            results[case["id"]] = {"unsupported": str(r["unsupported"]), "error": None, "calls": [], "step": None}
            continue
        wdt = r.get("weights_dtype")
        if r.get("weights_after_build") is not None:
            r["weights_after_build"] = list(_bits(out[r["weights_after_build"]], wdt))
        for c in r.get("calls", []):
            c["y"] = _bits(out[c["y"]], c.get("y_dtype"))
            c["weights"] = _bits(out[c["weights"]], wdt)
            c.setdefault("y_shape", list(c["y"].shape))
        if r.get("step"):
            r["step"]["y"] = _bits(out[r["step"]["y"]], r["step"].get("y_dtype"))
            r["step"]["weights_after"] = _bits(out[r["step"]["weights_after"]], wdt)
        r.setdefault("error", None)
        r.setdefault("calls", [])
        r.setdefault("step", None)
        results[case["id"]] = r
    return results


# --------------------------------------------------------------------------- #
# Comparison
# --------------------------------------------------------------------------- #

#: every status an outcome can have, in the order of the summary line (they add up to the total)
STATUSES = ["pass", "fail", "api_fail", "unsupported", "xfail", "xpass", "tf_defect", "skip"]
#: statuses that make a run fail (exit status 1)
FAILING = ("fail", "api_fail")


@dataclass
class Outcome:
    id: str
    group: str
    dims: dict
    status: str                      # one of STATUSES
    golden_status: str               # ok | error | tf_defect (what TF did)
    problems: list = field(default_factory=list)      # numerics and error parity
    api_problems: list = field(default_factory=list)  # Keras API: fused flag, weight names, config
    tags: list = field(default_factory=list)          # TF behaviours (conformance.cases.behaviours)
    feature: str = ""                 # unsupported: the feature the implementation lacks
    max_abs: float = 0.0
    max_rel: float = 0.0
    worst_ratio: float = 0.0          # max of |d| / allowed over all compared arrays
    worst_what: str = ""
    xfail_reason: str = ""


def compare_arrays(got, ref, dtype, what, out, rows=None, floor=None):
    """Compare with the dtype's tolerance; record metrics in ``out``; return problem or None.

    ``rows``: names of the leading axis' entries (stacked weights); each row
    then gets its own scale S and is reported by name. ``floor``: an absolute
    difference always allowed (deep groups: ``DEEP_K`` times TF's own error; one
    value per row with ``rows``).
    """
    got = np.asarray(got, np.float64)
    ref = np.asarray(ref, np.float64)
    if got.shape != ref.shape:
        return f"{what}: shape {list(got.shape)} != {list(ref.shape)}"
    if rows is not None:
        return _compare_rows(got, ref, dtype, what, out, rows, floor)
    tol = TOLERANCES.get(dtype, TOLERANCES["float32"])
    fr = np.isfinite(ref)
    fg = np.isfinite(got)
    nan_mismatch = (np.isnan(ref) != np.isnan(got)) | (~fr & ~np.isnan(ref) & (got != ref))
    if nan_mismatch.any():
        i = int(np.flatnonzero(nan_mismatch.ravel())[0])
        return f"{what}: non-finite mismatch at flat index {i}: got {got.ravel()[i]!r}, ref {ref.ravel()[i]!r}"
    both = fr & fg
    if not both.any():
        return None
    r, g = ref[both], got[both]
    scale = max(1.0, float(np.max(np.abs(r))))
    d = np.abs(g - r)
    allowed = tol["atol"] * scale + tol["rtol"] * np.abs(r)
    if floor:
        allowed = np.maximum(allowed, floor)
    ratio = d / allowed
    k = int(np.argmax(ratio))
    rel = d / np.maximum(np.abs(r), np.finfo(np.float64).tiny)
    out.max_abs = max(out.max_abs, float(d.max()))
    out.max_rel = max(out.max_rel, float(np.max(np.where(d > 0, rel, 0.0))))
    if float(ratio[k]) > out.worst_ratio:
        out.worst_ratio = float(ratio[k])
        out.worst_what = what
    if ratio[k] > 1.0:
        return (f"{what}: max |diff| {d[k]:.3g} > allowed {allowed[k]:.3g} "
                f"(ref {r[k]:.6g}, got {g[k]:.6g}, dtype {dtype})")
    return None


def _compare_rows(got, ref, dtype, what, out, rows, floor=None):
    tol = TOLERANCES.get(dtype, TOLERANCES["float32"])
    n = ref.shape[0]
    g2, r2 = got.reshape(n, -1), ref.reshape(n, -1)
    floors = np.zeros(n) if floor is None else np.broadcast_to(np.asarray(floor, np.float64), (n,))
    if not (np.isfinite(r2).all() and np.isfinite(g2).all()):
        for j in range(n):
            p = compare_arrays(g2[j], r2[j], dtype, f"{what} {rows[j]}", out, floor=float(floors[j]))
            if p:
                return p
        return None
    scale = np.maximum(1.0, np.abs(r2).max(axis=1, initial=0.0))[:, None]
    d = np.abs(g2 - r2)
    allowed = np.maximum(tol["atol"] * scale + tol["rtol"] * np.abs(r2), floors[:, None])
    if d.size == 0:
        return None
    ratio = d / allowed
    k = np.unravel_index(int(np.argmax(ratio)), ratio.shape)
    out.max_abs = max(out.max_abs, float(d.max()))
    rel = np.where(d > 0, d / np.maximum(np.abs(r2), np.finfo(np.float64).tiny), 0.0)
    out.max_rel = max(out.max_rel, float(rel.max()))
    if float(ratio[k]) > out.worst_ratio:
        out.worst_ratio = float(ratio[k])
        out.worst_what = f"{what} {rows[k[0]]}"
    if ratio[k] > 1.0:
        return (f"{what} {rows[k[0]]}: max |diff| {d[k]:.3g} > allowed {allowed[k]:.3g} "
                f"(ref {r2[k]:.6g}, got {g2[k]:.6g}, dtype {dtype})")
    return None


def _deep_floor(err, key):
    """``DEEP_K`` times TF's recorded error (0 where the recomputation was unavailable)."""
    if not err or "unavailable" in err:
        return 0.0
    v = err[key]
    return DEEP_K * np.asarray(v, np.float64) if isinstance(v, list) else DEEP_K * float(v)


def _compare_deep_call(chunk, case, i, c, rc, gres, o):
    """A deep call: output at the sampled positions, per-channel summaries, weights.

    Each array passes within the dtype's tolerance or within ``DEEP_K`` times TF's own
    error against the float64 recomputation, whichever is larger.
    """
    P = []
    ydt = c["y_dtype"]
    err = c.get("tf_error")
    what = f"call {i} (training={c['training']})"
    if rc["y_dtype"] != ydt:
        P.append(f"call {i}: output dtype {rc['y_dtype']} != TF {ydt}")
    if "namespace" in rc and rc["namespace"] != rc.get("input_namespace"):
        P.append(f"call {i}: output namespace {rc['namespace']} != input namespace {rc.get('input_namespace')}")
    y = np.asarray(rc["y"])
    if list(rc.get("y_shape", y.shape)) != list(c["y_shape"]):
        P.append(f"call {i}: output shape {rc.get('y_shape')} != TF {c['y_shape']}")
        return P
    if c.get("y_sample") is not None:
        sp = c["y_sample"]["positions"]
        pos = deep.sample_positions(y.size, sp["n"], sp["seed"])
        p = compare_arrays(y.reshape(-1)[pos], golden_values(chunk, case, c["y_sample"]), ydt,
                           f"{what} output (sampled)", o, floor=_deep_floor(err, "y"))
        if p:
            P.append(p)
    p = compare_arrays(deep.channel_summary(y, deep.axes_of(case)), chunk.arr(c["y_summary"]), ydt,
                       f"{what} output per-channel [mean, std]", o, floor=_deep_floor(err, "y_summary"))
    if p:
        P.append(p)
    ref_w = chunk.arr(c["weights"])
    got_w = np.asarray(rc["weights"])
    if got_w.shape != ref_w.shape:
        P.append(f"call {i}: weights shape {list(got_w.shape)} != TF {list(ref_w.shape)}")
    else:
        p = compare_arrays(got_w, ref_w, gres["weight_dtypes"][0], what, o, rows=gres["weight_names"],
                           floor=_deep_floor(err, "weights"))
        if p:
            P.append(p)
    return P


def _compare_losses(got: list, got_dtypes: list, ref: list, ref_dtypes: list, what: str) -> list:
    """Problems of ``layer.losses`` against TF's: count, dtype, value (NaN and inf positions exactly)."""
    if len(got) != len(ref):
        return [f"{what}: {len(got)} values, TF has {len(ref)}"]
    P = []
    for i, (a, b) in enumerate(zip(got, ref)):
        if i < len(ref_dtypes) and i < len(got_dtypes) and got_dtypes[i] != ref_dtypes[i]:
            P.append(f"{what}[{i}]: dtype {got_dtypes[i]} != TF {ref_dtypes[i]}")
        if b is None:
            continue
        tol = LOSS_TOL_HALF if i < len(ref_dtypes) and ref_dtypes[i] == "float16" else LOSS_TOL
        if math.isnan(b) or math.isinf(b) or math.isnan(a) or math.isinf(a):
            same = (math.isnan(a) and math.isnan(b)) or a == b
        else:
            same = abs(a - b) <= tol["atol"] + tol["rtol"] * abs(b)
        if not same:
            P.append(f"{what}[{i}]: {a!r} != TF {b!r}")
    return P


def _cfg_equal(a, b, path=""):
    if isinstance(a, dict) and isinstance(b, dict):
        ka, kb = set(a), set(b)
        if ka != kb:
            return f"config{path}: keys differ: missing {sorted(kb - ka)}, extra {sorted(ka - kb)}"
        for k in sorted(ka):
            p = _cfg_equal(a[k], b[k], f"{path}.{k}")
            if p:
                return p
        return None
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return f"config{path}: {list(a)!r} != {list(b)!r}"
        for i, (x, y) in enumerate(zip(a, b)):
            p = _cfg_equal(x, y, f"{path}[{i}]")
            if p:
                return p
        return None
    if isinstance(a, bool) or isinstance(b, bool) or a is None or b is None or isinstance(a, str) or isinstance(b, str):
        return None if (a == b and type(a) is type(b)) else f"config{path}: {a!r} != {b!r}"
    if isinstance(a, (int, float, np.number)) and isinstance(b, (int, float, np.number)):
        if math.isclose(float(a), float(b), rel_tol=CONFIG_FLOAT_RTOL, abs_tol=0.0):
            return None
        return f"config{path}: {a!r} != {b!r}"
    return None if a == b else f"config{path}: {a!r} != {b!r}"


def _normalize_config(cfg):
    cfg = json.loads(json.dumps(cfg, default=lambda o: o.tolist() if hasattr(o, "tolist") else repr(o)))
    cfg.pop("name", None)
    return cfg


def expected_output_dtype(case):
    pol = case["init_kwargs"].get("dtype")
    if isinstance(pol, dict):
        pol = pol.get("config", {}).get("name")
    return {None: "float32", "float32": "float32", "float64": "float64", "float16": "float16",
            "mixed_float16": "float16", "bfloat16": "bfloat16", "mixed_bfloat16": "bfloat16"}.get(pol, "float32")


def _type_ok(expected, got):
    return expected == got["type"] or expected in got.get("mro", [])


def _unsupported_feature(message):
    """``"renorm: torch has no batch renormalization"`` -> ``"renorm"``; the whole (short) message otherwise."""
    msg = (message or "").strip()
    head, sep, _ = msg.partition(": ")
    if sep and head and len(head) <= 40 and "\n" not in head:
        return head.strip()
    return msg[:60] or "unspecified"


def is_not_implemented(err):
    return err is not None and (err.get("type") == "NotImplementedError"
                                or "NotImplementedError" in (err.get("mro") or []))


def compare_case(chunk, case, res, numerics_only=False):
    """Compare one result with its golden record; return an :class:`Outcome`.

    ``numerics_only``: skip the Keras API checks (fused flag, weight names, trainable, config).
    An implementation that raises ``NotImplementedError`` (or an external program that answers
    ``"unsupported"``) gets the status ``unsupported``.
    """
    o = Outcome(case["id"], chunk.group, case["dims"], "pass", case["status"])
    o.tags = _tags(case)
    P = o.problems
    if res.get("crash"):
        o.status = "fail"
        P.append(res["crash"])
        return o
    if res.get("unsupported") or is_not_implemented(res.get("error")):
        msg = res.get("unsupported") or res["error"].get("message", "")
        if not isinstance(msg, str):
            msg = "unspecified"
        o.status = "unsupported"
        o.feature = _unsupported_feature(msg)
        P.append(f"unsupported: {msg[:300]}")
        return o
    A = o.api_problems
    gerr = case["error"]
    defect = case["status"] == "tf_defect"
    rerr = res.get("error")
    # ---- errors ----------------------------------------------------------------
    if case["status"] == "error":
        exp_type = ERROR_MAP.get(gerr["tf_type"], gerr["expected_type"])
        if rerr is None:
            P.append(f"expected {exp_type} at {gerr['stage']}"
                     + (f" (call {gerr['call_index']})" if gerr["call_index"] is not None else "")
                     + f" [TF: {gerr['tf_type']}: {gerr['message'][:160]}], but nothing was raised")
        else:
            if not _type_ok(exp_type, rerr):
                P.append(f"expected {exp_type}, got {rerr['type']}: {rerr['message'][:200]}")
            if rerr["stage"] != gerr["stage"] or rerr.get("call_index") != gerr.get("call_index"):
                P.append(f"error raised at stage {rerr['stage']} (call {rerr.get('call_index')}), "
                         f"TF raised at {gerr['stage']} (call {gerr.get('call_index')})")
    elif defect and rerr is not None and case.get("allow_reject") and rerr["stage"] in ("init", "build") \
            and ("ValueError" in rerr.get("mro", [rerr["type"]]) or "TypeError" in rerr.get("mro", [rerr["type"]])):
        pass  # rejecting a configuration TF cannot run is allowed for these cases
    elif defect and rerr is not None and case.get("error_without_defect"):
        ewd = case["error_without_defect"]
        exp_type = ERROR_MAP.get(ewd["tf_type"], ewd["expected_type"])
        if not _type_ok(exp_type, rerr) or rerr["stage"] != ewd["stage"] \
                or rerr.get("call_index") != ewd.get("call_index"):
            P.append(f"TF defect case: TF under the default policy raises {exp_type} at {ewd['stage']} "
                     f"(call {ewd.get('call_index')}); got {rerr['type']} at {rerr['stage']} "
                     f"(call {rerr.get('call_index')}): {rerr['message'][:200]}")
    elif rerr is not None:
        P.append(f"unexpected {rerr['type']} at {rerr['stage']}"
                 + (f" (call {rerr['call_index']})" if rerr.get("call_index") is not None else "")
                 + f": {rerr['message'][:300]}")
    # stage reached by TF
    tf_stage = gerr["stage"] if gerr else None
    # ---- resolved attributes ------------------------------------------------------
    gres = case.get("resolved") or {}
    reached = rerr is None or rerr.get("stage") not in ("init", "build", "set_weights", "resolve", "exec")
    if "weight_names" in gres and reached and not (defect and tf_stage in ("init", "build", "set_weights")):
        if not numerics_only:
            if "fused" not in res:
                A.append("fused: not reported")
            elif res["fused"] != gres["fused"]:
                A.append(f"fused: {res['fused']!r} != TF {gres['fused']!r}")
            for k in ("weight_names", "trainable_weight_names", "non_trainable_weight_names"):
                if k not in res:
                    A.append(f"{k}: not reported")
                elif list(res[k]) != gres[k]:
                    A.append(f"{k}: {res.get(k)} != TF {gres[k]}")
            if res.get("layer_trainable") != gres["layer_trainable"]:
                A.append(f"trainable: {res.get('layer_trainable')} != TF {gres['layer_trainable']}")
            p = _cfg_equal(_normalize_config(res.get("config", {})), _normalize_config(gres["config"]))
            if p:
                A.append(p)
            rt = res.get("config_roundtrip")
            if rt is not None:
                p = _cfg_equal(_normalize_config(rt), _normalize_config(gres["config"]))
                if p:
                    A.append("from_config round trip: " + p)
            wns = res.get("weight_namespaces") or []
            ins = {rc.get("input_namespace") for rc in res.get("calls", []) if rc.get("input_namespace")}
            if ins and any(n not in ins for n in wns):
                A.append(f"weights live in {wns}, inputs in {sorted(ins)}")
        if "losses" in res or gres["losses"]:  # regularization values are numerics
            P.extend(_compare_losses(res.get("losses", []), res.get("loss_dtypes", []), gres["losses"],
                                 gres["loss_dtypes"], "losses"))
        wb = case.get("weights_after_build")
        if wb is not None and res.get("weights_after_build") is not None:
            ref = chunk.arr(wb)
            got = res["weights_after_build"]
            if len(got) != len(ref):
                P.append(f"weights after build: {len(got)} arrays, TF has {len(ref)}")
            else:
                for j, (g, r) in enumerate(zip(got, ref)):
                    p = compare_arrays(g, r, gres["weight_dtypes"][j], f"weights_after_build[{gres['weight_names'][j]}]", o)
                    if p:
                        P.append(p)
        elif case.get("random_initializer") and res.get("weights_after_build") is not None:
            shapes = [list(np.shape(w)) for w in res["weights_after_build"]]
            if shapes != gres["weight_shapes"]:
                P.append(f"weight shapes after build {shapes} != TF {gres['weight_shapes']}")
    # ---- calls -------------------------------------------------------------------
    for i, c in enumerate(case["calls"]):
        if i >= len(res.get("calls", [])):
            break
        rc = res["calls"][i]
        if "y_summary" in c:
            P.extend(_compare_deep_call(chunk, case, i, c, rc, gres, o))
            continue
        if "y" not in c:
            # TF raised here (error or defect): only sanity-check a defect
            if defect:
                exp = expected_output_dtype(case)
                if rc["y_dtype"] != exp:
                    P.append(f"call {i}: output dtype {rc['y_dtype']} != {exp} (TF defect case)")
                if list(np.shape(rc["y"])) != list(case["input_shape"]) and "shape" not in c:
                    P.append(f"call {i}: output shape {list(np.shape(rc['y']))} (TF defect case)")
                if not np.all(np.isfinite(np.asarray(rc["y"], np.float64))):
                    P.append(f"call {i}: non-finite output (TF defect case)")
                if not np.all(np.isfinite(np.asarray(rc["weights"], np.float64))):
                    P.append(f"call {i}: non-finite weights (TF defect case)")
            continue
        ydt = c["y_dtype"]
        if rc["y_dtype"] != ydt:
            P.append(f"call {i}: output dtype {rc['y_dtype']} != TF {ydt}")
        if "namespace" in rc and rc["namespace"] != rc.get("input_namespace"):
            P.append(f"call {i}: output namespace {rc['namespace']} != input namespace {rc.get('input_namespace')}")
        ref_y = golden_values(chunk, case, c["y"])
        if list(rc.get("y_shape", np.shape(rc["y"]))) != list(ref_y.shape):
            P.append(f"call {i}: output shape {rc.get('y_shape')} != TF {list(ref_y.shape)}")
        else:
            p = compare_arrays(rc["y"], ref_y, ydt, f"call {i} (training={c['training']}) output", o)
            if p:
                P.append(p)
        if "losses" in c:
            P.extend(_compare_losses(rc.get("losses", []), rc.get("loss_dtypes", []), c["losses"], c["loss_dtypes"],
                                     f"call {i}: losses"))
        ref_w = chunk.arr(c["weights"])
        got_w = np.asarray(rc["weights"])
        if got_w.shape != ref_w.shape:
            P.append(f"call {i}: weights shape {list(got_w.shape)} != TF {list(ref_w.shape)}")
        else:
            p = compare_arrays(got_w, ref_w, gres["weight_dtypes"][0], f"call {i} (training={c['training']})", o,
                               rows=gres["weight_names"])
            if p:
                P.append(p)
    st = case.get("step")
    if st is not None and res.get("step") is not None:
        rs = res["step"]
        ref_y = golden_values(chunk, case, st["y"])
        p = compare_arrays(rs["y"], ref_y, st["y_dtype"], "step output", o)
        if p:
            P.append(p)
        if rs["y_dtype"] != st["y_dtype"]:
            P.append(f"step: output dtype {rs['y_dtype']} != TF {st['y_dtype']}")
        if not (defect and tf_stage == "step"):
            ref_w = chunk.arr(st["weights_after"])
            got_w = np.asarray(rs["weights_after"])
            if got_w.shape != ref_w.shape:
                P.append(f"step: weights shape {list(got_w.shape)} != TF {list(ref_w.shape)}")
            else:
                p = compare_arrays(got_w, ref_w, gres["weight_dtypes"][0], "step weights (after constraint)", o,
                                   rows=gres["weight_names"])
                if p:
                    P.append(p)
        elif not np.all(np.isfinite(np.asarray(rs["weights_after"], np.float64))):
            P.append("step: non-finite weights (TF defect case)")
    elif st is not None and rerr is None and case["status"] == "ok":
        P.append("step: no result")
    if P:
        o.status = "fail"
    elif A:
        o.status = "api_fail"
    else:
        o.status = "tf_defect" if defect else "pass"
    return o


def _tags(case):
    from .cases import behaviours

    return behaviours(case)


# --------------------------------------------------------------------------- #
# Expected failures and capability declarations
# --------------------------------------------------------------------------- #

@dataclass
class XFail:
    """One expected-failure entry: a regex on case ids, or a TF behaviour tag, and a reason."""
    reason: str
    pattern: re.Pattern | None = None
    behaviour: str | None = None
    where: str = ""

    def matches(self, case_id, tags):
        if self.pattern is not None and not self.pattern.search(case_id):
            return False
        return not (self.behaviour is not None and self.behaviour not in tags)


class XFailFileError(ValueError):
    """A malformed or missing expected-failure / capability file."""


def _read_structured(path):
    """JSON (``.json``) or TOML (``.toml``) document; None for other suffixes."""
    if path.endswith(".json"):
        with open(path) as f:
            try:
                return json.load(f)
            except json.JSONDecodeError as e:
                raise XFailFileError(f"{path}: invalid JSON: {e}") from None
    if path.endswith(".toml"):
        try:
            import tomllib
        except ImportError:  # Python 3.10
            import tomli as tomllib
        with open(path, "rb") as f:
            try:
                return tomllib.load(f)
            except tomllib.TOMLDecodeError as e:
                raise XFailFileError(f"{path}: invalid TOML: {e}") from None
    return None


def _xfail_entry(d, where):
    if not isinstance(d, dict):
        raise XFailFileError(f"{where}: an entry must be a table/object, got {d!r}")
    unknown = set(d) - {"pattern", "behaviour", "reason"}
    if unknown:
        raise XFailFileError(f"{where}: unknown keys {sorted(unknown)} (use pattern, behaviour, reason)")
    if "pattern" not in d and "behaviour" not in d:
        raise XFailFileError(f"{where}: an entry needs 'pattern' (regex on case ids) or 'behaviour' (a tag)")
    pat = None
    if "pattern" in d:
        try:
            pat = re.compile(d["pattern"])
        except (re.error, TypeError) as e:
            raise XFailFileError(f"{where}: bad regex {d['pattern']!r}: {e}") from None
    return XFail(str(d.get("reason") or "no reason given"), pat, d.get("behaviour"), where)


def load_xfails(path):
    """Expected failures from ``path`` (docs/conformance.md, "Expected failures").

    * ``.json``: ``[{"pattern": REGEX, "reason": ...}, {"behaviour": TAG, "reason": ...}]`` or
      ``{"xfail": [...]}``;
    * ``.toml``: ``[[xfail]]`` tables with the same keys;
    * anything else, one entry per line: ``REGEX`` or ``REGEX | REASON`` (split at the first
      `` | `` with a space on each side, so ``renorm=(on|clip)`` is one regex), or
      ``behaviour:TAG | REASON``; blank lines and lines starting with ``#`` are skipped.

    No path (None or ``""``): no expected failures. A missing file or a bad regex raises
    :class:`XFailFileError` naming the file and line.
    """
    if not path:
        return []
    if not os.path.isfile(path):
        raise XFailFileError(f"expected-failure file not found: {path}")
    doc = _read_structured(path)
    if doc is not None:
        entries = doc.get("xfail", doc.get("xfails")) if isinstance(doc, dict) else doc
        if not isinstance(entries, list):
            raise XFailFileError(f"{path}: expected a list of entries (or a top-level 'xfail' list)")
        return [_xfail_entry(d, f"{path}: entry {i}") for i, d in enumerate(entries)]
    out = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            pat, _, reason = line.partition(" | ")
            pat = pat.strip()
            if pat.startswith("behaviour:"):
                out.append(_xfail_entry({"behaviour": pat[len("behaviour:"):].strip(), "reason": reason.strip()},
                                        f"{path}:{n}"))
            else:
                out.append(_xfail_entry({"pattern": pat, "reason": reason.strip()}, f"{path}:{n}"))
    return out


def load_capabilities(spec):
    """Features an implementation declares up front that it does not support.

    ``spec``: None, a dict ``{"unsupported": {TAG: reason}}`` (or just ``{TAG: reason}``), or the path
    of such a JSON/TOML file. TAG is a behaviour tag (``conformance.cases.BEHAVIOURS``, or
    ``error:Type@stage``). Returns ``{TAG: reason}``.
    """
    if spec is None:
        return {}
    if isinstance(spec, str):
        if not os.path.isfile(spec):
            raise XFailFileError(f"capability file not found: {spec}")
        doc = _read_structured(spec)
        if doc is None:
            raise XFailFileError(f"{spec}: a capability file is .json or .toml")
        spec = doc
    if not isinstance(spec, dict):
        raise XFailFileError(f"capabilities must be a mapping, got {type(spec).__name__}")
    un = spec.get("unsupported", spec)
    if not isinstance(un, dict):
        raise XFailFileError("'unsupported' must map behaviour tags to reasons")
    return {str(k): str(v) for k, v in un.items()}


# --------------------------------------------------------------------------- #
# Main entry point
# --------------------------------------------------------------------------- #

@dataclass
class Summary:
    backend: str
    impl: str
    outcomes: list
    elapsed: float
    report_dir: str | None = None
    interrupted: bool = False
    total: int = 0                    # cases selected (more than len(outcomes) after an interruption)
    numerics_only: bool = False

    def count(self, status):
        return sum(o.status == status for o in self.outcomes)

    def counts(self):
        c = {s: 0 for s in STATUSES}
        for o in self.outcomes:
            c[o.status] = c.get(o.status, 0) + 1
        return c

    def summary_line(self):
        """One line: every status with its count; the counts add up to the number of cases."""
        c = self.counts()
        head = f"{self.impl} on {self.backend}: {len(self.outcomes)} cases in {self.elapsed:.1f}s"
        if self.interrupted:
            head += f" (interrupted: {len(self.outcomes)} of {self.total} run)"
        return head + " -- " + ", ".join(f"{k} {c[k]}" for k in STATUSES)

    def unsupported_by_feature(self):
        from collections import Counter

        return Counter(o.feature for o in self.outcomes if o.status == "unsupported").most_common()

    @property
    def failures(self):
        return [o for o in self.outcomes if o.status in FAILING]

    @property
    def exit_code(self):
        return 1 if self.failures or self.interrupted else 0

    def failure_text(self, limit=50):
        lines = []
        for o in self.failures[:limit]:
            lines.append(f"{o.id}\n    " + "\n    ".join((o.problems + o.api_problems)[:4]))
        if len(self.failures) > limit:
            lines.append(f"... and {len(self.failures) - limit} more")
        return "\n".join(lines)


@contextlib.contextmanager
def _logging_quiet():
    """Drop log records up to WARNING while a case runs."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


class ExecFailure(RuntimeError):
    """The external program crashed, timed out or wrote no readable response."""


def _run_exec_items(exec_cmd, backend_name, batch, workdir, timeout, finish):
    """Run ``batch`` through the external program; on a crash split it in halves until the
    crashing cases are alone, and record those as failed (the others run normally)."""
    try:
        results = run_exec_batch(exec_cmd, backend_name, batch, workdir, timeout=timeout)
    except ExecFailure as e:
        shutil.rmtree(workdir, ignore_errors=True)
        if len(batch) == 1:
            chunk, case = batch[0]
            finish(chunk, case, {"crash": f"external program failed on this case alone: {e}", "calls": [],
                                 "error": None, "step": None})
            return
        h = len(batch) // 2
        _run_exec_items(exec_cmd, backend_name, batch[:h], workdir + "a", timeout, finish)
        _run_exec_items(exec_cmd, backend_name, batch[h:], workdir + "b", timeout, finish)
        return
    for chunk, case in batch:
        finish(chunk, case, results[case["id"]])
    shutil.rmtree(workdir, ignore_errors=True)


def run(backend=None, xp=None, device=None, impl=None, factory=None, exec_cmd=None, include=None, exclude=None,
        goldens=DEFAULT_GOLDENS, xfails=DEFAULT_XFAILS, report_dir=None, progress=True, exec_batch=400,
        stride=1, numerics_only=False, capabilities=None, exec_timeout=None):
    """Run the conformance set; return a :class:`Summary`.

    ``capabilities``: behaviour tags the implementation declares unsupported (see
    `load_capabilities`; a factory may also carry them as its ``unsupported`` attribute); those
    cases are not run and count as ``unsupported``. ``numerics_only`` skips the Keras API checks.
    With ``exec_cmd`` no array library is used: ``backend`` is only passed on to the program.
    A KeyboardInterrupt stops the run and the summary (and report) covers the cases run so far.
    """
    t0 = time.time()
    if exec_cmd is not None:
        be = Backend(backend or "exec", None)
    else:
        be = get_backend(backend or (None if xp is not None else "numpy"), xp, device)
    if exec_cmd is None and factory is None:
        factory = load_factory(impl)
    impl_name = exec_cmd and f"exec: {exec_cmd}" or impl or getattr(factory, "__qualname__", "arraybn")
    if impl is None and exec_cmd is None and factory is not None and getattr(factory, "__name__", "") == "<lambda>":
        impl_name = "arraybn.BatchNormalization"
    xf = load_xfails(xfails)
    declared = load_capabilities(capabilities)
    if factory is not None and getattr(factory, "unsupported", None):
        declared = {**load_capabilities(factory.unsupported), **declared}
    items = list(iter_cases(goldens, include, exclude, stride))
    outcomes = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(items), unit="case", desc=f"{be.name}", file=sys.stderr)

    def missing_dtypes(case):
        if exec_cmd is not None:
            return []  # arrays travel as NumPy data (bfloat16 as uint16 bits)
        pol = json.dumps(case["init_kwargs"].get("dtype"))
        need = {case["input_dtype"]}
        for d in ("bfloat16", "float16"):
            if d in pol:
                need.add(d)
        return sorted(need & be.unsupported)

    def add(o):
        outcomes.append(o)
        if bar:
            bar.update(1)

    def finish(chunk, case, res):
        o = compare_case(chunk, case, res, numerics_only=numerics_only)
        if o.status != "unsupported":
            for x in xf:
                if x.matches(case["id"], o.tags):
                    o.xfail_reason = x.reason
                    o.status = "xfail" if o.status in FAILING else "xpass"
                    break
        add(o)

    interrupted = False
    try:
        runnable = []
        for chunk, case in items:
            miss = missing_dtypes(case)
            tags = _tags(case)
            decl = next((t for t in tags if t in declared), None)
            if miss or decl:
                o = Outcome(case["id"], chunk.group, case["dims"], "skip", case["status"],
                            [f"{be.name} has no {', '.join(miss)}"], tags=tags)
                if decl and not miss:
                    o.status, o.feature, o.problems = "unsupported", decl, [f"declared unsupported: {declared[decl]}"]
                add(o)
                continue
            runnable.append((chunk, case))
        if exec_cmd is None:
            for chunk, case in runnable:
                # TensorFlow warns in some cases (a mask on the fused path) and computes NaN
                # silently in others; a port doing the same must not fail because the caller
                # (pytest with filterwarnings=error, say) turns warnings into errors.
                # Log records too (TF logs that an adjustment cannot be serialized; so may a port).
                with warnings.catch_warnings(), _logging_quiet():
                    warnings.simplefilter("ignore")
                    try:
                        res = drive_case(factory, be, chunk, case)
                    except Exception as e:  # noqa: BLE001 - the runner itself must survive
                        res = {"error": _err("runner", e), "calls": [], "step": None}
                finish(chunk, case, res)
        else:
            tmp = tempfile.mkdtemp(prefix="conformance-exec-")
            try:
                for s in range(0, len(runnable), exec_batch):
                    batch = runnable[s:s + exec_batch]
                    wd = os.path.join(tmp, f"batch{s // exec_batch:04d}")
                    _run_exec_items(exec_cmd, be.name, batch, wd, exec_timeout, finish)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    except KeyboardInterrupt:
        interrupted = True
    if bar:
        bar.close()
    summary = Summary(be.name, impl_name, outcomes, time.time() - t0, interrupted=interrupted, total=len(items),
                      numerics_only=numerics_only)
    if report_dir:
        from .report import write_report

        write_report(summary, report_dir)
        summary.report_dir = report_dir
    return summary


def show_case(case_id, goldens=DEFAULT_GOLDENS):
    for chunk, case in iter_cases(goldens, include="^" + re.escape(case_id) + "$"):
        out = json.loads(json.dumps(case))
        out["array_values"] = {k: chunk.npz[k].tolist() for k in case["arrays"]}
        return out
    return None
