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
    "build_shape",
    "check_adjustment_result",
    "check_array_dtype",
    "check_input_object",
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
    try:
        clipping = renorm_clipping or {}
    except ValueError as err:  # an array's truth value, as TF meets it
        msg = f"{err}: received renorm_clipping={renorm_clipping!r}; a dict with keys {list(RENORM_CLIPPING_KEYS)} is allowed."
        raise ValueError(msg) from err
    try:
        unknown = set(clipping) - set(RENORM_CLIPPING_KEYS)  # TF's check: what iterating it gives
    except TypeError as err:
        msg = f"{err}: received renorm_clipping={renorm_clipping!r}; a dict with keys {list(RENORM_CLIPPING_KEYS)} is allowed."
        raise TypeError(msg) from err
    if unknown:
        msg = (
            f"Received invalid keys for `renorm_clipping` argument: {renorm_clipping}. "
            f"Supported values: {list(RENORM_CLIPPING_KEYS)}."
        )
        raise ValueError(msg)
    return dict(clipping) if isinstance(clipping, dict) else clipping  # TF keeps it; training reads .get


def _undefined_rank(shape: Sequence[Any], inputs: Any = None) -> ValueError:
    received = "" if inputs is None else f" (inputs={inputs!r})"
    return ValueError(
        f"Input has undefined rank. Received: input_shape={tuple(shape)}{received}; batch normalization "
        "needs inputs of rank 1 or more."
    )


def check_rank_defined(x: Any) -> None:
    """A Python number as the input: TF converts it to a rank-0 tensor and raises its ValueError."""
    if isinstance(x, (bool, int, float)):
        raise _undefined_rank((), x)


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
    for a in axes:
        if not hasattr(a, "__index__"):
            msg = f"list indices must be integers or slices, not {type(a).__name__}: received axis={axis!r}; ints are allowed."
            raise TypeError(msg)
    for i, a in enumerate(axes):
        if a < 0:
            axes[i] = rank + a
    for a in axes:
        if a < 0 or a >= rank:
            msg = (
                "Invalid value for `axis` argument. Expected 0 <= axis < inputs.rank (with "
                f"inputs.rank={rank}). Received: axis={tuple(axes)} (axis={axis!r} as given)"
            )
            raise ValueError(msg)
    if len(axes) != len(set(axes)):
        msg = f"Duplicate axis: {tuple(axes)} (received axis={axis!r}); each axis may appear once."
        raise ValueError(msg)
    return axes


def check_virtual_batch(virtual_batch_size: Any, axes: Sequence[int], adjustment: Any) -> None:
    """Build-time checks of ``virtual_batch_size`` (a positive int, batch axis not normalized, no adjustment)."""
    if virtual_batch_size is None:
        return
    try:
        positive = bool(virtual_batch_size > 0)
    except (TypeError, ValueError) as err:  # ValueError: an array's truth value, as TF meets it
        msg = (
            "`virtual_batch_size` must be a positive integer that divides the true batch size "
            f"of the input tensor. Received: virtual_batch_size={virtual_batch_size!r}"
        )
        raise type(err)(msg) from err
    if not positive:
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
    if not axes and not renorm:
        msg = "list index out of range: received axis=[]; at least one axis to normalize is needed."
        raise IndexError(msg)
    if renorm or len(axes) > 1 or axes[0] not in (-4, -3, -1, 1, 3, 4):
        return False
    if virtual_batch_size is not None or adjustment is not None:
        return False
    return compute_dtype in ("float16", "bfloat16", "float32")


def resolve_fused(fused: Any, *, rank: int, axes: Sequence[int], **options: Any) -> tuple[bool, Any]:
    """``(path, stored)``: whether the v1 layer takes the fused path after ``build``, and the value
    ``build`` leaves in ``layer.fused``.

    TF's rule, compared as TF compares: ``fused`` equal to ``None`` or ``True`` (``1``,
    ``np.bool_(True)``) becomes "fused where possible": rank 4/5 inputs whose options the fused
    kernel supports. Any other value is kept as it is and taken by its truth: a truthy one (``2``,
    ``"yes"``) asks for the fused kernel whatever the options, and raises for a rank other than 4 or
    5 or an unsupported axis (a rank-5 input falls back to the non-fused path); a falsy one
    (``0``, ``""``, ``np.bool_(False)``) is the non-fused path.
    """
    try:
        where_possible = fused in (None, True)
        wanted = bool(fused)
    except (TypeError, ValueError) as err:  # an array: its truth value is ambiguous
        msg = f"`fused` must be True, False or None; received fused={fused!r} ({err})."
        raise ValueError(msg) from err
    if where_possible:
        fused = rank in (4, 5) and fused_can_be_used(axes=axes, **options)
        wanted = fused
    if not wanted:
        return False, fused
    a = list(axes)
    if (rank == 4 and a in ([1], [3])) or (rank == 5 and a in ([1], [4])):
        if options.get("virtual_batch_size") is not None or options.get("compute_dtype") not in (
            "float16", "bfloat16", "float32"
        ):
            msg = (
                f"`fused={fused!r}` asks for the fused kernel, which supports neither `virtual_batch_size` nor "
                f"the compute dtype {options.get('compute_dtype')!r} (TensorFlow fails in the kernel). "
                "Use fused=None or False."
            )
            raise ValueError(msg)
        return True, fused
    if rank == 5:
        return False, False
    dims = "`axis=1` or `axis=3` for 4D" if rank == 4 else "`axis=1` or `axis=4` for 5D"
    msg = (
        f"Unsupported axis. The use of `fused=True` is only possible with {dims} input tensors. "
        f"Received: axis={tuple(axes)}, fused={fused!r}, input rank {rank}"
    )
    raise ValueError(msg)


def build_shape(input_shape: Any) -> tuple[int | None, ...]:
    """``tf.TensorShape(input_shape)``'s checks: a known rank, and sizes that are ints or None."""
    if input_shape is None:
        msg = "Input has undefined rank. Received: input_shape=None; `build` needs a shape such as (batch, channels)."
        raise ValueError(msg)
    if hasattr(input_shape, "__index__") and not hasattr(input_shape, "__len__") and not isinstance(input_shape, bool):
        input_shape = (input_shape,)  # TensorShape(3) is a rank-1 shape
    try:
        dims = list(input_shape) if not isinstance(input_shape, (str, bytes, bool)) else None
    except TypeError:
        dims = None
    if dims is None:
        msg = (
            f"Failed to convert input_shape={input_shape!r} to a shape: give a tuple or list of ints or None "
            "(a single int is a rank-1 shape)."
        )
        raise TypeError(msg)
    out: list[int | None] = []
    for d in dims:
        if d is None:
            out.append(None)
            continue
        if isinstance(d, bool) or not hasattr(d, "__index__"):
            msg = (
                "Dimension value must be integer or None or have an __index__ method, got value "
                f"{d!r} with type {type(d)!r}. Received: input_shape={input_shape!r}"
            )
            raise TypeError(msg)
        n = int(d.__index__())
        if n < 0:
            msg = f"Dimension {n} must be >= 0. Received: input_shape={input_shape!r}"
            raise ValueError(msg)
        out.append(n)
    return tuple(out)


def check_array_dtype(x: Any, what: str) -> None:
    """TF converts only numeric and boolean arrays: an object or string array is a ValueError."""
    kind = getattr(getattr(x, "dtype", None), "kind", None)
    if kind in ("O", "U", "S", "V"):
        msg = (
            f"Failed to convert {what} to a tensor: received {what}={type(x).__name__} of dtype "
            f"{x.dtype} and shape {tuple(x.shape)}; a numeric or boolean array is allowed."
        )
        raise ValueError(msg)


def _leaves(value: Any) -> list[Any]:
    if isinstance(value, (list, tuple)):
        return [leaf for v in value for leaf in _leaves(v)]
    return [value]


def check_input_object(inputs: Any, *, built: bool) -> None:
    """A non-array input: TF's layer treats a list or tuple as a nested structure of inputs.

    Its exception class depends on what is inside and on whether the layer was built; the
    rule below is TF's (numbers: TypeError on the first call, ValueError later; None or
    strings: the other way round)."""
    if isinstance(inputs, (bool, int, float)):
        raise _undefined_rank((), inputs)
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in _leaves(inputs))
    numbers = numbers and isinstance(inputs, (list, tuple))
    kind = type(inputs).__name__
    msg = (
        f"BatchNormalization expects an array as `inputs`; received a Python {kind}"
        f"{' of numbers' if numbers else ''}: inputs={_short_repr(inputs)}. Convert it with your array "
        "library first (e.g. numpy.asarray(inputs, dtype='float32'))."
    )
    first_call_type_error = numbers
    raise (TypeError(msg) if first_call_type_error != built else ValueError(msg))


def _short_repr(value: Any, limit: int = 120) -> str:
    s = repr(value)
    return s if len(s) <= limit else s[: limit - 3] + "..."


def check_adjustment_result(result: Any, x_shape: Sequence[Any]) -> tuple[Any, Any]:
    """What ``adjustment(shape)`` returned: a ``(scale, bias)`` pair of numbers or arrays that
    broadcast against the input without changing its shape."""
    try:
        scale, bias = result
    except TypeError as err:
        msg = f"`adjustment` must return a (scale, bias) pair; it returned {_short_repr(result)} ({err})."
        raise TypeError(msg) from err
    except ValueError as err:
        msg = f"`adjustment` must return a (scale, bias) pair; it returned {_short_repr(result)} ({err})."
        raise ValueError(msg) from err
    for name, v in (("scale", scale), ("bias", bias)):
        if v is None:
            msg = f"`adjustment` returned {name}=None; a number or an array broadcastable to the input is allowed."
            raise ValueError(msg)
        if isinstance(v, (str, bytes)) or not (hasattr(v, "shape") or _is_number(v)):
            msg = (
                f"`adjustment` returned {name}={_short_repr(v)}, which is not a number or an array; a number "
                "or an array broadcastable to the input is allowed."
            )
            raise TypeError(msg)
        shape = tuple(getattr(v, "shape", ()))
        if any(unknown_size(s) for s in (*shape, *x_shape)):
            continue
        try:
            ok = _broadcast_shapes(shape, tuple(x_shape)) == tuple(x_shape)
        except ValueError:
            ok = False
        if not ok:
            msg = (
                f"`adjustment` returned {name} of shape {shape}, which does not broadcast to the input's shape "
                f"{tuple(x_shape)} without changing it; a number or an array broadcastable to the input is allowed."
            )
            raise ValueError(msg)
    return scale, bias


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) or type(v).__module__ == "numpy"


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


def check_mask_broadcasts(
    mask_shape: tuple[Any, ...], x_shape: tuple[Any, ...], virtual_batch_size: int | None = None
) -> None:
    """The mask, with TF's trailing axis added (``expand_dims(mask, -1)``), must broadcast to the input's shape
    (with ghost batches: to the input as reshaped for them, as TF broadcasts it)."""
    require_known_sizes((*mask_shape, *x_shape), "A mask (its broadcast against the input)")
    try:
        if _broadcast_shapes((*mask_shape, 1), x_shape) != x_shape:
            msg = "the broadcast result is larger than the input"
            raise ValueError(msg)
    except ValueError as err:
        against = (
            f"the input as reshaped for ghost batches of virtual_batch_size={virtual_batch_size} (shape {x_shape})"
            if virtual_batch_size is not None
            else f"the input of shape {x_shape}"
        )
        msg = (
            f"The mask of shape {mask_shape} does not broadcast against {against} once a trailing axis is "
            "added (TensorFlow expands the mask with expand_dims(mask, -1)). Pass a mask of the input's "
            "shape without its last axis."
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
