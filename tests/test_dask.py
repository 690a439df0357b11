"""dask.array: the layer is lazy, and a batch split over chunks is normalized as one batch.

* The forward (training and inference, with the moving-statistics update)
  only builds a graph: it runs under a scheduler that raises if anything is
  computed.
* Synchronized batch norm: the batch is split into chunks held by two worker
  processes of a ``distributed.LocalCluster``; dask reduces the statistics
  across chunks, so outputs and moving statistics are those of the whole
  batch. With data whose sums are exact in float32 (small integers) they are
  bit-identical to NumPy's; with random data the reduction order differs
  (chunk sums, then a sum of partial sums, against NumPy's pairwise sum) and
  they agree to a few float32 ulps.
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

da = pytest.importorskip("dask.array")
dask = pytest.importorskip("dask")

# (id, input shape, chunks along the batch, layer kwargs, with a mask)
CASES = [
    ("2d-axis-1", (32, 3), {}, False),
    ("3d-axis1", (32, 3, 5), {"axis": 1}, False),
    ("4d-multi-axis", (32, 3, 5, 2), {"axis": [1, 3]}, False),
    ("4d-nhwc-fused", (32, 4, 4, 3), {}, False),
    ("4d-nchw-fused-axis1", (32, 3, 4, 4), {"axis": 1}, False),
    ("3d-masked", (32, 6, 3), {"fused": False}, True),
    ("2d-renorm", (32, 3), {"renorm": True, "renorm_clipping": {"rmax": 1.5, "dmax": 0.5}}, False),
]
IDS = [c[0] for c in CASES]
N_CHUNKS = 4


@pytest.fixture(autouse=True)
def _dask_selected() -> None:
    _namespace(Backend.DASK)  # skips when dask is not in ARRAYBN_TEST_BACKENDS


def _data(shape: tuple[int, ...], seed: int, exact: bool) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if exact:
        # Mirrored small integers: the second half of the batch is ``2c - first half``, so every
        # channel's mean is the integer ``c`` and every sum of the moments is an exact float32
        # integer, whatever the order of the reduction.
        half = rng.integers(-8, 9, size=(shape[0] // 2, *shape[1:]))
        c = int(rng.integers(-3, 4))
        return np.concatenate([half, 2 * c - half]).astype(np.float32)
    return (rng.standard_normal(shape) * 2.0 + 0.5).astype(np.float32)


def _mask(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """About 3/4 of the positions; row ``i`` and row ``i + batch/2`` alike (keeps exact data exact)."""
    m = np.random.default_rng(seed).random(shape[:-1]) < 0.75
    half = shape[0] // 2
    m[half:] = m[:half]
    return m


def _chunked(a: np.ndarray) -> Any:
    return da.from_array(a, chunks=(a.shape[0] // N_CHUNKS, *a.shape[1:]))


def _boom(*args: Any, **kwargs: Any) -> Any:
    msg = "a dask graph was computed inside the forward"
    raise AssertionError(msg)


@contextlib.contextmanager
def _no_compute() -> Iterator[None]:
    with dask.config.set(scheduler=_boom):
        yield


def _steps(layer: arraybn.BatchNormalization, case: tuple, exact: bool, convert: Any) -> list[Any]:
    _, shape, _, masked = case
    outs = []
    for step, training in enumerate((True, True, False)):
        x = convert(_data(shape, step, exact))
        mask = convert(_mask(shape, 10 + step)) if masked else None
        outs.append(layer(x, training=training, mask=mask))
    return outs


# ---------------------------------------------------------------------------
# Laziness
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_forward_builds_a_graph_without_computing(case) -> None:  # type: ignore[no-untyped-def]
    layer = arraybn.BatchNormalization(**case[2])
    with _no_compute():
        outs = _steps(layer, case, False, _chunked)
        assert all(isinstance(y, da.Array) for y in outs)
        assert all(isinstance(w, da.Array) for w in layer.weights)
        assert outs[0].chunks[0] == (case[1][0] // N_CHUNKS,) * N_CHUNKS, "the output keeps the input's chunks"
    reference = arraybn.BatchNormalization(**case[2])
    ref_outs = _steps(reference, case, False, np.asarray)
    for y, y_ref in zip(dask.compute(*outs), ref_outs, strict=True):
        assert_close(y, y_ref, False, "output")


def test_the_no_compute_trap_is_real() -> None:
    with _no_compute(), pytest.raises(AssertionError, match="computed"):
        _chunked(np.ones((8, 3), np.float32)).sum().compute()


def test_get_weights_computes_and_returns_numpy() -> None:
    layer = arraybn.BatchNormalization()
    layer(_chunked(_data((32, 3), 0, False)), training=True)
    with _no_compute(), pytest.raises(AssertionError, match="computed"):
        layer.get_weights()
    assert all(isinstance(w, np.ndarray) for w in layer.get_weights())


def test_float16_backward_computes_in_float32_as_on_numpy() -> None:
    """16-bit inputs: forward and backward both work in float32 (dask's namespace lists no float16)."""
    x = (_data((16, 3), 3, False) * 3.0 + 1.0).astype(np.float16)
    dy = _data((16, 3), 4, False).astype(np.float16)
    results = []
    for convert in (np.asarray, _chunked):
        layer = arraybn.BatchNormalization(dtype="float16", fused=False)
        _, ctx = layer.forward(convert(x), training=True)
        dx, grads = layer.backward(ctx, convert(dy))
        results.append((np.asarray(dx), [np.asarray(g) for g in grads.values()]))
    (dx, grads), (dx_ref, grads_ref) = results[1], results[0]
    assert_close(dx, dx_ref, True, "dx")  # computed in float16 it was a float16 ulp off
    for g, g_ref in zip(grads, grads_ref, strict=True):
        assert_close(g, g_ref, False, "weight gradient")  # float32 sums, chunk by chunk


def test_numpy_input_for_a_dask_layer_raises_type_error() -> None:
    layer = arraybn.BatchNormalization()
    layer(_chunked(_data((32, 3), 0, False)), training=True)
    before = list(layer.weights)
    with pytest.raises(TypeError):
        layer(_data((32, 3), 1, False), training=True)
    with pytest.raises(TypeError):
        layer(_chunked(_data((32, 5, 3), 1, False))[:, 0], training=True, mask=np.ones((32,), bool))
    assert all(a is b for a, b in zip(layer.weights, before, strict=True))


# ---------------------------------------------------------------------------
# Synchronized batch norm on a LocalCluster (two worker processes)
# ---------------------------------------------------------------------------

# distributed may warn about ports, sockets and event loops on busy machines;
# that noise is the cluster's, not arraybn's, and is tolerated here only.
DISTRIBUTED_WARNINGS = [
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:.*:UserWarning:distributed"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]


def _with_distributed_warnings_tolerated(f: Any) -> Any:
    for mark in DISTRIBUTED_WARNINGS:
        f = mark(f)
    return f


@pytest.fixture(scope="module")
def client():  # type: ignore[no-untyped-def]
    distributed = pytest.importorskip("distributed")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # cluster start-up and shut-down chatter
        cluster = distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None, silence_logs=40
        )
        c = distributed.Client(cluster, set_as_default=False)
        c.wait_for_workers(2, timeout=120)
    try:
        yield c
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            c.close()
            cluster.close()


def _spread(client: Any, a: np.ndarray) -> Any:
    """``a`` as a dask array whose batch chunks live on the workers in turn (chunk i on worker i % 2)."""
    workers: list[str] = []
    for _ in range(60):
        client.wait_for_workers(2, timeout=120)
        # when the query fails (an OSError on a busy machine) the client silently returns its
        # cached identity, which lists no workers: ask again
        workers = sorted(client.scheduler_info(n_workers=-1)["workers"])
        if len(workers) == 2:
            break
        time.sleep(0.5)
    assert len(workers) == 2, workers
    step = a.shape[0] // N_CHUNKS
    pieces = []
    for i in range(N_CHUNKS):
        chunk = np.ascontiguousarray(a[i * step : (i + 1) * step])
        # hash=False: a key of its own. Scattered keys are content hashes by default, so a test that
        # scatters the same chunk as an earlier one shares its key, and the earlier future's
        # release can delete the data under the new one ("lost dependencies", seen once in CI)
        future = client.scatter(chunk, workers=[workers[i % len(workers)]], direct=True, hash=False)
        pieces.append(da.from_delayed(dask.delayed(future), shape=chunk.shape, dtype=chunk.dtype))
    return da.concatenate(pieces, axis=0)


@_with_distributed_warnings_tolerated
@pytest.mark.parametrize("exact", [True, False], ids=["exact-data", "random-data"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_synchronized_statistics_on_a_local_cluster(case, exact, client) -> None:  # type: ignore[no-untyped-def]
    layer = arraybn.BatchNormalization(**case[2])
    reference = arraybn.BatchNormalization(**case[2])
    # exact data: the reference's two-pass is bit for bit NumPy's; the dask-chunked schedule merges the
    # chunks' statistics in float64 (its declared "merge order" bound), checked on the random data
    setting = "reference" if exact else "auto"
    with _no_compute(), arraybn.schedule(setting):  # nothing runs while the graph is built
        outs = _steps(layer, case, exact, lambda a: _spread(client, a))
    results = client.compute([*outs, *layer.weights], sync=True)
    ref_outs = _steps(reference, case, exact, np.asarray)
    n = len(outs)
    for i, (y, y_ref) in enumerate(zip(results[:n], ref_outs, strict=True)):
        assert_close(np.asarray(y), y_ref, exact, f"output of step {i}")
    for name, w, w_ref in zip(layer.weight_names, results[n:], reference.get_weights(), strict=True):
        assert_close(np.asarray(w), w_ref, exact, name)


@_with_distributed_warnings_tolerated
def test_both_workers_hold_part_of_the_batch(client) -> None:  # type: ignore[no-untyped-def]
    """The chunks really are spread: each worker computes on its own part of the batch."""
    from distributed import get_task_stream

    x = _spread(client, _data((32, 3), 0, False))
    layer = arraybn.BatchNormalization()
    y = layer(x, training=True)
    with get_task_stream(client) as ts:
        client.compute([y, layer.moving_mean], sync=True)
    assert len({t["worker"] for t in ts.data}) == 2


def test_per_chunk_statistics_would_differ() -> None:
    """Sanity check of the test data: normalizing each chunk on its own gives another answer."""
    x = _data((32, 3), 0, False)
    whole = arraybn.BatchNormalization()(x, training=True)
    per_chunk = np.concatenate(
        [arraybn.BatchNormalization()(c, training=True) for c in np.split(x, N_CHUNKS)], axis=0
    )
    assert not np.allclose(whole, per_chunk, atol=1e-3)


def _unknown_batch(x: np.ndarray) -> Any:
    """``x`` as a dask array whose batch size dask does not know (boolean indexing)."""
    d = da.from_array(x, chunks=(5, *x.shape[1:]))
    keep = d.reshape(d.shape[0], -1)[:, 0] > -np.inf  # every row, but dask cannot know it
    out = d[keep]
    assert np.isnan(out.shape[0])
    return out


@pytest.mark.parametrize(("shape", "kwargs"), [((20, 3), {}), ((20, 2, 2, 3), {"fused": False})])
def test_unknown_batch_size_on_the_non_fused_path(shape, kwargs) -> None:  # type: ignore[no-untyped-def]
    """dask's unknown sizes (NaN) build the layer (the batch is unknown, as a Keras Input's None) and
    the non-fused path, which divides by the count lazily, gives the known-size results."""
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    layer, ref = arraybn.BatchNormalization(**kwargs), arraybn.BatchNormalization(**kwargs)
    y = layer(_unknown_batch(x), training=True)
    y_ref = ref(x, training=True)
    np.testing.assert_allclose(np.asarray(y.compute()), y_ref, rtol=1e-6, atol=1e-6)
    for a, b in zip(layer.get_weights(), ref.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_unknown_batch_size_where_the_count_is_needed_raises() -> None:
    """The fused update's Bessel factor n / (n - 1) needs n: a clear error that leaves the state as it
    was (before, the moving variance silently became NaN)."""
    x = np.random.default_rng(0).standard_normal((20, 2, 2, 3)).astype(np.float32)
    layer = arraybn.BatchNormalization()  # fused
    layer(da.from_array(x), training=False)
    before = layer.get_weights()
    with pytest.raises(ValueError, match="compute_chunk_sizes"):
        layer(_unknown_batch(x), training=True)
    for a, b in zip(layer.get_weights(), before, strict=True):
        np.testing.assert_array_equal(a, b)
    y = layer(_unknown_batch(x), training=False)  # inference does not need it
    np.testing.assert_allclose(np.asarray(y.compute()), layer(da.from_array(x), training=False).compute())
    for kwargs, mask in [({"virtual_batch_size": 2}, None), ({}, da.ones((20,), chunks=5, dtype=bool))]:
        other = arraybn.BatchNormalization(**kwargs)
        with pytest.raises(ValueError, match="compute_chunk_sizes"):
            other(_unknown_batch(x[:, 0, 0, :]), training=True, mask=mask)
        if mask is None:  # the ghost batches' inference reshape: dask cannot reshape unknown sizes
            with pytest.raises(ValueError, match="compute_chunk_sizes"):
                other(_unknown_batch(x[:, 0, 0, :]), training=False)


def test_empty_batch_computes_without_warnings() -> None:
    """NaN statistics for an empty batch, computed by dask after the call (outside arraybn's NumPy
    errstate): no 'invalid value' warning either (pytest makes warnings errors)."""
    for kwargs, shape in [({}, (0, 3)), ({}, (0, 2, 2, 3)), ({"renorm": True}, (0, 3))]:
        layer = arraybn.BatchNormalization(**kwargs)
        y = layer(da.from_array(np.ones(shape, np.float32)), training=True)
        assert y.compute().shape == shape
        weights = layer.get_weights()
        assert np.isnan(weights[2]).all()  # moving_mean, as TF's


def test_unknown_batch_size_in_the_activity_loss_and_the_backward() -> None:
    """The activity loss divides by the batch size: a clear error, state unchanged (before: a silent
    NaN loss). An inference backward needs no count and compares unknown sizes as equal."""
    x = np.random.default_rng(0).standard_normal((20, 3)).astype(np.float32)
    layer = arraybn.BatchNormalization(activity_regularizer="l2")
    layer(da.from_array(x), training=True)
    before = layer.get_weights()
    with pytest.raises(ValueError, match="compute_chunk_sizes"):
        layer(_unknown_batch(x), training=True)
    for a, b in zip(layer.get_weights(), before, strict=True):
        np.testing.assert_array_equal(a, b)
    plain = arraybn.BatchNormalization()
    plain(x, training=True)
    lazy = arraybn.BatchNormalization()
    lazy.build((20, 3), xp=da)
    lazy.set_weights(plain.get_weights())
    xu = _unknown_batch(x)
    y, ctx = lazy.forward(xu, training=False)
    dx, _ = lazy.backward(ctx, da.ones_like(y))
    _, ref_ctx = plain.forward(x, training=False)
    ref_dx, _ = plain.backward(ref_ctx, np.ones_like(x))
    np.testing.assert_allclose(np.asarray(dx.compute()), ref_dx, rtol=1e-6)
