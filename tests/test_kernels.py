"""The per-channel CUDA kernels (``arraybn/_kernels.cu``) without a GPU.

The kernel source also builds for the host with a C++ compiler (one thread
doing every element, the same rounded operations). Built that way it is run
here through the ``cupy-kernels`` schedule itself
(``arraybn._schedules.cupy_kernels.CupyKernels``), with NumPy standing in for
CuPy (its launcher, argument order and types checked against the kernels' C
signatures), and whole layers are compared **bit for bit** with the
reference's coefficients and scale-and-shift (the same sums on both sides):
fused and non-fused rules, float32 and float64, with and without gamma/beta,
training and inference, frozen layers, several axes, a 16-bit input, NaN and
infinities.

The CUDA build is checked with ``nvcc`` where the CUDA toolkit is installed:
it compiles, and no multiply-add was contracted into an FMA (which would round
once where the Array API code rounds twice). On a GPU, ``tests/test_accelerator.py``
runs the same kernels on CuPy.
"""

from __future__ import annotations

import contextlib
import ctypes
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import Backend, assert_close

import arraybn
from arraybn import _functional
from arraybn._namespace import array_device, array_namespace, to_numpy
from arraybn._reference import REFERENCE, Ops
from arraybn._schedules import cupy_kernels as _accelerator

SOURCE = Path(_accelerator.__file__).with_name("_kernels.cu")
KERNELS = ("arraybn_fused_coefficients", "arraybn_coefficients")


# ---------------------------------------------------------------------------
# The host build
# ---------------------------------------------------------------------------


def _signature(kernel: str) -> list[str]:
    """The C parameter types of ``kernel`` in ``_kernels.cu`` (``T`` for the element type)."""
    text = SOURCE.read_text().replace("\\\n", "\n")
    match = re.search(rf'extern "C" __global__ void {kernel}_##SUFFIX\((.*?)\)\s*\{{', text, re.DOTALL)
    assert match, f"{kernel} not found in {SOURCE.name}"
    params = [" ".join(p.split()) for p in match.group(1).split(",")]
    return [p.rsplit(" ", 1)[0].replace("const ", "") for p in params]


_SCALARS = {"long long": np.int64, "int": np.int32}


class _HostKernel:
    """A host-built kernel called like ``cupy.RawKernel``: ``kernel(grid, block, args)``.

    Each argument must have exactly the type its C parameter has (a pointer: a
    C-contiguous array of the element type; a scalar: that NumPy scalar type),
    since a GPU launch would reinterpret a mismatch without a word.
    """

    def __init__(self, library: ctypes.CDLL, name: str) -> None:
        base, suffix = name.rsplit("_", 1)
        self.element = np.float32 if suffix == "f32" else np.float64
        self.params = _signature(base)
        c_element = ctypes.c_float if suffix == "f32" else ctypes.c_double
        ctypes_of = {"long long": ctypes.c_longlong, "int": ctypes.c_int, "T": c_element, "T*": ctypes.c_void_p}
        self.function = getattr(library, name)
        self.function.restype = None
        self.function.argtypes = [ctypes_of[p] for p in self.params]
        self.calls = 0

    def __call__(self, grid: tuple[int, ...], block: tuple[int, ...], args: tuple[Any, ...]) -> None:
        assert len(grid) == len(block) == 1
        assert grid[0] >= 1
        assert block[0] >= 1
        assert len(args) == len(self.params), f"{len(args)} arguments for {len(self.params)} parameters"
        c_args = []
        for i, (param, arg) in enumerate(zip(self.params, args, strict=True)):
            if param == "T*":
                assert isinstance(arg, np.ndarray), f"argument {i}: an array for {param}, got {type(arg)}"
                assert arg.dtype == self.element, f"argument {i}: {arg.dtype} for {param}"
                assert arg.flags.c_contiguous, f"argument {i}: not contiguous"
                c_args.append(arg.ctypes.data)
            else:
                expected = self.element if param == "T" else _SCALARS[param]
                assert type(arg) is expected, f"argument {i}: {expected.__name__} for {param}, got {type(arg)}"
                c_args.append(arg.item())
        self.function(*c_args)
        self.calls += 1


@pytest.fixture(scope="module")
def host_library(tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    compiler = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if compiler is None:
        pytest.skip("no C++ compiler: the host build of _kernels.cu cannot be made")
    if sys.platform not in ("linux", "darwin"):
        pytest.skip("the host build of _kernels.cu is made as a Linux/macOS shared library")
    out = tmp_path_factory.mktemp("kernels") / "arraybn_kernels.so"
    # ISO C++ and no contraction: every + - * / is one IEEE operation, as __f*_rn / __d*_rn on the GPU
    cmd = [compiler, "-x", "c++", "-std=c++11", "-O2", "-ffp-contract=off", "-shared", "-fPIC"]
    subprocess.run([*cmd, "-o", str(out), str(SOURCE)], check=True, capture_output=True, text=True)
    return ctypes.CDLL(str(out))


def _elementwise(name: str) -> Any:
    """NumPy stand-ins for the CuPy elementwise kernels (bit-identical on CuPy: test_accelerator.py)."""
    if name == "centred_multiply_add":

        def centred_multiply_add(x: np.ndarray, c: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
            y = x - c
            y *= a
            y += b
            return y

        return centred_multiply_add
    if name == "multiply_add":

        def multiply_add(x: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
            y = x * a
            y += b
            return y

        return multiply_add

    def squared_difference(x: np.ndarray, s: np.ndarray, count: Any) -> np.ndarray:
        assert type(count) is x.dtype.type
        d = x - s / count
        return d * d

    return squared_difference


@pytest.fixture
def numpy_as_cupy(host_library: ctypes.CDLL, monkeypatch: pytest.MonkeyPatch) -> dict[str, _HostKernel]:
    """``arraybn._accelerator`` driving the host-built kernels with NumPy arrays in CuPy's place."""
    kernels: dict[str, _HostKernel] = {}

    def kernel(name: str) -> Any:
        if not name.startswith("arraybn_"):
            return _elementwise(name)
        if name not in kernels:
            kernels[name] = _HostKernel(host_library, name)
        return kernels[name]

    fake = types.ModuleType("cupy")
    fake.ndarray = type("ndarray", (), {})  # no NumPy array is one (array-api-compat's is_cupy_array)
    fake.empty = np.empty
    fake.ascontiguousarray = np.ascontiguousarray
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setattr(_accelerator, "_kernel", kernel)
    monkeypatch.setattr(_accelerator, "takes_kernels", lambda x, xp: x.dtype in (np.float32, np.float64) and x.size > 0)
    monkeypatch.setattr(_accelerator, "is_cupy_array", lambda a: isinstance(a, np.ndarray))
    monkeypatch.setattr(_accelerator, "_device_of", lambda x: contextlib.nullcontext())
    monkeypatch.setattr(_accelerator, "_ones", lambda n, x, xp: np.ones(n, x.dtype))
    monkeypatch.setattr(_functional, "select", lambda x, xp: _accelerator.CupyKernels())
    return kernels


class _SameSums(Ops):
    """The reference's coefficients and scale-and-shift on the cupy-kernels schedule's sums: what the
    kernels must reproduce bit for bit (the sums' order is the one thing a schedule may change)."""

    name = "reference with the cupy-kernels sums"
    sum = _accelerator.CupyKernels.sum
    moments = _accelerator.CupyKernels.moments


def _plain_context() -> Any:
    """A context in which calls take `_SameSums`."""
    mp = pytest.MonkeyPatch()
    mp.setattr(_functional, "select", lambda x, xp: _SameSums())
    return contextlib.closing(_Undo(mp))


class _Undo:
    def __init__(self, mp: pytest.MonkeyPatch) -> None:
        self.mp = mp

    def close(self) -> None:
        self.mp.undo()


# ---------------------------------------------------------------------------
# Whole layers: the kernels' path against the Array API code, bit for bit
# ---------------------------------------------------------------------------


def _data(shape: tuple[int, ...], seed: int, dtype: Any, mean: float = 0.3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * rng.uniform(0.5, 3.0, size=shape[-1]) + mean).astype(dtype)


def _assert_same_bits(a: Any, b: Any, what: str) -> None:
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype, what
    np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8), err_msg=what)


def _assert_same_layers(fast: Any, plain: Any, what: str) -> None:
    assert fast.weight_names == plain.weight_names
    for name, w, ref in zip(fast.weight_names, fast.get_weights(), plain.get_weights(), strict=True):
        _assert_same_bits(w, ref, f"{what}: {name}")


def _steps(
    kwargs: dict[str, Any],
    shape: tuple[int, ...],
    dtype: Any,
    launches: Any,
    *,
    asarray: Any = np.asarray,
    weights: list[np.ndarray] | None = None,
    inputs: list[np.ndarray] | None = None,
    call_kwargs: dict[str, Any] | None = None,
) -> None:
    """Train twice, then infer, with the kernels and with the Array API code; same bits every time.

    ``launches()`` counts the per-channel kernel launches so far: one per call.
    The weights start random (``weights`` where given): gamma 1, beta 0 and the
    initial moving statistics would hide operations done in another order.
    """
    call_kwargs = call_kwargs or {}
    fast = arraybn.BatchNormalization(**kwargs)
    plain = arraybn.BatchNormalization(**kwargs)
    inputs = inputs or [_data(shape, seed, dtype, mean=seed) for seed in range(3)]
    first = asarray(inputs[0])
    for layer in (fast, plain):
        layer.build(shape, xp=array_namespace(first), device=array_device(first))
    if weights is None:
        rng = np.random.default_rng(11)
        weights = [rng.uniform(0.25, 2.0, w.shape).astype(w.dtype) for w in fast.get_weights()]
    fast.set_weights(weights)
    plain.set_weights(weights)
    for step, (x, training) in enumerate(zip(inputs, (True, True, False), strict=True)):
        before = launches() if launches is not None else 0
        y = fast(asarray(x), training=training, **call_kwargs)
        if launches is not None:
            assert launches() == before + 1, "the kernel path was not taken"
        with _plain_context():  # the reference's arithmetic on the same sums
            y_plain = plain(asarray(x), training=training, **call_kwargs)
        _assert_same_bits(to_numpy(y), to_numpy(y_plain), f"output, step {step}")
        _assert_same_layers(fast, plain, f"step {step}")


def _host_launches(kernels: dict[str, _HostKernel]) -> Any:
    return lambda: sum(k.calls for k in kernels.values())


CASES = [
    ({"axis": -1}, (8, 5, 5, 16)),  # fused (4-D, channels last)
    ({"axis": 1}, (8, 16, 5, 5)),  # fused, channels in the middle
    ({"axis": -1, "fused": False}, (8, 5, 5, 16)),
    ({"axis": -1}, (300, 24)),  # rank 2: non-fused
    ({"axis": 1}, (6, 10, 7)),  # rank 3: non-fused
    ({"axis": [1, 3], "fused": False}, (4, 3, 5, 6)),  # several axes: the weights are (1, 3, 1, 6)
    ({"axis": -1, "center": False}, (8, 5, 5, 16)),
    ({"axis": -1, "scale": False}, (8, 5, 5, 16)),
    ({"axis": -1, "center": False, "scale": False, "fused": False}, (64, 12)),
    ({"axis": -1, "trainable": False}, (8, 5, 5, 16)),
    ({"axis": -1, "trainable": False, "fused": False}, (64, 12)),
    ({"axis": -1, "momentum": 0.5, "epsilon": 0.37}, (8, 5, 5, 16)),
    ({"axis": -1, "momentum": 0.5, "epsilon": 0.37}, (64, 12)),
    ({"axis": -1, "epsilon": 0.0}, (3, 1, 1, 4)),  # n = 3 with a zero-variance channel below
]


@pytest.mark.parametrize(("kwargs", "shape"), CASES, ids=[f"{k}-{s}" for k, s in CASES])
def test_kernels_give_the_array_api_bits_float32(kwargs, shape, numpy_as_cupy) -> None:  # type: ignore[no-untyped-def]
    inputs = None
    if shape == (3, 1, 1, 4):
        x = _data(shape, 0, np.float32)
        x[:, ..., 0] = 2.5  # variance 0 with epsilon 0: scale inf, shift NaN
        inputs = [x, _data(shape, 1, np.float32), x]
    _steps(kwargs, shape, np.float32, _host_launches(numpy_as_cupy), inputs=inputs)


@pytest.mark.parametrize(
    ("kwargs", "shape"),
    [
        ({"axis": -1}, (300, 24)),
        ({"axis": 1, "fused": False}, (8, 16, 5, 5)),
        ({"axis": -1, "center": False}, (64, 12)),
    ],
)
def test_kernels_give_the_array_api_bits_float64(kwargs, shape, numpy_as_cupy) -> None:  # type: ignore[no-untyped-def]
    _steps({**kwargs, "dtype": "float64"}, shape, np.float64, _host_launches(numpy_as_cupy))


def test_float64_policy_on_the_fused_kernel_shape_stays_non_fused(numpy_as_cupy) -> None:  # type: ignore[no-untyped-def]
    # TF: fused=None with float64 falls back to the non-fused rule; the float64 kernel of that rule runs
    _steps({"axis": -1, "dtype": "float64"}, (8, 5, 5, 16), np.float64, _host_launches(numpy_as_cupy))
    assert set(numpy_as_cupy) == {"arraybn_coefficients_f64"}


def test_mixed_float16_input_is_computed_in_float32_by_the_kernels(numpy_as_cupy) -> None:  # type: ignore[no-untyped-def]
    for kwargs in ({"axis": -1}, {"axis": -1, "fused": False}):
        _steps({**kwargs, "dtype": "mixed_float16"}, (8, 5, 5, 16), np.float16, _host_launches(numpy_as_cupy))
    assert set(numpy_as_cupy) == {"arraybn_fused_coefficients_f32", "arraybn_coefficients_f32"}


def test_special_values_keep_their_bits(numpy_as_cupy) -> None:  # type: ignore[no-untyped-def]
    """NaN and infinities in the input and in the weights; a negative moving variance (NaN scale)."""
    shape = (16, 1, 1, 6)  # 4-D: the fused rule for axis=-1
    x = _data(shape, 3, np.float32)
    x[2, ..., 0], x[5, ..., 1], x[7, ..., 2] = np.nan, np.inf, -np.inf
    c = shape[-1]
    gamma = np.array([1.0, -2.0, np.inf, 0.0, 3.0, np.nan], np.float32)
    beta = np.array([0.0, np.nan, 1.0, -np.inf, -0.0, 2.0], np.float32)
    moving_mean = np.array([np.inf, 0.0, -1.0, 1e30, 2.0, -0.0], np.float32)
    moving_variance = np.array([1.0, -1.0, 0.0, np.inf, 1e-30, 4.0], np.float32)
    weights = [gamma, beta, moving_mean, moving_variance]
    assert all(w.shape == (c,) for w in weights)
    for kwargs in ({"axis": -1}, {"axis": -1, "fused": False}):
        _steps(kwargs, shape, np.float32, _host_launches(numpy_as_cupy), weights=weights, inputs=[x, x[::-1].copy(), x])


def test_matmul_sums_agree_with_the_reduction(numpy_as_cupy) -> None:  # type: ignore[no-untyped-def]
    """Channels-last CuPy data of 1 MiB and more is summed by a matrix-vector product: whole layers
    agree with the reduction's sums to the rounding of the sums' order."""
    # 1 MiB channels last: the matmul sums; and channels in the middle as many as the last axis
    # (the last axis is reduced there: no matmul sums even where they are offered)
    for shape, kwargs in [
        ((4096, 64), {"axis": -1}),
        ((4096, 64), {"axis": -1, "fused": False}),
        ((64, 8, 16, 8), {"axis": 1}),
    ]:
        fast, plain = arraybn.BatchNormalization(**kwargs), arraybn.BatchNormalization(**kwargs)
        for step in range(2):
            x = _data(shape, step, np.float32, mean=100.0)
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(_accelerator, "uses_matmul_sums", lambda x, channel, xp: True)
                y = fast(x, training=True)
            with _plain_context():
                y_plain = plain(x, training=True)
            assert_close(y, y_plain, False, f"{kwargs}, step {step}")
            for w, ref in zip(fast.get_weights(), plain.get_weights(), strict=True):
                assert_close(w, ref, False, f"{kwargs}, step {step}: weights")


def test_renorm_ghost_batches_masks_and_adjustments_keep_the_bits(numpy_as_cupy) -> None:  # type: ignore[no-untyped-def]
    """Where the per-channel kernel computes only the output's coefficients (renorm, masks and
    adjustments move the statistics their own way) or nothing (a ghost batch's statistics per ghost
    batch), the layers still give the reference's bits."""
    shape = (8, 4, 4, 6)
    for kwargs, extra in [
        ({"renorm": True, "renorm_clipping": {"rmax": 1.5, "dmax": 0.5}}, {}),
        ({"virtual_batch_size": 4}, {}),
        ({"fused": False}, {"mask": np.arange(128).reshape(8, 4, 4) % 3 > 0}),
        ({"adjustment": lambda shape: (0.5, 0.25)}, {}),
    ]:
        _steps(kwargs, shape, np.float32, None, call_kwargs=extra)
    assert numpy_as_cupy  # the kernel ran


def test_no_kernel_for_what_the_kernels_do_not_cover(numpy_as_cupy) -> None:  # type: ignore[no-untyped-def]
    """The fused rule is float32 only (TF's kernel): float64 vectors take the reference's arithmetic;
    so does a momentum that is no Python number (TF's assign_sub form on the fused path)."""
    v = np.ones((1, 1, 1, 6))
    c = _accelerator.CupyKernels().coefficients("fused", v, v, v, v, 1e-3, None, array_namespace(v))
    assert c.scale.dtype == np.float64
    layer = arraybn.BatchNormalization(momentum=np.float32(0.9))
    layer(_data((8, 4, 4, 6), 0, np.float32), training=True)
    assert layer.fused and not numpy_as_cupy


def test_host_kernels_pass_the_goldens(numpy_as_cupy) -> None:  # type: ignore[no-untyped-def]
    """TensorFlow's golden cases with the kernels' path taken wherever it applies.

    Every 3rd forward case (about 2700): the kernels' path is bit-identical to
    the Array API code above, and this checks it against TensorFlow over the
    whole argument grid, errors and state included.
    """
    from conformance import runner

    summary = runner.run(xp=array_namespace(np.empty(0)), progress=False, stride=3)
    assert summary.outcomes, "no cases ran"
    assert not summary.failures, summary.failure_text(limit=40)
    assert _host_launches(numpy_as_cupy)() > 1000  # the kernels did run


# ---------------------------------------------------------------------------
# On a GPU: the CUDA build through CuPy, the same comparisons
# ---------------------------------------------------------------------------

GPU_CASES = [
    *CASES,
    ({"axis": -1}, (16, 28, 28, 64)),  # 3 MiB channels last: the matmul sums
    ({"axis": -1}, (64, 32, 32, 8)),  # n = 65536: CuPy 13 would make float32 / n float64 from here
    ({"axis": -1, "fused": False}, (70000, 8)),
    ({"axis": -1, "fused": False}, (2048, 256)),
    ({"axis": -1, "fused": False, "dtype": "float64"}, (1024, 128)),
    ({"axis": -1, "dtype": "mixed_float16"}, (8, 5, 5, 16)),
]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", [Backend.CUPY], ids=["cupy"])
@pytest.mark.parametrize(("kwargs", "shape"), GPU_CASES, ids=[f"{k}-{s}" for k, s in GPU_CASES])
def test_cupy_kernels_give_the_array_api_bits(kwargs, shape, asarray, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """On CuPy both paths take the same sums (matmul or CuPy's reduction): every bit agrees."""
    launched: list[str] = []
    original = _accelerator._kernel

    def counting(name: str) -> Any:
        kernel = original(name)
        if not name.startswith("arraybn_"):
            return kernel
        return lambda *args: (launched.append(name), kernel(*args))[1]

    monkeypatch.setattr(_accelerator, "_kernel", counting)
    dtype = {"float64": np.float64, "mixed_float16": np.float16}.get(kwargs.get("dtype"), np.float32)
    inputs = None
    if shape == (3, 1, 1, 4):
        x = _data(shape, 0, np.float32)
        x[:, ..., 0] = 2.5
        inputs = [x, _data(shape, 1, np.float32), x]
    _steps(kwargs, shape, dtype, lambda: len(launched), asarray=asarray, inputs=inputs)


# ---------------------------------------------------------------------------
# The CUDA build
# ---------------------------------------------------------------------------


def test_kernel_source_compiles_for_the_gpu_without_contractions(tmp_path: Path) -> None:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("no nvcc (CUDA toolkit): the CUDA build of _kernels.cu is checked on machines that have one")
    ptx = tmp_path / "kernels.ptx"
    # CuPy compiles with -ftz=true (its own ufuncs too): the check covers what it builds
    subprocess.run(
        [nvcc, "-arch=sm_80", "-ftz=true", "--ptx", "-o", str(ptx), str(SOURCE)], check=True, capture_output=True
    )
    text = ptx.read_text()
    entries = re.findall(r"\.entry (\w+)\(", text)
    assert sorted(entries) == sorted(f"{k}_{s}" for k in KERNELS for s in ("f32", "f64"))
    assert not re.search(r"\bfma\.", text), "a multiply-add was contracted into an FMA"


@pytest.mark.parametrize(("kwargs", "shape"), [({"axis": -1}, (8, 5, 5, 16)), ({"axis": -1}, (300, 24))])
def test_kernels_that_fail_fall_back_to_the_reference_with_one_warning(kwargs, shape, numpy_as_cupy, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A GPU where the kernels do not compile or launch: the first call still succeeds, in the reference."""
    from arraybn import _schedules

    monkeypatch.setattr(_schedules, "_DISABLED", {})

    def broken(name: str) -> Any:
        raise RuntimeError("nvrtc: error: compilation failed (simulated)")

    monkeypatch.setattr(_accelerator, "_kernel", broken)
    x, dy = _data(shape, 0, np.float32), _data(shape, 1, np.float32)
    fast = arraybn.BatchNormalization(**kwargs)
    with pytest.warns(RuntimeWarning, match="'cupy-kernels' schedule failed .*simulated") as caught:
        y1 = fast(x, training=True)
        y2 = fast(x, training=False)
        grads = arraybn.batch_norm_vjp(x, *_weights_of(fast), dy, training=True, config=fast._config)
    assert len([w for w in caught if issubclass(w.category, RuntimeWarning)]) == 1
    assert "cupy-kernels" in _schedules.disabled()
    plain = arraybn.BatchNormalization(**kwargs)
    with monkeypatch.context() as m:
        m.setattr(_functional, "select", lambda x, xp: REFERENCE)
        want1, want2 = plain(x, training=True), plain(x, training=False)
        want_grads = arraybn.batch_norm_vjp(x, *_weights_of(plain), dy, training=True, config=plain._config)
    _assert_same_bits(y1, want1, "training output")
    _assert_same_bits(y2, want2, "inference output")
    _assert_same_layers(fast, plain, "state")
    for got, want in zip(grads, want_grads, strict=True):
        _assert_same_bits(got, want, "gradient")
    assert not numpy_as_cupy  # no kernel ran


def _weights_of(layer: Any) -> tuple[Any, Any]:
    return arraybn.BNParams(layer.gamma, layer.beta), arraybn.BNState(layer.moving_mean, layer.moving_variance)
