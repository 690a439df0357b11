"""The functional core: each function against a NumPy formula, and properties of the whole."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import arraybn
from arraybn import BNConfig, BNParams, BNState, batch_norm
from arraybn._reference import REFERENCE, assign_moving_average, moments, weighted_moments
from arraybn._namespace import to_numpy

PROPS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _np(a):  # type: ignore[no-untyped-def]
    return np.asarray(to_numpy(a), dtype=np.float64)


def test_moments_two_pass(xp, asarray):  # type: ignore[no-untyped-def]
    x = np.random.default_rng(0).standard_normal((5, 4, 3)) + 1e3  # large mean, small variance
    m, v = moments(asarray(x, xp.float64), [0, 1], xp=xp)
    np.testing.assert_allclose(_np(m).ravel(), x.mean((0, 1)), rtol=1e-14)
    np.testing.assert_allclose(_np(v).ravel(), x.var((0, 1)), rtol=1e-10)
    m, v = moments(asarray(x, xp.float64), [], xp=xp)  # no reduction: the input, zero variance
    np.testing.assert_array_equal(_np(m), x)
    np.testing.assert_array_equal(_np(v), np.zeros_like(x))


def test_weighted_moments_div_no_nan(xp, asarray):  # type: ignore[no-untyped-def]
    x = np.random.default_rng(1).standard_normal((4, 3))
    w = np.array([[1.0], [0.0], [2.0], [1.0]])
    m, v = weighted_moments(asarray(x, xp.float64), [0], asarray(w, xp.float64), xp=xp)
    ref_m = (w * x).sum(0) / w.sum()
    np.testing.assert_allclose(_np(m).ravel(), ref_m, rtol=1e-14)
    np.testing.assert_allclose(_np(v).ravel(), (w * (x - ref_m) ** 2).sum(0) / w.sum(), rtol=1e-13)
    m, v = weighted_moments(asarray(x, xp.float64), [0], asarray(np.zeros((4, 1)), xp.float64), xp=xp)
    np.testing.assert_array_equal(_np(m), np.zeros((1, 3)))
    np.testing.assert_array_equal(_np(v), np.zeros((1, 3)))


def normalize(x, mean, variance, offset, scale, epsilon, *, xp):  # type: ignore[no-untyped-def]
    """``tf.nn.batch_normalization``: the reference's non-fused coefficients, then its scale-and-shift."""
    c = REFERENCE.coefficients("non_fused", mean, variance, scale, offset, epsilon, None, xp)
    return REFERENCE.affine(x, c.scale, c.shift, c.center, xp)


def test_normalize_and_moving_average(xp, asarray):  # type: ignore[no-untyped-def]
    x = np.random.default_rng(2).standard_normal((6, 2))
    m, v = np.array([0.5, -1.0]), np.array([2.0, 0.25])
    g, b = np.array([1.5, -0.5]), np.array([0.1, 0.2])
    y = normalize(*(asarray(a, xp.float64) for a in (x, m, v, b, g)), 1e-3, xp=xp)
    np.testing.assert_allclose(_np(y), (x - m) / np.sqrt(v + 1e-3) * g + b, rtol=1e-13)
    y = normalize(asarray(x, xp.float64), asarray(m, xp.float64), asarray(v, xp.float64), None, None, 0.0, xp=xp)
    np.testing.assert_allclose(_np(y), (x - m) / np.sqrt(v), rtol=1e-13)
    new = assign_moving_average(asarray(m, xp.float64), asarray(v, xp.float64), 0.9, xp=xp)
    decay = float(np.float32(1 - 0.9))
    np.testing.assert_array_equal(_np(new), m - (m - v) * decay)


def _call(xp, asarray, x, *, config, training=True, state=None, params=None, **kw):  # type: ignore[no-untyped-def]
    c = x.shape[-1]
    if params is None:
        params = BNParams(asarray(np.ones(c), xp.float32), asarray(np.zeros(c), xp.float32))
    if state is None:
        state = BNState(asarray(np.zeros(c), xp.float32), asarray(np.ones(c), xp.float32))
    return batch_norm(asarray(x, xp.float32), params, state, training=training, config=config, xp=xp, **kw)


shapes = st.tuples(st.integers(2, 6), st.integers(1, 3), st.integers(1, 4))


@PROPS
@given(shape=shapes, seed=st.integers(0, 2**16), fused=st.booleans())
def test_momentum_one_keeps_state_and_zero_takes_batch_moments(xp, asarray, shape, seed, fused):  # type: ignore[no-untyped-def]
    x = np.random.default_rng(seed).standard_normal(shape) * 3 + 1
    base = dict(axis=(2,), rank=3, param_shape=(shape[2],), fused=False)
    _, st1 = _call(xp, asarray, x, config=BNConfig(momentum=1.0, **base))
    np.testing.assert_array_equal(_np(st1.moving_mean), np.zeros(shape[2]))
    np.testing.assert_array_equal(_np(st1.moving_variance), np.ones(shape[2]))
    _, st0 = _call(xp, asarray, x, config=BNConfig(momentum=0.0, **base))
    np.testing.assert_allclose(_np(st0.moving_mean), x.mean((0, 1)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_np(st0.moving_variance), x.var((0, 1)), rtol=1e-5, atol=1e-6)


@PROPS
@given(shape=shapes, seed=st.integers(0, 2**16))
def test_inference_is_independent_of_batch_composition(xp, asarray, shape, seed):  # type: ignore[no-untyped-def]
    x = np.random.default_rng(seed).standard_normal(shape)
    cfg = BNConfig(axis=(2,), rank=3, param_shape=(shape[2],))
    y_all, _ = _call(xp, asarray, x, config=cfg, training=False)
    y_one, _ = _call(xp, asarray, x[:1], config=cfg, training=False)
    np.testing.assert_array_equal(_np(y_all)[:1], _np(y_one))


@PROPS
@given(shape=shapes, seed=st.integers(0, 2**16))
def test_renorm_with_unit_clipping_is_plain_batch_norm(xp, asarray, shape, seed):  # type: ignore[no-untyped-def]
    x = np.random.default_rng(seed).standard_normal(shape) * 2 + 0.3
    c = shape[2]
    plain = BNConfig(axis=(2,), rank=3, param_shape=(c,))
    renorm = BNConfig(
        axis=(2,), rank=3, param_shape=(c,), renorm=True, renorm_clipping={"rmin": 1.0, "rmax": 1.0, "dmax": 0.0}
    )
    ones, zeros = asarray(np.ones(c), xp.float32), asarray(np.zeros(c), xp.float32)
    state = BNState(zeros, ones, ones, zeros, ones)
    y0, _ = _call(xp, asarray, x, config=plain)
    y1, _ = _call(xp, asarray, x, config=renorm, state=state)
    np.testing.assert_allclose(_np(y1), _np(y0), rtol=1e-6, atol=1e-6)


@PROPS
@given(shape=shapes, seed=st.integers(0, 2**16))
def test_one_virtual_batch_of_the_whole_batch_is_plain_output(xp, asarray, shape, seed):  # type: ignore[no-untyped-def]
    x = np.random.default_rng(seed).standard_normal(shape)
    c = shape[2]
    plain = BNConfig(axis=(2,), rank=3, param_shape=(c,))
    ghost = BNConfig(axis=(2,), rank=3, param_shape=(1, 1, 1, c), virtual_batch_size=shape[0])
    y0, _ = _call(xp, asarray, x, config=plain)
    ones, zeros = asarray(np.ones((1, 1, 1, c)), xp.float32), asarray(np.zeros((1, 1, 1, c)), xp.float32)
    y1, _ = _call(xp, asarray, x, config=ghost, params=BNParams(ones, zeros), state=BNState(zeros, ones))
    np.testing.assert_allclose(_np(y1), _np(y0), rtol=1e-6, atol=1e-6)


@PROPS
@given(shape=shapes, seed=st.integers(0, 2**16), fused=st.booleans())
def test_training_output_has_beta_mean_and_gamma_scale(xp, asarray, shape, seed, fused):  # type: ignore[no-untyped-def]
    x = np.random.default_rng(seed).standard_normal(shape) * 5 - 2
    c = shape[2]
    gamma, beta = np.linspace(0.5, 2.0, c), np.linspace(-1.0, 1.0, c)
    cfg = BNConfig(axis=(2,), rank=3, param_shape=(c,), epsilon=0.0, fused=fused)
    params = BNParams(asarray(gamma, xp.float32), asarray(beta, xp.float32))
    y, _ = _call(xp, asarray, x, config=cfg, params=params)
    y = _np(y)
    n = shape[0] * shape[1]
    var = x.var((0, 1))
    # the layer sees x rounded to float32: a channel whose values nearly agree (|x| / std large) is
    # ill-conditioned, its normalized values off by a few float32 ulps of |x| / std
    with np.errstate(divide="ignore"):
        conditioning = np.where(var > 0, np.abs(x).max((0, 1)) / np.sqrt(var), 0.0)  # one value: y is beta
    float32_error = 8 * 2.0**-23 * conditioning
    np.testing.assert_array_less(np.abs(y.mean((0, 1)) - beta), 1e-4 + float32_error * gamma)
    keep = (var > 1e-6) & (float32_error < 1e-4) if n > 1 else np.zeros(c, dtype=bool)
    np.testing.assert_allclose(y.std((0, 1))[keep], np.abs(gamma)[keep], rtol=1e-3)


def test_functional_is_pure(xp, asarray):  # type: ignore[no-untyped-def]
    x = np.random.default_rng(3).standard_normal((4, 3))
    cfg = BNConfig(axis=(1,), rank=2, param_shape=(3,), renorm=True)
    ones, zeros = asarray(np.ones(3), xp.float32), asarray(np.zeros(3), xp.float32)
    state = BNState(zeros, ones, ones, zeros, ones)
    _, new = _call(xp, asarray, x, config=cfg, state=state)
    np.testing.assert_array_equal(_np(state.moving_mean), np.zeros(3))
    np.testing.assert_array_equal(_np(state.renorm_stddev), np.ones(3))
    assert all(a is not b for a, b in zip(new, state, strict=True))


def test_layer_and_functional_agree(xp, asarray):  # type: ignore[no-untyped-def]
    x = np.random.default_rng(4).standard_normal((4, 2, 2, 3)).astype(np.float32)
    layer = arraybn.BatchNormalization(momentum=0.8)
    y = layer(asarray(x), training=True)
    cfg = BNConfig(axis=(3,), rank=4, param_shape=(3,), momentum=0.8, fused=True)
    ones, zeros = asarray(np.ones(3), xp.float32), asarray(np.zeros(3), xp.float32)
    y2, state = batch_norm(asarray(x), BNParams(ones, zeros), BNState(zeros, ones), training=True, config=cfg, xp=xp)
    np.testing.assert_array_equal(_np(y), _np(y2))
    np.testing.assert_array_equal(_np(layer.moving_variance), _np(state.moving_variance))


@pytest.mark.parametrize("n", [1, 2, 3])
def test_fused_bessel_correction_small_batches(xp, asarray, n):  # type: ignore[no-untyped-def]
    """tf-keras's test_bessels_correction: the fused kernel updates with n / max(n - 1, 1)."""
    x = np.arange(n, dtype=np.float64).reshape(n, 1, 1, 1) * 2.0
    layer = arraybn.BatchNormalization(momentum=0.5, moving_variance_initializer="zeros")
    layer(asarray(x, xp.float32), training=True)
    assert layer.fused
    expected = 0.5 * x.var() * n / max(n - 1, 1)
    np.testing.assert_allclose(_np(layer.moving_variance), [expected], rtol=1e-6)
