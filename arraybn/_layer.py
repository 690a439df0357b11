"""``BatchNormalization``: a thin stateful, Keras-compatible shell over the functional core."""

from __future__ import annotations

import dataclasses
import logging
import math
import warnings
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

from . import _functional
from . import constraints as _constraints
from . import initializers as _initializers
from . import regularizers as _regularizers
from ._backward import layer_backward as _layer_backward
from ._backward import layer_forward as _layer_forward
from ._types import BNConfig, BNParams, BNState
from ._namespace import (
    array_device,
    array_namespace,
    compat_namespace,
    dtype_from_name,
    float_errors_ignored,
    is_array,
    is_dask_namespace,
    is_jax_namespace,
    is_traced,
    numpy_namespace,
    stop_gradient,
    stored,
    to_device,
    to_numpy,
)
from ._plan import InferencePlan, TrainingPlan
from ._policy import Policy, get_policy
from ._reference import ghost_batch_shape
from ._validation import (
    build_shape,
    check_adjustment_result,
    check_array_dtype,
    check_axis_argument,
    check_ghost_batches,
    check_input_object,
    check_rank_defined,
    check_renorm_clipping,
    check_virtual_batch,
    param_shape,
    require_known_sizes,
    resolve_fused,
    unknown_size,
    validate_axis,
)

__all__ = ["BatchNormalization"]

Array = Any

# Keyword arguments of the Keras base layer that a BatchNormalization accepts.
_BASE_KWARGS = frozenset(
    {
        "dtype",
        "input_shape",
        "batch_input_shape",
        "batch_size",
        "input_dim",
        "weights",
        "autocast",
        "dynamic",
        "activity_regularizer",
    }
)
_name_counts: dict[str, int] = {}
_logger = logging.getLogger("arraybn")


@dataclasses.dataclass(frozen=True, repr=False, eq=False)  # compared and hashed by identity, as Keras's
class InputSpec:
    """What ``build`` expects of later inputs (Keras's ``InputSpec``): the rank and the normalized axes' sizes."""

    dtype: Any = None
    shape: tuple[Any, ...] | None = None
    ndim: int | None = None
    max_ndim: int | None = None
    min_ndim: int | None = None
    axes: dict[int, int] | None = None

    def __repr__(self) -> str:
        fields = [f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self) if getattr(self, f.name)]
        return f"InputSpec({', '.join(fields)})"


def _unique_name(base: str) -> str:
    n = _name_counts.get(base, 0)
    _name_counts[base] = n + 1
    return base if n == 0 else f"{base}_{n}"


class BatchNormalization:
    """Layer that normalizes its inputs (``tf.compat.v1.keras.layers.BatchNormalization``).

    Batch normalization keeps the mean output close to 0 and its standard
    deviation close to 1, and works differently in training and inference.

    **During training** (``training=True``) the layer normalizes with the mean
    and variance of the current batch: ``gamma * (x - mean(x)) / sqrt(var(x) +
    epsilon) + beta``, and updates the moving statistics:
    ``moving = moving - (moving - batch) * (1 - momentum)``.

    **During inference** (``training=False``, and ``training=None``, which the
    v1 layer treats as inference) it uses the moving statistics instead.

    **``trainable=False``** (v1 meaning): the weights are reported as
    non-trainable and the moving statistics are frozen, but a call with
    ``training=True`` still normalizes with the batch statistics (TF2's layer
    would switch to inference instead).

    The arguments, defaults, weight names and order, ``get_config`` keys and
    exception types are TensorFlow's; every TensorFlow behaviour this layer
    reproduces is listed in ``docs/semantics.md``. Inputs may come from any
    Array API namespace; the weights are created on the first call (or by
    `build`) in the input's namespace and on its device.

    Examples
    --------
    >>> import numpy as np, arraybn
    >>> layer = arraybn.BatchNormalization()
    >>> x = np.arange(12.0, dtype=np.float32).reshape(4, 3)
    >>> y = layer(x, training=True)
    >>> [round(float(v), 3) for v in layer.moving_mean]
    [0.045, 0.055, 0.065]
    """

    def __init__(
        self,
        axis: int | Sequence[int] = -1,
        momentum: float = 0.99,
        epsilon: float = 1e-3,
        center: bool = True,
        scale: bool = True,
        beta_initializer: Any = "zeros",
        gamma_initializer: Any = "ones",
        moving_mean_initializer: Any = "zeros",
        moving_variance_initializer: Any = "ones",
        beta_regularizer: Any = None,
        gamma_regularizer: Any = None,
        beta_constraint: Any = None,
        gamma_constraint: Any = None,
        renorm: bool = False,
        renorm_clipping: dict[str, Any] | None = None,
        renorm_momentum: float = 0.99,
        fused: bool | None = None,
        trainable: bool = True,
        virtual_batch_size: int | None = None,
        adjustment: Callable[[tuple[int, ...]], tuple[Any, Any]] | None = None,
        name: str | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.pop("synchronized", None)  # the v1 layer drops it
        for key in kwargs:
            if key not in _BASE_KWARGS:
                msg = (
                    f"Keyword argument not understood: {key} (received {key}={kwargs[key]!r}). Allowed: the "
                    f"BatchNormalization arguments and {sorted(_BASE_KWARGS)}."
                )
                raise TypeError(msg)
        self.axis: int | list[int] = check_axis_argument(axis)
        self._policy: Policy = get_policy(kwargs.get("dtype"))
        self.momentum = momentum
        self.epsilon = epsilon
        self.center = center
        self.scale = scale
        self.beta_initializer = _named(_initializers.get, "beta_initializer", beta_initializer)
        self.gamma_initializer = _named(_initializers.get, "gamma_initializer", gamma_initializer)
        self.moving_mean_initializer = _named(_initializers.get, "moving_mean_initializer", moving_mean_initializer)
        self.moving_variance_initializer = _named(
            _initializers.get, "moving_variance_initializer", moving_variance_initializer
        )
        self.beta_regularizer = _named(_regularizers.get, "beta_regularizer", beta_regularizer)
        self.gamma_regularizer = _named(_regularizers.get, "gamma_regularizer", gamma_regularizer)
        self.beta_constraint = _named(_constraints.get, "beta_constraint", beta_constraint)
        self.gamma_constraint = _named(_constraints.get, "gamma_constraint", gamma_constraint)
        self.renorm = renorm
        self.virtual_batch_size = virtual_batch_size
        self.adjustment = adjustment
        self.fused = True if fused is None else fused  # v1: None means "fused where possible"
        self.trainable = trainable
        if renorm:
            self.renorm_clipping = check_renorm_clipping(renorm_clipping)
            self.renorm_momentum = renorm_momentum
        if name is not None and not isinstance(name, str):
            msg = f"Expected `name` argument to be a string, but got: {name}"
            raise TypeError(msg)
        self.name = name if name is not None else _unique_name("batch_normalization")
        self.supports_masking = True
        self._batch_input_shape = _batch_input_shape(kwargs)
        self._initial_weights = kwargs.get("weights")
        self.activity_regularizer = _named(
            _regularizers.get, "activity_regularizer", kwargs.get("activity_regularizer")
        )
        self._built = False
        self._built_axis: list[int] = []
        self._fusable = False  # build's resolution of `fused`: whether the fused path can be taken
        self._xp: ModuleType | None = None
        self._device: Any = None
        self._config: BNConfig | None = None
        self._config_vbs: int | None = None  # virtual_batch_size at build (the weights' and axes' layout)
        self._input_ndim: int | None = None
        self._input_axes: dict[int, int] = {}
        self.input_spec: InputSpec | None = None  # Keras's: set by build
        self._vars: dict[str, Array] = {}
        self._good: dict[str, Array] = {}  # the last state known to exist (a lazy state may fail)
        self._activity_losses: list[Array] = []
        self._plan: InferencePlan | None = None  # the last inference call's map (arraybn._plan)
        self._training_plan: TrainingPlan | None = None  # the last training call's decisions (arraybn._plan)
        self._recording: list[Any] | None = None  # set by layer.forward around its call (_backward.py)

    # ------------------------------------------------------------- copy, pickle
    def __getstate__(self) -> dict[str, Any]:
        """The layer's attributes with its namespace by name (a module cannot be pickled); the device
        is read back from the weights on load."""
        state = dict(self.__dict__)
        xp = state.pop("_xp")
        state["_xp_name"] = None if xp is None else xp.__name__
        state["_device"] = None
        state["_plan"] = None  # views of the weights' memory: made again by the next inference call
        state["_training_plan"] = None  # made again by the next training call
        state["_recording"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        import importlib

        state = dict(state)
        name = state.pop("_xp_name", None)
        state["_xp"] = None if name is None else compat_namespace(importlib.import_module(name))
        state.setdefault("_plan", None)
        state.setdefault("_training_plan", None)
        self.__dict__.update(state)
        if self._vars:
            self._device = array_device(next(iter(self._vars.values())))

    # ------------------------------------------------------------------ dtypes
    @property
    def dtype_policy(self) -> Policy:
        return self._policy

    @property
    def dtype(self) -> str:
        """The policy's variable dtype (Keras's ``layer.dtype``)."""
        return self._policy.variable_dtype

    @property
    def compute_dtype(self) -> str:
        return self._policy.compute_dtype

    @property
    def variable_dtype(self) -> str:
        return self._policy.variable_dtype

    stateful = False  # Keras's flag for layers that keep state across batches (RNNs); BN does not

    @property
    def built(self) -> bool:
        return self._built

    # ------------------------------------------------------------------- build
    def build(self, input_shape: Sequence[int], *, xp: ModuleType | None = None, device: Any = None) -> None:
        """Create the weights for inputs of ``input_shape`` in namespace ``xp`` on ``device``.

        Called by the first ``__call__`` with the input's namespace and device;
        call it yourself to set weights before the first call (default: NumPy).
        Called on a built layer, it builds anew for ``input_shape`` with fresh
        weights (in the same namespace and on the same device unless given), as
        Keras's ``build`` does; ``layer.axis`` is then the normalized one of the
        first build. Raises before changing anything when the shape does not suit
        the layer.
        """
        if self._built:
            xp = self._xp if xp is None else xp
            device = self._device if device is None else device
        xp = numpy_namespace() if xp is None else compat_namespace(xp)  # build(shape, xp=numpy) too
        if not self._policy.is_floating:
            msg = (
                f"BatchNormalization needs a floating-point dtype policy; layer {self.name!r} has "
                f"dtype={self._policy.name!r}. Use 'float32', 'float64', 'mixed_float16', ..."
            )
            raise ValueError(msg)
        shape = build_shape(input_shape)  # None: unknown
        axes = validate_axis(self.axis, shape)
        undefined = [a for a in axes if shape[a] is None]
        if undefined:
            msg = f"Input has undefined `axis` dimension. Received input with shape {shape} and axis={tuple(axes)}"
            raise ValueError(msg)
        rank = len(shape)
        check_virtual_batch(self.virtual_batch_size, axes, self.adjustment)
        fused, fused_value = resolve_fused(
            self.fused,
            rank=rank,
            axes=axes,
            renorm=self.renorm,
            virtual_batch_size=self.virtual_batch_size,
            adjustment=self.adjustment,
            compute_dtype=self._policy.compute_dtype,
        )
        pshape = param_shape(shape, axes, self.virtual_batch_size)
        try:
            param_dtype = dtype_from_name(xp, self._policy.param_dtype)
            dtype_from_name(xp, self._policy.compute_dtype)  # raises now if xp lacks it (bfloat16 on NumPy)
        except TypeError as err:
            msg = f"{err} (layer {self.name!r} has dtype={self._policy.name!r})"
            raise TypeError(msg) from err
        config = BNConfig(
            axis=tuple(axes),
            rank=rank,
            param_shape=pshape,
            momentum=self.momentum,
            epsilon=self.epsilon,
            fused=fused,
            fused_avg_updates=isinstance(self.momentum, (float, int)),
            renorm=bool(self.renorm),
            renorm_clipping=_build_clipping(getattr(self, "renorm_clipping", {})),
            renorm_momentum=getattr(self, "renorm_momentum", 0.99),
            virtual_batch_size=self.virtual_batch_size,
            compute_dtype=self._policy.compute_dtype,
            param_dtype=self._policy.param_dtype,
        )

        with float_errors_ignored(xp):
            new_vars = {k: stored(a) for k, a in self._create_weights(pshape, param_dtype, xp, device).items()}
        if self._initial_weights is not None:
            new_vars = self._converted_weights(self._initial_weights, new_vars, xp, param_dtype, device)

        # Everything succeeded: commit (TF mutates axis/fused in build the same way). The device
        # is the one the weights landed on: a requested torch.device("cuda") is "cuda:0" there.
        device = array_device(new_vars["moving_mean"])
        self._xp, self._device, self._config = xp, device, config
        self._config_vbs = self.virtual_batch_size
        self._vars = self._good = new_vars
        self._plan = self._training_plan = None
        self.fused, self._fusable = fused_value, fused
        self.axis = [a + 1 for a in axes] if self.virtual_batch_size is not None else axes
        self._input_ndim = rank
        self._input_axes = {a: shape[a] for a in axes}
        self.input_spec = InputSpec(ndim=rank, axes=dict(self._input_axes))
        self._built_axis = list(self.axis)
        self._initial_weights = None  # Keras sets the constructor's `weights` once, at the first build
        self._built = True

    def _create_weights(
        self, pshape: tuple[int, ...], param_dtype: Any, xp: ModuleType, device: Any
    ) -> dict[str, Array]:
        def make(name: str) -> Array:
            init = getattr(self, name)
            try:
                return _initialize(init, pshape, param_dtype, xp, device)
            except (TypeError, ValueError) as err:
                msg = f"{name}={_short(init)} could not create a weight of shape {pshape}: {err}"
                raise type(err)(msg) from err

        new_vars: dict[str, Array] = {}
        if _named(bool, "scale", self.scale):
            new_vars["gamma"] = make("gamma_initializer")
        if _named(bool, "center", self.center):
            new_vars["beta"] = make("beta_initializer")
        new_vars["moving_mean"] = make("moving_mean_initializer")
        new_vars["moving_variance"] = make("moving_variance_initializer")
        if self.renorm:
            new_vars["moving_stddev"] = xp.sqrt(make("moving_variance_initializer"))
            new_vars["renorm_mean"] = make("moving_mean_initializer")
            new_vars["renorm_stddev"] = xp.sqrt(make("moving_variance_initializer"))
        return new_vars

    # -------------------------------------------------------------------- call
    def __call__(self, inputs: Array, training: Any = None, mask: Array | None = None) -> Array:
        """Normalize ``inputs``; ``training=None`` means inference (the v1 learning phase 0).

        The steps of tf-keras's ``call``: check the input and build on the first call
        (`_checked_input`), read the attributes TF reads per call (`_current_config`), call the
        ``adjustment`` and settle the mask (`_call_arguments`), compute (`arraybn.batch_norm`; in
        inference its two steps, `_inference`), then keep the new state and the activity loss
        (`_keep`). Nothing is kept if a step raises. An inference call whose input, settings and
        weights are those of the last one applies that call's map at once, and a plain training call
        after a training call with the same input kind and settings runs the schedule's bound
        training step (`arraybn._plan`): the same bits as the full call.
        """
        if mask is None:
            if training is True:
                trained = self._training_plan
                y = None if trained is None else trained.run(self, inputs)  # the last training call's decisions
                if y is not None:
                    return y
            elif training is None or training is False:
                plan = self._plan
                y = None if plan is None else plan.run(self, inputs)  # the last inference call's map
                if y is not None:
                    self._activity_losses = []
                    return y
        xp, mask, deferred_mask, mask_given = self._checked_input(inputs, training, mask)
        assert self._config is not None
        training = _training_value(training)
        if not self._config.axis:
            msg = "list index out of range (axis=[]: no axis to normalize; TensorFlow raises IndexError here)"
            raise IndexError(msg)
        config = self._current_config(self._config, training)
        adjustment, mask = self._call_arguments(inputs, config, training, mask, deferred_mask, mask_given)
        v = self._vars
        params = BNParams(v.get("gamma"), v.get("beta"))
        state = BNState(
            v["moving_mean"], v["moving_variance"], v.get("moving_stddev"), v.get("renorm_mean"), v.get("renorm_stddev")
        )
        if training:
            with float_errors_ignored(xp):
                y, new_state = _functional._batch_norm(
                    inputs, params, state, training=True, config=config, mask=mask, adjustment=adjustment,
                    trainable=bool(self.trainable), xp=xp, record=getattr(self, "_recording", None),
                )  # fmt: skip
        else:
            y, new_state = self._inference(inputs, v, params, state, config, xp), state
        self._keep(v, new_state, self._activity_loss(y, xp), config, xp)
        if training:
            self._training_plan = None if mask is not None else TrainingPlan.make(self, inputs, xp, config)
        return y

    def _inference(
        self, inputs: Array, weights: dict[str, Array], params: BNParams, state: BNState, config: BNConfig,
        xp: ModuleType,
    ) -> Array:  # fmt: skip
        """`arraybn.batch_norm` in inference, as its two steps (the map, then its application), keeping the
        map for the next calls (`arraybn._plan`)."""
        with float_errors_ignored(xp):
            ops, m = _functional.inference_map(inputs, params, state, config=config, xp=xp)
            y = _functional.apply_inference_map(inputs, ops, m, config=config, xp=xp)
        self._plan = InferencePlan.make(self, inputs, weights, ops, xp, config, m)
        return y

    def _checked_input(
        self, inputs: Array, training: Any, mask: Array | None
    ) -> tuple[ModuleType, Array | None, Any, bool]:
        """The input's checks (TF's classes), the build on a first call; the namespace and the mask as far
        as it can be settled before the path is known (a list or object array waits, see `_call_arguments`)."""
        check_rank_defined(inputs)
        if not is_array(inputs):
            check_input_object(inputs, built=self._built)
        check_array_dtype(inputs, "inputs")
        if not self._built and is_array(inputs) and inputs.ndim == 0:
            msg = f"Input has undefined rank. Received: input_shape=() (inputs={inputs!r}); inputs of rank 1 or more are allowed."
            raise ValueError(msg)
        mask_given = mask is not None
        if mask is not None and not _training_value(training):
            mask = None  # TF reads the mask in training only (the fused path still warns)
        deferred_mask = None  # a list, scalar or object/string array: converted once the path is known
        if mask is not None and (
            not is_array(mask) or getattr(getattr(mask, "dtype", None), "kind", None) in ("O", "U", "S", "V")
        ):
            deferred_mask, mask = mask, None
        xp = array_namespace(inputs) if mask is None else array_namespace(inputs, mask)
        if mask is not None and not is_traced(inputs) and array_device(mask) != array_device(inputs):
            msg = (
                f"The mask is on device {array_device(mask)!r} but the input is on "
                f"{array_device(inputs)!r}. Put both on the same device."
            )
            raise ValueError(msg)
        if not self._built:
            self.build(tuple(None if unknown_size(s) else s for s in inputs.shape), xp=xp, device=array_device(inputs))
        else:
            self._check_input(inputs, xp)
        return xp, mask, deferred_mask, mask_given

    def _call_arguments(
        self, inputs: Array, config: BNConfig, training: bool, mask: Array | None, deferred_mask: Any, mask_given: bool
    ) -> tuple[Any, Array | None]:
        """The checks of the call's numbers, the ``adjustment`` called once (non-fused training only, with
        the shape TF gives it) and checked, and the mask the path reads (the fused path warns and drops it)."""
        # momentum is read by the updates: a frozen non-fused layer makes none (the fused path converts it anyway)
        reads_momentum = training and (bool(self.trainable) or config.fused)
        _check_call_numbers(
            self.momentum,
            self.epsilon,
            training=reads_momentum,
            fused=config.fused,
            renorm_momentum=getattr(self, "renorm_momentum", None) if training and config.renorm else None,
            renorm_epsilon=training and config.renorm and not config.fused,
        )
        adjustment = self.adjustment
        if training and not config.fused and _truthy(adjustment):  # TF calls it in non-fused training only
            if not callable(adjustment):
                msg = f"`adjustment` must be a callable (shape) -> (scale, bias); received adjustment={adjustment!r}."
                raise TypeError(msg)
            shape = tuple(inputs.shape)
            if config.virtual_batch_size is not None:  # TF calls it with the ghost-batch view's shape
                check_ghost_batches(config.virtual_batch_size, shape, training)
                shape = ghost_batch_shape(shape, config.virtual_batch_size, training)
            pair = check_adjustment_result(_call_user(adjustment, "adjustment", shape), shape)
            adjustment = lambda shape: pair  # noqa: E731 - computed once, checked
        else:
            adjustment = None  # inference and the fused kernel do not call it
        if config.fused and mask_given:
            warnings.warn(
                "Masking is not supported with `fused=True`. You should either turn off fusing "
                "(`fused=False`) or you should not pass a `mask` argument when calling the layer. "
                "For the moment `mask` will be ignored for the normalization.",
                UserWarning,
                stacklevel=3,
            )
            return adjustment, None
        if deferred_mask is not None:  # the non-fused path reads it: TF converts it with convert_to_tensor
            mask = _converted_mask(deferred_mask, inputs)
        return adjustment, mask

    def _activity_loss(self, y: Array, xp: ModuleType) -> list[Array]:
        """Keras's activity penalty of the output, divided by the batch size (none without a regularizer)."""
        if self.activity_regularizer is None or not _truthy(self.activity_regularizer):
            return []
        require_known_sizes(y.shape[:1], "The activity regularizer's mean over the batch")
        loss = _call_user(self.activity_regularizer, "activity_regularizer", y)
        loss = loss / y.shape[0]
        if is_jax_namespace(xp):  # a kept JAX value carries no gradient; under jax.grad this is the value
            loss = stop_gradient(loss)
        return [loss]

    def _keep(
        self, old: dict[str, Array], new_state: BNState, activity_losses: list[Array], config: BNConfig, xp: ModuleType
    ) -> None:
        """Keep the call's new state, its config and its losses, in one assignment of the state."""
        changed = {k: a for k, a in new_state._asdict().items() if a is not None and a is not old.get(k)}
        leaks = [*changed.values(), *activity_losses] if is_jax_namespace(xp) else []
        if any(is_traced(a) for a in leaks) and not any(is_traced(a) for a in old.values()):
            msg = (
                f'Layer "{self.name}" was called inside a JAX transformation (jax.jit, jax.vmap, ...) '
                "in training, or with an activity regularizer: its moving statistics or its loss would "
                "become that transformation's traced values and leak out of it. Train under a "
                "transformation with the functional core (arraybn.batch_norm returns the new state), or "
                "call the layer eagerly; inference calls without an activity regularizer work under "
                "transformations."
            )
            raise RuntimeError(msg)
        new_vars = {**old, **{k: stored(a) for k, a in changed.items()}} if changed else old
        self._vars = new_vars  # one assignment: a reader sees the old state or the new, never a mix
        if not is_dask_namespace(xp):
            self._good = new_vars  # computed already (dask's waits for get_weights, see there)
        self._config = config  # the numbers read by this call (a later backward uses them)
        self._activity_losses = activity_losses

    def _keep_trained(
        self, old: dict[str, Array], moving_mean: Array, moving_variance: Array, config: BNConfig
    ) -> dict[str, Array]:
        """`_keep` of a training call a `TrainingPlan` made (the new moving statistics, stored already; no
        losses); the new weights."""
        new_vars = {**old, "moving_mean": moving_mean, "moving_variance": moving_variance}
        self._vars = self._good = new_vars
        self._config = config
        self._activity_losses = []
        return new_vars

    def compute_output_shape(self, input_shape: Sequence[Any]) -> tuple[Any, ...]:
        return tuple(input_shape)

    def compute_mask(self, inputs: Array, mask: Array | None = None) -> Array | None:
        """The output's mask: the input's, passed through (Keras, ``supports_masking``)."""
        return mask

    @property
    def updates(self) -> list[Any]:
        """Always ``[]``: a call updates the moving statistics itself (TF 2 eager gives ``[]`` too)."""
        warnings.warn(
            "`layer.updates` will be removed in a future version. This property should not be used in "
            "TensorFlow 2.0, as `updates` are applied automatically.",
            UserWarning,
            stacklevel=2,
        )
        return []

    def _check_changed_after_build(self, config: BNConfig, training: bool = True) -> None:
        """``axis``, ``virtual_batch_size``, ``center`` and ``scale`` set after build: TF reads them on
        every call against weights built for the old values, and fails (its exception classes)."""
        axis = self.axis
        same = isinstance(axis, (list, tuple)) and all(isinstance(a, int) for a in axis) and set(axis) == set(self._built_axis)
        if same and len(axis) != len(self._built_axis) and training:
            same = False  # a repeated axis: TF's inference runs, its training update fails
        if not config.fused and not same:
            if isinstance(axis, dict):
                cls: type[Exception] = KeyError
            elif not isinstance(axis, (list, tuple)) or not all(isinstance(a, int) for a in axis):
                cls = TypeError
            elif not axis:
                cls = IndexError
            else:
                cls = ValueError
            msg = (
                f"layer {self.name!r} was built with axis={self._built_axis} and cannot normalize another axis; "
                f"received axis={axis!r} set after build. Build the layer anew (layer.build(shape)) instead."
            )
            raise cls(msg)
        for flag, weight in (("center", "beta"), ("scale", "gamma")):
            value = getattr(self, flag)
            if config.fused and weight not in self._vars and _truthy(value):
                msg = (
                    f"layer {self.name!r} was built without {weight!r} ({flag}=False) and its fused path cannot "
                    f"use {flag}={value!r} set after build: there is no {weight} to apply. Build the layer anew."
                )
                raise ValueError(msg)

    def _current_config(self, config: BNConfig, training: bool = True) -> BNConfig:
        """The build-time config with the numbers TF reads on every call (set after build, say)."""
        try:
            fused_on = bool(self.fused)
        except (TypeError, ValueError) as err:
            msg = f"`fused` must be True, False or None; received fused={self.fused!r} ({err})."
            raise ValueError(msg) from err
        if fused_on and not self._fusable:
            # TF reads self.fused on every call; its fused path then needs what build sets only for it
            msg = (
                f"'BatchNormalization' object has no attribute '_data_format': layer {self.name!r} was "
                f"built for the non-fused path, so `fused` cannot be turned on after build (received fused={self.fused!r})."
            )
            raise AttributeError(msg)
        fused = self._fusable and fused_on  # turned off after build: the non-fused path
        self._check_changed_after_build(config, training)
        numbers = {
            "momentum": self.momentum,
            "epsilon": self.epsilon,
            "fused_avg_updates": isinstance(self.momentum, (float, int)),
            "fused": fused,
        }
        if fused:
            # the fused path replaces gamma/beta by 1/0 once scale/center is off (the non-fused one uses
            # the weights whatever these say, and never reads them); turned on without the weight:
            # _check_changed_after_build
            numbers.update(center=_truthy(self.center), scale=_truthy(self.scale))
        else:
            # the non-fused path reads renorm and its settings, and virtual_batch_size, on every call
            numbers.update(renorm=bool(self.renorm), virtual_batch_size=self.virtual_batch_size)
            if self.renorm:
                if "renorm_mean" not in self._vars:
                    msg = (
                        "'BatchNormalization' object has no attribute 'renorm_mean' (renorm was turned on "
                        f"after layer {self.name!r} was built without it)"
                    )
                    raise AttributeError(msg)
                numbers.update(renorm_momentum=self.renorm_momentum)
                if training:  # TF reads the clipping in renorm training only
                    numbers.update(renorm_clipping=_checked_clipping(self.renorm_clipping))
        built_vbs = self._config_vbs
        if self.virtual_batch_size is not None and built_vbs is None:
            # TF reshapes into ghost batches with the build-time axes: its reshape or kernel fails
            msg = (
                f"virtual_batch_size={self.virtual_batch_size!r} was set after layer {self.name!r} was built "
                "without ghost batches: TensorFlow's reshape (or fused kernel) rejects the input."
            )
            raise ValueError(msg)
        if self.virtual_batch_size is None and built_vbs is not None:
            msg = (
                "list index out of range (virtual_batch_size was set to None after build: the axes "
                "were shifted for the ghost-batch axis; TensorFlow raises IndexError here)"
            )
            raise IndexError(msg)
        if all(getattr(config, k) is v for k, v in numbers.items()):
            return config  # the usual call: nothing set since build (no dataclass to rebuild)
        current = dataclasses.replace(config, **numbers)
        try:
            same = bool(current == config)
        except (TypeError, ValueError):  # an array set as a number: compared later, by its check
            same = False
        return config if same else current

    def forward(self, inputs: Array, training: Any = True, mask: Array | None = None) -> tuple[Array, Any]:
        """``(y, ctx)``: the same call as ``layer(inputs, training, mask)`` (same output, same
        state update), also returning what `backward` needs. ``training`` defaults to True."""
        return _layer_forward(self, inputs, training, mask)

    def backward(self, ctx: Any, dy: Array) -> tuple[Array, dict[str, Array]]:
        """``(dx, grads)`` for the upstream gradient ``dy`` of the `forward` that gave ``ctx``.

        ``grads`` maps the trainable weights' names (``"gamma"``, ``"beta"``) to their
        gradients; it is empty when the layer is not trainable. See docs/backward.md.
        """
        return _layer_backward(self, ctx, dy)

    def _check_input(self, inputs: Array, xp: ModuleType) -> None:
        """Keras's ``InputSpec`` check, plus the namespace and device the weights live in."""
        shape = tuple(inputs.shape)
        if len(shape) != self._input_ndim:
            msg = (
                f'Input 0 of layer "{self.name}" is incompatible with the layer: expected '
                f"ndim={self._input_ndim}, found ndim={len(shape)}. Full shape received: {shape}"
                + (f" (inputs={inputs!r})" if not shape else "")
            )
            raise ValueError(msg)
        for a, size in self._input_axes.items():
            if shape[a] != size:
                msg = (
                    f'Input 0 of layer "{self.name}" is incompatible with the layer: expected axis '
                    f"{a} of input shape to have value {size}, but received input with shape {shape}"
                )
                raise ValueError(msg)
        assert self._xp is not None
        if xp.__name__ != self._xp.__name__:
            msg = (
                f'Layer "{self.name}" holds its weights in {self._xp.__name__} but was called with an '
                f"array of {xp.__name__}. Convert the input to {self._xp.__name__} (arraybn never "
                "copies between libraries silently), or build a separate layer."
            )
            raise TypeError(msg)
        traced_input = is_jax_namespace(xp) and is_traced(inputs)
        if is_jax_namespace(xp) and not traced_input and any(is_traced(a) for a in self._vars.values()):
            msg = (
                f'Layer "{self.name}" holds traced JAX values as weights: it was built or trained inside '
                "a JAX transformation (jax.jit, jax.grad, ...) that has ended. Build the layer with an "
                "eager call (or layer.build) before transforming a function that uses it."
            )
            raise RuntimeError(msg)
        dev = array_device(inputs)
        if traced_input:
            pass  # a traced array has no device of its own: the transformation places it
        elif self._device is not None and dev != self._device:
            msg = (
                f'Layer "{self.name}" holds its weights on device {self._device!r} but the input is on '
                f"{dev!r}. Move the input to {self._device!r} first."
            )
            raise ValueError(msg)

    # ----------------------------------------------------------------- weights
    @property
    def weight_names(self) -> list[str]:
        """Short names of `weights`, in TF's order (``gamma``, ``beta``, ``moving_mean``, ...)."""
        return list(self._vars)

    @property
    def weights(self) -> list[Array]:
        return list(self._vars.values())

    variables = weights

    @property
    def trainable_weights(self) -> list[Array]:
        if not self.trainable:
            return []
        return [self._vars[k] for k in ("gamma", "beta") if k in self._vars]

    @property
    def non_trainable_weights(self) -> list[Array]:
        if not self.trainable:
            return self.weights
        return [a for k, a in self._vars.items() if k not in ("gamma", "beta")]

    trainable_variables = trainable_weights
    non_trainable_variables = non_trainable_weights

    def count_params(self) -> int:
        """The number of scalars in `weights` (Keras's ``count_params``); the layer must be built."""
        if not self._built:
            msg = (
                f"You tried to call `count_params` on layer {self.name}, but the layer isn't built. "
                f"You can build it manually via: `{self.name}.build(batch_input_shape)`."
            )
            raise ValueError(msg)
        return sum(math.prod(w.shape) for w in self._vars.values())

    def get_weights(self) -> list[Any]:
        """NumPy copies of `weights` (host copies for device arrays), in TF's order.

        On a lazy library (dask) this computes the weights. If that computation fails (a chunk of
        an input raised, a worker died), the error propagates and the layer returns to the last
        state that did exist (built, set, or computed by an earlier ``get_weights``): the calls
        since then are dropped and the layer stays usable. A successful computation becomes that
        state, and the weights become concrete arrays (which also ends the growth of the graph).
        """
        current = self._vars
        try:
            out = [to_numpy(w) for w in current.values()]
        except Exception:
            if self._vars is current and current is not self._good:
                self._vars = self._good
            raise
        if self._xp is not None and is_dask_namespace(self._xp) and current is not self._good:
            good = {k: self._xp.asarray(a) for k, a in zip(current, out, strict=True)}
            if self._vars is current:  # no call replaced the state meanwhile
                self._vars = self._good = good
        return out

    def set_weights(self, weights: Sequence[Any]) -> None:
        """Replace the weights (TF's order and shapes); all or nothing."""
        if not self._built and len(weights) == 0:
            return  # an unbuilt layer has no weights: an empty list sets them all, as in Keras
        if not self._built:
            msg = (
                f'You called `set_weights(weights)` on layer "{self.name}" with a weight list of length '
                f"{len(weights)}, but the layer was expecting 0 weights. Call the layer (or `build`) first."
            )
            raise ValueError(msg)
        assert self._xp is not None and self._config is not None
        param_dtype = dtype_from_name(self._xp, self._config.param_dtype)
        self._vars = self._good = self._converted_weights(weights, self._vars, self._xp, param_dtype, self._device)

    def _converted_weights(
        self, weights: Sequence[Any], current: dict[str, Array], xp: ModuleType, dtype: Any, device: Any
    ) -> dict[str, Array]:
        if len(weights) != len(current):
            msg = (
                f'You called `set_weights(weights)` on layer "{self.name}" with a weight list of length '
                f"{len(weights)}, but the layer was expecting {len(current)} weights "
                f"({', '.join(current)})."
            )
            raise ValueError(msg)
        out = {}
        for (name, ref), w in zip(current.items(), weights, strict=True):
            shape = tuple(getattr(w, "shape", ()))  # as Keras: a list or a number has shape ()
            if shape != tuple(ref.shape):
                msg = (
                    f"Layer {self.name} weight shape {tuple(ref.shape)} is not compatible with provided "
                    f"weight shape {shape} (weight '{name}')."
                )
                raise ValueError(msg)
            # a copy of the values, outside autograd, as Keras assigns them to its variables
            try:
                if getattr(getattr(w, "dtype", None), "kind", None) in ("O", "U", "S"):
                    w = w.astype(to_numpy(ref).dtype)  # TF converts an object array's numbers; strings fail
                out[name] = stored(_to_namespace(stored(w) if is_array(w) else w, xp, dtype, device))
            except (TypeError, ValueError) as err:
                msg = (
                    f"Layer {self.name}: could not set weight '{name}' from the provided value "
                    f"{_short(w)} ({err}); an array-like of shape {tuple(ref.shape)} of real numbers is allowed."
                )
                raise type(err)(msg) from err
        return out

    def _weight(self, name: str) -> Array | None:
        return self._vars.get(name)

    gamma = property(lambda self: self._weight("gamma"), doc="Scale (None when ``scale=False`` or unbuilt).")
    beta = property(lambda self: self._weight("beta"), doc="Offset (None when ``center=False`` or unbuilt).")
    moving_mean = property(lambda self: self._weight("moving_mean"))
    moving_variance = property(lambda self: self._weight("moving_variance"))
    moving_stddev = property(lambda self: self._weight("moving_stddev"), doc="Renorm only.")
    renorm_mean = property(lambda self: self._weight("renorm_mean"), doc="Renorm only.")
    renorm_stddev = property(lambda self: self._weight("renorm_stddev"), doc="Renorm only.")

    # ------------------------------------------------------ losses, constraints
    @property
    def losses(self) -> list[Array]:
        """Penalties: the last call's activity regularization, then gamma's and beta's regularizers."""
        out = list(self._activity_losses)
        if "gamma" in self._vars and self.gamma_regularizer is not None:
            out.append(_call_user(self.gamma_regularizer, "gamma_regularizer", self._vars["gamma"]))
        if "beta" in self._vars and self.beta_regularizer is not None:
            out.append(_call_user(self.beta_regularizer, "beta_regularizer", self._vars["beta"]))
        return out

    def apply_constraints(self) -> None:
        """Project gamma and beta with their constraints, as Keras's optimizer does after an update."""
        new = dict(self._vars)
        if "gamma" in new and self.gamma_constraint is not None:
            new["gamma"] = _call_user(self.gamma_constraint, "gamma_constraint", new["gamma"])
        if "beta" in new and self.beta_constraint is not None:
            new["beta"] = _call_user(self.beta_constraint, "beta_constraint", new["beta"])
        self._vars = new
        if self._xp is not None and not is_dask_namespace(self._xp):
            self._good = new

    # ------------------------------------------------------------------ config
    def get_config(self) -> dict[str, Any]:
        """TF's config keys and values (renorm / virtual_batch_size keys only when set)."""
        config: dict[str, Any] = {"name": self.name, "trainable": self.trainable, "dtype": self._policy.serialize()}
        if self._batch_input_shape is not None:
            config["batch_input_shape"] = self._batch_input_shape
        config.update(
            {
                "axis": self.axis,
                "momentum": self.momentum,
                "epsilon": self.epsilon,
                "center": self.center,
                "scale": self.scale,
                "beta_initializer": _initializers.serialize(self.beta_initializer),
                "gamma_initializer": _initializers.serialize(self.gamma_initializer),
                "moving_mean_initializer": _initializers.serialize(self.moving_mean_initializer),
                "moving_variance_initializer": _initializers.serialize(self.moving_variance_initializer),
                "beta_regularizer": _regularizers.serialize(self.beta_regularizer),
                "gamma_regularizer": _regularizers.serialize(self.gamma_regularizer),
                "beta_constraint": _constraints.serialize(self.beta_constraint),
                "gamma_constraint": _constraints.serialize(self.gamma_constraint),
            }
        )
        if self.renorm:
            config["renorm"] = True
            config["renorm_clipping"] = self.renorm_clipping
            config["renorm_momentum"] = self.renorm_momentum
        if self.virtual_batch_size is not None:
            config["virtual_batch_size"] = self.virtual_batch_size
        if self.adjustment is not None:  # TF logs this (logging, not the warnings module)
            _logger.warning(
                "The `adjustment` function of this `BatchNormalization` layer cannot be serialized and "
                "has been omitted from the layer config. It will not be included when re-creating the "
                "layer from the saved config."
            )
        return config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> BatchNormalization:
        """A layer from `get_config`'s dict; any problem with it is a TypeError, as in Keras."""
        try:
            return cls(**config)
        except Exception as err:
            msg = (
                f"Error when deserializing class 'BatchNormalization': {type(err).__name__}: {err}\n\n"
                f"Received config={config!r}; a dict of the constructor's arguments (get_config()) is allowed."
            )
            raise TypeError(msg) from err

    def __repr__(self) -> str:
        state = "built" if self._built else "unbuilt"
        return f"<arraybn.BatchNormalization name={self.name!r} axis={self.axis} {state}>"


def _batch_input_shape(kwargs: dict[str, Any]) -> tuple[Any, ...] | None:
    """Keras's ``_batch_input_shape``: a tuple, from whichever shape argument was given."""
    if "batch_input_shape" in kwargs:
        return tuple(kwargs["batch_input_shape"])
    if "input_shape" in kwargs:
        return (kwargs.get("batch_size"), *kwargs["input_shape"])
    if "input_dim" in kwargs:
        return (kwargs.get("batch_size"), kwargs["input_dim"])
    return None


_F32_MAX = 3.4028234663852886e38


def _check_call_numbers(
    momentum: Any,
    epsilon: Any,
    *,
    training: bool,
    fused: bool,
    renorm_momentum: Any = None,
    renorm_epsilon: bool = False,
) -> None:
    """TF accepts any momentum/epsilon at construction and fails where it first uses them.

    ``epsilon=None`` is the fused kernel's attribute default (1e-4, see `BNConfig`) on the fused
    path and an error elsewhere; momentum is read in training only, and on the fused path a
    ``None`` fails to convert to a tensor (ValueError) where elsewhere ``1.0 - None`` fails
    (TypeError). Booleans are numbers there (``True`` is 1).
    """
    if fused and type(epsilon).__module__ == "numpy" and type(epsilon).__name__ in ("bool", "ndarray"):
        msg = f"Expected float for argument 'epsilon' (the fused kernel's attribute); received epsilon={epsilon!r}."
        raise TypeError(msg)
    if not _is_real(epsilon) and not (epsilon is None and fused):
        msg = f"epsilon must be a real number; received epsilon={epsilon!r}."
        # the fused kernel's float attribute: TypeError; elsewhere the conversion to a tensor: ValueError
        raise TypeError(msg) if fused else ValueError(msg)
    if training and fused and type(momentum).__module__ == "numpy" and (
        hasattr(momentum, "__index__") or type(momentum).__name__ == "bool"
    ):
        msg = f"Cannot convert 1.0 to a tensor of momentum's dtype: received momentum={momentum!r}; a float is allowed."
        raise TypeError(msg)  # the fused kernel's update converts 1.0 to the momentum's integer dtype
    if training and not _is_real(momentum):
        msg = f"momentum must be a real number; received momentum={momentum!r}."
        # the fused path converts it to a tensor (ValueError for None or a dict); elsewhere 1.0 - momentum
        raise ValueError(msg) if fused and (momentum is None or isinstance(momentum, dict)) else TypeError(msg)
    if renorm_momentum is not None and not _is_real(renorm_momentum) or renorm_momentum is None and renorm_epsilon:
        msg = f"renorm_momentum must be a real number; received renorm_momentum={renorm_momentum!r}."
        raise TypeError(msg)
    # TF converts these Python numbers to float32 tensors: a finite value beyond float32's range fails
    too_large = [("momentum", momentum)] if training and not fused else []
    if renorm_momentum is not None:
        too_large.append(("renorm_momentum", renorm_momentum))
    if renorm_epsilon:
        too_large.append(("epsilon", epsilon))
    for name, value in too_large:
        if _is_real(value) and math.isfinite(float(value)) and abs(float(value)) > _F32_MAX:
            msg = (
                f"{name}={value!r} is out of float32's range (TensorFlow cannot convert it to a tensor); "
                f"a real number of magnitude at most {_F32_MAX:.7g} is allowed."
            )
            raise ValueError(msg)


def _is_real(value: Any) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return not isinstance(value, (str, bytes))


def _training_value(training: Any) -> bool:
    """v1 semantics: ``None`` is the learning phase, 0 (inference) outside ``fit``.

    Otherwise TF's ``smart_cond`` rule: a bool, or a value equal to 1 or 0 (``np.bool_``,
    ``1.0``, ...); anything else, unhashable arrays included, is a TypeError.
    """
    if training is None:
        return False
    if isinstance(training, bool):
        return training
    try:
        valid = training in {0, 1}
    except TypeError:  # unhashable (an array)
        valid = False
    if not valid:
        msg = (
            "`pred` must be a Tensor, or a Python bool, or 1 or 0. Received: "
            f"training={_short(training)} of {type(training)}; `training` must be True, False, None, 1 or 0."
        )
        raise TypeError(msg)
    return bool(training)


def _named(get: Callable[[Any], Any], name: str, value: Any) -> Any:
    """``get(value)`` with the argument's name and the received value in any error (same class)."""
    try:
        return get(value)
    except (TypeError, ValueError, AttributeError) as err:
        msg = f"Invalid `{name}`: {err} Received: {name}={_short(value)}."
        raise type(err)(msg) from err


def _call_user(fn: Any, name: str, *args: Any) -> Any:
    """Call a user-supplied ``fn`` (a regularizer, constraint, adjustment); its exception keeps its
    class and gains the argument's name where the class allows."""
    try:
        return fn(*args)
    except Exception as err:
        if name in str(err):
            raise
        try:
            new = type(err)(f"{name}={_short(fn)} raised {type(err).__name__}: {err}")
        except Exception:  # noqa: BLE001 - a class that takes other arguments: keep the original
            raise err from None
        raise new from err


def _converted_mask(mask: Any, inputs: Any) -> Any:
    """A list or scalar mask as an array of the input's library (TF converts it with ``convert_to_tensor``)."""
    xp = array_namespace(inputs)
    import numpy as np  # what TF's conversion rules are: NumPy's

    try:
        host = np.asarray(mask)
    except (TypeError, ValueError) as err:
        msg = f"Failed to convert the mask to an array: received mask={_short(mask)} ({err})."
        raise ValueError(msg) from err
    if host.dtype.kind in ("O", "U", "S", "V"):
        msg = (
            f"Failed to convert the mask to a tensor: received mask={_short(mask)} (NumPy dtype {host.dtype}); "
            "a boolean or numeric mask is allowed."
        )
        raise ValueError(msg)
    return xp.asarray(mask, device=array_device(inputs))


def _build_clipping(clipping: Any) -> dict[str, Any]:
    """The clipping build keeps in the config: a dict (a non-dict fails where training reads it)."""
    return dict(clipping) if isinstance(clipping, dict) else {}


def _checked_clipping(clipping: Any) -> Any:
    """``renorm_clipping`` as TF reads it in renorm training: ``.get`` of rmax/rmin/dmax, numbers or None."""
    if not hasattr(clipping, "get"):
        msg = (
            f"'{type(clipping).__name__}' object has no attribute 'get': received renorm_clipping={clipping!r}; "
            "a dict with keys 'rmax', 'rmin', 'dmax' is allowed."
        )
        raise AttributeError(msg)
    for key in ("rmax", "rmin", "dmax"):
        v = clipping.get(key)
        if v is not None and not _is_real(v):
            msg = f"renorm_clipping[{key!r}]={v!r} is not a number; received renorm_clipping={clipping!r}."
            raise TypeError(msg)
    return clipping


def _truthy(v: Any) -> bool:
    try:
        return bool(v)
    except Exception:  # noqa: BLE001
        return True


def _short(value: Any, limit: int = 120) -> str:
    s = repr(value)
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _to_namespace(w: Any, xp: ModuleType, dtype: Any, device: Any) -> Array:
    """``w`` as an array of ``xp``/``dtype``/``device``; other libraries go through NumPy."""
    if is_array(w) and array_namespace(w).__name__ == xp.__name__:
        out = w
        if device is not None and not is_traced(w) and array_device(w) != device:
            out = to_device(w, device)  # the layer's device (a CPU tensor for CUDA weights)
    else:
        out = xp.asarray(to_numpy(w) if is_array(w) else w, device=device)
    return xp.astype(out, dtype) if out.dtype != dtype else xp.asarray(out, copy=True)


def _initialize(init: Any, shape: tuple[int, ...], dtype: Any, xp: ModuleType, device: Any) -> Array:
    if init is None:  # Keras's add_weight default for floating weights
        init = _initializers.GlorotUniform()
    if isinstance(init, _initializers.Initializer):
        return init(shape, dtype, xp=xp, device=device)
    value = init(shape, dtype=dtype)  # a user callable (shape, dtype) -> array-like
    out = _to_namespace(value, xp, dtype, device)
    if tuple(out.shape) != shape:
        out = xp.broadcast_to(out, shape)
    return out
