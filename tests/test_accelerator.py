"""The GPU schedule (``cupy-kernels``, ``arraybn._schedules.cupy_kernels``): same results as the reference.

* ``channel_sums`` / ``channel_raw_moments`` are plain Array API code: they are
  checked on every CPU backend against a float64 reference (CuPy runs the
  same checks when present), including inputs with a large mean;
* which arrays take the schedule is decided from types, shapes and settings
  only (CuPy alone; the sums not where ``matmul`` would run in TF32);
* on CuPy, the one-pass kernels are bit-identical to ``y = x * a; y += b``
  and to ``d = x - m; d * d``;
* the per-channel kernels (``_kernels.cu``) are checked bit for bit in
  tests/test_kernels.py, on the host build and on CuPy;
* on CuPy and torch CUDA, whole layers (forward and backward) on large
  inputs match NumPy, and on CuPy the TensorFlow goldens pass with the size
  threshold removed, so that every case takes the schedule.

GPU-only tests skip without a GPU and say so.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from conftest import EPS32, Backend, assert_close

import arraybn
from arraybn._schedules import cupy_kernels as _accelerator
from arraybn._namespace import to_numpy

GPU_BACKENDS = [Backend.CUPY, Backend.TORCH_CUDA]
GPU_IDS = ["cupy", "torch_cuda"]
SCHEDULE_BACKENDS = [Backend.NUMPY, Backend.TORCH, Backend.ARRAY_API_STRICT, Backend.CUPY]
SCHEDULE_IDS = ["numpy", "torch", "array_api_strict", "cupy"]

# channels last (the layouts the matmul sums serve): NHWC, 2-D, 3-D, one channel
SHAPES = [
    ((8, 14, 14, 32), 3),
    ((512, 96), 1),
    ((6, 50, 7), 2),
    ((4096, 1), 1),
]


def _data(shape: tuple[int, ...], seed: int, dtype: Any = np.float32, mean: float = 0.5) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * 2.0 + mean).astype(dtype)


def _reference(x: np.ndarray, channel: int) -> tuple[np.ndarray, np.ndarray]:
    axes = tuple(i for i in range(x.ndim) if i != channel)
    xd = x.astype(np.float64)
    mean = xd.mean(axis=axes)
    kept = tuple(-1 if i == channel else 1 for i in range(x.ndim))
    return mean, ((xd - mean.reshape(kept)) ** 2).mean(axis=axes)


@pytest.mark.parametrize("backend", SCHEDULE_BACKENDS, ids=SCHEDULE_IDS)
@pytest.mark.parametrize(("shape", "channel"), SHAPES, ids=[str(s) for s, _ in SHAPES])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_channel_moments_match_float64_two_pass(shape, channel, dtype, xp, asarray) -> None:  # type: ignore[no-untyped-def]
    x = _data(shape, 1, dtype, mean=1000.0)  # a large mean: the second pass must be centred
    sums = to_numpy(_accelerator.channel_sums(asarray(x), channel, xp))
    raw_sums, squares, n = _accelerator.channel_raw_moments(asarray(x), channel, xp)
    mean, variance = to_numpy(raw_sums / float(n)), to_numpy(squares / float(n))
    ref_mean, ref_var = _reference(x, channel)
    assert sums.dtype == mean.dtype == variance.dtype == dtype
    eps = float(np.finfo(dtype).eps)
    n = x.size // x.shape[channel]
    np.testing.assert_allclose(sums, ref_mean * n, rtol=64 * eps)
    np.testing.assert_allclose(mean, ref_mean, rtol=64 * eps)
    # the variance (about 4) of values near 1000, centred before squaring: float32 rounding
    # stays near 1e-6 relative; a one-pass formula or a Bessel-corrected divisor (n - 1) would
    # be off by 1e-2 and by 1/n >= 2.4e-4
    np.testing.assert_allclose(variance, ref_var, rtol=1e-4 if dtype == np.float32 else 1e-9)


@pytest.mark.parametrize(
    "backend", [Backend.NUMPY, Backend.TORCH, Backend.ARRAY_API_STRICT], ids=["numpy", "torch", "array_api_strict"]
)
def test_cpu_arrays_never_take_the_schedule(xp, asarray) -> None:  # type: ignore[no-untyped-def]
    big = asarray(np.ones((1024, 512), np.float32))  # 2 MiB, channels last
    row = asarray(np.ones((1, 512), np.float32))
    assert not _accelerator.takes_kernels(big, xp)
    assert not _accelerator.uses_matmul_sums(big, 1, xp)
    assert _accelerator.multiply_add(big, row, row, xp) is None
    np.testing.assert_array_equal(to_numpy(_accelerator.squared_difference(big, row * 3, xp)), 4.0)


# ---------------------------------------------------------------------------
# GPUs
# ---------------------------------------------------------------------------

LARGE = [((16, 28, 28, 64), -1, {}), ((16, 64, 28, 28), 1, {"axis": 1}), ((2048, 256), -1, {"fused": False})]
LARGE_IDS = ["nhwc", "nchw", "2d-nonfused"]


@pytest.mark.parametrize("backend", [Backend.CUPY], ids=["cupy"])
def test_cupy_takes_the_schedule_where_it_pays(xp, asarray, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    nhwc = asarray(np.zeros((16, 28, 28, 64), np.float32))
    assert _accelerator.takes_kernels(nhwc, xp)
    assert _accelerator.uses_matmul_sums(nhwc, 3, xp)
    assert not _accelerator.uses_matmul_sums(asarray(np.zeros((16, 64, 28, 28), np.float32)), 1, xp)  # NCHW
    assert not _accelerator.uses_matmul_sums(asarray(np.zeros((512, 1024), np.float32)), 1, xp)  # long rows
    small = asarray(np.zeros((16, 16), np.float32))
    assert _accelerator.takes_kernels(small, xp)  # the kernels at any size (fewer launches)
    assert not _accelerator.uses_matmul_sums(small, 1, xp)  # the matmul sums from 1 MiB
    assert not _accelerator.takes_kernels(asarray(np.zeros((1024, 512), np.float16)), xp)
    assert not _accelerator.takes_kernels(asarray(np.zeros((0, 16), np.float32)), xp)  # empty
    monkeypatch.setenv("CUPY_TF32", "1")  # matmul in TF32 would round the summands to 10 bits
    assert not _accelerator.uses_matmul_sums(nhwc, 3, xp)
    monkeypatch.setenv("ARRAYBN_CUDA_KERNELS", "0")  # the user's switch: the Array API code
    assert not _accelerator.takes_kernels(nhwc, xp)
    assert _accelerator.multiply_add(nhwc, nhwc, nhwc, xp) is None


def test_the_kernel_switch_is_read_on_every_call(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """``ARRAYBN_CUDA_KERNELS=0`` keeps every array off the CuPy kernels (checked with NumPy
    arrays taken for CuPy ones: the decision reads types, shapes and the switch only)."""
    monkeypatch.setattr(_accelerator, "is_cupy_array", lambda x: isinstance(x, np.ndarray))
    x = np.ones((4, 3), np.float32)
    assert _accelerator.takes_kernels(x, np)
    monkeypatch.setenv("ARRAYBN_CUDA_KERNELS", "0")
    assert not _accelerator.takes_kernels(x, np)
    assert _accelerator.multiply_add(x, x, x, np) is None
    monkeypatch.setenv("ARRAYBN_CUDA_KERNELS", "1")
    assert _accelerator.takes_kernels(x, np)


@pytest.mark.parametrize("backend", [Backend.CUPY], ids=["cupy"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cupy_kernels_round_like_the_separate_operations(dtype, xp, asarray) -> None:  # type: ignore[no-untyped-def]
    x = asarray(_data((64, 32, 16, 16), 2, dtype))
    a = asarray(_data((1, 32, 1, 1), 3, dtype))
    b = asarray(_data((1, 32, 1, 1), 4, dtype))
    y = _accelerator.multiply_add(x, a, b, xp)
    assert y is not None
    expected = x * a
    expected += b
    np.testing.assert_array_equal(to_numpy(y), to_numpy(expected))
    d = _accelerator.squared_difference(x, a, xp)
    expected = x - a
    expected = expected * expected
    np.testing.assert_array_equal(to_numpy(d), to_numpy(expected))


@pytest.mark.parametrize("backend", GPU_BACKENDS, ids=GPU_IDS)
@pytest.mark.parametrize(("shape", "axis", "kwargs"), LARGE, ids=LARGE_IDS)
def test_gpu_layer_matches_numpy_on_large_inputs(shape, axis, kwargs, xp, asarray) -> None:  # type: ignore[no-untyped-def]
    kwargs = {"axis": axis, **kwargs}
    layer, reference = arraybn.BatchNormalization(**kwargs), arraybn.BatchNormalization(**kwargs)
    for step, training in enumerate((True, True, False)):
        x = _data(shape, step)
        y = layer(asarray(x), training=training)
        assert_close(to_numpy(y), reference(x, training=training), False, f"output, step {step}")
    for w, w_ref in zip(layer.get_weights(), reference.get_weights(), strict=True):
        assert_close(w, w_ref, False, "weight")
    # the backward's channel sums take the same schedule
    x, dy = _data(shape, 5), _data(shape, 6)
    y, ctx = layer.forward(asarray(x), training=True)
    dx, grads = layer.backward(ctx, asarray(dy))
    y_ref, ctx_ref = reference.forward(x, training=True)
    dx_ref, grads_ref = reference.backward(ctx_ref, dy)
    assert_close(to_numpy(y), y_ref, False, "forward's output")
    assert_close(to_numpy(dx), dx_ref, False, "dx")
    for name, g in grads.items():
        ref = grads_ref[name]
        scale = max(1.0, float(np.max(np.abs(ref))))
        # a sum over n = 10^5 terms: float32 rounding grows with the order of the additions
        np.testing.assert_allclose(to_numpy(g), ref, rtol=64 * EPS32, atol=64 * EPS32 * scale, err_msg=name)


@pytest.mark.parametrize("backend", [Backend.CUPY], ids=["cupy"])
def test_cupy_schedule_passes_the_goldens(backend, xp, device, backend_name, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Golden cases through the GPU schedule (they are all below its size threshold).

    Every 4th case of each group (about 2000): the whole set runs through the
    plain path in test_conformance.py already; ``python -m conformance`` with
    ``arraybn._schedules.cupy_kernels._MIN_BYTES = 0`` runs them all (docs/performance.md).
    """
    from conformance import runner

    monkeypatch.setattr(_accelerator, "_MIN_BYTES", 0)
    summary = runner.run(xp=xp, device=device, progress=False, stride=4)
    assert summary.outcomes, "no cases ran"
    assert not summary.failures, summary.failure_text(limit=40)
