"""Per-channel statistics and scale-and-shift, scheduled for the CPU cache.

Batch norm is memory-bound, but on a CPU the plain Array API expressions are
slower than memory: NumPy's reductions over leading axes and its broadcasts of
a per-channel column run element loops well below memory speed. This module
keeps the arithmetic (two-pass moments as ``tf.nn.moments``; ``y = x * a``
then ``y += b``, the same two roundings) and changes only the schedule:

* the input is seen as ``(A, C, B)``: ``C`` channels, ``A`` elements before the
  channel axis and ``B`` after it (a reshape, no copy, of a contiguous array);
* sums go through ``matmul`` with a vector of ones (the BLAS the namespace
  links), one partial sum per cache-sized block, the partials added at the end;
* the centred second pass works block by block, so each block's temporary
  stays in cache and no input-sized array is made;
* channels-last data (``B == 1``, at most 256 channels: with longer channel
  vectors NumPy's own reductions already run along long rows) is viewed as
  rows of ``k`` whole channel vectors, so every broadcast runs along a long
  contiguous row; channels in
  the middle (``B > 1``) are worked one channel at a time with a scalar, which
  is also how their scale-and-shift is done (in place in the output).

Only used where :func:`arraybn._namespace.streams_through_cache` says so
(eager, C-contiguous NumPy arrays of float32 or float64, at least 1 MiB);
everywhere else the plain expressions run, and lazy or compiled namespaces plan
their own passes. ``tests/test_streaming.py`` holds the two schedules to the
same results.
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any, NamedTuple

from ._namespace import array_device, multiply_into, streams_through_cache

Array = Any

_BLOCK_BYTES = 1 << 19  # one block plus its temporary stay in a 1 MiB L2 cache
_ROW_ELEMENTS = 2048  # channels-last rows are tiled up to about this many elements
_MIN_BYTES = 1 << 20  # below this the plain expressions are as fast
_MIN_INNER = 256  # channels in the middle: fewer elements per channel row is not worth a loop
_MAX_LAST = 256  # channels last: longer channel vectors already reduce well in NumPy's own loops


class Layout(NamedTuple):
    """``x`` seen as ``(A, C, B)`` around its one channel axis."""

    a: int
    c: int
    b: int
    k: int  # channels-last: channel vectors per tiled row (divides a)


def layout(x: Array, channel_axis: int, xp: ModuleType) -> Layout | None:
    """The streamed layout of ``x`` around ``channel_axis``, or None to use the plain expressions."""
    if not streams_through_cache(x) or x.dtype not in (xp.float32, xp.float64):
        return None
    shape = tuple(x.shape)
    if math.prod(shape) * _itemsize(x, xp) < _MIN_BYTES:
        return None
    a = math.prod(shape[:channel_axis])
    c = shape[channel_axis]
    b = math.prod(shape[channel_axis + 1 :])
    if a == 0 or c == 0 or b == 0:
        return None
    if b == 1:
        if c > _MAX_LAST:
            return None
        k = max(1, min(a, _ROW_ELEMENTS // c))
        while a % k:
            k -= 1
        return Layout(a, c, 1, k)
    if b < _MIN_INNER:
        return None
    return Layout(a, c, b, 1)


def _row_blocks(rows: int, row_bytes: int) -> list[tuple[int, int]]:
    step = max(1, _BLOCK_BYTES // row_bytes)
    return [(i, min(i + step, rows)) for i in range(0, rows, step)]


def _itemsize(x: Array, xp: ModuleType) -> int:
    return xp.finfo(x.dtype).bits // 8


def _tiled(v: Array, k: int, xp: ModuleType) -> Array:
    return xp.reshape(xp.broadcast_to(xp.reshape(v, (1, -1)), (k, v.shape[-1])), (-1,))


def _fold(v: Array, k: int, c: int, xp: ModuleType) -> Array:
    """Sum a tiled row of ``k`` channel vectors back to one vector of ``c``."""
    return v if k == 1 else xp.sum(xp.reshape(v, (k, c)), axis=0)


def _sum_rows(parts: list[Array], xp: ModuleType) -> Array:
    return parts[0] if len(parts) == 1 else xp.sum(xp.stack(parts), axis=0)


def channel_moments(x: Array, lay: Layout, xp: ModuleType) -> tuple[Array, Array]:
    """Mean and biased variance per channel (shape ``(C,)``), two passes as ``tf.nn.moments``."""
    n = lay.a * lay.b
    if lay.b == 1:
        rows = xp.reshape(x, (lay.a // lay.k, lay.k * lay.c))
        blocks = _row_blocks(rows.shape[0], rows.shape[1] * _itemsize(x, xp))
        ones = xp.ones((blocks[0][1] - blocks[0][0],), dtype=x.dtype, device=array_device(x))
        sums = [ones[: j - i] @ rows[i:j] for i, j in blocks]
        mean = _fold(_sum_rows(sums, xp), lay.k, lay.c, xp) / n
        row_mean = _tiled(mean, lay.k, xp)
        squares = []
        for i, j in blocks:
            d = rows[i:j] - row_mean
            d *= d
            squares.append(ones[: j - i] @ d)
            del d  # one block temporary alive at a time
        variance = _fold(_sum_rows(squares, xp), lay.k, lay.c, xp) / n
        return mean, variance
    cube = xp.reshape(x, (lay.a, lay.c, lay.b))
    ones = xp.ones((lay.b,), dtype=x.dtype, device=array_device(x))
    mean = xp.sum(cube @ ones, axis=0) / n
    spans = _row_blocks(lay.a, lay.b * _itemsize(x, xp))
    squares = []
    for ch in range(lay.c):
        m = mean[ch]
        total = None
        for i, j in spans:
            d = xp.reshape(cube[i:j, ch, :] - m, (-1,))
            part = d @ d
            del d
            total = part if total is None else total + part
        squares.append(total)
    variance = xp.stack(squares) / n
    return mean, variance


def scale_shift_layout(x: Array, channel_axis: int, xp: ModuleType) -> Layout | None:
    """The layout for :func:`scale_shift`, or None for the plain ``x * scale + shift``.

    Only channels in the middle (``B > 1``) are streamed. For channels-last
    data NumPy's own broadcast of the channel vector over the whole array
    measured as fast as any blocked schedule and steadier from run to run.
    """
    lay = layout(x, channel_axis, xp)
    return lay if lay is not None and lay.b > 1 else None


def scale_shift(x: Array, scale: Array, shift: Array, lay: Layout, xp: ModuleType) -> Array:
    """``y = x * scale`` then ``y += shift`` per channel (``scale``, ``shift``: shape ``(C,)``, x's dtype).

    For a layout from :func:`scale_shift_layout`: each channel's rows are
    scaled by a scalar into the output and shifted while still in cache.
    """
    y = xp.empty_like(x)
    shape = (lay.a, lay.c, lay.b)
    cube, out = xp.reshape(x, shape), xp.reshape(y, shape)
    spans = _row_blocks(lay.a, lay.b * _itemsize(x, xp))
    for ch in range(lay.c):
        s, t = scale[ch], shift[ch]
        for i, j in spans:
            block = out[i:j, ch, :]
            multiply_into(cube[i:j, ch, :], s, block)
            block += t
    return y
