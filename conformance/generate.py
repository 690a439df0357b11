"""Generate the conformance goldens with TensorFlow (tf-keras v1 layer).

Usage::

    pip install -r conformance/requirements-golden.txt
    python -m conformance.generate [--out conformance/goldens] [--jobs 2]
                                   [--only REGEX] [--force]

Writes one ``<chunk>.json`` + ``<chunk>.npz`` pair per chunk of a group (a
group is split into chunks of at most ``CHUNK`` cases) and ``manifest.json``.
A chunk whose JSON already exists with the same definition hash is skipped,
so an interrupted run resumes where it stopped.  Output is deterministic:
rerunning produces byte-identical files (fixed zip timestamps, sorted JSON,
no wall-clock data anywhere).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import multiprocessing as mp
import os
import platform
import re
import sys
import warnings
import zipfile

import numpy as np

from . import FORMAT_VERSION, read_json
from . import adjustments
from .cases import group_hash, groups

CHUNK = 500
GENERATOR_REVISION = 2  # bump when the recording logic changes
# (per-call ``losses`` are recorded only for layers with an activity_regularizer: no chunk but
# ``activity`` has one, so the other chunks are what this revision writes and were kept)
ZIP_DATE = (1980, 1, 1, 0, 0, 0)

# Error messages from TensorFlow's own internals that reveal a dtype mismatch
# inside the layer (not a user error): recorded as ``tf_defect``.
DEFECT_PATTERNS = [
    r"expected to be a \w+ tensor but is a \w+ tensor",
    r"Tensor conversion requested dtype \w+ for Tensor with dtype \w+",
    r"cannot compute \w+ as input #\d+",
]

# --------------------------------------------------------------------------- #
# TensorFlow setup (only in worker processes)
# --------------------------------------------------------------------------- #

def _setup_tf():
    os.environ["TF_USE_LEGACY_KERAS"] = "1"
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    os.environ["TF_DETERMINISTIC_OPS"] = "1"
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    import tensorflow as tf

    try:
        tf.config.threading.set_inter_op_parallelism_threads(1)
        tf.config.threading.set_intra_op_parallelism_threads(1)
    except RuntimeError:  # already initialised
        pass
    tf.get_logger().setLevel("ERROR")
    BN = tf.compat.v1.keras.layers.BatchNormalization
    mod = BN.__module__
    assert mod.startswith("tf_keras") and mod.endswith("batch_normalization_v1"), (
        f"expected the tf-keras v1 layer, got {mod}.{BN.__qualname__}; "
        "set TF_USE_LEGACY_KERAS=1 and install tf-keras")
    return tf, BN


# --------------------------------------------------------------------------- #
# Helpers
# --------------------------------------------------------------------------- #

def jsonable(obj):
    """Convert TF config objects (ListWrapper, DictWrapper, numpy) to JSON."""
    from collections.abc import Mapping, Sequence

    if isinstance(obj, (str, bool)) or obj is None:
        return obj
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        if f != f or f in (float("inf"), float("-inf")):
            return repr(f)
        return f
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, Sequence):
        return [jsonable(v) for v in obj]
    if hasattr(obj, "get_config"):
        return {"class_name": type(obj).__name__, "config": jsonable(obj.get_config())}
    return repr(obj)


def short_name(var):
    name = var.name
    name = name.split("/")[-1]
    return name.split(":")[0]


def dtype_name(dt):
    return dt.name if hasattr(dt, "name") else str(np.dtype(dt))


class NpzWriter:
    """Collects arrays; writes a deterministic .npz (no pickle, fixed dates)."""

    def __init__(self):
        self.arrays = {}
        self.meta = {}

    def add(self, key, arr, dtype=None):
        arr = np.ascontiguousarray(arr)
        assert key not in self.arrays, key
        self.arrays[key] = arr
        self.meta[key] = {"dtype": dtype or str(arr.dtype), "shape": list(arr.shape)}
        return key

    def write(self, path):
        write_npz(path, self.arrays)


def write_npz(path, arrays):
    """A byte-reproducible ``.npz``: sorted keys, fixed timestamps and attributes, no pickle."""
    tmp = path + ".part"
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for key in sorted(arrays):
            buf = io.BytesIO()
            np.lib.format.write_array(buf, arrays[key], version=(1, 0), allow_pickle=False)
            info = zipfile.ZipInfo(key + ".npy", date_time=ZIP_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            info.create_system = 3
            zf.writestr(info, buf.getvalue(), compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- #
# Array generation (pure NumPy, seeded per case)
# --------------------------------------------------------------------------- #

def _to_store(x64, dtype):
    """float64 values -> (stored numpy array, dtype tag).  bf16 -> uint16 bits."""
    if dtype == "bfloat16":
        f32 = np.asarray(x64, np.float32)
        bits = f32.view(np.uint32)
        # round to nearest even
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
        return rounded, "bfloat16"
    return np.asarray(x64, dtype), dtype


def make_input(rng, shape, dtype, magnitude):
    shape = tuple(shape)
    if magnitude != 1.0:
        k = rng.integers(-255, 256, size=shape)
        x = magnitude * (k / 256.0)
    else:
        k = rng.integers(-150, 151, size=shape)
        off = rng.integers(-100, 101, size=shape[-1:] if shape else ())
        x = (k + off) / 32.0
    return _to_store(x, dtype)


def make_mask(rng, shape, kind):
    shape = tuple(shape)
    if kind == "all":
        return np.zeros(shape[:-1], bool)
    if kind == "wrong_shape":
        return rng.random((shape[0], 5)) < 0.6
    m = rng.random(shape[:-1]) < 0.6
    m[:2] = True            # at least two samples reach every channel
    m.reshape(-1)[-1] = False  # and at least one position is masked out
    return m


WEIGHT_GRIDS = {
    # name: (low, high, denominator, exclude |k| < this)
    "gamma": (-96, 96, 64, 16),
    "beta": (-64, 64, 32, 0),
    "moving_mean": (-64, 64, 32, 0),
    "moving_variance": (16, 256, 64, 0),
    "moving_stddev": (32, 128, 64, 0),
    "renorm_mean": (-32, 32, 32, 0),
    "renorm_stddev": (32, 128, 64, 0),
}


def make_weights(rng, names, shapes, dtypes):
    out = []
    for n, s, d in zip(names, shapes, dtypes):
        lo, hi, den, excl = WEIGHT_GRIDS.get(n, (-64, 64, 32, 0))
        k = rng.integers(lo, hi + 1, size=s)
        if excl:
            k = np.where(np.abs(k) < excl, np.sign(k + 0.5) * excl, k)
        out.append(np.asarray(k / den, d))
    return out


# --------------------------------------------------------------------------- #
# Running one case
# --------------------------------------------------------------------------- #

def classify(tf, exc):
    tf_type = type(exc).__name__
    msg = str(exc)
    msg = re.sub(r"batch_normalization(_\d+)?", "batch_normalization", msg)
    msg = msg[:1500]
    if any(re.search(p, msg) for p in DEFECT_PATTERNS):
        status = "tf_defect"
    else:
        status = "error"
    if isinstance(exc, tf.errors.OpError):
        expected = "ValueError"
    elif isinstance(exc, (ValueError, TypeError, KeyError, AttributeError, NotImplementedError)):
        expected = tf_type
    else:
        expected = tf_type
    return status, {"tf_type": tf_type, "expected_type": expected, "message": msg}


def run_case(tf, BN, case, idx, npz):
    if case.get("deep"):
        from .generate_deep import run_deep_case

        return run_deep_case(tf, BN, case, idx, npz)
    tf.keras.backend.clear_session()
    rng = np.random.default_rng(case["seed"])
    p = f"{idx:04d}."
    rec = {k: case[k] for k in ("id", "dims", "init_kwargs", "input_shape", "input_dtype", "weights",
                                "random_initializer", "magnitude")}
    if case.get("allow_reject"):
        rec["allow_reject"] = True
    rec.update(status="ok", error=None, resolved=None, calls=[], initial_weights=None,
               weights_after_build=None, step=None, warnings=[])
    in_dtype = case["input_dtype"]

    # ---- inputs -----------------------------------------------------------
    call_shapes = [tuple(c.get("shape", case["input_shape"])) for c in case["calls"]]
    xs, ms = [], []
    for c, shp in zip(case["calls"], call_shapes):
        xs.append(make_input(rng, shp, in_dtype, case["magnitude"]))
    for c, shp in zip(case["calls"], call_shapes):
        ms.append(make_mask(rng, shp, c["mask"]) if c["mask"] else None)
    uniform = len(set(call_shapes)) <= 1
    x_keys = []
    if xs:
        if uniform:
            key = npz.add(p + "x", np.stack([a for a, _ in xs]), xs[0][1])
            x_keys = [{"key": key, "index": i} for i in range(len(xs))]
        else:
            x_keys = [{"key": npz.add(p + f"x{i}", a, t), "index": None} for i, (a, t) in enumerate(xs)]
    m_keys = [None] * len(ms)
    present = [i for i, m in enumerate(ms) if m is not None]
    if present:
        mshapes = {ms[i].shape for i in present}
        if len(mshapes) == 1:
            key = npz.add(p + "m", np.stack([ms[i] for i in present]))
            for j, i in enumerate(present):
                m_keys[i] = {"key": key, "index": j}
        else:
            for i in present:
                m_keys[i] = {"key": npz.add(p + f"m{i}", ms[i]), "index": None}

    def to_tf(arr, tag):
        if tag == "bfloat16":
            return tf.bitcast(tf.constant(arr, tf.uint16), tf.bfloat16)
        return tf.constant(arr)

    def from_tf(t):
        if t.dtype == tf.bfloat16:
            return tf.bitcast(t, tf.uint16).numpy(), "bfloat16"
        return t.numpy(), t.dtype.name

    def fail(stage, exc, call_index=None):
        status, info = classify(tf, exc)
        rec["status"] = status
        rec["error"] = dict(info, stage=stage, call_index=call_index)

    kwargs = adjustments.resolve(case["init_kwargs"], adjustments.tf_impl)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _run_stages(tf, BN, case, rec, kwargs, npz, p, rng, x_keys, m_keys, xs, ms, to_tf, from_tf, fail)
    seen = []
    for w in caught:
        s = f"{w.category.__name__}: {str(w.message)}"
        s = re.sub(r"batch_normalization(_\d+)?", "batch_normalization", s)
        if "tf_keras" in (w.filename or "") or "keras" in s.lower():
            if s not in seen:
                seen.append(s)
    rec["warnings"] = seen
    if rec["status"] == "tf_defect" and "dtype" in case["init_kwargs"]:
        # What would TF do with the same configuration under the default
        # policy?  If that raises (e.g. virtual_batch_size with a mask), a port
        # may raise the same error here instead of running.
        probe = json.loads(json.dumps(case))
        probe["init_kwargs"].pop("dtype")
        if probe["input_dtype"] == "bfloat16":
            probe["input_dtype"] = "float32"
        probe.pop("allow_reject", None)
        pr = run_case(tf, BN, probe, idx, NpzWriter())
        if pr["status"] == "error":
            rec["error_without_defect"] = pr["error"]
    return rec


def _run_stages(tf, BN, case, rec, kwargs, npz, p, rng, x_keys, m_keys, xs, ms, to_tf, from_tf, fail):
    # ---- construction ---------------------------------------------------------
    try:
        layer = BN(**kwargs)
    except Exception as e:  # noqa: BLE001 - we record whatever TF raises
        fail("init", e)
        return
    fused_after_init = layer.fused
    # ---- build ----------------------------------------------------------------
    try:
        layer.build(tuple(case["input_shape"]))
    except Exception as e:  # noqa: BLE001
        fail("build", e)
        rec["resolved"] = {"fused_after_init": jsonable(fused_after_init)}
        return
    names = [short_name(v) for v in layer.weights]
    wdt = [v.dtype.name for v in layer.weights]
    shapes = [tuple(v.shape) for v in layer.weights]
    build_w = [v.numpy() for v in layer.weights]
    if case["random_initializer"]:
        rec["weights_after_build"] = None
    else:
        rec["weights_after_build"] = {"key": npz.add(p + "wb", np.stack(build_w)), "index": None}
    # ---- set_weights --------------------------------------------------------------
    if case["weights"] != "init":
        init_w = make_weights(rng, names, shapes, wdt)
        if case["weights"] == "too_few":
            init_w = init_w[:-1]
        elif case["weights"] == "too_many":
            init_w = init_w + [init_w[-1]]
        elif case["weights"] == "wrong_shape":
            init_w = [np.concatenate([w, w]) for w in init_w]
        if case["weights"] == "random":
            rec["initial_weights"] = {"key": npz.add(p + "w0", np.stack(init_w)), "index": None}
        else:
            rec["initial_weights"] = [{"key": npz.add(p + f"w0_{i}", w), "index": None}
                                      for i, w in enumerate(init_w)]
        try:
            layer.set_weights(init_w)
        except Exception as e:  # noqa: BLE001
            fail("set_weights", e)
            return
    # ---- resolved attributes ----------------------------------------------------
    try:
        losses = [from_tf(tf.convert_to_tensor(l)) for l in layer.losses]
    except Exception as e:  # noqa: BLE001 - e.g. an unknown regularizer name is only noticed here
        fail("losses", e)
        rec["resolved"] = {"fused_after_init": jsonable(fused_after_init), "fused": jsonable(layer.fused)}
        return
    rec["resolved"] = {
        "fused_after_init": jsonable(fused_after_init),
        "fused": jsonable(layer.fused),
        "config": jsonable(layer.get_config()),
        "weight_names": names,
        "weight_dtypes": wdt,
        "weight_shapes": [list(s) for s in shapes],
        "weight_trainable": [bool(v.trainable) for v in layer.weights],
        "trainable_weight_names": [short_name(v) for v in layer.trainable_weights],
        "non_trainable_weight_names": [short_name(v) for v in layer.non_trainable_weights],
        "layer_trainable": bool(layer.trainable),
        "losses": [float(np.asarray(v, np.float64)) if t != "bfloat16" else None for v, t in losses],
        "loss_dtypes": [t for _, t in losses],
    }
    # ---- calls ----------------------------------------------------------------
    ys, ws, ytags, call_losses = [], [], [], []
    # a call changes layer.losses only through the activity regularizer (the output's penalty):
    # recorded after every call where the layer has one
    activity = case["init_kwargs"].get("activity_regularizer") is not None
    for i, c in enumerate(case["calls"]):
        x = to_tf(*xs[i])
        kw = {"training": c["training"]}
        if ms[i] is not None:
            kw["mask"] = tf.constant(ms[i])
        try:
            y = layer(x, **kw)
        except Exception as e:  # noqa: BLE001
            fail("call", e, i)
            break
        ya, yt = from_tf(y)
        ys.append(ya)
        ytags.append(yt)
        ws.append(np.stack([v.numpy() for v in layer.weights]))
        if activity:
            call_losses.append([from_tf(tf.convert_to_tensor(v)) for v in layer.losses])
    n_ok = len(ys)
    if n_ok:
        same = len({a.shape for a in ys}) == 1 and len(set(ytags)) == 1
        if same:
            ykey = npz.add(p + "y", np.stack(ys), ytags[0])
        wkey = npz.add(p + "w", np.stack(ws))
    for i, c in enumerate(case["calls"]):
        entry = {"training": c["training"], "x": x_keys[i], "mask": m_keys[i]}
        if i < n_ok:
            if same:
                entry["y"] = {"key": ykey, "index": i}
            else:
                entry["y"] = {"key": npz.add(p + f"y{i}", ys[i], ytags[i]), "index": None}
            entry["y_dtype"] = ytags[i]
            entry["weights"] = {"key": wkey, "index": i}
            if activity:
                entry["losses"] = [float(np.asarray(v, np.float64)) if t != "bfloat16" else None
                                   for v, t in call_losses[i]]
                entry["loss_dtypes"] = [t for _, t in call_losses[i]]
        rec["calls"].append(entry)
    # ---- one optimizer step (constraints) ------------------------------------------
    if case["step"] and rec["status"] == "ok":
        xa, xt = make_input(rng, case["input_shape"], case["input_dtype"], 1.0)
        x = to_tf(xa, xt)
        w_before = np.stack([v.numpy() for v in layer.weights])
        with tf.GradientTape() as tape:
            y = layer(x, training=True)
            dy_np = (rng.integers(-32, 33, size=tuple(y.shape)) / 16.0)
            dy = tf.constant(dy_np, y.dtype)
            loss = tf.reduce_sum(tf.cast(y * dy, tf.float64 if y.dtype == tf.float64 else tf.float32))
        tvars = layer.trainable_weights
        grads = tape.gradient(loss, tvars)
        opt = tf.keras.optimizers.SGD(learning_rate=case["step"]["learning_rate"])
        try:
            opt.apply_gradients(zip(grads, tvars))
        except Exception as e:  # noqa: BLE001
            fail("step", e)
        ya, yt = from_tf(y)
        dya, dyt = from_tf(dy)
        rec["step"] = {
            "learning_rate": case["step"]["learning_rate"],
            "training": True,
            "x": {"key": npz.add(p + "sx", xa, xt), "index": None},
            "dy": {"key": npz.add(p + "sdy", dya, dyt), "index": None},
            "y": {"key": npz.add(p + "sy", ya, yt), "index": None},
            "y_dtype": yt,
            "weights_before": {"key": npz.add(p + "sw0", w_before), "index": None},
            "grad_names": [short_name(v) for v in tvars],
            "grads": {"key": npz.add(p + "sg", np.stack([g.numpy() for g in grads])), "index": None}
            if tvars else None,
            "weights_after": {"key": npz.add(p + "sw1", np.stack([v.numpy() for v in layer.weights])),
                              "index": None},
        }


# --------------------------------------------------------------------------- #
# Chunks, workers, manifest
# --------------------------------------------------------------------------- #

def chunks():
    out = []
    for g in groups():
        cs = g["cases"]
        n = max(1, -(-len(cs) // CHUNK))
        for k in range(n):
            part = dict(g, cases=cs[k * CHUNK:(k + 1) * CHUNK])
            name = g["name"] if n == 1 else f"{g['name']}-{k:02d}"
            out.append((name, part))
    return out


def _chunk_hash(part):
    extra = f"rev{GENERATOR_REVISION}-fmt{FORMAT_VERSION}"
    if part.get("deep"):
        from .generate_deep import DEEP_REVISION

        extra += f"-deep{DEEP_REVISION}"
    return group_hash(part, extra=extra)


def _is_done(out, name, part):
    jp = os.path.join(out, name + ".json.gz")
    if not (os.path.exists(jp) and os.path.exists(os.path.join(out, name + ".npz"))):
        return False
    try:
        return read_json(jp).get("definition_hash") == _chunk_hash(part)
    except (OSError, ValueError):
        return False


def _write_json(path, obj):
    """Sorted, compact JSON; ``.json.gz`` paths are gzipped with mtime 0."""
    tmp = path + ".part"
    text = json.dumps(obj, sort_keys=True, indent=0, separators=(",", ":"), allow_nan=False) + "\n"
    if path.endswith(".gz"):
        with open(tmp, "wb") as raw:
            with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as f:
                f.write(text.encode())
    else:
        with open(tmp, "w") as f:
            f.write(text)
    os.replace(tmp, path)


def _worker(args):
    out, name, part, queue = args
    tf, BN = _setup_tf()
    npz = NpzWriter()
    records = []
    for i, case in enumerate(part["cases"]):
        records.append(run_case(tf, BN, case, i, npz))
        if queue is not None and (i % 10 == 9 or i == len(part["cases"]) - 1):
            queue.put(10 if i % 10 == 9 else (i % 10) + 1)
    # per-case array metadata
    by_case = {}
    for k, m in npz.meta.items():
        by_case.setdefault(int(k.split(".", 1)[0]), {})[k] = m
    for i, r in enumerate(records):
        r["arrays"] = dict(sorted(by_case.get(i, {}).items()))
    npz.write(os.path.join(out, name + ".npz"))
    doc = {
        "format_version": FORMAT_VERSION,
        "chunk": name,
        "group": part["name"],
        "description": part["description"],
        "crossed": part["crossed"],
        "pairwise": part["pairwise"],
        "definition_hash": _chunk_hash(part),
        "arrays_file": name + ".npz",
        "cases": records,
    }
    if part.get("deep"):
        from .generate_deep import FEATURES

        doc["features"] = list(FEATURES)
    _write_json(os.path.join(out, name + ".json.gz"), doc)
    return name


def _versions():
    _setup_tf()
    import tensorflow as tf
    import tf_keras

    return {
        "tensorflow": tf.__version__,
        "tf_keras": tf_keras.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": f"{platform.system()}-{platform.machine()}",
        "tf2_enabled": bool(tf.__internal__.tf2.enabled()),
        "layer": "tf.compat.v1.keras.layers.BatchNormalization "
                 "(tf_keras.src.layers.normalization.batch_normalization_v1.BatchNormalization)",
        "learning_phase_default": int(tf.compat.v1.keras.backend.learning_phase()),
    }


def write_manifest(out):
    files = []
    totals = {"ok": 0, "error": 0, "tf_defect": 0}
    for name, part in chunks():
        doc = read_json(os.path.join(out, name + ".json.gz"))
        counts = {"ok": 0, "error": 0, "tf_defect": 0}
        for c in doc["cases"]:
            counts[c["status"]] += 1
            totals[c["status"]] += 1
        sha = {}
        for ext in ("json.gz", "npz"):
            with open(os.path.join(out, f"{name}.{ext}"), "rb") as f:
                sha[ext] = hashlib.sha256(f.read()).hexdigest()
        files.append({"chunk": name, "group": doc["group"], "json": name + ".json.gz", "npz": name + ".npz",
                      "cases": len(doc["cases"]), "status_counts": counts,
                      "definition_hash": doc["definition_hash"], "sha256": sha})
    manifest = {
        "format_version": FORMAT_VERSION,
        "generator_revision": GENERATOR_REVISION,
        "versions": _versions(),
        "determinism": {"TF_DETERMINISTIC_OPS": "1", "inter_op_threads": 1, "intra_op_threads": 1},
        "adjustments": sorted(adjustments.ADJUSTMENTS),
        "files": files,
        "status_counts": totals,
        "total_cases": sum(totals.values()),
    }
    _write_json(os.path.join(out, "manifest.json"), manifest)
    return manifest


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m conformance.generate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "goldens"))
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--only", default=None, help="regex on chunk names to (re)generate")
    ap.add_argument("--force", action="store_true", help="regenerate even if up to date")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    todo = []
    for name, part in chunks():
        if args.only and not re.search(args.only, name):
            continue
        if not args.force and _is_done(args.out, name, part):
            continue
        todo.append((name, part))
    total = sum(len(p["cases"]) for _, p in todo)
    print(f"{len(todo)} chunk(s), {total} case(s) to generate", file=sys.stderr)
    from tqdm import tqdm

    if todo:
        # biggest first for better packing
        todo.sort(key=lambda t: -len(t[1]["cases"]))
        ctx = mp.get_context("spawn")
        with ctx.Manager() as mgr:
            q = mgr.Queue()
            with ctx.Pool(args.jobs, maxtasksperchild=4) as pool:
                res = pool.map_async(_worker, [(args.out, n, p, q) for n, p in todo], chunksize=1)
                with tqdm(total=total, unit="case") as bar:
                    done = 0
                    while done < total:
                        try:
                            k = q.get(timeout=1.0)
                        except Exception:  # noqa: BLE001
                            if res.ready():
                                break
                            continue
                        bar.update(k)
                        done += k
                res.get()
    m = write_manifest(args.out)
    print(f"cases: {m['total_cases']} {m['status_counts']}", file=sys.stderr)


if __name__ == "__main__":
    main()
