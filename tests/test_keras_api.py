"""Layer behaviours outside the conformance grid, each as TensorFlow 2.21's v1 layer shows it.

The expected values and exception types were observed in TF (``TF_USE_LEGACY_KERAS=1``,
``tf.compat.v1.keras.layers.BatchNormalization``, eager) and are restated here, or derived
in the test from another arraybn call whose equivalence TF shows (``epsilon=None`` on the
fused path is ``epsilon=1e-4``, for example).
"""

from __future__ import annotations

import numpy as np
import pytest

import arraybn
from arraybn._namespace import to_numpy

X2 = np.arange(12, dtype=np.float32).reshape(4, 3)
X4 = np.arange(48, dtype=np.float32).reshape(4, 2, 2, 3)


def _weights(layer):  # type: ignore[no-untyped-def]
    return [to_numpy(w) for w in layer.weights]


# ---------------------------------------------------------------------------
# build, shapes, weights
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "axis", "expected"),
    [((None, 3), -1, (3,)), ((None, 3, 4), -1, (4,)), ((None, 3, None, None), 1, (3,)), ([None, 2, 2, 3], -1, (3,))],
)
def test_build_with_unknown_dimensions(shape, axis, expected):  # type: ignore[no-untyped-def]
    """A Keras ``Input`` shape: unknown batch and spatial sizes are fine, the normalized axis is not."""
    layer = arraybn.BatchNormalization(axis=axis)
    layer.build(shape)
    assert [tuple(w.shape) for w in layer.weights] == [expected] * 4
    known = [3 if s is None else s for s in shape]
    y = layer(np.ones(known, np.float32) * 2.0, training=True)
    assert y.shape == tuple(known)


def test_build_with_an_unknown_axis_dimension_raises():
    layer = arraybn.BatchNormalization()
    with pytest.raises(ValueError, match=r"Input has undefined `axis` dimension. Received input with shape \(None, None\)"):
        layer.build((None, None))
    assert not layer.built


def test_build_with_unknown_batch_and_virtual_batches():
    layer = arraybn.BatchNormalization(virtual_batch_size=2)
    layer.build((None, 3))
    assert layer.input_spec.ndim == 2
    assert layer.input_spec.axes == {1: 3}  # the input's axes, before the ghost-batch reshape


def test_input_spec():
    layer = arraybn.BatchNormalization(axis=[1, 3])
    assert layer.input_spec is None
    layer.build((None, 2, 5, 3))
    assert layer.input_spec.ndim == 4
    assert layer.input_spec.axes == {1: 2, 3: 3}
    assert repr(layer.input_spec) == "InputSpec(ndim=4, axes={1: 2, 3: 3})"


def test_set_weights_empty_list_on_an_unbuilt_layer_is_a_no_op():
    layer = arraybn.BatchNormalization()
    layer.set_weights([])
    assert not layer.built
    with pytest.raises(ValueError, match="expecting 0 weights"):
        layer.set_weights([np.ones(3)])


def test_count_params_and_variable_lists():
    layer = arraybn.BatchNormalization(name="bn_count")
    with pytest.raises(ValueError, match="You tried to call `count_params` on layer bn_count, but the layer isn't built"):
        layer.count_params()
    layer.build((2, 3))
    assert layer.count_params() == 12
    assert len(layer.trainable_variables) == 2
    assert len(layer.non_trainable_variables) == 2
    frozen = arraybn.BatchNormalization(trainable=False, renorm=True)
    frozen.build((2, 5))
    assert frozen.count_params() == 35  # gamma, beta, 2 moving statistics and 3 renorm ones
    assert frozen.trainable_variables == []
    assert len(frozen.non_trainable_variables) == 7


def test_small_keras_attributes():
    layer = arraybn.BatchNormalization(dtype="mixed_float16")
    assert layer.stateful is False
    assert layer.variable_dtype == "float32"
    mask = np.array([True, False, True, True])
    assert layer.compute_mask(X2, mask) is mask
    assert layer.compute_mask(X2, None) is None
    layer(X2, training=True)
    with pytest.warns(UserWarning, match="`layer.updates` will be removed in a future version"):
        assert layer.updates == []


def test_missing_initializers_are_glorot_uniform():
    """``gamma_initializer=None`` (and the others): Keras's add_weight default, random and bounded."""
    layer = arraybn.BatchNormalization(gamma_initializer=None, moving_variance_initializer=None)
    assert layer.get_config()["gamma_initializer"] is None
    layer.build((4, 3))
    limit = np.sqrt(6.0 / (3 + 3))  # fan_in = fan_out = 3 for a (3,) weight
    for w in (layer.gamma, layer.moving_variance):
        w = to_numpy(w)
        assert w.shape == (3,)
        assert np.all(np.abs(w) <= limit)
        assert len(set(w.tolist())) == 3  # random, not a constant


# ---------------------------------------------------------------------------
# Constructor and config
# ---------------------------------------------------------------------------


def test_name_must_be_a_string():
    with pytest.raises(TypeError, match="Expected `name` argument to be a string, but got: 3"):
        arraybn.BatchNormalization(name=3)


def test_tuple_axis_is_kept_until_build():
    layer = arraybn.BatchNormalization(axis=(1,))
    assert layer.axis == (1,)
    assert layer.get_config()["axis"] == (1,)
    layer.build((4, 3))
    assert layer.axis == [1]


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [({"input_shape": (3,)}, (None, 3)), ({"batch_input_shape": [None, 3]}, (None, 3)), ({"input_dim": 3, "batch_size": 5}, (5, 3))],
)
def test_batch_input_shape_in_the_config_is_a_tuple(kwargs, expected):  # type: ignore[no-untyped-def]
    assert arraybn.BatchNormalization(**kwargs).get_config()["batch_input_shape"] == expected
    assert isinstance(arraybn.BatchNormalization(**kwargs).get_config()["batch_input_shape"], tuple)


def test_renorm_clipping_keys_are_checked_as_iterated():
    with pytest.raises(ValueError, match="invalid keys for `renorm_clipping`"):
        arraybn.BatchNormalization(renorm=True, renorm_clipping=[("rmax", 1.0)])


def test_numpy_integer_virtual_batch_size():
    a = arraybn.BatchNormalization(virtual_batch_size=np.int64(2))
    b = arraybn.BatchNormalization(virtual_batch_size=2)
    np.testing.assert_array_equal(a(X2, training=True), b(X2, training=True))
    np.testing.assert_array_equal(a(X2), b(X2))


# ---------------------------------------------------------------------------
# The call: training flag, numbers read per call, fused read per call
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("training", [2, -1, "yes", "", np.array(True), 0.5])
def test_training_must_be_a_bool_or_0_or_1(training):  # type: ignore[no-untyped-def]
    layer = arraybn.BatchNormalization()
    layer(X2, training=True)
    before = _weights(layer)
    with pytest.raises(TypeError, match=r"`pred` must be a Tensor, or a Python bool, or 1 or 0"):
        layer(X2, training=training)
    for w, b in zip(_weights(layer), before, strict=True):
        np.testing.assert_array_equal(w, b)


@pytest.mark.parametrize(("training", "updates"), [(1, True), (np.bool_(True), True), (1.0, True), (0, False), (np.int64(0), False)])
def test_training_values_equal_to_1_or_0(training, updates):  # type: ignore[no-untyped-def]
    layer = arraybn.BatchNormalization()
    layer(X2, training=training)
    assert np.any(to_numpy(layer.moving_mean) != 0) == updates


@pytest.mark.parametrize("momentum", [None, "0.9", [0.9]])
def test_momentum_is_read_in_training_only(momentum):  # type: ignore[no-untyped-def]
    layer = arraybn.BatchNormalization(momentum=momentum)
    reference = arraybn.BatchNormalization()
    np.testing.assert_array_equal(layer(X2, training=False), reference(X2, training=False))
    before = _weights(layer)
    with pytest.raises(TypeError, match="momentum must be a real number"):
        layer(X2, training=True)
    for w, b in zip(_weights(layer), before, strict=True):
        np.testing.assert_array_equal(w, b)


def test_momentum_none_on_the_fused_path_is_a_value_error():
    # TF: convert_to_tensor(None) raises ValueError on the fused path, 1.0 - None a TypeError elsewhere
    with pytest.raises(ValueError, match="momentum must be a real number"):
        arraybn.BatchNormalization(momentum=None)(X4, training=True)


@pytest.mark.parametrize("x", [X2, X4], ids=["non-fused", "fused"])
def test_booleans_are_numbers_for_momentum_and_epsilon(x):  # type: ignore[no-untyped-def]
    layer = arraybn.BatchNormalization(momentum=True, epsilon=True)
    y = layer(x, training=True)
    np.testing.assert_array_equal(to_numpy(layer.moving_mean), 0.0)  # momentum 1: nothing moves
    np.testing.assert_array_equal(y, arraybn.BatchNormalization(epsilon=1.0)(x, training=True))
    assert layer.get_config()["epsilon"] is True


def test_epsilon_none_is_the_fused_kernels_default():
    """TF passes epsilon=None on to FusedBatchNormV3, whose attribute default is 1e-4."""
    for training in (True, False):
        layer = arraybn.BatchNormalization(epsilon=None)
        np.testing.assert_array_equal(
            layer(X4, training=training), arraybn.BatchNormalization(epsilon=1e-4)(X4, training=training)
        )
    assert layer.get_config()["epsilon"] is None
    with pytest.raises(ValueError, match="epsilon must be a real number"):
        arraybn.BatchNormalization(epsilon=None)(X2, training=True)  # non-fused


def test_fused_turned_off_after_build_takes_the_non_fused_path():
    layer = arraybn.BatchNormalization()
    layer(X4, training=True)
    layer.fused = False
    y = layer(X4, training=True)
    reference = arraybn.BatchNormalization()
    reference(X4, training=True)  # the first call on the fused path
    reference.fused = False
    np.testing.assert_array_equal(y, reference(X4, training=True))
    # the non-fused rule updates with the biased variance: 4.9122 in TF for this input
    np.testing.assert_allclose(to_numpy(layer.moving_variance), 4.9122, rtol=1e-5)
    # and a backward after the call differentiates the path that call took
    _, ctx = layer.forward(X4)
    assert not ctx.config.fused


def test_fused_turned_on_after_a_non_fused_build_raises():
    layer = arraybn.BatchNormalization()
    layer(X2, training=True)
    before = _weights(layer)
    layer.fused = True
    with pytest.raises(AttributeError, match="_data_format"):
        layer(X2, training=True)
    for w, b in zip(_weights(layer), before, strict=True):
        np.testing.assert_array_equal(w, b)


def test_epsilon_changed_after_build_reaches_the_backward():
    layer = arraybn.BatchNormalization()
    layer(X2, training=True)
    layer.epsilon = 5.0
    _, ctx = layer.forward(X2)
    dx, _ = layer.backward(ctx, np.ones_like(X2))
    fresh = arraybn.BatchNormalization(epsilon=5.0)
    fresh(X2, training=True)
    _, ctx_fresh = fresh.forward(X2)
    np.testing.assert_array_equal(dx, fresh.backward(ctx_fresh, np.ones_like(X2))[0])
    assert ctx.config.epsilon == 5.0


def test_empty_axis_list_raises_index_error():
    layer = arraybn.BatchNormalization(axis=[])
    with pytest.raises(IndexError):
        layer(X2, training=True)


def test_mask_as_a_python_list():
    layer = arraybn.BatchNormalization(fused=False)
    y = layer(X2, training=True, mask=[True, False, True, True])
    reference = arraybn.BatchNormalization(fused=False)
    np.testing.assert_array_equal(y, reference(X2, training=True, mask=np.array([True, False, True, True])))
    # TF 2.21: the first row of the output
    np.testing.assert_allclose(y[0], [-1.3362585, -1.3362584, -1.3362584], rtol=1e-6)


def test_empty_batch_gradient_on_the_fused_path_is_zero():
    """TF's fused gradient kernel returns zeros for an empty batch; the non-fused path gives NaN
    for d gamma there (0 times NaN statistics), in TF as in arraybn. Neither warns."""
    for shape, fused_dgamma in (((0, 2, 2, 2), True), ((0, 3), False)):
        layer = arraybn.BatchNormalization()
        x = np.ones(shape, np.float32)
        _, ctx = layer.forward(x)
        dx, grads = layer.backward(ctx, np.ones(shape, np.float32))  # silent, as TF (warnings are errors here)
        assert dx.shape == shape
        np.testing.assert_array_equal(grads["beta"], 0.0)
        if fused_dgamma:
            np.testing.assert_array_equal(grads["gamma"], 0.0)
        else:
            assert np.all(np.isnan(grads["gamma"]))


def test_set_weights_needs_arrays():
    """Keras reads a weight's shape from ``.shape``: a list has shape () and does not fit."""
    layer = arraybn.BatchNormalization(name="bn_lists")
    layer.build((2, 3))
    before = _weights(layer)
    with pytest.raises(ValueError, match=r"weight shape \(3,\) is not compatible with provided weight shape \(\)"):
        layer.set_weights([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    for w, b in zip(_weights(layer), before, strict=True):
        np.testing.assert_array_equal(w, b)
    layer.set_weights([np.full(3, 1.1), np.zeros(3), np.zeros(3), np.ones(3)])  # float64: cast to float32
    assert layer.get_weights()[0].dtype == np.float32


def test_initializer_config_needs_class_name_and_config():
    with pytest.raises(ValueError, match="Improper config format for"):
        arraybn.BatchNormalization(beta_initializer={"class_name": "Zeros"})
    layer = arraybn.BatchNormalization(beta_initializer={"class_name": "Constant", "config": {"value": 2.0}})
    layer.build((2, 3))
    np.testing.assert_array_equal(to_numpy(layer.beta), 2.0)


def test_build_again_builds_anew():
    """An explicit build of a built layer makes fresh weights for the new shape, as Keras's does."""
    layer = arraybn.BatchNormalization()
    layer(np.ones((4, 3), np.float32), training=True)
    layer.build((7, 9))
    assert [tuple(w.shape) for w in layer.weights] == [(9,)] * 4
    assert layer.axis == [1]
    np.testing.assert_array_equal(to_numpy(layer.moving_mean), 0.0)
    assert layer(np.ones((2, 9), np.float32)).shape == (2, 9)
    with pytest.raises(ValueError, match="expected axis 1 of input shape to have value 9"):
        layer(np.ones((2, 3), np.float32))
    # the axis normalized by the first build ([3]) does not fit a rank-2 shape: nothing changes
    layer4 = arraybn.BatchNormalization()
    layer4.build((4, 2, 2, 3))
    with pytest.raises(ValueError, match="Expected 0 <= axis < inputs.rank"):
        layer4.build((5, 7))
    assert [tuple(w.shape) for w in layer4.weights] == [(3,)] * 4


# ---------------------------------------------------------------------------
# numbers as TF converts them
# ---------------------------------------------------------------------------


def test_a_numpy_float64_momentum_decays_a_float64_layer_unrounded() -> None:
    """``convert_to_tensor(1.0 - momentum)`` is float32 for a Python float and float64 for a NumPy
    float64. TF 2.21: moving_mean 0.6000000000000001 and 0.6000000238418579 (batch mean 2)."""
    x = np.array([[1.0], [3.0]])
    for momentum, decay in [(np.float64(0.7), 1.0 - np.float64(0.7)), (0.7, float(np.float32(1.0 - 0.7)))]:
        for fused in (None, False):  # a float64 policy is never fused; both settings take one path
            layer = arraybn.BatchNormalization(dtype="float64", momentum=momentum, fused=fused)
            layer(x, training=True)
            got = to_numpy(layer.moving_mean)
            np.testing.assert_array_equal(got, [0.0 - (0.0 - 2.0) * decay], err_msg=f"momentum={momentum!r}")
    assert 0.0 - (0.0 - 2.0) * (1.0 - np.float64(0.7)) == 0.6000000000000001  # the two differ
    layer = arraybn.BatchNormalization(momentum=np.float64(0.7))  # float32 variables: the cast rounds
    layer(x, training=True)
    np.testing.assert_array_equal(to_numpy(layer.moving_mean), np.float32([0.6000000238418579]))


@pytest.mark.parametrize(
    ("axis", "x", "expected"),
    [
        (0, np.array([1.0, np.inf], np.float32), [0.5, np.nan]),
        ([0, 1], np.array([[1.0, np.nan], [2.0, -np.inf]], np.float32), [[0.5, np.nan], [0.5, np.nan]]),
    ],
)
def test_nothing_to_reduce_gives_the_variance_of_x_minus_x(axis, x, expected) -> None:  # type: ignore[no-untyped-def]
    """Every axis normalized: tf.nn.moments' variance is (x - x) ** 2, NaN for inf and NaN values,
    and the moving variance 1 - (1 - var) * 0.5 follows it (TF 2.21: [0.5, nan])."""
    layer = arraybn.BatchNormalization(axis=axis, momentum=0.5)
    layer(x, training=True)
    np.testing.assert_array_equal(to_numpy(layer.moving_variance), np.float32(expected))


def test_a_frozen_non_fused_layer_does_not_read_momentum() -> None:
    """TF reads momentum in the updates, which a frozen layer skips; the fused path converts it
    to a tensor regardless (ValueError for None)."""
    for kwargs in ({}, {"renorm": True}, {"virtual_batch_size": 2}):
        layer = arraybn.BatchNormalization(momentum=None, trainable=False, **kwargs)
        y = layer(X2, training=True)
        reference = arraybn.BatchNormalization(momentum=0.5, trainable=False, **kwargs)
        np.testing.assert_array_equal(to_numpy(y), to_numpy(reference(X2, training=True)))
        for a, b in zip(_weights(layer), _weights(reference), strict=True):
            np.testing.assert_array_equal(a, b)
    fused = arraybn.BatchNormalization(momentum=None, trainable=False)
    with pytest.raises(ValueError, match="momentum"):
        fused(X4, training=True)
    trainable = arraybn.BatchNormalization(momentum=None, fused=False)
    with pytest.raises(TypeError, match="momentum"):
        trainable(X2, training=True)
