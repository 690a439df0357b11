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
* channels-last data (``B == 1``) is viewed as rows of ``k`` whole channel
  vectors, at least 8192 elements long (plus a shorter tail when ``k`` does not
  divide ``A``), so that every broadcast of a tiled channel vector runs along a
  long contiguous row: NumPy's broadcasting loops over shorter rows measured up
  to 10x slower than over rows of 8192 elements on the same data. Channels in
  the middle (``B > 1``) are worked one channel at a time with a scalar;
* the scale-and-shift writes each block of the output and adds the shift while
  the block is still in cache: one read of ``x`` and one write of ``y``, where
  ``y = x * a; y += b`` over whole arrays streams ``y`` through memory twice;
* the backward's three per-channel sums and its ``dx`` work the same way
  (:func:`centred_sums`, :func:`centred_affine`);
* the blocks are cut into at most 8 pieces that run on up to
  :func:`thread_count` threads (NumPy and BLAS release the GIL); the cut never
  depends on the thread count and partial sums are added in piece order, so
  the results are the same bits on any number of threads.

Only used where :func:`arraybn._namespace.streams_through_cache` says so
(eager, C-contiguous NumPy arrays of float32 or float64, at least 1 MiB);
everywhere else the plain expressions run, and lazy or compiled namespaces plan
their own passes. ``tests/test_schedules.py`` holds this schedule to the reference's
results.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from types import ModuleType
from typing import Any, NamedTuple, TypeVar

from .._namespace import array_device, float_error_settings, multiply_into, streams_through_cache, subtract_into
from .._reference import REFERENCE, Ops, corrected_moments
from . import pairwise_sum

Array = Any
T = TypeVar("T")
P = TypeVar("P")

_BLOCK_BYTES = 1 << 20  # a block and its temporary stay in the L2 and L3 caches; larger blocks cost fewer calls
_ROW_ELEMENTS = 8192  # channels-last rows hold at least this many elements (see the module docstring)
_MIN_BYTES = 1 << 20  # below this the plain expressions are as fast
_MIN_INNER = 256  # channels in the middle: fewer elements per channel row is not worth a loop
_PIECES = 8  # the work is cut into at most this many pieces, whatever the thread count
_MAX_THREADS = 4  # memory-bound passes stop scaling before this on common CPUs


class Layout(NamedTuple):
    """``x`` seen as ``(A, C, B)`` around its one channel axis."""

    a: int
    c: int
    b: int
    k: int  # channels last: channel vectors per row (the last ``A % k`` vectors form a tail)


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
        return Layout(a, c, 1, min(a, -(-_ROW_ELEMENTS // c)))
    if b < _MIN_INNER:
        return None
    return Layout(a, c, b, 1)


def _blocks(rows: int, row_elements: int, like: Array, xp: ModuleType) -> list[tuple[int, int]]:
    """``[start, stop)`` runs of ``rows`` rows of ``row_elements`` elements of ``like``'s dtype, one block each."""
    step = max(1, _BLOCK_BYTES // (row_elements * _itemsize(like, xp)))
    return [(i, min(i + step, rows)) for i in range(0, rows, step)]


def _height(blocks: list[tuple[int, int]]) -> int:
    """Rows in the first (the longest) block."""
    return blocks[0][1] - blocks[0][0]


def _buffer(blocks: list[tuple[int, int]], width: int, like: Array, xp: ModuleType) -> Array:
    """A reusable ``(rows of the longest block, width)`` buffer of ``like``'s dtype and device."""
    return xp.empty((_height(blocks), width), dtype=like.dtype, device=array_device(like))


def _itemsize(x: Array, xp: ModuleType) -> int:
    return xp.finfo(x.dtype).bits // 8


def _rows(x: Array, lay: Layout, xp: ModuleType) -> tuple[Array, Array | None]:
    """Channels-last ``x`` as rows of ``k`` channel vectors, and the tail ``(A % k, C)`` (or None).

    Views, not copies (``x`` is C-contiguous), so writes into them land in ``x``.
    """
    flat = xp.reshape(x, (-1,))
    full = lay.a // lay.k
    split = full * lay.k * lay.c
    rows = xp.reshape(flat[:split], (full, lay.k * lay.c))
    tail = xp.reshape(flat[split:], (-1, lay.c)) if full * lay.k < lay.a else None
    return rows, tail


def _tiled(v: Array, k: int, xp: ModuleType) -> Array:
    return xp.reshape(xp.broadcast_to(xp.reshape(v, (1, -1)), (k, v.shape[-1])), (-1,))


def _fold(v: Array, k: int, c: int, xp: ModuleType) -> Array:
    """Sum a row of ``k`` channel vectors back to one vector of ``c``."""
    return v if k == 1 else xp.reshape(REFERENCE.sum(xp.reshape(v, (k, c)), (0,), xp), (c,))


# ---------------------------------------------------------------------------
# Threads
# ---------------------------------------------------------------------------


def thread_count() -> int:
    """How many threads the blocked passes use: ``ARRAYBN_NUM_THREADS``, else the CPUs available (at most 4).

    Read on every call, so it can be changed at run time. Results do not depend
    on it: the work is always cut into the same pieces, each piece is computed
    the same way on whichever thread runs it, and partial sums are added in
    piece order.
    """
    env = os.environ.get("ARRAYBN_NUM_THREADS", "").strip()
    if env:
        try:
            value = int(env)
        except ValueError:
            value = 0
        if value < 1:
            msg = f"ARRAYBN_NUM_THREADS must be a positive integer, got {env!r}."
            raise ValueError(msg)
        return value
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, _MAX_THREADS))


_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_pool_lock = threading.Lock()


def _executor(workers: int) -> ThreadPoolExecutor:
    global _pool, _pool_size
    with _pool_lock:
        if _pool is None or _pool_size < workers:
            old = _pool
            _pool, _pool_size = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="arraybn"), workers
            if old is not None:
                old.shutdown(wait=False)
        return _pool


def _forget_pool() -> None:
    """In a forked child the pool's threads do not exist: start a new pool on first use."""
    global _pool, _pool_size
    _pool, _pool_size = None, 0


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def _pieces(items: Sequence[T]) -> list[Sequence[T]]:
    """``items`` cut into at most ``_PIECES`` contiguous runs of near-equal length (never empty)."""
    n = len(items)
    count = min(_PIECES, n)
    bounds = [n * i // count for i in range(count + 1)]
    return [items[bounds[i] : bounds[i + 1]] for i in range(count)]


def _parallel(fn: Callable[[P], T], pieces: Sequence[P]) -> list[T]:
    """``[fn(piece) for piece in pieces]`` on up to :func:`thread_count` threads, the calling thread among them.

    Each thread takes the next piece not yet taken until none is left, so a
    thread that starts late (a pool thread waking up) or runs slowly (a core
    shared with other work) does fewer pieces instead of holding up the call.
    The caller works from its first piece on while the pool's threads wake
    (NumPy, BLAS and the Numba loops release the GIL). Which thread runs a
    piece never changes what the piece computes, and the results come back in
    piece order.
    """
    workers = min(thread_count(), len(pieces))
    if workers <= 1:
        return [fn(piece) for piece in pieces]
    settings = float_error_settings()  # NaN and inf stay as silent (or not) on the workers as here
    results: list[Any] = [None] * len(pieces)
    taken = iter(range(len(pieces)))
    lock = threading.Lock()
    failed = threading.Event()

    def run() -> None:
        with settings():
            while not failed.is_set():
                with lock:
                    i = next(taken, None)
                if i is None:
                    return
                try:
                    results[i] = fn(pieces[i])
                except BaseException:
                    failed.set()  # the others stop taking pieces
                    raise

    futures = [_executor(workers - 1).submit(run) for _ in range(workers - 1)]
    try:
        run()
    finally:
        wait(futures)  # every piece done (or failed) before anything is returned or raised
    for f in futures:
        f.result()  # a worker's failure raises here
    return results


# ---------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------


def _last_moments(x: Array, lay: Layout, xp: ModuleType) -> tuple[Array, Array]:
    """Channels-last :func:`channel_moments`: BLAS sums over blocks of rows, the tail on its own."""
    n = lay.a
    dev = array_device(x)
    rows, tail = _rows(x, lay, xp)
    blocks = _blocks(*rows.shape, x, xp)
    pieces = _pieces(blocks)
    ones = xp.ones((max(_height(blocks), 0 if tail is None else tail.shape[0]),), dtype=x.dtype, device=dev)

    def per_channel(row_total: Array, tail_total: Array | None) -> Array:
        folded = _fold(row_total, lay.k, lay.c, xp)
        return folded if tail_total is None else folded + tail_total

    def sums(piece: Sequence[tuple[int, int]]) -> Array:
        return pairwise_sum([ones[: j - i] @ rows[i:j] for i, j in piece])

    mean = per_channel(pairwise_sum(_parallel(sums, pieces)), None if tail is None else ones[: tail.shape[0]] @ tail) / n
    row_mean = _tiled(mean, lay.k, xp)

    def centred(piece: Sequence[tuple[int, int]]) -> tuple[Array, Array]:
        buffer = _buffer(blocks, rows.shape[1], x, xp)  # one buffer per piece, reused
        sums, squares = [], []
        for i, j in piece:
            d = buffer[: j - i]
            subtract_into(rows[i:j], row_mean, d)
            sums.append(ones[: j - i] @ d)
            d *= d
            squares.append(ones[: j - i] @ d)
        return pairwise_sum(sums), pairwise_sum(squares)

    per_piece = _parallel(centred, pieces)
    tail_sums = [None, None]
    if tail is not None:
        d = tail - mean
        tail_sums[0] = ones[: tail.shape[0]] @ d
        d *= d
        tail_sums[1] = ones[: tail.shape[0]] @ d
    sum_d, sum_d2 = (per_channel(pairwise_sum([p[s] for p in per_piece]), tail_sums[s]) for s in range(2))
    return corrected_moments(mean, sum_d, sum_d2, n, xp)


def channel_moments(x: Array, lay: Layout, xp: ModuleType) -> tuple[Array, Array]:
    """Mean and biased variance per channel (shape ``(C,)``), two passes as ``Ops.moments`` (mean corrected)."""
    if lay.b == 1:
        return _last_moments(x, lay, xp)
    n = lay.a * lay.b
    dev = array_device(x)
    cube = xp.reshape(x, (lay.a, lay.c, lay.b))
    ones = xp.ones((lay.b,), dtype=x.dtype, device=dev)
    # per (a, channel) row sums through BLAS, over pieces of A; then added over A in order
    outer = _pieces(_blocks(lay.a, lay.c * lay.b, x, xp))
    row_sums = _parallel(lambda piece: cube[piece[0][0] : piece[-1][1]] @ ones, outer)
    mean = xp.reshape(REFERENCE.sum(xp.concat(row_sums, axis=0), (0,), xp), (-1,)) / n
    spans = _blocks(lay.a, lay.b, x, xp)

    def centred(channels: Sequence[int]) -> list[tuple[Array, Array]]:
        buffer = _buffer(spans, lay.b, x, xp)
        totals = []
        for ch in channels:
            m = mean[ch]
            sums, squares = [], []
            for i, j in spans:
                c = buffer[: j - i]
                subtract_into(cube[i:j, ch, :], m, c)
                sums.append(xp.sum(c))  # NumPy's pairwise sum of a contiguous block
                squares.append(xp.sum(xp.vecdot(c, c)))  # BLAS dots along rows, their (pairwise) sum
            totals.append((pairwise_sum(sums), pairwise_sum(squares)))
        return totals

    per_channel = [t for piece in _parallel(centred, _pieces(range(lay.c))) for t in piece]
    sum_d, sum_d2 = (xp.stack([t[s] for t in per_channel]) for s in range(2))
    return corrected_moments(mean, sum_d, sum_d2, n, xp)


def affine(x: Array, scale: Array, shift: Array, center: Array | None, lay: Layout, xp: ModuleType) -> Array:
    """``(x - center) * scale + shift`` per channel (``center`` None: ``x * scale + shift``), rounded per operation.

    The per-channel vectors have shape ``(C,)`` and x's dtype. Block by block
    into the output, each block finished while still in cache: channels last
    along rows of tiled channel vectors, channels in the middle one channel at
    a time with scalars.
    """
    y = xp.empty_like(x)

    def finish(source: Array, c: Any, s: Any, t: Any, block: Array) -> None:
        if c is None:
            multiply_into(source, s, block)
        else:
            subtract_into(source, c, block)
            block *= s
        block += t

    if lay.b == 1:
        (rows, tail), (out, out_tail) = _rows(x, lay, xp), _rows(y, lay, xp)
        row_scale, row_shift = _tiled(scale, lay.k, xp), _tiled(shift, lay.k, xp)
        row_center = None if center is None else _tiled(center, lay.k, xp)

        def rows_piece(piece: Sequence[tuple[int, int]]) -> None:
            for i, j in piece:
                finish(rows[i:j], row_center, row_scale, row_shift, out[i:j])

        _parallel(rows_piece, _pieces(_blocks(*rows.shape, x, xp)))
        if tail is not None:
            finish(tail, center, scale, shift, out_tail)
        return y
    shape = (lay.a, lay.c, lay.b)
    cube, out = xp.reshape(x, shape), xp.reshape(y, shape)
    spans = _blocks(lay.a, lay.b, x, xp)

    def channels_piece(channels: Sequence[int]) -> None:
        for ch in channels:
            c = None if center is None else center[ch]
            for i, j in spans:
                finish(cube[i:j, ch, :], c, scale[ch], shift[ch], out[i:j, ch, :])

    _parallel(channels_piece, _pieces(range(lay.c)))
    return y


# ---------------------------------------------------------------------------
# Backward: the sums and the elementwise gradient, block by block
# ---------------------------------------------------------------------------


def centred_sums(x: Array, dy: Array, mean: Array, lay: Layout, xp: ModuleType) -> tuple[Array, Array, Array]:
    """Per channel ``sum(x - mean)``, ``sum(dy)`` and ``sum(dy * (x - mean))`` (each of shape ``(C,)``).

    One read of ``x`` and of ``dy``: each block is centred into a reused buffer
    and, while in cache, summed and multiplied by its ``dy`` block (BLAS
    ``matmul`` with ones; for channels in the middle, ``vecdot`` along rows).
    ``mean`` has shape ``(C,)``; ``dy`` has ``x``'s shape and layout.
    """
    dev = array_device(x)
    if lay.b == 1:
        (rows, tail), (grad_rows, grad_tail) = _rows(x, lay, xp), _rows(dy, lay, xp)
        blocks = _blocks(*rows.shape, x, xp)
        ones = xp.ones((_height(blocks),), dtype=x.dtype, device=dev)
        row_mean = _tiled(mean, lay.k, xp)

        def rows_piece(piece: Sequence[tuple[int, int]]) -> list[Array]:
            centred, product = _buffer(blocks, rows.shape[1], x, xp), _buffer(blocks, rows.shape[1], x, xp)
            parts: list[list[Array]] = [[], [], []]
            for i, j in piece:
                o, c, p = ones[: j - i], centred[: j - i], product[: j - i]
                subtract_into(rows[i:j], row_mean, c)
                multiply_into(grad_rows[i:j], c, p)
                for s, block in enumerate((c, grad_rows[i:j], p)):
                    parts[s].append(o @ block)
            return [pairwise_sum(p) for p in parts]

        per_piece = _parallel(rows_piece, _pieces(blocks))
        folded = [_fold(pairwise_sum([piece[s] for piece in per_piece]), lay.k, lay.c, xp) for s in range(3)]
        if tail is not None:
            c = tail - mean
            for s, block in enumerate((c, grad_tail, grad_tail * c)):
                folded[s] = folded[s] + xp.sum(block, axis=0)
        return folded[0], folded[1], folded[2]
    cube, grad = xp.reshape(x, (lay.a, lay.c, lay.b)), xp.reshape(dy, (lay.a, lay.c, lay.b))
    spans = _blocks(lay.a, lay.b, x, xp)
    ones = xp.ones((lay.b,), dtype=x.dtype, device=dev)

    def channels_piece(channels: Sequence[int]) -> list[list[Array]]:
        centred = _buffer(spans, lay.b, x, xp)
        per_channel = []
        for ch in channels:
            m = mean[ch]
            parts: list[list[Array]] = [[], [], []]
            for i, j in spans:
                c, g = centred[: j - i], grad[i:j, ch, :]
                subtract_into(cube[i:j, ch, :], m, c)
                # row sums and row dot products through BLAS, then their (pairwise) sum
                for s, row_values in enumerate((c @ ones, g @ ones, xp.vecdot(g, c))):
                    parts[s].append(xp.sum(row_values))
            per_channel.append([pairwise_sum(p) for p in parts])
        return per_channel

    channels = [t for piece in _parallel(channels_piece, _pieces(range(lay.c))) for t in piece]
    return tuple(xp.stack([t[s] for t in channels]) for s in range(3))  # type: ignore[return-value]


def centred_affine(
    x: Array, dy: Array, mean: Array, k: Array, p: Array, q: Array, lay: Layout, xp: ModuleType
) -> Array:
    """``dy * k + ((x - mean) * p + q)`` with per-channel ``mean``, ``k``, ``p``, ``q`` (shape ``(C,)``).

    The plain expression's operations and roundings, block by block: the
    centred block is formed in a reused buffer, scaled and shifted in cache,
    and added into the output block ``dy * k``. One read of ``x`` and ``dy``,
    one write of the result.
    """
    out = xp.empty_like(x)
    if lay.b == 1:
        (rows, tail), (grad_rows, grad_tail), (out_rows, out_tail) = (
            _rows(x, lay, xp),
            _rows(dy, lay, xp),
            _rows(out, lay, xp),
        )
        blocks = _blocks(*rows.shape, x, xp)
        tiled = [_tiled(v, lay.k, xp) for v in (mean, k, p, q)]

        def rows_piece(piece: Sequence[tuple[int, int]]) -> None:
            centred = _buffer(blocks, rows.shape[1], x, xp)
            for i, j in piece:
                c, o = centred[: j - i], out_rows[i:j]
                subtract_into(rows[i:j], tiled[0], c)
                c *= tiled[2]
                c += tiled[3]
                multiply_into(grad_rows[i:j], tiled[1], o)
                o += c

        _parallel(rows_piece, _pieces(blocks))
        if tail is not None:
            c = tail - mean
            c *= p
            c += q
            multiply_into(grad_tail, k, out_tail)
            out_tail += c
        return out
    shape = (lay.a, lay.c, lay.b)
    cube, grad, res = xp.reshape(x, shape), xp.reshape(dy, shape), xp.reshape(out, shape)
    spans = _blocks(lay.a, lay.b, x, xp)

    def channels_piece(channels: Sequence[int]) -> None:
        centred = _buffer(spans, lay.b, x, xp)
        for ch in channels:
            m, kc, pc, qc = mean[ch], k[ch], p[ch], q[ch]
            for i, j in spans:
                c, o = centred[: j - i], res[i:j, ch, :]
                subtract_into(cube[i:j, ch, :], m, c)
                c *= pc
                c += qc
                multiply_into(grad[i:j, ch, :], kc, o)
                o += c

    _parallel(channels_piece, _pieces(range(lay.c)))
    return out


# ---------------------------------------------------------------------------
# The schedule
# ---------------------------------------------------------------------------


def _single_channel(shape: Sequence[int], axes: Sequence[int]) -> int | None:
    """The one axis a reduction over ``axes`` keeps, or None."""
    kept = [i for i in range(len(shape)) if i not in {a % len(shape) for a in axes}]
    return kept[0] if len(kept) == 1 else None


def _channel_axis_of(shape: tuple[int, ...], *param_shapes: tuple[int, ...]) -> int | None:
    """The one axis along which keepdims-shaped parameters vary, or None."""
    varying = set()
    for p in param_shapes:
        if len(p) != len(shape):
            return None
        for i, (n, m) in enumerate(zip(shape, p, strict=True)):
            if m != 1:
                if m != n:
                    return None
                varying.add(i)
    return varying.pop() if len(varying) == 1 else None


def _vector(v: Array, kept: tuple[int, ...], xp: ModuleType) -> Array:
    """A keepdims per-channel array as a contiguous ``(C,)`` vector."""
    return xp.reshape(xp.broadcast_to(v, kept), (-1,))


class NumpyBlocked(Ops):
    """Eager, C-contiguous NumPy arrays of float32/float64 and at least 1 MiB, one channel axis (module docstring).

    The statistics and the backward's sums add the same terms in another order
    (BLAS dots along cache-sized blocks, the blocks' sums added pairwise); the
    output's scale-and-shift and the backward's elementwise gradient are the
    reference's operations, bit for bit.
    """

    name = "numpy-blocked"
    bounds = {
        "moments": "sum order",
        "affine": "bitwise",
        "coefficients": "bitwise",
        "backward_sums": "sum order",
        "backward_dx": "bitwise",
    }

    def moments(self, x: Array, axes: Sequence[int], xp: ModuleType) -> tuple[Array, Array]:
        channel = _single_channel(x.shape, axes)
        lay = None if channel is None else layout(x, channel, xp)
        if lay is None:
            return super().moments(x, axes, xp)
        kept = tuple(n if i == channel else 1 for i, n in enumerate(x.shape))
        mean, variance = channel_moments(x, lay, xp)
        return xp.reshape(mean, kept), xp.reshape(variance, kept)

    def affine(self, x: Array, scale: Array, shift: Array, center: Array | None, xp: ModuleType) -> Array:
        params = (scale, shift) if center is None else (scale, shift, center)
        if any(getattr(p, "dtype", None) != x.dtype for p in params):
            return super().affine(x, scale, shift, center, xp)
        channel = _channel_axis_of(tuple(x.shape), *(tuple(p.shape) for p in params))
        lay = None if channel is None else layout(x, channel, xp)
        if lay is None:
            return super().affine(x, scale, shift, center, xp)
        kept = tuple(n if i == channel else 1 for i, n in enumerate(x.shape))
        vectors = [None if p is None else _vector(p, kept, xp) for p in (scale, shift, center)]
        return affine(x, vectors[0], vectors[1], vectors[2], lay, xp)

    def backward_sums(
        self, x: Array, dy: Array, mean: Array, axes: Sequence[int], xp: ModuleType
    ) -> tuple[Array, Array, Array]:
        channel = _single_channel(x.shape, axes)
        lay = None if channel is None or dy.dtype != x.dtype else layout(x, channel, xp)
        if lay is None or layout(dy, channel, xp) is None:
            return super().backward_sums(x, dy, mean, axes, xp)
        kept = tuple(n if i == channel else 1 for i, n in enumerate(x.shape))
        sums = centred_sums(x, dy, _vector(mean, kept, xp), lay, xp)
        return tuple(xp.reshape(v, kept) for v in sums)  # type: ignore[return-value]

    def backward_dx(self, x: Array, dy: Array, mean: Array, k: Array, p: Array, q: Array, xp: ModuleType) -> Array:
        params = (mean, k, p, q)
        channel = _channel_axis_of(tuple(x.shape), *(tuple(v.shape) for v in params))
        same_types = dy.dtype == x.dtype and all(v.dtype == x.dtype for v in params)
        lay = None if channel is None or not same_types else layout(x, channel, xp)
        if lay is None or layout(dy, channel, xp) is None:
            return super().backward_dx(x, dy, mean, k, p, q, xp)
        kept = tuple(n if i == channel else 1 for i, n in enumerate(x.shape))
        return centred_affine(x, dy, *(_vector(v, kept, xp) for v in params), lay, xp)
