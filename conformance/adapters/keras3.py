"""Keras 3's ``keras.layers.BatchNormalization`` behind TF's v1 arguments.

Keras 3 keeps most of the v1 layer's constructor (initializers, regularizers, constraints,
renorm, dtype policies, masks) and its weight names, so the mapping is short: ``fused`` is dropped
(Keras 3 has one path), a one-element axis list becomes an int, ``virtual_batch_size`` and
``adjustment`` (gone from Keras 3) and several axes raise NotImplementedError. The backend is
torch unless ``KERAS_BACKEND`` is set before this module is imported.
"""

from __future__ import annotations

import os

import numpy as np

from ._base import unsupported

os.environ.setdefault("KERAS_BACKEND", "torch")


def _np(t):
    if hasattr(t, "detach"):
        import torch

        t = t.detach().cpu()
        if t.dtype == torch.bfloat16:
            return t  # the runner reads torch bfloat16 tensors itself
        return t.numpy()
    return np.asarray(t)


class Keras3BN:
    framework = "Keras 3"

    def __init__(self, **kwargs):
        import keras

        kw = dict(kwargs)
        kw.pop("fused", None)
        if kw.pop("virtual_batch_size", None) is not None:
            raise unsupported("ghost_batch", "Keras 3 has no virtual_batch_size")
        if kw.pop("adjustment", None) is not None:
            raise unsupported("adjustment", "Keras 3 has no adjustment callable")
        axis = kw.get("axis", -1)
        if isinstance(axis, list):
            if len(axis) != 1:
                raise unsupported("axis:multi", "Keras 3 normalizes over one axis")
            kw["axis"] = axis[0]
        self.layer = keras.layers.BatchNormalization(**kw)
        self.fused = False

    # -- surface the runner drives --------------------------------------------------------
    def build(self, input_shape, xp=None, device=None):
        self.layer.build(tuple(input_shape))

    @property
    def trainable(self):
        return self.layer.trainable

    @property
    def weights(self):
        return self.layer.weights

    @property
    def weight_names(self):
        return [v.name for v in self.layer.weights]

    @property
    def trainable_weights(self):
        return self.layer.trainable_weights

    @property
    def non_trainable_weights(self):
        return self.layer.non_trainable_weights

    @property
    def losses(self):
        return list(self.layer.losses)

    def get_weights(self):
        return [np.asarray(w) for w in self.layer.get_weights()]

    def set_weights(self, ws):
        self.layer.set_weights([np.asarray(w) for w in ws])

    def apply_constraints(self):
        for name in ("gamma", "beta"):
            v = getattr(self.layer, name, None)
            c = getattr(self.layer, f"{name}_constraint", None)
            if v is not None and c is not None:
                v.assign(c(v))

    def get_config(self):
        return self.layer.get_config()

    @classmethod
    def from_config(cls, cfg):
        import keras

        obj = cls.__new__(cls)
        obj.layer = keras.layers.BatchNormalization.from_config(cfg)
        obj.fused = False
        return obj

    def __call__(self, x, training=None, mask=None):
        return _np(self.layer(x, training=training, mask=mask))


def factory(kwargs):
    return Keras3BN(**kwargs)
