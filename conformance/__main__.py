"""``python -m conformance``: run the conformance goldens against an implementation."""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter

from . import runner


def main(argv=None):
    ap = argparse.ArgumentParser(
        prog="python -m conformance",
        description="Replay TensorFlow BatchNormalization goldens against arraybn or another port.")
    ap.add_argument("--backend", default="numpy", choices=runner.BACKENDS + ["torch_cuda"])
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
    ap.add_argument("--xfails", default=runner.DEFAULT_XFAILS, help="expected-failure list ('' for none)")
    ap.add_argument("--report", default=None, metavar="DIR", help="write markdown/JSON/PNG report here")
    ap.add_argument("--exec-batch", type=int, default=400, help="cases per external program invocation")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--list", action="store_true", help="list matching case ids and exit")
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
        for _, case in runner.iter_cases(a.goldens, a.include, a.exclude, a.stride):
            print(case["id"], case["status"])
        return 0
    import arraybn

    with arraybn.schedule(a.schedule):
        s = runner.run(backend=a.backend, impl=a.impl, exec_cmd=a.exec_cmd, include=a.include, exclude=a.exclude,
                       goldens=a.goldens, xfails=a.xfails or None, report_dir=a.report,
                       progress=not a.no_progress, exec_batch=a.exec_batch, stride=a.stride)
    c = Counter(o.status for o in s.outcomes)
    print(f"{s.impl} on {s.backend}: {len(s.outcomes)} cases in {s.elapsed:.1f}s -- "
          + ", ".join(f"{k} {c.get(k, 0)}" for k in ("pass", "fail", "xfail", "xpass", "skip")))
    nd = sum(o.golden_status == "tf_defect" for o in s.outcomes)
    print(f"TF defects: {nd} (implementation ok on {c.get('defect_ok', 0)}, failing on {c.get('defect_fail', 0)})")
    print(f"Expected failures: {c.get('xfail', 0)} (+{c.get('xpass', 0)} listed but passing)")
    if s.failures:
        print(f"FAILED: {len(s.failures)} case(s)", file=sys.stderr)
        print(s.failure_text(a.max_failures), file=sys.stderr)
    if a.report:
        print(f"report: {a.report}")
    return s.exit_code


if __name__ == "__main__":
    sys.exit(main())
