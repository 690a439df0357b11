"""``torch.nn.functional.batch_norm`` behind TF's v1 BatchNormalization arguments.

Mapping: the channel axis is moved to position 1; torch's ``momentum`` is ``1 - momentum``;
``center=False`` / ``scale=False`` pass no bias / weight; ``training=None`` is inference (TF's
eager default); ``trainable=False`` normalizes a training call with the batch statistics and
passes no running statistics (so nothing is updated), as TF does. Dtype policies: the input is
cast to the compute dtype, the weights to the variable dtype (torch itself decides what a mixed
call does). The running statistics are torch's own: the moving variance is always updated with
the unbiased (n - 1) batch variance.
"""

from __future__ import annotations

import numpy as np

from ._base import PortLayer, unsupported

def _dt(name):
    import torch

    return {"float16": torch.float16, "float32": torch.float32, "float64": torch.float64,
            "bfloat16": torch.bfloat16}[name]


def _np(t):
    import torch

    t = t.detach()
    return t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()


class TorchFunctionalBN(PortLayer):
    framework = "torch.nn.functional.batch_norm"

    def check(self):
        super().check()
        if not isinstance(self.momentum, (int, float)):
            raise unsupported("momentum:not_a_number", f"momentum={self.momentum!r}")

    def forward(self, x, training, mask):
        import torch
        import torch.nn.functional as F

        ax = self._axis
        xt = torch.from_numpy(np.ascontiguousarray(x)).to(_dt(self.compute_dtype))
        xt = torch.movedim(xt, ax, 1)
        wdt = _dt(self.var_dtype)
        g = torch.from_numpy(self._w["gamma"]).to(wdt) if "gamma" in self._w else None
        b = torch.from_numpy(self._w["beta"]).to(wdt) if "beta" in self._w else None
        update = self.update_stats(training)
        rm = torch.from_numpy(self._w["moving_mean"].copy()).to(wdt)
        rv = torch.from_numpy(self._w["moving_variance"].copy()).to(wdt)
        y = F.batch_norm(xt, rm if (update or not training) else None, rv if (update or not training) else None,
                         g, b, training=bool(training), momentum=1.0 - float(self.momentum), eps=float(self.epsilon))
        if update:
            self._w["moving_mean"][...] = _np(rm)
            self._w["moving_variance"][...] = _np(rv)
        return _np(torch.movedim(y, 1, ax))


def factory(kwargs):
    return TorchFunctionalBN(**kwargs)
