"""``python -m conformance``: run the conformance goldens against an implementation."""

from __future__ import annotations

import argparse
import json
import os
import sys

from . import runner


def _list(a):
    from .cases import behaviours

    for chunk, case in runner.iter_cases(a.goldens, a.include, a.exclude, a.stride):
        if a.json:
            print(json.dumps({"id": case["id"], "group": chunk.group, "status": case["status"],
                              "behaviours": behaviours(case), "dims": case["dims"]}, sort_keys=True))
        else:
            print(f"{case['id']}\t{case['status']}")


def main(argv=None):
    ap = argparse.ArgumentParser(
        prog="python -m conformance",
        description="Replay TensorFlow BatchNormalization goldens against arraybn or another port.")
    ap.add_argument("--backend", default=None, choices=[*runner.BACKENDS, "torch_cuda"],
                    help="array library for --impl (default numpy); with --exec only passed on to the program")
    who = ap.add_mutually_exclusive_group()
    who.add_argument("--impl", default=None,
                     help="pkg.module:factory; factory(init_kwargs) -> layer (default: arraybn.BatchNormalization)")
    who.add_argument("--exec", dest="exec_cmd", default=None,
                     help="external program; called as CMD DIR (see docs/conformance.md)")
    ap.add_argument("--schedule", default="auto",
                    help="arraybn's schedule for the run: auto (default), reference (the plain Array API "
                         "code only) or a schedule's name (see arraybn.available_schedules())")
    ap.add_argument("--include", default=None, help="regex on case ids to run")
    ap.add_argument("--exclude", default=None, help="regex on case ids to skip")
    ap.add_argument("--goldens", default=runner.DEFAULT_GOLDENS)
    ap.add_argument("--xfails", default=None,
                    help="expected-failure file (.json, .toml or lines); default: arraybn's list when "
                         "testing arraybn, none otherwise; '' for none")
    ap.add_argument("--capabilities", default=None, metavar="FILE",
                    help="JSON/TOML file {\"unsupported\": {BEHAVIOUR_TAG: reason}}: cases with these "
                         "behaviours are not run and count as unsupported")
    ap.add_argument("--numerics-only", action="store_true",
                    help="skip the Keras API checks (fused flag, weight names, trainable, get_config)")
    ap.add_argument("--report", default=None, metavar="DIR", help="write markdown/JSON/PNG report here")
    ap.add_argument("--exec-batch", type=int, default=400, help="cases per external program invocation")
    ap.add_argument("--exec-timeout", type=float, default=None, metavar="S",
                    help="seconds one invocation of the external program may take (then: a crash)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--list", action="store_true", help="list matching case ids (tab, golden status) and exit")
    ap.add_argument("--json", action="store_true",
                    help="with --list: one JSON object per line (id, group, status, behaviours, dims)")
    ap.add_argument("--show", metavar="CASE_ID", help="print one case (metadata and arrays) as JSON")
    ap.add_argument("--max-failures", type=int, default=30, help="failures printed to stderr")
    ap.add_argument("--stride", type=int, default=1,
                    help="run every k-th case of each group (for slow backends such as dask)")
    a = ap.parse_args(argv)

    if a.show:
        case = runner.show_case(a.show, a.goldens)
        if case is None:
            print(f"no case {a.show!r}", file=sys.stderr)
            return 2
        print(json.dumps(case, indent=1, sort_keys=True))
        return 0
    if a.list:
        _list(a)
        return 0
    xfails = a.xfails
    if xfails is None:
        xfails = runner.DEFAULT_XFAILS if a.impl is None and a.exec_cmd is None else None
    import arraybn

    try:
        with arraybn.schedule(a.schedule):
            s = runner.run(backend=a.backend, impl=a.impl, exec_cmd=a.exec_cmd, include=a.include,
                           exclude=a.exclude, goldens=a.goldens, xfails=xfails or None, report_dir=a.report,
                           progress=not a.no_progress, exec_batch=a.exec_batch, stride=a.stride,
                           numerics_only=a.numerics_only, capabilities=a.capabilities, exec_timeout=a.exec_timeout)
    except runner.XFailFileError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(s.summary_line())
    feats = s.unsupported_by_feature()
    if feats:
        print("unsupported by feature: " + ", ".join(f"{f} {n}" for f, n in feats[:12])
              + (f", ... ({len(feats) - 12} more)" if len(feats) > 12 else ""))
    if s.numerics_only:
        print("Keras API checks (fused flag, weight names, trainable, config) skipped: --numerics-only")
    if s.failures:
        c = s.counts()
        print(f"FAILED: {len(s.failures)} case(s) (fail {c['fail']}, api_fail {c['api_fail']})", file=sys.stderr)
        print(s.failure_text(a.max_failures), file=sys.stderr)
    if s.interrupted:
        print(f"INTERRUPTED after {len(s.outcomes)} of {s.total} cases", file=sys.stderr)
    if a.report:
        print(f"report: {a.report}")
    return s.exit_code


def _main():
    try:
        rc = main()
        sys.stdout.flush()
    except BrokenPipeError:
        # output piped into `head` and the like: stop quietly (Python's documented recipe)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        rc = 0
    sys.exit(rc)


if __name__ == "__main__":
    _main()
