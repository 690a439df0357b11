"""A bounded hypothesis fuzz of bad input (no TensorFlow needed; runs in a few seconds).

It draws one bad value for a constructor argument, an attribute set after build, the input, the
mask, ``training``, ``set_weights`` or ``build``, from the pools of ``conformance/fuzz_errors.py``
(whose differential run against TensorFlow fixed the expected classes), and checks the rules that
hold for every case:

* an error is one of the classes TensorFlow's layer raises for bad input;
* its message names what was wrong (the argument) and is not empty;
* a call, ``set_weights`` or ``build`` that raises leaves the weights as they were;
* after an error the layer still computes (a valid training call works).
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import arraybn
from conformance import fuzz_errors as fz

TF_CLASSES = (ValueError, TypeError, AttributeError, IndexError, KeyError, ZeroDivisionError)
SETTINGS = settings(max_examples=300, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _weights(layer: Any) -> list[np.ndarray]:
    return [np.array(w, copy=True) for w in layer.get_weights()]


def _same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(np.array_equal(p, q, equal_nan=True) for p, q in zip(a, b, strict=True))


def _valid_step(layer: Any, x: np.ndarray) -> None:
    y = np.asarray(layer(x, training=True))
    assert y.shape == x.shape


@st.composite
def init_cases(draw: Any) -> tuple[str, Any]:
    arg = draw(st.sampled_from([a for a in fz.INIT_ARGS if a != "unknown_kwarg"]))
    value = draw(st.sampled_from(fz.pool_for(arg) + fz.GENERIC))
    return arg, value


@SETTINGS
@given(case=init_cases(), shape=st.sampled_from(fz.SHAPES), training=st.booleans())
def test_bad_constructor_arguments(case, shape, training) -> None:  # type: ignore[no-untyped-def]
    arg, value = case
    x = fz.make_input(__import__("random").Random(0), shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            layer = arraybn.BatchNormalization(**{arg: value})
        except TF_CLASSES as err:
            assert arg in str(err) or "config" in str(err), str(err)
            return
        try:
            layer(x, training=training)
        except TF_CLASSES as err:
            assert str(err)
            return
        try:
            layer.losses  # noqa: B018 - computes the penalties
            layer.apply_constraints()
        except TF_CLASSES as err:
            assert arg in str(err), str(err)


@st.composite
def after_build_cases(draw: Any) -> tuple[str, Any, Any]:
    kind = draw(st.sampled_from(["attr", "input", "mask", "training", "set_weights"]))
    if kind == "attr":
        attr = draw(st.sampled_from(fz.ATTRS_AFTER_BUILD))
        return kind, attr, draw(st.sampled_from(fz.pool_for(attr) + fz.GENERIC))
    if kind == "training":
        return kind, "training", draw(st.sampled_from(fz.TRAINING))
    return kind, kind, draw(st.integers(0, 10**6))


@SETTINGS
@given(case=after_build_cases(), shape=st.sampled_from(fz.SHAPES), renorm=st.booleans(), seed=st.integers(0, 50))
def test_bad_input_after_build_changes_nothing(case, shape, renorm, seed) -> None:  # type: ignore[no-untyped-def]
    import random

    kind, arg, value = case
    rng = random.Random(seed)
    x = fz.make_input(rng, shape)
    layer = arraybn.BatchNormalization(renorm=renorm, fused=False if kind == "mask" else None)
    layer(x, training=True)
    kwargs: dict[str, Any] = {"training": True}
    xin = x
    if kind == "input":
        _, xin = rng.choice(fz.bad_inputs(rng, shape))
    elif kind == "mask":
        _, kwargs["mask"] = rng.choice(fz.bad_masks(rng, shape))
    elif kind == "training":
        kwargs["training"] = value
    before = _weights(layer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            if kind == "set_weights":
                n = len(layer.weights)
                _, weights = rng.choice(fz.bad_weight_lists(rng, n, shape[-1]))
                layer.set_weights(weights)
                return
            if kind == "attr":
                old = getattr(layer, arg)
                setattr(layer, arg, value)
            try:
                layer(xin, **kwargs)
            finally:
                if kind == "attr":
                    setattr(layer, arg, old)
        except TF_CLASSES as err:
            msg = str(err).lower()
            assert msg
            assert _same(_weights(layer), before), f"weights changed by a call that raised: {err}"
            if kind in ("attr", "training"):
                assert arg in msg or "_data_format" in msg, msg
            elif kind == "mask":
                assert "mask" in msg, msg
            elif kind == "set_weights":
                assert "weight" in msg, msg
        _valid_step(layer, x)  # usable after the error


@SETTINGS
@given(shape=st.sampled_from(fz.BUILD_SHAPES), axis=st.sampled_from([-1, 1]))
def test_bad_build_shapes(shape, axis) -> None:  # type: ignore[no-untyped-def]
    layer = arraybn.BatchNormalization(axis=axis)
    try:
        layer.build(shape)
    except TF_CLASSES as err:
        assert "shape" in str(err) or "axis" in str(err), str(err)
        assert not layer.built
        return
    assert layer.built


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"fused": 2}, ValueError, "fused=2"),
        ({"fused": "yes"}, ValueError, "fused='yes'"),
    ],
)
def test_truthy_fused_on_a_2d_input_raises_as_tf(kwargs, exc, match) -> None:  # type: ignore[no-untyped-def]
    layer = arraybn.BatchNormalization(**kwargs)
    with pytest.raises(exc, match=match):
        layer(np.ones((4, 3), np.float32), training=True)
    assert not layer.built


# ---------------------------------------------------------------------------
# The examples, each checked against TF 2.21 by conformance/fuzz_errors.py
# ---------------------------------------------------------------------------

X4 = (np.arange(48, dtype=np.float32).reshape(2, 3, 4, 2) % 7) / 4


@pytest.mark.parametrize("fused", [np.bool_(False), 0, ""], ids=["np.False_", "0", "empty"])
def test_falsy_fused_takes_the_non_fused_path(fused) -> None:  # type: ignore[no-untyped-def]
    layer = arraybn.BatchNormalization(fused=fused, momentum=0.0)
    layer(X4, training=True)
    # momentum 0: the moving variance is the batch's, biased (non-fused) -- the fused kernel's is n/(n-1) larger
    biased = X4.reshape(-1, 2).var(axis=0)
    np.testing.assert_allclose(layer.get_weights()[3], biased, rtol=1e-6)
    assert layer.fused is fused  # TF keeps the value as given


def test_build_shapes_as_tensorshape() -> None:
    with pytest.raises(TypeError, match="3.5"):
        arraybn.BatchNormalization().build((4, 3.5))
    with pytest.raises(ValueError, match="undefined rank"):
        arraybn.BatchNormalization().build(None)
    with pytest.raises(ValueError, match="-1"):
        arraybn.BatchNormalization().build((4, -1))
    layer = arraybn.BatchNormalization()
    layer.build(3)  # a rank-1 shape
    assert layer.get_weights()[0].shape == (3,)


def test_from_config_errors_are_type_errors() -> None:
    config = arraybn.BatchNormalization().get_config()
    config["gamma_initializer"] = "foo"
    with pytest.raises(TypeError, match="Error when deserializing class 'BatchNormalization'.*gamma_initializer"):
        arraybn.BatchNormalization.from_config(config)


def test_list_and_object_inputs() -> None:
    layer = arraybn.BatchNormalization()
    with pytest.raises(TypeError, match="Python list"):  # first call: TF's TypeError
        layer([[1.0, 2.0, 3.0]] * 2, training=True)
    layer(np.ones((2, 3), np.float32), training=True)
    with pytest.raises(ValueError, match="Python list"):  # built: TF's ValueError
        layer([[1.0, 2.0, 3.0]] * 2, training=True)
    with pytest.raises(ValueError, match="dtype object"):
        layer(np.ones((2, 3), object), training=True)
    with pytest.raises(ValueError, match="mask"):
        arraybn.BatchNormalization(fused=False)(X4, training=True, mask=np.ones((2, 3, 4), object))


def test_min_max_norm_with_max_below_min_clips_as_keras() -> None:
    # Keras's backend.clip raises the maximum to the minimum: the norm along axis 0 (sqrt(3) for
    # gamma = ones(3)) becomes 2
    layer = arraybn.BatchNormalization(
        gamma_constraint={"class_name": "MinMaxNorm", "config": {"min_value": 2.0, "max_value": 1.0}}
    )
    layer.build((4, 3))
    layer.apply_constraints()
    np.testing.assert_allclose(layer.get_weights()[0], np.full(3, 2.0 / (1e-7 + np.sqrt(3.0))), rtol=1e-6)


def test_renorm_clipping_set_after_build() -> None:
    layer = arraybn.BatchNormalization(renorm=True)
    layer(np.ones((4, 3), np.float32), training=True)
    layer.renorm_clipping = "foo"
    layer(np.ones((4, 3), np.float32), training=False)  # inference does not read it (TF)
    before = layer.get_weights()
    with pytest.raises(AttributeError, match="renorm_clipping='foo'"):
        layer(np.ones((4, 3), np.float32), training=True)
    assert _same(layer.get_weights(), before)


def test_momentum_beyond_float32_and_a_complex_policy() -> None:
    with pytest.raises(ValueError, match="momentum=1e\\+308"):
        arraybn.BatchNormalization(momentum=1e308)(np.ones((4, 3), np.float32), training=True)
    arraybn.BatchNormalization(momentum=float("inf"))(np.ones((4, 3), np.float32), training=True)  # TF: fine
    layer = arraybn.BatchNormalization(dtype="complex64")  # accepted at construction
    with pytest.raises(ValueError, match="complex64"):
        layer.build((4, 3))


def test_adjustment_of_the_wrong_shape_raises() -> None:
    layer = arraybn.BatchNormalization(adjustment=lambda shape: (np.ones(3, np.float32), np.zeros(3, np.float32)))
    with pytest.raises(ValueError, match="adjustment"):
        layer(np.ones((6, 3, 1), np.float32), training=True)
    layer(np.ones((6, 3, 1), np.float32), training=False)  # inference does not call it (TF)
