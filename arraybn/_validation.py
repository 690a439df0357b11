"""Argument checks and build-time resolution, with TensorFlow's exception types and rules.

Every check raises before any state changes, and its message says what was
received and what is allowed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

__all__ = [
    "check_axis_argument",
    "check_rank_defined",
    "check_renorm_clipping",
    "check_virtual_batch",
    "fused_can_be_used",
    "param_shape",
    "require_known_sizes",
    "resolve_fused",
    "unknown_size",
    "validate_axis",
]

RENORM_CLIPPING_KEYS = ("rmax", "rmin", "dmax")


def check_axis_argument(axis: Any) -> int | list[int] | tuple[int, ...]:
    """The constructor's ``axis``: an int, or a list/tuple of ints (a copy of the same type, as
    tf-keras's ``axis[:]``; ``build`` turns it into a list)."""
    if isinstance(axis, (list, tuple)):
        return axis[:]
    if isinstance(axis, int):
        return axis
    msg = f"Expected an int or a list/tuple of ints for the argument 'axis', but received: {axis!r}"
    raise TypeError(msg)


def check_renorm_clipping(renorm_clipping: Any) -> dict[str, Any]:
    """TF accepts only the keys rmax, rmin, dmax (missing ones mean inf, 0, inf)."""
    clipping = renorm_clipping or {}
    unknown = set(clipping) - set(RENORM_CLIPPING_KEYS)  # TF's check: what iterating it gives
    if unknown:
        msg = (
            f"Received invalid keys for `renorm_clipping` argument: {renorm_clipping}. "
            f"Supported values: {list(RENORM_CLIPPING_KEYS)}."
        )
        raise ValueError(msg)
    return dict(clipping)


def _undefined_rank(shape: Sequence[Any]) -> ValueError:
    return ValueError(f"Input has undefined rank. Received: input_shape={tuple(shape)}")


def check_rank_defined(x: Any) -> None:
    """A Python number as the input: TF converts it to a rank-0 tensor and raises its ValueError."""
    if isinstance(x, (bool, int, float)):
        raise _undefined_rank(())


def unknown_size(s: Any) -> bool:
    """An unknown size: ``None`` (a Keras ``Input``) or dask's NaN (unknown chunk sizes)."""
    return s is None or (isinstance(s, float) and math.isnan(s))


def require_known_sizes(shape: Sequence[Any], what: str) -> None:
    """A clear ``ValueError`` where ``what`` needs sizes that ``shape`` does not know (dask gives NaN
    after boolean indexing, ``None`` is unknown too)."""
    if any(unknown_size(s) for s in shape):
        msg = (
            f"{what} needs the input's sizes, but its shape {tuple(shape)} has unknown ones (as dask "
            "gives after boolean indexing). Compute them first (dask: `x.compute_chunk_sizes()`)."
        )
        raise ValueError(msg)


def validate_axis(axis: int | Sequence[int], shape: Sequence[int]) -> list[int]:
    """``tf_utils.validate_axis``: normalize negatives, check range and duplicates."""
    rank = len(shape)
    if not rank:
        raise _undefined_rank(shape)
    axes = [axis] if isinstance(axis, int) else list(axis)
    for i, a in enumerate(axes):
        if a < 0:
            axes[i] = rank + a
    for a in axes:
        if a < 0 or a >= rank:
            msg = (
                "Invalid value for `axis` argument. Expected 0 <= axis < inputs.rank (with "
                f"inputs.rank={rank}). Received: axis={tuple(axes)}"
            )
            raise ValueError(msg)
    if len(axes) != len(set(axes)):
        msg = f"Duplicate axis: {tuple(axes)}"
        raise ValueError(msg)
    return axes


def check_virtual_batch(virtual_batch_size: Any, axes: Sequence[int], adjustment: Any) -> None:
    """Build-time checks of ``virtual_batch_size`` (a positive int, batch axis not normalized, no adjustment)."""
    if virtual_batch_size is None:
        return
    if virtual_batch_size <= 0:
        msg = (
            "`virtual_batch_size` must be a positive integer that divides the true batch size "
            f"of the input tensor. Received: virtual_batch_size={virtual_batch_size}"
        )
        raise ValueError(msg)
    if 0 in axes:
        msg = (
            "When using `virtual_batch_size`, the batch dimension must be 0 and thus axis "
            f"cannot include 0. Received axis={list(axes)}"
        )
        raise ValueError(msg)
    if adjustment is not None:
        msg = "When using `virtual_batch_size`, adjustment cannot be specified"
        raise ValueError(msg)


def fused_can_be_used(
    *, renorm: bool, axes: Sequence[int], virtual_batch_size: Any, adjustment: Any, compute_dtype: str
) -> bool:
    """``_fused_can_be_used`` with the axis already normalized (TF checks it after ``validate_axis``)."""
    if renorm or len(axes) > 1 or axes[0] not in (-4, -3, -1, 1, 3, 4):
        return False
    if virtual_batch_size is not None or adjustment is not None:
        return False
    return compute_dtype in ("float16", "bfloat16", "float32")


def resolve_fused(fused: Any, *, rank: int, axes: Sequence[int], **options: Any) -> bool:
    """The effective ``fused`` of the v1 layer after ``build``.

    The v1 layer turns ``fused=None`` into ``True`` in ``__init__``; ``build``
    then keeps it only for rank 4/5 inputs when the fused kernel can be used,
    and only with the channel axis 1 or 3 (rank 4) or 1 or 4 (rank 5). Anything
    else falls back to the non-fused path *silently*, ``fused=True`` included
    (unlike TF2's layer, which raises).
    """
    if fused is False:
        return False
    if rank not in (4, 5) or not fused_can_be_used(axes=axes, **options):
        return False
    a = list(axes)
    return (rank == 4 and a in ([1], [3])) or (rank == 5 and a in ([1], [4]))


def param_shape(shape: Sequence[int], axes: Sequence[int], virtual_batch_size: Any) -> tuple[int, ...]:
    """Weight shape: ``(C,)`` for one axis; full rank with 1s otherwise, plus a ghost axis."""
    rank = len(shape)
    if len(axes) == 1 and virtual_batch_size is None:
        return (int(shape[axes[0]]),)
    out = [int(shape[i]) if i in axes else 1 for i in range(rank)]
    if virtual_batch_size is not None:
        out.insert(1, 1)
    return tuple(out)


def check_ghost_batches(virtual_batch_size: Any, shape: Sequence[Any], training: bool) -> None:
    """A call's ghost batches (§8): an integer ``virtual_batch_size`` that divides the batch in training."""
    if not isinstance(virtual_batch_size, int) or isinstance(virtual_batch_size, bool):
        msg = f"virtual_batch_size must be an integer; received virtual_batch_size={virtual_batch_size!r}."
        raise ValueError(msg)
    require_known_sizes(shape, "virtual_batch_size (the ghost batches' reshape)")
    batch = shape[0]
    if training and batch % virtual_batch_size != 0:
        msg = (
            f"virtual_batch_size={virtual_batch_size} must divide the batch size, but the input has "
            f"batch size {batch} (shape {tuple(shape)}). Use a batch whose size is a multiple of "
            f"{virtual_batch_size}."
        )
        raise ValueError(msg)


def _broadcast_shapes(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    n = max(len(a), len(b))
    a = (1,) * (n - len(a)) + a
    b = (1,) * (n - len(b)) + b
    out = []
    for p, q in zip(a, b, strict=True):
        if p != q and p != 1 and q != 1:
            msg = f"shapes {a} and {b} do not broadcast"
            raise ValueError(msg)
        out.append(q if p == 1 else p)
    return tuple(out)


def check_mask_broadcasts(mask_shape: tuple[Any, ...], x_shape: tuple[Any, ...]) -> None:
    """The mask, with TF's trailing axis added (``expand_dims(mask, -1)``), must broadcast to the input's shape."""
    require_known_sizes((*mask_shape, *x_shape), "A mask (its broadcast against the input)")
    try:
        if _broadcast_shapes((*mask_shape, 1), x_shape) != x_shape:
            msg = "the broadcast result is larger than the input"
            raise ValueError(msg)
    except ValueError as err:
        msg = (
            f"The mask of shape {mask_shape} does not broadcast against the input of shape "
            f"{x_shape} once a trailing axis is added (TensorFlow expands the mask with "
            "expand_dims(mask, -1)). Pass a mask of the input's shape without its last axis."
        )
        raise ValueError(msg) from err


def same_shape(a: Sequence[Any], b: Sequence[Any]) -> bool:
    """Equal shapes, an unknown size (dask's NaN, None) matching an unknown one."""
    return len(a) == len(b) and all(p == q or (unknown_size(p) and unknown_size(q)) for p, q in zip(a, b, strict=True))


def check_vjp_arguments(dy: Any, x: Any, xp: Any, *, training: bool) -> None:
    """The backward's upstream gradient: an array of the forward's library, of the input's shape."""
    from ._namespace import array_namespace, is_array  # the namespace helpers import array-api-compat

    if not is_array(dy) or array_namespace(dy).__name__ != xp.__name__:
        kind = f"{type(dy).__module__}.{type(dy).__name__}"
        msg = f"dy must be an array of the forward's library ({xp.__name__}); got {kind}. Convert it first."
        raise TypeError(msg)
    if training:
        require_known_sizes(x.shape, "The backward of a training call (its counts per statistic)")
    if not same_shape(dy.shape, x.shape):
        msg = f"dy has shape {tuple(dy.shape)} but the forward's input had shape {tuple(x.shape)}; they must match."
        raise ValueError(msg)
