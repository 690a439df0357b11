"""The cache-blocked CPU schedule (``arraybn._streaming``): same results as the plain expressions.

The conformance cases are small (a few KiB), below the size where arraybn
switches to the blocked schedule, so these tests hold the blocked code to the
same arithmetic on inputs large enough to take it: statistics and the
backward's sums against a float64 reference, the scale-and-shift and the
backward's elementwise gradient bit for bit against the plain expressions,
whole layers (forward and backward) against the plain schedule, and the
memory promise (no input-sized temporary).
"""

from __future__ import annotations

import tracemalloc

import array_api_compat.numpy as xp
import numpy as np
import pytest

import arraybn
from arraybn import BNConfig, BNParams, BNState, _streaming
from arraybn._backward import batch_norm_vjp
from arraybn._functional import moments, scale_shift

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


def _reference(x: np.ndarray, channel: int) -> tuple[np.ndarray, np.ndarray]:
    axes = tuple(i for i in range(x.ndim) if i != channel)
    xd = x.astype(np.float64)
    mean = xd.mean(axis=axes, keepdims=True)
    return mean, ((xd - mean) ** 2).mean(axis=axes, keepdims=True)


def _plain(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_streaming, "layout", lambda *a, **k: None)


@pytest.mark.parametrize(("shape", "channel"), SHAPES)
def test_large_inputs_take_the_blocked_schedule(shape, channel) -> None:  # type: ignore[no-untyped-def]
    x = np.zeros(shape, np.float32)
    lay = _streaming.layout(x, channel, xp)
    assert lay is not None
    assert lay.a * lay.c * lay.b == x.size and lay.c == shape[channel]
    if lay.b == 1:  # rows of at least _ROW_ELEMENTS elements, whole channel vectors
        assert lay.k * lay.c >= _streaming._ROW_ELEMENTS and (lay.k - 1) * lay.c < _streaming._ROW_ELEMENTS
        rows, tail = _streaming._rows(x, lay, xp)
        assert np.shares_memory(rows, x) and rows.shape == (lay.a // lay.k, lay.k * lay.c)
        assert (tail is None) == (lay.a % lay.k == 0)
        if tail is not None:
            assert np.shares_memory(tail, x) and tail.shape == (lay.a % lay.k, lay.c)


def test_small_half_strided_or_foreign_inputs_keep_the_plain_expressions() -> None:
    big = np.zeros((64, 64, 64, 4), np.float32)
    assert _streaming.layout(big, 3, xp) is not None
    assert _streaming.layout(big[:2], 3, xp) is None  # under 1 MiB
    assert _streaming.layout(big.astype(np.float16), 3, xp) is None  # no BLAS for float16
    assert _streaming.layout(np.swapaxes(big, 0, 1), 3, xp) is None  # not C-contiguous
    assert _streaming.layout(np.zeros((64, 64, 8, 8), np.float32), 1, xp) is None  # 64 per channel row: too few
    # long channel vectors: rows of 8 of them
    assert _streaming.layout(np.zeros((1024, 1024), np.float32), 1, xp) == (1024, 1024, 1, 8)
    # more than 8192 channels: one per row
    assert _streaming.layout(np.zeros((64, 10000), np.float32), 1, xp) == (64, 10000, 1, 1)
    strict = pytest.importorskip("array_api_strict")
    assert _streaming.layout(strict.zeros((64, 64, 64, 4)), 3, strict) is None


@pytest.mark.parametrize(("shape", "channel"), SHAPES + LARGE)
@pytest.mark.parametrize("offset", [0.0, 1e3])
def test_blocked_moments_match_a_float64_two_pass(shape, channel, offset) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(len(shape) + channel)
    x = (rng.standard_normal(shape) * 0.5 + offset).astype(np.float32)
    assert _streaming.layout(x, channel, xp) is not None
    axes = [i for i in range(x.ndim) if i != channel]
    mean, variance = moments(x, axes, xp=xp)
    ref_mean, ref_var = _reference(x, channel)
    assert mean.shape == ref_mean.shape and mean.dtype == np.float32
    # float32 rounding of the inputs' sum (mean) and of the centred squares (variance)
    np.testing.assert_allclose(mean, ref_mean, rtol=2e-6, atol=1e-6)
    np.testing.assert_allclose(variance, ref_var, rtol=2e-5 if offset else 5e-6)


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
def test_scale_shift_is_bitwise_x_times_a_then_plus_b(shape, channel, dtype) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(5)
    x = rng.standard_normal(shape).astype(dtype)
    kept = tuple(n if i == channel else 1 for i, n in enumerate(shape))
    a = rng.standard_normal(kept).astype(dtype)
    b = rng.standard_normal(kept).astype(dtype)
    y = scale_shift(x, a, b, xp=xp)
    expected = x * a
    expected += b
    assert y.dtype == x.dtype and y.shape == x.shape
    np.testing.assert_array_equal(y, expected)


@pytest.mark.parametrize(
    ("shape", "axis"), [((16, 32, 40, 40), 1), ((16, 24, 24, 32), -1), ((8192, 60), -1), ((2048, 1000), -1)]
)
@pytest.mark.parametrize("training", [True, False])
def test_layers_agree_with_the_plain_schedule(monkeypatch, shape, axis, training) -> None:  # type: ignore[no-untyped-def]
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
    with monkeypatch.context() as m:
        _plain(m)
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
    lay = _streaming.layout(x, channel, xp)
    axes = tuple(i for i in range(x.ndim) if i != channel)
    mean = x.astype(np.float64).mean(axis=axes).astype(np.float32)
    kept = tuple(n if i == channel else 1 for i, n in enumerate(shape))
    sum_xc, sum_dy, sum_dy_xc = _streaming.centred_sums(x, dy, mean, lay, xp)
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
    lay = _streaming.layout(x, channel, xp)
    dx = _streaming.centred_affine(x, dy, mean, k, p, q, lay, xp)
    kept = tuple(n if i == channel else 1 for i, n in enumerate(shape))
    t = (x - mean.reshape(kept)) * p.reshape(kept)
    t = t + q.reshape(kept)
    np.testing.assert_array_equal(dx, dy * k.reshape(kept) + t)


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
def test_backward_agrees_with_the_plain_schedule(monkeypatch, shape, axis, fused, training) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(10)
    x = (rng.standard_normal(shape) * 2 + 3).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    c = shape[axis]
    ax = axis % len(shape)
    config = BNConfig(axis=(ax,), rank=len(shape), param_shape=(c,), fused=fused)
    params = BNParams(rng.uniform(0.5, 2, c).astype(np.float32), rng.standard_normal(c).astype(np.float32))
    state = BNState(rng.standard_normal(c).astype(np.float32), rng.uniform(0.5, 2, c).astype(np.float32))
    assert _streaming.layout(x, ax, xp) is not None
    got = batch_norm_vjp(x, params, state, dy, training=training, config=config)
    with monkeypatch.context() as m:
        _plain(m)
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
    lay = _streaming.layout(x, channel, xp)
    return [
        *_streaming.channel_moments(x, lay, xp),
        _streaming.scale_shift(x, vectors[0], vectors[1], lay, xp),
        *_streaming.centred_sums(x, dy, vectors[0], lay, xp),
        _streaming.centred_affine(x, dy, *vectors, lay, xp),
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


def test_thread_count_setting(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("ARRAYBN_NUM_THREADS", "3")
    assert _streaming.thread_count() == 3
    monkeypatch.delenv("ARRAYBN_NUM_THREADS")
    assert 1 <= _streaming.thread_count() <= _streaming._MAX_THREADS
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


def _moments_in_child(queue) -> None:  # type: ignore[no-untyped-def]
    x = np.random.default_rng(14).standard_normal((64, 64, 64, 4)).astype(np.float32)
    mean, _ = moments(x, [0, 1, 2], xp=xp)
    queue.put(np.asarray(mean).ravel().tolist())


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")  # Python >= 3.12
@pytest.mark.filterwarnings(r"ignore:os\.fork\(\) was called:RuntimeWarning")  # JAX, when another test imported it
def test_threads_work_in_a_forked_child(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import multiprocessing

    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("no fork on this platform")
    monkeypatch.setenv("ARRAYBN_NUM_THREADS", "2")
    x = np.random.default_rng(14).standard_normal((64, 64, 64, 4)).astype(np.float32)
    parent_mean, _ = moments(x, [0, 1, 2], xp=xp)  # the parent's pool now exists
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_moments_in_child, args=(queue,))
    child.start()
    child.join(timeout=60)
    if child.exitcode is None:
        child.kill()
        child.join()
    assert child.exitcode == 0, "the forked child hung or failed"
    np.testing.assert_array_equal(np.asarray(queue.get(timeout=5), np.float32), parent_mean.ravel())


def test_blocked_schedule_passes_the_goldens(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """TensorFlow's golden cases through the blocked schedule (they are all below its size threshold).

    Every 4th forward case (about 2000) and every gradient case, with the size
    and row-length thresholds removed so that every single-channel-axis case
    takes the blocked passes: the plain path replays the whole set in
    test_conformance.py and test_backward.py already.
    """
    from conformance import gradients, runner

    monkeypatch.setattr(_streaming, "_MIN_BYTES", 0)
    monkeypatch.setattr(_streaming, "_MIN_INNER", 1)
    monkeypatch.setenv("ARRAYBN_NUM_THREADS", "2")
    streamed = []
    original = _streaming.layout

    def counting(*args):  # type: ignore[no-untyped-def]
        lay = original(*args)
        if lay is not None:
            streamed.append(lay)
        return lay

    monkeypatch.setattr(_streaming, "layout", counting)
    summary = runner.run(xp=xp, progress=False, stride=4)
    assert summary.outcomes, "no cases ran"
    assert not summary.failures, summary.failure_text(limit=40)
    failures = gradients.check(xp)
    assert not failures, list(failures.items())[:10]
    assert len(streamed) > 1000  # the blocked schedule did run (forward, backward)
