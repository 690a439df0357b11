"""The inference map a layer keeps between calls (arraybn._plan): the same bits as the full call, and never
used once anything it depends on has changed."""

from __future__ import annotations

import copy
import pickle
import warnings

import numpy as np
import pytest

import arraybn
from arraybn._plan import InferencePlan

from conftest import host_array as _np
from conftest import library_copy as _library
from conftest import recorded

CASES = [  # (shape, layer kwargs): the fused path (NHWC, NCHW), the non-fused one (2-D, ghost batches)
    ((8, 6, 6, 16), {}),
    ((8, 16, 6, 6), {"axis": 1}),
    ((8192, 64), {}),  # 2 MiB: the compiled loops' size
    ((32, 24), {"virtual_batch_size": 8}),
]


def _trained(shape, kwargs, to_lib, dtype=np.float32, seed=0):  # type: ignore[no-untyped-def]
    """A layer after two training calls (moving statistics away from their start), with gamma and beta set,
    and an inference input."""
    rng = np.random.default_rng(seed)
    layer = arraybn.BatchNormalization(momentum=0.5, **kwargs)
    for _ in range(2):
        layer(to_lib((3 + 2 * rng.standard_normal(shape)).astype(dtype)), training=True)
    gamma, beta, *moving = layer.get_weights()  # gamma and beta away from 1 and 0
    layer.set_weights([gamma + rng.uniform(0.5, 1, gamma.shape), beta + rng.uniform(-1, 1, beta.shape), *moving])
    x = to_lib((3 + 2 * rng.standard_normal(shape)).astype(dtype))
    return layer, x


def _full(layer, x, **kwargs):  # type: ignore[no-untyped-def]
    """The layer's full call (its plan dropped first)."""
    layer._plan = None
    return layer(x, **kwargs)


def _planned_runs(monkeypatch) -> list:  # type: ignore[type-arg]
    return recorded(monkeypatch, InferencePlan, "run", keep=lambda y: y is not None)


def _same_bits(a, b) -> None:  # type: ignore[no-untyped-def]
    a, b = _np(a), _np(b)
    assert a.dtype == b.dtype and a.shape == b.shape
    assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize(("shape", "kwargs"), CASES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_planned_call_gives_the_full_calls_bits(monkeypatch, to_lib, shape, kwargs, dtype) -> None:
    layer, x = _trained(shape, kwargs, to_lib, dtype)
    expected = _full(layer, x)
    assert layer._plan is not None
    runs = _planned_runs(monkeypatch)
    for training in (None, False):
        _same_bits(layer(x, training=training), expected)
    assert len(runs) == 2
    # the functional API computes the same numbers from the same weights
    state = arraybn.BNState(layer.moving_mean, layer.moving_variance)
    y, _ = arraybn.batch_norm(x, arraybn.BNParams(layer.gamma, layer.beta), state, training=False, config=layer._config)
    _same_bits(y, expected)


def _in_place(layer, name, factor, add=0.0) -> None:  # type: ignore[no-untyped-def]
    """Change a weight in place, through a NumPy view of its memory."""
    view = _np(getattr(layer, name))
    view *= factor
    view += add


CHANGES = {
    "moving_mean in place": lambda layer, x: _in_place(layer, "moving_mean", 1.5),
    "moving_variance in place": lambda layer, x: _in_place(layer, "moving_variance", 3.0),
    "gamma in place": lambda layer, x: _in_place(layer, "gamma", -2.0),
    "beta in place": lambda layer, x: _in_place(layer, "beta", 1.0, 0.25),
    "set_weights": lambda layer, x: layer.set_weights([w * 1.25 for w in layer.get_weights()]),
    "a training call": lambda layer, x: layer(x + 4.0, training=True),
    "epsilon": lambda layer, x: setattr(layer, "epsilon", 5.0),
    "scale off": lambda layer, x: setattr(layer, "scale", False),
    "center off": lambda layer, x: setattr(layer, "center", False),
}


@pytest.mark.parametrize(("shape", "kwargs"), CASES[:3])
@pytest.mark.parametrize("change", list(CHANGES))
def test_any_change_is_seen(monkeypatch, to_lib, shape, kwargs, change) -> None:
    layer, x = _trained(shape, kwargs, to_lib)
    before = _full(layer, x)
    CHANGES[change](layer, x)
    runs = _planned_runs(monkeypatch)
    got = layer(x)
    assert runs == []  # the plan did not hold: the full call ran (and made a new plan)
    # the change reaches the output (the non-fused path reads scale and center at build only, as TF's) ...
    reaches = layer._config.fused or change not in ("scale off", "center off")
    assert (_np(got).tobytes() != _np(before).tobytes()) == reaches
    _same_bits(got, _full(layer, x))  # ... exactly as the full call computes it
    _same_bits(layer(x), got)
    assert len(runs) == 1  # and the new plan holds again


def test_torch_optimizer_step_in_place_is_seen(monkeypatch) -> None:
    torch = pytest.importorskip("torch")
    layer, x = _trained((8, 6, 6, 16), {}, _library("torch"))
    before = layer(x)
    with torch.no_grad():
        layer.gamma.mul_(2.0)  # as an optimizer's step changes a weight
    got = layer(x)
    assert _np(got).tobytes() != _np(before).tobytes()
    _same_bits(got, _full(layer, x))


def test_other_inputs_take_the_full_call(monkeypatch, to_lib) -> None:
    layer, x = _trained((8, 6, 6, 16), {}, to_lib)
    layer(x)
    runs = _planned_runs(monkeypatch)
    smaller = _np(x)[:4]
    _same_bits(layer(to_lib(smaller)), _full(layer, to_lib(smaller)))  # another batch size
    wider = _np(x).astype(np.float64)
    _same_bits(layer(to_lib(wider)), _full(layer, to_lib(wider)))  # another dtype
    assert runs == []


def test_not_under_the_reference_schedule(monkeypatch, to_lib) -> None:
    layer, x = _trained((8192, 64), {}, to_lib)
    layer(x)
    runs = _planned_runs(monkeypatch)
    with arraybn.schedule("reference"):
        y = layer(x)
        assert layer._plan is None  # the reference keeps no plan
    assert runs == []
    _same_bits(y, _full(layer, x))  # the loops' scale-and-shift is the reference's, bit for bit


def test_axis_changed_in_place_raises_as_the_full_call(to_lib) -> None:
    layer, x = _trained((8, 6, 6, 16), {"fused": False}, to_lib)
    layer(x)
    layer.axis[0] = 1  # the list built by build, changed in place
    with pytest.raises(ValueError, match="cannot normalize another axis"):
        layer(x)


def test_mask_warns_on_every_call(to_lib) -> None:
    layer, x = _trained((8, 6, 6, 16), {}, to_lib)
    layer(x)
    mask = to_lib(np.ones((8, 6, 6), bool))
    for _ in range(2):
        with pytest.warns(UserWarning, match="Masking is not supported"):
            layer(x, training=False, mask=mask)


def test_no_plan_with_an_activity_regularizer(to_lib) -> None:
    rng = np.random.default_rng(1)
    layer = arraybn.BatchNormalization(activity_regularizer="l2")
    x = to_lib(rng.standard_normal((8, 16)).astype(np.float32))
    layer(x)
    assert layer._plan is None
    first = _np(layer.losses[0])
    y = layer(x)
    assert float(_np(layer.losses[0])) == pytest.approx(float(first))
    assert float(first) == pytest.approx(0.01 * float(np.sum(_np(y).astype(np.float64) ** 2)) / 8, rel=1e-5)


def test_losses_of_a_planned_call_are_the_full_calls(monkeypatch, to_lib) -> None:
    layer, x = _trained((8, 16), {"gamma_regularizer": "l2"}, to_lib)
    layer(x)
    runs = _planned_runs(monkeypatch)
    layer(x)
    assert len(runs) == 1
    (loss,) = layer.losses
    assert float(_np(loss)) == pytest.approx(0.01 * float(np.sum(_np(layer.gamma).astype(np.float64) ** 2)), rel=1e-6)


def test_torch_autograd_inputs_take_the_full_call() -> None:
    torch = pytest.importorskip("torch")
    layer, x = _trained((8, 6, 6, 16), {}, _library("torch"))
    layer(x)
    xg = x.clone().requires_grad_(True)
    y = layer(xg)
    assert y.requires_grad
    (g,) = torch.autograd.grad(y.sum(), xg)
    scale = (layer.gamma / torch.sqrt(layer.moving_variance + 1e-3)).detach()
    np.testing.assert_allclose(_np(g), np.broadcast_to(_np(scale), g.shape), rtol=1e-6)


def test_copies_and_pickles_start_without_a_plan(to_lib) -> None:
    layer, x = _trained((8, 6, 6, 16), {}, to_lib)
    expected = layer(x)
    assert layer._plan is not None
    for other in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert other._plan is None
        _same_bits(other(x), expected)
        _np(other.moving_mean)[...] += 1.0  # a copy's weights are its own
    _same_bits(layer(x), expected)


def test_layer_threads_share_no_stale_plan(to_lib) -> None:
    """Inference from several threads while another changes the weights: every output is one of the two
    states' outputs, never a mix."""
    import threading

    layer, x = _trained((8192, 64), {}, to_lib)
    old = _np(layer(x)).tobytes()
    weights = layer.get_weights()
    new_weights = [w + 1 for w in weights]
    layer.set_weights(new_weights)
    new = _np(layer(x)).tobytes()
    layer.set_weights(weights)
    seen: list[bytes] = []

    def infer() -> None:
        for _ in range(20):
            seen.append(_np(layer(x)).tobytes())

    threads = [threading.Thread(target=infer) for _ in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for t in threads:
            t.start()
        for i in range(10):
            layer.set_weights(new_weights if i % 2 == 0 else weights)
        for t in threads:
            t.join()
    assert seen and set(seen) <= {old, new}


@pytest.mark.parametrize("kwargs", [{"dtype": "mixed_float16"}, {"dtype": "mixed_float16", "fused": False}])
def test_planned_call_under_a_mixed_policy(monkeypatch, to_lib, kwargs) -> None:
    """float32 inputs autocast to float16: the plan casts them as the full call does."""
    layer, x = _trained((8, 6, 6, 16), kwargs, to_lib)
    expected = _full(layer, x)
    assert _np(expected).dtype == np.float16
    runs = _planned_runs(monkeypatch)
    _same_bits(layer(x), expected)
    assert len(runs) == 1


# a plan with the compiled loops' bound scale-and-shift (numba-kernels, inputs of at least 1 MiB): 2-D rows,
# NHWC rows of tiled channel vectors with a tail (7623 positions, two 48-channel vectors a row), NCHW runs
BOUND = [((8192, 64), {}), ((7, 33, 33, 48), {}), ((4, 48, 40, 40), {"axis": 1})]


@pytest.mark.parametrize(("shape", "kwargs"), BOUND)
def test_a_bound_pass_gives_the_full_calls_bits(monkeypatch, to_lib, shape, kwargs) -> None:
    """Where the schedule binds its scale-and-shift to the plan's map, the planned call runs it: the same
    loops and pieces as the full call, the same bits. A strided input of the same shape and dtype takes the
    schedule's own path instead, with the same bits too."""
    pytest.importorskip("numba")
    from arraybn._schedules.numba_kernels import NumbaKernels

    layer, x = _trained(shape, kwargs, to_lib)
    expected = _full(layer, x)
    assert layer._plan is not None and layer._plan.runner is not None
    runs = _planned_runs(monkeypatch)
    general = recorded(monkeypatch, NumbaKernels, "affine")
    _same_bits(layer(x), expected)
    assert (len(runs), len(general)) == (1, 0)  # planned, through the bound pass
    if hasattr(x, "numpy"):  # torch: a transposed copy seen through its transpose (same shape, strided)
        strided = x.transpose(0, -1).contiguous().transpose(0, -1)
    else:
        strided = np.asfortranarray(x)
    assert tuple(strided.shape) == shape
    _same_bits(layer(strided), expected)
    assert (len(runs), len(general)) == (2, 1)  # planned; the bound pass declined it (strided), affine computed


def test_a_failing_bound_pass_switches_the_schedule_off_with_one_warning(monkeypatch, to_lib) -> None:
    """A failure inside the bound pass is the schedule's: it is switched off (one RuntimeWarning, as
    falls_back does) and the call still returns the full call's bits (the reference's scale-and-shift)."""
    pytest.importorskip("numba")
    from arraybn import _schedules
    from arraybn._schedules import numba_kernels

    layer, x = _trained((8192, 64), {}, to_lib)
    expected = _full(layer, x)
    monkeypatch.setattr(numba_kernels._AffinePass, "__call__", lambda *a: 1 / 0)
    try:
        with pytest.warns(RuntimeWarning, match="numba-kernels") as caught:
            got = layer(x)
        assert len([w for w in caught if "numba-kernels" in str(w.message)]) == 1
        assert "numba-kernels" in _schedules.disabled()
        _same_bits(got, expected)
    finally:
        _schedules._DISABLED.pop("numba-kernels", None)
