"""``torch.nn.BatchNorm1d/2d/3d`` behind TF's v1 arguments, used the way a port usually does.

Mapping: the channel axis is moved to position 1 and the module picked by rank (1d: rank 2 or 3,
2d: rank 4, 3d: rank 5); ``momentum`` is ``1 - momentum``; ``center`` and ``scale`` both off is
``affine=False`` (one on and one off cannot be expressed: torch has one switch); the training
flag is the module's mode: ``training=True`` calls ``train()``, ``False`` calls ``eval()`` and
``None`` leaves the mode as it is (a new module is in training mode); ``trainable=False`` sets
``requires_grad=False`` on the affine parameters, which does not stop the running statistics from
being updated.
"""

from __future__ import annotations

import numpy as np

from ._base import PortLayer, unsupported
from .torch_functional import _dt, _np


class TorchModuleBN(PortLayer):
    framework = "torch.nn.BatchNorm*d"

    def check(self):
        super().check()
        if self.center != self.scale:
            raise unsupported("center:off" if not self.center else "scale:off",
                              "BatchNorm*d has one affine switch for gamma and beta")
        if not isinstance(self.momentum, (int, float)):
            raise unsupported("momentum:not_a_number", f"momentum={self.momentum!r}")

    def built_hook(self):
        import torch

        cls = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d,
               5: torch.nn.BatchNorm3d}.get(self.rank)
        if cls is None:
            raise unsupported("rank:1", "BatchNorm*d takes rank 2 to 5")
        c = self._w["moving_mean"].shape[0]
        self.mod = cls(c, eps=float(self.epsilon), momentum=1.0 - float(self.momentum), affine=self.center,
                       dtype=_dt(self.var_dtype))
        if self.center:
            for p in self.mod.parameters():
                p.requires_grad_(self.trainable)

    def _load(self):
        import torch

        with torch.no_grad():
            if self.center:
                self.mod.weight.copy_(torch.from_numpy(self._w["gamma"]))
                self.mod.bias.copy_(torch.from_numpy(self._w["beta"]))
            self.mod.running_mean.copy_(torch.from_numpy(self._w["moving_mean"]))
            self.mod.running_var.copy_(torch.from_numpy(self._w["moving_variance"]))

    def forward(self, x, training, mask):
        import torch

        self._load()
        if training is True:
            self.mod.train()
        elif training is False:
            self.mod.eval()
        xt = torch.movedim(torch.from_numpy(np.ascontiguousarray(x)).to(_dt(self.compute_dtype)), self._axis, 1)
        with torch.no_grad():
            y = self.mod(xt)
        self._w["moving_mean"][...] = _np(self.mod.running_mean)
        self._w["moving_variance"][...] = _np(self.mod.running_var)
        return _np(torch.movedim(y, 1, self._axis))


def factory(kwargs):
    return TorchModuleBN(**kwargs)
