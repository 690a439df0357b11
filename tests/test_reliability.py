"""Reliability: copying and pickling a layer, a failed lazy computation, threads sharing a layer.

* ``copy.deepcopy`` and ``pickle`` work on every namespace whose arrays pickle: the layer stores its
  namespace by name and resolves it again on load; the copy's state equals the original's and
  continued training gives identical outputs and weights.
* A dask graph that raises part-way (one chunk of the input fails) cannot poison the layer: the
  error reaches the user when the step is computed (and once more from ``get_weights``), after
  which the layer holds its last good state and computes again as a NumPy layer that never saw
  the bad batch.
* Threads that share one layer: every state a reader sees is one that some call produced, never a
  mix of two calls (updates may be lost, as in TensorFlow).
"""

from __future__ import annotations

import copy
import pickle
import threading
from typing import Any

import numpy as np
import pytest
from conftest import Backend, _namespace

import arraybn

BACKENDS = [Backend.NUMPY, Backend.ARRAY_API_STRICT, Backend.TORCH, Backend.DASK, Backend.JAX]


def _xp(backend: Backend) -> Any:
    xp, _ = _namespace(backend, dedicated=True)
    return xp


def _data(shape: tuple[int, ...], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.integers(-8, 9, size=shape) / 4.0).astype(np.float32)


def _host(a: Any) -> np.ndarray:
    return np.asarray(a.compute() if hasattr(a, "compute") else a)


KWARGS = [
    {},
    {"axis": 1, "renorm": True, "renorm_clipping": {"rmax": 2.0}, "gamma_regularizer": "l2"},
    {"fused": True, "beta_constraint": "non_neg", "momentum": 0.5},
]


@pytest.mark.parametrize("kwargs", KWARGS, ids=["default", "renorm", "fused"])
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("backend", BACKENDS, ids=[b.value for b in BACKENDS])
def test_copy_and_pickle_keep_state_and_training(backend, how, kwargs) -> None:  # type: ignore[no-untyped-def]
    xp = _xp(backend)
    shape = (4, 3, 2, 5)
    layer = arraybn.BatchNormalization(**kwargs)
    for seed in (0, 1):
        layer(xp.asarray(_data(shape, seed)), training=True)
    layer.apply_constraints()
    clone = copy.deepcopy(layer) if how == "deepcopy" else pickle.loads(pickle.dumps(layer))
    assert clone is not layer and clone.built
    assert clone.weight_names == layer.weight_names
    for a, b in zip(clone.get_weights(), layer.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert clone.get_config() == layer.get_config()
    assert type(clone.weights[0]) is type(layer.weights[0])
    # continued training: identical outputs, weights and losses
    for seed in (2, 3):
        x = xp.asarray(_data(shape, seed))
        np.testing.assert_array_equal(_host(clone(x, training=True)), _host(layer(x, training=True)))
    x = xp.asarray(_data(shape, 4))
    np.testing.assert_array_equal(_host(clone(x, training=False)), _host(layer(x, training=False)))
    for a, b in zip(clone.get_weights(), layer.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert [float(_host(v)) for v in clone.losses] == [float(_host(v)) for v in layer.losses]
    # the copy is independent
    clone(xp.asarray(_data(shape, 5)), training=True)
    assert not np.array_equal(clone.get_weights()[2], layer.get_weights()[2])


def test_unbuilt_layer_copies_and_builds_in_another_namespace() -> None:
    layer = arraybn.BatchNormalization(momentum=0.5)
    clone = pickle.loads(pickle.dumps(layer))
    assert not clone.built and clone.momentum == 0.5
    x = _data((4, 3), 0)
    np.testing.assert_array_equal(np.asarray(clone(x, training=True)), np.asarray(layer(x, training=True)))


def test_deepcopy_of_a_layer_with_an_adjustment_shares_the_function() -> None:
    def adjustment(shape: tuple[int, ...]) -> tuple[float, float]:
        return 1.5, 0.25

    layer = arraybn.BatchNormalization(adjustment=adjustment)
    layer(_data((4, 3), 0), training=True)
    clone = copy.deepcopy(layer)
    assert clone.adjustment is adjustment
    x = _data((4, 3), 1)
    np.testing.assert_array_equal(np.asarray(clone(x, training=True)), np.asarray(layer(x, training=True)))


# ---------------------------------------------------------------------------
# A dask computation that fails part-way
# ---------------------------------------------------------------------------


class ChunkFailed(RuntimeError):
    pass


def _failing_on_chunk(x: Any, bad_chunk: int) -> Any:
    """``x`` (a dask array) whose chunk ``bad_chunk`` along axis 0 raises when computed."""

    def block(b: np.ndarray, block_info: Any = None) -> np.ndarray:
        if block_info[0]["chunk-location"][0] == bad_chunk:
            raise ChunkFailed(f"chunk {bad_chunk} failed")
        return b

    return x.map_blocks(block, dtype=x.dtype)


@pytest.mark.parametrize("kwargs", [{}, {"fused": True}, {"renorm": True, "axis": 1}], ids=["plain", "fused", "renorm"])
def test_a_failed_dask_step_leaves_the_last_good_state(kwargs) -> None:  # type: ignore[no-untyped-def]
    da = pytest.importorskip("dask.array")
    shape = (8, 3, 2, 4)
    xs = [_data(shape, seed) for seed in range(4)]
    layer = arraybn.BatchNormalization(**kwargs)
    reference = arraybn.BatchNormalization(**kwargs)  # NumPy, never sees the bad batch

    layer(da.from_array(xs[0], chunks=(2, 3, 2, 4)), training=True)
    reference(xs[0], training=True)
    good = layer.get_weights()  # computed: the last good state

    y = layer(_failing_on_chunk(da.from_array(xs[1], chunks=(2, 3, 2, 4)), 2), training=True)  # lazy: no error yet
    with pytest.raises(ChunkFailed):
        y.compute()
    with pytest.raises(ChunkFailed):  # the layer computes its weights once, finds the failure, and rolls back
        layer.get_weights()
    for a, b in zip(layer.get_weights(), good, strict=True):
        np.testing.assert_array_equal(a, b)

    # usable: inference and training go on as on the NumPy layer that skipped the bad batch
    x2 = da.from_array(xs[2], chunks=(2, 3, 2, 4))
    np.testing.assert_allclose(layer(x2, training=False).compute(), reference(xs[2], training=False), rtol=1e-6, atol=1e-6)
    y3 = layer(da.from_array(xs[3], chunks=(2, 3, 2, 4)), training=True)
    np.testing.assert_allclose(y3.compute(), reference(xs[3], training=True), rtol=1e-5, atol=1e-5)
    for a, b in zip(layer.get_weights(), reference.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_get_weights_makes_the_dask_state_concrete() -> None:
    da = pytest.importorskip("dask.array")
    layer = arraybn.BatchNormalization()
    for seed in range(3):
        layer(da.from_array(_data((8, 3), seed), chunks=(2, 3)), training=True)
    before = len(dict(layer.moving_mean.__dask_graph__()))
    values = layer.get_weights()
    after = len(dict(layer.moving_mean.__dask_graph__()))
    assert after < before  # the graph of three steps is replaced by the computed values
    for a, b in zip(layer.get_weights(), values, strict=True):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------
# Threads sharing one layer
# ---------------------------------------------------------------------------


def test_threads_never_see_a_torn_state() -> None:
    """Each training batch k has per-channel mean k and variance k**2 (rows 0 and 2k), and
    momentum=0 makes the moving statistics exactly the batch's: any state a reader sees must have
    one k in every channel, and variance == mean**2. A torn state (mean of one call, variance of
    another, or channels from two calls) breaks that."""
    layer = arraybn.BatchNormalization(momentum=0.0, fused=False)
    channels = 16
    layer.build((2, channels))
    batches = [np.stack([np.zeros(channels), np.full(channels, 2.0 * k)]).astype(np.float32) for k in range(1, 9)]
    stop = threading.Event()
    errors: list[str] = []

    def writer(i: int) -> None:
        for step in range(300):
            layer(batches[(i + step) % len(batches)], training=True)

    def reader() -> None:
        while not stop.is_set():
            w = layer.get_weights()
            mean, var = w[2], w[3]
            if len(set(mean.tolist())) != 1 or len(set(var.tolist())) != 1:
                errors.append(f"channels from two calls: {mean}, {var}")
            elif not (float(mean[0]) == 0.0 and float(var[0]) == 1.0) and float(var[0]) != float(mean[0]) ** 2:
                errors.append(f"mean of one call, variance of another: {mean[0]}, {var[0]}")

    readers = [threading.Thread(target=reader) for _ in range(2)]
    writers = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for t in readers + writers:
        t.start()
    for t in writers:
        t.join()
    stop.set()
    for t in readers:
        t.join()
    assert not errors, errors[:3]
    k = float(layer.get_weights()[2][0])
    assert k in {float(b) for b in range(1, 9)}
