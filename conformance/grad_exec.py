"""Reference client of the gradient protocol (``python -m conformance.gradients check --exec``),
written against the protocol only, driving arraybn's public ``forward``/``backward``:

    python -m conformance.gradients check --exec "python -m conformance.grad_exec"

``DIR/request.json`` lists the cases (``init_kwargs``, ``input_shape``, ``training``,
``weight_names`` and refs to ``x``, ``dy``, ``mask`` and the weights in ``inputs.npz``); the
client writes ``outputs.npz`` and ``response.json`` (``{"cases": {id: {"y", "dx", "dgamma",
"dbeta": KEY}}}``, an ``error`` or ``unsupported`` entry instead where it must). A port in another
language implements the same steps.
"""

from __future__ import annotations

import json
import os
import sys
import warnings

import numpy as np

from .adjustments import ADJUSTMENTS


def main(argv=None):
    import arraybn

    d = (argv or sys.argv[1:])[-1]
    with open(os.path.join(d, "request.json")) as f:
        req = json.load(f)
    inputs = np.load(os.path.join(d, "inputs.npz"), allow_pickle=False)

    def arr(ref):
        return None if ref is None else inputs[ref["key"]]

    out, resp = {}, {}
    for n, c in enumerate(req["cases"]):
        kw = dict(c["init_kwargs"])
        if isinstance(kw.get("adjustment"), dict):
            kw["adjustment"] = ADJUSTMENTS[kw["adjustment"]["__adjustment__"]]
        try:
            layer = arraybn.BatchNormalization(**kw)
            layer.build(tuple(c["input_shape"]))
            layer.set_weights([arr(r) for r in c["weights"]])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                y, ctx = layer.forward(arr(c["x"]), training=c["training"], mask=arr(c["mask"]))
                dx, grads = layer.backward(ctx, arr(c["dy"]))
        except Exception as e:  # noqa: BLE001 - reported to the runner
            resp[c["id"]] = {"error": {"type": type(e).__name__, "message": str(e)[:300]}}
            continue
        r = {}
        for k, v in [("y", y), ("dx", dx)] + [("d" + g, v) for g, v in grads.items()]:
            out[f"{n}.{k}"] = np.asarray(v)
            r[k] = f"{n}.{k}"
        resp[c["id"]] = r
    np.savez(os.path.join(d, "outputs.npz"), **out)
    with open(os.path.join(d, "response.json"), "w") as f:
        json.dump({"cases": resp}, f)


if __name__ == "__main__":
    main()
