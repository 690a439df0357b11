"""Initializers, regularizers and constraints: Keras names, configs, and values."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import arraybn
from arraybn import constraints, initializers, regularizers
from arraybn._namespace import numpy_namespace, to_numpy

NP = numpy_namespace()


@pytest.mark.parametrize(
    "name",
    ["zeros", "ones", "Zeros", "random_normal", "RandomUniform", "truncated_normal", "glorot_uniform",
     "glorot_normal", "he_normal", "he_uniform", "lecun_normal", "lecun_uniform", "variance_scaling"],
)
def test_initializer_round_trip(name):  # type: ignore[no-untyped-def]
    init = initializers.get(name)
    cfg = initializers.serialize(init)
    assert cfg["module"] == "keras.initializers"
    again = initializers.deserialize(cfg)
    assert type(again) is type(init) and again.get_config() == init.get_config()


def test_constant_initializer(xp, device):  # type: ignore[no-untyped-def]
    init = initializers.get({"class_name": "Constant", "config": {"value": 0.5}})
    out = init((3,), xp.float32, xp=xp, device=device)
    np.testing.assert_array_equal(to_numpy(out), np.full(3, 0.5, dtype=np.float32))


@pytest.mark.parametrize(
    ("init", "mean", "std"),
    [
        (initializers.RandomNormal(mean=1.0, stddev=0.5, seed=1), 1.0, 0.5),
        (initializers.RandomUniform(minval=-1.0, maxval=3.0, seed=2), 1.0, 4.0 / np.sqrt(12.0)),
        (initializers.TruncatedNormal(stddev=1.0, seed=3), 0.0, 0.8796),
        (initializers.VarianceScaling(scale=2.0, seed=4), 0.0, np.sqrt(2.0 / 20000)),
        (initializers.GlorotUniform(seed=5), 0.0, np.sqrt(1.0 / 20000)),
    ],
)
def test_random_initializers_distribution_and_determinism(init, mean, std):  # type: ignore[no-untyped-def]
    a = to_numpy(init((20000,), NP.float64, xp=NP))
    b = to_numpy(init((20000,), NP.float64, xp=NP))
    np.testing.assert_array_equal(a, b)  # deterministic for a seed
    assert abs(a.mean() - mean) < 5 * std / np.sqrt(a.size)
    assert abs(a.std() - std) < 0.03 * std


def test_regularizers():  # type: ignore[no-untyped-def]
    w = NP.asarray(np.array([1.0, -2.0, 3.0], dtype=np.float32))
    f32 = float(np.float32(0.01))
    assert float(regularizers.get("l1")(w)) == pytest.approx(f32 * 6.0, rel=1e-6)
    assert float(regularizers.get("l2")(w)) == pytest.approx(f32 * 14.0, rel=1e-6)
    assert float(regularizers.get("l1_l2")(w)) == pytest.approx(f32 * 20.0, rel=1e-6)
    assert regularizers.L1L2().get_config() == {"l1": 0.0, "l2": 0.0}
    r = regularizers.get({"class_name": "L1L2", "config": {"l2": 0.1}})
    assert float(r(w)) == pytest.approx(float(np.float32(0.1)) * 14.0, rel=1e-6)
    cfg = regularizers.serialize(r)
    assert regularizers.deserialize(cfg).get_config() == r.get_config()


def test_regularizer_factors_beyond_float32_become_infinite():  # type: ignore[no-untyped-def]
    """Keras's cast_to_floatx is np.asarray(x, float32): 1e39 overflows to inf (no error)."""
    with np.errstate(over="ignore"):
        expected = float(np.float32(1e39))
    assert expected == float("inf")
    assert regularizers.L1(1e39).get_config() == {"l1": expected}
    assert regularizers.L1L2(l1=0.0, l2=-1e40).get_config() == {"l1": 0.0, "l2": -expected}


def test_constraints():  # type: ignore[no-untyped-def]
    w = NP.asarray(np.array([3.0, -4.0]))
    np.testing.assert_array_equal(to_numpy(constraints.get("non_neg")(w)), [3.0, 0.0])
    np.testing.assert_allclose(to_numpy(constraints.get("unit_norm")(w)), [0.6, -0.8], rtol=1e-6)
    np.testing.assert_allclose(to_numpy(constraints.MaxNorm(max_value=2.5)(w)), [1.5, -2.0], rtol=1e-6)
    np.testing.assert_allclose(to_numpy(constraints.MaxNorm(max_value=10)(w)), [3.0, -4.0], rtol=1e-6)
    mm = constraints.MinMaxNorm(min_value=6.0, max_value=8.0, rate=0.5)
    np.testing.assert_allclose(to_numpy(mm(w)), np.array([3.0, -4.0]) * 5.5 / 5.0, rtol=1e-6)
    for c in ("non_neg", "unit_norm", "max_norm", "min_max_norm"):
        obj = constraints.get(c)
        assert type(constraints.deserialize(constraints.serialize(obj))) is type(obj)
    np.testing.assert_array_equal(to_numpy(constraints.constrain(w, None)), [3.0, -4.0])


def test_callable_initializer_and_its_config():  # type: ignore[no-untyped-def]
    def half(shape, dtype=None):  # type: ignore[no-untyped-def]
        return np.full(shape, 0.5)

    layer = arraybn.BatchNormalization(gamma_initializer=half)
    layer(np.ones((2, 3), dtype=np.float32))
    np.testing.assert_array_equal(to_numpy(layer.gamma), np.full(3, 0.5, dtype=np.float32))
    assert layer.get_config()["gamma_initializer"]["class_name"] == "function"


def test_import_pulls_in_no_array_library():  # type: ignore[no-untyped-def]
    code = (
        "import sys, arraybn; "
        "bad = [m for m in ('numpy', 'torch', 'jax', 'cupy', 'dask') if m in sys.modules]; "
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""


def test_public_api():  # type: ignore[no-untyped-def]
    for name in arraybn.__all__:
        assert hasattr(arraybn, name)
    import inspect

    params = list(inspect.signature(arraybn.BatchNormalization).parameters)
    assert params == [
        "axis", "momentum", "epsilon", "center", "scale", "beta_initializer", "gamma_initializer",
        "moving_mean_initializer", "moving_variance_initializer", "beta_regularizer", "gamma_regularizer",
        "beta_constraint", "gamma_constraint", "renorm", "renorm_clipping", "renorm_momentum", "fused",
        "trainable", "virtual_batch_size", "adjustment", "name", "kwargs",
    ]


@pytest.mark.parametrize("name", ["l2", "l1_l2"])
def test_l2_penalty_halves_each_square_as_tf_l2_loss(name) -> None:  # type: ignore[no-untyped-def]
    """TF: ``2 * l2 * tf.nn.l2_loss(x)``, whose kernel halves each square before the sum. In float16
    the sum of eight squares of 100 (80000) overflows; the sum of their halves (40000) does not,
    and the penalty is 0.02 * 40000 = 800 (plus l1 * 800 = 8 for "l1_l2"). TF 2.21: 800.0 and 808.0."""
    x = np.full((2, 4), 100.0, np.float16)
    penalty = regularizers.get(name)(x)
    assert penalty.dtype == np.float16
    np.testing.assert_allclose(float(penalty), 800.0 if name == "l2" else 808.0, rtol=1e-3)
