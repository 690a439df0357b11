"""The benchmark report flags timings that cannot be real (below the memory floor) or are noisy."""

from __future__ import annotations

from benchmarks import run


def _row(mode: str, median_ms: float, iqr_ms: float = 0.0) -> dict:  # type: ignore[type-arg]
    m = median_ms / 1e3
    return {"status": "ok", "mode": mode, "median_s": m, "q1_s": m - iqr_ms / 2e3, "q3_s": m + iqr_ms / 2e3}


def test_a_steady_time_above_the_floor_is_not_flagged() -> None:
    assert run.flags(_row("train", 4.0, 0.1), copy_ms=2.0) == []  # 2x a copy, floor 1.0x
    assert run.flags(_row("infer", 2.0, 0.1), copy_ms=2.0) == []  # 1x a copy, floor 0.67x
    # streaming stores: an inference pass at 0.8x a copy that reads each output line before writing it
    assert run.flags(_row("infer", 1.6, 0.1), copy_ms=2.0) == []


def test_times_below_the_memory_floor_are_flagged() -> None:
    # torch 2-D training at 0.75x a copy and inference at 0.17x, as seen with --quick on a busy machine
    assert "0.75x a copy, below the memory floor 1.00x" in run.flags(_row("train", 1.5), copy_ms=2.0)[0]
    assert "0.17x a copy, below the memory floor 0.67x" in run.flags(_row("infer", 0.34), copy_ms=2.0)[0]
    assert run.flags(_row("train", 1.5), copy_ms=None) == []  # no copy measured: nothing to compare


def test_a_large_spread_is_flagged() -> None:
    (flag,) = run.flags(_row("train", 10.0, 3.0), copy_ms=2.0)
    assert flag.startswith("spread 30% of the median")


def test_a_busy_machine_is_named_in_the_report() -> None:
    meta = {"versions": {"cpus": "2"}, "load_average": {"start": [1.9, 1.0, 0.5], "end": [0.2, 0.2, 0.2]}}
    assert "busy" in run.load_warning(meta)
    meta["load_average"]["start"] = [0.1, 0.1, 0.1]
    assert run.load_warning(meta) is None


def test_interleaved_timing_calls_each_function_once_per_round_and_drops_a_failing_one() -> None:
    """Round r calls every function once, starting from the r-th; a function that raises is reported
    (its exception) and left out of the later rounds, the others keep their samples."""
    from benchmarks._measure import time_interleaved

    calls: list[str] = []

    def named(name: str):  # type: ignore[no-untyped-def]
        def fn() -> None:
            calls.append(name)

        return fn

    def failing() -> None:
        calls.append("c")
        if calls.count("c") > 2:  # both warm-up calls pass, the first timed one raises
            raise ZeroDivisionError("simulated")

    got = time_interleaved([named("a"), named("b"), failing], warmup=2, repeats=3)
    assert calls[:6] == ["a", "b", "c", "a", "b", "c"]  # warm-up: in order
    assert calls[6:] == ["a", "b", "c", "b", "a", "a", "b"]  # round 0 from a (c raises), round 1 from b, round 2 from c
    assert [len(t) for t in got[:2]] == [3, 3]  # type: ignore[arg-type]
    assert all(s >= 0 for t in got[:2] for s in t)  # type: ignore[union-attr]
    assert isinstance(got[2], ZeroDivisionError)


def test_calls_that_faulted_fresh_memory_in_are_flagged() -> None:
    row = {**_row("train", 4.0, 0.1), "repeats": 31, "faulting_calls": 4}
    (flag,) = run.flags(row, copy_ms=2.0)
    assert flag.startswith("4 of 31 timed calls mapped fresh memory in")
    row["faulting_calls"] = 3  # at most a tenth of the calls: the median is the steady one
    assert run.flags(row, copy_ms=2.0) == []


def test_interleaved_timing_counts_each_calls_page_faults() -> None:
    """A call that touches a fresh 4 MiB mapping faults its pages in (Linux counts one minor fault per 4 KiB
    page at most); `summarize` counts it among the faulting calls, a call that maps nothing is not."""
    import mmap

    import pytest

    from benchmarks._measure import FAULTING_PAGES, page_faults, summarize, time_interleaved

    if page_faults() is None:
        pytest.skip("this system does not count page faults (no resource module)")
    size = 4 << 20

    def touching() -> None:
        with mmap.mmap(-1, size) as m:
            if hasattr(mmap, "MADV_NOHUGEPAGE"):  # 4 KiB pages even where huge pages are always on
                m.madvise(mmap.MADV_NOHUGEPAGE)
            for i in range(0, size, mmap.PAGESIZE):
                m[i] = 1

    faults: list[list[int]] = []
    got = time_interleaved([touching, lambda: None], warmup=1, repeats=3, faults=faults)
    assert [len(t) for t in got] == [3, 3] and [len(f) for f in faults] == [3, 3]  # type: ignore[arg-type]
    assert all(f >= size // mmap.PAGESIZE // 2 >= FAULTING_PAGES for f in faults[0])
    assert all(f < FAULTING_PAGES for f in faults[1])
    assert summarize(got[0], faults[0])["faulting_calls"] == 3  # type: ignore[arg-type]
    assert summarize(got[1], faults[1])["faulting_calls"] == 0  # type: ignore[arg-type]


def test_the_numpy_copy_runs_on_the_passes_threads_and_copies_exactly() -> None:
    """The copy the floor is counted in: every thread count gives the input's values, in a new array."""
    import numpy as np

    from benchmarks._targets import threaded_copy

    x = np.random.default_rng(0).standard_normal((1001, 3, 7)).astype(np.float32)
    for threads in (1, 2, 3, 4):
        out = threaded_copy(x, threads)()
        assert out is not x and out.shape == x.shape and out.dtype == x.dtype
        np.testing.assert_array_equal(out, x)
