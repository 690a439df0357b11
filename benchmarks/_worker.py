"""One phase of the benchmark for some backends, in a fresh process; results as JSON.

``python -m benchmarks._worker --phase time|memory --backends numpy,tf --out FILE --warmup N --repeats N
--schedule NAME [--allocator-defaults]``,
run from the repository root. ``python -m benchmarks`` starts it:

* for the memory phase of every backend, so that glibc's allocator is pinned
  (``mallopt``) before the process allocates anything and no buffer freed by
  another library is reused unseen, which would hide allocations from RSS;
* for both phases of TensorFlow when ``--tf-python`` names another interpreter
  (it needs tensorflow + tf-keras and NumPy only).
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--phase", choices=("time", "memory"), required=True)
    p.add_argument("--backends", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--schedule", default="auto")
    p.add_argument("--allocator-defaults", action="store_true")
    args = p.parse_args(argv)
    if args.phase == "memory":
        from ._measure import pin_malloc

        pin_malloc()  # before any large allocation
    elif not args.allocator_defaults:
        from ._measure import keep_freed_memory

        keep_freed_memory()  # as the timings of the main process
    if "tf" in args.backends.split(","):
        os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from .run import collect_targets, run_phase

    targets, skipped = collect_targets(args.backends.split(","))
    results = run_phase(targets, args.phase, warmup=args.warmup, repeats=args.repeats, schedule=args.schedule)
    versions = {}
    for mod in ("numpy", "tensorflow", "tf_keras", "torch", "jax"):
        m = sys.modules.get(mod)
        if m is not None:
            versions[mod] = str(getattr(m, "__version__", "?"))
    with open(args.out, "w") as f:
        json.dump({"skipped": skipped, "results": results, "versions": versions}, f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
