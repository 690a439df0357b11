"""Faster formulations of arraybn's forward, in the Array API only: measured, not used by arraybn.

``python -m benchmarks.prototypes [--repeats N]`` times each formulation on NumPy
(through array-api-compat) on the benchmark shapes, next to a copy of the tensor,
and reports peak extra memory (``tracemalloc``) and the largest difference from
the current ``arraybn.batch_norm`` in float32 ulps, plus the variance error of
each statistics scheme on a badly centred input.

Memory passes per element (R = read of an input-sized array, W = write):

=========================  ==============================================  ===========
formulation                what it does                                    traffic
=========================  ==============================================  ===========
current fused, training    mean(x); c=x-mean; mean(c*c); c*s; +beta        6R 4W, 2 temps
current non-fused, train   mean(x); c=x-mean; mean(c*c); x*inv; +shift    6R 4W, 2 temps
current, inference         (x-mean)*s+beta  /  x*inv+shift                 3R 3W / 2R 2W
chunked stats              per ~1 MiB slice of the batch axis: mean and    1R for both
                           sum of squared deviations (the slice is still
                           in cache), merged exactly (Chan et al.)
in-place tail              t = (x-mean)*s; t += beta  (t is our own        saves 1 temp
                           temporary; no input is ever written)
folded affine              t = x*a; t += b  (a, b per channel)             2R 2W total
=========================  ==============================================  ===========
"""

from __future__ import annotations

import argparse
import math
from typing import Any

from ._cases import CASES, make_inputs
from ._measure import extra_tracemalloc, summarize, time_call

EPS = 1e-3


def _axes(ndim: int, axis: int) -> tuple[int, ...]:
    return tuple(i for i in range(ndim) if i != axis)


def _bshape(x: Any, axis: int) -> tuple[int, ...]:
    return tuple(x.shape[i] if i == axis else 1 for i in range(x.ndim))


def _chunks(x: Any, axis: int, target_bytes: int = 1 << 20) -> list[tuple[int, int]]:
    """Slices of the leading (batch) axis of about ``target_bytes`` each (the channel axis is never split)."""
    lead = 0 if axis != 0 else 1
    n = x.shape[lead]
    per = x.size // n * 4
    rows = max(1, target_bytes // per)
    return [(i, min(i + rows, n)) for i in range(0, n, rows)], lead


def _slice(x: Any, lead: int, a: int, b: int) -> Any:
    return x[a:b] if lead == 0 else x[:, a:b]


# ---------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------


def stats_two_pass(x: Any, axis: int, xp: Any) -> tuple[Any, Any]:
    """What arraybn does now (tf.nn.moments): 2R + 1W + 1R1W and two input-sized temporaries."""
    axes = _axes(x.ndim, axis)
    mean = xp.mean(x, axis=axes, keepdims=True)
    c = x - mean
    return mean, xp.mean(c * c, axis=axes, keepdims=True)


def stats_two_pass_chunked(x: Any, axis: int, xp: Any) -> tuple[Any, Any]:
    """Mean over everything, then the squared deviations summed slice by slice (temporaries stay in cache)."""
    axes = _axes(x.ndim, axis)
    mean = xp.mean(x, axis=axes, keepdims=True)
    spans, lead = _chunks(x, axis)
    ss = None
    for a, b in spans:
        d = _slice(x, lead, a, b) - mean
        s = xp.sum(d * d, axis=axes, keepdims=True)
        ss = s if ss is None else ss + s
    n = math.prod(x.shape[i] for i in axes)
    return mean, ss / n


def stats_chan(x: Any, axis: int, xp: Any) -> tuple[Any, Any]:
    """One read of x: per slice a two-pass mean/M2 (in cache), merged with Chan's exact pairwise update."""
    axes = _axes(x.ndim, axis)
    spans, lead = _chunks(x, axis)
    n_tot, mean, m2 = 0, None, None
    for a, b in spans:
        xk = _slice(x, lead, a, b)
        nk = math.prod(xk.shape[i] for i in axes)
        mk = xp.mean(xk, axis=axes, keepdims=True)
        d = xk - mk
        m2k = xp.sum(d * d, axis=axes, keepdims=True)
        if mean is None:
            n_tot, mean, m2 = nk, mk, m2k
            continue
        n_new = n_tot + nk
        delta = mk - mean
        mean = mean + delta * (nk / n_new)
        m2 = m2 + m2k + delta * delta * (n_tot * nk / n_new)
        n_tot = n_new
    return mean, m2 / n_tot


def stats_one_pass(x: Any, axis: int, xp: Any) -> tuple[Any, Any]:
    """E[x^2] - E[x]^2: fewer passes, but cancels catastrophically when |mean| >> std (shown, not proposed)."""
    axes = _axes(x.ndim, axis)
    mean = xp.mean(x, axis=axes, keepdims=True)
    msq = xp.mean(x * x, axis=axes, keepdims=True)
    return mean, xp.maximum(msq - mean * mean, xp.zeros_like(mean))


# ---------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------


def out_fused_order(x: Any, mean: Any, var: Any, gamma: Any, beta: Any, xp: Any) -> Any:
    """The FusedBatchNormV3 order, (x - mean) * scaling + beta, with the add done in place on our temporary."""
    scaling = gamma / xp.sqrt(var + xp.asarray(EPS, dtype=xp.float32))
    t = (x - mean) * scaling
    t += beta
    return t


def out_folded(x: Any, mean: Any, var: Any, gamma: Any, beta: Any, xp: Any) -> Any:
    """tf.nn.batch_normalization's order, x * a + b, the add in place."""
    a = gamma / xp.sqrt(var + xp.asarray(EPS, dtype=xp.float32))
    b = beta - mean * a
    t = x * a
    t += b
    return t


# ---------------------------------------------------------------------------
# The formulations
# ---------------------------------------------------------------------------


def formulations() -> dict[str, tuple[str, Any]]:
    def make(stats: Any, out: Any) -> Any:
        def f(x: Any, axis: int, gamma: Any, beta: Any, mm: Any, mv: Any, training: bool, xp: Any) -> Any:
            mean, var = stats(x, axis, xp) if training else (mm, mv)
            return out(x, mean, var, gamma, beta, xp)

        return f

    return {
        "P1 two-pass + fused order, in-place add": ("both", make(stats_two_pass, out_fused_order)),
        "P2 chunked two-pass + fused order": ("train", make(stats_two_pass_chunked, out_fused_order)),
        "P3 chunked Chan (1 read) + fused order": ("train", make(stats_chan, out_fused_order)),
        "P4 two-pass + folded x*a+b": ("both", make(stats_two_pass, out_folded)),
        "P5 chunked Chan (1 read) + folded x*a+b": ("train", make(stats_chan, out_folded)),
        "P6 one-pass E[x²]-E[x]² + folded (accuracy foil)": ("train", make(stats_one_pass, out_folded)),
    }


def _ulps(a: Any, b: Any) -> float:
    import numpy as np

    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    scale = np.spacing(np.maximum(np.abs(b), 1.0).astype(np.float32)).astype(np.float64)
    return float(np.max(np.abs(a - b) / scale))


def variance_accuracy(xp: Any) -> list[tuple[str, float]]:
    """Relative variance error (max over channels) on x = 1000 + N(0,1), NHWC, against float64."""
    import numpy as np

    rng = np.random.default_rng(1)
    x = (rng.standard_normal((32, 28, 28, 64)) + 1000.0).astype(np.float32)
    exact = x.astype(np.float64).var(axis=(0, 1, 2))
    out = []
    for name, fn in (("two-pass (now)", stats_two_pass), ("chunked two-pass", stats_two_pass_chunked),
                     ("chunked Chan", stats_chan), ("one-pass E[x²]-E[x]²", stats_one_pass)):
        _, v = fn(xp.asarray(x), 3, xp)
        out.append((name, float(np.max(np.abs(np.asarray(v).reshape(-1) - exact) / exact))))
    return out


def main(argv: list[str] | None = None) -> int:
    import array_api_compat
    import numpy as np

    import arraybn

    p = argparse.ArgumentParser(prog="python -m benchmarks.prototypes")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    args = p.parse_args(argv)
    xp = array_api_compat.array_namespace(np.empty(0))
    rows = []
    for case in CASES:
        x, _ = make_inputs(case)
        rng = np.random.default_rng(2)
        c = case.channels
        bs = tuple(c if i == case.axis else 1 for i in range(x.ndim))
        gamma = (1 + 0.1 * rng.standard_normal(c)).astype(np.float32)
        beta = (0.1 * rng.standard_normal(c)).astype(np.float32)
        mm = (0.5 + 0.1 * rng.standard_normal(c)).astype(np.float32)
        mv = (4 + rng.random(c)).astype(np.float32)
        copy_ms = summarize(time_call(lambda: x.copy(), warmup=args.warmup, repeats=args.repeats))["median_s"]
        for training in (True, False):
            mode = "training" if training else "inference"
            layer = arraybn.BatchNormalization(axis=case.axis, epsilon=EPS)  # fresh: training moves the statistics
            layer.build(case.shape)
            layer.set_weights([gamma, beta, mm, mv])
            ref = layer(x, training=training)  # the current code, before its state moves
            cur = summarize(time_call(lambda: layer(x, training=training), warmup=args.warmup, repeats=args.repeats))
            extra = extra_tracemalloc(lambda: layer(x, training=training))
            rows.append((case.name, mode, f"current ({'fused' if layer.fused else 'non-fused'})",
                         cur["median_s"] * 1e3, cur["median_s"] / copy_ms, extra / x.nbytes, 0.0))
            g, b, m, v = (a.reshape(bs) for a in (gamma, beta, mm, mv))
            for name, (where, fn) in formulations().items():
                if where == "train" and not training:
                    continue
                call = lambda: fn(x, case.axis, g, b, m, v, training, xp)  # noqa: E731
                s = summarize(time_call(call, warmup=args.warmup, repeats=args.repeats))
                extra = extra_tracemalloc(call)
                rows.append((case.name, mode, name, s["median_s"] * 1e3, s["median_s"] / copy_ms,
                             extra / x.nbytes, _ulps(call(), ref)))
        rows.append((case.name, "copy", "x.copy()", copy_ms * 1e3, 1.0, 0.0, 0.0))
    print("| case | mode | formulation | median ms | ×copy | extra temps (× x) | max diff from current (ulp) |")
    print("|---|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.2f} | {r[4]:.2f} | {r[5]:.2f} | {r[6]:.1f} |")
    print()
    print("| statistics (x = 1000 + N(0,1), float32) | max relative variance error vs float64 |")
    print("|---|---:|")
    for name, err in variance_accuracy(xp):
        print(f"| {name} | {err:.2e} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
