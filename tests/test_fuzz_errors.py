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
