"""Print (and optionally save as JSON) what benchmarks/gpu_check.sh runs on: versions and GPUs.

Exit status 0 when a usable GPU was found (CuPy or torch CUDA), 3 otherwise, so the
shell script can say up front that the GPU tests are going to skip.
"""

from __future__ import annotations

import importlib
import json
import platform
import sys
from typing import Any


def _version(name: str) -> str | None:
    try:
        mod = importlib.import_module(name)
    except Exception as err:  # ImportError, or a broken CUDA install raising on import
        return f"not importable ({type(err).__name__}: {err})"[:200]
    return str(getattr(mod, "__version__", "?"))


def _gpus() -> dict[str, Any]:
    found: dict[str, Any] = {}
    try:
        import torch

        if torch.cuda.is_available():
            found["torch_cuda"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            found["torch_cuda_version"] = torch.version.cuda
        else:
            found["torch_cuda"] = "torch.cuda.is_available() is False"
    except Exception as err:
        found["torch_cuda"] = f"{type(err).__name__}: {err}"[:200]
    try:
        import cupy

        n = cupy.cuda.runtime.getDeviceCount()
        found["cupy"] = [cupy.cuda.runtime.getDeviceProperties(i)["name"].decode() for i in range(n)]
    except Exception as err:
        found["cupy"] = f"{type(err).__name__}: {err}"[:200]
    try:
        import jax

        found["jax"] = [str(d) for d in jax.devices()]
    except Exception as err:
        found["jax"] = f"{type(err).__name__}: {err}"[:200]
    return found


def main(argv: list[str]) -> int:
    report = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "versions": {
            name: _version(name)
            for name in (
                "arraybn",
                "array_api_compat",
                "numpy",
                "cupy",
                "torch",
                "jax",
                "array_api_strict",
                "pytest",
                "hypothesis",
            )
        },
        "gpus": _gpus(),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if argv:
        with open(argv[0], "w", encoding="utf-8") as f:
            f.write(text + "\n")
    gpus = report["gpus"]
    has_gpu = isinstance(gpus.get("torch_cuda"), list) or isinstance(gpus.get("cupy"), list)
    return 0 if has_gpu else 3


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
