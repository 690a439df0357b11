"""Batch statistics of dask arrays in one pass over the chunks, in memory bounded by a few chunks.

The reference's two-pass moments (``mean``, then ``sum((x - mean) ** 2)``) as a
dask graph make every chunk of ``x`` wait in memory for the global mean before
its second pass, so memory grows with the data; and a float32 sum over
hundreds of millions of values loses the spread of data with a large mean.
This schedule keeps TF's statistics (mean and biased variance per channel)
and changes how they are formed:

* each chunk's count, mean and centred sum of squares, computed from the chunk
  alone with the reference's corrected two-pass sums (or the schedule for the
  chunk's library) in the chunk's dtype, the correction applied in float64;
* the chunks' results merged exactly in float64 (Chan, Golub and LeVeque:
  ``mean = sum(n_i * mean_i) / n``, ``M2 = sum(M2_i + n_i * (mean_i - mean) ** 2)``),
  then rounded once to the input's dtype;
* in a training call the output's pass reads a copy of ``x``'s graph that
  waits for the statistics (``dask.graph_manipulation.bind``): the first pass
  releases each chunk as soon as its statistics exist, and the second reads
  ``x`` again from its source (memory, disk, or the computation that made
  it, which then runs twice).

The result differs from the reference's float32 two-pass by the order and
width of the additions (``"merge order"``), and is never less accurate.
Chunks of unknown size (NaN) are counted when they compute. Used for dask
arrays of float32/float64 whose chunks are NumPy arrays.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import numpy as np

from .._reference import Ops

Array = Any


def _is_numpy_backed(x: Array) -> bool:
    try:
        import dask.array as da
    except ImportError:  # pragma: no cover - no dask, no dask arrays
        return False
    return isinstance(x, da.Array) and isinstance(x._meta, np.ndarray) and x.dtype in (np.float32, np.float64)


def _chunk_statistics(block: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    """``(count, mean, centred sum of squares)`` of one chunk, stacked on a new leading axis, in float64.

    The reference's corrected two-pass in the chunk's dtype (``m0 = sum(x) / n``,
    ``d = x - m0``), with the correction applied in float64: the chunk's mean is
    ``m0 + sum(d) / n`` unrounded, and its centred sum of squares
    ``sum(d ** 2) - sum(d) ** 2 / n``. (A chunk mean rounded to float32 would
    put its rounding error into the merge's between-chunk term.)
    """
    from . import select

    kept = tuple(1 if i in axes else n for i, n in enumerate(block.shape))
    n = math.prod(block.shape[a] for a in axes)
    out = np.zeros((3, *kept), np.float64)
    if n == 0:
        return out  # an empty chunk adds nothing
    xp = _numpy_namespace()
    ops = select(block, xp)
    with np.errstate(invalid="ignore", over="ignore"):  # inf - inf is NaN, silently, as TF computes it
        m0 = ops.sum(block, axes, xp) / float(n)
        d = block - m0
        sum_d = np.asarray(ops.sum(d, axes, xp), np.float64)
        d *= d
        sum_d2 = np.asarray(ops.sum(d, axes, xp), np.float64)
        correction = sum_d / n
        finite = np.isfinite(correction)  # an infinite or NaN chunk: its statistics are what they are
        out[0] = n
        out[1] = np.asarray(m0, np.float64) + np.where(finite, correction, 0.0)
        out[2] = np.where(finite, sum_d2 - sum_d * np.where(finite, correction, 0.0), sum_d2)
    return out


def _merge(block: np.ndarray, axes: tuple[int, ...], dtype: Any) -> np.ndarray:
    """The chunks' statistics (reduced axes hold one entry per chunk) merged: ``(mean, variance)`` in ``dtype``."""
    stat_axes = tuple(a + 1 for a in axes)
    n, means, squares = block[0], block[1], block[2]
    axes_of_n = tuple(a - 1 for a in stat_axes)
    with np.errstate(invalid="ignore", divide="ignore"):  # an empty batch: NaN, as the reference gives
        total = np.sum(n, axis=axes_of_n, keepdims=True)
        mean = np.sum(n * means, axis=axes_of_n, keepdims=True) / total
        spread = np.where(n > 0, n * (means - mean) ** 2, 0.0)
        variance = np.sum(squares + spread, axis=axes_of_n, keepdims=True) / total
    return np.stack([mean, variance]).astype(dtype)


def _numpy_namespace() -> ModuleType:
    import array_api_compat.numpy as xp

    return xp


class DaskChunked(Ops):
    """dask arrays of float32/float64 on NumPy chunks (module docstring)."""

    name = "dask-chunked"
    bounds = {"moments": "merge order", "affine": "bitwise"}

    def moments(self, x: Array, axes: Sequence[int], xp: ModuleType) -> tuple[Array, Array]:
        if not axes or not _is_numpy_backed(x):
            return super().moments(x, axes, xp)
        axes = tuple(sorted(a % x.ndim for a in axes))
        per_chunk = ((3,), *(((1,) * len(c)) if i in axes else c for i, c in enumerate(x.chunks)))
        stats = x.map_blocks(
            _chunk_statistics, axes, new_axis=0, chunks=per_chunk, dtype=np.float64,
            meta=np.empty((0,) * (x.ndim + 1), np.float64),
        )  # fmt: skip
        gathered = stats.rechunk({a + 1: -1 for a in axes})
        merged_chunks = ((2,), *((1,) if i in axes else c for i, c in enumerate(gathered.chunks[1:])))
        merged = gathered.map_blocks(
            _merge, axes, x.dtype, chunks=merged_chunks, dtype=x.dtype, meta=np.empty((0,) * (x.ndim + 1), x.dtype)
        )
        return merged[0], merged[1]

    def affine(self, x: Array, scale: Array, shift: Array, center: Array | None, xp: ModuleType) -> Array:
        """The reference's expression on a copy of ``x``'s graph that waits for coefficients computed from ``x``."""
        if _is_numpy_backed(x) and _depends_on(x, scale, shift, center):
            from dask.graph_manipulation import bind

            x = bind(x, [p for p in (scale, shift, center) if p is not None])
        return super().affine(x, scale, shift, center, xp)


def _depends_on(x: Array, *params: Array | None) -> bool:
    """True where a dask parameter's graph holds ``x``'s last layer (its statistics were computed from ``x``)."""
    for p in params:
        graph = getattr(p, "dask", None)
        if graph is not None and x.name in getattr(graph, "layers", {}):
            return True
    return False
