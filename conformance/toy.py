"""A deliberately small NumPy BatchNormalization used to test the runner.

It implements only the plain non-fused float32 path (``renorm``,
``virtual_batch_size``, ``adjustment``, dtype policies, regularizers and
constraints are not supported) and exists to show that the runner accepts a
correct implementation of that path and rejects wrong ones:

* ``bug=None``        -- correct on cases matching ``TOY_CASES``;
* ``bug="unbiased"``  -- normalizes with the unbiased (n-1) batch variance;
* ``bug="epsilon"``   -- ignores ``epsilon``.

``factory`` / ``unbiased_factory`` / ``epsilon_factory`` follow the runner's
``--impl pkg.module:factory`` protocol.
"""

from __future__ import annotations

import numpy as np

#: regex of golden cases the correct toy is expected to pass
TOY_CASES = r"^(core/r[23]/ax=(-1|1|\[1\])|affine/r2/ax=-1)/fused=(None|True|False)/renorm=off/mode=plain/"

_INIT = {"zeros": "Zeros", "ones": "Ones"}


def _init_cfg(name):
    return {"module": "keras.initializers", "class_name": _INIT[name], "config": {}, "registered_name": None}


class ToyBatchNormalization:
    def __init__(self, axis=-1, momentum=0.99, epsilon=1e-3, center=True, scale=True, trainable=True,
                 fused=None, bug=None, **unsupported):
        if unsupported:
            # "feature: explanation": the runner counts unsupported cases per feature
            raise NotImplementedError(f"{sorted(unsupported)[0]}: the toy does not support {sorted(unsupported)}")
        if not isinstance(axis, int) and not (isinstance(axis, list) and len(axis) == 1):
            raise TypeError("toy supports a single axis")
        self.axis = axis if isinstance(axis, int) else axis[0]
        self.momentum, self.epsilon = momentum, epsilon
        self.center, self.scale, self.trainable = center, scale, trainable
        self.bug = bug
        self.fused = fused
        self._w = None

    # -- weights -------------------------------------------------------------
    def build(self, input_shape, xp=None, device=None):
        rank = len(input_shape)
        ax = self.axis % rank
        if rank in (4, 5) and self.fused is not False:
            raise NotImplementedError("path:fused: the toy has no fused path")
        self.fused = False
        self._axis = ax
        c = input_shape[ax]
        w = {}
        if self.scale:
            w["gamma"] = np.ones(c, np.float32)
        if self.center:
            w["beta"] = np.zeros(c, np.float32)
        w["moving_mean"] = np.zeros(c, np.float32)
        w["moving_variance"] = np.ones(c, np.float32)
        self._w = w

    @property
    def weight_names(self):
        return list(self._w)

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
            raise ValueError("wrong number of weights")
        for k, v in zip(list(self._w), ws):
            self._w[k][...] = v

    def apply_constraints(self):
        pass

    def get_config(self):
        return {
            "name": "batch_normalization", "trainable": self.trainable, "dtype": "float32",
            "axis": [getattr(self, "_axis", self.axis)], "momentum": self.momentum, "epsilon": self.epsilon,
            "center": self.center, "scale": self.scale,
            "beta_initializer": _init_cfg("zeros"), "gamma_initializer": _init_cfg("ones"),
            "moving_mean_initializer": _init_cfg("zeros"), "moving_variance_initializer": _init_cfg("ones"),
            "beta_regularizer": None, "gamma_regularizer": None, "beta_constraint": None, "gamma_constraint": None,
        }

    @classmethod
    def from_config(cls, cfg):
        cfg = dict(cfg)
        cfg.pop("name", None)
        cfg.pop("dtype", None)
        for k in list(cfg):
            if k.endswith(("_initializer", "_regularizer", "_constraint")):
                cfg.pop(k)
        return cls(**cfg)

    # -- call ----------------------------------------------------------------
    def __call__(self, x, training=None, mask=None):
        if self._w is None:
            self.build(x.shape)
        x = np.asarray(x, np.float32)
        red = tuple(i for i in range(x.ndim) if i != self._axis)
        shp = [1] * x.ndim
        shp[self._axis] = x.shape[self._axis]
        w = self._w
        if training:
            if mask is None:
                mean = x.mean(axis=red)
                var = ((x - mean.reshape(shp)) ** 2).mean(axis=red)
                n = x.size // x.shape[self._axis]
            else:
                mw = np.broadcast_to(np.asarray(mask, np.float32)[..., None], x.shape)
                cnt = mw.sum(axis=red)
                mean = (x * mw).sum(axis=red) / np.maximum(cnt, 1)
                var = (((x - mean.reshape(shp)) ** 2) * mw).sum(axis=red) / np.maximum(cnt, 1)
                n = cnt
            if self.trainable:
                w["moving_mean"] -= (w["moving_mean"] - mean) * np.float32(1 - self.momentum)
                w["moving_variance"] -= (w["moving_variance"] - var) * np.float32(1 - self.momentum)
            if self.bug == "unbiased":
                var = var * n / np.maximum(n - 1, 1)
        else:
            mean, var = w["moving_mean"], w["moving_variance"]
        eps = 0.0 if self.bug == "epsilon" else self.epsilon
        inv = 1.0 / np.sqrt(var + np.float32(eps))
        if "gamma" in w:
            inv = inv * w["gamma"]
        off = -mean * inv
        if "beta" in w:
            off = w["beta"] + off
        return (x * inv.reshape(shp) + off.reshape(shp)).astype(np.float32)


def factory(kwargs):
    return ToyBatchNormalization(**kwargs)


def unbiased_factory(kwargs):
    return ToyBatchNormalization(bug="unbiased", **kwargs)


def epsilon_factory(kwargs):
    return ToyBatchNormalization(bug="epsilon", **kwargs)
