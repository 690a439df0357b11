"""Schedules: faster computations of the reference arithmetic, one chosen per call, each one switchable off.

The reference (``arraybn._reference``) defines every number arraybn computes.
A schedule is a subclass of its `Ops` that computes some bulk operations
faster for one kind of array: it declares, per operation, whether its result
is the reference's bit for bit or differs within a bound (the order of a sum's
additions), and ``tests/test_schedules.py`` holds it to that. A call picks its
schedule once, at the top (`select`), from the input's library and the
setting of `schedule`:

====================  ================================================  ==========================
name                  applies to                                        declared
====================  ================================================  ==========================
``reference``         everything (the plain Array API expressions)      the reference
``numba-kernels``     eager C-contiguous NumPy float32/float64 arrays   sums: order (float64);
                      and torch CPU tensors (outside autograd and       else bitwise
                      ``torch.compile``) of at least 1 MiB, one
                      channel axis; needs the optional ``numba``
``numpy-blocked``     eager C-contiguous NumPy float32/float64 arrays   sums: order; else bitwise
                      of at least 1 MiB, one channel axis
``cupy-kernels``      eager CuPy float32/float64 arrays                 sums: order; else bitwise
``torch-eager``       eager torch float32/float64 tensors (CPU, CUDA)   sums: order; else bitwise
                      outside ``torch.compile`` and autograd
``dask-chunked``      dask float32/float64 arrays on NumPy chunks       moments: merge order;
                                                                        else bitwise
====================  ================================================  ==========================

``with arraybn.schedule("reference"):`` runs the reference everywhere;
``"auto"`` (the default) lets each call take the schedule for its library;
a schedule's name runs that schedule where it applies and the reference
elsewhere. Under ``"auto"`` a library with several schedules takes the first
of the table's order that applies (``numba-kernels`` where Numba is installed,
then ``numpy-blocked`` or ``torch-eager``); ``ARRAYBN_NUMBA=0`` keeps the Numba
loops out of ``"auto"`` and ``ARRAYBN_CUDA_KERNELS=0`` the CuPy kernels.

A schedule that fails where the reference would not (a CUDA kernel that does
not compile or launch on the device at hand) is switched off for the rest of
the process with one `RuntimeWarning` (`disable`); the operation that failed,
and every later call, computes in the reference. A user's first call never
raises because of a schedule.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import math
import os
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from types import ModuleType
from typing import Any

from .._namespace import is_cupy_array, is_dask_array, is_numpy_array, is_torch_array
from .._reference import REFERENCE, Ops

__all__ = ["available_schedules", "disable", "falls_back", "get_schedule", "pairwise_sum", "schedule", "select"]

Array = Any

# name -> (module, class, which arrays it is for)
_REGISTRY: dict[str, tuple[str, str]] = {
    "numba-kernels": ("numba_kernels", "NumbaKernels"),
    "numpy-blocked": ("numpy_blocked", "NumpyBlocked"),
    "cupy-kernels": ("cupy_kernels", "CupyKernels"),
    "torch-eager": ("torch_eager", "TorchEager"),
    "dask-chunked": ("dask_chunked", "DaskChunked"),
}
_CHOICES = ("auto", "reference", *_REGISTRY)
_SETTING: contextvars.ContextVar[str] = contextvars.ContextVar("arraybn_schedule", default="auto")
_INSTANCES: dict[str, Ops] = {}
_DISABLED: dict[str, str] = {}  # name -> why (the first failure)


def available_schedules() -> dict[str, dict[str, str]]:
    """Every schedule's name and its declared bound per operation (``"bitwise"``, or how it differs)."""
    out = {"reference": {}}
    for name in _REGISTRY:
        out[name] = dict(_instance(name).bounds)
    return out


def get_schedule() -> str:
    """The current setting: ``"auto"``, ``"reference"`` or a schedule's name."""
    return _SETTING.get()


@contextlib.contextmanager
def schedule(name: str) -> Iterator[None]:
    """Run the calls inside the ``with`` block under schedule ``name``.

    ``"reference"`` computes with the reference's plain Array API expressions
    only; ``"auto"`` lets every call take the schedule made for its arrays'
    library; a schedule's name (`available_schedules`) takes that schedule
    where it applies and the reference elsewhere. The setting is a context
    variable: it holds for this thread (and asyncio task) only.
    """
    if name not in _CHOICES:
        msg = f"Unknown schedule {name!r}; expected one of {list(_CHOICES)}."
        raise ValueError(msg)
    token = _SETTING.set(name)
    try:
        yield
    finally:
        _SETTING.reset(token)


def _instance(name: str) -> Ops:
    ops = _INSTANCES.get(name)
    if ops is None:
        module, cls = _REGISTRY[name]
        ops = _INSTANCES[name] = getattr(importlib.import_module(f"{__name__}.{module}"), cls)()
    return ops


def disable(name: str, error: BaseException) -> None:
    """Switch schedule ``name`` off for the rest of the process after ``error``; warn once."""
    if name in _DISABLED:
        return
    _DISABLED[name] = f"{type(error).__name__}: {error}"
    msg = (
        f"arraybn: the {name!r} schedule failed ({_DISABLED[name]}); this and every later call compute "
        "with the reference Array API code instead (same results within the schedule's declared bound)."
    )
    warnings.warn(msg, RuntimeWarning, stacklevel=2)


def disabled() -> dict[str, str]:
    """The schedules switched off by a failure, with the first failure of each."""
    return dict(_DISABLED)


def falls_back(method: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a schedule's method: on any failure, `disable` the schedule and compute with `Ops`' method.

    A schedule's methods do no input checking (the reference has checked
    everything before they run), so an exception from one is the schedule's
    own failure, never the user's.
    """

    @functools.wraps(method)
    def run(self: Ops, *args: Any, **kwargs: Any) -> Any:
        if self.name not in _DISABLED:
            try:
                return method(self, *args, **kwargs)
            except Exception as error:  # noqa: BLE001 - any failure of the fast path: the reference takes over
                disable(self.name, error)
        return getattr(Ops, method.__name__)(self, *args, **kwargs)

    return run


def pairwise_sum(parts: Sequence[Array]) -> Array:
    """Partial sums added pairwise, in order (``((p0 + p1) + (p2 + p3)) + ...``): the error of the
    total grows with the logarithm of the number of parts, as a tree reduction's does."""
    parts = list(parts)
    while len(parts) > 1:
        paired = [parts[i] + parts[i + 1] for i in range(0, len(parts) - 1, 2)]
        if len(parts) % 2:
            paired.append(parts[-1])
        parts = paired
    return parts[0]


_LIBRARY: dict[type, str | None] = {}  # an array type's library, as `_library` found it


def _library(x: Array) -> str | None:
    """``x``'s library among those with schedules, from its type (looked up once per type)."""
    kind = type(x)
    if kind not in _LIBRARY:
        checks = (("numpy", is_numpy_array), ("cupy", is_cupy_array), ("torch", is_torch_array), ("dask", is_dask_array))
        _LIBRARY[kind] = next((name for name, check in checks if check(x)), None)
    return _LIBRARY[kind]


def _made_for(x: Array) -> list[str]:
    """The schedules made for ``x``'s library, best first (from the type and device: no backend is imported)."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.compiler.is_compiling():  # torch.compile plans its own passes
        return []
    library = _library(x)
    if library == "numpy":
        names = ["numba-kernels", "numpy-blocked"]
    elif library == "cupy":
        names = [] if os.environ.get("ARRAYBN_CUDA_KERNELS", "1") == "0" else ["cupy-kernels"]
    elif library == "torch":
        names = ["numba-kernels", "torch-eager"] if x.is_cpu else ["torch-eager"]
    elif library == "dask":
        names = ["dask-chunked"]
    else:
        names = []
    return [n for n in names if n not in _DISABLED and (n != "numba-kernels" or _numba_wanted()) and _reaches(n, x)]


_SIZED = frozenset({"numba-kernels", "numpy-blocked"})  # schedules with a size threshold: their module's _MIN_BYTES


def _reaches(name: str, x: Array) -> bool:
    """Whether a call on ``x`` can reach schedule ``name``'s size threshold: its operations see arrays of
    ``x``'s size at most (in float32 or float64); a schedule that applies to none of them is not chosen,
    so a small call takes the next one (or the reference) at once, with the same results."""
    if name not in _SIZED:
        return True
    module = _MODULES.get(name)
    if module is None:
        module = _MODULES[name] = importlib.import_module(f"{__name__}.{_REGISTRY[name][0]}")
    return math.prod(x.shape) * 8 >= module._MIN_BYTES  # read on every call (tests lower it)


_MODULES: dict[str, ModuleType] = {}  # the sized schedules' modules, imported once


def _numba_wanted() -> bool:
    """Numba is installed and ``ARRAYBN_NUMBA`` is not "0"."""
    if os.environ.get("ARRAYBN_NUMBA", "1") == "0":
        return False
    from .numba_kernels import available

    return available()


def select(x: Array, xp: ModuleType) -> Ops:
    """The operations a call on ``x`` computes with: the reference's, or a schedule's (chosen once per call)."""
    names = _made_for(x)  # first: a traced torch tensor has no schedule, and compilers cannot read the setting
    if not names:
        return REFERENCE
    setting = _SETTING.get()
    if setting == "auto":
        return _instance(names[0])
    return _instance(setting) if setting in names else REFERENCE
