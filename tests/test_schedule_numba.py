"""numba-kernels against the reference: compiled loops for NumPy arrays and torch CPU tensors.

The elementwise passes (scale-and-shift, the backward's gradient) must be the
reference's bits; the statistics and the backward's sums are accumulated in
float64, so they must be within rounding of a float64 recomputation and never
less accurate than the reference's own. Skipped where the optional ``numba``
package is not installed (``pip install "arraybn[fast]"``; the test extra has it).
"""

from __future__ import annotations

import tracemalloc
import warnings

import array_api_compat.numpy as xp
import numpy as np
import pytest
from conftest import recorded

import arraybn
from arraybn import BNConfig, BNParams, BNState, batch_norm_vjp
from arraybn import _schedules as schedules
from arraybn._reference import REFERENCE
from arraybn._schedules import numba_kernels as nk
from arraybn._schedules import select

pytest.importorskip("numba", reason="the numba-kernels schedule needs the optional numba package")

OPS = nk.NumbaKernels()

# (shape, channel axis): channels last as rows of tiled channel vectors; a prime row count
# (a tail of channel vectors); long channel vectors; channels in the middle; a 6-D input;
# runs per channel shorter than 8 values, and a row length that is not a multiple of 8
SHAPES = [
    ((16, 28, 28, 32), 3),
    ((8191, 61), 1),
    ((1500, 1000), 1),
    ((8, 32, 40, 40), 1),
    ((3, 5, 4, 9, 16, 64), 2),
    ((2, 7, 3, 5), 1),
    ((4, 6, 523), 1),
]


@pytest.fixture
def loops(monkeypatch):  # type: ignore[no-untyped-def]
    """Every input takes the loops (no size threshold); counts the calls that do."""
    monkeypatch.setattr(nk, "_MIN_BYTES", 0)
    monkeypatch.setattr(nk, "_MIN_INNER", 1)
    return recorded(monkeypatch, nk, "_layout", keep=lambda lay: lay is not None)


def _axes(shape, channel):  # type: ignore[no-untyped-def]
    return [i for i in range(len(shape)) if i != channel]


def _kept(shape, channel):  # type: ignore[no-untyped-def]
    return tuple(n if i == channel else 1 for i, n in enumerate(shape))


def _float64_moments(x: np.ndarray, channel: int) -> tuple[np.ndarray, np.ndarray]:
    axes = tuple(_axes(x.shape, channel))
    xd = x.astype(np.float64)
    mean = xd.mean(axis=axes, keepdims=True)
    return mean, ((xd - mean) ** 2).mean(axis=axes, keepdims=True)


def _namespace(name: str):  # type: ignore[no-untyped-def]
    if name == "numpy":
        return np.asarray, lambda a: np.asarray(a), xp
    torch = pytest.importorskip("torch")
    return torch.from_numpy, lambda a: a.numpy(), pytest.importorskip("array_api_compat.torch")


@pytest.mark.parametrize("namespace", ["numpy", "torch"])
@pytest.mark.parametrize(("shape", "channel"), SHAPES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("streamed", [False, True])
def test_elementwise_passes_are_bitwise_the_reference(monkeypatch, loops, namespace, shape, channel, dtype, streamed) -> None:  # type: ignore[no-untyped-def]
    """The scale-and-shift and the backward's gradient, with plain stores and with streaming stores (the
    outputs of `_STREAM_BYTES` and more), are the reference's bits."""
    monkeypatch.setattr(nk, "_STREAM_BYTES", 0 if streamed else 1 << 62)
    names = recorded(monkeypatch, nk, "_streamed")  # the kernels the elementwise passes' pieces ran
    wrap, unwrap, ns = _namespace(namespace)
    rng = np.random.default_rng(40)
    x, dy = (wrap((rng.standard_normal(shape) * 3 + 1e3).astype(dtype)) for _ in range(2))
    a, b, m, k = (wrap(rng.standard_normal(_kept(shape, channel)).astype(dtype)) for _ in range(4))
    for center in (None, m):
        got = OPS.affine(x, a, b, center, ns)
        assert type(got) is type(x) and got.dtype == x.dtype and tuple(got.shape) == shape
        np.testing.assert_array_equal(unwrap(got), unwrap(REFERENCE.affine(x, a, b, center, ns)))
    got = OPS.backward_dx(x, dy, m, k, a, b, ns)
    np.testing.assert_array_equal(unwrap(got), unwrap(REFERENCE.backward_dx(x, dy, m, k, a, b, ns)))
    assert len(loops) == 3
    assert len(names) == 3 and all(name.endswith("_stream") == streamed for name in names)
    rows = nk._STREAM_ROW_ELEMENTS if streamed else nk._MAP_ROW_ELEMENTS  # channels last: rows of that many values
    assert all(lay.k == (1 if lay.b > 1 else min(lay.a, -(-rows // lay.c))) for lay in loops)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_streaming_rows_are_the_plain_loops_bits(dtype) -> None:  # type: ignore[no-untyped-def]
    """The streaming kernels write every element of every row (chunk by chunk: the head before the first
    64-byte boundary, the 64-byte lines, the tail) with the plain kernels' values, at any alignment and row
    length."""
    k = nk.kernels()
    rng = np.random.default_rng(7)
    for width in (1, 3, 15, 16, 17, 64, 100, 1021, 2 * nk._STREAM_CHUNK + 452):  # the last: three chunks a row
        x, dy = (rng.standard_normal((20, width)).astype(dtype) for _ in range(2))
        c, a, b, m = (rng.standard_normal(max(width, 5)).astype(dtype) for _ in range(4))
        for offset in range(17):  # the output's start, in elements past an allocation's
            out = np.empty(20 * width + 32, dtype)[offset : offset + 20 * width].reshape(20, width)
            cases = [
                ("rows_scale", (x, a[:width], b[:width], 3, 17)),
                ("rows_affine", (x, c[:width], a[:width], b[:width], 0, 20)),
                ("rows_dx", (x, dy, m[:width], c[:width], a[:width], b[:width], 0, 20)),
                ("channel_rows_scale", (x, a, b, 5, 0, 20)),
                ("channel_rows_affine", (x, c, a, b, 5, 2, 20)),
                ("channel_rows_dx", (x, dy, m, c, a, b, 5, 0, 20)),
            ]
            for name, args in cases:
                expected = np.full((20, width), np.nan, dtype)
                out[...] = np.nan
                k[name](*args, expected)
                k[f"{name}_stream"](*args, out)
                np.testing.assert_array_equal(out, expected, err_msg=f"{name} {width} {offset}")


# (rule, dtype, the moving statistics' update, gamma given, beta given): every form the compiled loop takes
COEFFICIENT_FORMS = [
    *[("fused", np.float32, update, True, True) for update in (None, "fused", "replace")],
    *[("non_fused", dtype, update, g, b) for dtype in (np.float32, np.float64) for update in (None, "assign_sub")
      for g in (True, False) for b in (True, False)],
]  # fmt: skip


@pytest.mark.parametrize("namespace", ["numpy", "torch"])
@pytest.mark.parametrize(("rule", "dtype", "update", "with_gamma", "with_beta"), COEFFICIENT_FORMS)
def test_coefficients_are_bitwise_the_reference(namespace, rule, dtype, update, with_gamma, with_beta) -> None:  # type: ignore[no-untyped-def]
    """The per-channel arithmetic in one compiled loop gives the reference's bits, zeros' signs, infinities
    and NaN included (on torch with torch's own square root, which is not correctly rounded on every CPU)."""
    from arraybn._reference import MovingUpdate

    wrap, unwrap, ns = _namespace(namespace)
    rng = np.random.default_rng(len(COEFFICIENT_FORMS))
    p = 1000
    mean, variance, gamma, beta = (rng.standard_normal((1, 1, p)).astype(dtype) * 10 for _ in range(4))
    variance = np.abs(variance)
    variance[0, 0, :3] = [0.0, np.inf, np.nan]
    mean[0, 0, 3:6] = [0.0, -0.0, np.nan]
    moving = [wrap(rng.standard_normal(p).astype(dtype)), wrap(np.abs(rng.standard_normal(p)).astype(dtype))]
    bessel = 1.0 if rule == "non_fused" else 4096 / 4095
    momentum = 0.0 if update == "replace" else 0.99
    upd = None if update is None else MovingUpdate(*moving, momentum, "assign_sub" if update == "assign_sub" else "fused", bessel)
    args = (wrap(mean), wrap(variance), wrap(gamma) if with_gamma else None, wrap(beta) if with_beta else None,
            0.001 if rule == "non_fused" else float(np.float32(0.001)), upd)  # fmt: skip
    with np.errstate(all="ignore"):
        want = REFERENCE.coefficients(rule, *args, ns)
        got = OPS.coefficients(rule, *args, ns)
        assert nk.coefficients(rule, *args) is not None  # the loop computed it
    for w, g in zip(want, got, strict=True):
        assert (w is None) == (g is None)
        if w is not None:
            assert type(g) is type(w) and g.dtype == w.dtype and tuple(g.shape) == tuple(w.shape)
            np.testing.assert_array_equal(unwrap(g).view(np.uint8), unwrap(w).view(np.uint8))


def test_coefficients_outside_the_loops_forms_are_the_reference() -> None:
    """float64 vectors under the fused rule, a momentum that is an array, the assign_sub update of the fused
    rule, an absent gamma on the fused rule and mixed dtypes are left to the reference."""
    from arraybn._reference import MovingUpdate

    v32, v64 = np.ones((1, 4), np.float32), np.ones((1, 4))
    m32 = [np.ones(4, np.float32), np.ones(4, np.float32)]
    assert nk.coefficients("fused", v64, v64, v64, v64, 1e-3, None) is None
    assert nk.coefficients("fused", v32, v32, None, v32, 1e-3, None) is None
    assert nk.coefficients("fused", v32, v32, v32, v32, 1e-3, MovingUpdate(*m32, 0.99, "assign_sub", 2.0)) is None
    assert nk.coefficients("non_fused", v32, v32, v32, v32, 1e-3, MovingUpdate(*m32, np.array(0.99), "assign_sub")) is None
    assert nk.coefficients("non_fused", v32, v64, v32, v32, 1e-3, None) is None
    assert nk.coefficients("non_fused", v32, v32, v32, v32, np.float32(1e-3), None) is None
    c = OPS.coefficients("fused", v64, v64, v64, v64, 1e-3, None, xp)
    np.testing.assert_array_equal(c.scale, REFERENCE.coefficients("fused", v64, v64, v64, v64, 1e-3, None, xp).scale)


@pytest.mark.parametrize(("shape", "channel"), SHAPES)
@pytest.mark.parametrize("offset", [0.0, 1e3])
def test_float32_moments_are_at_least_as_accurate_as_the_reference(loops, shape, channel, offset) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(len(shape) + channel)
    x = (rng.standard_normal(shape) * 0.5 + offset).astype(np.float32)
    axes = _axes(shape, channel)
    true_mean, true_var = _float64_moments(x, channel)
    mean, variance = OPS.moments(x, axes, xp)
    assert loops and mean.shape == true_mean.shape and mean.dtype == np.float32
    ref_mean, ref_var = REFERENCE.moments(x, axes, xp)
    # float64 sums rounded once: the nearest float32 of the float64 statistics, or next to it
    np.testing.assert_allclose(mean, true_mean, rtol=1.2e-7, atol=1e-30)
    np.testing.assert_allclose(variance, true_var, rtol=1.2e-7)
    assert np.all(np.abs(mean - true_mean) <= np.abs(ref_mean - true_mean) + np.spacing(np.float32(offset + 1)))
    assert np.max(np.abs(variance / true_var - 1)) <= max(np.max(np.abs(ref_var / true_var - 1)), 1.2e-7)


@pytest.mark.parametrize(("shape", "channel"), SHAPES)
def test_float64_moments_are_exact_to_rounding(loops, shape, channel) -> None:  # type: ignore[no-untyped-def]
    x = np.random.default_rng(41).standard_normal(shape) + 7.0
    mean, variance = OPS.moments(x, _axes(shape, channel), xp)
    true_mean, true_var = _float64_moments(x, channel)
    assert loops and mean.dtype == np.float64
    np.testing.assert_allclose(mean, true_mean, rtol=1e-13)  # as numpy-blocked's: float64 sums of 1e4 values
    np.testing.assert_allclose(variance, true_var, rtol=1e-11)


@pytest.mark.parametrize("namespace", ["numpy", "torch"])
@pytest.mark.parametrize(("shape", "channel"), SHAPES)
def test_backward_sums_match_a_float64_recomputation(loops, namespace, shape, channel) -> None:  # type: ignore[no-untyped-def]
    wrap, unwrap, ns = _namespace(namespace)
    rng = np.random.default_rng(42)
    x = (rng.standard_normal(shape) + 50).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    mean = (x.astype(np.float64).mean(axis=tuple(_axes(shape, channel)), keepdims=True)).astype(np.float32)
    got = [unwrap(s) for s in OPS.backward_sums(wrap(x), wrap(dy), wrap(mean), _axes(shape, channel), ns)]
    assert loops
    xc = (x - mean).astype(np.float64)  # the reference's centred values, then exact float64 sums
    axes = tuple(_axes(shape, channel))
    for value, want in zip(got, (xc.sum(axes, keepdims=True), dy.astype(np.float64).sum(axes, keepdims=True),
                                 (xc * dy).sum(axes, keepdims=True))):  # fmt: skip
        assert value.dtype == np.float32 and value.shape == want.shape
        np.testing.assert_allclose(value, want, rtol=1.2e-7, atol=1e-6)


def test_nan_and_inf_reach_the_statistics_as_in_the_reference(loops) -> None:
    x = np.random.default_rng(43).standard_normal((64, 16, 24, 24)).astype(np.float32)
    x[3, 2, 5, 7] = np.nan
    x[0, 9, 0, 0] = np.inf  # inside the values that give the shift
    x[40, 11, 3, 3] = np.inf  # outside them
    x[1, 12, 0, 0], x[50, 12, 0, 0] = np.inf, -np.inf
    for channel_last in (False, True):
        data = np.ascontiguousarray(np.moveaxis(x, 1, -1)) if channel_last else x
        channel = 3 if channel_last else 1
        axes = _axes(data.shape, channel)
        with np.errstate(invalid="ignore"):  # inf - inf, silent as in TF
            got = [v.ravel() for v in OPS.moments(data, axes, xp)]
            want = [v.ravel() for v in REFERENCE.moments(data, axes, xp)]
        for g, w in zip(got, want, strict=True):
            np.testing.assert_array_equal(np.isnan(g), np.isnan(w))
            np.testing.assert_array_equal(np.isinf(g), np.isinf(w))
            finite = np.isfinite(w)
            np.testing.assert_allclose(g[finite], w[finite], rtol=1e-5)
        assert np.isnan(got[0][2]) and got[0][9] == np.inf and got[0][11] == np.inf and np.isnan(got[0][12])


def test_sums_that_overflow_float32_are_left_to_float32_arithmetic(loops) -> None:
    x = np.random.default_rng(44).standard_normal((64, 4, 32, 32)).astype(np.float32)
    x[:, 1] = 3e37  # the channel's float32 sum overflows, its float64 sum does not
    x[:, 2] *= 1e19  # the squares of the centred values overflow float32
    axes = [0, 2, 3]
    with np.errstate(over="ignore", invalid="ignore"):
        got = [v.ravel() for v in OPS.moments(x, axes, xp)]
        want = [v.ravel() for v in REFERENCE.moments(x, axes, xp)]
    assert got[0][1] == np.inf and want[0][1] == np.inf
    assert not np.isfinite(got[1][1]) and not np.isfinite(want[1][1])
    assert got[1][2] == np.inf and want[1][2] == np.inf
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g[[0, 3]], w[[0, 3]], rtol=1e-5)


@pytest.mark.parametrize(("shape", "channel"), [((16, 28, 28, 32), 3), ((8, 32, 40, 40), 1), ((8191, 61), 1)])
def test_results_do_not_depend_on_the_thread_count(monkeypatch, loops, shape, channel) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(45)
    x, dy = ((rng.standard_normal(shape) + 3).astype(np.float32) for _ in range(2))
    v = rng.standard_normal(_kept(shape, channel)).astype(np.float32)
    axes = _axes(shape, channel)

    def everything() -> list[np.ndarray]:
        return [*OPS.moments(x, axes, xp), OPS.affine(x, v, v, v, xp), *OPS.backward_sums(x, dy, v, axes, xp),
                OPS.backward_dx(x, dy, v, v, v, v, xp)]  # fmt: skip

    results = {}
    for threads in ("1", "2", "3"):
        monkeypatch.setenv("ARRAYBN_NUM_THREADS", threads)
        results[threads] = everything()
    for threads in ("2", "3"):
        for got, want in zip(results[threads], results["1"], strict=True):
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(("shape", "channel"), [((256, 28, 28, 32), 3), ((8195, 1024), 1), ((64, 32, 64, 64), 1)])
def test_no_input_sized_temporary(monkeypatch, shape, channel) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("ARRAYBN_NUM_THREADS", "2")
    rng = np.random.default_rng(46)
    x, dy = (rng.standard_normal(shape).astype(np.float32) for _ in range(2))
    v = np.full(_kept(shape, channel), 1.5, np.float32)
    axes = _axes(shape, channel)
    calls = {
        "moments": lambda: OPS.moments(x, axes, xp),
        "affine": lambda: OPS.affine(x, v, v, v, xp),
        "backward_sums": lambda: OPS.backward_sums(x, dy, v, axes, xp),
        "backward_dx": lambda: OPS.backward_dx(x, dy, v, v, v, v, xp),
    }
    for call in calls.values():
        call()  # compiled, and the allocator warm
    outputs = {"moments": 0, "affine": x.nbytes, "backward_sums": 0, "backward_dx": x.nbytes}
    tracemalloc.start()
    try:
        for name, call in calls.items():
            tracemalloc.reset_peak()
            result = call()
            _, peak = tracemalloc.get_traced_memory()
            del result
            assert peak < outputs[name] + x.nbytes // 16, name  # float64 partial sums only, beside the output
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("namespace", ["numpy", "torch"])
@pytest.mark.parametrize(("shape", "axis"), [((16, 32, 20, 20), 1), ((16, 24, 24, 32), -1), ((4096, 64), -1)])
@pytest.mark.parametrize("training", [True, False])
def test_layers_forward_and_backward_agree_with_the_reference(namespace, shape, axis, training) -> None:  # type: ignore[no-untyped-def]
    wrap, unwrap, _ = _namespace(namespace)
    rng = np.random.default_rng(47)
    x = wrap((rng.standard_normal(shape) * 2 + 300).astype(np.float32))
    dy = wrap(rng.standard_normal(shape).astype(np.float32))
    assert select(x, None).name == "numba-kernels"

    def run():  # type: ignore[no-untyped-def]
        layer = arraybn.BatchNormalization(axis=axis)
        y, ctx = layer.forward(x, training=training)
        dx, grads = layer.backward(ctx, dy)
        return [unwrap(y), *(np.asarray(w) for w in layer.get_weights()), unwrap(dx),
                *(np.asarray(unwrap(grads[n])) for n in ("gamma", "beta"))]  # fmt: skip

    got = run()
    with arraybn.schedule("reference"):
        want = run()
    if not training:  # y and dx involve no sum: the reference's values; dgamma and dbeta are sums
        for g, w in zip(got[:6], want[:6], strict=True):
            np.testing.assert_array_equal(g, w)
        for g, w in zip(got[6:], want[6:], strict=True):
            np.testing.assert_allclose(g, w, rtol=2e-5, atol=1e-3)
        return
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)


def test_backward_vjp_with_the_loops_matches_the_reference() -> None:
    rng = np.random.default_rng(48)
    shape, c = (8192, 64), 64
    x = (rng.standard_normal(shape) * 2 + 3).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    config = BNConfig(axis=(1,), rank=2, param_shape=(c,), fused=False)
    params = BNParams(rng.uniform(0.5, 2, c).astype(np.float32), rng.standard_normal(c).astype(np.float32))
    state = BNState(rng.standard_normal(c).astype(np.float32), rng.uniform(0.5, 2, c).astype(np.float32))
    got = batch_norm_vjp(x, params, state, dy, training=True, config=config)
    with arraybn.schedule("reference"):
        want = batch_norm_vjp(x, params, state, dy, training=True, config=config)
    for name in ("dx", "dgamma", "dbeta"):
        np.testing.assert_allclose(getattr(got, name), getattr(want, name), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("namespace", ["numpy", "torch"])
def test_the_loops_pass_the_goldens(loops, namespace) -> None:  # type: ignore[no-untyped-def]
    """Every 4th forward golden and every gradient golden, every single-channel-axis case through the loops."""
    from conformance import gradients, runner

    _, _, ns = _namespace(namespace)
    summary = runner.run(xp=ns, progress=False, stride=4)
    assert summary.outcomes, "no cases ran"
    assert not summary.failures, summary.failure_text(limit=40)
    failures = gradients.check(ns)
    assert not failures, list(failures.items())[:10]
    assert len(loops) > 1000


@pytest.fixture
def torch_openmp(monkeypatch):  # type: ignore[no-untyped-def]
    """torch with GNU OpenMP on two threads or more; counts the calls whose pieces ran on its threads."""
    torch = pytest.importorskip("torch")
    if nk._openmp() is None:
        pytest.skip("this torch does not run on GNU OpenMP (the pieces stay on arraybn's own threads)")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    monkeypatch.setenv("ARRAYBN_NUM_THREADS", "2")
    monkeypatch.delenv("ARRAYBN_TORCH_OPENMP", raising=False)
    yield recorded(monkeypatch, nk, "_torch_threads")
    torch.set_num_threads(threads)


def _every_loop_result(x, dy, channel, wrap):  # type: ignore[no-untyped-def]
    """The four operations of the loops on ``x`` (NumPy) wrapped by ``wrap``, as NumPy arrays."""
    axes = _axes(x.shape, channel)
    kept = _kept(x.shape, channel)
    rng = np.random.default_rng(50)
    v = [wrap(rng.standard_normal(kept).astype(x.dtype)) for _ in range(4)]
    tx, tdy = wrap(x), wrap(dy)
    return [np.asarray(r) for r in (
        *OPS.moments(tx, axes, None), OPS.affine(tx, v[0], v[1], v[2], None), OPS.affine(tx, v[0], v[1], None, None),
        *OPS.backward_sums(tx, tdy, v[0], axes, None), OPS.backward_dx(tx, tdy, *v, None),
    )]  # fmt: skip


@pytest.mark.parametrize(("shape", "channel"), SHAPES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_torch_tensors_take_torchs_threads_with_the_same_bits(monkeypatch, loops, torch_openmp, shape, channel, dtype) -> None:  # type: ignore[no-untyped-def]
    """On torch tensors the pieces run on torch's own OpenMP threads: the same bits as on arraybn's pool
    (``ARRAYBN_TORCH_OPENMP=0``) and as on NumPy arrays."""
    import torch

    rng = np.random.default_rng(51)
    x = (rng.standard_normal(shape) * 3 + 50).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    on_torch = _every_loop_result(x, dy, channel, torch.from_numpy)
    assert torch_openmp and all(torch_openmp), "the pieces did not run on torch's threads"
    monkeypatch.setenv("ARRAYBN_TORCH_OPENMP", "0")
    torch_openmp.clear()
    on_pool = _every_loop_result(x, dy, channel, torch.from_numpy)
    assert torch_openmp and not any(torch_openmp)
    on_numpy = _every_loop_result(x, dy, channel, np.asarray)
    for a, b, c in zip(on_torch, on_pool, on_numpy, strict=True):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)


def test_a_failure_of_torchs_threads_warns_once_and_the_pool_computes(monkeypatch, loops, torch_openmp) -> None:  # type: ignore[no-untyped-def]
    import torch

    monkeypatch.setitem(nk._OPENMP_STATE, "failed", None)

    def broken(*args):  # type: ignore[no-untyped-def]
        raise OSError("simulated: GOMP_parallel is missing")

    monkeypatch.setattr(nk, "_launch", broken)
    x = np.random.default_rng(52).standard_normal((64, 32, 32)).astype(np.float32)
    want = _every_loop_result(x, x, 2, np.asarray)
    with pytest.warns(RuntimeWarning, match="OpenMP threads failed"):
        got = _every_loop_result(x, x, 2, torch.from_numpy)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        again = _every_loop_result(x, x, 2, torch.from_numpy)
    for a, b, c in zip(got, again, want, strict=True):
        np.testing.assert_array_equal(a, c)
        np.testing.assert_array_equal(b, c)
    assert not any(torch_openmp)
    assert "simulated" in nk._OPENMP_STATE["failed"]


def test_several_python_threads_share_torchs_threads(monkeypatch, loops, torch_openmp) -> None:  # type: ignore[no-untyped-def]
    """Calls from several Python threads at once each open their own OpenMP region: the pool's bits."""
    import threading

    import torch

    rng = np.random.default_rng(54)
    inputs = [(rng.standard_normal((16, 24, 24, 32)) * 2 + 5).astype(np.float32) for _ in range(3)]
    monkeypatch.setenv("ARRAYBN_TORCH_OPENMP", "0")
    want = [_every_loop_result(x, x, 3, torch.from_numpy) for x in inputs]
    monkeypatch.setenv("ARRAYBN_TORCH_OPENMP", "1")
    torch_openmp.clear()
    wrong: list[int] = []

    def work(i: int) -> None:
        for _ in range(4):
            got = _every_loop_result(inputs[i], inputs[i], 3, torch.from_numpy)
            if not all(np.array_equal(g, w) for g, w in zip(got, want[i], strict=True)):
                wrong.append(i)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    assert not wrong
    assert torch_openmp and all(torch_openmp)


def test_torch_tensors_under_autograd_or_half_precision_stay_with_torch() -> None:
    torch = pytest.importorskip("torch")
    x = torch.ones((64, 64, 64, 4), requires_grad=True)
    assert nk._host(x) is None  # autograd differentiates the reference's expressions
    with torch.no_grad():
        assert nk._host(x) is not None
    assert nk._host(torch.ones((4, 3), dtype=torch.float16)) is None
    layer = arraybn.BatchNormalization()
    x = torch.randn((64, 32, 32, 16), requires_grad=True)
    layer(x, training=True).square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_a_failure_of_the_loops_warns_once_and_the_reference_computes(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(schedules, "_DISABLED", {})

    def broken():  # type: ignore[no-untyped-def]
        raise OSError("simulated: no compiler")

    monkeypatch.setattr(nk, "kernels", broken)
    x = (np.random.default_rng(49).standard_normal((64, 32, 32, 16)) + 5).astype(np.float32)
    layer = arraybn.BatchNormalization()
    with pytest.warns(RuntimeWarning, match="'numba-kernels' schedule failed") as record:
        y = layer(x, training=True)
    assert len(record) == 1
    with arraybn.schedule("reference"):
        want_layer = arraybn.BatchNormalization()
        want = want_layer(x, training=True)
    np.testing.assert_array_equal(y, want)
    for got, expected in zip(layer.get_weights(), want_layer.get_weights(), strict=True):
        np.testing.assert_array_equal(got, expected)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(x, training=True)  # no second warning; the next schedule for NumPy takes over
    assert select(x, xp).name == "numpy-blocked"


def test_the_loops_compile_without_a_writable_cache(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import numba

    real = numba.njit

    def no_cache(*args, **options):  # type: ignore[no-untyped-def]
        if options.get("cache"):
            msg = "cannot cache function 'f': no locator available for file 'f.py'"
            raise RuntimeError(msg)
        return real(*args, **options)

    monkeypatch.setattr(numba, "njit", no_cache)
    nk.kernels.cache_clear()
    try:
        k = nk.kernels()
        x = np.arange(12, dtype=np.float32).reshape(3, 4)
        out = np.zeros((2, 4))
        k["rows_centred"](x, np.zeros(4), 0, 3, out)
        np.testing.assert_array_equal(out, [x.astype(np.float64).sum(axis=0), (x.astype(np.float64) ** 2).sum(axis=0)])
    finally:
        nk.kernels.cache_clear()


def test_a_bad_thread_setting_is_the_users_error(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    x = np.ones((64, 64, 64, 4), np.float32)
    layer = arraybn.BatchNormalization()
    layer(x, training=True)
    before = [w.copy() for w in layer.get_weights()]
    monkeypatch.setenv("ARRAYBN_NUM_THREADS", "0")
    with pytest.raises(ValueError, match="ARRAYBN_NUM_THREADS must be a positive integer"):
        layer(x, training=True)
    for got, want in zip(layer.get_weights(), before, strict=True):
        np.testing.assert_array_equal(got, want)
    assert "numba-kernels" not in schedules.disabled()
