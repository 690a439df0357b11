"""``flax.linen.BatchNorm`` (JAX) behind TF's v1 arguments.

Mapping: ``axis`` is Flax's feature axis; ``momentum`` has TF's convention; ``center`` /
``scale`` are ``use_bias`` / ``use_scale``; the policy's compute dtype is ``dtype`` and its
variable dtype ``param_dtype``; a training call is ``use_running_average=False`` with the
``batch_stats`` collection mutable, and a frozen layer (``trainable=False``) drops the updated
statistics; TF's mask (the input's shape without the last axis) becomes ``mask[..., None]``.
Flax's defaults are kept (``use_fast_variance=True``: the variance as E[x^2] - E[x]^2).
"""

from __future__ import annotations

import numpy as np

from ._base import PortLayer


class FlaxBN(PortLayer):
    framework = "flax.linen.BatchNorm"
    supports_mask = True

    def check(self):
        super().check()
        import jax

        jax.config.update("jax_enable_x64", True)  # float64 policies

    def forward(self, x, training, mask):
        import flax.linen as nn
        import jax.numpy as jnp

        dt = {"float16": jnp.float16, "float32": jnp.float32, "float64": jnp.float64, "bfloat16": jnp.bfloat16}
        batch_stats = bool(training)
        mod = nn.BatchNorm(use_running_average=not batch_stats, axis=self._axis, momentum=float(self.momentum),
                           epsilon=float(self.epsilon), dtype=dt[self.compute_dtype],
                           param_dtype=dt[self.var_dtype], use_bias=self.center, use_scale=self.scale)
        vdt = dt[self.var_dtype]
        params = {}
        if "gamma" in self._w:
            params["scale"] = jnp.asarray(self._w["gamma"], vdt)
        if "beta" in self._w:
            params["bias"] = jnp.asarray(self._w["beta"], vdt)
        variables = {"params": params, "batch_stats": {"mean": jnp.asarray(self._w["moving_mean"], vdt),
                                                       "var": jnp.asarray(self._w["moving_variance"], vdt)}}
        xj = jnp.asarray(x).astype(dt[self.compute_dtype])
        m = None if mask is None else jnp.asarray(mask)[..., None]
        if batch_stats:
            y, upd = mod.apply(variables, xj, mask=m, mutable=["batch_stats"])
            if self.update_stats(training):
                self._w["moving_mean"][...] = np.asarray(upd["batch_stats"]["mean"], np.float64)
                self._w["moving_variance"][...] = np.asarray(upd["batch_stats"]["var"], np.float64)
        else:
            y = mod.apply(variables, xj, mask=m)
        if y.dtype == jnp.bfloat16:
            return y
        return np.asarray(y)


def factory(kwargs):
    return FlaxBN(**kwargs)
