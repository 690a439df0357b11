"""Markdown + JSON + PNG report of a conformance run."""

from __future__ import annotations

import itertools
import json
import os
import re
from collections import Counter, defaultdict

from .cases import BEHAVIOURS
from .runner import FAILING, STATUSES

#: dimensions shown in the heat map (pairs of these)
HEATMAP_DIMS = ["rank", "fused", "renorm", "mode", "mask", "trainable", "input_dtype", "policy"]
#: statuses of cases that were compared with TF
COMPARED = ("pass", "fail", "api_fail", "xfail", "xpass", "tf_defect")
#: behaviours most cases exercise: in `likely_causes` they yield to a specific behaviour that explains
#: at least 90% as many wrong cases
GENERIC = {"path:fused", "path:nonfused", "training:none", "weights:set", "inference_first", "cast:input",
           "axis:not_last", "fused_fallback"}
#: a behaviour is "got wrong" in these cases (numerics or error parity; xfail: wrong and known)
WRONG = ("fail", "xfail")


def _by_dimension(outcomes):
    table = defaultdict(lambda: defaultdict(Counter))
    for o in outcomes:
        for k, v in o.dims.items():
            table[k][v][o.status] += 1
    return {k: {v: dict(c) for v, c in sorted(vs.items())} for k, vs in sorted(table.items())}


def describe(tag):
    """Plain words for a behaviour tag."""
    if tag in BEHAVIOURS:
        return BEHAVIOURS[tag]
    m = re.fullmatch(r"error:(\w+)@(\w+)", tag)
    if m:
        return f"TF raises {m.group(1)} at {m.group(2)}"
    return tag


def failure_kind(problem):
    """A short name for the kind of a problem text written by ``runner.compare_case``."""
    p = problem
    if p.startswith("external program"):
        return "the external program crashed"
    if p.startswith("expected ") and "nothing was raised" in p:
        return "TF raises, the port does not"
    if p.startswith("expected "):
        return "another exception type than TF's"
    if p.startswith("error raised at stage"):
        return "raises at another stage than TF"
    if p.startswith("unexpected "):
        m = re.match(r"unexpected (\w+) at (\w+)", p)
        return f"raises {m.group(1)} at {m.group(2)} where TF runs" if m else "raises where TF runs"
    if p.startswith("TF defect case"):
        return "TF-defect case: another error than TF's default-policy one"
    if "(TF defect case)" in p:
        return "TF-defect case: non-finite or wrong dtype/shape"
    if "output dtype" in p:
        return "output dtype"
    if "output shape" in p or "weights shape" in p:
        return "shapes"
    m = re.match(r"call \d+ \(training=(\w+)\) output", p)
    if m:
        return f"output values, training={m.group(1)}"
    m = re.match(r"call \d+ \(training=(\w+)\) (\w+)", p)
    if m:
        return f"{m.group(2)} after a call with training={m.group(1)}"
    if "losses" in p:
        return "layer.losses"
    if p.startswith("step"):
        return "optimizer step / constraints"
    if "weights_after_build" in p or "weight shapes after build" in p:
        return "weights after build (initializers)"
    if p.startswith("fused"):
        return "API: effective fused flag"
    if "weight_names" in p:
        return "API: weight names / order"
    if p.startswith("trainable"):
        return "API: trainable"
    if p.startswith("from_config"):
        return "API: from_config round trip"
    if p.startswith("config"):
        return "API: get_config()"
    if p.startswith("weights live in"):
        return "API: weights in another namespace than the inputs"
    return "other"


def _first(o):
    return (o.problems or o.api_problems or [""])[0]


def behaviour_table(outcomes):
    """[(tag, wrong, compared, example id, example problem)], the most often wrong first."""
    wrong, compared, example = Counter(), Counter(), {}
    for o in outcomes:
        if o.status not in COMPARED:
            continue
        for t in o.tags:
            compared[t] += 1
            if o.status in WRONG:
                wrong[t] += 1
                example.setdefault(t, o)
    rows = [(t, wrong[t], compared[t], example[t].id, _first(example[t])) for t in wrong]
    rows.sort(key=lambda r: (-r[1] / r[2], -r[1], r[0]))
    return rows


def likely_causes(outcomes, min_share=0.75):
    """Greedy explanation of the wrong cases by behaviours: repeatedly take the behaviour, among those
    wrong in at least ``min_share`` of the cases compared that carry it, that covers the most wrong
    cases not yet explained. Returns [(tag, newly explained, wrong, compared, example id, problem)]."""
    wrong_cases = [o for o in outcomes if o.status in WRONG]
    compared, wrong = Counter(), Counter()
    for o in outcomes:
        if o.status in COMPARED:
            for t in o.tags:
                compared[t] += 1
                if o.status in WRONG:
                    wrong[t] += 1
    ok_tags = {t for t in wrong if wrong[t] / compared[t] >= min_share}
    left = list(wrong_cases)
    out = []
    while left:
        cover = Counter(t for o in left for t in o.tags if t in ok_tags)
        if not cover:
            break
        # a behaviour most cases share (the path, training=None, ...) yields to a specific one explaining
        # nearly as many cases
        t, n = max(cover.items(), key=lambda kv: (kv[1] * (0.9 if kv[0] in GENERIC else 1.0),
                                                  wrong[kv[0]] / compared[kv[0]], kv[0]))
        ex = next(o for o in left if t in o.tags)
        out.append((t, n, wrong[t], compared[t], ex.id, _first(ex)))
        left = [o for o in left if t not in o.tags]
        ok_tags.discard(t)
    return out, len(left)


def _rates(counter):
    """(pass share, unsupported share, xfail share) of the cases that ran or were declared unsupported."""
    n = sum(v for k, v in counter.items() if k != "skip")
    if n == 0:
        return None
    ok = counter.get("pass", 0) + counter.get("tf_defect", 0) + counter.get("xpass", 0)
    return ok / n, counter.get("unsupported", 0) / n, counter.get("xfail", 0) / n


def heatmap(summary, path):
    """Write the heat map (pass share; unsupported and xfail shares printed apart); None (and no file)
    where matplotlib is not installed."""
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
    cmap = matplotlib.colormaps["RdYlGn"].with_extremes(bad="#d0d0d0")
    im = None
    for ax, (a, b) in zip(axes.ravel(), pairs):
        va = sorted({o.dims[a] for o in summary.outcomes if a in o.dims and b in o.dims})
        vb = sorted({o.dims[b] for o in summary.outcomes if a in o.dims and b in o.dims})
        m = np.full((len(va), len(vb)), np.nan)
        labels = {}
        cnt = defaultdict(Counter)
        for o in summary.outcomes:
            if a in o.dims and b in o.dims:
                cnt[(o.dims[a], o.dims[b])][o.status] += 1
        for i, x in enumerate(va):
            for j, y in enumerate(vb):
                r = _rates(cnt[(x, y)])
                if r is None:
                    continue
                p, u, xf = r
                if u < 1:  # a cell with nothing but unsupported cases stays grey
                    m[i, j] = p / (1 - u)  # pass share of the cases that ran
                labels[(i, j)] = "\n".join([f"{100 * p:.0f}"] + ([f"u{100 * u:.0f}"] if u else [])
                                           + ([f"x{100 * xf:.0f}"] if xf else []))
        im = ax.imshow(np.ma.masked_invalid(m), vmin=0, vmax=1, cmap=cmap, aspect="auto")
        ax.set_yticks(range(len(va)), va, fontsize=7)
        ax.set_xticks(range(len(vb)), vb, fontsize=7, rotation=45, ha="right")
        ax.set_ylabel(a, fontsize=8)
        ax.set_xlabel(b, fontsize=8)
        for (i, j), t in labels.items():
            ax.text(j, i, t, ha="center", va="center", fontsize=5)
    for ax in axes.ravel()[len(pairs):]:
        ax.axis("off")
    fig.suptitle(f"Pass (%) by argument pair: {summary.impl} on {summary.backend}\ncolour: pass share of the "
                 f"cases run; u: unsupported %, x: expected failures % (not counted as pass); grey: all unsupported",
                 fontsize=9)
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.6)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def _md(s):
    return str(s).replace("|", "\\|").replace("\n", " ")


def write_report(summary, report_dir, worst=25):
    os.makedirs(report_dir, exist_ok=True)
    oc = summary.outcomes
    counts = summary.counts()
    by_group = defaultdict(Counter)
    for o in oc:
        by_group[o.group][o.status] += 1
    dims = _by_dimension(oc)
    behaviours = behaviour_table(oc)
    causes, unexplained = likely_causes(oc)
    kinds = Counter()
    kind_example = {}
    for o in oc:
        if o.status in FAILING or o.status == "xfail":
            k = failure_kind(_first(o))
            kinds[k] += 1
            kind_example.setdefault(k, o)
    api_kinds = Counter()
    for o in oc:
        for p in {failure_kind(p) for p in o.api_problems}:
            api_kinds[p] += 1
    feats = summary.unsupported_by_feature()
    feat_example = {}
    for o in oc:
        if o.status == "unsupported":
            feat_example.setdefault(o.feature, o)
    xf_reasons = Counter(o.xfail_reason for o in oc if o.status in ("xfail", "xpass"))
    by_tag = defaultdict(Counter)
    for o in oc:
        for t in o.tags:
            by_tag[t][o.status] += 1
    compared = [o for o in oc if o.status in COMPARED]
    worst_list = sorted(compared, key=lambda o: -o.worst_ratio)[:worst]
    data = {
        "backend": summary.backend,
        "implementation": summary.impl,
        "elapsed_s": round(summary.elapsed, 1),
        "interrupted": summary.interrupted,
        "selected_cases": summary.total,
        "numerics_only": summary.numerics_only,
        "counts": counts,
        "likely_causes": [{"behaviour": t, "explains": new, "wrong": w, "compared": n, "example": ex,
                           "example_problem": p, "rule": describe(t)} for t, new, w, n, ex, p in causes],
        "unexplained_wrong": unexplained,
        "behaviours_wrong": [{"behaviour": t, "wrong": w, "compared": n, "example": ex, "example_problem": p,
                              "rule": describe(t)} for t, w, n, ex, p in behaviours],
        "by_behaviour": {t: dict(c) for t, c in sorted(by_tag.items())},
        "failure_kinds": {k: {"cases": n, "example": kind_example[k].id} for k, n in kinds.most_common()},
        "api_failure_kinds": dict(api_kinds.most_common()),
        "unsupported_by_feature": {f: {"cases": n, "example": feat_example[f].id,
                                       "reason": _first(feat_example[f])} for f, n in feats},
        "expected_failures_by_reason": dict(xf_reasons.most_common()),
        "by_group": {g: dict(c) for g, c in sorted(by_group.items())},
        "by_dimension": dims,
        "worst": [{"id": o.id, "status": o.status, "max_abs": o.max_abs, "max_rel": o.max_rel,
                   "tolerance_ratio": o.worst_ratio, "where": o.worst_what} for o in worst_list],
        "failures": [{"id": o.id, "status": o.status, "behaviours": o.tags, "problems": o.problems,
                      "api_problems": o.api_problems} for o in oc if o.status in FAILING],
        "tf_defects": [{"id": o.id, "status": o.status, "problems": o.problems}
                       for o in oc if o.golden_status == "tf_defect"],
        "expected_failures": [{"id": o.id, "status": o.status, "reason": o.xfail_reason}
                              for o in oc if o.status in ("xfail", "xpass")],
        "unsupported": [{"id": o.id, "feature": o.feature, "why": o.problems} for o in oc if o.status == "unsupported"],
        "skipped": [{"id": o.id, "why": o.problems} for o in oc if o.status == "skip"],
    }
    stem = f"conformance-{summary.backend}"
    with open(os.path.join(report_dir, stem + ".json"), "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
    png = heatmap(summary, os.path.join(report_dir, stem + ".png"))
    L = [f"# Conformance report: {summary.impl} on `{summary.backend}`", ""]
    L.append(summary.summary_line().split(" -- ", 1)[1] + f" ({len(oc)} cases, {summary.elapsed:.1f} s)")
    L.append("")
    if summary.interrupted:
        L += [f"**Interrupted**: {len(oc)} of {summary.total} selected cases ran; this report covers those.", ""]
    if summary.numerics_only:
        L += ["Keras API checks (fused flag, weight names, trainable, get_config) skipped (`--numerics-only`).", ""]
    L += ["Statuses: `pass`; `fail` (numerics or error parity); `api_fail` (only the Keras API checks fail); "
          "`unsupported` (NotImplementedError, or declared); `xfail` / `xpass` (listed as expected failures, "
          "failing / passing); `tf_defect` (TF itself fails; the port ran and gave finite values of the right "
          "dtype and shape; a TF-defect case that does not is a `fail`); `skip` (the array library lacks a dtype).",
          ""]
    L += ["## Which TF behaviours this port gets wrong", "",
          "Every case is tagged with the TF behaviours it exercises (`conformance.cases.behaviours`). "
          "*Likely causes*: behaviours wrong (fail or expected failure) in at least 75% of the compared cases "
          "that exercise them, taken greedily by the number of wrong cases they explain that an earlier row "
          "did not.", ""]
    if causes:
        L += ["| behaviour | explains | wrong | of | % | example | first problem | what TF does |",
              "|---|---|---|---|---|---|---|---|"]
        for t, new, w, n, ex, p in causes:
            L.append(f"| `{t}` | {new} | {w} | {n} | {100 * w / n:.0f} | `{_md(ex)}` | {_md(p[:140])} "
                     f"| {_md(describe(t))} |")
        if unexplained:
            L.append(f"| (no single behaviour) | {unexplained} | | | | | | |")
    else:
        L.append("None: every compared case passes (or is a TF defect handled as intended)." if not behaviours
                 else f"No behaviour is wrong in 75% of its cases; {unexplained} wrong cases, see below.")
    if behaviours:
        L += ["", "All behaviours with wrong cases, by share:", "",
              "| behaviour | wrong | of | % | example |", "|---|---|---|---|---|"]
        for t, w, n, ex, _ in behaviours:
            L.append(f"| `{t}` | {w} | {n} | {100 * w / n:.0f} | `{_md(ex)}` |")
    L += ["", "## By failure kind (first problem of each failing or expected-failing case)", ""]
    if kinds:
        L += ["| kind | cases | example |", "|---|---|---|"]
        for k, n in kinds.most_common():
            L.append(f"| {_md(k)} | {n} | `{_md(kind_example[k].id)}` |")
    else:
        L.append("None.")
    if api_kinds:
        L += ["", "Keras API checks failing (cases; a case may fail several):", ""]
        L += [f"- {k}: {n}" for k, n in api_kinds.most_common()]
    L += ["", f"## Unsupported ({counts['unsupported']}), by feature", ""]
    if feats:
        L += ["| feature | cases | example | reason |", "|---|---|---|---|"]
        for f_, n in feats:
            e = feat_example[f_]
            L.append(f"| `{_md(f_)}` | {n} | `{_md(e.id)}` | {_md(_first(e)[:160])} |")
    else:
        L.append("None.")
    if xf_reasons:
        L += ["", "## Expected failures by reason", "", "| reason | cases |", "|---|---|"]
        L += [f"| {_md(r)} | {n} |" for r, n in xf_reasons.most_common()]
    L.append("")
    if png:
        L += [f"![pass share by argument pair]({os.path.basename(png)})", ""]
    L += ["## By group", "", "| group | " + " | ".join(STATUSES) + " |", "|---" * (len(STATUSES) + 1) + "|"]
    for g, c in sorted(by_group.items()):
        L.append(f"| {g} | " + " | ".join(str(c.get(s, 0)) for s in STATUSES) + " |")
    L += ["", "## By argument", "", "| argument | value | pass | fail | unsupported | xfail | other |",
          "|---|---|---|---|---|---|---|"]
    for k, vs in dims.items():
        for v, c in vs.items():
            other = sum(n for s, n in c.items() if s not in ("pass", "fail", "unsupported", "xfail"))
            L.append(f"| {k} | `{_md(v)}` | {c.get('pass', 0)} | {c.get('fail', 0)} | {c.get('unsupported', 0)} "
                     f"| {c.get('xfail', 0)} | {other} |")
    L += ["", f"## Worst {len(worst_list)} cases (largest |diff| / allowed)", "",
          "| case | status | max abs | max rel | diff/allowed | where |", "|---|---|---|---|---|---|"]
    for o in worst_list:
        L.append(f"| `{_md(o.id)}` | {o.status} | {o.max_abs:.3g} | {o.max_rel:.3g} | {o.worst_ratio:.3g} "
                 f"| {_md(o.worst_what)} |")
    fails = [o for o in oc if o.status in FAILING]
    L += ["", f"## Failures ({len(fails)})", ""]
    for o in fails[:200]:
        L.append(f"- `{o.id}` ({o.status})")
        for p in (o.problems + o.api_problems)[:5]:
            L.append(f"  - {p}")
    if len(fails) > 200:
        L.append(f"- ... {len(fails) - 200} more in the JSON report")
    with open(os.path.join(report_dir, stem + ".md"), "w") as f:
        f.write("\n".join(L) + "\n")
    return data
