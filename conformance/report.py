"""Markdown + JSON + PNG report of a conformance run."""

from __future__ import annotations

import itertools
import json
import os
from collections import Counter, defaultdict

STATUSES = ["pass", "fail", "xfail", "xpass", "skip", "defect_ok", "defect_fail"]
#: dimensions shown in the pass-rate heat map (pairs of these)
HEATMAP_DIMS = ["rank", "fused", "renorm", "mode", "mask", "trainable", "input_dtype", "policy"]


def _by_dimension(outcomes):
    table = defaultdict(lambda: defaultdict(Counter))
    for o in outcomes:
        for k, v in o.dims.items():
            table[k][v][o.status] += 1
    return {k: {v: dict(c) for v, c in sorted(vs.items())} for k, vs in sorted(table.items())}


def _rate(counter):
    ok = counter.get("pass", 0) + counter.get("defect_ok", 0) + counter.get("xfail", 0)
    bad = counter.get("fail", 0) + counter.get("defect_fail", 0)
    return None if ok + bad == 0 else ok / (ok + bad)


def heatmap(summary, path):
    """Write the pass-rate heat map; None (and no file) where matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    dims = [d for d in HEATMAP_DIMS if any(d in o.dims for o in summary.outcomes)]
    pairs = list(itertools.combinations(dims, 2))
    if not pairs:
        return None
    ncol = min(4, len(pairs))
    nrow = -(-len(pairs) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.6 * nrow), squeeze=False,
                             layout="constrained")
    for ax, (a, b) in zip(axes.ravel(), pairs):
        va = sorted({o.dims[a] for o in summary.outcomes if a in o.dims and b in o.dims})
        vb = sorted({o.dims[b] for o in summary.outcomes if a in o.dims and b in o.dims})
        m = np.full((len(va), len(vb)), np.nan)
        cnt = defaultdict(Counter)
        for o in summary.outcomes:
            if a in o.dims and b in o.dims:
                cnt[(o.dims[a], o.dims[b])][o.status] += 1
        for i, x in enumerate(va):
            for j, y in enumerate(vb):
                r = _rate(cnt[(x, y)])
                if r is not None:
                    m[i, j] = r
        im = ax.imshow(m, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_yticks(range(len(va)), va, fontsize=7)
        ax.set_xticks(range(len(vb)), vb, fontsize=7, rotation=45, ha="right")
        ax.set_ylabel(a, fontsize=8)
        ax.set_xlabel(b, fontsize=8)
        for i in range(len(va)):
            for j in range(len(vb)):
                if not np.isnan(m[i, j]):
                    ax.text(j, i, f"{100 * m[i, j]:.0f}", ha="center", va="center", fontsize=6)
    for ax in axes.ravel()[len(pairs):]:
        ax.axis("off")
    fig.suptitle(f"Pass rate (%) by argument pair: {summary.impl} on {summary.backend}", fontsize=10)
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.6)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def write_report(summary, report_dir, worst=25):
    os.makedirs(report_dir, exist_ok=True)
    oc = summary.outcomes
    counts = Counter(o.status for o in oc)
    by_group = defaultdict(Counter)
    for o in oc:
        by_group[o.group][o.status] += 1
    dims = _by_dimension(oc)
    compared = [o for o in oc if o.status in ("pass", "fail", "xfail", "xpass", "defect_ok", "defect_fail")]
    worst_list = sorted(compared, key=lambda o: -o.worst_ratio)[:worst]
    data = {
        "backend": summary.backend,
        "implementation": summary.impl,
        "elapsed_s": round(summary.elapsed, 1),
        "counts": {s: counts.get(s, 0) for s in STATUSES},
        "by_group": {g: dict(c) for g, c in sorted(by_group.items())},
        "by_dimension": dims,
        "worst": [{"id": o.id, "status": o.status, "max_abs": o.max_abs, "max_rel": o.max_rel,
                   "tolerance_ratio": o.worst_ratio, "where": o.worst_what} for o in worst_list],
        "failures": [{"id": o.id, "problems": o.problems} for o in oc if o.status in ("fail", "defect_fail")],
        "tf_defects": [{"id": o.id, "status": o.status, "problems": o.problems}
                       for o in oc if o.golden_status == "tf_defect"],
        "expected_failures": [{"id": o.id, "status": o.status, "reason": o.xfail_reason}
                              for o in oc if o.status in ("xfail", "xpass")],
        "skipped": [{"id": o.id, "why": o.problems} for o in oc if o.status == "skip"],
    }
    stem = f"conformance-{summary.backend}"
    with open(os.path.join(report_dir, stem + ".json"), "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
    png = heatmap(summary, os.path.join(report_dir, stem + ".png"))
    L = [f"# Conformance report: {summary.impl} on `{summary.backend}`", ""]
    L.append(f"{len(oc)} cases in {summary.elapsed:.1f} s: " + ", ".join(f"{s} {counts.get(s, 0)}" for s in STATUSES))
    L.append("")
    nd = sum(o.golden_status == "tf_defect" for o in oc)
    L.append(f"**TF defects**: {nd} cases where TensorFlow itself fails (not compared with TF; the "
             f"implementation must run and give finite values of the right dtype/shape): "
             f"{counts.get('defect_ok', 0)} ok, {counts.get('defect_fail', 0)} failing.")
    L.append("")
    L.append(f"**Expected failures**: {counts.get('xfail', 0)} failing as expected, "
             f"{counts.get('xpass', 0)} listed but passing (xpass).")
    L.append("")
    if png:
        L += [f"![pass rate by argument pair]({os.path.basename(png)})", ""]
    L += ["## By group", "", "| group | " + " | ".join(STATUSES) + " |", "|---" * (len(STATUSES) + 1) + "|"]
    for g, c in sorted(by_group.items()):
        L.append(f"| {g} | " + " | ".join(str(c.get(s, 0)) for s in STATUSES) + " |")
    L += ["", "## By argument", "", "| argument | value | pass | fail | other |", "|---|---|---|---|---|"]
    for k, vs in dims.items():
        for v, c in vs.items():
            other = sum(n for s, n in c.items() if s not in ("pass", "fail"))
            L.append(f"| {k} | `{v}` | {c.get('pass', 0)} | {c.get('fail', 0)} | {other} |")
    L += ["", f"## Worst {len(worst_list)} cases (largest |diff| / allowed)", "",
          "| case | status | max abs | max rel | diff/allowed | where |", "|---|---|---|---|---|---|"]
    for o in worst_list:
        L.append(f"| `{o.id}` | {o.status} | {o.max_abs:.3g} | {o.max_rel:.3g} | {o.worst_ratio:.3g} | {o.worst_what} |")
    fails = [o for o in oc if o.status in ("fail", "defect_fail")]
    L += ["", f"## Failures ({len(fails)})", ""]
    for o in fails[:200]:
        L.append(f"- `{o.id}`")
        for p in o.problems[:5]:
            L.append(f"  - {p}")
    if len(fails) > 200:
        L.append(f"- ... {len(fails) - 200} more in the JSON report")
    xf = [o for o in oc if o.status in ("xfail", "xpass")]
    if xf:
        L += ["", "## Expected failures", ""]
        for o in xf:
            L.append(f"- `{o.id}` ({o.status}): {o.xfail_reason}")
    with open(os.path.join(report_dir, stem + ".md"), "w") as f:
        f.write("\n".join(L) + "\n")
    return data
