"""Reference client of the external-program protocol (``--exec``), using the toy.

    python -m conformance --exec "python -m conformance.toy_exec --bug epsilon" ...

The runner calls ``CMD DIR``; ``DIR`` holds ``request.json`` and
``inputs.npz``; the program writes ``response.json`` and ``outputs.npz`` there
(docs/conformance.md, "External program protocol").  A port in another
language implements the same few steps.  This client is written against the
protocol only (it does not use the runner's code).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

import numpy as np

from . import adjustments
from .toy import ToyBatchNormalization


def _arr(inputs, ref):
    a = inputs[ref["key"]]
    return a if ref.get("index") is None else a[ref["index"]]


def run_case(case, inputs, out, bug):
    res = {"error": None, "calls": [], "step": None}
    cid = case["id"]

    def err(stage, e, call_index=None):
        res["error"] = {"stage": stage, "call_index": call_index, "type": type(e).__name__, "message": str(e)}
        return res

    try:
        layer = ToyBatchNormalization(bug=bug, **adjustments.resolve(case["init_kwargs"]))
    except Exception as e:  # noqa: BLE001
        return err("init", e)
    try:
        layer.build(tuple(case["input_shape"]))
    except Exception as e:  # noqa: BLE001
        return err("build", e)
    key = f"{cid}/wb"
    out[key] = np.stack(layer.get_weights())
    res["weights_after_build"] = key
    iw = case["initial_weights"]
    if iw is not None:
        ws = list(_arr(inputs, iw)) if isinstance(iw, dict) else [_arr(inputs, r) for r in iw]
        try:
            layer.set_weights(ws)
        except Exception as e:  # noqa: BLE001
            return err("set_weights", e)
    names = layer.weight_names
    res.update(fused=layer.fused, config=layer.get_config(), weight_names=names,
               trainable_weight_names=names[:len(layer.trainable_weights)],
               non_trainable_weight_names=names[len(layer.trainable_weights):],
               layer_trainable=layer.trainable, losses=[], loss_dtypes=[])
    for i, c in enumerate(case["calls"]):
        x = _arr(inputs, c["x"])
        m = None if c["mask"] is None else _arr(inputs, c["mask"])
        try:
            y = layer(x, training=c["training"], mask=m)
        except Exception as e:  # noqa: BLE001
            return err("call", e, i)
        out[f"{cid}/y{i}"] = y
        out[f"{cid}/w{i}"] = np.stack(layer.get_weights())
        res["calls"].append({"y": f"{cid}/y{i}", "y_dtype": str(y.dtype), "weights": f"{cid}/w{i}"})
    return res


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--bug", default=None, choices=[None, "unbiased", "epsilon"])
    ap.add_argument("--crash-on", default=None, metavar="REGEX",
                    help="exit with status 3 when a request holds a case whose id matches (tests the runner)")
    ap.add_argument("dir")
    a = ap.parse_args(argv)
    with open(os.path.join(a.dir, "request.json")) as f:
        req = json.load(f)
    if req["format_version"] != 1:
        sys.exit("unsupported format")
    if a.crash_on and any(re.search(a.crash_on, c["id"]) for c in req["cases"]):
        sys.exit(3)
    inputs = np.load(os.path.join(a.dir, "inputs.npz"), allow_pickle=False)
    out = {}
    resp = {"cases": {c["id"]: run_case(c, inputs, out, a.bug) for c in req["cases"]}}
    np.savez(os.path.join(a.dir, "outputs.npz"), **out)
    with open(os.path.join(a.dir, "response.json"), "w") as f:
        json.dump(resp, f)


if __name__ == "__main__":
    main()
