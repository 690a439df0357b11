"""The framework matrix: run every adapter of ``conformance.adapters`` and write docs/frameworks.md.

    python -m conformance.matrix [--stride K] [--jobs 2] [--reports build/matrix] [--out docs/frameworks.md]

Each adapter runs in its own process (``python -m conformance --impl ... --numerics-only
--report DIR``) on the NumPy backend; the page is written from their JSON reports. A framework
that is not installed is listed as such.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from . import runner
from .adapters import ADAPTERS
from .report import describe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: the Python distributions each adapter needs (their versions go on the page)
PACKAGES = {
    "torch.nn.functional.batch_norm": ["torch"],
    "torch.nn.BatchNorm*d": ["torch"],
    "keras.layers.BatchNormalization (Keras 3)": ["keras", "torch"],
    "flax.linen.BatchNorm": ["flax", "jax", "jaxlib"],
    "ONNX Runtime BatchNormalization": ["onnxruntime", "onnx"],
}

_F16 = ("a float16 policy ported as float16 everywhere keeps gamma, beta and the moving statistics in float16; "
        "TF's batch norm keeps the weights of a 16-bit policy in float32, so the moving statistics (and with "
        "them the outputs) drift by float16 roundings.")
_ROUND = ("float64 moving statistics decay by `1 - momentum` computed in float64; TF rounds `1 - momentum` to "
          "float32 first (about 1e-9 relative).")
_ADAPTER_AXIS = ("the adapter rejects `axis=['a']` at construction (TypeError); TF at build: an artefact of the "
                 "adapter's argument parsing, not of the framework.")

#: plain words for a deviation found, per (framework, behaviour); printed only where the run shows it
EXPLAIN = {
    **{(f, "policy:float16"): _F16 for f in ("torch.nn.functional.batch_norm", "torch.nn.BatchNorm*d",
                                             "flax.linen.BatchNorm", "ONNX Runtime BatchNormalization")},
    **{(f, "momentum:rounding"): _ROUND for f in ("flax.linen.BatchNorm", "ONNX Runtime BatchNormalization")},
    **{(f, "error:TypeError@build"): _ADAPTER_AXIS for f in (
        "torch.nn.functional.batch_norm", "torch.nn.BatchNorm*d", "flax.linen.BatchNorm",
        "ONNX Runtime BatchNormalization")},
    ("keras.layers.BatchNormalization (Keras 3)", "policy:float16"):
        "Keras 3 under a float16 policy keeps its batch-norm weights in float16; TF keeps them in float32.",
    ("keras.layers.BatchNormalization (Keras 3)", "regularizer"):
        "Keras 3 no longer accepts the regularizer name `\"l1_l2\"` (`ValueError: Could not interpret "
        "regularizer identifier` at construction).",
    ("keras.layers.BatchNormalization (Keras 3)", "error:ValueError@step"):
        "a constraint over an axis the parameters do not have: TF raises ValueError at the optimizer step, "
        "Keras 3 (torch backend) an IndexError.",
    ("keras.layers.BatchNormalization (Keras 3)", "error:TypeError@call"):
        "`momentum=None`: Keras 3 raises at construction, TF only when a call reads it.",
    ("torch.nn.BatchNorm*d", "path:nonfused"):
        "the running variance is updated with the unbiased batch variance (as torch.nn.functional), and a "
        "call without an explicit mode (`training=None`) runs a new module in training mode.",
    ("flax.linen.BatchNorm", "mask:fully_masked"):
        "with every position masked Flax divides 0 by 0 (NaN outputs); TF's divide-no-nan gives mean 0 and "
        "variance 0.",
    ("ONNX Runtime BatchNormalization", "error:ValueError@call"):
        "a second call with another number of channels: ONNX Runtime raises its own InvalidArgument error "
        "(not a ValueError).",
    ("torch.nn.functional.batch_norm", "moving_variance:biased"):
        "torch always updates `running_var` with the unbiased batch variance (divided by n - 1); TF's "
        "non-fused path uses the biased one (divided by n), so every training update of the moving "
        "variance differs by the factor n / (n - 1).",
    ("torch.nn.functional.batch_norm", "epsilon:0"):
        "torch refuses `eps=0` in training (`ValueError: batch_norm eps must be positive during "
        "training`); TF accepts it (a zero variance then gives inf/NaN, as in TF).",
    ("torch.nn.functional.batch_norm", "reduction:1"):
        "torch refuses a training batch with one value per channel (`Expected more than 1 value per "
        "channel when training`); TF normalizes it (variance 0).",
    ("torch.nn.BatchNorm*d", "moving_variance:biased"):
        "as torch.nn.functional: the running variance is updated with the unbiased batch variance.",
    ("torch.nn.BatchNorm*d", "training:none"):
        "a module is in training mode until `eval()` is called, so a call without an explicit mode "
        "normalizes with the batch statistics and updates them; in eager tf-keras v1 `training=None` "
        "is inference.",
    ("torch.nn.BatchNorm*d", "frozen"):
        "`requires_grad=False` freezes gamma and beta only: in training mode the running statistics "
        "are still updated; TF's `trainable=False` updates nothing (and still normalizes with the "
        "batch statistics).",
    ("torch.nn.BatchNorm*d", "epsilon:0"):
        "as torch.nn.functional: `eps=0` is refused in training.",
    ("torch.nn.BatchNorm*d", "reduction:1"):
        "as torch.nn.functional: one value per channel is refused in training.",
    ("keras.layers.BatchNormalization (Keras 3)", "frozen"):
        "Keras 3 runs a layer with `trainable=False` in inference mode (moving statistics) even when "
        "called with `training=True`; the v1 layer normalizes with the batch statistics and only skips "
        "the update.",
    ("keras.layers.BatchNormalization (Keras 3)", "path:fused"):
        "Keras 3 has no fused path: the moving variance is updated with the biased variance where the "
        "v1 layer's fused kernel uses the unbiased one (n / (n - 1)), and masks are used where the "
        "fused kernel ignores them.",
    ("keras.layers.BatchNormalization (Keras 3)", "moving_variance:bessel"):
        "Keras 3 has no fused path: the moving variance is updated with the biased variance where the "
        "v1 layer's fused kernel uses the unbiased one (n / (n - 1)).",
    ("keras.layers.BatchNormalization (Keras 3)", "mask:ignored_on_fused"):
        "the v1 layer ignores a mask on its fused path; Keras 3 always uses it.",
    ("flax.linen.BatchNorm", "moving_variance:bessel"):
        "Flax updates the running variance with the biased variance; the v1 layer's fused kernel uses "
        "the unbiased one.",
    ("flax.linen.BatchNorm", "path:fused"):
        "Flax has one path, like TF's non-fused one: the fused kernel's unbiased moving variance and "
        "its ignoring of masks are not reproduced.",
    ("ONNX Runtime BatchNormalization", "moving_variance:bessel"):
        "ONNX's training mode updates the running variance with the biased variance; the v1 layer's "
        "fused kernel uses the unbiased one.",
    ("ONNX Runtime BatchNormalization", "path:fused"):
        "ONNX's training mode updates the running variance with the biased variance; the v1 layer's "
        "fused kernel (rank 4/5) uses the unbiased one.",
}


def _version(dist):
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _slug(name):
    return "".join(c if c.isalnum() else "_" for c in name).strip("_").lower()


def run_one(name, spec, reports, stride, include):
    out = os.path.join(reports, _slug(name))
    cmd = [sys.executable, "-m", __package__, "--impl", spec, "--numerics-only", "--xfails", "",
           "--no-progress", "--report", out, "--stride", str(stride)]
    if include:
        cmd += ["--include", include]
    t0 = time.time()
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.time() - t0
    path = os.path.join(out, "conformance-numpy.json")
    if not os.path.exists(path):
        return {"name": name, "error": (p.stderr or p.stdout)[-1500:], "wall_s": wall}
    with open(path) as f:
        data = json.load(f)
    data["name"], data["wall_s"], data["spec"] = name, wall, spec
    return data


def _git(*args):
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        return "?"


def _cpu():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def write_page(results, path, command, wall, load=None, cpu_s=None):
    man = runner.load_manifest()
    tfv = man.get("versions", {})
    commit = _git("rev-parse", "--short", "HEAD") + (" (with uncommitted changes)" if _git("status", "--porcelain",
                                                                                         "--untracked-files=no") else "")
    L = ["# How each framework differs from TF's v1 layer", "",
         "Generated by `" + command + "`: every adapter of `conformance/adapters/` replayed against the "
         f"TensorFlow goldens (TF {tfv.get('tensorflow', '?')}, tf-keras {tfv.get('tf_keras', '?')}, "
         "`tf.compat.v1.keras.layers.BatchNormalization`), numerics and error parity only "
         "(`--numerics-only`: none of these frameworks has Keras's `get_config`), on the NumPy backend "
         "(the 60 bfloat16 cases are skipped: NumPy has no bfloat16).", "",
         f"Date {datetime.date.today().isoformat()}, commit `{commit}`, machine: {_cpu()}, "
         f"{os.cpu_count()} cores, {platform.system()} {platform.machine()}, Python {platform.python_version()}; "
         f"the whole matrix took {wall:.0f} s wall clock"
         + (f" ({cpu_s:.0f} CPU-seconds in the adapters' processes)" if cpu_s is not None else "")
         + (f"; load average {load[0]:.1f} at the start, {load[1]:.1f} at the end (other work shared the machine: "
            "the times per framework are upper bounds)" if load and max(load) > (os.cpu_count() or 1) else
            f"; load average {load[0]:.1f} at the start, {load[1]:.1f} at the end" if load else "") + ".", "",
         "An adapter maps TF's arguments to the framework's conventions and raises `NotImplementedError` "
         "for what the framework cannot express (`unsupported`); the remaining failures are deviations. "
         "Each case is tagged with the TF behaviours it exercises (`conformance.cases.behaviours`); "
         "*likely causes* are the behaviours wrong in at least 75% of the compared cases that exercise "
         "them, taken greedily by the failures they explain (docs/conformance.md, \"Report\").", "",
         "## Headline", "",
         "| framework | versions | pass | fail | unsupported | skip | likely causes (cases explained) | time |",
         "|---|---|---|---|---|---|---|---|"]
    for r in results:
        vers = ", ".join(f"{d} {_version(d)}" for d in PACKAGES.get(r["name"], []) if _version(d))
        if "error" in r:
            L.append(f"| {r['name']} | {vers or 'not installed'} | – | – | – | – | did not run | – |")
            continue
        c = r["counts"]
        causes = ", ".join(f"`{x['behaviour']}` ({x['explains']})" for x in r["likely_causes"][:4]) or "none"
        L.append(f"| {r['name']} | {vers} | {c['pass']} | {c['fail']} | {c['unsupported']} | {c['skip']} "
                 f"| {causes} | {r['elapsed_s']:.0f} s |")
    ran = [r for r in results if "error" not in r]
    tags = sorted({b["behaviour"] for r in ran for b in r["behaviours_wrong"]})
    L += ["", "## Wrong cases per TF behaviour", "",
          "Cases wrong / cases compared that exercise the behaviour (blank: none compared).", "",
          "| behaviour | " + " | ".join(r["name"] for r in ran) + " |", "|---" * (len(ran) + 1) + "|"]
    for t in tags:
        cells = []
        for r in ran:
            bw = {b["behaviour"]: b for b in r["behaviours_wrong"]}
            st = r["by_behaviour"].get(t, {})
            n = sum(v for k, v in st.items() if k in ("pass", "fail", "api_fail", "xfail", "xpass", "tf_defect"))
            cells.append(f"{bw[t]['wrong']}/{n}" if t in bw else (f"0/{n}" if n else ""))
        L.append(f"| `{t}` | " + " | ".join(cells) + " |")
    for r in results:
        L += ["", f"## {r['name']}", ""]
        if "error" in r:
            L += ["Did not run:", "", "```", r["error"].strip(), "```"]
            continue
        mod = importlib.import_module(r["spec"].split(":")[0])
        L += ["**Mapping.** " + " ".join((mod.__doc__ or "").split("\n\n", 1)[-1].split()), ""]
        c = r["counts"]
        L.append(f"{sum(c.values())} cases: " + ", ".join(f"{k} {v}" for k, v in c.items() if v) + ".")
        L += ["", "**Deviations** (likely causes):", ""]
        if not r["likely_causes"]:
            L.append("- none found.")
        for x in r["likely_causes"]:
            t = x["behaviour"]
            note = EXPLAIN.get((r["name"], t))
            L.append(f"- `{t}`: {x['wrong']} of {x['compared']} cases wrong ({x['explains']} explained here), "
                     f"e.g. `{x['example']}`. TF: {describe(t)}. "
                     + (f"Here: {note}" if note else f"First problem: {x['example_problem'][:200]}"))
        if r.get("unexplained_wrong"):
            L.append(f"- {r['unexplained_wrong']} wrong cases no single behaviour explains (see the report).")
        fk = r.get("failure_kinds", {})
        if fk:
            L += ["", "Failure kinds (first problem): " + "; ".join(f"{k} {v['cases']}" for k, v in fk.items()) + "."]
        uf = r.get("unsupported_by_feature", {})
        if uf:
            L += ["", "**Unsupported** (feature: cases): " + ", ".join(
                f"`{f}` {v['cases']}" for f, v in uf.items()) + "."]
    L += ["", "Reports with every failing case: rerun the command with `--reports DIR`; one framework: "
          "`python -m conformance --impl conformance.adapters.<module>:factory --numerics-only --report DIR`.", ""]
    with open(path, "w") as f:
        f.write("\n".join(L))


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m conformance.matrix", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "frameworks.md") if os.path.isdir(
        os.path.join(ROOT, "docs")) else "frameworks.md")
    ap.add_argument("--reports", default=os.path.join(ROOT, "build", "matrix"))
    ap.add_argument("--stride", type=int, default=1)
    ap.add_argument("--include", default=None, help="regex on case ids")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--only", default=None, help="substring of the framework names to run")
    a = ap.parse_args(argv)
    names = [n for n in ADAPTERS if not a.only or a.only in n]
    import resource

    load0 = os.getloadavg()[0]
    t0 = time.time()
    with ThreadPoolExecutor(a.jobs) as ex:
        results = list(ex.map(lambda n: run_one(n, ADAPTERS[n], a.reports, a.stride, a.include), names))
    wall = time.time() - t0
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = ru.ru_utime + ru.ru_stime
    cmd = "python -m conformance.matrix" + "".join(
        f" {k} {v}" for k, v in (("--stride", a.stride if a.stride != 1 else None), ("--include", a.include),
                                 ("--only", a.only)) if v)
    write_page(results, a.out, cmd, wall, (load0, os.getloadavg()[0]), cpu_s)
    for r in results:
        print(r["name"], "ERROR" if "error" in r else r["counts"], f"{r['wall_s']:.0f}s")
    print(f"matrix: {wall:.0f} s -> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
