"""The reference's bulk operations as compiled CPU loops (Numba): one read of each input per pass.

NumPy evaluates ``(x - center) * scale + shift`` as three ufunc passes; even
block by block in cache (``numpy_blocked``) each pass costs about as much as a
copy of the block. A compiled loop does the three operations on a value while
it is in a register: one read of ``x`` and one write of ``y``, with the same
three roundings in the same order (no fused multiply-add: Numba compiles
without floating-point contraction unless asked, and the tests hold every
elementwise pass to the reference bit for bit). The statistics and the
backward's sums are loops too, accumulated in float64 whatever the input's
dtype, and rounded once (the per-channel arithmetic between a training call's
passes is one compiled loop as well, `coefficients`, with the reference's
roundings):

* float32 statistics take one pass: the float64 sums of ``d = x - s`` and
  ``d ** 2`` around a per-channel float32 shift ``s`` (the mean of the
  channel's first values). The difference of two float32 values is exact in
  float64; its square and the sums carry float64 rounding only, and
  ``mean = s + sum(d) / n``, ``variance = sum(d ** 2) / n - (sum(d) / n) ** 2``
  keep every digit float32 can show (the subtraction costs float64 digits in
  proportion to ``(mean - s) ** 2 / variance``, near 1 for a shift taken from
  the data);
* float64 statistics are the reference's corrected two passes
  (`arraybn._reference.corrected_moments`) with float64 sums;
* the backward's three sums take one pass over ``x`` and ``dy``, the centred
  values rounded as the reference's and the products formed in float64;
* the first level of every sum is short: blocks of `_LEAF` rows (channels
  last), or runs of 8 * `_LEAF` values of a channel's row split over vector
  lanes; the blocks' and runs' float64 partial sums are then added one after
  the other, and the pieces' pairwise. With float64 partial sums this is at
  least as accurate as the reference's float32 blocked sums.

Outputs of `_STREAM_BYTES` and more are written with streaming (non-temporal) stores: a row is
computed into a small buffer and copied out in 64-byte lines that are not read into the caches
first (the same values; such outputs leave the caches anyway, and memcpy does the same).

Where the reference's float32 sums could overflow while float64 ones do not
(a total beyond 2**120), the statistics are left to the next schedule's
float32 arithmetic, so infinities appear where TensorFlow's float32 sums make them.

The input is seen as numpy_blocked sees it: ``(A, C, B)`` around one channel
axis. Channels last (``B == 1``) as rows of ``k`` whole channel vectors and a
tail; each channel position along a row is a vector lane, and the sums add
eight rows at a time (the statistics; the backward's sums four) into the
partial sums of their block. Channels in the middle as ``A * C`` rows of ``B``
values, one channel's each, summed in runs whose additions may be
reassociated (vector lanes). The rows are cut into at most eight pieces,
never depending on the thread count; the pieces' partial sums are added in
piece order: the same bits on any number of threads. NumPy arrays' pieces run
on the calling thread and numpy_blocked's thread pool (the loops release the
GIL); torch tensors' on torch's own OpenMP threads, as one parallel region of
the GNU OpenMP runtime torch loaded (see "torch's OpenMP threads" below), where
torch has one and the process is not a forked child; ``ARRAYBN_TORCH_OPENMP=0``
keeps them on arraybn's pool.

Applies to eager, C-contiguous float32/float64 arrays of at least 1 MiB with
one channel axis: NumPy arrays, and torch CPU tensors outside autograd and
``torch.compile`` (seen as NumPy arrays on the same memory, without a copy). It
needs the optional ``numba`` package (``pip install "arraybn[fast]"``);
without it each library keeps its own schedule, and where the loops do not
apply (small or strided arrays, several channel axes) that schedule computes.
The loops are compiled on first use (about a second each) and cached on disk;
the parallel-region bodies for torch's threads (a third of a second each) are
compiled once per process.
``tests/test_schedule_numba.py`` holds this schedule to the reference.
"""

from __future__ import annotations

import functools
import math
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

from .._reference import Coefficients, MovingUpdate, Ops, decay_operand, fused_factors
from . import numpy_blocked as blocked
from . import _DISABLED, disable, falls_back

Array = Any

_LEAF = 64  # values (rows, or 8-wide lanes) added into one partial sum before it moves up a level
_SUM_ROW_ELEMENTS = 4096  # channels-last rows of the sums hold at least this many elements (fewer partial-sum updates)
_MAP_ROW_ELEMENTS = 64  # and of the elementwise passes (rows of 1024 ran 20-30% slower with 64 channels)
_STREAM_ROW_ELEMENTS = 1024  # and of those with streaming stores: a buffer's worth (rows of 64 ran twice as slow)
_MIN_BYTES = 1 << 20  # below this the reference's expressions are as fast
_STREAM_BYTES = 16 << 20  # outputs this large are written with streaming stores (they leave the caches anyway)
_STREAM_CHUNK = 1024  # values computed into the buffer that streaming stores copy out (a multiple of 64 bytes)
_MIN_INNER = 64  # channels in the middle: shorter runs per channel are left to the reference
_OVERFLOW = 2.0**120  # a float64 total beyond this: the reference's float32 sums might overflow


@functools.cache
def available() -> bool:
    """True when Numba is installed (looked up once; it is imported only when the schedule first runs)."""
    import importlib.util

    return importlib.util.find_spec("numba") is not None


@functools.cache
def kernels() -> Any:
    """The compiled loops (Numba is imported and the loops compiled here, once per process and dtype)."""
    import numba
    import numpy as np

    def compiler(**options: Any) -> Any:
        """``numba.njit`` with a disk cache where Numba finds a writable place for one, else without."""

        def compile_(fn: Any) -> Any:
            try:
                return numba.njit(nogil=True, cache=True, boundscheck=False, **options)(fn)
            except RuntimeError:  # "cannot cache function ...: no locator available" (a read-only install)
                return numba.njit(nogil=True, boundscheck=False, **options)(fn)

        return compile_

    jit = compiler()
    overflow_limit = _OVERFLOW
    # the sums only may be reassociated (vector lanes); no contraction, so no fused multiply-add anywhere
    sums = compiler(fastmath={"reassoc"})

    # ---- channels last: x is (rows, W); every position j along a row is one channel's lane ----
    # Rows are added eight at a time (a tree of pairs, one load and store of the partial sums per
    # eight rows; the last rows of a piece four or one at a time) into float64 partial sums of their
    # block of `_LEAF` rows (a loop along the rows: vector lanes, no reassociation); the blocks'
    # partial sums are added into ``out``.

    @jit
    def add_centred_rows(v0, v1, v2, v3, m, s, q):
        for j in range(v0.shape[0]):
            mj = m[j]
            d0 = np.float64(v0[j] - mj)
            d1 = np.float64(v1[j] - mj)
            d2 = np.float64(v2[j] - mj)
            d3 = np.float64(v3[j] - mj)
            s[j] += (d0 + d1) + (d2 + d3)
            q[j] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)

    @jit
    def add_centred_rows8(x, i, m, s, q):  # rows i .. i + 7 of x, added as a tree of pairs
        for j in range(x.shape[1]):
            mj = m[j]
            d0 = np.float64(x[i, j] - mj)
            d1 = np.float64(x[i + 1, j] - mj)
            d2 = np.float64(x[i + 2, j] - mj)
            d3 = np.float64(x[i + 3, j] - mj)
            d4 = np.float64(x[i + 4, j] - mj)
            d5 = np.float64(x[i + 5, j] - mj)
            d6 = np.float64(x[i + 6, j] - mj)
            d7 = np.float64(x[i + 7, j] - mj)
            s[j] += ((d0 + d1) + (d2 + d3)) + ((d4 + d5) + (d6 + d7))
            q[j] += ((d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)) + ((d4 * d4 + d5 * d5) + (d6 * d6 + d7 * d7))

    @jit
    def add_product_rows(v0, v1, g0, g1, m, s0, s1, s2):
        for j in range(v0.shape[0]):
            mj = m[j]
            c0 = np.float64(v0[j] - mj)
            c1 = np.float64(v1[j] - mj)
            h0 = np.float64(g0[j])
            h1 = np.float64(g1[j])
            s0[j] += c0 + c1
            s1[j] += h0 + h1
            s2[j] += h0 * c0 + h1 * c1

    @jit
    def add_product_rows4(x, dy, i, m, s0, s1, s2):  # rows i .. i + 3 of x and dy, added as a tree of pairs
        for j in range(x.shape[1]):
            mj = m[j]
            c0 = np.float64(x[i, j] - mj)
            c1 = np.float64(x[i + 1, j] - mj)
            c2 = np.float64(x[i + 2, j] - mj)
            c3 = np.float64(x[i + 3, j] - mj)
            h0 = np.float64(dy[i, j])
            h1 = np.float64(dy[i + 1, j])
            h2 = np.float64(dy[i + 2, j])
            h3 = np.float64(dy[i + 3, j])
            s0[j] += (c0 + c1) + (c2 + c3)
            s1[j] += (h0 + h1) + (h2 + h3)
            s2[j] += (h0 * c0 + h1 * c1) + (h2 * c2 + h3 * c3)

    @jit
    def rows_centred(x, mean, lo, hi, out):  # out[0, j] += sum d, out[1, j] += sum d*d; d = x - mean (mean's dtype)
        leaf = np.zeros((2, x.shape[1]), np.float64)
        for start in range(lo, hi, _LEAF):
            stop = min(start + _LEAF, hi)
            leaf[:] = 0.0
            i = start
            while i + 8 <= stop:
                add_centred_rows8(x, i, mean, leaf[0], leaf[1])
                i += 8
            while i + 4 <= stop:
                add_centred_rows(x[i], x[i + 1], x[i + 2], x[i + 3], mean, leaf[0], leaf[1])
                i += 4
            while i < stop:  # the last rows: each with three copies of the mean (d = 0, exactly)
                add_centred_rows(x[i], mean, mean, mean, mean, leaf[0], leaf[1])
                i += 1
            out += leaf

    @jit
    def rows_backward_sums(x, dy, mean, lo, hi, out):  # sums of xc, dy, dy*xc; xc = x - mean (x's dtype)
        leaf = np.zeros((3, x.shape[1]), np.float64)
        zero = np.zeros(x.shape[1], x.dtype)
        for start in range(lo, hi, _LEAF):
            stop = min(start + _LEAF, hi)
            leaf[:] = 0.0
            i = start
            while i + 4 <= stop:
                add_product_rows4(x, dy, i, mean, leaf[0], leaf[1], leaf[2])
                i += 4
            while i + 2 <= stop:
                add_product_rows(x[i], x[i + 1], dy[i], dy[i + 1], mean, leaf[0], leaf[1], leaf[2])
                i += 2
            if i < stop:  # the last row, with a row of x = mean and dy = 0 (adding exact zeros)
                add_product_rows(x[i], mean, dy[i], zero, mean, leaf[0], leaf[1], leaf[2])
            out += leaf

    @jit
    def rows_affine(x, center, scale, shift, lo, hi, y):  # y = (x - center) * scale + shift, per operation
        w = x.shape[1]
        for i in range(lo, hi):
            for j in range(w):
                y[i, j] = (x[i, j] - center[j]) * scale[j] + shift[j]

    @jit
    def rows_scale(x, scale, shift, lo, hi, y):  # y = x * scale + shift, per operation
        w = x.shape[1]
        for i in range(lo, hi):
            for j in range(w):
                y[i, j] = x[i, j] * scale[j] + shift[j]

    @jit
    def rows_dx(x, dy, mean, k, p, q, lo, hi, out):  # dy * k + ((x - mean) * p + q), per operation
        w = x.shape[1]
        for i in range(lo, hi):
            for j in range(w):
                out[i, j] = dy[i, j] * k[j] + ((x[i, j] - mean[j]) * p[j] + q[j])

    # ---- channels in the middle: x is (A * C, B); row r belongs to channel r % C ----
    # A row is summed in runs of 8 * `_LEAF` values (vector lanes, reassociated within the run);
    # the runs' totals are added in float64 one after the other.

    @sums
    def run_sums(v, m):  # sum of float64(v - m), sum of its squares, over one run
        s, q = 0.0, 0.0
        for i in range(v.shape[0]):
            d = np.float64(v[i] - m)
            s += d
            q += d * d
        return s, q

    @sums
    def run_products(v, g, m):  # sums of xc = float64(v - m), of g, of g * xc, over one run
        s0, s1, s2 = 0.0, 0.0, 0.0
        for i in range(v.shape[0]):
            xc = np.float64(v[i] - m)
            gi = np.float64(g[i])
            s0 += xc
            s1 += gi
            s2 += gi * xc
        return s0, s1, s2

    @jit
    def channel_rows_centred(x, mean, c, lo, hi, out):  # out[0, ch] += sum d, out[1, ch] += sum d*d
        n = x.shape[1]
        for r in range(lo, hi):
            row = x[r]
            m = mean[r % c]
            total, squares = 0.0, 0.0
            for start in range(0, n, 8 * _LEAF):
                s, q = run_sums(row[start : start + 8 * _LEAF], m)
                total += s
                squares += q
            out[0, r % c] += total
            out[1, r % c] += squares

    @jit
    def channel_rows_backward_sums(x, dy, mean, c, lo, hi, out):  # sums of xc, dy, dy*xc per channel
        n = x.shape[1]
        for r in range(lo, hi):
            row, grad = x[r], dy[r]
            m = mean[r % c]
            t0, t1, t2 = 0.0, 0.0, 0.0
            for start in range(0, n, 8 * _LEAF):
                s0, s1, s2 = run_products(row[start : start + 8 * _LEAF], grad[start : start + 8 * _LEAF], m)
                t0 += s0
                t1 += s1
                t2 += s2
            out[0, r % c] += t0
            out[1, r % c] += t1
            out[2, r % c] += t2

    @jit
    def channel_rows_affine(x, center, scale, shift, c, lo, hi, y):
        n = x.shape[1]
        for r in range(lo, hi):
            m, a, b = center[r % c], scale[r % c], shift[r % c]
            for i in range(n):
                y[r, i] = (x[r, i] - m) * a + b

    @jit
    def channel_rows_scale(x, scale, shift, c, lo, hi, y):
        n = x.shape[1]
        for r in range(lo, hi):
            a, b = scale[r % c], shift[r % c]
            for i in range(n):
                y[r, i] = x[r, i] * a + b

    @jit
    def channel_rows_dx(x, dy, mean, k, p, q, c, lo, hi, out):
        n = x.shape[1]
        for r in range(lo, hi):
            ch = r % c
            m, kc, pc, qc = mean[ch], k[ch], p[ch], q[ch]
            for i in range(n):
                out[r, i] = dy[r, i] * kc + ((x[r, i] - m) * pc + qc)

    @jit
    def first_rows_shift(x, rows, out):  # float32 x (a, c): per column, float64(float32(mean of the first rows))
        c = x.shape[1]
        for j in range(c):
            out[j] = np.float64(x[0, j])
        for r in range(1, rows):  # row after row, as NumPy's reduction along the first axis adds them
            for j in range(c):
                out[j] += np.float64(x[r, j])
        for j in range(c):
            m = np.float64(np.float32(out[j] / rows))
            out[j] = m if np.isfinite(m) else 0.0

    @jit
    def finish_shifted_moments(parts, k, tail, has_tail, shift, n, overflow, mean, variance):
        """float32 statistics from the pieces' float64 sums ``parts`` (pieces, 2, k * C) around ``shift``: the
        pieces added pairwise, a row's k channel vectors one after the other, then the tail's (the steps of
        `_pairwise`, `_View.fold` and `channel_moments`, in their order; ``parts`` is overwritten: a pair's
        sum goes to the slot of its level's index, below the slots still to be read); ``overflow[0]`` set
        where the reference's float32 sums might overflow."""
        work = parts
        m = work.shape[0]
        while m > 1:  # ((p0 + p1) + (p2 + p3)) + ...: the pairs of _pairwise, level by level
            half = m // 2
            for i in range(half):
                work[i] = work[2 * i] + work[2 * i + 1]
            if m % 2:
                work[half] = work[m - 1]
            m = half + m % 2
        c = shift.shape[0]
        over = False
        for j in range(c):
            s0, s1 = work[0, 0, j], work[0, 1, j]
            for r in range(1, k):
                s0 += work[0, 0, r * c + j]
                s1 += work[0, 1, r * c + j]
            if has_tail:
                s0 += tail[0, j]
                s1 += tail[1, j]
            if abs(shift[j] * n + s0) > overflow_limit or abs(s1) > overflow_limit:
                over = True
            d = s0 / n
            v = s1 / n - d * d
            variance[j] = v if (v >= 0.0 or v != v) else 0.0  # np.maximum(v, 0.0); NaN kept
            mean[j] = shift[j] + d  # rounded to float32 by the store
        overflow[0] = over

    # ---- per-channel arithmetic between the passes (Ops.coefficients; _kernels.cu's two kernels) ----
    # Every operation is one IEEE operation in the vectors' dtype (float32 scalars stay float32 in Numba);
    # ``root`` is ``sqrt(variance + epsilon)`` in float64 for float32 vectors, formed by the caller with the
    # arrays' own library (torch's square root is not correctly rounded); ``gamma / root`` is rounded once
    # by the store: the reference's bits.

    @jit
    def fused_coefficients(means, variances, root, gamma, beta, moving_mean, moving_variance, keep, mean_factor,
                           variance_factor, update, replace, center, scale, shift, new_mean, new_variance):  # fmt: skip
        for i in range(means.shape[0]):
            mean, variance = means[i], variances[i]
            center[i] = mean
            scale[i] = np.float64(gamma[i]) / root[i]
            shift[i] = beta[i]
            if replace:
                new_mean[i] = mean_factor * mean
                new_variance[i] = variance_factor * variance
            elif update:
                new_mean[i] = keep * moving_mean[i] + mean_factor * mean
                new_variance[i] = keep * moving_variance[i] + variance_factor * variance

    @jit
    def coefficients(means, variances, root, gamma, beta, moving_mean, moving_variance, decay, has_gamma, has_beta,
                     update, scale, shift, new_mean, new_variance):  # fmt: skip
        for i in range(means.shape[0]):
            mean, variance = means[i], variances[i]
            scale[i] = np.float64(gamma[i]) / root[i] if has_gamma else 1.0 / root[i]
            inv = scale[i]
            shift[i] = beta[i] - mean * inv if has_beta else -mean * inv
            if update:
                new_mean[i] = moving_mean[i] - (moving_mean[i] - mean) * decay
                new_variance[i] = moving_variance[i] - (moving_variance[i] - variance) * decay

    # ---- the elementwise passes with streaming stores (outputs of at least `_STREAM_BYTES`) ----
    # A row is computed, `_STREAM_CHUNK` values at a time, into a small buffer (the same operations,
    # the same bits) and copied to the output with non-temporal stores: the output's cache lines are
    # written without being read first and without evicting the input, as memcpy does for large
    # copies. A fence ends each piece. The chunks are counted by an index (not a stepped range), so
    # that the compiler sees the element indices as non-negative and keeps the loops vectorized.

    stream = _stream_intrinsics()
    stream_row, store_fence = stream.row, stream.fence
    chunk = _STREAM_CHUNK

    @jit
    def rows_affine_stream(x, center, scale, shift, lo, hi, y):
        w = x.shape[1]
        buf = np.empty(min(w, chunk), y.dtype)
        for i in range(lo, hi):
            for piece in range((w + chunk - 1) // chunk):
                a = piece * chunk
                n = min(chunk, w - a)
                for j in range(n):
                    k = a + j
                    buf[j] = (x[i, k] - center[k]) * scale[k] + shift[k]
                stream_row(y, i, a, buf, n)
        store_fence()

    @jit
    def rows_scale_stream(x, scale, shift, lo, hi, y):
        w = x.shape[1]
        buf = np.empty(min(w, chunk), y.dtype)
        for i in range(lo, hi):
            for piece in range((w + chunk - 1) // chunk):
                a = piece * chunk
                n = min(chunk, w - a)
                for j in range(n):
                    k = a + j
                    buf[j] = x[i, k] * scale[k] + shift[k]
                stream_row(y, i, a, buf, n)
        store_fence()

    @jit
    def channel_rows_affine_stream(x, center, scale, shift, c, lo, hi, y):
        w = x.shape[1]
        buf = np.empty(min(w, chunk), y.dtype)
        for r in range(lo, hi):
            m, s, t = center[r % c], scale[r % c], shift[r % c]
            for piece in range((w + chunk - 1) // chunk):
                a = piece * chunk
                n = min(chunk, w - a)
                for j in range(n):
                    buf[j] = (x[r, a + j] - m) * s + t
                stream_row(y, r, a, buf, n)
        store_fence()

    @jit
    def channel_rows_scale_stream(x, scale, shift, c, lo, hi, y):
        w = x.shape[1]
        buf = np.empty(min(w, chunk), y.dtype)
        for r in range(lo, hi):
            s, t = scale[r % c], shift[r % c]
            for piece in range((w + chunk - 1) // chunk):
                a = piece * chunk
                n = min(chunk, w - a)
                for j in range(n):
                    buf[j] = x[r, a + j] * s + t
                stream_row(y, r, a, buf, n)
        store_fence()

    @jit
    def rows_dx_stream(x, dy, mean, k, p, q, lo, hi, out):
        w = x.shape[1]
        buf = np.empty(min(w, chunk), out.dtype)
        for i in range(lo, hi):
            for piece in range((w + chunk - 1) // chunk):
                a = piece * chunk
                n = min(chunk, w - a)
                for j in range(n):
                    h = a + j
                    buf[j] = dy[i, h] * k[h] + ((x[i, h] - mean[h]) * p[h] + q[h])
                stream_row(out, i, a, buf, n)
        store_fence()

    @jit
    def channel_rows_dx_stream(x, dy, mean, k, p, q, c, lo, hi, out):
        w = x.shape[1]
        buf = np.empty(min(w, chunk), out.dtype)
        for r in range(lo, hi):
            ch = r % c
            m, kc, pc, qc = mean[ch], k[ch], p[ch], q[ch]
            for piece in range((w + chunk - 1) // chunk):
                a = piece * chunk
                n = min(chunk, w - a)
                for j in range(n):
                    buf[j] = dy[r, a + j] * kc + ((x[r, a + j] - m) * pc + qc)
                stream_row(out, r, a, buf, n)
        store_fence()

    del stream
    return dict(locals())


def _stream_intrinsics() -> Any:
    """Two Numba intrinsics: ``row(dst, i, start, src, count)`` copies ``src[:count]`` to ``dst[i, start:start +
    count]`` (C-contiguous arrays of one dtype of 4 or 8 bytes; no views are made, so no reference counts
    are touched), from the first 64-byte boundary of the destination on in 64-byte non-temporal stores
    (the rest in 4-byte words); ``fence()`` orders those stores before any later one (SFENCE on x86, else
    ``fence seq_cst``)."""
    import platform
    import types

    from llvmlite import ir
    from numba import types as nt
    from numba.core import cgutils
    from numba.extending import intrinsic

    byte, word, i64 = ir.IntType(8), ir.IntType(32), ir.IntType(64)
    line = ir.VectorType(byte, 64)

    @intrinsic
    def row(typingctx: Any, dst: Any, i: Any, start: Any, src: Any, count: Any) -> Any:
        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            d_ty, _, _, s_ty, _ = signature.args
            d = context.make_array(d_ty)(context, builder, args[0])
            s = context.make_array(s_ty)(context, builder, args[3])
            size = ir.Constant(i64, context.get_abi_sizeof(context.get_data_type(d_ty.dtype)))
            row_start = builder.mul(args[1], builder.extract_value(d.strides, 0))
            offset = builder.add(row_start, builder.mul(args[2], size))
            dp = builder.gep(builder.bitcast(d.data, byte.as_pointer()), [offset])
            sp = builder.bitcast(s.data, byte.as_pointer())
            nbytes = builder.mul(args[4], size)
            address = builder.ptrtoint(dp, i64)
            head = builder.and_(builder.sub(ir.Constant(i64, 0), address), ir.Constant(i64, 63))
            head = builder.select(builder.icmp_unsigned("<", nbytes, head), nbytes, head)
            lines = builder.udiv(builder.sub(nbytes, head), ir.Constant(i64, 64))
            body_end = builder.add(head, builder.mul(lines, ir.Constant(i64, 64)))
            hint = builder.module.add_metadata([ir.Constant(ir.IntType(32), 1)])
            words = (builder.bitcast(sp, word.as_pointer()), builder.bitcast(dp, word.as_pointer()))

            def copy_words(lo: Any, hi: Any) -> None:  # offsets and sizes are multiples of 4 bytes
                four = ir.Constant(i64, 4)
                with cgutils.for_range_slice(builder, builder.udiv(lo, four), builder.udiv(hi, four),
                                             ir.Constant(i64, 1)) as (k, _):  # fmt: skip
                    builder.store(builder.load(builder.gep(words[0], [k])), builder.gep(words[1], [k]))

            copy_words(ir.Constant(i64, 0), head)
            with cgutils.for_range_slice(builder, head, body_end, ir.Constant(i64, 64)) as (k, _):
                value = builder.load(builder.bitcast(builder.gep(sp, [k]), line.as_pointer()), align=1)
                store = builder.store(value, builder.bitcast(builder.gep(dp, [k]), line.as_pointer()), align=64)
                store.set_metadata("nontemporal", hint)
            copy_words(body_end, nbytes)
            return context.get_dummy_value()

        arrays = isinstance(dst, nt.Array) and isinstance(src, nt.Array)
        if not arrays or dst.ndim != 2 or src.ndim != 1 or dst.layout != "C" or src.layout != "C":
            return None
        if dst.dtype != src.dtype or dst.dtype.bitwidth % 32:
            return None
        return nt.void(dst, nt.intp, nt.intp, src, nt.intp), codegen

    x86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686", "x86")

    @intrinsic
    def fence(typingctx: Any) -> Any:
        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            if x86:  # SFENCE: what orders non-temporal stores (a locked instruction need not)
                sfence = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), []),
                                                        "llvm.x86.sse.sfence")  # fmt: skip
                builder.call(sfence, [])
            else:
                builder.fence("seq_cst")
            return context.get_dummy_value()

        return nt.void(), codegen

    return types.SimpleNamespace(row=row, fence=fence)


# ---------------------------------------------------------------------------
# Layout and pieces
# ---------------------------------------------------------------------------


class _View:
    """``x`` (a NumPy array) as the loops see it: channels-last rows and tail, or ``(A * C, B)`` rows."""

    def __init__(self, x: Array, lay: blocked.Layout, np: ModuleType) -> None:
        self.lay = lay
        self.last = lay.b == 1
        if self.last:
            flat = x.reshape(-1)
            full = lay.a // lay.k
            split = full * lay.k * lay.c
            self.rows = flat[:split].reshape(full, lay.k * lay.c)
            self.tail = flat[split:].reshape(-1, lay.c) if split < flat.size else None
        else:
            self.rows = x.reshape(lay.a * lay.c, lay.b)
            self.tail = None

    def tiled(self, v: Array) -> Array:
        """A ``(C,)`` vector repeated along a channels-last row."""
        return _tiled(v, self.lay)

    def fold(self, row_totals: Array, tail_totals: Array | None) -> Array:
        """Per-row-position float64 totals ``(..., k * C)`` summed to per-channel totals ``(..., C)``."""
        if not self.last:
            return row_totals
        lead = row_totals.shape[:-1]
        folded = row_totals.reshape(*lead, self.lay.k, self.lay.c).sum(axis=-2)
        return folded if tail_totals is None else folded + tail_totals


def _tiled(v: Array, lay: blocked.Layout) -> Array:
    """A ``(C,)`` vector repeated along a channels-last row of layout ``lay`` (the vector itself for channels in
    the middle, or rows of one channel vector)."""
    import numpy as np

    if lay.b != 1 or lay.k == 1:
        return v
    out = np.empty((lay.k, lay.c), v.dtype)
    out[...] = v  # (np.tile's Python steps cost more than the copy)
    return out.reshape(-1)


def _layout(x: Array, channel: int, np: ModuleType, row_elements: int = _SUM_ROW_ELEMENTS) -> blocked.Layout | None:
    """The loops' layout of ``x`` (a NumPy array) around ``channel`` (channels last: rows of at least
    ``row_elements``), or None for the reference."""
    if not x.flags.c_contiguous or x.dtype not in (np.float32, np.float64) or x.nbytes < _MIN_BYTES:
        return None
    shape = tuple(x.shape)
    a, c, b = math.prod(shape[:channel]), shape[channel], math.prod(shape[channel + 1 :])
    if a == 0 or c == 0 or b == 0:
        return None
    if b == 1:
        return blocked.Layout(a, c, 1, min(a, -(-row_elements // c)))
    return None if b < _MIN_INNER else blocked.Layout(a, c, b, 1)


def _run_pieces(
    name: str, n: int, head: tuple[Any, ...], tail: tuple[Any, ...], *, lanes: int = 0, width: int = 0, openmp: bool
) -> Array | None:
    """``kernels()[name](*head, lo, hi, *tail)`` for every piece ``[lo, hi)`` of the ``n`` rows (numpy_blocked's
    pieces: at most eight runs of near-equal length, ``n * i // count`` to ``n * (i + 1) // count``, the same
    on any thread count; the parallel-region bodies cut them by the same formula).

    With ``lanes``, each piece sums into its own zeroed float64 ``out`` of
    shape ``(lanes, width)`` (the kernel's last argument), and the outs are
    returned stacked in piece order (one array, ``(pieces, lanes, width)``).
    ``openmp`` (torch tensors): the pieces run on torch's own OpenMP threads
    where that route is open (`_torch_threads`),
    else on the calling thread and numpy_blocked's pool. A piece computes the
    same bits on whichever thread runs it.
    """
    import numpy as np

    spans = blocked._pieces(range(n))
    outs = np.zeros((len(spans), lanes, width), np.float64) if lanes else None
    if not (openmp and _torch_threads(name, n, len(spans), head, (outs,) if lanes else tail, bool(lanes))):
        kernel = kernels()[name]
        blocked._parallel(
            lambda i: kernel(*head, spans[i].start, spans[i].stop, *((outs[i],) if lanes else tail)), range(len(spans))
        )
    return outs


# ---------------------------------------------------------------------------
# torch's OpenMP threads
# ---------------------------------------------------------------------------
# torch runs its CPU operations on OpenMP threads that spin on the cores for a while after each
# operation (GNU OpenMP's default wait policy). Threads of arraybn's own pool, started right after
# a torch operation, share the cores with those spinning threads and run at a fraction of their
# speed. For torch tensors the pieces therefore run as an OpenMP parallel region of the runtime
# torch itself loaded (GNU OpenMP's ``GOMP_parallel``, the entry point of ``#pragma omp
# parallel``), on the threads torch's own operations use: a compiled body per loop unpacks the
# arrays from their addresses and runs piece ``t``, ``t + T``, ... on thread ``t`` of ``T``.
# The route is closed (and the pool used) without GNU OpenMP in torch, in a forked child (GNU
# OpenMP's threads do not survive a fork), with ``ARRAYBN_TORCH_OPENMP=0``, or after a failure
# (one warning).

_OPENMP_STATE: dict[str, Any] = {"forked": False, "failed": None}


def _after_fork_in_child() -> None:
    _OPENMP_STATE["forked"] = True


os.register_at_fork(after_in_child=_after_fork_in_child)


@functools.cache
def _openmp() -> Any:
    """torch's GNU OpenMP runtime: ``GOMP_parallel`` and the thread number and count, or None."""
    import ctypes
    import types

    torch = sys.modules.get("torch")
    if torch is None or not torch.backends.openmp.is_available():
        return None
    path = _torch_libgomp(os.path.dirname(os.path.abspath(torch.__file__)))
    if path is None:
        return None
    lib = ctypes.CDLL(path)  # the library torch loaded: the same handle
    parallel = lib.GOMP_parallel
    parallel.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
    parallel.restype = None
    number, count = lib.omp_get_thread_num, lib.omp_get_num_threads
    for f in (number, count):
        f.argtypes, f.restype = [], ctypes.c_int
    return types.SimpleNamespace(parallel=parallel, thread_number=number, thread_count=count)


def _torch_libgomp(torch_dir: str) -> str | None:
    """The GNU OpenMP library mapped into this process from torch's installation, or None."""
    roots = (torch_dir + os.sep, os.path.dirname(torch_dir) + os.sep + "torch.libs" + os.sep)
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split(maxsplit=5)[-1].strip() for line in maps if "gomp" in line}
    except OSError:  # not Linux
        return None
    found = sorted(p for p in paths if p.startswith(roots) and os.path.basename(p).startswith("libgomp"))
    return found[0] if found else None


def _torch_threads(
    name: str, n: int, count: int, head: tuple[Any, ...], tail: tuple[Any, ...], summing: bool
) -> bool:
    """Run the pieces of `_run_pieces` on torch's OpenMP threads; False where that route is closed."""
    if _OPENMP_STATE["forked"] or _OPENMP_STATE["failed"] or os.environ.get("ARRAYBN_TORCH_OPENMP", "1") == "0":
        return False
    import torch

    threads = min(blocked.thread_count(), torch.get_num_threads(), count)
    if threads < 2:
        return False
    try:
        if _openmp() is None:
            return False
        args = (*head, *tail)
        _launch(name, tuple(_kind(a) for a in args), len(head), summing)(n, count, threads, *args)
    except Exception as error:  # noqa: BLE001 - the route closes; the pool computes
        _OPENMP_STATE["failed"] = f"{type(error).__name__}: {error}"
        warnings.warn(
            f"arraybn: running the numba-kernels loops on torch's OpenMP threads failed ({_OPENMP_STATE['failed']}); "
            "they run on arraybn's own threads instead (the same results).",
            RuntimeWarning,
            stacklevel=2,
        )
        return False
    return True


def _kind(a: Any) -> tuple[Any, ...]:
    """How a body receives an argument: ``("i",)`` an integer, else ``(ndim, dtype)`` of an array."""
    return ("i",) if isinstance(a, int) else (a.ndim, a.dtype.str)


@functools.cache
def _launch(name: str, kinds: tuple[tuple[Any, ...], ...], heads: int, summing: bool) -> Any:
    """``launch(n, count, threads, *args)`` for kernel ``name`` and argument kinds, compiled once per process
    (``summing``: the last argument holds one out per piece).

    ``launch`` (compiled, the GIL released) writes ``n``, ``count`` and the
    arguments (an integer, or an array's address and shape) into an int64
    block and runs ``GOMP_parallel`` with the compiled region body, which
    unpacks them and runs pieces ``t, t + T, ...`` on thread ``t`` of ``T``. One
    compiled call per pass: reading addresses through ``ndarray.ctypes`` in
    Python costs more than a small pass, when the interpreter's data has left
    the caches.
    """
    import numba
    import numpy as np
    from numba.core import cgutils
    from numba.extending import intrinsic

    omp = _openmp()

    @intrinsic
    def address(typingctx: Any, value: Any) -> Any:
        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            return builder.inttoptr(args[0], cgutils.voidptr_t)

        return numba.types.voidptr(value), codegen

    namespace: dict[str, Any] = {
        "carray": numba.carray, "address": address, "kernel": kernels()[name], "int64": np.int64,
        "uint32": np.uint32, "empty": np.empty, "thread_number": omp.thread_number,
        "thread_count": omp.thread_count, "parallel": omp.parallel,
    }  # fmt: skip
    unpack, pack, slot, names = [], [], 2, []
    for i, kind in enumerate(kinds):
        if kind == ("i",):
            unpack.append(f"    v{i} = a[{slot}]")
            pack.append(f"    a[{slot}] = v{i}")
            slot += 1
        else:
            ndim, dtype = kind
            namespace[f"t{i}"] = np.dtype(dtype).type
            shape = ", ".join(f"a[{slot + 1 + d}]" for d in range(ndim))
            unpack.append(f"    v{i} = carray(address(a[{slot}]), ({shape},), t{i})")
            pack.append(f"    if not v{i}.flags.c_contiguous:")
            pack.append("        raise ValueError('the region body reads C-ordered memory')")
            pack.append(f"    a[{slot}] = v{i}.ctypes.data")
            pack.extend(f"    a[{slot + 1 + d}] = v{i}.shape[{d}]" for d in range(ndim))
            slot += 1 + ndim
        names.append(f"v{i}")
    tail = f"{names[heads]}[p]" if summing else ", ".join(names[heads:])
    body = "\n".join([
        "def body(data):",
        f"    a = carray(data, ({slot},), int64)",
        "    n = a[0]",
        "    count = a[1]",
        *unpack,
        "    t = thread_number()",
        "    threads = thread_count()",
        "    for p in range(t, count, threads):",
        f"        kernel({', '.join(names[:heads])}, n * p // count, n * (p + 1) // count, {tail})",
    ])  # fmt: skip
    exec(compile(body, f"<arraybn numba-kernels body {name}>", "exec"), namespace)  # noqa: S102 - our own text
    namespace["body_address"] = numba.cfunc(numba.types.void(numba.types.voidptr), nopython=True)(
        namespace["body"]
    ).address
    launch = "\n".join([
        f"def launch(n, count, threads, {', '.join(names)}):",
        f"    a = empty({slot}, int64)",
        "    a[0] = n",
        "    a[1] = count",
        *pack,
        "    parallel(address(body_address), address(a.ctypes.data), uint32(threads), uint32(0))",
        "    return a[0]  # the block lives until the region has ended",
    ])  # fmt: skip
    exec(compile(launch, f"<arraybn numba-kernels launch {name}>", "exec"), namespace)  # noqa: S102 - our own text
    return numba.njit(nogil=True)(namespace["launch"])


def _pairwise(parts: Array) -> Array:
    """`pairwise_sum` of the stacked partial sums ``parts[0], parts[1], ...``: the same pairs added in the same
    order, each level of the tree as one array operation."""
    import numpy as np

    while parts.shape[0] > 1:
        odd = parts.shape[0] % 2
        paired = parts[: parts.shape[0] - odd : 2] + parts[1::2]
        parts = np.concatenate((paired, parts[-1:])) if odd else paired
    return parts[0]


def _parts(
    view: _View, name: str, head: tuple[Any, ...], tail_head: tuple[Any, ...], lanes: int, openmp: bool
) -> tuple[Array, Array | None]:  # fmt: skip
    """``kernels()[name](*head, lo, hi, out)`` over the pieces, each into its own float64 ``out`` of ``lanes``
    rows (stacked in piece order), and the tail's (channels last) through
    ``kernels()[name](*tail_head, 0, rows, out)`` (None without a tail)."""
    import numpy as np

    width = view.rows.shape[1] if view.last else view.lay.c
    parts = _run_pieces(name, view.rows.shape[0], head, (), lanes=lanes, width=width, openmp=openmp)
    tail = None
    if view.tail is not None:
        tail = np.zeros((lanes, view.lay.c), np.float64)
        kernels()[name](*tail_head, 0, view.tail.shape[0], tail)
    return parts, tail


def _totals(view: _View, name: str, head: tuple[Any, ...], tail_head: tuple[Any, ...], lanes: int, openmp: bool) -> Any:
    """The per-channel totals of `_parts`: the pieces' added pairwise, then folded with the tail's."""
    parts, tail = _parts(view, name, head, tail_head, lanes, openmp)
    return view.fold(_pairwise(parts), tail)


# ---------------------------------------------------------------------------
# The operations on NumPy arrays (C-vectors in x's dtype)
# ---------------------------------------------------------------------------


def channel_moments(x: Array, lay: blocked.Layout, np: ModuleType, openmp: bool = False) -> tuple[Array, Array] | None:
    """Per-channel mean and biased variance, formed in float64 and rounded once; None where float32 could overflow.

    float32: one pass over ``x``, the float64 sums of ``d = x - s`` and
    ``d ** 2`` around a per-channel shift ``s`` (a float32 value: the mean of
    the channel's first values). The difference of two float32 values is exact
    in float64; its square and the sums carry float64 rounding only, so
    ``mean = s + sum(d) / n``, ``variance = sum(d ** 2) / n - (sum(d) / n) ** 2``
    lose nothing that float32 can show (the subtraction in the variance costs
    float64 digits in proportion to ``(mean - s) ** 2 / variance``, near 1 for a
    shift taken from the data). float64: the reference's corrected two passes
    with float64 sums. ``openmp``: the pieces may run on torch's threads (`_run_pieces`).
    """
    view = _View(x, lay, np)
    n = lay.a * lay.b
    if x.dtype == np.float32:
        with np.errstate(invalid="ignore", over="ignore"):
            shift = _shift(x, lay, np)
        parts, tail = _centred_parts(view, shift, openmp)
        # the pieces' sums added and folded, the statistics formed and rounded: one compiled call
        mean, variance, overflow = np.empty(lay.c, x.dtype), np.empty(lay.c, x.dtype), np.zeros(1, np.bool_)
        k = lay.k if view.last else 1
        kernels()["finish_shifted_moments"](parts, k, parts[0] if tail is None else tail, tail is not None, shift, n,
                                            overflow, mean, variance)  # fmt: skip
        return None if overflow[0] else (mean, variance)
    mean = _centred_totals(view, np.zeros(lay.c), openmp)[0] / n  # the first pass: sums around 0
    d = _centred_totals(view, mean, openmp)
    with np.errstate(invalid="ignore", over="ignore"):
        c = d[0] / n
        c = np.where(np.isfinite(c), c, 0.0)
        variance = np.maximum(d[1] / n - c * c, 0.0)
        return (mean + c).astype(x.dtype), variance.astype(x.dtype)


def _shift(x: Array, lay: blocked.Layout, np: ModuleType) -> Array:
    """Per channel, the mean of its first values (up to `_LEAF` channel vectors, or 8 * `_LEAF` values of the
    first row) rounded to ``x``'s dtype and held in float64; 0 where that is not finite, so that infinities and
    NaN reach the sums as they are. (The float64 sum divided by the count: ``mean``'s own steps, without its
    Python frames; channels last in one compiled loop, adding the rows one after the other as NumPy does.)
    Called with NumPy's overflow and invalid warnings off."""
    if lay.b == 1:
        out = np.empty(lay.c, np.float64)
        kernels()["first_rows_shift"](x.reshape(lay.a, lay.c), min(lay.a, _LEAF), out)
        return out
    first, axis = x.reshape(lay.a, lay.c, lay.b)[0, :, : 8 * _LEAF], 1
    total = np.add.reduce(first, axis=axis, dtype=np.float64)
    total /= first.shape[axis]
    total = total.astype(x.dtype).astype(np.float64)
    return np.where(np.isfinite(total), total, 0.0)


def _centred_parts(view: _View, center: Array, openmp: bool) -> tuple[Array, Array | None]:
    """The pieces' (and the tail's) float64 sums of ``d = x - center`` and of ``d ** 2`` (`_parts`; ``d`` in
    ``center``'s dtype)."""
    if view.last:
        return _parts(view, "rows_centred", (view.rows, view.tiled(center)), (view.tail, center), 2, openmp)
    return _parts(view, "channel_rows_centred", (view.rows, center, view.lay.c), (), 2, openmp)


def _centred_totals(view: _View, center: Array, openmp: bool) -> Array:
    """Per channel, the float64 sums of ``d = x - center`` and of ``d ** 2`` (``d`` in ``center``'s dtype)."""
    parts, tail = _centred_parts(view, center, openmp)
    return view.fold(_pairwise(parts), tail)


class _AffinePass:
    """``(x - center) * scale + shift`` (``center`` None: ``x * scale + shift``), rounded per operation, of
    arrays with layout ``lay`` by fixed per-channel ``(C,)`` vectors into ``y`` (`NumbaKernels.affine`; its
    tiled vectors made once: a layer's inference plan keeps one, `NumbaKernels.bind_affine`)."""

    def __init__(self, lay: blocked.Layout, scale: Array, shift: Array, center: Array | None) -> None:
        self.lay = lay
        self.vectors = (scale, shift) if center is None else (center, scale, shift)
        self.name = "rows_scale" if center is None else "rows_affine"
        self.pieces = _streamed(self.name, lay, scale.dtype.itemsize)  # the pieces' loops
        self.last = lay.b == 1
        self.tiled = tuple(_tiled(v, lay) for v in self.vectors)

    def __call__(self, x: Array, y: Array, openmp: bool) -> Array:
        import numpy as np

        src, out = _View(x, self.lay, np), _View(y, self.lay, np)
        if self.last:
            _run_pieces(self.pieces, src.rows.shape[0], (src.rows, *self.tiled), (out.rows,), openmp=openmp)
            if src.tail is not None:
                kernels()[self.name](src.tail, *self.vectors, 0, src.tail.shape[0], out.tail)
            return y
        head = (src.rows, *self.vectors, self.lay.c)
        _run_pieces(self.pieces, src.rows.shape[0], head, (out.rows,), openmp=openmp)
        return y


def _streams(nbytes: int) -> bool:
    """An elementwise pass's output of ``nbytes`` is written with streaming stores (`_streamed`)."""
    return nbytes >= _STREAM_BYTES


def _map_rows(x: Array) -> int:
    """The elements of a channels-last row of an elementwise pass whose output is shaped as ``x`` (and of its
    dtype): `_STREAM_ROW_ELEMENTS` where `_streamed` gives the streaming kernels, else `_MAP_ROW_ELEMENTS`. (A
    pass's results do not depend on its rows: each output element is the same operations on one input.)"""
    return _STREAM_ROW_ELEMENTS if _streams(math.prod(x.shape) * _itemsize(x)) else _MAP_ROW_ELEMENTS


def _streamed(name: str, lay: blocked.Layout, itemsize: int) -> str:
    """The kernel writing an elementwise pass's pieces: ``name`` (channels last) or ``channel_`` + ``name``,
    with streaming stores (its ``_stream`` twin in `kernels`) where the output has at least `_STREAM_BYTES`
    (the same bits)."""
    name = name if lay.b == 1 else f"channel_{name}"
    return f"{name}_stream" if _streams(lay.a * lay.c * lay.b * itemsize) else name


def backward_sums(
    x: Array, dy: Array, mean: Array, lay: blocked.Layout, np: ModuleType, openmp: bool = False
) -> list[Array] | None:
    """Per channel ``sum(x - mean)``, ``sum(dy)``, ``sum(dy * (x - mean))`` in x's dtype; None where float32
    could overflow."""
    view, grad = _View(x, lay, np), _View(dy, lay, np)
    if view.last:
        sums = _totals(view, "rows_backward_sums", (view.rows, grad.rows, view.tiled(mean)),
                       (view.tail, grad.tail, mean), 3, openmp)  # fmt: skip
    else:
        sums = _totals(view, "channel_rows_backward_sums", (view.rows, grad.rows, mean, lay.c), (), 3, openmp)
    if _overflows(sums, x.dtype, np):
        return None
    return [s.astype(x.dtype) for s in sums]


def backward_dx(
    x: Array, dy: Array, vectors: Sequence[Array], lay: blocked.Layout, np: ModuleType, out: Array,
    openmp: bool = False,
) -> Array:  # fmt: skip
    """``dy * k + ((x - mean) * p + q)`` with per-channel ``mean, k, p, q``, rounded per operation, into
    ``out`` (shaped as ``x``; `_empty`)."""
    src, grad, res = _View(x, lay, np), _View(dy, lay, np), _View(out, lay, np)
    pieces = _streamed("rows_dx", lay, out.dtype.itemsize)
    if src.last:
        tiled = [src.tiled(v) for v in vectors]
        _run_pieces(pieces, src.rows.shape[0], (src.rows, grad.rows, *tiled), (res.rows,), openmp=openmp)
        if src.tail is not None:
            kernels()["rows_dx"](src.tail, grad.tail, *vectors, 0, src.tail.shape[0], res.tail)
        return out
    head = (src.rows, grad.rows, *vectors, lay.c)
    _run_pieces(pieces, src.rows.shape[0], head, (res.rows,), openmp=openmp)
    return out


def _overflows(totals: Array, dtype: Any, np: ModuleType) -> bool:
    """A float32 input whose float64 totals are so large that the reference's float32 sums might overflow."""
    if dtype != np.float32:
        return False
    with np.errstate(invalid="ignore"):
        return bool(np.any(np.abs(totals) > _OVERFLOW))


# ---------------------------------------------------------------------------
# The schedule: NumPy arrays and torch CPU tensors seen as NumPy arrays
# ---------------------------------------------------------------------------


def _host(a: Array) -> Array | None:
    """``a`` as a NumPy array without a copy (NumPy, or a torch CPU tensor this schedule may take), else None.

    A torch tensor is checked from its metadata first (no data is touched) and
    seen through ``Tensor.numpy`` (zero-copy, as DLPack is, at a fraction of its
    per-call cost).
    """
    import numpy as np

    if isinstance(a, np.ndarray):
        return a
    torch = sys.modules.get("torch")  # a torch tensor exists only where torch is imported
    if torch is None or not isinstance(a, torch.Tensor) or not a.is_cpu:
        return None
    if a.dtype not in (torch.float32, torch.float64) or a.is_conj() or a.is_neg() or not a.is_contiguous():
        return None
    if a.requires_grad and torch.is_grad_enabled():  # autograd differentiates the reference's expressions
        return None
    if torch.compiler.is_compiling():  # torch.compile plans its own passes
        return None
    return a.detach().numpy() if a.requires_grad else a.numpy()


def _contiguous_host(x: Array, on_torch: bool) -> Array | None:
    """The NumPy view of an input a bound pass was made for (its type, dtype and device checked by the
    caller, outside autograd), or None where it is strided."""
    if not on_torch:
        return x if x.flags.c_contiguous else None
    if not x.is_contiguous() or x.is_neg() or x.is_conj():
        return None
    return x.numpy()


def _host_vectors(vectors: Sequence[Array | None], dtype: Any, p: int) -> list[Array | None] | None:
    """NumPy ``(p,)`` views (`_host`) of ``vectors`` (None stays None), or None where one has no view or
    another dtype or size."""
    views: list[Array | None] = []
    for a in vectors:
        v = None if a is None else _host(a)
        if a is not None and (v is None or v.dtype != dtype or v.size != p):
            return None
        views.append(None if v is None else v.reshape(p))
    return views


def _bound(name: str, on_torch: bool, compute: Callable[..., Any]) -> Callable[..., Any]:
    """A bound pass's ``run(x, *args)``: ``compute(x, host, *args)`` with ``host`` the NumPy view of ``x``, or
    None where it does not compute (the schedule switched off, a strided ``x``, ``compute`` declining); a
    failure switches the schedule off as `falls_back` does (the caller then makes the full call)."""

    def run(x: Array, *args: Any) -> Any:
        if name in _DISABLED:
            return None
        blocked.thread_count()  # a bad ARRAYBN_NUM_THREADS raises, as in the methods
        host = _contiguous_host(x, on_torch)
        if host is None:
            return None
        try:
            return compute(x, host, *args)
        except Exception as error:  # noqa: BLE001 - as falls_back: switched off, the caller computes
            disable(name, error)
            return None

    return run


def _itemsize(x: Array) -> int:
    size = getattr(x.dtype, "itemsize", None)  # NumPy
    return int(size) if size is not None else int(x.element_size())  # torch


def _empty(like: Array, shape: tuple[int, ...]) -> tuple[Array, Array]:
    """A new C-ordered array of ``shape`` and ``like``'s dtype in ``like``'s library (NumPy or torch), and the
    NumPy view of it the loops write. A torch tensor's comes from torch's allocator, which hands a call the
    memory the last freed result held (in the cache, its pages mapped): faster than NumPy's here."""
    import numpy as np

    if isinstance(like, np.ndarray):
        out = np.empty(shape, like.dtype)
        return out, out
    import torch

    out = torch.empty(shape, dtype=like.dtype)
    return out, out.numpy()


def _back(result: Array, like: Array) -> Array:
    """A NumPy result in ``like``'s library (a torch tensor shares the memory)."""
    import numpy as np

    if isinstance(like, np.ndarray):
        return result
    import torch

    return torch.from_numpy(result)


def _checked(method: Any) -> Any:
    """`falls_back` (a failure of the loops switches the schedule off), after the thread setting is read: a bad
    ``ARRAYBN_NUM_THREADS`` is the user's error and raises, as it does in numpy-blocked."""
    guarded = falls_back(method)

    @functools.wraps(method)
    def run(self: Ops, *args: Any, **kwargs: Any) -> Any:
        blocked.thread_count()
        return guarded(self, *args, **kwargs)

    return run


class NumbaKernels(Ops):
    """Eager, C-contiguous float32/float64 NumPy arrays and torch CPU tensors of at least 1 MiB, one channel axis.

    Compiled loops (module docstring); where they do not apply (small,
    strided or half-precision arrays, several channel axes), the library's next
    schedule computes (numpy-blocked for NumPy, torch-eager for torch). The
    statistics and the backward's sums are accumulated in float64 and rounded
    once (float32 statistics in one pass around a per-channel shift): within
    rounding of the reference's, and at least as accurate; the scale-and-shift,
    the backward's elementwise gradient and the per-channel arithmetic between
    the passes (`coefficients`) are the reference's operations, bit for bit.
    """

    name = "numba-kernels"
    bounds = {
        "moments": "sum order",
        "affine": "bitwise",
        "coefficients": "bitwise",
        "backward_sums": "sum order",
        "backward_dx": "bitwise",
    }

    def _prepare(
        self, x: Array, channel: int | None, *others: Array, rows: int = _SUM_ROW_ELEMENTS
    ) -> tuple[Any, Array, list[Array]] | None:
        """NumPy views of ``x`` and ``others`` with the loops' layout, or None for the reference."""
        import numpy as np

        if channel is None or math.prod(x.shape) * _itemsize(x) < _MIN_BYTES:  # decided before any view is made
            return None
        host = _host(x)
        if host is None:
            return None
        lay = _layout(host, channel, np, rows)
        if lay is None:
            return None
        views = [_host(o) for o in others]
        if any(v is None or v.dtype != host.dtype for v in views):
            return None
        return lay, host, views

    def sum(self, x: Array, axes: Sequence[int], xp: ModuleType) -> Array:
        return _next(x).sum(x, axes, xp)

    @_checked
    def moments(self, x: Array, axes: Sequence[int], xp: ModuleType) -> tuple[Array, Array]:
        import numpy as np

        channel = blocked._single_channel(x.shape, axes)
        prepared = self._prepare(x, channel)
        result = None if prepared is None else channel_moments(prepared[1], prepared[0], np, not _is_numpy(x))
        if result is None:
            return _next(x).moments(x, axes, xp)
        kept = _kept(x.shape, channel)
        return _back(result[0].reshape(kept), x), _back(result[1].reshape(kept), x)

    def _affine_pass(
        self, x: Array, scale: Array, shift: Array, center: Array | None, *, own: bool = False
    ) -> tuple[_AffinePass, Array] | None:  # fmt: skip
        """The loops' scale-and-shift for ``x`` and its NumPy view, or None for the next schedule (``own``: the
        pass holds copies of the vectors)."""
        import numpy as np

        params = (scale, shift) if center is None else (scale, shift, center)
        channel = blocked._channel_axis_of(tuple(x.shape), *(tuple(getattr(p, "shape", ())) for p in params))
        prepared = self._prepare(x, channel, *params, rows=_map_rows(x))
        if prepared is None:
            return None
        lay, host, views = prepared
        kept = _kept(x.shape, channel)
        vectors = [_vector(v, kept, np) for v in views]
        if own:
            vectors = [np.array(v) for v in vectors]
        return _AffinePass(lay, vectors[0], vectors[1], None if center is None else vectors[2]), host

    @_checked
    def affine(self, x: Array, scale: Array, shift: Array, center: Array | None, xp: ModuleType) -> Array:
        bound = self._affine_pass(x, scale, shift, center)
        if bound is None:
            return _next(x).affine(x, scale, shift, center, xp)
        step, host = bound
        y, view = _empty(x, tuple(x.shape))
        step(host, view, not _is_numpy(x))
        return y

    def bind_affine(
        self, x: Array, scale: Array, shift: Array, center: Array | None, xp: ModuleType
    ) -> Callable[[Array], Array | None] | None:  # fmt: skip
        """`affine` with ``scale``, ``shift`` and ``center`` fixed, for inputs of ``x``'s type, shape and dtype
        (a layer's inference plan, ``arraybn._plan``): the layout and the tiled vectors made once, the same
        loops and pieces per call (the same bits). None where `affine` would not take the loops for ``x``.

        The function returns None where it does not compute (a strided input,
        the schedule switched off, a failure, which switches it off as
        `falls_back` does): the caller then calls `affine`.
        """
        bound = self._affine_pass(x, scale, shift, center, own=True)  # copies: the plan's own
        if bound is None:
            return None
        step, on_torch = bound[0], not _is_numpy(x)

        def compute(x: Array, host: Array) -> Array:
            y, view = _empty(x, tuple(x.shape))
            step(host, view, on_torch)
            return y

        return _bound(self.name, on_torch, compute)

    def bind_training(
        self, x: Array, channel: int, rule: str, epsilon: Any, update: MovingUpdate | None, gamma: Array | None,
        beta: Array | None,
    ) -> Callable[..., tuple[Array, Array | None, Array | None] | None] | None:  # fmt: skip
        """A training forward's three operations for inputs of ``x``'s type, shape and dtype (a layer's
        training plan, ``arraybn._plan``): `moments` over every axis but ``channel``, `coefficients` with
        ``rule``, ``epsilon`` and ``update``'s rule and numbers, then `affine`, each by the loops these methods
        run for such an input (the same bits), with the layouts and the coefficients' factors made once. None
        where the methods would not all take the loops.

        ``run(x, gamma, beta, moving_mean, moving_variance)`` (the vectors as `coefficients` receives them, of
        the kinds given here; the moving ones None without an update) returns ``(y, new_mean,
        new_variance)`` (``(C,)`` vectors, None without an update), or None where it does not compute: a
        strided input or vector, the schedule switched off, a float32 input whose sums could overflow (the
        methods' next schedule takes those), a failure (which switches the schedule off as `falls_back`
        does). The caller then makes the full call.
        """
        import numpy as np

        prepared = self._prepare(x, channel)
        if prepared is None:
            return None
        lay, host, _ = prepared
        lay_map = _layout(host, channel, np, _map_rows(x))
        given = (gamma, beta) + ((None, None) if update is None else (update.moving_mean, update.moving_variance))
        p = int(x.shape[channel])
        if lay_map is None or _host_vectors(given, host.dtype, p) is None:
            return None
        arithmetic = _Rule.make(rule, host.dtype, epsilon, update, gamma is not None, beta is not None)
        if arithmetic is None:
            return None
        on_torch, shape, dtype = not _is_numpy(x), tuple(x.shape), host.dtype

        def compute(x: Array, host: Array, *vectors: Array | None) -> tuple[Array, Array | None, Array | None] | None:
            views = _host_vectors(vectors, dtype, p)
            moments = None if views is None else channel_moments(host, lay, np, on_torch)
            if moments is None:
                return None
            center, scale, shift, new_mean, new_variance = arithmetic(
                *moments, *views, like=x, vectors_like=host
            )  # the coefficients only feed the pass below: NumPy vectors
            y, view = _empty(x, shape)
            _AffinePass(lay_map, scale[1], shift[1], None if center is None else center[1])(host, view, on_torch)
            return y, None if new_mean is None else new_mean[0], None if new_variance is None else new_variance[0]

        return _bound(self.name, on_torch, compute)

    @falls_back
    def coefficients(
        self, rule: str, mean: Array, variance: Array, gamma: Array | None, beta: Array | None, epsilon: Any,
        update: MovingUpdate | None, xp: ModuleType,
    ) -> Coefficients:  # fmt: skip
        result = coefficients(rule, mean, variance, gamma, beta, epsilon, update)
        if result is None:
            return super().coefficients(rule, mean, variance, gamma, beta, epsilon, update, xp)
        return result

    @_checked
    def backward_sums(
        self, x: Array, dy: Array, mean: Array, axes: Sequence[int], xp: ModuleType
    ) -> tuple[Array, Array, Array]:
        import numpy as np

        channel = blocked._single_channel(x.shape, axes)
        same = tuple(dy.shape) == tuple(x.shape) and channel is not None
        kept = _kept(x.shape, channel) if same else None
        prepared = self._prepare(x, channel, dy, mean) if same and tuple(mean.shape) == kept else None
        result = None
        if prepared is not None:
            lay, host, (grad, m) = prepared
            result = backward_sums(host, grad, _vector(m, kept, np), lay, np, not _is_numpy(x))
        if result is None:
            return _next(x).backward_sums(x, dy, mean, axes, xp)
        return tuple(_back(s.reshape(kept), x) for s in result)  # type: ignore[return-value]

    @_checked
    def backward_dx(self, x: Array, dy: Array, mean: Array, k: Array, p: Array, q: Array, xp: ModuleType) -> Array:
        import numpy as np

        params = (mean, k, p, q)
        channel = blocked._channel_axis_of(tuple(x.shape), *(tuple(getattr(v, "shape", ())) for v in params))
        same = tuple(dy.shape) == tuple(x.shape)
        prepared = self._prepare(x, channel, dy, *params, rows=_map_rows(x)) if same else None
        if prepared is None:
            return _next(x).backward_dx(x, dy, mean, k, p, q, xp)
        lay, host, (grad, *vectors) = prepared
        kept = _kept(x.shape, channel)
        vectors = [_vector(v, kept, np) for v in vectors]
        out, view = _empty(x, tuple(x.shape))
        backward_dx(host, grad, vectors, lay, np, view, not _is_numpy(x))
        return out


def coefficients(
    rule: str, mean: Array, variance: Array, gamma: Array | None, beta: Array | None, epsilon: Any,
    update: MovingUpdate | None,
) -> Coefficients | None:  # fmt: skip
    """`Ops.coefficients` in one compiled loop over the channels (``_kernels.cu``'s two kernels, on the CPU),
    for float32 (either rule) and float64 (the non-fused rule) vectors that NumPy can see without a copy,
    Python numbers for ``epsilon`` and the momentum, and the update form of the rule; None otherwise.

    Between a training call's passes the reference makes about a dozen
    operations on per-channel vectors; on a CPU, after a large pass has left
    the caches, their Python steps cost a few hundred microseconds. Here they
    are one call, each operation rounded as the reference's (the same bits).
    """
    given = [mean, variance, gamma, beta] + ([] if update is None else [update.moving_mean, update.moving_variance])
    host = _host(mean)
    vectors = None if host is None else _host_vectors(given, host.dtype, host.size)
    if vectors is None:
        return None
    prepared = _Rule.make(rule, host.dtype, epsilon, update, gamma is not None, beta is not None)
    if prepared is None:
        return None
    center, scale, shift, new_mean, new_variance = (
        None if pair is None else pair[0] for pair in prepared(*vectors, like=mean)
    )
    shape = tuple(mean.shape)
    return Coefficients(
        None if center is None else center.reshape(shape),
        scale.reshape(shape),
        shift.reshape(shape),
        None if update is None else new_mean.reshape(tuple(update.moving_mean.shape)),
        None if update is None else new_variance.reshape(tuple(update.moving_variance.shape)),
    )


class _Rule:
    """What `coefficients` computes with besides the vectors: the rule, the dtype, ``epsilon`` and the update's
    factors (fixed by the call's settings; a layer's training plan keeps one, `NumbaKernels.bind_training`)."""

    def __init__(self, rule: str, dtype: Any, epsilon: float, update: MovingUpdate | None, has_gamma: bool,
                 has_beta: bool) -> None:  # fmt: skip
        import numpy as np

        self.fused, self.update = rule == "fused", update is not None
        dt = np.dtype(dtype).type
        self.epsilon = dt(epsilon)
        if self.fused:
            keep, mean_factor, replace = (0.0, 0.0, False) if update is None else fused_factors(float(update.momentum), 1.0)
            variance_factor = 0.0 if update is None else fused_factors(float(update.momentum), float(update.bessel))[1]
            self.factors = (dt(keep), dt(mean_factor), dt(variance_factor), update is not None, replace)
        else:
            decay = 0.0 if update is None else decay_operand(update.momentum, np.dtype(dtype), np, None)
            self.factors = (dt(decay), has_gamma, has_beta, update is not None)

    @classmethod
    def make(cls, rule: str, dtype: Any, epsilon: Any, update: MovingUpdate | None, has_gamma: bool,
             has_beta: bool) -> _Rule | None:  # fmt: skip
        """The rule for vectors of ``dtype``, or None where the compiled loop does not apply (`coefficients`)."""
        import numpy as np

        if not isinstance(epsilon, float) or (update is not None and not isinstance(update.momentum, (int, float))):
            return None
        if update is not None and (update.rule != ("fused" if rule == "fused" else "assign_sub") or
                                   (rule != "fused" and update.bessel != 1.0)):  # fmt: skip
            return None
        if dtype not in ((np.float32,) if rule == "fused" else (np.float32, np.float64)):
            return None
        if rule == "fused" and not (has_gamma and has_beta):
            return None
        return cls(rule, dtype, epsilon, update, has_gamma, has_beta)

    def __call__(
        self, mean: Array, variance: Array, gamma: Array | None, beta: Array | None, moving_mean: Array | None = None,
        moving_variance: Array | None = None, *, like: Array, vectors_like: Array | None = None,
    ) -> tuple[Any, ...]:  # fmt: skip
        """``(center, scale, shift, new_mean, new_variance)`` of the ``(C,)`` NumPy vectors (the moving ones
        given with an update), each a pair: the new array in ``like``'s library (the coefficients in
        ``vectors_like``'s, where given) and its NumPy view (center None for the non-fused rule, the moving
        ones None without an update)."""
        vectors_like = like if vectors_like is None else vectors_like
        p = mean.shape[0]
        root = _root(variance, self.epsilon, like=like)
        moving = (moving_mean, moving_variance) if self.update else (mean, variance)  # not read without one
        outs = [_empty(vectors_like, (p,)) for _ in range(3 if self.fused else 2)]
        outs += [_empty(like, (p,)) for _ in range(2)]
        if self.fused:
            kernels()["fused_coefficients"](mean, variance, root, gamma, beta, *moving, *self.factors,
                                            *(v for _, v in outs))  # fmt: skip
        else:
            kernels()["coefficients"](mean, variance, root, mean if gamma is None else gamma,
                                      mean if beta is None else beta, *moving, *self.factors,
                                      *(v for _, v in outs))  # fmt: skip
            outs.insert(0, None)
        return (*outs[:3], *(outs[3:] if self.update else (None, None)))  # type: ignore[return-value]


def _root(variance: Array, epsilon: Any, like: Array) -> Array:
    """``sqrt(variance + epsilon)`` of a NumPy vector in float64 (the sum in the vector's dtype, then widened,
    as `inverse_stddev` does), the square root taken by ``like``'s library: NumPy's is correctly rounded,
    torch's (on CPUs with AVX-512 at least) is not."""
    import numpy as np

    wide = np.empty(variance.shape, np.float64)
    np.add(variance, epsilon, out=wide, dtype=variance.dtype)  # rounded to the vector's dtype, widened by the store
    if isinstance(like, np.ndarray):
        return np.sqrt(wide, out=wide)
    import torch

    torch.from_numpy(wide).sqrt_()  # in place: torch's square root kernel, as torch.sqrt's
    return wide


def _next(x: Array) -> Ops:
    """Where the loops do not apply: the library's next schedule (torch-eager, numpy-blocked)."""
    from . import _instance

    return _instance("numpy-blocked" if _is_numpy(x) else "torch-eager")


def _is_numpy(x: Array) -> bool:
    import numpy as np

    return isinstance(x, np.ndarray)


def _kept(shape: Sequence[int], channel: int) -> tuple[int, ...]:
    return tuple(n if i == channel else 1 for i, n in enumerate(shape))


def _vector(v: Array, kept: tuple[int, ...], np: ModuleType) -> Array:
    """A keepdims per-channel array as a contiguous ``(C,)`` vector."""
    if v.shape == kept and v.flags.c_contiguous:
        return v.reshape(-1)  # a view (the broadcast below costs more than the loops' setup)
    return np.ascontiguousarray(np.broadcast_to(v, kept).reshape(-1))
