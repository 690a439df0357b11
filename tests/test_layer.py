"""The layer on every namespace, checked against float64 NumPy formulas written here.

The formulas restate what TensorFlow's v1 layer computes (see docs/semantics.md);
TensorFlow's own output is checked by the conformance suite.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import arraybn
from arraybn._namespace import array_namespace, optional_dtype, to_numpy


def _np(a):  # type: ignore[no-untyped-def]
    return np.asarray(to_numpy(a), dtype=np.float64)


def _data(shape, seed=0, loc=0.5, scale=2.0):  # type: ignore[no-untyped-def]
    return np.random.default_rng(seed).standard_normal(shape) * scale + loc


def _bn_ref(x, axes, gamma=None, beta=None, eps=1e-3):  # type: ignore[no-untyped-def]
    red = tuple(i for i in range(x.ndim) if i not in axes)
    m = x.mean(axis=red, keepdims=True)
    v = ((x - m) ** 2).mean(axis=red, keepdims=True)
    y = (x - m) / np.sqrt(v + eps)
    bshape = [x.shape[i] if i in axes else 1 for i in range(x.ndim)]
    if gamma is not None:
        y = y * np.reshape(gamma, bshape)
    if beta is not None:
        y = y + np.reshape(beta, bshape)
    return y, m, v


def _ema(old, value, momentum):  # type: ignore[no-untyped-def]
    # TF: decay = float32(1 - momentum); old - (old - value) * decay
    return old - (old - value) * float(np.float32(1.0 - momentum))


CASES = [
    # (shape, axis, normalized axes, fused expected)
    ((6, 3), -1, (1,), False),
    ((4, 3, 2), 1, (1,), False),
    ((4, 3, 2), [1, 2], (1, 2), False),
    ((4, 2, 3, 5), -1, (3,), True),
    ((4, 5, 3, 2), 1, (1,), True),
    ((4, 2, 3, 5), [-1, -2], (2, 3), False),
    ((4, 2, 3, 5), 2, (2,), False),
    ((2, 3, 2, 2, 4), -1, (4,), True),
    ((2, 3, 2, 2, 4), 3, (3,), False),
]


@pytest.mark.parametrize(("shape", "axis", "axes", "fused"), CASES)
def test_training_then_inference_matches_formula(xp, asarray, shape, axis, axes, fused):  # type: ignore[no-untyped-def]
    layer = arraybn.BatchNormalization(axis=axis, momentum=0.9)
    xs = [_data(shape, seed) for seed in range(3)]
    mm = np.zeros([shape[a] for a in axes])
    mv = np.ones_like(mm)
    for i, x in enumerate(xs[:2]):
        y = layer(asarray(x, xp.float32), training=True)
        assert array_namespace(y) is array_namespace(asarray(x)) or type(y) is type(asarray(x))
        assert y.dtype == xp.float32 and tuple(y.shape) == shape
        ref, m, v = _bn_ref(x, axes)
        np.testing.assert_allclose(_np(y), ref, rtol=2e-5, atol=2e-5, err_msg=f"step {i}")
        n = x.size / mm.size
        batch_var = np.reshape(v, mm.shape) * (n / (n - 1) if fused else 1.0)
        if fused:  # the fused kernel: (1 - f) * old + f * batch
            f = float(np.float32(0.1))
            mm, mv = (1 - f) * mm + f * np.reshape(m, mm.shape), (1 - f) * mv + f * batch_var
        else:
            mm, mv = _ema(mm, np.reshape(m, mm.shape), 0.9), _ema(mv, batch_var, 0.9)
        np.testing.assert_allclose(_np(layer.moving_mean).reshape(mm.shape), mm, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(_np(layer.moving_variance).reshape(mv.shape), mv, rtol=1e-5, atol=1e-6)
    assert layer.fused is fused
    # training=False and training=None both normalize with the moving statistics
    bshape = [shape[i] if i in axes else 1 for i in range(len(shape))]
    expected = (xs[2] - mm.reshape(bshape)) / np.sqrt(mv.reshape(bshape) + 1e-3)
    for training in (False, None):
        y = layer(asarray(xs[2], xp.float32), training=training)
        np.testing.assert_allclose(_np(y), expected, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(_np(layer.moving_mean).reshape(mm.shape), mm, rtol=1e-5, atol=1e-6)


def test_gamma_beta_and_center_scale(xp, asarray, device):  # type: ignore[no-untyped-def]
    x = _data((5, 4), 3)
    gamma, beta = np.array([0.5, 2.0, -1.0, 1.5]), np.array([0.1, -0.2, 0.3, 0.0])
    for center, scale in [(True, True), (True, False), (False, True), (False, False)]:
        layer = arraybn.BatchNormalization(center=center, scale=scale)
        layer.build(x.shape, xp=xp, device=device)
        assert (layer.gamma is not None) is scale and (layer.beta is not None) is center
        weights = ([gamma] if scale else []) + ([beta] if center else []) + [np.zeros(4), np.ones(4)]
        layer.set_weights(weights)
        y = layer(asarray(x, xp.float32), training=True)
        ref, _, _ = _bn_ref(x, (1,), gamma if scale else None, beta if center else None)
        np.testing.assert_allclose(_np(y), ref, rtol=2e-5, atol=2e-5)
        assert layer.weight_names == (["gamma"] if scale else []) + (["beta"] if center else []) + [
            "moving_mean",
            "moving_variance",
        ]


def test_trainable_false_keeps_batch_statistics_but_freezes_moving_ones(xp, asarray):  # type: ignore[no-untyped-def]
    """v1 semantics: trainable=False does not switch to inference (unlike TF2's layer)."""
    x = _data((6, 3), 1)
    layer = arraybn.BatchNormalization(trainable=False)
    y = layer(asarray(x, xp.float32), training=True)
    np.testing.assert_allclose(_np(y), _bn_ref(x, (1,))[0], rtol=2e-5, atol=2e-5)
    np.testing.assert_array_equal(_np(layer.moving_mean), np.zeros(3))
    np.testing.assert_array_equal(_np(layer.moving_variance), np.ones(3))
    assert layer.trainable_weights == []
    assert len(layer.non_trainable_weights) == 4
    layer.trainable = True
    layer(asarray(x, xp.float32), training=True)
    assert np.all(_np(layer.moving_mean) != 0)
    assert len(layer.trainable_weights) == 2


@pytest.mark.parametrize(
    ("policy", "in_dtype", "out_dtype", "param_dtype"),
    [
        (None, "float16", "float32", "float32"),
        (None, "float64", "float32", "float32"),
        ("float64", "float32", "float64", "float64"),
        ("float16", "float32", "float16", "float32"),
        ("mixed_float16", "float32", "float16", "float32"),
        ("mixed_float16", "float64", "float16", "float32"),
    ],
)
def test_dtype_policy(xp, asarray, policy, in_dtype, out_dtype, param_dtype):  # type: ignore[no-untyped-def]
    if optional_dtype(xp, "float16") is None and "float16" in (in_dtype, out_dtype):
        pytest.skip(f"{xp.__name__} has no float16 (the Array API standard has none)")
    x = _data((8, 3), 2)
    kwargs = {} if policy is None else {"dtype": policy}
    layer = arraybn.BatchNormalization(**kwargs)
    y = layer(asarray(x, optional_dtype(xp, in_dtype)), training=True)
    assert y.dtype == optional_dtype(xp, out_dtype)
    assert all(w.dtype == optional_dtype(xp, param_dtype) for w in layer.weights)
    # the input is first rounded to the compute dtype (Keras autocast), then normalized in
    # float32 (float64 for the float64 policy) and rounded once to the output dtype
    xc = x.astype(in_dtype).astype(out_dtype).astype(np.float64)
    ref = _bn_ref(xc, (1,))[0]
    tol = {"float16": 2e-3, "float32": 2e-5, "float64": 1e-12}[out_dtype]
    np.testing.assert_allclose(_np(y), ref, rtol=tol, atol=tol * 4)


def test_mask_gives_weighted_moments(xp, asarray):  # type: ignore[no-untyped-def]
    x = _data((6, 4, 3), 4)
    mask = np.random.default_rng(5).random((6, 4)) > 0.4
    layer = arraybn.BatchNormalization(momentum=0.0)
    y = layer(asarray(x, xp.float32), training=True, mask=asarray(mask))
    w = mask[..., None].astype(np.float64) + np.zeros_like(x)
    m = (w * x).sum((0, 1)) / w.sum((0, 1))
    v = (w * (x - m) ** 2).sum((0, 1)) / w.sum((0, 1))
    np.testing.assert_allclose(_np(y), (x - m) / np.sqrt(v + 1e-3), rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(_np(layer.moving_mean), m, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_np(layer.moving_variance), v, rtol=1e-5, atol=1e-6)


def test_fully_masked_channel_statistics_are_zero(xp, asarray):  # type: ignore[no-untyped-def]
    x = _data((4, 3), 6)
    layer = arraybn.BatchNormalization(momentum=0.0)
    y = layer(asarray(x, xp.float32), training=True, mask=asarray(np.zeros(4, dtype=bool)))
    # div_no_nan: mean = variance = 0, so y = x / sqrt(eps)
    np.testing.assert_allclose(_np(y), x / np.sqrt(1e-3), rtol=2e-5)
    np.testing.assert_array_equal(_np(layer.moving_variance), np.zeros(3))


def test_fused_layer_ignores_mask_with_a_warning(xp, asarray):  # type: ignore[no-untyped-def]
    x = _data((4, 2, 2, 3), 7)
    mask = np.ones((4, 2, 2), dtype=bool)
    mask[0] = False
    layer = arraybn.BatchNormalization()
    with pytest.warns(UserWarning, match="Masking is not supported with `fused=True`"):
        y = layer(asarray(x, xp.float32), training=True, mask=asarray(mask))
    assert layer.fused is True
    np.testing.assert_allclose(_np(y), _bn_ref(x, (3,))[0], rtol=2e-5, atol=2e-5)


def test_renorm_first_step_matches_formula(xp, asarray):  # type: ignore[no-untyped-def]
    x = _data((8, 3), 8)
    clip = {"rmax": 1.5, "rmin": 0.8, "dmax": 0.3}
    layer = arraybn.BatchNormalization(renorm=True, renorm_clipping=clip, renorm_momentum=0.5, momentum=0.9)
    assert layer.fused is True  # resolved at build
    y = layer(asarray(x, xp.float32), training=True)
    assert layer.fused is False
    assert layer.weight_names == [
        "gamma",
        "beta",
        "moving_mean",
        "moving_variance",
        "moving_stddev",
        "renorm_mean",
        "renorm_stddev",
    ]
    _, m, v = _bn_ref(x, (1,))
    m, v = m.ravel(), v.ravel()
    stddev = np.sqrt(v + 1e-3)
    r = np.clip(stddev / 1.0, 0.8, 1.5)  # renorm_stddev starts at sqrt(1) = 1
    d = np.clip((m - 0.0) / 1.0, -0.3, 0.3)
    expected = (x - m) / stddev * r + d
    np.testing.assert_allclose(_np(y), expected, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(_np(layer.renorm_mean), _ema(0.0, m, 0.5), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_np(layer.renorm_stddev), _ema(1.0, stddev, 0.5), rtol=1e-5, atol=1e-6)
    ms = _ema(1.0, stddev, 0.9)
    np.testing.assert_allclose(_np(layer.moving_stddev), ms, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_np(layer.moving_variance), np.maximum(ms * ms - 1e-3, 0), rtol=1e-5, atol=1e-6)


def test_virtual_batches_are_strided(xp, asarray):  # type: ignore[no-untyped-def]
    x = _data((6, 4), 9)
    layer = arraybn.BatchNormalization(virtual_batch_size=3, momentum=0.0)
    y = layer(asarray(x, xp.float32), training=True)
    assert tuple(layer.gamma.shape) == (1, 1, 4)
    assert layer.axis == [2]
    groups = x.reshape(3, 2, 4)  # ghost batch j = samples {j, j + 2, j + 4}
    m = groups.mean(axis=0, keepdims=True)
    v = ((groups - m) ** 2).mean(axis=0, keepdims=True)
    expected = ((groups - m) / np.sqrt(v + 1e-3)).reshape(6, 4)
    np.testing.assert_allclose(_np(y), expected, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(_np(layer.moving_mean).ravel(), m.mean(axis=1).ravel(), rtol=1e-5, atol=1e-6)
    # inference works for any batch size
    y = layer(asarray(x[:5], xp.float32), training=False)
    assert tuple(y.shape) == (5, 4)


def test_adjustment_applies_in_training_only(xp, asarray):  # type: ignore[no-untyped-def]
    x = _data((6, 3), 10)
    seen = []

    def adjustment(shape):  # type: ignore[no-untyped-def]
        seen.append(shape)
        return 2.0, -1.0

    layer = arraybn.BatchNormalization(adjustment=adjustment)
    assert layer.fused is True
    y = layer(asarray(x, xp.float32), training=True)
    assert seen == [(6, 3)]
    np.testing.assert_allclose(_np(y), _bn_ref(x, (1,))[0] * 2.0 - 1.0, rtol=2e-5, atol=2e-5)
    y = layer(asarray(x, xp.float32), training=False)
    assert len(seen) == 1


def test_state_is_rebound_not_mutated(xp, asarray):  # type: ignore[no-untyped-def]
    layer = arraybn.BatchNormalization()
    x = asarray(_data((6, 3), 11), xp.float32)
    layer(x, training=False)
    before = layer.moving_mean
    snapshot = _np(before)
    layer(x, training=True)
    np.testing.assert_array_equal(_np(before), snapshot)  # the old array object is untouched
    assert not np.array_equal(_np(layer.moving_mean), snapshot)


def test_get_set_weights_round_trip(xp, asarray, device):  # type: ignore[no-untyped-def]
    layer = arraybn.BatchNormalization(renorm=True)
    layer.build((4, 3), xp=xp, device=device)
    new = [np.full(3, float(i + 1), dtype=np.float32) for i in range(7)]
    layer.set_weights(new)
    got = layer.get_weights()
    assert all(isinstance(g, np.ndarray) for g in got)
    for g, n in zip(got, new, strict=True):
        np.testing.assert_array_equal(g, n)
    assert all(array_namespace(w) is array_namespace(asarray(np.zeros(1))) for w in layer.weights)


def test_config_round_trip():  # type: ignore[no-untyped-def]
    layer = arraybn.BatchNormalization(
        axis=[1, 2],
        momentum=0.5,
        epsilon=1e-5,
        center=False,
        gamma_initializer={"class_name": "Constant", "config": {"value": 0.5}},
        gamma_regularizer="l1_l2",
        beta_constraint="non_neg",
        gamma_constraint={"class_name": "MaxNorm", "config": {"max_value": 3.0, "axis": 0}},
        renorm=True,
        renorm_clipping={"rmax": 2.0},
        dtype="mixed_float16",
        name="bn_cfg",
    )
    cfg = layer.get_config()
    assert cfg["dtype"]["config"]["name"] == "mixed_float16"
    assert cfg["gamma_regularizer"]["config"] == {"l1": float(np.float32(0.01)), "l2": float(np.float32(0.01))}
    assert cfg["renorm_clipping"] == {"rmax": 2.0}
    assert "virtual_batch_size" not in cfg
    clone = arraybn.BatchNormalization.from_config(cfg)
    assert clone.get_config() == cfg
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plain = arraybn.BatchNormalization(name="bn_plain").get_config()
    assert "renorm" not in plain
    assert plain["axis"] == -1


def test_losses_follow_the_weights(xp, asarray, device):  # type: ignore[no-untyped-def]
    layer = arraybn.BatchNormalization(gamma_regularizer="l2", beta_regularizer={"class_name": "L1", "config": {"l1": 0.5}})
    assert layer.losses == []
    layer.build((4, 3), xp=xp, device=device)
    gamma, beta = np.array([1.0, -2.0, 3.0]), np.array([0.5, -0.5, 1.0])
    layer.set_weights([gamma, beta, np.zeros(3), np.ones(3)])
    losses = [float(_np(v)) for v in layer.losses]
    np.testing.assert_allclose(losses, [0.01 * 14.0, 0.5 * 2.0], rtol=1e-6)


def test_apply_constraints(xp, asarray, device):  # type: ignore[no-untyped-def]
    layer = arraybn.BatchNormalization(gamma_constraint="unit_norm", beta_constraint="non_neg")
    layer.build((4, 2), xp=xp, device=device)
    layer.set_weights([np.array([3.0, 4.0]), np.array([-1.0, 2.0]), np.zeros(2), np.ones(2)])
    layer.apply_constraints()
    np.testing.assert_allclose(_np(layer.gamma), [0.6, 0.8], rtol=1e-6)
    np.testing.assert_array_equal(_np(layer.beta), [0.0, 2.0])


def test_momentum_and_epsilon_set_after_build_take_effect(xp, asarray):  # type: ignore[no-untyped-def]
    """TF reads self.momentum and self.epsilon on every call."""
    x = _data((6, 3), 12)
    layer = arraybn.BatchNormalization(momentum=0.9)
    layer(asarray(x, xp.float32), training=True)
    before = _np(layer.moving_mean)
    layer.momentum, layer.epsilon = 0.0, 0.5
    y = layer(asarray(x, xp.float32), training=True)
    np.testing.assert_allclose(_np(layer.moving_mean), x.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_np(y), (x - x.mean(0)) / np.sqrt(x.var(0) + 0.5), rtol=2e-5, atol=2e-5)
    assert not np.allclose(before, x.mean(0))


@pytest.mark.parametrize("fused", [False, None])
def test_numpy_scalar_epsilon_acts_as_the_python_float(xp, asarray, fused):  # type: ignore[no-untyped-def]
    """TF converts epsilon to the variance's dtype (float32 here) whatever its Python type: a
    ``np.float64`` or ``np.float32`` epsilon gives the Python float's output bit for bit (checked
    in TF 2.21: the three outputs are identical there). Plain NumPy arithmetic would instead
    compute ``variance + np.float64(eps)`` in float64."""
    x = asarray(_data((16, 1, 1, 5), 13).astype(np.float32))
    if fused is False:
        x = xp.reshape(x, (16, 5))
    outputs = []
    for eps in (0.37, np.float64(0.37), np.float32(0.37)):
        layer = arraybn.BatchNormalization(epsilon=eps, momentum=0.9, fused=fused)
        outputs.append([to_numpy(layer(x, training=True)), to_numpy(layer(x)), *layer.get_weights()])
        assert layer.epsilon is eps  # get_config reports what was given
    for other in outputs[1:]:
        for a, b in zip(outputs[0], other, strict=True):
            np.testing.assert_array_equal(a, b)
