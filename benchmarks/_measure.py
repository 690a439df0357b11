"""Timing (medians of repeated calls after warm-up, the functions of a case interleaved) and peak-extra-memory measurement.

Memory methods, chosen per backend by the caller:

``tracemalloc``
    NumPy reports every array buffer to ``tracemalloc``: exact, allocation by
    allocation.
``rss``
    For libraries that bypass ``tracemalloc`` (torch CPU, TensorFlow, JAX CPU):
    a thread samples the resident set size (``/proc/self/statm``, else psutil)
    as fast as it can while the call runs; peak minus the value before the
    call. glibc's adaptive mmap threshold is pinned first (``mallopt``) so that
    freed buffers are returned to the OS and fresh ones are faulted in, which
    is what makes RSS track allocations; as a sampled value it can miss
    short-lived peaks, so it is a lower bound.
``cuda`` / ``cupy``
    ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``;
    a CuPy memory hook that tracks the pool's allocations.

In every case the reported number is *extra* memory: the peak minus what was
allocated before the call (the inputs) minus the bytes of the arrays the call
returns (the outputs).
"""

from __future__ import annotations

import gc
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any


def time_interleaved(
    fns: Sequence[Callable[[], Any]], *, warmup: int, repeats: int, faults: list[list[int]] | None = None
) -> list[list[float] | BaseException]:
    """Seconds per call of each of ``fns``, the calls interleaved: round ``r`` calls every function once,
    starting from the ``r``-th (GC off while timing).

    A machine whose speed drifts (other tenants of a virtual machine, a CPU's
    clock) then slows every function alike, and the ratios of their medians
    keep what a run of one function after the other would lose. A function
    that raises is dropped from later rounds; its entry is the exception.
    ``faults`` (a list, filled here): per function, the minor page faults of
    each timed call (`page_faults`; empty where the system does not count them).
    """
    outcome: list[list[float] | BaseException] = [[] for _ in fns]
    counted: list[list[int]] = [[] for _ in fns]
    if faults is not None:
        faults[:] = counted
    for _ in range(warmup):
        for i, fn in enumerate(fns):
            if isinstance(outcome[i], BaseException):
                continue
            try:
                out = fn()
                del out
            except Exception as err:  # noqa: BLE001 - reported in the function's row
                outcome[i] = err
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(repeats):
            for k in range(len(fns)):
                i = (r + k) % len(fns)
                times = outcome[i]
                if isinstance(times, BaseException):
                    continue
                try:
                    f0 = page_faults()
                    t0 = time.perf_counter()
                    out = fns[i]()
                    t1 = time.perf_counter()
                    f1 = page_faults()
                    del out
                except Exception as err:  # noqa: BLE001
                    outcome[i] = err
                    continue
                times.append(t1 - t0)
                if f0 is not None and f1 is not None:
                    counted[i].append(f1 - f0)
    finally:
        if was_enabled:
            gc.enable()
    return outcome


def page_faults() -> int | None:
    """This process's minor page faults so far (memory mapped in on first touch), or None where not counted."""
    try:
        import resource
    except ImportError:  # not a Unix system
        return None
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)


#: a call that faulted in at least this many pages (1 MiB of 4 KiB pages) mapped fresh memory for its arrays
FAULTING_PAGES = 256


def summarize(times: Sequence[float], faults: Sequence[int] | None = None) -> dict[str, float]:
    """Median, minimum and quartiles of ``times``; with ``faults`` (per call), how many calls mapped fresh memory."""
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
    out = {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "q1_s": q[0],
        "q3_s": q[2],
        "repeats": len(times),
    }
    if faults:
        out["faulting_calls"] = sum(f >= FAULTING_PAGES for f in faults)
    return out


def nbytes_of(outputs: Any) -> int:
    """Total bytes of the arrays in ``outputs`` (nested tuples/lists allowed)."""
    if outputs is None:
        return 0
    if isinstance(outputs, (tuple, list)):
        return sum(nbytes_of(o) for o in outputs)
    nb = getattr(outputs, "nbytes", None)
    if isinstance(nb, int):
        return nb
    if callable(nb):  # some tensor types expose nbytes() (not the ones used here)
        return int(nb())
    size = getattr(outputs, "size", None)
    itemsize = getattr(getattr(outputs, "dtype", None), "itemsize", None)
    if hasattr(outputs, "element_size"):  # torch
        return int(outputs.numel() * outputs.element_size())
    if size is not None and itemsize is not None:
        return int(size) * int(itemsize)
    shape = getattr(outputs, "shape", None)
    dtype = getattr(outputs, "dtype", None)
    if shape is not None and dtype is not None and hasattr(dtype, "size"):  # tf.DType
        n = dtype.size
        for s in shape:
            n *= int(s)
        return n
    return 0


# ---------------------------------------------------------------------------
# tracemalloc (NumPy)
# ---------------------------------------------------------------------------


def extra_tracemalloc(fn: Callable[[], Any], *, calls: int = 2) -> int:
    import tracemalloc

    best = 0
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    try:
        for _ in range(calls):
            gc.collect()
            base = tracemalloc.get_traced_memory()[0]
            tracemalloc.reset_peak()
            out = fn()
            peak = tracemalloc.get_traced_memory()[1]
            best = max(best, peak - base - nbytes_of(out))
            del out
    finally:
        if started:
            tracemalloc.stop()
    return best


# ---------------------------------------------------------------------------
# RSS sampling (torch CPU, TensorFlow, JAX CPU)
# ---------------------------------------------------------------------------

_MALLOC_PINNED = False


def _mallopt(mmap_threshold: int, trim_threshold: int) -> Any:
    """glibc's ``mallopt`` with a fixed mmap threshold (the adaptive one off) and trim threshold; glibc itself
    (a ``ctypes`` library) where both were taken, else None (another system or C library)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        if libc.mallopt(-3, mmap_threshold) != 1 or libc.mallopt(-1, trim_threshold) != 1:  # M_MMAP/M_TRIM_THRESHOLD
            return None
    except (OSError, AttributeError):
        return None
    return libc


def pin_malloc() -> None:
    """Make glibc return freed large buffers to the OS (fixed mmap threshold); no-op elsewhere.

    Call after the timings: it changes allocation cost (every large buffer is
    freshly mapped), so it is applied only for the memory phase.
    """
    global _MALLOC_PINNED
    if _MALLOC_PINNED:
        return
    libc = _mallopt(1 << 20, 1 << 20)  # 1 MiB
    if libc is not None:
        libc.malloc_trim(0)
        _MALLOC_PINNED = True


def keep_freed_memory() -> str | None:
    """Make glibc keep freed buffers of up to 32 MiB for reuse (no return to the OS); None where not applied.

    For the timings. By default glibc gives the top of its heap back to the
    system when enough is free, and the next large buffer is mapped in again
    page by page (one fault per 4 KiB: a 25 MiB output then costs several
    milliseconds more). Which calls pay that depends on the order of the
    allocations before them, so a case's timings fall into two groups and
    medians jump between runs for every implementation alike. With the
    thresholds fixed, each call reuses memory that an earlier call freed, as
    a long-running process does in its steady state. Buffers above 32 MiB
    (glibc's largest heap threshold) are still mapped per call; the report
    counts page faults per call and flags a row where they remain.
    """
    if _mallopt(32 << 20, 1 << 30) is None:
        return None
    return "glibc keeps freed memory (M_MMAP_THRESHOLD 32 MiB, M_TRIM_THRESHOLD 1 GiB; --allocator-defaults: not)"


def _rss_reader() -> Callable[[], int]:
    if os.path.exists("/proc/self/statm"):
        page = os.sysconf("SC_PAGE_SIZE")
        fd = os.open("/proc/self/statm", os.O_RDONLY)

        def read() -> int:
            return int(os.pread(fd, 128, 0).split()[1]) * page

        return read
    import psutil  # type: ignore[import-not-found]

    proc = psutil.Process()
    return lambda: int(proc.memory_info().rss)


def extra_rss(fn: Callable[[], Any], *, calls: int = 3) -> int:
    pin_malloc()
    read = _rss_reader()
    best = 0
    old_switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        for _ in range(calls):
            gc.collect()
            base = read()
            peak = [base]
            stop = threading.Event()

            def sample(peak: list[int] = peak, stop: threading.Event = stop) -> None:
                while not stop.is_set():
                    v = read()
                    if v > peak[0]:
                        peak[0] = v

            t = threading.Thread(target=sample, daemon=True)
            t.start()
            out = fn()
            stop.set()
            t.join()
            peak[0] = max(peak[0], read())
            best = max(best, peak[0] - base - nbytes_of(out))
            del out
    finally:
        sys.setswitchinterval(old_switch)
    return max(best, 0)


# ---------------------------------------------------------------------------
# GPUs
# ---------------------------------------------------------------------------


def extra_torch_cuda(fn: Callable[[], Any], *, calls: int = 2) -> int:
    import torch

    best = 0
    for _ in range(calls):
        gc.collect()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        best = max(best, peak - base - nbytes_of(out))
        del out
    return best


def extra_cupy(fn: Callable[[], Any], *, calls: int = 2) -> int:
    import cupy

    class PeakHook(cupy.cuda.MemoryHook):  # type: ignore[misc,name-defined]
        name = "arraybn-peak"

        def __init__(self) -> None:
            self.live: dict[int, int] = {}
            self.current = 0
            self.peak = 0

        def malloc_postprocess(self, **kw: Any) -> None:  # pool allocations (device_id, size, mem_size, mem_ptr, ...)
            self.live[kw["mem_ptr"]] = kw["mem_size"]
            self.current += kw["mem_size"]
            self.peak = max(self.peak, self.current)

        def free_postprocess(self, **kw: Any) -> None:
            self.current -= self.live.pop(kw["mem_ptr"], 0)

    best = 0
    for _ in range(calls):
        gc.collect()
        cupy.cuda.Device().synchronize()
        hook = PeakHook()
        with hook:
            out = fn()
            cupy.cuda.Device().synchronize()
        best = max(best, hook.peak - nbytes_of(out))
        del out
    return best


def extra_memory(method: str, fn: Callable[[], Any]) -> int | None:
    if method == "tracemalloc":
        return extra_tracemalloc(fn)
    if method == "rss":
        return extra_rss(fn)
    if method == "cuda":
        return extra_torch_cuda(fn)
    if method == "cupy":
        return extra_cupy(fn)
    return None
