"""The layer surface the runner drives, around a framework's batch normalization.

`PortLayer` keeps the weights as NumPy arrays in TF's order (gamma, beta, moving_mean,
moving_variance), parses TF's constructor arguments and maps what every framework shares; a
subclass implements `forward` (one call) and `check` (what its framework cannot express).
"""

from __future__ import annotations

import numpy as np

#: dtype policy -> (variable dtype, compute dtype)
POLICIES = {
    None: ("float32", "float32"), "float32": ("float32", "float32"), "float64": ("float64", "float64"),
    "float16": ("float16", "float16"), "mixed_float16": ("float32", "float16"),
    "bfloat16": ("bfloat16", "bfloat16"), "mixed_bfloat16": ("float32", "bfloat16"),
}

_CONST = {"zeros": 0.0, "ones": 1.0, "Zeros": 0.0, "Ones": 1.0}

#: TF's constructor arguments and their defaults
DEFAULTS = dict(axis=-1, momentum=0.99, epsilon=1e-3, center=True, scale=True,
                beta_initializer="zeros", gamma_initializer="ones", moving_mean_initializer="zeros",
                moving_variance_initializer="ones", beta_regularizer=None, gamma_regularizer=None,
                beta_constraint=None, gamma_constraint=None, renorm=False, renorm_clipping=None,
                renorm_momentum=0.99, fused=None, trainable=True, virtual_batch_size=None, adjustment=None,
                name=None, dtype=None, activity_regularizer=None)


def unsupported(tag, why):
    """NotImplementedError in the runner's ``"feature: explanation"`` form."""
    return NotImplementedError(f"{tag}: {why}")


def initial_value(init, what):
    if isinstance(init, str) and init in _CONST:
        return _CONST[init]
    if isinstance(init, dict) and init.get("class_name") in _CONST:
        return _CONST[init["class_name"]]
    if isinstance(init, dict) and init.get("class_name") == "Constant":
        return float((init.get("config") or {}).get("value", 0.0))
    raise unsupported("initializer", f"{what}={init!r} has no equivalent in this adapter")


def to_numpy(x):
    if isinstance(x, np.ndarray):
        return x
    mod = type(x).__module__
    if mod.startswith("torch"):
        import torch

        t = x.detach().cpu()
        return t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()
    return np.asarray(x)


class PortLayer:
    framework = "?"
    #: whether ``forward`` takes TF's mask (otherwise a masked call raises NotImplementedError)
    supports_mask = False

    def __init__(self, **kwargs):
        unknown = set(kwargs) - set(DEFAULTS)
        if unknown:
            raise TypeError(f"unexpected keyword arguments {sorted(unknown)}")
        a = {**DEFAULTS, **kwargs}
        self.kw = kwargs
        self.a = a
        pol = a["dtype"]
        if isinstance(pol, dict):
            pol = (pol.get("config") or {}).get("name")
        if pol not in POLICIES:
            raise unsupported("policy", f"dtype policy {a['dtype']!r} has no equivalent")
        self.var_dtype, self.compute_dtype = POLICIES[pol]
        axis = a["axis"]
        if isinstance(axis, list) and len(axis) == 1:
            axis = axis[0]
        if isinstance(axis, bool) or not isinstance(axis, (int, list)):
            raise TypeError(f"axis must be an int or a list of ints, got {axis!r}")
        self.axis = axis
        self.momentum, self.epsilon = a["momentum"], a["epsilon"]
        self.center, self.scale, self.trainable = bool(a["center"]), bool(a["scale"]), bool(a["trainable"])
        self.fused = False
        self._w = None
        self.check()

    # -- what a framework cannot express --------------------------------------------------
    def check(self):
        a = self.a
        if a["renorm"]:
            raise unsupported("renorm", f"{self.framework} has no batch renormalization")
        if a["virtual_batch_size"] is not None:
            raise unsupported("ghost_batch", f"{self.framework} has no virtual_batch_size (ghost batches)")
        if a["adjustment"] is not None:
            raise unsupported("adjustment", f"{self.framework} has no adjustment callable")
        if a["gamma_regularizer"] or a["beta_regularizer"]:
            raise unsupported("regularizer", f"{self.framework}'s batch norm has no weight regularizers")
        if a["activity_regularizer"]:
            raise unsupported("activity_regularizer", f"{self.framework}'s batch norm has no activity regularizer")
        if a["gamma_constraint"] or a["beta_constraint"]:
            raise unsupported("constraint", f"{self.framework}'s batch norm has no weight constraints")
        if isinstance(self.axis, list):
            raise unsupported("axis:multi", f"{self.framework} normalizes over one channel axis")
        if self.momentum is None or isinstance(self.momentum, bool):
            raise unsupported("momentum:not_a_number", f"momentum={self.momentum!r}")

    # -- weights --------------------------------------------------------------------------
    @property
    def weight_names(self):
        return list(self._w)

    def build(self, input_shape, xp=None, device=None):
        rank = len(input_shape)
        if not -rank <= self.axis < rank:
            raise ValueError(f"axis {self.axis} out of range for rank {rank}")
        self._axis = self.axis % rank
        if self._axis == 0:
            raise unsupported("axis:batch", f"{self.framework} cannot normalize over the batch axis")
        if rank < 2:
            raise unsupported("rank:1", f"{self.framework} needs a batch axis and a channel axis")
        self.rank = rank
        c = int(input_shape[self._axis])
        dt = np.float32 if self.var_dtype == "bfloat16" else np.dtype(self.var_dtype)
        w = {}
        if self.scale:
            w["gamma"] = np.full(c, initial_value(self.a["gamma_initializer"], "gamma_initializer"), dt)
        if self.center:
            w["beta"] = np.full(c, initial_value(self.a["beta_initializer"], "beta_initializer"), dt)
        w["moving_mean"] = np.full(c, initial_value(self.a["moving_mean_initializer"], "moving_mean_initializer"), dt)
        w["moving_variance"] = np.full(
            c, initial_value(self.a["moving_variance_initializer"], "moving_variance_initializer"), dt)
        self._w = w
        self.built_hook()

    def built_hook(self):
        pass

    @property
    def weights(self):
        return list(self._w.values())

    @property
    def trainable_weights(self):
        return [self._w[k] for k in ("gamma", "beta") if k in self._w] if self.trainable else []

    @property
    def non_trainable_weights(self):
        t = self.trainable_weights
        return [w for w in self.weights if not any(w is v for v in t)]

    @property
    def losses(self):
        return []

    def get_weights(self):
        return [w.copy() for w in self._w.values()]

    def set_weights(self, ws):
        if len(ws) != len(self._w):
            raise ValueError(f"expected {len(self._w)} weights, got {len(ws)}")
        for k, v in zip(list(self._w), ws):
            v = np.asarray(v)
            if v.shape != self._w[k].shape:
                raise ValueError(f"{k}: shape {v.shape} != {self._w[k].shape}")
            self._w[k][...] = v

    def apply_constraints(self):
        pass

    def get_config(self):
        return {}

    @classmethod
    def from_config(cls, cfg):
        return cls(**cfg)

    # -- calls ----------------------------------------------------------------------------
    def __call__(self, x, training=None, mask=None):
        if self._w is None:
            self.build(tuple(np.shape(x)))
        x = to_numpy(x)
        if mask is not None:
            mask = to_numpy(mask)
            if not self.supports_mask:
                raise unsupported("mask", f"{self.framework}'s batch norm takes no mask")
        if self.momentum is None:
            raise TypeError("momentum must be a number")
        if self.epsilon is None:
            raise ValueError("epsilon must be a number")
        return self.forward(x, training, mask)

    def forward(self, x, training, mask):
        raise NotImplementedError

    # -- helpers --------------------------------------------------------------------------
    def param(self, name, default):
        return self._w[name] if name in self._w else np.full(self._w["moving_mean"].shape, default,
                                                             self._w["moving_mean"].dtype)

    def update_stats(self, training):
        """TF updates the moving statistics in training calls of a trainable layer."""
        return bool(training) and self.trainable
