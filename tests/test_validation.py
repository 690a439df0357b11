"""Every error the layer raises: TF's exception type, a message that says what to change,
and no change of state when a call raises."""

from __future__ import annotations

import numpy as np
import pytest

import arraybn
from arraybn._namespace import to_numpy


def test_axis_type():
    with pytest.raises(TypeError, match="Expected an int or a list/tuple of ints for the argument 'axis'"):
        arraybn.BatchNormalization(axis=1.5)


def test_unknown_keyword():
    with pytest.raises(TypeError, match="Keyword argument not understood: foo"):
        arraybn.BatchNormalization(foo=1)


def test_renorm_clipping_keys():
    with pytest.raises(ValueError, match="invalid keys for `renorm_clipping`"):
        arraybn.BatchNormalization(renorm=True, renorm_clipping={"rmax": 1.0, "foo": 2.0})
    # without renorm the clipping argument is ignored, as in TF
    arraybn.BatchNormalization(renorm=False, renorm_clipping={"foo": 2.0})


@pytest.mark.parametrize(
    ("kwargs", "shape", "match"),
    [
        ({"axis": 2}, (4, 3), "Expected 0 <= axis < inputs.rank"),
        ({"axis": -3}, (4, 3), "Expected 0 <= axis < inputs.rank"),
        ({"axis": [1, -1]}, (4, 3), "Duplicate axis"),
        ({}, (), "Input has undefined rank"),
        ({"virtual_batch_size": 0}, (4, 3), "`virtual_batch_size` must be a positive integer"),
        ({"virtual_batch_size": 2, "axis": 0}, (4, 3), "axis cannot include 0"),
        ({"virtual_batch_size": 2, "adjustment": lambda s: (1.0, 0.0)}, (4, 3), "adjustment cannot be specified"),
    ],
)
def test_build_errors(xp, asarray, kwargs, shape, match):  # type: ignore[no-untyped-def]
    layer = arraybn.BatchNormalization(**kwargs)
    x = asarray(np.ones(shape), xp.float32)
    with pytest.raises(ValueError, match=match):
        layer(x, training=True)
    assert not layer.built and layer.weights == []


@pytest.mark.parametrize("x", [3.0, 2, True])
def test_a_python_number_has_undefined_rank(x):  # type: ignore[no-untyped-def]
    """TF converts the number to a rank-0 tensor and raises its ValueError in build."""
    layer = arraybn.BatchNormalization()
    with pytest.raises(ValueError, match=r"Input has undefined rank. Received: input_shape=\(\)"):
        layer(x, training=True)
    assert not layer.built


def _snapshot(layer):  # type: ignore[no-untyped-def]
    return [to_numpy(w) for w in layer.weights]


@pytest.mark.parametrize(
    ("shape", "match"),
    [((4, 2, 5), "expected axis 2 of input shape to have value 3"), ((4, 3), "expected ndim=3, found ndim=2")],
)
def test_incompatible_second_call_leaves_state(xp, asarray, shape, match):  # type: ignore[no-untyped-def]
    layer = arraybn.BatchNormalization(name="bn")
    layer(asarray(np.random.default_rng(0).standard_normal((4, 2, 3)), xp.float32), training=True)
    before = _snapshot(layer)
    with pytest.raises(ValueError, match=match):
        layer(asarray(np.ones(shape), xp.float32), training=True)
    for a, b in zip(before, _snapshot(layer), strict=True):
        np.testing.assert_array_equal(a, b)


def test_virtual_batch_not_dividing_batch(xp, asarray):  # type: ignore[no-untyped-def]
    """TF raises InvalidArgumentError from its reshape; arraybn raises ValueError."""
    layer = arraybn.BatchNormalization(virtual_batch_size=3)
    layer(asarray(np.random.default_rng(0).standard_normal((6, 2)), xp.float32), training=True)
    before = _snapshot(layer)
    with pytest.raises(ValueError, match="must divide the batch size"):
        layer(asarray(np.ones((4, 2)), xp.float32), training=True)
    for a, b in zip(before, _snapshot(layer), strict=True):
        np.testing.assert_array_equal(a, b)
    layer(asarray(np.ones((4, 2)), xp.float32), training=False)  # inference reshapes to [-1, 1]


def test_mask_that_does_not_broadcast(xp, asarray):  # type: ignore[no-untyped-def]
    layer = arraybn.BatchNormalization()
    with pytest.raises(ValueError, match="does not broadcast"):
        layer(asarray(np.ones((4, 3)), xp.float32), training=True, mask=asarray(np.ones((3,))))


def test_set_weights_errors(xp, asarray):  # type: ignore[no-untyped-def]
    layer = arraybn.BatchNormalization(name="bn")
    with pytest.raises(ValueError, match="was expecting 0 weights"):
        layer.set_weights([np.ones(3)] * 4)
    layer(asarray(np.ones((4, 3)), xp.float32))
    before = _snapshot(layer)
    with pytest.raises(ValueError, match="expecting 4 weights"):
        layer.set_weights([np.ones(3)] * 3)
    with pytest.raises(ValueError, match=r"weight shape \(3,\) is not compatible with provided weight shape \(2,\)"):
        layer.set_weights([np.ones(3), np.ones(3), np.ones(3), np.ones(2)])
    for a, b in zip(before, _snapshot(layer), strict=True):
        np.testing.assert_array_equal(a, b)


def test_unknown_names():
    with pytest.raises(ValueError, match="Unknown initializer: 'nope'"):
        arraybn.BatchNormalization(gamma_initializer="nope")
    with pytest.raises(ValueError, match="Unknown constraint"):
        arraybn.BatchNormalization(gamma_constraint="nope")
    with pytest.raises(ValueError, match="not a valid regularization penalty number"):
        arraybn.BatchNormalization(gamma_regularizer={"class_name": "L1", "config": {"l1": float("nan")}})
    with pytest.raises(TypeError, match="Cannot convert dtype='mixed_int8' to a dtype policy"):
        arraybn.BatchNormalization(dtype="mixed_int8")
    # TF accepts these at construction and fails when the layer runs
    layer = arraybn.BatchNormalization(dtype="int8")
    with pytest.raises(ValueError, match="needs a floating-point dtype policy"):
        layer(np.ones((4, 3), dtype=np.float32))
    layer = arraybn.BatchNormalization(gamma_regularizer="no_such_regularizer")
    layer(np.ones((4, 3), dtype=np.float32))
    with pytest.raises(TypeError, match="Unknown regularizer: 'no_such_regularizer'"):
        _ = layer.losses


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"epsilon": None}, ValueError, "epsilon must be a real number"),
        ({"epsilon": "a"}, ValueError, "epsilon must be a real number"),
        ({"momentum": None}, TypeError, "momentum must be a real number"),
        ({"virtual_batch_size": 1.5}, ValueError, "virtual_batch_size must be an integer"),
    ],
)
def test_numbers_are_checked_when_first_used(kwargs, error, match):  # type: ignore[no-untyped-def]
    layer = arraybn.BatchNormalization(**kwargs)
    with pytest.raises(error, match=match):
        layer(np.ones((4, 3), dtype=np.float32), training=True)


def test_bfloat16_needs_a_namespace_that_has_it():
    layer = arraybn.BatchNormalization(dtype="mixed_bfloat16")
    with pytest.raises(TypeError, match="has no bfloat16 dtype"):
        layer(np.ones((4, 3), dtype=np.float32))
    assert not layer.built


def test_forward_of_a_python_number_has_undefined_rank() -> None:
    layer = arraybn.BatchNormalization()
    with pytest.raises(ValueError, match="Input has undefined rank"):
        layer.forward(3.0)
    assert not layer.built
