"""Interop: torch state dicts, Keras weight lists, and the torch module against TensorFlow's goldens.

The module (`arraybn.torch.BatchNormalization`) is checked against both golden sets:
the gradient goldens (``tf.GradientTape``: y, dx, dgamma, dbeta through torch autograd)
and the layer goldens (outputs and moving statistics after every call; for the
``constraints`` group one real ``torch.optim.SGD`` step against TF's optimizer step).
"""

from __future__ import annotations

import copy
import functools
import io
import os
import subprocess
import sys
import warnings
from typing import Any

import numpy as np
import pytest

import arraybn
from arraybn import interop
from conformance import adjustments
from conformance import gradients as G
from conformance import runner as R

torch = pytest.importorskip("torch")
from arraybn.torch import BatchNormalization as TorchBN  # noqa: E402


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _single_axis(axis: Any) -> int | None:
    if isinstance(axis, list):
        return axis[0] if len(axis) == 1 else None
    return axis


# --------------------------------------------------------------------------- #
# Conventions, derived by hand
# --------------------------------------------------------------------------- #


def test_momentum_convention() -> None:
    assert interop.momentum_from_torch(0.1) == pytest.approx(0.9)
    assert interop.momentum_to_torch(0.99) == pytest.approx(0.01)
    with pytest.raises(ValueError, match="cumulative"):
        interop.momentum_from_torch(None)


def test_config_from_torch() -> None:
    m = torch.nn.BatchNorm2d(5, eps=1e-4, momentum=0.2, affine=False)
    assert interop.config_from_torch(m) == pytest.approx(
        {"axis": 1, "momentum": 0.8, "epsilon": 1e-4, "center": False, "scale": False}
    )
    with pytest.raises(ValueError, match="track_running_stats"):
        interop.config_from_torch(torch.nn.BatchNorm2d(5, track_running_stats=False))


def _trained_torch(cls: Any, shape: tuple[int, ...], **kw: Any) -> Any:
    torch.manual_seed(0)
    m = cls(shape[1], **kw)
    if m.affine:
        with torch.no_grad():
            m.weight.uniform_(0.5, 2.0)
            m.bias.uniform_(-1.0, 1.0)
    for _ in range(3):
        m(torch.randn(shape) * 2.0 + 1.0)
    return m.eval()


@pytest.mark.parametrize("affine", [True, False])
def test_torch_state_dict_round_trip_and_inference(affine: bool) -> None:
    m = _trained_torch(torch.nn.BatchNorm2d, (8, 3, 4, 4), affine=affine)
    layer = arraybn.BatchNormalization(**interop.config_from_torch(m))
    layer.build((8, 3, 4, 4))
    interop.load_torch_state_dict(layer, m.state_dict())  # fused path (4-D, axis 1): no warning
    assert len(layer.weights) == (4 if affine else 2)
    x = torch.randn(8, 3, 4, 4)
    with torch.no_grad():
        want = m(x).numpy()
    got = layer(x.numpy())  # inference
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

    sd = interop.torch_state_dict(layer, num_batches_tracked=int(m.num_batches_tracked))
    back = torch.nn.BatchNorm2d(**interop.torch_kwargs(layer))
    back.load_state_dict(sd)  # strict: the same keys
    for k, v in m.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    assert back.momentum == pytest.approx(m.momentum) and back.eps == m.eps


def test_torch_state_dict_prefix_and_missing_affine() -> None:
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 1), _trained_torch(torch.nn.BatchNorm2d, (4, 3, 2, 2), affine=False))
    layer = arraybn.BatchNormalization(axis=1)  # center and scale: gamma = 1, beta = 0 exactly
    layer.build((4, 3, 2, 2))
    interop.load_torch_state_dict(layer, model.state_dict(), prefix="1.")
    np.testing.assert_array_equal(layer.gamma, np.ones(3, np.float32))
    np.testing.assert_array_equal(layer.beta, np.zeros(3, np.float32))
    np.testing.assert_array_equal(layer.moving_mean, model[1].running_mean.numpy())
    with pytest.raises(ValueError, match="scale=False"):
        interop.weights_from_torch_state_dict(
            _trained_torch(torch.nn.BatchNorm2d, (4, 3, 2, 2)).state_dict(), scale=False
        )
    with pytest.raises(ValueError, match="track_running_stats"):
        interop.weights_from_torch_state_dict({"weight": torch.ones(3), "bias": torch.zeros(3)})


def test_running_variance_bessel_difference_is_warned_and_real() -> None:
    """torch averages the unbiased batch variance; TF's non-fused path the biased one (by hand)."""
    m = torch.nn.BatchNorm1d(2, momentum=0.1)
    layer = arraybn.BatchNormalization(**interop.config_from_torch(m))
    layer.build((4, 2))
    with pytest.warns(interop.SemanticsWarning, match="biased"):
        interop.load_torch_state_dict(layer, m.state_dict())
    x = np.array([[0.0, 1.0], [2.0, 1.0], [4.0, 3.0], [6.0, 3.0]], np.float32)
    m.train()(torch.from_numpy(x))
    layer(x, training=True)
    biased = np.array([5.0, 1.0])  # per column: mean 3 and 2, squared deviations summed / 4
    np.testing.assert_allclose(layer.moving_variance, 0.9 * 1.0 + 0.1 * biased, rtol=1e-6)
    np.testing.assert_allclose(m.running_var.numpy(), 0.9 * 1.0 + 0.1 * biased * 4 / 3, rtol=1e-6)
    np.testing.assert_allclose(layer.moving_mean, m.running_mean.numpy(), rtol=1e-6)  # same convention


def test_fused_path_updates_like_torch() -> None:
    """A 4-D input with axis 1 takes TF's fused path: Bessel-corrected, as torch (momentum mapped)."""
    m = torch.nn.BatchNorm2d(3, momentum=0.1)
    layer = arraybn.BatchNormalization(**interop.config_from_torch(m))
    layer.build((4, 3, 2, 2))
    interop.load_torch_state_dict(layer, m.state_dict())
    x = torch.randn(4, 3, 2, 2) * 3.0 + 1.0
    m(x)
    layer(x.numpy(), training=True)
    np.testing.assert_allclose(layer.moving_variance, m.running_var.numpy(), rtol=1e-5)
    np.testing.assert_allclose(layer.moving_mean, m.running_mean.numpy(), rtol=1e-5, atol=1e-7)


def test_torch_export_refuses_what_torch_cannot_express() -> None:
    layer = arraybn.BatchNormalization(axis=[1, 2])
    layer.build((2, 3, 4))
    with pytest.raises(ValueError, match="torch.nn.BatchNorm"):
        interop.torch_state_dict(layer)
    with pytest.raises(ValueError, match="not built"):
        interop.torch_kwargs(arraybn.BatchNormalization())


# --------------------------------------------------------------------------- #
# Keras weight lists
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(("center", "scale"), [(True, True), (False, True), (True, False), (False, False)])
def test_keras_weight_order_is_tf_order(center: bool, scale: bool) -> None:
    """The order TF recorded for the same switches (gradient goldens' weight names)."""
    doc, _ = G.load()
    tf_names = next(
        c["result"]["weight_names"]
        for c in doc["cases"]
        if c["result"]["status"] == "ok"
        and c["init_kwargs"].get("center", True) == center
        and c["init_kwargs"].get("scale", True) == scale
        and "renorm" not in c["init_kwargs"]
    )
    layer = arraybn.BatchNormalization(center=center, scale=scale)
    layer.build((4, 3))
    assert layer.weight_names == tf_names
    rng = np.random.default_rng(1)
    ws = [rng.standard_normal(3).astype(np.float32) for _ in tf_names]
    interop.load_keras_weights(layer, ws)
    for got, want in zip(interop.keras_weights(layer), ws, strict=True):
        np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match=", ".join(tf_names)):
        interop.load_keras_weights(layer, [*ws, ws[0]])


def test_keras3_conventions() -> None:
    renorm = arraybn.BatchNormalization(renorm=True)
    renorm.build((4, 3))
    assert len(interop.keras_weights(renorm)) == 7  # renorm's three after the four
    fused = arraybn.BatchNormalization()
    fused.build((2, 4, 4, 3))
    with pytest.warns(interop.SemanticsWarning, match="biased"):
        interop.keras_weights(fused, keras3=True)
    plain = arraybn.BatchNormalization()
    plain.build((4, 3))  # non-fused: biased, as Keras 3
    assert len(interop.keras_weights(plain, keras3=True)) == 4


# --------------------------------------------------------------------------- #
# The torch module
# --------------------------------------------------------------------------- #


def test_module_surface() -> None:
    bn = TorchBN(4, momentum=0.9)
    assert [n for n, _ in bn.named_parameters()] == ["gamma", "beta"]
    assert all(p.requires_grad for p in bn.parameters())
    assert sorted(n for n, _ in bn.named_buffers()) == ["moving_mean", "moving_variance"]
    bn2 = TorchBN(4, momentum=0.9)
    x = torch.randn(8, 4, 3, 3)
    bn(x)
    bn2.load_state_dict(bn.state_dict())
    bn.eval()
    bn2.eval()
    assert torch.equal(bn(x), bn2(x))
    clone = copy.deepcopy(bn)  # and torch.save(bn): the built layers are rebuilt by the next call
    assert clone.gamma is not bn.gamma and torch.equal(clone(x), bn(x))
    buf = io.BytesIO()
    torch.save(bn, buf)
    buf.seek(0)
    assert torch.equal(torch.load(buf, weights_only=False)(x), bn(x))
    frozen = TorchBN(4, trainable=False, scale=False)
    assert frozen.gamma is None and not frozen.beta.requires_grad
    with pytest.raises(ValueError, match="channels"):
        TorchBN(5)(x)
    with pytest.raises(TypeError, match="dtype="):
        TorchBN(4).double()(x.double())
    with pytest.raises(TypeError, match="one int"):
        TorchBN(4, axis=[1])


def test_importing_arraybn_and_its_converters_imports_no_torch() -> None:
    code = "import sys, arraybn, arraybn.interop; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
    assert interop.TorchBatchNorm is TorchBN


def test_module_from_torch() -> None:
    m = _trained_torch(torch.nn.BatchNorm2d, (8, 3, 4, 4))
    bn = TorchBN.from_torch(m).eval()
    x = torch.randn(8, 3, 4, 4)
    with torch.no_grad():
        np.testing.assert_allclose(bn(x).numpy(), m(x).numpy(), rtol=1e-5, atol=1e-5)
    with pytest.warns(interop.SemanticsWarning):
        TorchBN.from_torch(torch.nn.BatchNorm1d(3))


@functools.lru_cache(maxsize=1)
def _grad_goldens() -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    return G.load()


def _module_for(kwargs: dict[str, Any], weights: dict[str, np.ndarray]) -> Any:
    kwargs = dict(kwargs)
    axis = kwargs.pop("axis")
    channels = next(iter(weights.values())).shape[0]
    bn = TorchBN(channels, axis=axis, **kwargs)
    bn.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in weights.items()})
    return bn


@pytest.mark.parametrize("device", [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)])
def test_module_matches_tf_gradients(device: str) -> None:
    """Every gradient golden with one channel axis: y, dx, dgamma, dbeta through torch autograd."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("torch CUDA: no GPU on this machine")
    doc, arrays = _grad_goldens()
    failures, n = {}, 0
    for case in doc["cases"]:
        kw = case["init_kwargs"]
        axis = _single_axis(kw["axis"])
        if case["result"]["status"] != "ok" or axis is None or "virtual_batch_size" in kw:
            continue
        inp = G.case_inputs(case, arrays)
        bn = _module_for({**inp["kwargs"], "axis": axis}, inp["weights"]).to(device)
        for p in (bn.gamma, bn.beta):
            if p is not None:
                p.requires_grad_(True)  # TF's tape watches them even when the layer is frozen
        bn.train(case["training"])
        x = torch.tensor(inp["x"], device=device, requires_grad=True)
        fused = bool(case["result"]["fused"])
        mask = None if inp["mask"] is None or fused else torch.tensor(inp["mask"], device=device)
        y = bn(x, mask=mask)
        y.backward(torch.tensor(inp["dy"], device=device))
        got = {"y": y.detach().cpu().numpy(), "dx": x.grad.cpu().numpy()}
        if bn.gamma is not None:
            got["dgamma"] = bn.gamma.grad.cpu().numpy()
        if bn.beta is not None:
            got["dbeta"] = bn.beta.grad.cpu().numpy()
        problems = G.check_case(case, arrays, got)
        if problems:
            failures[case["id"]] = problems
        n += 1
    assert n > 250
    assert not failures, failures


@functools.lru_cache(maxsize=1)
def _layer_cases() -> list[tuple[Any, dict[str, Any]]]:
    """The layer goldens the module can run: TF ran them, one channel axis, no ghost batches."""
    out = []
    for chunk, case in R.iter_cases(exclude=r"^errors/"):
        kw = case["init_kwargs"]
        if case["status"] != "ok" or kw.get("virtual_batch_size") is not None:
            continue
        if _single_axis(kw.get("axis", -1)) is None or not isinstance(_single_axis(kw.get("axis", -1)), int):
            continue
        if any(c["training"] not in (True, False, None) for c in case["calls"]):
            continue
        out.append((chunk, case))
    return out


def _drive_module(chunk: Any, case: dict[str, Any], backend: Any) -> dict[str, Any]:
    """The runner's result dict (calls, step) for the torch module; the step is a torch.optim.SGD step."""
    kwargs = adjustments.resolve(case["init_kwargs"])
    kwargs["axis"] = _single_axis(kwargs.get("axis", -1))
    names = case["resolved"]["weight_names"]
    iw = case.get("initial_weights")
    if iw is None and case.get("random_initializer"):
        return {"error": None, "calls": [], "step": None, "skip": True}
    if iw is None:  # the initializers' weights, made by the module's constructor
        channels = case["input_shape"][kwargs["axis"]]
        bn = TorchBN(channels, **kwargs)
    else:
        ws = [np.array(w) for w in chunk.arr(iw)] if not isinstance(iw, list) else [np.array(chunk.arr(r)) for r in iw]
        bn = _module_for(kwargs, dict(zip(names, ws, strict=True)))
    res: dict[str, Any] = {"error": None, "calls": [], "step": None}
    built_losses = [R.to_numpy(v.detach()) for v in bn.losses]  # as the runner reads them after build
    res["losses"] = [float(np.asarray(a, np.float64)) for a, _ in built_losses]
    res["loss_dtypes"] = [t for _, t in built_losses]

    def weights() -> np.ndarray:
        return np.stack([getattr(bn, n).detach().numpy() for n in names])

    for c in case["calls"]:
        x = backend.asarray(np.array(chunk.arr(c["x"])), case["arrays"][c["x"]["key"]]["dtype"])
        m = None if c["mask"] is None else backend.asarray(np.array(chunk.arr(c["mask"])))
        bn.train(bool(c["training"]))  # None: the v1 layer's inference
        with torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Masking is not supported", UserWarning)  # TF warns too (fused)
            y = bn(x, mask=m)
        ya, yt = R.to_numpy(y)
        entry = {"y": ya, "y_dtype": yt, "y_shape": list(y.shape), "weights": weights()}
        if "losses" in c:  # the module's penalties (activity regularizer of this call, then gamma's, beta's)
            losses = [R.to_numpy(v.detach()) for v in bn.losses]
            entry["losses"] = [float(np.asarray(a, np.float64)) for a, _ in losses]
            entry["loss_dtypes"] = [t for _, t in losses]
        res["calls"].append(entry)
    st = case.get("step")
    if st is not None:
        x = backend.asarray(np.array(chunk.arr(st["x"])), case["arrays"][st["x"]["key"]]["dtype"])
        dy = backend.asarray(np.array(chunk.arr(st["dy"])), case["arrays"][st["dy"]["key"]]["dtype"])
        before = chunk.arr(st["weights_before"])
        with torch.no_grad():
            for n, w in zip(names, before, strict=True):
                getattr(bn, n).copy_(torch.from_numpy(np.array(w)))
        # TF's optimizer keeps the learning rate as a float32 variable (0.1 is 0.10000000149 in float64)
        opt = torch.optim.SGD(bn.parameters(), lr=float(np.float32(st["learning_rate"])))
        bn.train()
        y = bn(x)
        acc = torch.float64 if y.dtype == torch.float64 else torch.float32
        loss = (y * dy).to(acc).sum()  # TF: reduce_sum(cast(y * dy, float32))
        opt.zero_grad()
        loss.backward()
        grads = chunk.arr(st["grads"]) if st.get("grads") is not None else []
        for gname, g in zip(st["grad_names"], grads, strict=True):
            got = getattr(bn, gname).grad.numpy()
            msg = G.compare(f"step d{gname}", got, np.asarray(g, got.dtype), scale=float(np.max(np.abs(g))))
            if msg:
                res["error"] = {"stage": "step", "call_index": None, "type": "AssertionError", "mro": [],
                                "message": msg}
        opt.step()
        bn.apply_constraints()
        ya, yt = R.to_numpy(y.detach())
        res["step"] = {"y": ya, "y_dtype": yt, "weights_after": weights()}
    return res


@pytest.mark.parametrize("group", ["core", "affine", "dtype", "constraints", "regularizers", "edges", "activity",
                                   "small_batch", "fully_masked", "frozen_momentum", "initializers", "f16_large",
                                   "bfloat16"])
def test_module_matches_tf_moving_statistics(group: str) -> None:
    """Outputs and moving statistics after every call of the layer goldens (a sample of each group);
    ``constraints``: TF's gradients and weights after one SGD step, with torch.optim.SGD."""
    backend = R.get_backend("torch")
    stride = {"dtype": 25, "affine": 20, "core": 15}.get(group, 1)
    failures, n = {}, 0
    for chunk, case in [c for c in _layer_cases() if c[0].group == group][::stride]:
        res = _drive_module(chunk, case, backend)
        if res.pop("skip", False):
            continue
        outcome = R.compare_case(chunk, case, res)
        if outcome.problems:
            failures[case["id"]] = outcome.problems
        n += 1
    assert n > 0
    assert not failures, failures


def test_sgd_training_step_by_hand() -> None:
    """One SGD step on a 2-channel input, derived by hand: y = (x - mean) / sqrt(var + eps), loss = sum(y * dy)."""
    bn = TorchBN(1, axis=-1, epsilon=0.0, momentum=0.5)
    x = torch.tensor([[1.0], [3.0]])  # mean 2, biased variance 1: y = [-1, 1]
    dy = torch.tensor([[1.0], [2.0]])
    opt = torch.optim.SGD(bn.parameters(), lr=0.5)
    y = bn(x)
    torch.testing.assert_close(y, torch.tensor([[-1.0], [1.0]]))
    (y * dy).sum().backward()
    # dgamma = sum(dy * y) = 1, dbeta = sum(dy) = 3
    torch.testing.assert_close(bn.gamma.grad, torch.tensor([1.0]))
    torch.testing.assert_close(bn.beta.grad, torch.tensor([3.0]))
    opt.step()
    torch.testing.assert_close(bn.gamma.detach(), torch.tensor([0.5]))
    torch.testing.assert_close(bn.beta.detach(), torch.tensor([-1.5]))
    # moving = moving - (moving - batch) * (1 - momentum): mean 0 -> 1, variance 1 -> 1
    torch.testing.assert_close(bn.moving_mean, torch.tensor([1.0]))
    torch.testing.assert_close(bn.moving_variance, torch.tensor([1.0]))
