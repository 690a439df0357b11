"""Recording one deep case with TensorFlow (see ``conformance.deep`` and ``deep_cases``).

Called by ``generate.run_case`` for cases with a ``deep`` field. Inputs and masks are
regenerated from seeded specs and referenced by spec and checksum; outputs are stored at
sampled positions plus per-channel summaries; after every call TensorFlow's own error
against ``deep.reference64`` (the layer in float64, fed TensorFlow's casts and the weights
TensorFlow held before the call) is recorded beside the golden as ``tf_error``.
"""

from __future__ import annotations

import re
import warnings

import numpy as np

from . import adjustments, deep

DEEP_REVISION = 5
#: what a deep chunk needs from a runner beyond the base format
FEATURES = ("seeded_arrays", "sampled_outputs", "set_between_calls", "tf_error")
#: the attributes the float64 recomputation reads from the layer before every call
CALL_ATTRS = ("fused", "momentum", "epsilon", "center", "scale", "renorm", "virtual_batch_size", "trainable")
POISON = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}


def _values_of(arr, tag):
    if tag == "bfloat16":
        return (np.asarray(arr, np.uint16).astype(np.uint32) << 16).view(np.float32)
    return arr


def run_deep_case(tf, BN, case, idx, npz):
    from .generate import classify, jsonable, make_weights, short_name

    tf.keras.backend.clear_session()
    rng = np.random.default_rng(case["seed"])
    p = f"{idx:04d}."
    rec = {k: case[k] for k in ("id", "dims", "init_kwargs", "input_shape", "input_dtype", "weights",
                                "random_initializer", "magnitude", "deep")}
    rec.update(status="ok", error=None, resolved=None, calls=[], initial_weights=None,
               weights_after_build=None, step=None, warnings=[])
    shape = tuple(case["input_shape"])
    axes = deep.axes_of(case)
    d = case["deep"]

    def fail(stage, exc, call_index=None):
        status, info = classify(tf, exc)
        rec["status"] = status
        rec["error"] = dict(info, stage=stage, call_index=call_index)

    def to_tf(arr, tag):
        if tag == "bfloat16":
            return tf.bitcast(tf.constant(arr, tf.uint16), tf.bfloat16)
        return tf.constant(arr)

    def from_tf(t):
        if t.dtype == tf.bfloat16:
            return tf.bitcast(t, tf.uint16).numpy(), "bfloat16"
        return t.numpy(), t.dtype.name

    # ---- input specs (regenerated, checksummed) ---------------------------------
    xs, ms = [], []
    for i, c in enumerate(case["calls"]):
        spec = dict(d["x"], seed=(case["seed"] + 7919 * (i + 1)) % 2**32, shape=list(shape),
                    dtype=case["input_dtype"], axes=axes)
        a = deep.make_array(spec)
        xs.append((a, {"gen": spec, "sha256": deep.checksum(a), "dtype": case["input_dtype"]}))
        if c["mask"]:
            mspec = dict(d["mask"], seed=(case["seed"] + 104729 * (i + 1)) % 2**32, shape=list(shape[:-1]),
                         mask=True)
            m = deep.make_array(mspec)
            ms.append((m, {"gen": mspec, "sha256": deep.checksum(m), "dtype": mspec["dtype"]}))
        else:
            ms.append(None)

    kwargs = adjustments.resolve(case["init_kwargs"], adjustments.tf_impl)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _stages(tf, BN, case, rec, kwargs, npz, p, rng, xs, ms, axes, to_tf, from_tf, fail, jsonable, make_weights,
                short_name)
    seen = []
    for w in caught:
        s = f"{w.category.__name__}: {str(w.message)}"
        s = re.sub(r"batch_normalization(_\d+)?", "batch_normalization", s)
        if ("tf_keras" in (w.filename or "") or "keras" in s.lower()) and s not in seen:
            seen.append(s)
    rec["warnings"] = seen
    return rec


def _draw_weights(rng, names, shapes, dtypes, make_weights, poison=None):
    ws = make_weights(rng, names, shapes, dtypes)
    for j, n in enumerate(names):
        if poison and n in poison:
            ws[j] = np.full_like(ws[j], POISON[poison[n]])
    return ws


def _stages(tf, BN, case, rec, kwargs, npz, p, rng, xs, ms, axes, to_tf, from_tf, fail, jsonable, make_weights,
            short_name):
    d = case["deep"]
    try:
        layer = BN(**kwargs)
    except Exception as e:  # noqa: BLE001
        fail("init", e)
        return
    fused_after_init = layer.fused
    try:
        layer.build(tuple(case["input_shape"]))
    except Exception as e:  # noqa: BLE001
        fail("build", e)
        rec["resolved"] = {"fused_after_init": jsonable(fused_after_init)}
        return
    names = [short_name(v) for v in layer.weights]
    wdt = [v.dtype.name for v in layer.weights]
    shapes = [tuple(v.shape) for v in layer.weights]
    if case["weights"] != "init":
        init_w = _draw_weights(rng, names, shapes, wdt, make_weights, d.get("poison"))
        rec["initial_weights"] = {"key": npz.add(p + "w0", np.stack(init_w)), "index": None}
        layer.set_weights(init_w)
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
        "losses": [],
        "loss_dtypes": [],
    }
    ws = []
    entries = []
    # the float64 layer runs alongside on its own state (from the same initial weights)
    state64 = {n: v.numpy().astype(np.float64) for n, v in zip(names, layer.weights)}
    adj = case["init_kwargs"].get("adjustment")
    adj_name = adj[adjustments.MARKER] if isinstance(adj, dict) else None
    for i, c in enumerate(case["calls"]):
        entry = {"training": c["training"], "x": xs[i][1], "mask": None if ms[i] is None else ms[i][1]}
        if c.get("set"):
            entry["set"] = c["set"]
            for k, v in adjustments.resolve(c["set"], adjustments.tf_impl).items():
                setattr(layer, k, v)
            if "adjustment" in c["set"]:
                a = c["set"]["adjustment"]
                adj_name = a[adjustments.MARKER] if isinstance(a, dict) else None
        if c.get("set_weights"):
            neww = _draw_weights(rng, names, shapes, wdt, make_weights)
            entry["set_weights"] = {"key": npz.add(p + f"sw{i}", np.stack(neww)), "index": None}
            layer.set_weights(neww)
            state64 = {n: v.numpy().astype(np.float64) for n, v in zip(names, layer.weights)}
        entries.append(entry)
        cfg = {k: getattr(layer, k, None) for k in CALL_ATTRS}
        cfg.update(renorm_clipping=getattr(layer, "renorm_clipping", None),
                   renorm_momentum=getattr(layer, "renorm_momentum", None),
                   training=bool(c["training"]), axes=axes, adjustment=adj_name)
        before = {n: v.numpy().astype(np.float64) for n, v in zip(names, layer.weights)}
        kw = {"training": c["training"]}
        if ms[i] is not None:
            kw["mask"] = tf.constant(ms[i][0])
        try:
            y = layer(to_tf(xs[i][0], case["input_dtype"]), **kw)
        except Exception as e:  # noqa: BLE001
            fail("call", e, i)
            break
        ya, yt = from_tf(y)
        yv = np.asarray(_values_of(ya, yt), np.float64)
        pos = deep.sample_positions(ya.size, d["samples"], case["seed"] + i)
        after = [v.numpy() for v in layer.weights]
        ws.append(np.stack(after))
        every = d.get("record_every", 1)
        if i % every == every - 1 or i >= len(case["calls"]) - 2:  # long runs: every k-th call and the last two
            entry["y_sample"] = {"key": npz.add(p + f"ys{i}", ya.reshape(-1)[pos], yt), "index": None,
                                 "positions": {"n": d["samples"], "seed": case["seed"] + i}}
        summ = deep.channel_summary(yv, axes)
        entry["y_summary"] = {"key": npz.add(p + f"yc{i}", summ), "index": None}
        entry["y_dtype"] = yt
        entry["y_shape"] = list(ya.shape)
        # ---- TF's own error against the float64 recomputation -------------------
        try:
            cdt = layer.compute_dtype
            x64 = deep.tf_cast_values(_values_of(xs[i][0], case["input_dtype"]), cdt)
            m64 = None
            if ms[i] is not None and not cfg["fused"]:
                m64 = deep.tf_cast_values(ms[i][0], cdt)
            y64, new64 = deep.reference64(x64, m64, state64, cfg)
            state64 = new64
            err = {"y": deep.max_error(yv.reshape(-1)[pos], y64.reshape(-1)[pos]),
                   "y_summary": deep.max_error(summ, deep.channel_summary(y64, axes)),
                   "weights": [deep.max_error(a, new64[n]) for n, a in zip(names, after)]}
            # the same call fed the weights TF held before it: this call's own rounding
            yc, newc = deep.reference64(x64, m64, before, cfg)
            err["call"] = {"y": deep.max_error(yv.reshape(-1)[pos], yc.reshape(-1)[pos]),
                           "weights": [deep.max_error(a, newc[n]) for n, a in zip(names, after)]}
            # non-finite values where the recomputation is finite (or the reverse) are recorded, not hidden
            finite_tf, finite64 = np.isfinite(yv.reshape(-1)[pos]), np.isfinite(y64.reshape(-1)[pos])
            err["nonfinite_mismatch"] = int(np.sum(finite_tf != finite64))
        except Exception as e:  # noqa: BLE001 - a configuration the recomputation does not model
            err = {"unavailable": f"{type(e).__name__}: {e}"[:200]}
        entry["tf_error"] = err
    for j in range(len(entries), len(case["calls"])):  # not reached: TF raised before
        c = case["calls"][j]
        entries.append({"training": c["training"], "x": xs[j][1], "mask": None if ms[j] is None else ms[j][1]})
    if ws:
        wkey = npz.add(p + "w", np.stack(ws))
        for i in range(len(ws)):
            entries[i]["weights"] = {"key": wkey, "index": i}
    rec["calls"] = entries
