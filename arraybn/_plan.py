"""What a layer keeps between calls: its inference map, and the decisions of its last training call.

An inference call's output is a per-channel map of its input whose
coefficients depend only on the weights, the layer's settings and the input's
kind (``arraybn._reference.inference_map``). A layer called again and again in
inference (a network's evaluation, serving) recomputes the same coefficients
and repeats the same checks on every call; on a CPU, after a large operation
has pushed the interpreter's data out of the caches, those hundreds of Python
steps cost as much as the pass over a multi-megabyte input itself.

`InferencePlan` keeps the map of the layer's last inference call together with
everything that decided it, and `InferencePlan.run` applies the map to a new
input only when all of it is unchanged:

* the input: its type, shape, dtype and device (every check the layer makes on
  an input of a built layer depends on these only), outside autograd;
* the layer's settings read in inference, each the very same object
  (``axis`` also by value: a list can change in place);
* the weights: the same arrays (``set_weights``, ``build`` and training calls
  replace them) holding the same bytes (a change in place, through a view or
  an optimizer's step, is seen);
* the schedule `arraybn._schedules.select` gives for the input (the setting of
  `arraybn.schedule`, the environment and a failed schedule are read anew;
  the reference's plain expressions where no schedule applies).

Anything else takes the layer's full call, which makes a new plan. Where the
plan runs, it applies the same map with the same schedule to the same input
as the full call would: the same bits. Plans are kept for NumPy arrays and
torch CPU tensors (where the checks are cheap and the saving counts), never
under ``arraybn.schedule("reference")``, for an input with a
mask, for a layer with an activity regularizer, for traced, lazy or device
arrays, or while a torch function mode intercepts torch's calls.

`TrainingPlan` does the same for a plain training call: it keeps what
decided the call's path through the reference and the schedule's bound
training step, and runs that step while all of it is unchanged (its
docstring lists what it checks and which calls it takes).
"""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType
from typing import Any, NamedTuple

from . import _functional
from ._namespace import dtype_from_name, float_errors_ignored, is_numpy_array, is_torch_array
from ._reference import InferenceMap, MovingUpdate, Ops, count_of, f32_operand
from ._schedules import get_schedule
from ._types import BNConfig

__all__ = ["InferencePlan", "TrainingPlan", "settings_of"]

Array = Any


def settings_of(layer: Any) -> tuple[Any, ...]:
    """The layer's settings an inference call reads (the objects themselves), and ``axis``'s values."""
    axis = layer.axis
    return (
        layer.fused, layer.momentum, layer.epsilon, layer.center, layer.scale, layer.renorm,
        getattr(layer, "renorm_momentum", None), layer.virtual_batch_size, layer.activity_regularizer,
        layer.dtype_policy, axis, tuple(axis) if isinstance(axis, list) else None,
    )  # fmt: skip


class InferencePlan(NamedTuple):
    """A layer's last inference map and what decided it (module docstring)."""

    kind: tuple[Any, ...]  # the input's type, shape, dtype and device, and whether it is a torch tensor
    settings: tuple[Any, ...]
    weights: dict[str, Array]  # the layer's weights (the dict itself) when the map was made
    host: tuple[Any, ...]  # NumPy views of the weights' memory
    saved: tuple[bytes, ...]  # their bytes then
    ops: Ops
    xp: ModuleType
    config: BNConfig
    map: InferenceMap
    runner: Any  # the schedule's bound scale-and-shift for this map (``bind_affine``), or None

    @classmethod
    def make(
        cls, layer: Any, inputs: Array, weights: dict[str, Array], ops: Ops, xp: ModuleType, config: BNConfig,
        m: InferenceMap,
    ) -> InferencePlan | None:  # fmt: skip
        """The plan of an inference call just made, or None where plans are not kept."""
        kind = None if layer.activity_regularizer is not None else _kind_of(inputs, weights)
        if kind is None:
            return None
        if kind[4]:
            try:
                host = tuple(w.detach().numpy() for w in weights.values())
            except (TypeError, RuntimeError):  # bfloat16, a conjugate view, ...: no NumPy view
                return None
        else:
            host = tuple(weights.values())
        saved = tuple(h.tobytes() for h in host)
        runner, bind = None, getattr(ops, "bind_affine", None)
        if bind is not None and m.view is None and inputs.dtype == m.dtype == dtype_from_name(xp, config.compute_dtype):
            runner = bind(inputs, m.scale, m.shift, m.center, xp)  # every cast of apply_inference_map is a no-op
        return cls(kind, settings_of(layer), weights, host, saved, ops, xp, config, m, runner)

    def run(self, layer: Any, inputs: Array) -> Array | None:
        """The output of ``layer(inputs)`` in inference without a mask, where this plan holds; else None."""
        if not _same_kind(inputs, self.kind) or layer._vars is not self.weights:
            return None
        if not _same(settings_of(layer), self.settings):
            return None
        if get_schedule() == "reference":
            return None
        ops = _functional.select(inputs, self.xp)  # the environment and a failed schedule, read anew
        if ops is not self.ops or any(getattr(w, "requires_grad", False) for w in self.weights.values()):
            return None
        if any(h.tobytes() != b for h, b in zip(self.host, self.saved, strict=True)):
            return None
        if self.runner is not None:
            y = self.runner(inputs)  # the same loops as the schedule's affine, the map's vectors prepared once
            if y is not None:
                return y
        with float_errors_ignored(self.xp):
            return _functional.apply_inference_map(inputs, ops, self.map, config=self.config, xp=self.xp)


def _training_settings(layer: Any) -> tuple[Any, ...]:
    """`settings_of`, with ``trainable`` (a training call reads it too) before ``axis``'s values."""
    now = settings_of(layer)
    return (*now[:-1], layer.trainable, now[-1])


def _kind_of(inputs: Array, weights: dict[str, Array]) -> tuple[Any, ...] | None:
    """What a plan checks of its inputs (type, shape, dtype, device, whether a torch tensor), or None where
    plans are not kept: other libraries, torch devices, modes and autograd, the reference's schedule."""
    on_torch = is_torch_array(inputs)
    if on_torch:
        if _torch_modes() or inputs.device.type != "cpu" or inputs.requires_grad:
            return None
        if any(w.requires_grad for w in weights.values()):
            return None
    elif not is_numpy_array(inputs):
        return None
    if get_schedule() == "reference":
        return None
    return (type(inputs), tuple(inputs.shape), inputs.dtype, getattr(inputs, "device", None), on_torch)


def _same_kind(inputs: Array, kind: tuple[Any, ...]) -> bool:
    """``inputs`` is of the plan's `_kind_of`, outside autograd and torch's modes."""
    if type(inputs) is not kind[0] or inputs.shape != kind[1] or inputs.dtype != kind[2]:
        return False
    if kind[3] is not None and inputs.device != kind[3]:
        return False
    if getattr(inputs, "requires_grad", False):
        return False
    return not (kind[4] and _torch_modes())


def _torch_modes() -> bool:
    """``torch.compile`` is tracing, or a torch function mode is active (a caller intercepting torch's calls
    sees the full call's), or torch cannot say."""
    import torch

    if torch.compiler.is_compiling():  # first: the compiler reads nothing further
        return True
    count = getattr(torch._C, "_len_torch_function_stack", None)
    return count is None or count() > 0


def _inference_mode() -> bool:
    """torch's inference mode is on (the tensors made there are inference tensors)."""
    import torch

    return bool(torch.is_inference_mode_enabled())


def _same(now: Sequence[Any], then: Sequence[Any]) -> bool:
    """The same objects, and ``axis``'s values (the last entry) equal."""
    return all(a is b for a, b in zip(now[:-1], then[:-1], strict=True)) and now[-1] == then[-1]


class TrainingPlan:
    """A layer's last training call's decisions, and the schedule's bound training step (module docstring).

    A training call's output depends on the input and on the weights' values,
    but the path it takes through the reference (`arraybn._reference.batch_norm`)
    and the schedule's three operations on it (`Ops.moments`, `Ops.coefficients`,
    `Ops.affine`) depend only on what an inference plan checks. Where those
    are unchanged since the last training call, and the weights are those that
    call left (the same dict: ``set_weights``, ``build`` and any other call that
    changed them replace it), `TrainingPlan.run` calls the schedule's bound
    step (``bind_training``: the same loops, the layouts and the coefficients'
    factors made once) and keeps the new moving statistics as the full call
    does: the same bits, without the checks and the reference's steps between
    the operations.

    Plans are made for the plain training call only: the non-fused or fused
    path without a mask, an ``adjustment``, batch renormalization, ghost
    batches or an activity regularizer, on a trainable layer whose input has
    the weights' dtype (no cast), outside ``layer.forward`` (which keeps the
    batch statistics for its backward), and where the schedule offers
    ``bind_training`` (numba-kernels). A call under torch's inference mode
    takes the full call, which keeps normal tensors as the moving statistics.
    """

    __slots__ = ("kind", "settings", "weights", "ops", "xp", "config", "step", "constants")

    def __init__(
        self, kind: tuple[Any, ...], settings: tuple[Any, ...], weights: dict[str, Array], ops: Ops,
        xp: ModuleType, config: BNConfig, step: Any, constants: tuple[Array | None, Array | None],
    ) -> None:  # fmt: skip
        self.kind, self.settings, self.weights, self.ops = kind, settings, weights, ops
        self.xp, self.config, self.step, self.constants = xp, config, step, constants

    @classmethod
    def make(cls, layer: Any, inputs: Array, xp: ModuleType, config: BNConfig) -> TrainingPlan | None:
        """The plan of a training call without a mask just made (its state kept), or None where plans are
        not kept."""
        if getattr(layer, "_recording", None) is not None or layer.adjustment is not None:
            return None
        if layer.activity_regularizer is not None or not bool(layer.trainable) or len(config.axis) != 1:
            return None
        if not config.fused and (config.renorm or config.virtual_batch_size is not None):
            return None
        weights = layer._vars
        kind = _kind_of(inputs, weights)
        if kind is None:
            return None
        ops = _functional.select(inputs, xp)
        bind = getattr(ops, "bind_training", None)
        compute = dtype_from_name(xp, config.compute_dtype)
        if bind is None or inputs.dtype != compute or dtype_from_name(xp, config.param_dtype) != compute:
            return None
        (channel,) = config.axis
        shape = tuple(inputs.shape)
        if tuple(weights["moving_mean"].shape) != (shape[channel],):  # the step's (C,) vectors, kept as they are
            return None
        gamma, beta = weights.get("gamma"), weights.get("beta")
        update = MovingUpdate(weights["moving_mean"], weights["moving_variance"], config.momentum, "assign_sub")
        constants: tuple[Array | None, Array | None] = (None, None)
        if config.fused:  # `_reference.fused_forward`'s arguments, without its casts (float32 throughout)
            if inputs.dtype != xp.float32:
                return None
            axes = [i for i in range(len(shape)) if i != channel]
            n = count_of(shape, axes)
            rule = "fused" if config.fused_avg_updates else "assign_sub"
            update = update._replace(rule=rule, bessel=n / max(n - 1, 1))
            device = getattr(inputs, "device", None)
            epsilon = f32_operand(config.epsilon, xp.float32, xp, device)
            constants = (
                None if config.scale and gamma is not None else xp.ones(config.param_shape, dtype=xp.float32, device=device),
                None if config.center and beta is not None else xp.zeros(config.param_shape, dtype=xp.float32, device=device),
            )  # fmt: skip
            gamma = gamma if constants[0] is None else constants[0]
            beta = beta if constants[1] is None else constants[1]
            step = bind(inputs, channel, "fused", epsilon, update, gamma, beta)
        else:  # `_reference.non_fused_forward`'s, likewise
            step = bind(inputs, channel, "non_fused", config.epsilon, update, gamma, beta)
        if step is None:
            return None
        return cls(kind, _training_settings(layer), weights, ops, xp, config, step, constants)

    def run(self, layer: Any, inputs: Array) -> Array | None:
        """The output of ``layer(inputs, training=True)`` without a mask, keeping the new moving statistics,
        where this plan holds; else None (and nothing kept)."""
        weights = self.weights
        if not _same_kind(inputs, self.kind) or layer._vars is not weights:
            return None
        if self.kind[4] and _inference_mode():  # the full call keeps normal tensors, not inference ones (`stored`)
            return None
        if layer.adjustment is not None or getattr(layer, "_recording", None) is not None:
            return None
        if not _same(_training_settings(layer), self.settings):
            return None
        ops = _functional.select(inputs, self.xp)  # the setting, the environment and a failed schedule, read anew
        if ops is not self.ops or any(getattr(w, "requires_grad", False) for w in weights.values()):
            return None
        gamma, beta = self.constants
        with float_errors_ignored(self.xp):
            out = self.step(
                inputs, weights.get("gamma") if gamma is None else gamma, weights.get("beta") if beta is None else beta,
                weights["moving_mean"], weights["moving_variance"],
            )  # fmt: skip
        if out is None:
            return None
        y, new_mean, new_variance = out  # new tensors, outside autograd and inference mode: as the full call keeps them
        self.weights = layer._keep_trained(weights, new_mean, new_variance, self.config)
        return y
