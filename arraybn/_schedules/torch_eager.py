"""The reference's bulk operations on eager torch tensors, with torch's own reductions and in-place passes.

The reference's expressions run on torch as they are, but slowly: each
Array API operation is a separate torch kernel with a freshly allocated
input-sized output (a new allocation is a round of page faults on a CPU), and
`Ops.sum` reduces one axis at a time in blocks of 64 to bound the rounding of
libraries that add into a single accumulator. torch needs neither:

* sums are one ``torch.sum`` over every reduced axis: torch's CPU reduction
  adds in a cascade (partial sums of partial sums) and its CUDA reduction
  along a tree, so the error grows with the logarithm of the count, as the
  reference's blocked sums' does (the same terms, added in another order);
* the elementwise passes write into one buffer in place
  (``d = x - mean; d *= d``; ``y = x - center; y *= scale; y += shift``), the
  reference's operations and roundings, with one input-sized allocation
  instead of two or three.

Used for eager float32/float64 tensors, CPU or CUDA, outside ``torch.compile``
and outside autograd (an in-place pass would destroy a value autograd keeps:
tensors that require gradients take the reference's expressions, which torch
differentiates). ``tests/test_schedules.py`` holds it to the reference.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from types import ModuleType
from typing import Any

from .._namespace import is_compiling
from .._reference import Ops, corrected_moments
from . import pairwise_sum

Array = Any


def _takes(*arrays: Array) -> bool:
    """Eager float32/float64 torch tensors of one dtype and device, no autograd (see the module docstring)."""
    import torch

    first = arrays[0]
    if not isinstance(first, torch.Tensor) or first.dtype not in (torch.float32, torch.float64):
        return False
    if is_compiling(first) or first.numel() == 0:
        return False
    for a in arrays:
        if not isinstance(a, torch.Tensor) or a.dtype != first.dtype or a.device != first.device:
            return False
    return not (torch.is_grad_enabled() and any(a.requires_grad for a in arrays))


def _fits(x: Array, *params: Array) -> bool:
    """Every parameter broadcasts against ``x`` without changing its shape (an in-place pass keeps it)."""
    shape = tuple(x.shape)
    return all(p.ndim == len(shape) and all(m in (1, n) for m, n in zip(p.shape, shape)) for p in params)


_PIECE_BYTES = 4 << 20  # a piece of the centred pass stays in the CPU's caches


def _pieces(x: Array, dims: tuple[int, ...]) -> list[tuple[int, int]] | None:
    """``[start, stop)`` runs of the leading axis (reduced) of about `_PIECE_BYTES`; None for one piece or on a GPU."""
    if x.device.type != "cpu" or 0 not in {d % x.ndim for d in dims}:
        return None
    rows = x.shape[0]
    row_bytes = x.element_size() * (x.numel() // rows)
    step = max(1, _PIECE_BYTES // max(row_bytes, 1))
    if step >= rows:
        return None
    return [(i, min(i + step, rows)) for i in range(0, rows, step)]


class TorchEager(Ops):
    """Eager torch tensors of float32/float64 outside autograd (module docstring)."""

    name = "torch-eager"
    bounds = {
        "sum": "sum order",
        "moments": "sum order",
        "affine": "bitwise",
        "backward_sums": "sum order",
        "backward_dx": "bitwise",
    }

    def sum(self, x: Array, axes: Sequence[int], xp: ModuleType) -> Array:
        if not axes or not _takes(x):  # torch.sum over dim=() would sum everything
            return super().sum(x, axes, xp)
        import torch

        return torch.sum(x, dim=tuple(axes), keepdim=True)

    def moments(self, x: Array, axes: Sequence[int], xp: ModuleType) -> tuple[Array, Array]:
        n = math.prod(x.shape[a] for a in axes)
        if not axes or n == 0 or not _takes(x):
            return super().moments(x, axes, xp)
        import torch

        dims = tuple(axes)
        mean = torch.sum(x, dim=dims, keepdim=True) / float(n)
        pieces = _pieces(x, dims)
        if pieces is None:
            d = torch.sub(x, mean)
            sum_d = torch.sum(d, dim=dims, keepdim=True)
            d.mul_(d)
            return corrected_moments(mean, sum_d, torch.sum(d, dim=dims, keepdim=True), n, xp)
        # the centred pass piece by piece along the leading axis, through one cache-sized buffer
        buffer = torch.empty((pieces[0][1], *x.shape[1:]), dtype=x.dtype, device=x.device)
        sums, squares = [], []
        for start, stop in pieces:
            d = buffer[: stop - start]
            torch.sub(x[start:stop], mean, out=d)
            sums.append(torch.sum(d, dim=dims, keepdim=True))
            d.mul_(d)
            squares.append(torch.sum(d, dim=dims, keepdim=True))
        return corrected_moments(mean, pairwise_sum(sums), pairwise_sum(squares), n, xp)

    def affine(self, x: Array, scale: Array, shift: Array, center: Array | None, xp: ModuleType) -> Array:
        params = (x, scale, shift) if center is None else (x, scale, shift, center)
        if not (_takes(*params) and _fits(*params)):
            return super().affine(x, scale, shift, center, xp)
        import torch

        if center is None:
            y = torch.mul(x, scale)
        else:
            y = torch.sub(x, center)
            y.mul_(scale)
        return y.add_(shift)

    def backward_sums(
        self, x: Array, dy: Array, mean: Array, axes: Sequence[int], xp: ModuleType
    ) -> tuple[Array, Array, Array]:
        if not (axes and _takes(x, dy, mean) and tuple(dy.shape) == tuple(x.shape) and _fits(x, mean)):
            return super().backward_sums(x, dy, mean, axes, xp)
        import torch

        dims = tuple(axes)
        xc = torch.sub(x, mean)
        sum_xc = torch.sum(xc, dim=dims, keepdim=True)
        xc.mul_(dy)  # dy * (x - mean): multiplication commutes bit for bit
        return sum_xc, torch.sum(dy, dim=dims, keepdim=True), torch.sum(xc, dim=dims, keepdim=True)

    def backward_dx(self, x: Array, dy: Array, mean: Array, k: Array, p: Array, q: Array, xp: ModuleType) -> Array:
        if not (_takes(x, dy, mean, k, p, q) and tuple(dy.shape) == tuple(x.shape) and _fits(x, mean, k, p, q)):
            return super().backward_dx(x, dy, mean, k, p, q, xp)
        import torch

        t = torch.sub(x, mean)
        t.mul_(p)
        t.add_(q)
        return torch.mul(dy, k).add_(t)  # dy * k + (t + q): addition commutes bit for bit
