"""Schedules against the reference: each plug-in computes the reference's arithmetic, within its declared bound.

The reference (``arraybn._reference``) defines arraybn's numbers; a schedule
(``arraybn._schedules``) is a faster computation of some of its bulk
operations, chosen once per call and switchable off with
``arraybn.schedule("reference")``. The conformance cases are small (a few KiB),
below the size where the NumPy blocked schedule applies, so these tests hold it
to the reference on inputs large enough to take it: per operation (the
statistics and the backward's sums within rounding of the same terms added in
another order, the scale-and-shift and the backward's elementwise gradient bit
for bit), whole layers (forward and backward), the golden cases with the size
thresholds removed, accuracy against float64 on inputs with a large mean, and
the memory promise (no input-sized temporary).
"""

from __future__ import annotations

import threading
import tracemalloc

import array_api_compat.numpy as xp
import numpy as np
import pytest
from array_api_compat import is_torch_array
from conftest import recorded

import arraybn
from arraybn import BNConfig, BNParams, BNState, batch_norm_vjp
from arraybn._reference import REFERENCE, SUM_LEAF
from arraybn._schedules import numpy_blocked as blocked
from arraybn._schedules import select

BLOCKED = blocked.NumpyBlocked()


def moments(x, axes, xp=xp):  # type: ignore[no-untyped-def]
    return BLOCKED.moments(x, axes, xp)


def scale_shift(x, a, b, xp=xp):  # type: ignore[no-untyped-def]
    return BLOCKED.affine(x, a, b, None, xp)


# (shape, channel axis): channels last with tiled rows, channels last where the
# row count is prime (rows of 135 channel vectors and a tail of 91), long
# channel vectors (rows of 9, a tail of 6), channels in the middle, a 6-D input.
SHAPES = [
    ((16, 28, 28, 32), 3),
    ((8191, 61), 1),
    ((1500, 1000), 1),
    ((8, 32, 40, 40), 1),
    ((3, 5, 4, 9, 16, 64), 2),
]
# more blocks than pieces: some pieces run several blocks (with a shorter last block)
LARGE = [((100, 28, 28, 32), 3), ((33, 32, 64, 64), 1)]


@pytest.fixture
def blocked_schedule():  # type: ignore[no-untyped-def]
    """Layer-level tests of numpy-blocked run under its name ("auto" prefers numba-kernels where Numba is)."""
    with arraybn.schedule("numpy-blocked"):
        yield


def _reference(x: np.ndarray, channel: int) -> tuple[np.ndarray, np.ndarray]:
    axes = tuple(i for i in range(x.ndim) if i != channel)
    xd = x.astype(np.float64)
    mean = xd.mean(axis=axes, keepdims=True)
    return mean, ((xd - mean) ** 2).mean(axis=axes, keepdims=True)


@pytest.mark.parametrize(("shape", "channel"), SHAPES)
def test_large_inputs_take_the_blocked_schedule(shape, channel) -> None:  # type: ignore[no-untyped-def]
    x = np.zeros(shape, np.float32)
    lay = blocked.layout(x, channel, xp)
    assert lay is not None
    assert lay.a * lay.c * lay.b == x.size and lay.c == shape[channel]
    if lay.b == 1:  # rows of at least _ROW_ELEMENTS elements, whole channel vectors
        assert lay.k * lay.c >= blocked._ROW_ELEMENTS and (lay.k - 1) * lay.c < blocked._ROW_ELEMENTS
        rows, tail = blocked._rows(x, lay, xp)
        assert np.shares_memory(rows, x) and rows.shape == (lay.a // lay.k, lay.k * lay.c)
        assert (tail is None) == (lay.a % lay.k == 0)
        if tail is not None:
            assert np.shares_memory(tail, x) and tail.shape == (lay.a % lay.k, lay.c)


def test_small_half_strided_or_foreign_inputs_keep_the_plain_expressions() -> None:
    big = np.zeros((64, 64, 64, 4), np.float32)
    assert blocked.layout(big, 3, xp) is not None
    assert blocked.layout(big[:2], 3, xp) is None  # under 1 MiB
    assert blocked.layout(big.astype(np.float16), 3, xp) is None  # no BLAS for float16
    assert blocked.layout(np.swapaxes(big, 0, 1), 3, xp) is None  # not C-contiguous
    assert blocked.layout(np.zeros((64, 64, 8, 8), np.float32), 1, xp) is None  # 64 per channel row: too few
    # long channel vectors: rows of 8 of them
    assert blocked.layout(np.zeros((1024, 1024), np.float32), 1, xp) == (1024, 1024, 1, 8)
    # more than 8192 channels: one per row
    assert blocked.layout(np.zeros((64, 10000), np.float32), 1, xp) == (64, 10000, 1, 1)
    strict = pytest.importorskip("array_api_strict")
    assert blocked.layout(strict.zeros((64, 64, 64, 4)), 3, strict) is None


@pytest.mark.parametrize(("shape", "channel"), SHAPES + LARGE)
@pytest.mark.parametrize("offset", [0.0, 1e3])
def test_blocked_moments_match_a_float64_two_pass(shape, channel, offset) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(len(shape) + channel)
    x = (rng.standard_normal(shape) * 0.5 + offset).astype(np.float32)
    assert blocked.layout(x, channel, xp) is not None
    axes = [i for i in range(x.ndim) if i != channel]
    ref_mean, ref_var = _reference(x, channel)
    for ops in (BLOCKED, REFERENCE):  # the schedule and the reference: the same terms, added in other orders
        mean, variance = ops.moments(x, axes, xp)
        assert mean.shape == ref_mean.shape and mean.dtype == np.float32
        # corrected two-pass: within a few float32 ulps of the float64 statistics, whatever the offset
        np.testing.assert_allclose(mean, ref_mean, rtol=2e-7, atol=1e-7)
        np.testing.assert_allclose(variance, ref_var, rtol=2e-6)


@pytest.mark.parametrize(("shape", "channel"), SHAPES[:4])
def test_blocked_moments_in_float64_are_exact_to_rounding(shape, channel) -> None:  # type: ignore[no-untyped-def]
    x = np.random.default_rng(3).standard_normal(shape) + 7.0
    mean, variance = moments(x, [i for i in range(x.ndim) if i != channel], xp=xp)
    ref_mean, ref_var = _reference(x, channel)
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-13)
    np.testing.assert_allclose(variance, ref_var, rtol=1e-11)


def test_blocked_moments_propagate_nan_and_inf_per_channel() -> None:
    x = np.random.default_rng(4).standard_normal((8, 16, 48, 48)).astype(np.float32)
    x[3, 2, 5, 7] = np.nan
    x[1, 9, 0, 0] = np.inf
    with np.errstate(invalid="ignore"):  # inf - inf, as in TF (which computes NaN silently)
        mean, variance = moments(x, [0, 2, 3], xp=xp)
    mean, variance = mean.ravel(), variance.ravel()
    assert np.isnan(mean[2]) and np.isnan(variance[2])
    assert mean[9] == np.inf and np.isnan(variance[9])
    finite = np.ones(16, bool)
    finite[[2, 9]] = False
    assert np.isfinite(mean[finite]).all() and np.isfinite(variance[finite]).all()


@pytest.mark.parametrize(("shape", "channel"), SHAPES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_affine_is_bitwise_the_reference(shape, channel, dtype) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(5)
    x = rng.standard_normal(shape).astype(dtype)
    kept = tuple(n if i == channel else 1 for i, n in enumerate(shape))
    a, b, m = (rng.standard_normal(kept).astype(dtype) for _ in range(3))
    for center in (None, m):  # the non-fused form x * a + b, the fused kernel's (x - m) * a + b
        y = BLOCKED.affine(x, a, b, center, xp)
        assert y.dtype == x.dtype and y.shape == x.shape
        np.testing.assert_array_equal(y, REFERENCE.affine(x, a, b, center, xp))
    expected = x * a
    expected += b
    np.testing.assert_array_equal(scale_shift(x, a, b), expected)


@pytest.mark.parametrize(
    ("shape", "axis"), [((16, 32, 40, 40), 1), ((16, 24, 24, 32), -1), ((8192, 60), -1), ((2048, 1000), -1)]
)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.usefixtures("blocked_schedule")
def test_layers_agree_with_the_reference(shape, axis, training) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(6)
    x = (rng.standard_normal(shape) * 2 + 3).astype(np.float32)
    c = shape[axis]
    weights = [
        rng.uniform(0.5, 2, c).astype(np.float32),
        rng.standard_normal(c).astype(np.float32),
        rng.standard_normal(c).astype(np.float32),
        rng.uniform(0.5, 2, c).astype(np.float32),
    ]

    def run() -> tuple[np.ndarray, list[np.ndarray]]:
        layer = arraybn.BatchNormalization(axis=axis)
        layer.build(shape)
        layer.set_weights(weights)
        y = layer(x, training=training)
        return np.asarray(y), [np.asarray(w) for w in layer.get_weights()]

    y, state = run()
    with arraybn.schedule("reference"):
        y_plain, state_plain = run()
    # both schedules round the statistics in float32, in different orders
    np.testing.assert_allclose(y, y_plain, rtol=1e-5, atol=1e-5)
    for got, want in zip(state, state_plain):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    ("shape", "channel"), [((256, 28, 28, 32), 3), ((131071, 61), 1), ((8195, 1024), 1), ((64, 32, 64, 64), 1)]
)
def test_no_input_sized_temporary(monkeypatch, shape, channel) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("ARRAYBN_NUM_THREADS", "2")  # one block buffer per running thread
    x = np.random.default_rng(7).standard_normal(shape).astype(np.float32)
    kept = tuple(n if i == channel else 1 for i, n in enumerate(shape))
    a = np.full(kept, 1.5, np.float32)
    axes = [i for i in range(x.ndim) if i != channel]
    moments(x, axes, xp=xp)  # warm caches of the allocator and of NumPy
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        moments(x, axes, xp=xp)
        _, stats_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        y = scale_shift(x, a, a, xp=xp)
        _, affine_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # a block (1 MiB) and its temporary per running thread at most, beside the output
    assert stats_peak < x.nbytes // 4
    assert affine_peak < y.nbytes + x.nbytes // 4


@pytest.mark.parametrize(("shape", "channel"), [((256, 28, 28, 32), 3), ((8195, 1024), 1), ((64, 32, 64, 64), 1)])
def test_backward_makes_no_input_sized_temporary(monkeypatch, shape, channel) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("ARRAYBN_NUM_THREADS", "2")  # two block buffers per running thread
    rng = np.random.default_rng(11)
    x = rng.standard_normal(shape).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    c = shape[channel]
    config = BNConfig(axis=(channel,), rank=len(shape), param_shape=(c,), fused=len(shape) == 4)
    params = BNParams(np.ones(c, np.float32), np.zeros(c, np.float32))
    state = BNState(np.zeros(c, np.float32), np.ones(c, np.float32))
    batch_norm_vjp(x, params, state, dy, training=True, config=config)  # warm up
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        grads = batch_norm_vjp(x, params, state, dy, training=True, config=config)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # dx, and a few blocks besides (the plain schedule holds three input-sized arrays)
    assert peak < grads.dx.nbytes + x.nbytes // 4


@pytest.mark.parametrize(("shape", "channel"), SHAPES)
def test_backward_sums_match_a_float64_reference(shape, channel) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(8)
    x = (rng.standard_normal(shape) + 5).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    lay = blocked.layout(x, channel, xp)
    axes = tuple(i for i in range(x.ndim) if i != channel)
    mean = x.astype(np.float64).mean(axis=axes).astype(np.float32)
    kept = tuple(n if i == channel else 1 for i, n in enumerate(shape))
    sum_xc, sum_dy, sum_dy_xc = blocked.centred_sums(x, dy, mean, lay, xp)
    xc = x.astype(np.float64) - mean.reshape(kept)
    d64 = dy.astype(np.float64)
    n = x.size // shape[channel]
    scale = np.sqrt(n)  # the size of a sum of n unit-variance terms: float32 rounding is relative to it
    np.testing.assert_allclose(sum_xc, xc.sum(axis=axes), atol=1e-5 * scale)
    np.testing.assert_allclose(sum_dy, d64.sum(axis=axes), atol=1e-5 * scale)
    np.testing.assert_allclose(sum_dy_xc, (d64 * xc).sum(axis=axes), atol=1e-5 * scale)


@pytest.mark.parametrize(("shape", "channel"), SHAPES)
def test_backward_gradient_is_bitwise_the_plain_expression(shape, channel) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(9)
    x = rng.standard_normal(shape).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    c = shape[channel]
    mean, k, p, q = (rng.standard_normal(c).astype(np.float32) for _ in range(4))
    lay = blocked.layout(x, channel, xp)
    dx = blocked.centred_affine(x, dy, mean, k, p, q, lay, xp)
    kept = tuple(n if i == channel else 1 for i, n in enumerate(shape))
    want = REFERENCE.backward_dx(x, dy, *(v.reshape(kept) for v in (mean, k, p, q)), xp)
    np.testing.assert_array_equal(dx, want)
    np.testing.assert_array_equal(BLOCKED.backward_dx(x, dy, *(v.reshape(kept) for v in (mean, k, p, q)), xp), want)


@pytest.mark.parametrize(
    ("shape", "axis", "fused"),  # TF's fused kernel: 4-D and 5-D only
    [
        ((16, 32, 40, 40), 1, True),
        ((16, 32, 40, 40), 1, False),
        ((16, 24, 24, 32), -1, True),
        ((8192, 60), -1, False),
        ((2048, 1000), -1, False),
    ],
)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.usefixtures("blocked_schedule")
def test_backward_agrees_with_the_reference(shape, axis, fused, training) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(10)
    x = (rng.standard_normal(shape) * 2 + 3).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    c = shape[axis]
    ax = axis % len(shape)
    config = BNConfig(axis=(ax,), rank=len(shape), param_shape=(c,), fused=fused)
    params = BNParams(rng.uniform(0.5, 2, c).astype(np.float32), rng.standard_normal(c).astype(np.float32))
    state = BNState(rng.standard_normal(c).astype(np.float32), rng.uniform(0.5, 2, c).astype(np.float32))
    assert blocked.layout(x, ax, xp) is not None
    got = batch_norm_vjp(x, params, state, dy, training=training, config=config)
    with arraybn.schedule("reference"):
        want = batch_norm_vjp(x, params, state, dy, training=training, config=config)
    # the per-channel sums are added in different orders; everything else is the same arithmetic
    if training:
        np.testing.assert_allclose(got.dx, want.dx, rtol=1e-4, atol=1e-6)
    else:  # dx = dy * k: no sum involved
        np.testing.assert_array_equal(got.dx, want.dx)
    np.testing.assert_allclose(got.dgamma, want.dgamma, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(got.dbeta, want.dbeta, rtol=1e-4, atol=1e-3)


def _every_blocked_result(x: np.ndarray, channel: int) -> list[np.ndarray]:
    rng = np.random.default_rng(12)
    dy = rng.standard_normal(x.shape).astype(x.dtype)
    vectors = [rng.standard_normal(x.shape[channel]).astype(x.dtype) for _ in range(4)]
    lay = blocked.layout(x, channel, xp)
    return [
        *blocked.channel_moments(x, lay, xp),
        blocked.affine(x, vectors[0], vectors[1], vectors[2], lay, xp),
        *blocked.centred_sums(x, dy, vectors[0], lay, xp),
        blocked.centred_affine(x, dy, *vectors, lay, xp),
    ]


@pytest.mark.parametrize(("shape", "channel"), SHAPES + LARGE)
def test_results_do_not_depend_on_the_thread_count(monkeypatch, shape, channel) -> None:  # type: ignore[no-untyped-def]
    x = (np.random.default_rng(13).standard_normal(shape) + 2).astype(np.float32)
    results = {}
    for threads in ("1", "2", "5"):
        monkeypatch.setenv("ARRAYBN_NUM_THREADS", threads)
        results[threads] = _every_blocked_result(x, channel)
    for threads in ("2", "5"):
        for got, want in zip(results[threads], results["1"]):
            np.testing.assert_array_equal(got, want)


def test_parallel_pieces_go_to_whichever_thread_is_free(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A thread held up on one piece does not hold up the others: the free threads take the rest; every
    piece runs once and the results come back in piece order. A failing piece raises on the caller, after
    every piece already taken has finished."""
    import time

    monkeypatch.setenv("ARRAYBN_NUM_THREADS", "2")
    runs: list[tuple[int, str]] = []

    def piece(i: int) -> int:
        runs.append((i, threading.current_thread().name))
        if i == 0:
            time.sleep(0.3)  # the caller takes piece 0 first and is held up on it
        return i * i

    assert blocked._parallel(piece, list(range(8))) == [i * i for i in range(8)]
    assert sorted(i for i, _ in runs) == list(range(8))
    caller = threading.current_thread().name
    assert [i for i, name in runs if name == caller] == [0]  # the pool thread took all seven others

    done: list[int] = []

    def failing(i: int) -> int:
        if i == 2:
            raise KeyError(i)
        time.sleep(0.01)
        done.append(i)
        return i

    with pytest.raises(KeyError):
        blocked._parallel(failing, list(range(64)))
    assert len(done) < 63  # the pieces not yet taken were left


def test_thread_count_setting(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("ARRAYBN_NUM_THREADS", "3")
    assert blocked.thread_count() == 3
    monkeypatch.delenv("ARRAYBN_NUM_THREADS")
    assert 1 <= blocked.thread_count() <= blocked._MAX_THREADS
    x = np.ones((64, 64, 64, 4), np.float32)
    layer = arraybn.BatchNormalization()
    layer(x, training=True)
    before = [w.copy() for w in layer.get_weights()]
    for bad in ("0", "-2", "two"):
        monkeypatch.setenv("ARRAYBN_NUM_THREADS", bad)
        with pytest.raises(ValueError, match="ARRAYBN_NUM_THREADS must be a positive integer"):
            layer(x, training=True)
        for got, want in zip(layer.get_weights(), before):  # a call that raises changes nothing
            np.testing.assert_array_equal(got, want)


def _moments_in_child(queue, ops, x) -> None:  # type: ignore[no-untyped-def]
    from arraybn._schedules import numba_kernels

    mean, _ = ops.moments(x, [0, 1, 2], None if is_torch_array(x) else xp)
    queue.put((numba_kernels._OPENMP_STATE["forked"], np.asarray(mean).ravel().tolist()))


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")  # Python >= 3.12
@pytest.mark.filterwarnings(r"ignore:os\.fork\(\) was called:RuntimeWarning")  # JAX, when another test imported it
@pytest.mark.parametrize(("name", "library"), [("numpy-blocked", "numpy"), ("numba-kernels", "numpy"),
                                               ("numba-kernels", "torch")])  # fmt: skip
def test_threads_work_in_a_forked_child(monkeypatch, name, library) -> None:  # type: ignore[no-untyped-def]
    """The schedules' pool is made anew in a forked child (no Numba threading layer is involved either);
    torch tensors, whose loops ran on torch's OpenMP threads in the parent, take that pool in the child
    (GNU OpenMP's threads do not survive a fork: the child would hang)."""
    import multiprocessing

    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("no fork on this platform")
    if name == "numba-kernels":
        pytest.importorskip("numba", reason="the numba-kernels schedule needs the optional numba package")
    from arraybn._schedules import _instance

    ops = _instance(name)
    monkeypatch.setenv("ARRAYBN_NUM_THREADS", "2")
    x = np.random.default_rng(14).standard_normal((64, 64, 64, 4)).astype(np.float32)
    if library == "torch":
        torch = pytest.importorskip("torch")
        from arraybn._schedules import numba_kernels

        if numba_kernels._openmp() is None:
            pytest.skip("this torch does not run on GNU OpenMP")
        monkeypatch.delenv("ARRAYBN_TORCH_OPENMP", raising=False)
        threads = torch.get_num_threads()
        torch.set_num_threads(2)
        x = torch.from_numpy(x)
    try:
        parent_mean, _ = ops.moments(x, [0, 1, 2], None if library == "torch" else xp)  # the parent's threads exist
        ctx = multiprocessing.get_context("fork")
        queue = ctx.Queue()
        child = ctx.Process(target=_moments_in_child, args=(queue, ops, x))
        child.start()
        child.join(timeout=60)
        if child.exitcode is None:
            child.kill()
            child.join()
    finally:
        if library == "torch":
            torch.set_num_threads(threads)
    assert child.exitcode == 0, "the forked child hung or failed"
    forked, mean = queue.get(timeout=5)
    assert forked or library == "numpy"  # the child knows it is one (torch's threads closed)
    np.testing.assert_array_equal(np.asarray(mean, np.float32), np.asarray(parent_mean).ravel())


@pytest.mark.usefixtures("blocked_schedule")
def test_blocked_schedule_passes_the_goldens(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """TensorFlow's golden cases through the blocked schedule (they are all below its size threshold).

    Every 4th forward case (about 2000) and every gradient case, with the size
    and row-length thresholds removed so that every single-channel-axis case
    takes the blocked passes: the plain path replays the whole set in
    test_conformance.py and test_backward.py already.
    """
    from conformance import gradients, runner

    monkeypatch.setattr(blocked, "_MIN_BYTES", 0)
    monkeypatch.setattr(blocked, "_MIN_INNER", 1)
    monkeypatch.setenv("ARRAYBN_NUM_THREADS", "2")
    streamed = recorded(monkeypatch, blocked, "layout", keep=lambda lay: lay is not None)
    summary = runner.run(xp=xp, progress=False, stride=4)
    assert summary.outcomes, "no cases ran"
    assert not summary.failures, summary.failure_text(limit=40)
    failures = gradients.check(xp)
    assert not failures, list(failures.items())[:10]
    assert len(streamed) > 1000  # the blocked schedule did run (forward, backward)


# ---------------------------------------------------------------------------
# The schedule API
# ---------------------------------------------------------------------------


def test_schedule_setting_is_scoped_and_checked() -> None:
    assert arraybn.get_schedule() == "auto"
    with arraybn.schedule("reference"):
        assert arraybn.get_schedule() == "reference"
        with arraybn.schedule("numpy-blocked"):
            assert arraybn.get_schedule() == "numpy-blocked"
        assert arraybn.get_schedule() == "reference"
    assert arraybn.get_schedule() == "auto"
    with pytest.raises(ValueError, match="Unknown schedule 'fast'"), arraybn.schedule("fast"):
        pass
    assert arraybn.get_schedule() == "auto"


def test_schedule_setting_holds_for_its_thread_only() -> None:
    seen = []
    with arraybn.schedule("reference"):
        t = threading.Thread(target=lambda: seen.append(arraybn.get_schedule()))
        t.start()
        t.join()
    assert seen == ["auto"]


def test_every_schedule_declares_a_bound_for_each_operation_it_replaces() -> None:
    declared = arraybn.available_schedules()
    assert declared["reference"] == {}
    operations = {"sum", "moments", "affine", "coefficients", "backward_sums", "backward_dx"}
    for name, bounds in declared.items():
        if name == "reference":
            continue
        assert bounds, name
        assert set(bounds) <= operations, name
        assert all(b in ("bitwise", "sum order", "merge order") for b in bounds.values()), (name, bounds)
    assert set(declared["numpy-blocked"]) == set(blocked.NumpyBlocked.bounds)


def test_select_picks_once_per_library_and_obeys_the_setting(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    big = np.zeros((64, 64, 64, 4), np.float32)
    from arraybn._schedules import numba_kernels

    assert select(big, xp).name == ("numba-kernels" if numba_kernels.available() else "numpy-blocked")
    with arraybn.schedule("numpy-blocked"):
        assert select(big, xp).name == "numpy-blocked"
    monkeypatch.setenv("ARRAYBN_NUMBA", "0")  # Numba kept out of "auto"
    assert select(big, xp).name == "numpy-blocked"
    monkeypatch.setattr(numba_kernels, "available", lambda: False)  # Numba not installed
    monkeypatch.delenv("ARRAYBN_NUMBA")
    assert select(big, xp).name == "numpy-blocked"
    with arraybn.schedule("numba-kernels"):  # asked for but absent: the reference
        assert select(big, xp) is REFERENCE
    with arraybn.schedule("reference"):
        assert select(big, xp) is REFERENCE
    with arraybn.schedule("cupy-kernels"):  # a schedule made for another library: the reference
        assert select(big, xp) is REFERENCE
    strict = pytest.importorskip("array_api_strict")
    assert select(strict.zeros((4, 4)), strict) is REFERENCE


@pytest.mark.parametrize("training", [True, False])
def test_the_reference_setting_reaches_no_schedule_code(monkeypatch, training) -> None:  # type: ignore[no-untyped-def]
    from arraybn._schedules import numba_kernels

    calls = []
    original, original_numba = blocked.layout, numba_kernels._layout
    monkeypatch.setattr(blocked, "layout", lambda *a: calls.append(a) or original(*a))
    monkeypatch.setattr(numba_kernels, "_layout", lambda *a: calls.append(a) or original_numba(*a))
    x = np.random.default_rng(20).standard_normal((32, 32, 32, 16)).astype(np.float32)
    layer = arraybn.BatchNormalization()
    with arraybn.schedule("reference"):
        layer(x, training=training)
    assert calls == []
    layer(x, training=training)
    assert calls  # under "auto" a schedule's passes run


# ---------------------------------------------------------------------------
# Accuracy: the reference's blocked sums on every namespace
# ---------------------------------------------------------------------------


def test_reference_sum_is_blocked_with_a_bounded_leaf() -> None:
    # ones: every partial sum is exact, whatever the blocking; check shapes and the remainder path
    for n in (1, SUM_LEAF, SUM_LEAF + 1, SUM_LEAF * SUM_LEAF + 3, 100_003):
        x = np.ones((n, 3), np.float32)
        total = REFERENCE.sum(x, (0,), xp)
        assert total.shape == (1, 3)
        np.testing.assert_array_equal(total, np.full((1, 3), n, np.float32))
    x = np.ones((70, 5, 130), np.float32)
    np.testing.assert_array_equal(REFERENCE.sum(x, (0, 2), xp), np.full((1, 5, 1), 70 * 130, np.float32))
    # 2**24 + 1 values of 1: one float32 accumulator stops at 2**24, a tree reaches the exact count
    x = np.ones((2**24 + 1, 1), np.float32)
    assert float(np.sum(x, axis=0)[0]) in (2.0**24, 2.0**24 + 2)  # NumPy's pairwise sum may recover, or not
    assert float(REFERENCE.sum(x, (0,), xp)[0, 0]) == 2.0**24  # float32 cannot hold 2**24 + 1: the nearest


def _namespaces():  # type: ignore[no-untyped-def]
    out = [pytest.param("numpy", id="numpy")]
    for name in ("array_api_strict", "torch", "dask.array", "jax.numpy"):
        out.append(pytest.param(name, id=name))
    return out


def _as_namespace(name: str, x: np.ndarray):  # type: ignore[no-untyped-def]
    if name == "numpy":
        return x
    if name == "array_api_strict":
        strict = pytest.importorskip("array_api_strict")
        return strict.asarray(x)
    if name == "torch":
        torch = pytest.importorskip("torch")
        return torch.from_numpy(x)
    if name == "dask.array":
        da = pytest.importorskip("dask.array")
        return da.from_array(x, chunks=(x.shape[0] // 4, *x.shape[1:]))
    jnp = pytest.importorskip("jax.numpy")
    return jnp.asarray(x)


_NAMED = [("numpy", "numpy-blocked"), ("numpy", "numba-kernels"), ("torch", "numba-kernels"), ("torch", "torch-eager")]


@pytest.mark.parametrize(
    ("namespace", "schedule"),
    [(p.values[0], s) for p in _namespaces() for s in ("auto", "reference")] + _NAMED,
)
def test_statistics_keep_the_spread_of_large_mean_inputs(namespace, schedule) -> None:  # type: ignore[no-untyped-def]
    """``1000 + 0.1 * N(0, 1)`` float32, 2**22 values per channel: TF's relative variance error is ~1e-6."""
    rng = np.random.default_rng(21)
    x = (1000.0 + 0.1 * rng.standard_normal((2**16, 64, 4))).astype(np.float32)
    x = x.reshape(2**16 * 64, 4)[: 2**22 // 1 * 1 // 4 * 4].reshape(-1, 4)  # (2**22, 4): 64 MiB
    x64 = x.astype(np.float64)
    true_mean, true_var = x64.mean(axis=0), x64.var(axis=0)
    layer = arraybn.BatchNormalization(momentum=0.0)
    with arraybn.schedule(schedule):
        layer(_as_namespace(namespace, x), training=True)
    mean, var = (np.asarray(w, np.float64) for w in layer.get_weights()[2:])
    assert np.max(np.abs(mean - true_mean)) < 1e-4  # float32's spacing at 1000 is 6e-5
    assert np.max(np.abs(var / true_var - 1)) < 1e-5


# ---------------------------------------------------------------------------
# torch-eager: torch's reductions and in-place passes
# ---------------------------------------------------------------------------

TORCH_SHAPES = [((16, 28, 28, 32), 3), ((8, 32, 40, 40), 1), ((2048, 300), 1), ((3, 5, 4, 9, 16, 8), 2)]


@pytest.fixture
def torch_eager(monkeypatch):  # type: ignore[no-untyped-def]
    torch = pytest.importorskip("torch")
    from arraybn._schedules import torch_eager as module

    monkeypatch.setattr(module, "_PIECE_BYTES", 1 << 16)  # many pieces, even on these small inputs
    with arraybn.schedule("torch-eager"):  # not numba-kernels, which "auto" prefers for CPU tensors
        yield torch, module.TorchEager(), pytest.importorskip("array_api_compat.torch")


@pytest.mark.parametrize(("shape", "channel"), TORCH_SHAPES)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_torch_eager_elementwise_passes_are_bitwise_the_reference(torch_eager, shape, channel, dtype) -> None:  # type: ignore[no-untyped-def]
    torch, ops, txp = torch_eager
    rng = np.random.default_rng(30)
    x, dy = (torch.from_numpy(rng.standard_normal(shape).astype(dtype)) for _ in range(2))
    kept = tuple(n if i == channel else 1 for i, n in enumerate(shape))
    a, b, m, k = (torch.from_numpy(rng.standard_normal(kept).astype(dtype)) for _ in range(4))
    for center in (None, m):
        got = ops.affine(x, a, b, center, txp)
        assert torch.equal(got, REFERENCE.affine(x, a, b, center, txp))
    assert torch.equal(ops.backward_dx(x, dy, m, k, a, b, txp), REFERENCE.backward_dx(x, dy, m, k, a, b, txp))
    axes = [i for i in range(len(shape)) if i != channel]
    got_sums = ops.backward_sums(x, dy, m, axes, txp)
    want_sums = REFERENCE.backward_sums(x, dy, m, axes, txp)
    for got, want in zip(got_sums, want_sums, strict=True):  # the same terms added in another order
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-4 if dtype == "float32" else 1e-12, atol=1e-3)


@pytest.mark.parametrize(("shape", "channel"), TORCH_SHAPES)
@pytest.mark.parametrize("offset", [0.0, 1e3])
def test_torch_eager_moments_match_a_float64_two_pass(torch_eager, shape, channel, offset) -> None:  # type: ignore[no-untyped-def]
    torch, ops, txp = torch_eager
    x = (np.random.default_rng(31).standard_normal(shape) * 0.5 + offset).astype(np.float32)
    axes = [i for i in range(len(shape)) if i != channel]
    ref_mean, ref_var = _reference(x, channel)
    mean, variance = ops.moments(torch.from_numpy(x), axes, txp)
    np.testing.assert_allclose(mean.numpy(), ref_mean, rtol=2e-7, atol=1e-7)
    np.testing.assert_allclose(variance.numpy(), ref_var, rtol=2e-6)
    total = ops.sum(torch.from_numpy(x), axes, txp)
    x64 = x.astype(np.float64)
    scale = np.abs(x64).sum(axis=tuple(axes), keepdims=True)  # a sum's rounding is relative to its terms' size
    np.testing.assert_allclose(total.numpy(), x64.sum(axis=tuple(axes), keepdims=True), rtol=0, atol=1e-6 * scale.max())
    assert ops.sum(torch.from_numpy(x), [], txp).shape == x.shape  # no axis: nothing summed (torch's dim=() sums all)


def test_torch_eager_leaves_autograd_and_compiled_code_to_the_reference(torch_eager) -> None:  # type: ignore[no-untyped-def]
    torch, ops, txp = torch_eager
    from arraybn._schedules import torch_eager as module

    x = torch.ones((4, 3), requires_grad=True)
    assert not module._takes(x)
    with torch.no_grad():
        assert module._takes(x)
    assert not module._takes(torch.ones((4, 3), dtype=torch.float16))
    assert select(torch.ones((4, 3)), txp).name == "torch-eager"  # under the fixture's setting
    # gradients through the layer on tensors that require them (the reference's expressions)
    layer = arraybn.BatchNormalization()
    x = torch.randn((8, 4, 4, 3), requires_grad=True)
    layer(x, training=True).square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize(("shape", "axis"), [((16, 32, 20, 20), 1), ((16, 24, 24, 32), -1), ((4096, 60), -1)])
@pytest.mark.parametrize("training", [True, False])
def test_torch_layers_agree_with_the_reference(torch_eager, shape, axis, training) -> None:  # type: ignore[no-untyped-def]
    torch, _, _ = torch_eager
    rng = np.random.default_rng(32)
    x = torch.from_numpy((rng.standard_normal(shape) * 2 + 3).astype(np.float32))
    dy = torch.from_numpy(rng.standard_normal(shape).astype(np.float32))

    def run():  # type: ignore[no-untyped-def]
        layer = arraybn.BatchNormalization(axis=axis)
        y, ctx = layer.forward(x, training=training)
        dx, grads = layer.backward(ctx, dy)
        return y.numpy(), [np.asarray(w) for w in layer.get_weights()], [dx, grads["gamma"], grads["beta"]]

    y, state, grads = run()
    with arraybn.schedule("reference"):
        y_ref, state_ref, grads_ref = run()
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(state, state_ref, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    for got, want in zip(grads, grads_ref, strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-3)


def test_torch_eager_passes_the_goldens(torch_eager) -> None:  # type: ignore[no-untyped-def]
    """Every 4th forward golden and every gradient golden on torch tensors, pieces of 64 KiB."""
    from conformance import gradients, runner

    torch, _, txp = torch_eager
    summary = runner.run(xp=txp, progress=False, stride=4)
    assert summary.outcomes, "no cases ran"
    assert not summary.failures, summary.failure_text(limit=40)
    failures = gradients.check(txp)
    assert not failures, list(failures.items())[:10]


# ---------------------------------------------------------------------------
# dask-chunked: one pass over the chunks, bounded memory
# ---------------------------------------------------------------------------


def _lazy_large_mean(rows: int, chunk_rows: int):  # type: ignore[no-untyped-def]
    da = pytest.importorskip("dask.array")
    rs = da.random.RandomState(40)
    return (1000.0 + 0.1 * rs.standard_normal((rows, 16), chunks=(chunk_rows, 16))).astype(np.float32)


@pytest.mark.parametrize("setting", ["auto", "reference"])
def test_dask_training_call_holds_a_few_chunks_not_the_array(setting) -> None:  # type: ignore[no-untyped-def]
    """256 MiB generated lazily in 4 MiB chunks: the statistics, the new moving statistics and a reduction of the
    output in one compute. The two-pass graph keeps every chunk for its second pass; the chunked one does not."""
    dask = pytest.importorskip("dask")
    x = _lazy_large_mean(2**22, 2**16)
    layer = arraybn.BatchNormalization(momentum=0.0)
    with arraybn.schedule(setting):
        y = layer(x, training=True)
    tracemalloc.start()
    try:
        mean, variance, total = dask.compute(
            layer.moving_mean, layer.moving_variance, y.sum(axis=0), scheduler="synchronous"
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    nbytes = 2**22 * 16 * 4
    if setting == "auto":
        assert peak < nbytes // 8, f"peak {peak / 2**20:.0f} MiB"
    else:  # the trap is real: the reference's two passes pin the array
        assert peak > nbytes // 2, f"peak {peak / 2**20:.0f} MiB"
    x64 = _lazy_large_mean(2**22, 2**16).astype(np.float64)
    true_mean, true_var = dask.compute(x64.mean(axis=0), x64.var(axis=0), scheduler="synchronous")
    assert np.max(np.abs(np.asarray(mean) - true_mean)) < 1e-4
    assert np.max(np.abs(np.asarray(variance) / true_var - 1)) < 1e-5
    assert np.all(np.abs(np.asarray(total)) < 2**22 * 1e-2)  # a normalized output sums to about 0


def test_dask_chunked_statistics_agree_with_the_reference_and_count_unknown_chunks() -> None:
    da = pytest.importorskip("dask.array")
    from arraybn._schedules import dask_chunked

    ops = dask_chunked.DaskChunked()
    rng = np.random.default_rng(41)
    x = (rng.standard_normal((3000, 7, 5)) * 3 + 20).astype(np.float32)
    x[7, 2, 1] = np.nan
    x[9, 4, 0] = np.inf
    dx = da.from_array(x, chunks=(700, 7, 2))
    txp = pytest.importorskip("array_api_compat.dask.array")
    x64 = x.astype(np.float64)
    with np.errstate(invalid="ignore"):
        want_mean = x64.mean(axis=(0, 2), keepdims=True)
        want_var = ((x64 - want_mean) ** 2).mean(axis=(0, 2), keepdims=True)
    for arr in (dx, dx[dx[:, 0, 0] > -np.inf]):  # known chunk sizes, then unknown ones (NaN)
        with np.errstate(invalid="ignore"):  # inf - inf: NaN, as NumPy and TF compute it (here silently)
            mean, variance = (np.asarray(v) for v in da.compute(*ops.moments(arr, (0, 2), txp), scheduler="sync"))
        assert mean.shape == (1, 7, 1) and mean.dtype == np.float32
        np.testing.assert_allclose(mean, want_mean, rtol=1e-7, equal_nan=True)
        np.testing.assert_allclose(variance, want_var, rtol=1e-6, equal_nan=True)
        assert np.isnan(mean[0, 2, 0]) and mean[0, 4, 0] == np.inf and np.isnan(variance[0, 4, 0])
    with np.errstate(invalid="ignore"):
        ref = [np.asarray(v) for v in REFERENCE.moments(x, (0, 2), xp)]
    np.testing.assert_allclose(mean, ref[0], rtol=1e-6, equal_nan=True)
    np.testing.assert_allclose(variance, ref[1], rtol=1e-5, equal_nan=True)
