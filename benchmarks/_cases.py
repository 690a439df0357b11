"""The benchmarked shapes and modes (NumPy only: shared with the TensorFlow worker)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Case:
    name: str
    shape: tuple[int, ...]
    axis: int  # the channel axis, non-negative

    @property
    def channels(self) -> int:
        return self.shape[self.axis]

    @property
    def nbytes(self) -> int:  # float32
        n = 4
        for s in self.shape:
            n *= s
        return n


CASES = (
    Case("NHWC (32,56,56,64) axis=-1", (32, 56, 56, 64), 3),
    Case("NCHW (32,64,56,56) axis=1", (32, 64, 56, 56), 1),
    Case("2-D (4096,1024) axis=-1", (4096, 1024), 1),
)

#: mode -> (label, memory floor in units of one copy of the tensor)
#: train fwd: read x twice, write y once = 3 transfers (copy = 2);
#: inference: read once, write once = 2; fwd+bwd: the forward's 3, then
#: x and dy read twice (reductions, then dx) and dx written once = 5 more.
# The memory-traffic floor of each mode in units of a copy of x that writes with ordinary stores: three
# transfers (the read of x, the read of each of y's cache lines the store needs first, the write). A pass
# that writes its output with streaming stores skips the second. Training forward: read x twice and
# write y (3 transfers, 1.0x); inference: read x and write y (2, 2/3x); forward+backward: read x twice,
# write y, read x and dy twice, write dx (8, 8/3x).
MODES = {
    "train": ("training forward", 1.0),
    "infer": ("inference forward", 2 / 3),
    "train_bwd": ("training forward+backward", 8 / 3),
}


def make_inputs(case: Case, seed: int = 0):  # type: ignore[no-untyped-def]
    """x (mean 0.5, std 2 per element) and an upstream gradient dy, both float32 NumPy arrays."""
    import numpy as np

    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(case.shape, dtype=np.float32) * 2 + 0.5).astype(np.float32)
    dy = rng.standard_normal(case.shape, dtype=np.float32)
    return x, dy
