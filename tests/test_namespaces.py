"""Every namespace, every device: one layer, the input's library and device, no host round trips.

What these tests prove, backend by backend:

* every backend (conftest's ``xp``): the layer gives NumPy's outputs and
  moving statistics, keeps every weight in the input's namespace and on its
  device, and ``get_weights()`` returns NumPy host copies;
* array-api-strict on a second device (``Device("device1")``): the forward
  never leaves that device, and every host read (``float``, ``bool``, ``int``,
  ``__array__``, DLPack, ``to_device``) is trapped and fails the test;
* torch: a ``TorchFunctionMode`` traps host reads (``item``, ``bool``,
  ``float``, ``tolist``, ``numpy``, ``cpu``, ``__array__``) on CPU and CUDA,
  and the functional core and the layer compile with
  ``torch.compile(fullgraph=True)`` (no graph break, no recompilation while
  the weights change);
* CuPy and torch CUDA: the forward returns while the GPU is still busy with a
  long kernel queued before it, so it never waited for the device (no host
  read, no synchronizing copy);
* array-api-strict with ``api_version="2023.12"`` as well as conftest's 2024.12;
* mixed namespaces and devices fail with ``TypeError`` / ``ValueError`` and
  leave the weights exactly as they were.

dask and JAX have their own files (``test_dask.py``, ``test_jax.py``).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from conftest import Backend, _namespace, assert_close

import arraybn
from arraybn import BNConfig, BNParams, BNState, batch_norm
from arraybn._namespace import array_device

# Dynamo warns once per lru_cache-wrapped helper of array-api-compat it traces
# through (``is_numpy_array`` & co.); harmless, and not arraybn's.
DYNAMO_LRU_WARNING = "ignore:Dynamo detected a call to a `functools.lru_cache`-wrapped function:UserWarning"

# (id, input shape, layer kwargs, with a mask)
CASES = [
    ("2d-axis-1", (16, 3), {}, False),
    ("4d-nhwc-fused", (8, 4, 4, 3), {}, False),
    ("4d-nchw-axis1", (8, 3, 4, 4), {"axis": 1}, False),
    ("4d-multi-axis", (8, 3, 5, 2), {"axis": [1, 3]}, False),
    ("3d-masked", (8, 6, 3), {"fused": False}, True),
    ("2d-renorm", (16, 3), {"renorm": True, "renorm_clipping": {"rmax": 1.5, "rmin": 0.5, "dmax": 0.5}}, False),
    ("2d-virtual-batch", (16, 3), {"virtual_batch_size": 4, "fused": False}, False),
]


def _data(shape: tuple[int, ...], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * 2.0 + 0.5).astype(np.float32)


def _mask(shape: tuple[int, ...], seed: int) -> np.ndarray:
    m = np.random.default_rng(seed).random(shape[:-1]) < 0.7
    m[0] = True  # every channel sees at least one element
    return m


def _run_steps(layer: arraybn.BatchNormalization, to_backend: Any, case: tuple) -> list[Any]:
    """Two training steps then one inference step; returns the three outputs."""
    _, shape, _, masked = case
    outs = []
    for step, training in enumerate((True, True, False)):
        x = to_backend(_data(shape, step))
        mask = to_backend(_mask(shape, 10 + step)) if masked else None
        outs.append(layer(x, training=training, mask=mask))
    return outs


def _same_device(a: Any, b: Any) -> bool:
    return bool(array_device(a) == array_device(b))


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_layer_matches_numpy_on_every_backend(case, xp, device, asarray, backend) -> None:  # type: ignore[no-untyped-def]
    _, _shape, kwargs, _ = case
    layer = arraybn.BatchNormalization(**kwargs)
    reference = arraybn.BatchNormalization(**kwargs)
    outs = _run_steps(layer, asarray, case)
    ref_outs = _run_steps(reference, np.asarray, case)

    probe = asarray(np.zeros(1, np.float32))
    for y in outs:
        assert type(y) is type(probe), "the output is an array of the input's library"
        assert _same_device(y, probe), "the output is on the input's device"
    for name, w in zip(layer.weight_names, layer.weights, strict=True):
        assert type(w) is type(probe), f"{name} lives in the input's library"
        assert _same_device(w, probe), f"{name} lives on the input's device"

    exact = backend is Backend.NUMPY
    for i, (y, y_ref) in enumerate(zip(outs, ref_outs, strict=True)):
        assert_close(arraybn._namespace.to_numpy(y), y_ref, exact, f"output of step {i}")
    host = layer.get_weights()
    for name, w, w_ref in zip(layer.weight_names, host, reference.get_weights(), strict=True):
        assert isinstance(w, np.ndarray), f"get_weights()[{name}] is a NumPy host copy"
        assert_close(w, w_ref, exact, name)


def test_get_weights_are_host_copies(xp, asarray) -> None:  # type: ignore[no-untyped-def]
    layer = arraybn.BatchNormalization(fused=False)
    layer(asarray(_data((8, 3), 0)), training=True)
    first = layer.get_weights()
    assert all(isinstance(w, np.ndarray) for w in first)
    first[2][...] = 123.0  # writing into the copy does not touch the layer
    again = layer.get_weights()
    assert not np.any(again[2] == 123.0)


# ---------------------------------------------------------------------------
# array-api-strict on a second device: host reads trapped
# ---------------------------------------------------------------------------

_HOST_READS = ("__bool__", "__float__", "__int__", "__index__", "__complex__", "__array__", "__dlpack__")


@contextlib.contextmanager
def _strict_host_reads_trapped(monkeypatch: pytest.MonkeyPatch, home: Any) -> Iterator[list[str]]:
    """Make every host read of an array-api-strict array raise (and record it)."""
    from array_api_strict._array_object import Array

    seen: list[str] = []

    def trap(name: str):  # type: ignore[no-untyped-def]
        def raiser(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            seen.append(name)
            msg = f"host read {name} of an array on {self.device!r} inside the forward"
            raise AssertionError(msg)

        return raiser

    with monkeypatch.context() as m:
        for name in _HOST_READS:
            if hasattr(Array, name):
                m.setattr(Array, name, trap(name))
        original_to_device = Array.to_device

        def to_device(self, device, /, stream=None):  # type: ignore[no-untyped-def]
            if device != home:
                seen.append(f"to_device({device!r})")
                msg = f"to_device({device!r}) inside the forward: the arrays must stay on {home!r}"
                raise AssertionError(msg)
            return original_to_device(self, device, stream=stream)

        m.setattr(Array, "to_device", to_device)
        yield seen


@pytest.fixture
def strict_xp():  # type: ignore[no-untyped-def]
    xp, _ = _namespace(Backend.ARRAY_API_STRICT)
    return xp


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_strict_second_device_forward_stays_on_device(case, strict_xp, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    xp = strict_xp
    dev1 = xp.Device("device1")
    _, _shape, kwargs, _ = case
    layer = arraybn.BatchNormalization(**kwargs)
    reference = arraybn.BatchNormalization(**kwargs)
    with _strict_host_reads_trapped(monkeypatch, dev1) as seen:
        outs = _run_steps(layer, lambda a: xp.asarray(a, device=dev1), case)
    assert seen == []
    assert all(y.device == dev1 for y in outs)
    assert all(w.device == dev1 for w in layer.weights)
    ref_outs = _run_steps(reference, np.asarray, case)
    # array-api-strict computes with NumPy underneath, in the same order: identical
    for y, y_ref in zip(outs, ref_outs, strict=True):
        assert_close(arraybn._namespace.to_numpy(y), y_ref, True, "output")
    for w, w_ref in zip(layer.get_weights(), reference.get_weights(), strict=True):
        assert_close(w, w_ref, True, "weight")


def test_strict_trap_catches_host_reads(strict_xp, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The trap is real: a host read of a device1 array inside it fails."""
    xp = strict_xp
    dev1 = xp.Device("device1")
    a = xp.asarray([1.5], device=dev1)
    with _strict_host_reads_trapped(monkeypatch, dev1) as seen:
        with pytest.raises(AssertionError, match="host read"):
            float(a[0])
        with pytest.raises(AssertionError, match="host read"):
            bool(a[0] > 0)
        with pytest.raises(AssertionError, match="host read"):
            np.asarray(a)
        with pytest.raises(AssertionError, match="to_device"):
            a.to_device(xp.Device("CPU_DEVICE"))
    assert len(seen) == 4


@pytest.mark.parametrize("api_version", ["2023.12", "2024.12"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_strict_api_versions(case, api_version, strict_xp) -> None:  # type: ignore[no-untyped-def]
    """The core targets the 2024.12 standard and uses nothing newer than 2023.12."""
    xp = strict_xp
    _, _shape, kwargs, _ = case
    with xp.ArrayAPIStrictFlags(api_version=api_version):
        assert xp.__array_api_version__ == api_version
        layer = arraybn.BatchNormalization(**kwargs)
        outs = _run_steps(layer, xp.asarray, case)
        host_outs = [arraybn._namespace.to_numpy(y) for y in outs]
        weights = layer.get_weights()
    reference = arraybn.BatchNormalization(**kwargs)
    ref_outs = _run_steps(reference, np.asarray, case)
    for y, y_ref in zip(host_outs, ref_outs, strict=True):
        assert_close(y, y_ref, True, "output")
    for w, w_ref in zip(weights, reference.get_weights(), strict=True):
        assert_close(w, w_ref, True, "weight")


# ---------------------------------------------------------------------------
# torch: host reads trapped, the device of the input decides, torch.compile
# ---------------------------------------------------------------------------

TORCH_BACKENDS = [Backend.TORCH, Backend.TORCH_CUDA]
TORCH_IDS = ["torch", "torch_cuda"]


@contextlib.contextmanager
def _torch_host_reads_trapped() -> Iterator[list[str]]:
    import torch
    from torch.overrides import TorchFunctionMode

    bad = {
        torch.Tensor.item,
        torch.Tensor.__bool__,
        torch.Tensor.__float__,
        torch.Tensor.__int__,
        torch.Tensor.__index__,
        torch.Tensor.tolist,
        torch.Tensor.numpy,
        torch.Tensor.cpu,
        torch.Tensor.__array__,
    }
    seen: list[str] = []

    class Trap(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            if func in bad:
                seen.append(getattr(func, "__name__", str(func)))
                msg = f"host read {func} inside the forward"
                raise AssertionError(msg)
            if func is torch.Tensor.to and any("cpu" in str(a) for a in (*args[1:], *(kwargs or {}).values())):
                seen.append("to(cpu)")
                msg = "copy to the CPU inside the forward"
                raise AssertionError(msg)
            return func(*args, **(kwargs or {}))

    with Trap():
        yield seen


@pytest.mark.parametrize("backend", TORCH_BACKENDS, ids=TORCH_IDS)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_torch_forward_has_no_host_reads(case, xp, device, asarray) -> None:  # type: ignore[no-untyped-def]
    layer = arraybn.BatchNormalization(**case[2])
    with _torch_host_reads_trapped() as seen:
        outs = _run_steps(layer, asarray, case)
    assert seen == []
    assert all(y.device == device for y in outs)
    assert all(w.device == device for w in layer.weights)


def test_torch_trap_catches_host_reads() -> None:
    torch = pytest.importorskip("torch")
    t = torch.ones(2)
    with _torch_host_reads_trapped() as seen:
        for read in (lambda: float(t[0]), lambda: bool(t[0]), lambda: t[0].item(), lambda: np.asarray(t)):
            with pytest.raises(AssertionError, match="host read"):
                read()
    assert len(seen) == 4


@pytest.mark.parametrize("backend", TORCH_BACKENDS, ids=TORCH_IDS)
def test_torch_build_on_a_device_named_without_its_index(xp, device, asarray) -> None:  # type: ignore[no-untyped-def]
    """``build(device=torch.device("cuda"))`` puts the weights on ``cuda:0``; inputs there are accepted."""
    import torch

    named = torch.device("cpu", 0) if device.type == "cpu" else torch.device("cuda")
    assert named != asarray(np.zeros(1)).device  # the spelling differs from the tensors' device
    x = _data((8, 3), 0)
    layer = arraybn.BatchNormalization()
    layer.build(x.shape, xp=xp, device=named)
    y = layer(asarray(x), training=True)
    assert all(w.device == y.device for w in layer.weights)
    reference = arraybn.BatchNormalization()
    assert_close(y.cpu().numpy(), reference(x, training=True), False, "output")
    for w, w_ref in zip(layer.get_weights(), reference.get_weights(), strict=True):
        assert_close(w, w_ref, False, "weight")


def _counting_backend() -> tuple[Any, list[int]]:
    """A torch.compile backend that runs the captured graph as is and counts captures."""
    graphs: list[int] = []

    def backend(gm, example_inputs):  # type: ignore[no-untyped-def]
        graphs.append(len(gm.graph.nodes))
        return gm.forward

    return backend, graphs


@pytest.mark.filterwarnings(DYNAMO_LRU_WARNING)
@pytest.mark.parametrize("backend", TORCH_BACKENDS, ids=TORCH_IDS)
@pytest.mark.parametrize("fused", [False, True])
def test_torch_compile_functional_fullgraph(fused, xp, device, asarray) -> None:  # type: ignore[no-untyped-def]
    """``batch_norm`` compiles as one graph (``fullgraph=True``), training and inference."""
    import torch

    torch._dynamo.reset()
    shape = (8, 4, 4, 3)
    config = BNConfig(axis=(3,), rank=4, param_shape=(3,), fused=fused)
    params = BNParams(asarray(np.ones(3, np.float32)), asarray(np.zeros(3, np.float32)))
    state = BNState(asarray(np.zeros(3, np.float32)), asarray(np.ones(3, np.float32)))  # no aliasing with params
    compiler, graphs = _counting_backend()

    def step(x, params, state, training: bool):  # type: ignore[no-untyped-def]
        return batch_norm(x, params, state, training=training, config=config)

    compiled = torch.compile(step, fullgraph=True, backend=compiler)
    np_params = BNParams(np.ones(3, np.float32), np.zeros(3, np.float32))
    np_state = BNState(np.zeros(3, np.float32), np.ones(3, np.float32))
    for i, training in enumerate((True, True, True, False)):
        x = _data(shape, i)
        y, state = compiled(asarray(x), params, state, training)
        y_ref, np_state = batch_norm(x, np_params, np_state, training=training, config=config)
        assert_close(y.cpu().numpy(), y_ref, False, f"step {i}")
    for a, b in zip(state, np_state, strict=True):
        if a is not None:
            assert_close(a.cpu().numpy(), b, False, "state")
    assert len(graphs) == 2, "one graph for training, one for inference; no recompilation as the state changes"


@pytest.mark.filterwarnings(DYNAMO_LRU_WARNING)
@pytest.mark.parametrize("backend", TORCH_BACKENDS, ids=TORCH_IDS)
def test_torch_compile_layer_fullgraph(xp, device, asarray) -> None:  # type: ignore[no-untyped-def]
    """The stateful layer compiles too: Dynamo replays the weight update after the graph."""
    import torch

    torch._dynamo.reset()
    layer = arraybn.BatchNormalization(fused=False)
    reference = arraybn.BatchNormalization(fused=False)
    layer(asarray(_data((16, 3), 99)), training=True)  # build eagerly (weights created outside the graph)
    reference(_data((16, 3), 99), training=True)
    compiler, graphs = _counting_backend()
    compiled = torch.compile(lambda x, training: layer(x, training=training), fullgraph=True, backend=compiler)
    for i, training in enumerate((True, True, True, False, False)):
        x = _data((16, 3), i)
        y = compiled(asarray(x), training)
        assert_close(y.cpu().numpy(), reference(x, training=training), False, f"step {i}")
    for w, w_ref in zip(layer.get_weights(), reference.get_weights(), strict=True):
        assert_close(w, w_ref, False, "weight")
    assert len(graphs) == 2, f"expected one graph per training value, got {len(graphs)}"


@pytest.mark.filterwarnings(DYNAMO_LRU_WARNING)
@pytest.mark.parametrize("backend", TORCH_BACKENDS, ids=TORCH_IDS)
@pytest.mark.parametrize("shape", [(16, 3), (16, 2, 2, 3)], ids=["non-fused", "fused"])
def test_torch_compile_layer_with_a_dynamic_batch(shape, xp, device, asarray) -> None:  # type: ignore[no-untyped-def]
    """A batch marked dynamic: one graph serves every batch size (docs/backends.md names
    ``dynamic=True`` as the form that does not compile)."""
    import torch

    torch._dynamo.reset()
    layer, reference = arraybn.BatchNormalization(), arraybn.BatchNormalization()
    layer(asarray(_data(shape, 99)), training=True)
    reference(_data(shape, 99), training=True)
    compiler, graphs = _counting_backend()
    compiled = torch.compile(lambda x: layer(x, training=True), backend=compiler)
    for i, batch in enumerate((16, 12, 8, 20)):
        x = _data((batch, *shape[1:]), i)
        xt = asarray(x)
        torch._dynamo.mark_dynamic(xt, 0)
        assert_close(compiled(xt).cpu().numpy(), reference(x, training=True), False, f"batch {batch}")
    for w, w_ref in zip(layer.get_weights(), reference.get_weights(), strict=True):
        assert_close(w, w_ref, False, "weight")
    assert len(graphs) == 1, f"expected one graph for every batch size, got {len(graphs)}"


@pytest.mark.filterwarnings(DYNAMO_LRU_WARNING)
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("backend", TORCH_BACKENDS, ids=TORCH_IDS)
def test_torch_compile_inductor(xp, device, asarray) -> None:  # type: ignore[no-untyped-def]
    """The default backend (Inductor) generates code for the core; results agree with NumPy."""
    import torch

    torch._dynamo.reset()
    config = BNConfig(axis=(1,), rank=4, param_shape=(3,), fused=False)
    ones, zeros = (asarray(np.ones(3, np.float32)), asarray(np.zeros(3, np.float32)))
    compiled = torch.compile(
        lambda x, p, s: batch_norm(x, p, s, training=True, config=config), fullgraph=True, dynamic=False
    )
    x = _data((8, 3, 4, 4), 0)
    try:
        y, state = compiled(asarray(x), BNParams(ones, zeros), BNState(zeros, ones))
    except Exception as err:  # no C++ compiler / triton on this machine
        if "InductorError" in type(err).__name__ or "compiler" in str(err).lower():
            pytest.skip(f"Inductor cannot generate code here: {type(err).__name__}: {str(err)[:200]}")
        raise
    y_ref, s_ref = batch_norm(
        x,
        BNParams(np.ones(3, np.float32), np.zeros(3, np.float32)),
        BNState(np.zeros(3, np.float32), np.ones(3, np.float32)),
        training=True,
        config=config,
    )
    assert_close(y.cpu().numpy(), y_ref, False, "output")
    assert_close(state.moving_variance.cpu().numpy(), s_ref.moving_variance, False, "moving_variance")


# ---------------------------------------------------------------------------
# CuPy and torch CUDA: the forward never waits for the GPU
# ---------------------------------------------------------------------------

_SPIN_CYCLES = 3_000_000_000  # ~1.5-2 s of one GPU thread spinning at 1.5-2 GHz


def _gpu_probe(backend: Backend):  # type: ignore[no-untyped-def]
    """(queue a long kernel, is the current stream still busy?, synchronize) for a GPU backend."""
    if backend is Backend.CUPY:
        import cupy as cp

        spin = cp.RawKernel(
            r"""
            extern "C" __global__ void arraybn_spin(long long cycles) {
                long long start = clock64();
                while (clock64() - start < cycles) { }
            }
            """,
            "arraybn_spin",
        )

        def queue() -> None:
            spin((1,), (1,), (np.int64(_SPIN_CYCLES),))

        def busy() -> bool:
            return not cp.cuda.get_current_stream().done

        return queue, busy, cp.cuda.get_current_stream().synchronize
    import torch

    def queue_torch() -> None:
        torch.cuda._sleep(_SPIN_CYCLES)

    def busy_torch() -> bool:
        return not torch.cuda.current_stream().query()

    return queue_torch, busy_torch, torch.cuda.synchronize


@pytest.mark.gpu
@pytest.mark.parametrize("backend", [Backend.CUPY, Backend.TORCH_CUDA], ids=["cupy", "torch_cuda"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_gpu_forward_never_waits_for_the_device(case, backend, xp, device, asarray) -> None:  # type: ignore[no-untyped-def]
    """Queue ~2 s of GPU work, then run the forward: it must return while the GPU is still busy.

    Any host read (``float``, ``.item()``, ``bool``, a NumPy call, a copy to
    the host) or any synchronizing copy would make the forward wait for the
    queued kernel, and the stream would be idle when it returns.
    """
    queue, busy, synchronize = _gpu_probe(backend)
    layer = arraybn.BatchNormalization(**case[2])
    _run_steps(layer, asarray, case)  # warm-up: build, compile and cache every kernel
    queue()
    synchronize()
    inputs = [asarray(_data(case[1], 20 + i)) for i in range(3)]
    masks = [asarray(_mask(case[1], 30 + i)) if case[3] else None for i in range(3)]
    synchronize()
    queue()
    start = time.perf_counter()
    outs = [layer(x, training=t, mask=m) for x, t, m in zip(inputs, (True, True, False), masks, strict=True)]
    elapsed = time.perf_counter() - start
    still_busy = busy()
    synchronize()
    assert still_busy, (
        f"the forward waited for the GPU ({elapsed:.3f} s): a host read or a synchronizing copy "
        "(torch: run under torch.cuda.set_sync_debug_mode('warn') to see where)"
    )
    assert all(_same_device(y, inputs[0]) for y in outs)
    assert all(_same_device(w, inputs[0]) for w in layer.weights)


# ---------------------------------------------------------------------------
# Mixed namespaces and devices: clear errors, weights untouched
# ---------------------------------------------------------------------------


def _snapshot(layer: arraybn.BatchNormalization) -> tuple[list[Any], list[np.ndarray]]:
    return list(layer.weights), layer.get_weights()


def _assert_untouched(layer: arraybn.BatchNormalization, snap: tuple[list[Any], list[np.ndarray]]) -> None:
    objects, values = snap
    assert len(layer.weights) == len(objects)
    assert all(a is b for a, b in zip(layer.weights, objects, strict=True)), "weights were replaced"
    for a, b in zip(layer.get_weights(), values, strict=True):
        np.testing.assert_array_equal(a, b)


def _trained_layer(x: Any, **kwargs: Any) -> arraybn.BatchNormalization:
    layer = arraybn.BatchNormalization(fused=False, **kwargs)
    layer(x, training=True)
    return layer


@pytest.mark.parametrize("training", [True, False])
def test_numpy_layer_called_with_torch_raises_type_error(training) -> None:  # type: ignore[no-untyped-def]
    torch = pytest.importorskip("torch")
    layer = _trained_layer(_data((8, 3), 0))
    snap = _snapshot(layer)
    with pytest.raises(TypeError, match=r"numpy.*torch|torch.*numpy"):
        layer(torch.asarray(_data((8, 3), 1)), training=training)
    _assert_untouched(layer, snap)


def test_numpy_input_with_torch_mask_raises_type_error() -> None:
    torch = pytest.importorskip("torch")
    layer = _trained_layer(_data((8, 5, 3), 0))
    snap = _snapshot(layer)
    with pytest.raises(TypeError, match="one array library"):
        layer(_data((8, 5, 3), 1), training=True, mask=torch.ones((8, 5), dtype=torch.bool))
    _assert_untouched(layer, snap)


def test_inference_does_not_read_the_mask() -> None:
    # TF reads the mask in training only: in inference any mask, even another library's, is ignored
    torch = pytest.importorskip("torch")
    layer = _trained_layer(_data((8, 5, 3), 0))
    x = _data((8, 5, 3), 1)
    y = layer(x, training=False, mask=torch.zeros((8, 5), dtype=torch.bool))
    np.testing.assert_array_equal(np.asarray(y), np.asarray(layer(x, training=False)))


def test_torch_layer_with_numpy_mask_raises_type_error() -> None:
    torch = pytest.importorskip("torch")
    layer = _trained_layer(torch.asarray(_data((8, 5, 3), 0)))
    snap = _snapshot(layer)
    with pytest.raises(TypeError, match="one array library"):
        layer(torch.asarray(_data((8, 5, 3), 1)), training=True, mask=np.ones((8, 5), dtype=bool))
    _assert_untouched(layer, snap)


def test_unbuilt_layer_with_mixed_input_and_mask_stays_unbuilt() -> None:
    torch = pytest.importorskip("torch")
    layer = arraybn.BatchNormalization(fused=False)
    with pytest.raises(TypeError, match="one array library"):
        layer(_data((8, 5, 3), 1), training=True, mask=torch.ones((8, 5), dtype=torch.bool))
    assert not layer.built
    assert layer.weights == []


@pytest.mark.parametrize("training", [True, False])
def test_strict_input_on_another_device_raises_value_error(training, strict_xp) -> None:  # type: ignore[no-untyped-def]
    xp = strict_xp
    dev1 = xp.Device("device1")
    layer = _trained_layer(xp.asarray(_data((8, 3), 0), device=dev1))
    snap = _snapshot(layer)
    with pytest.raises(ValueError, match="device"):
        layer(xp.asarray(_data((8, 3), 1)), training=training)
    _assert_untouched(layer, snap)


@pytest.mark.parametrize("training", [True])  # inference does not read the mask (TF)
def test_strict_mask_on_another_device_raises_value_error(training, strict_xp) -> None:  # type: ignore[no-untyped-def]
    xp = strict_xp
    dev1 = xp.Device("device1")
    layer = _trained_layer(xp.asarray(_data((8, 5, 3), 0), device=dev1))
    snap = _snapshot(layer)
    with pytest.raises(ValueError, match="device"):
        layer(xp.asarray(_data((8, 5, 3), 1), device=dev1), training=training, mask=xp.ones((8, 5), dtype=xp.bool))
    _assert_untouched(layer, snap)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", [Backend.TORCH_CUDA], ids=["torch_cuda"])
def test_torch_device_mismatch_raises_value_error(xp, device) -> None:  # type: ignore[no-untyped-def]
    import torch

    cuda_layer = _trained_layer(torch.asarray(_data((8, 5, 3), 0), device=device))
    cpu_layer = _trained_layer(torch.asarray(_data((8, 5, 3), 0)))
    snaps = _snapshot(cuda_layer), _snapshot(cpu_layer)
    with pytest.raises(ValueError, match="device"):
        cuda_layer(torch.asarray(_data((8, 5, 3), 1)), training=True)
    with pytest.raises(ValueError, match="device"):
        cpu_layer(torch.asarray(_data((8, 5, 3), 1), device=device), training=True)
    with pytest.raises(ValueError, match="device"):
        cuda_layer(torch.asarray(_data((8, 5, 3), 1), device=device), training=True, mask=torch.ones((8, 5)))
    _assert_untouched(cuda_layer, snaps[0])
    _assert_untouched(cpu_layer, snaps[1])


# ---------------------------------------------------------------------------
# Autograd and the layer's state (torch)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [{}, {"renorm": True}, {"fused": True}], ids=["non-fused", "renorm", "fused"])
def test_torch_moving_statistics_stay_out_of_autograd(kwargs) -> None:  # type: ignore[no-untyped-def]
    """TF's moving averages are variable assignments: no gradient path from them back to a batch.
    A training call on an input that needs gradients must leave state without a graph, so that a
    later call can be differentiated on its own (before, the second backward raised "Trying to
    backward through the graph a second time")."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    shape = (8, 2, 2, 3) if kwargs.get("fused") else (8, 3)
    lin = torch.nn.Linear(shape[-1], shape[-1])
    layer = arraybn.BatchNormalization(**kwargs)
    layer(lin(torch.randn(*shape)), training=True).square().sum().backward()
    for name, w in zip(layer.weight_names, layer.weights, strict=True):
        assert w.grad_fn is None, name
        assert not w.requires_grad, name
    x = torch.randn(*shape, requires_grad=True)
    layer(lin(x), training=False).square().sum().backward()  # inference on the moving statistics
    g = x.grad.clone()
    # the same inference with the statistics copied into a fresh layer: the same gradient
    fresh = arraybn.BatchNormalization(**kwargs)
    fresh.build(shape, xp=torch)
    fresh.set_weights(layer.get_weights())
    x.grad = None
    fresh(lin(x), training=False).square().sum().backward()
    torch.testing.assert_close(x.grad, g, rtol=0, atol=0)


def test_torch_functional_state_is_detached() -> None:
    torch = pytest.importorskip("torch")
    config = BNConfig(axis=(1,), rank=2, param_shape=(3,), fused=False)
    x = torch.randn(8, 3, requires_grad=True)
    state = BNState(torch.zeros(3), torch.ones(3))
    y, new = batch_norm(x, BNParams(torch.ones(3), torch.zeros(3)), state, training=True, config=config)
    assert y.requires_grad
    assert not new.moving_mean.requires_grad
    assert not new.moving_variance.requires_grad
    _, same = batch_norm(x, BNParams(torch.ones(3), torch.zeros(3)), state, training=False, config=config)
    assert same.moving_mean is state.moving_mean  # nothing new in inference


def test_torch_layer_trained_under_inference_mode_trains_later() -> None:
    """Inference tensors cannot be saved for backward; torch.nn.BatchNorm's buffers stay normal
    tensors (updated in place), and so do the layer's (replaced by normal tensors)."""
    torch = pytest.importorskip("torch")
    layer = arraybn.BatchNormalization()
    with torch.inference_mode():
        layer(torch.randn(8, 5), training=True)  # built and updated under inference mode
        layer(torch.randn(8, 5), training=True)
    assert not any(w.is_inference() for w in layer.weights)
    x = torch.randn(8, 5, requires_grad=True)
    layer(x, training=True).square().sum().backward()
    assert x.grad is not None
    assert torch.isfinite(x.grad).all()


def test_torch_set_weights_copies_values_out_of_autograd() -> None:
    torch = pytest.importorskip("torch")
    layer = arraybn.BatchNormalization()
    layer.build((4, 3), xp=torch)
    gamma = torch.full((3,), 2.0, requires_grad=True)
    layer.set_weights([gamma, torch.zeros(3), torch.zeros(3), torch.ones(3)])
    assert not layer.gamma.requires_grad
    assert layer.gamma.grad_fn is None
    with torch.no_grad():
        gamma.mul_(3.0)  # the caller's tensor changes; the layer's copy does not
    np.testing.assert_array_equal(layer.get_weights()[0], np.full(3, 2.0, np.float32))


def test_build_takes_a_library_given_as_itself() -> None:
    """``build(shape, xp=numpy)`` (or ``torch``) means array-api-compat's namespace of that library:
    before, the weights were made with the bare module and every call failed its namespace check."""
    layer = arraybn.BatchNormalization()
    layer.build((4, 3), xp=np)
    x = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    np.testing.assert_array_equal(layer(x, training=True), arraybn.BatchNormalization()(x, training=True))
    torch = pytest.importorskip("torch")
    layer = arraybn.BatchNormalization()
    layer.build((4, 3), xp=torch)
    assert isinstance(layer(torch.asarray(x), training=True), torch.Tensor)


def test_backward_rejects_a_gradient_from_another_library() -> None:
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    layer = arraybn.BatchNormalization()
    _, ctx = layer.forward(x)
    with pytest.raises(TypeError, match="dy must be an array of the forward's library"):
        layer.backward(ctx, torch.ones(4, 3))
    tlayer = arraybn.BatchNormalization()
    _, tctx = tlayer.forward(torch.asarray(x))
    with pytest.raises(TypeError, match="dy must be an array of the forward's library"):
        tlayer.backward(tctx, np.ones((4, 3), np.float32))


def test_strict_set_weights_moves_to_the_layers_device(strict_xp) -> None:  # type: ignore[no-untyped-def]
    xp = strict_xp
    layer = arraybn.BatchNormalization()
    layer.build((4, 3), xp=xp)  # CPU_DEVICE
    other = xp.Device("device1")
    ws = [xp.asarray(np.full(3, v, np.float32), device=other) for v in (2.0, 0.5, 0.0, 1.0)]
    layer.set_weights(ws)
    assert all(array_device(w) == array_device(layer.moving_mean) for w in layer.weights)
    x = xp.asarray(np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32))
    y = layer(x, training=False)
    assert array_device(y) == array_device(x)
