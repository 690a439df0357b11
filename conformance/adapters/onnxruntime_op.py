"""ONNX Runtime running the ONNX ``BatchNormalization`` operator (opset 15) behind TF's v1 arguments.

Mapping: the channel axis is moved to position 1 (ONNX's N, C, D1, ... layout); ``momentum``
has TF's convention; ``center=False`` / ``scale=False`` pass zeros / ones; inference calls use
``training_mode=0``; training calls ``training_mode=1``, whose running statistics outputs replace
the moving statistics unless the layer is frozen (``trainable=False``). One small model per
(shape, dtypes, mode, epsilon, momentum), cached. A combination ONNX Runtime's CPU provider has no
kernel for raises NotImplementedError.
"""

from __future__ import annotations

import numpy as np

from ._base import PortLayer, unsupported

_SESSIONS = {}


def _session(rank, xdt, wdt, training, eps, mom):
    key = (rank, xdt, wdt, training, eps, mom)
    s = _SESSIONS.get(key)
    if s is not None:
        return s
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    T = {"float16": TensorProto.FLOAT16, "float32": TensorProto.FLOAT, "float64": TensorProto.DOUBLE}
    if xdt not in T or wdt not in T:
        raise unsupported("policy:bfloat16", "no bfloat16 BatchNormalization kernel on ONNX Runtime's CPU provider")
    dims = [f"d{i}" for i in range(rank)]
    X = helper.make_tensor_value_info("X", T[xdt], dims)
    ins = [X] + [helper.make_tensor_value_info(n, T[wdt], ["C"]) for n in ("scale", "B", "mean", "var")]
    outs = [helper.make_tensor_value_info("Y", T[xdt], dims)]
    onames = ["Y"]
    if training:
        outs += [helper.make_tensor_value_info(n, T[wdt], ["C"]) for n in ("running_mean", "running_var")]
        onames += ["running_mean", "running_var"]
    node = helper.make_node("BatchNormalization", ["X", "scale", "B", "mean", "var"], onames,
                            epsilon=float(eps), momentum=float(mom), training_mode=int(training))
    graph = helper.make_graph([node], "bn", ins, outs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    ort.set_default_logger_severity(3)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = 1
    try:
        s = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - ORT reports a missing kernel as its own exception types
        if "NOT_IMPLEMENTED" in str(e) or "Could not find an implementation" in str(e):
            tag = "policy:float16" if "float16" in (xdt, wdt) else "policy:float64" if "float64" in (xdt, wdt) \
                else "training"
            raise unsupported(tag, f"ONNX Runtime has no CPU kernel for BatchNormalization with X {xdt}, "
                                   f"parameters {wdt}, training_mode={int(training)}") from None
        raise
    _SESSIONS[key] = s
    return s


class OrtBN(PortLayer):
    framework = "ONNX Runtime BatchNormalization"

    def forward(self, x, training, mask):
        import onnxruntime as ort

        ax = self._axis
        xdt, wdt = self.compute_dtype, self.var_dtype
        xc = np.ascontiguousarray(np.moveaxis(np.asarray(x).astype(xdt), ax, 1))
        c = self._w["moving_mean"].shape[0]
        g = self.param("gamma", 1.0).astype(wdt)
        b = self.param("beta", 0.0).astype(wdt)
        s = _session(x.ndim, xdt, wdt, bool(training), self.epsilon, self.momentum)
        feeds = {"X": xc, "scale": g, "B": b, "mean": self._w["moving_mean"].astype(wdt),
                 "var": self._w["moving_variance"].astype(wdt)}
        ro = ort.RunOptions()
        ro.log_severity_level = 4  # errors reach the caller as exceptions
        out = s.run(None, feeds, ro)
        if training and self.update_stats(training):
            self._w["moving_mean"][...] = out[1].reshape(c)
            self._w["moving_variance"][...] = out[2].reshape(c)
        return np.moveaxis(out[0], 1, ax)


def factory(kwargs):
    return OrtBN(**kwargs)
