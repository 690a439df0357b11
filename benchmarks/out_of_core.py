"""``python -m benchmarks.out_of_core``: a training call on an input larger than memory, on a dask cluster.

The input is ``1000 + 0.1 * N(0, 1)`` float32 of shape ``(rows, 64)``, generated
lazily in chunks of ``--chunk-rows`` rows (nothing is ever held whole). One
``dask.compute`` forms the new moving mean and variance and a reduction of the
output (``y.sum(axis=0)``) on a ``distributed.LocalCluster`` whose workers have
a memory limit; a progress bar shows the tasks. The same data is then reduced
by dask's own ``mean``/``var`` (in float64, the accuracy yardstick and the
throughput peer). Printed: size, wall time, GiB/s, the workers' peak memory,
and the errors of the moving statistics against float64.

On a multi-machine cluster, pass ``--scheduler tcp://host:8786``: the same code
runs there (each worker generates its own chunks).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from typing import Any

import numpy as np


def _data(rows: int, chunk_rows: int, channels: int) -> Any:
    import dask.array as da

    rs = da.random.RandomState(0)
    return (1000.0 + 0.1 * rs.standard_normal((rows, channels), chunks=(chunk_rows, channels))).astype(np.float32)


def _peak_worker_memory(client: Any) -> float:
    """The largest resident memory any worker reached (GiB), from each worker's own process."""

    def peak() -> int:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    return max(client.run(peak).values()) / 2**30


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.out_of_core")
    p.add_argument("--gib", type=float, default=32.0, help="input size in GiB (float32)")
    p.add_argument("--chunk-rows", type=int, default=2**19, help="rows per chunk (2**19 x 64 float32: 128 MiB)")
    p.add_argument("--channels", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--memory-limit", default="4GiB", help="per worker")
    p.add_argument("--scheduler", default=None, help="address of an existing cluster (default: a LocalCluster)")
    p.add_argument("--schedule", default="auto", help="arraybn's schedule (auto, reference)")
    p.add_argument("--skip-peer", action="store_true", help="skip dask's own mean/var (and the accuracy check)")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)

    import dask
    import distributed
    from distributed.diagnostics.progressbar import progress

    import arraybn

    rows = int(a.gib * 2**30 / (4 * a.channels))
    rows -= rows % a.chunk_rows
    if a.scheduler:
        client = distributed.Client(a.scheduler)
    else:
        cluster = distributed.LocalCluster(
            n_workers=a.workers, threads_per_worker=1, memory_limit=a.memory_limit, dashboard_address=None
        )
        client = distributed.Client(cluster)
    x = _data(rows, a.chunk_rows, a.channels)
    gib = rows * a.channels * 4 / 2**30
    print(f"input: {x.shape} float32, {gib:.1f} GiB in {x.npartitions} chunks; workers: {a.workers} x {a.memory_limit}")

    layer = arraybn.BatchNormalization(momentum=0.0)  # the moving statistics become the batch's
    t0 = time.perf_counter()
    with arraybn.schedule(a.schedule):
        y = layer(x, training=True)
    futures = client.compute([layer.moving_mean, layer.moving_variance, y.sum(axis=0)])
    progress(futures)
    mean, variance, _ = client.gather(futures)
    wall = time.perf_counter() - t0
    peak = _peak_worker_memory(client)
    result: dict[str, Any] = {
        "gib": gib,
        "rows": rows,
        "chunks": x.npartitions,
        "schedule": a.schedule,
        "arraybn_wall_s": wall,
        "arraybn_gib_per_s": gib / wall,
        "peak_worker_rss_gib": peak,
        "workers": a.workers,
        "memory_limit": a.memory_limit,
    }
    print(f"\narraybn training call + moving statistics + sum(y): {wall:.1f} s, {gib / wall:.3f} GiB/s, "
          f"peak worker RSS {peak:.2f} GiB")
    if not a.skip_peer:
        x64 = _data(rows, a.chunk_rows, a.channels).astype(np.float64)
        t0 = time.perf_counter()
        futures = client.compute([x64.mean(axis=0), x64.var(axis=0)])
        progress(futures)
        true_mean, true_var = client.gather(futures)
        peer = time.perf_counter() - t0
        result.update(
            dask_mean_var_wall_s=peer,
            dask_gib_per_s=gib / peer,
            moving_mean_max_abs_error=float(np.max(np.abs(np.asarray(mean, np.float64) - true_mean))),
            moving_variance_max_rel_error=float(np.max(np.abs(np.asarray(variance, np.float64) / true_var - 1))),
        )
        print(f"\ndask's own mean and var (float64): {peer:.1f} s, {gib / peer:.3f} GiB/s")
        print(f"moving mean error {result['moving_mean_max_abs_error']:.2e} (abs), "
              f"moving variance error {result['moving_variance_max_rel_error']:.2e} (relative)")
    result["machine"] = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "dask": dask.__version__,
        "commit": _commit(),
        "date": time.strftime("%Y-%m-%d"),
    }
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
    client.close()
    return 0


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


if __name__ == "__main__":
    raise SystemExit(main())
