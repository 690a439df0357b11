"""``python -m benchmarks``: time arraybn, its peers and a copy side by side; write Markdown, JSON and a plot.

See ``docs/performance.md`` for the method. Timings are reported, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ._cases import CASES, MODES, make_inputs
from ._measure import extra_memory, keep_freed_memory, summarize, time_interleaved

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
ALL_BACKENDS = ("numpy", "torch", "torch-cuda", "cupy", "jax", "tf")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=(
            "Time arraybn's BatchNormalization (training forward, inference forward, training forward+backward) "
            "on NHWC, NCHW and 2-D float32 tensors against TensorFlow's v1 Keras layer, "
            "torch.nn.functional.batch_norm and a plain copy of the tensor."
        ),
    )
    p.add_argument("--quick", action="store_true", help="1 warm-up call and 5 timed calls per measurement (default 3 and 15)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls before timing")
    p.add_argument("--repeats", type=int, default=None, help="timed calls; the median is reported")
    p.add_argument(
        "--backends",
        default=",".join(ALL_BACKENDS),
        help=(
            "comma-separated subset of " + ",".join(ALL_BACKENDS) + " (default: all; the ones that are not "
            "installed or have no device are skipped and named). 'torch' includes torch.nn.functional.batch_norm "
            "and 'tf' is TensorFlow's layer."
        ),
    )
    p.add_argument(
        "--tf-python",
        default=None,
        metavar="PYTHON",
        help=(
            "an interpreter with tensorflow + tf-keras, used for the TensorFlow part (run in a subprocess, "
            "results merged) when TensorFlow is not importable here"
        ),
    )
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    p.add_argument(
        "--allocator-defaults",
        action="store_true",
        help="time with glibc's default trimming (freed memory may go back to the system and be faulted in again "
        "by a later call; by default it is kept: benchmarks/_measure.keep_freed_memory)",
    )
    p.add_argument(
        "--schedule",
        default="auto",
        help="arraybn's schedule for every arraybn row (default auto; reference, or a name from "
        "arraybn.available_schedules(), e.g. numpy-blocked to time the code without the Numba loops)",
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: benchmarks/results)")
    args = p.parse_args(argv)
    if args.warmup is None:
        args.warmup = 1 if args.quick else 3
    if args.repeats is None:
        args.repeats = 5 if args.quick else 15
    return args


# ---------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------


def _modes_of(target: Any) -> list[str]:
    return ["copy"] if target.kind == "copy" else list(MODES)


def run_phase(
    targets: list[Any], phase: str, *, warmup: int = 3, repeats: int = 15, schedule: str = "auto"
) -> list[dict[str, Any]]:
    """``phase="time"``: median of ``repeats`` calls per target, case and mode; ``"memory"``: peak extra bytes.

    arraybn's rows run under ``arraybn.schedule(schedule)``.
    """
    import contextlib

    try:
        import arraybn
    except ImportError:  # the TensorFlow worker's interpreter may not have arraybn
        setting: Any = contextlib.nullcontext()
    else:
        setting = arraybn.schedule(schedule)
    with setting:
        return _run_phase(targets, phase, warmup=warmup, repeats=repeats)


def _run_phase(targets: list[Any], phase: str, *, warmup: int, repeats: int) -> list[dict[str, Any]]:
    """Every target and mode of a case prepared; then timed interleaved (`time_interleaved`), the rows of
    each ``--backends`` name together (a NumPy user's calls do not follow torch's), or measured one after
    the other (memory)."""
    from ._targets import Skip

    results: list[dict[str, Any]] = []
    for case in CASES:
        x, dy = make_inputs(case)
        ready: dict[str, list[tuple[dict[str, Any], Any]]] = {}
        for t in targets:
            for mode in _modes_of(t):
                row = {
                    "case": case.name,
                    "shape": list(case.shape),
                    "axis": case.axis,
                    "input_bytes": case.nbytes,
                    "mode": mode,
                    "implementation": t.name,
                    "kind": t.kind,
                    "family": t.family,
                    "note": t.note,
                }
                results.append(row)
                try:
                    fn = t.prepare(case, mode, x, dy)
                except Skip as err:
                    row["status"] = str(err)
                    continue
                except Exception as err:  # noqa: BLE001 - report, keep going
                    row["status"] = f"error: {type(err).__name__}: {err}"
                    continue
                row["note"] = "; ".join(n for n in (t.note, getattr(fn, "note", "")) if n)
                if phase == "time":
                    ready.setdefault(t.key, []).append((row, fn))
                    continue
                try:
                    fn()  # warm-up: first-call allocations (compilation, caches) are not the op's
                    row["extra_bytes"] = extra_memory(t.memory, fn)
                    row["memory_method"] = t.memory
                    row["status"] = "ok"
                except Exception as err:  # noqa: BLE001
                    row["status"] = f"error: {type(err).__name__}: {err}"
                del fn
                print(_progress(row, phase), file=sys.stderr, flush=True)
        for group in ready.values():
            faults: list[list[int]] = []
            times = time_interleaved([fn for _, fn in group], warmup=warmup, repeats=repeats, faults=faults)
            for (row, _), got, faulted in zip(group, times, faults, strict=True):
                if isinstance(got, BaseException):
                    row["status"] = f"error: {type(got).__name__}: {got}"
                else:
                    row.update(summarize(got, faulted))
                    row["status"] = "ok"
                print(_progress(row, phase), file=sys.stderr, flush=True)
        del ready
    return results


def _progress(row: dict[str, Any], phase: str) -> str:
    what = f"{row['case']:<28} {row['mode']:<9} {row['implementation']:<45}"
    if row.get("status") != "ok":
        return f"{what} {row.get('status')}"
    if phase == "time":
        return f"{what} {row['median_s'] * 1e3:9.2f} ms"
    eb = row.get("extra_bytes")
    return f"{what} extra {'-' if eb is None else f'{eb / 2**20:.1f} MiB'}"


def collect_targets(backends: list[str]) -> tuple[list[Any], dict[str, str]]:
    from ._targets import FACTORIES, Skip

    targets, skipped = [], {}
    for key in backends:
        if key not in FACTORIES:
            msg = f"unknown backend {key!r}; choose from {', '.join(FACTORIES)}"
            raise SystemExit(msg)
        try:
            targets.extend(FACTORIES[key]())
        except ImportError as err:
            skipped[key] = f"not installed ({err.name or err})"
        except Skip as err:
            skipped[key] = str(err)
    return targets, skipped


def run_worker(python: str, phase: str, backends: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """Run `benchmarks._worker` with ``python`` (a fresh process) and return its JSON payload."""
    root = Path(__file__).resolve().parent.parent
    fd, tmp = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    cmd = [python, "-m", "benchmarks._worker", "--phase", phase, "--backends", ",".join(backends), "--out", tmp,
           "--warmup", str(args.warmup), "--repeats", str(args.repeats), "--schedule", args.schedule]
    if args.allocator_defaults:
        cmd.append("--allocator-defaults")
    env = {**os.environ, "TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH", "")) if p)
    try:
        proc = subprocess.run(cmd, cwd=root, env=env, check=False)
        if proc.returncode != 0:
            why = f"the {phase} worker ({', '.join(backends)}) exited with status {proc.returncode}"
            return {"skipped": dict.fromkeys(backends, why), "results": [], "versions": {}}
        with open(tmp) as f:
            return json.load(f)
    finally:
        os.unlink(tmp)


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, check=True).stdout.strip()
        return out.stdout.strip() + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0], "platform": platform.platform(), "cpus": str(os.cpu_count()),
           "cpu": _cpu_model(), "commit": _commit(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    for mod in ("arraybn", "numpy", "array_api_compat", "numba", "torch", "jax", "cupy", "tensorflow", "tf_keras"):
        m = sys.modules.get(mod)
        if m is not None:
            out[mod] = str(getattr(m, "__version__", "?"))
    streaming = sys.modules.get("arraybn._schedules.numpy_blocked")
    if streaming is not None:  # arraybn's blocked CPU passes (NumPy) run on this many threads
        out["arraybn CPU threads (ARRAYBN_NUM_THREADS)"] = str(streaming.thread_count())
    return out


def _load() -> list[float] | None:
    """1/5/15-minute load averages: other work on the machine makes timings noisy; the report shows it."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _ms(row: dict[str, Any] | None) -> float | None:
    return None if row is None or row.get("status") != "ok" else row["median_s"] * 1e3


def _fmt(v: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return "–" if v is None else f"{v:{spec}}{suffix}"


def _mem(row: dict[str, Any]) -> str:
    eb = row.get("extra_bytes")
    if eb is None:
        return "–"
    return f"{eb / 2**20:.1f} MiB ({eb / row['input_bytes']:.2f}× x)"


FAULTING_SHARE = 0.1  # more timed calls than this mapped fresh memory in: the median mixes two speeds
SPREAD_LIMIT = 0.2  # an interquartile range above this fraction of the median: the timing is not to be trusted
FLOOR_SLACK = 0.9  # a ratio to the copy below 90% of the memory-traffic floor cannot be a real measurement


def flags(r: dict[str, Any], copy_ms: float | None) -> list[str]:
    """Why a measurement cannot be trusted: a median whose spread is large, calls that faulted fresh memory in,
    a time below the memory floor."""
    out = []
    if r.get("status") != "ok":
        return out
    if (r["q3_s"] - r["q1_s"]) > SPREAD_LIMIT * r["median_s"]:
        out.append(f"spread {100 * (r['q3_s'] - r['q1_s']) / r['median_s']:.0f}% of the median: rerun")
    faulting = r.get("faulting_calls", 0)
    if faulting > FAULTING_SHARE * r.get("repeats", 0):
        out.append(
            f"{faulting} of {r['repeats']} timed calls mapped fresh memory in (page faults: memory new to the "
            "process, or given back to the system before); the median mixes two speeds: rerun"
        )
    if r["mode"] != "copy" and copy_ms is not None:
        floor = MODES[r["mode"]][1]
        if r["median_s"] * 1e3 / copy_ms < FLOOR_SLACK * floor:
            out.append(
                f"{r['median_s'] * 1e3 / copy_ms:.2f}x a copy, below the memory floor {floor:.2f}x: "
                "the copy or this call was disturbed (or the output is lazy); rerun"
            )
    return out


def load_warning(meta: dict[str, Any]) -> str | None:
    """A warning when the machine was busy while it measured."""
    cpus = meta["versions"].get("cpus")
    loads = [v for k in ("start", "end") for v in (meta["load_average"].get(k) or [])[:1]]
    try:
        busy = cpus is not None and loads and max(loads) > 0.5 * float(cpus)
    except (TypeError, ValueError):
        return None
    if busy:
        return (f"**The machine was busy** (load average up to {max(loads):.2f} on {cpus} CPUs): "
                "the timings are not a quiet machine's; rerun before quoting them.")
    return None


def ratio_rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (case, mode, arraybn namespace): ×TF, ×torch F (same device), ×copy (same namespace)."""
    by = {(r["case"], r["mode"], r["implementation"]): r for r in results}
    copies = {(r["case"], r["family"]): r for r in results if r["kind"] == "copy"}
    peers = [r for r in results if r["kind"] == "peer"]
    out = []
    for r in results:
        if r["kind"] != "arraybn":
            continue
        ms = _ms(r)
        copy = _ms(copies.get((r["case"], r["family"])))
        tf = next((p for p in peers if p["case"] == r["case"] and p["mode"] == r["mode"]
                   and p["implementation"].startswith("tf.")), None)
        device = "cuda" if "cuda" in r["family"] else "cpu"
        torch_ref = by.get((r["case"], r["mode"], f"torch.nn.functional.batch_norm[{device}]"))
        out.append({
            "case": r["case"],
            "mode": r["mode"],
            "implementation": r["implementation"],
            "status": r.get("status"),
            "ms": ms,
            "x_tf": None if ms is None or _ms(tf) is None else ms / _ms(tf),
            "x_torch": None if ms is None or _ms(torch_ref) is None else ms / _ms(torch_ref),
            "x_copy": None if ms is None or copy is None else ms / copy,
            "floor_x_copy": MODES[r["mode"]][1],
            "extra": _mem(r),
        })
    return out


def markdown(results: list[dict[str, Any]], skipped: dict[str, str], meta: dict[str, Any]) -> str:
    lines = ["# arraybn benchmark", ""]
    v = meta["versions"]
    lines.append(f"{v.get('date', '?')}, commit {v.get('commit', '?')}, {v.get('cpu', '?')} ({v.get('cpus', '?')} CPUs); "
                 f"command: `python -m benchmarks {' '.join(meta.get('argv', []))}`")
    lines.append("")
    lines.append(
        f"{meta['warmup']} warm-up + {meta['repeats']} timed calls per measurement; medians. float32. "
        + ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
        + f". Load average at start {meta['load_average']['start']}, at end {meta['load_average']['end']}"
        + f" ({meta['versions'].get('cpus', '?')} CPUs)."
    )
    warning = load_warning(meta)
    copies = {(r["case"], r["family"]): _ms(r) for r in results if r["kind"] == "copy"}
    flagged = {id(r): flags(r, copies.get((r["case"], r["family"]))) for r in results}
    n_flagged = sum(bool(f) for f in flagged.values())
    if warning:
        lines += ["", warning]
    if n_flagged:
        lines += ["", f"**{n_flagged} measurement(s) flagged** (see the note column below): rerun before quoting them."]
    lines += ["", "## arraybn against its peers and the copy", ""]
    lines.append("| case | mode | arraybn on | median ms | ×TF | ×torch F | ×copy | floor ×copy | peak extra memory |")
    lines.append("|---|---|---|---:|---:|---:|---:|---:|---|")
    for r in ratio_rows(results):
        ms = _fmt(r["ms"]) if r["status"] == "ok" else str(r["status"])
        lines.append(
            f"| {r['case']} | {MODES[r['mode']][0]} | {r['implementation']} | {ms} | {_fmt(r['x_tf'])} | "
            f"{_fmt(r['x_torch'])} | {_fmt(r['x_copy'])} | {r['floor_x_copy']:.2f} | {r['extra']} |"
        )
    lines += ["", "## Every measurement", ""]
    lines.append("| case | mode | implementation | median ms | IQR ms | GB/s at the floor | peak extra memory | note |")
    lines.append("|---|---|---|---:|---:|---:|---|---|")
    for r in results:
        mode_label = "copy" if r["mode"] == "copy" else MODES[r["mode"]][0]
        if r.get("status") != "ok":
            lines.append(f"| {r['case']} | {mode_label} | {r['implementation']} | {r.get('status')} | | | | {r['note']} |")
            continue
        floor = 1.0 if r["mode"] == "copy" else MODES[r["mode"]][1]
        gbs = 2 * floor * r["input_bytes"] / r["median_s"] / 1e9
        note = "; ".join([n for n in (r["note"], *flagged[id(r)]) if n])
        lines.append(
            f"| {r['case']} | {mode_label} | {r['implementation']} | {r['median_s'] * 1e3:.2f} | "
            f"{(r['q3_s'] - r['q1_s']) * 1e3:.2f} | {gbs:.1f} | {_mem(r)} | {note} |"
        )
    if skipped:
        lines += ["", "## Skipped", ""]
        lines += [f"- **{k}**: {v}" for k, v in skipped.items()]
    lines += [
        "",
        "×X = arraybn's median / X's median (below 1: arraybn is faster). ×copy compares with a copy of the tensor "
        "in the same namespace on the same device; *floor ×copy* is the memory-traffic minimum in those units, "
        "for passes that write with streaming stores against a copy that writes with ordinary stores (which "
        "reads each output line before writing it): training forward 1.0 (read x twice, write y), inference "
        "0.67, forward+backward 2.67. Peak extra "
        "memory: bytes allocated beyond the inputs and the returned outputs, and that in units of x.",
        "",
    ]
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib not installed: no plot"
    impls = list(dict.fromkeys(r["implementation"] for r in results if r["kind"] != "copy"))
    fig, axes = plt.subplots(1, len(CASES), figsize=(6 * len(CASES), 4.8), sharey=False)
    axes = list(axes) if len(CASES) > 1 else [axes]
    width = 0.8 / max(len(impls), 1)
    for ax, case in zip(axes, CASES):
        rows = [r for r in results if r["case"] == case.name]
        for i, impl in enumerate(impls):
            vals = []
            for mode in MODES:
                r = next((r for r in rows if r["implementation"] == impl and r["mode"] == mode), None)
                vals.append(_ms(r) or 0.0)
            ax.bar([m + (i - (len(impls) - 1) / 2) * width for m in range(len(MODES))], vals, width, label=impl)
        for r in rows:
            if r["kind"] == "copy" and r.get("status") == "ok":
                ax.axhline(r["median_s"] * 1e3, linestyle="--", linewidth=1, color="k" if "numpy" in r["family"] else "gray")
        ax.set_xticks(range(len(MODES)), [MODES[m][0] for m in MODES], fontsize=8)
        ax.set_title(case.name, fontsize=10)
        ax.set_ylabel("median ms (dashed: copy of x)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    load_start = _load()
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    tf_elsewhere = False
    if "tf" in backends and args.tf_python is not None:
        import importlib.util

        tf_elsewhere = importlib.util.find_spec("tensorflow") is None
    local = [b for b in backends if not (b == "tf" and tf_elsewhere)]
    targets, skipped = collect_targets(local)
    # Phase 1: timings, in this process (TensorFlow in its own interpreter with --tf-python).
    allocator = None if args.allocator_defaults else keep_freed_memory()
    results = run_phase(targets, "time", warmup=args.warmup, repeats=args.repeats, schedule=args.schedule)
    versions = _versions()  # after the timings: the libraries they imported are listed
    versions["arraybn schedule (--schedule)"] = args.schedule
    versions["allocator (timings)"] = allocator or "the system's defaults"
    if tf_elsewhere:
        payload = run_worker(args.tf_python, "time", ["tf"], args)
        results += payload["results"]
        skipped.update(payload["skipped"])
        versions.update({f"{k} (--tf-python)": v for k, v in payload["versions"].items() if k.startswith("t")})
    elif "tf" in skipped and args.tf_python is None:
        skipped["tf"] += " (or pass --tf-python PYTHON: an interpreter with tensorflow and tf-keras)"
    del targets
    # Phase 2: peak extra memory, one fresh process per backend (see benchmarks/_worker.py).
    if not args.no_memory:
        index = {(r["case"], r["mode"], r["implementation"]): r for r in results}
        for key in backends:
            if key in skipped:
                continue
            python = args.tf_python if key == "tf" and tf_elsewhere else sys.executable
            payload = run_worker(python, "memory", [key], args)
            for m in payload["results"]:
                row = index.get((m["case"], m["mode"], m["implementation"]))
                if row is not None and m.get("status") == "ok":
                    row["extra_bytes"] = m["extra_bytes"]
                    row["memory_method"] = m["memory_method"]
    meta = {"warmup": args.warmup, "repeats": args.repeats, "versions": versions, "argv": sys.argv[1:],
            "load_average": {"start": load_start, "end": _load()}}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(
        json.dumps({"meta": meta, "skipped": skipped, "results": results, "ratios": ratio_rows(results)}, indent=1)
    )
    md = markdown(results, skipped, meta)
    why = plot(results, args.out / "results.png")
    if why:
        md += f"\n({why})\n"
    (args.out / "results.md").write_text(md)
    print(md)
    print(f"wrote {args.out / 'results.md'}, results.json, results.png", file=sys.stderr)
    return 0
