"""The training decisions a layer keeps between calls (arraybn._plan.TrainingPlan): the same output and the same
new moving statistics as the full call, bit for bit, and never used once anything it depends on has changed."""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest

import arraybn
from arraybn._plan import TrainingPlan

from conftest import host_array as _np
from conftest import library_copy as _library
from conftest import recorded

pytest.importorskip("numba")  # the plan binds numba-kernels' training step

# inputs of at least 1 MiB (the compiled loops' size): 2-D rows, NHWC with a tail (7623 positions), NCHW runs
CASES = [
    ((8192, 64), {}),  # non-fused (rank 2)
    ((7, 33, 33, 48), {}),  # fused
    ((4, 48, 40, 40), {"axis": 1}),  # fused, channels in the middle
    ((7, 33, 33, 48), {"fused": False}),
    ((4, 48, 40, 40), {"axis": 1, "fused": False}),
    ((8192, 64), {"center": False}),
    ((8192, 64), {"scale": False, "center": False}),
    ((7, 33, 33, 48), {"scale": False}),  # the fused path's constant gamma
    ((7, 33, 33, 48), {"center": False, "momentum": 0.0}),  # the fused kernel replaces the moving statistics
    ((8192, 64), {"dtype": "float64"}),
    ((4, 48, 40, 40), {"axis": 1, "dtype": "float64", "fused": False}),
]


def _inputs(shape, dtype=np.float32, count=3, seed=0):  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(seed)
    return [(3 + (i + 1) * rng.standard_normal(shape)).astype(dtype) for i in range(count)]


def _pair(kwargs):  # type: ignore[no-untyped-def]
    """Two layers with the same settings: one keeps its plan, one is given the full call every time."""
    kwargs = dict(kwargs)
    momentum = kwargs.pop("momentum", 0.5)
    return [arraybn.BatchNormalization(momentum=momentum, **kwargs) for _ in range(2)]


def _full(layer, x, **kwargs):  # type: ignore[no-untyped-def]
    """The layer's full call (its training plan dropped first)."""
    layer._training_plan = None
    return layer(x, **kwargs)


def _same_bits(a, b) -> None:  # type: ignore[no-untyped-def]
    a, b = _np(a), _np(b)
    assert a.dtype == b.dtype and a.shape == b.shape
    assert a.tobytes() == b.tobytes()


def _same_layers(planned, full) -> None:  # type: ignore[no-untyped-def]
    for a, b in zip(planned.get_weights(), full.get_weights(), strict=True):
        _same_bits(a, b)


def _planned_runs(monkeypatch) -> list:  # type: ignore[type-arg]
    return recorded(monkeypatch, TrainingPlan, "run", keep=lambda y: y is not None)


@pytest.mark.parametrize(("shape", "kwargs"), CASES)
def test_planned_training_gives_the_full_calls_bits(monkeypatch, to_lib, shape, kwargs) -> None:
    planned, full = _pair(kwargs)
    runs = _planned_runs(monkeypatch)
    for x in _inputs(shape, np.float64 if kwargs.get("dtype") == "float64" else np.float32) * 2:
        _same_bits(planned(to_lib(x), training=True), _full(full, to_lib(x), training=True))
        _same_layers(planned, full)
    assert len(runs) == 5  # every call after the first
    assert type(planned.moving_mean) is type(full.moving_mean)
    if hasattr(planned.moving_mean, "requires_grad"):
        assert not planned.moving_mean.requires_grad and not planned.moving_mean.is_inference()


def test_weights_changed_in_place_are_read(monkeypatch, to_lib) -> None:
    """A training call reads gamma and beta anew: a change in place (an optimizer's step) is used."""
    planned, full = _pair({})
    x = to_lib(_inputs((8192, 64), count=1)[0])
    planned(x, training=True)
    _full(full, x, training=True)
    runs = _planned_runs(monkeypatch)
    for layer in (planned, full):
        _np(layer.gamma)[...] *= 1.5
        _np(layer.beta)[...] += 0.25
    _same_bits(planned(x, training=True), _full(full, x, training=True))
    _same_layers(planned, full)
    assert len(runs) == 1


CHANGES = {
    "set_weights": lambda layer, x: layer.set_weights([w * 1.25 for w in layer.get_weights()]),
    "momentum": lambda layer, x: setattr(layer, "momentum", 0.9),
    "epsilon": lambda layer, x: setattr(layer, "epsilon", 0.25),
    "trainable": lambda layer, x: setattr(layer, "trainable", False),
    "adjustment": lambda layer, x: setattr(layer, "adjustment", lambda shape: (2.0, 0.5)),
    "inference call": lambda layer, x: layer(x, training=False),
}


@pytest.mark.parametrize("change", list(CHANGES))
@pytest.mark.parametrize(("shape", "kwargs"), [((8192, 64), {}), ((7, 33, 33, 48), {})])
def test_any_change_is_seen(monkeypatch, to_lib, shape, kwargs, change) -> None:
    planned, full = _pair(kwargs)
    xs = [to_lib(x) for x in _inputs(shape)]
    planned(xs[0], training=True)
    _full(full, xs[0], training=True)
    runs = _planned_runs(monkeypatch)
    for layer in (planned, full):
        CHANGES[change](layer, xs[1])
    _same_bits(planned(xs[2], training=True), _full(full, xs[2], training=True))
    _same_layers(planned, full)
    expected_runs = 1 if change == "inference call" else 0  # an inference call changes no weight
    assert len(runs) == expected_runs


def test_other_inputs_and_calls_take_the_full_call(monkeypatch, to_lib) -> None:
    planned, full = _pair({})
    x = _inputs((8192, 64), count=1)[0]
    runs = _planned_runs(monkeypatch)
    others = [
        ((to_lib(x[:4096]),), {"training": True}),  # another batch size
        ((to_lib(x.astype(np.float64)),), {"training": True}),  # another dtype (cast to the policy's)
        ((to_lib(x),), {"training": True, "mask": to_lib(np.arange(8192) % 3 > 0)}),  # a mask
        ((to_lib(x),), {"training": 1}),  # training given as a number
    ]
    for args, kwargs in others:
        for layer in (planned, full):  # a plan made, then the call
            _full(layer, to_lib(x), training=True)
        assert planned._training_plan is not None
        _same_bits(planned(*args, **kwargs), _full(full, *args, **kwargs))
        _same_layers(planned, full)
    assert runs == []
    planned(to_lib(x), training=True)
    assert len(runs) == 1  # the plan made by the last call
    with arraybn.schedule("reference"):
        _same_bits(planned(to_lib(x), training=True), _full(full, to_lib(x), training=True))
        assert planned._training_plan is None  # the reference keeps no plan
    assert len(runs) == 1


def test_torch_autograd_takes_the_full_call(monkeypatch) -> None:
    torch = pytest.importorskip("torch")
    layer = arraybn.BatchNormalization()
    x = torch.from_numpy(_inputs((8192, 64), count=1)[0])
    layer(x, training=True)
    runs = _planned_runs(monkeypatch)
    xg = x.clone().requires_grad_(True)
    y = layer(xg, training=True)
    assert y.requires_grad
    (g,) = torch.autograd.grad(y.sum(), xg)
    assert float(g.abs().max()) < 1e-3  # the sum of a normalized channel does not move with its inputs
    layer.gamma.requires_grad_(True)  # a weight in autograd
    assert layer(x, training=True).requires_grad
    assert runs == []


def test_torch_inference_mode_takes_the_full_call(monkeypatch) -> None:
    """Under ``torch.inference_mode`` the full call runs: it keeps normal tensors (an inference tensor could not
    be used by autograd later); outside it again, the plan runs with the same bits as before."""
    torch = pytest.importorskip("torch")
    planned, full = _pair({})
    xs = [torch.from_numpy(x) for x in _inputs((8192, 64))]
    _same_bits(planned(xs[0], training=True), _full(full, xs[0], training=True))
    runs = _planned_runs(monkeypatch)
    with torch.inference_mode():
        _same_bits(planned(xs[1], training=True), _full(full, xs[1], training=True))
    assert runs == []
    assert not any(w.is_inference() for w in planned.weights)
    _same_bits(planned(xs[2], training=True), _full(full, xs[2], training=True))
    _same_layers(planned, full)
    assert len(runs) == 1
    assert not any(w.is_inference() for w in planned.weights)


def test_layer_forward_keeps_its_statistics(monkeypatch, to_lib) -> None:
    """``layer.forward`` records the batch statistics for its backward: it takes the full call."""
    layer = arraybn.BatchNormalization()
    x = to_lib(_inputs((8192, 64), count=1)[0])
    layer(x, training=True)
    runs = _planned_runs(monkeypatch)
    y, ctx = layer.forward(x, training=True)
    assert runs == [] and ctx.moments is not None
    _same_bits(y, layer(x, training=True))  # the same statistics, the same moving ones as a start


def test_float32_sums_that_could_overflow_take_the_full_call(monkeypatch, to_lib) -> None:
    """Where the loops leave the statistics to the next schedule (float32 sums beyond 2**120), the plan's
    step declines and the full call computes them: the same infinities as TensorFlow's float32 sums."""
    planned, full = _pair({})
    xs = _inputs((8192, 64))
    planned(to_lib(xs[0]), training=True)
    _full(full, to_lib(xs[0]), training=True)
    runs = recorded(monkeypatch, TrainingPlan, "run")
    huge = xs[1] * np.float32(1e36)  # sums of 8192 such values pass float32's largest
    _same_bits(planned(to_lib(huge), training=True), _full(full, to_lib(huge), training=True))
    _same_layers(planned, full)
    assert len(runs) == 1 and runs[0] is None  # tried, declined
    assert not np.all(np.isfinite(_np(planned.moving_variance)))


def test_a_failing_step_switches_the_schedule_off_with_one_warning(monkeypatch, to_lib) -> None:
    """A failure inside the bound step is the schedule's: it is switched off (one RuntimeWarning, as
    falls_back does), and the call is the full call under the next schedule, nothing kept twice."""
    from arraybn import _schedules
    from arraybn._schedules import numba_kernels

    planned, full = _pair({})
    x = to_lib(_inputs((8192, 64), count=1)[0])
    planned(x, training=True)
    _full(full, x, training=True)
    monkeypatch.setattr(numba_kernels, "channel_moments", lambda *a: 1 / 0)
    try:
        with pytest.warns(RuntimeWarning, match="numba-kernels") as caught:
            got = planned(x, training=True)
        assert len([w for w in caught if "numba-kernels" in str(w.message)]) == 1
        assert "numba-kernels" in _schedules.disabled()
        _same_bits(got, _full(full, x, training=True))  # both under the next schedule now
        _same_layers(planned, full)
    finally:
        _schedules._DISABLED.pop("numba-kernels", None)


def test_copies_and_pickles_start_without_a_plan(to_lib) -> None:
    layer = arraybn.BatchNormalization()
    x = to_lib(_inputs((8192, 64), count=1)[0])
    layer(x, training=True)
    assert layer._training_plan is not None
    for make in (copy.deepcopy, lambda layer: pickle.loads(pickle.dumps(layer))):
        other = make(layer)
        assert other._training_plan is None
        _same_bits(other(x, training=True), layer(x, training=True))
        _same_layers(other, layer)
