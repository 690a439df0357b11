"""Backend fixtures: every test that takes ``xp`` runs once per installed namespace.

``ARRAYBN_TEST_BACKENDS=numpy,array_api_strict`` restricts the set; by default
every importable backend runs except JAX, which is opt-in for the generic tests
(see ``_OPT_IN``). GPU backends (CuPy, torch CUDA) skip with the reason shown
when no GPU is present.
"""

from __future__ import annotations

import importlib
import os
from enum import Enum

import numpy as np
import pytest


class Backend(Enum):
    NUMPY = "numpy"
    ARRAY_API_STRICT = "array_api_strict"
    TORCH = "torch"
    TORCH_CUDA = "torch_cuda"
    CUPY = "cupy"
    JAX = "jax"
    DASK = "dask"


# JAX runs its dedicated tests (tests/test_jax.py, the JAX autodiff tests) whenever it is
# installed; running every generic test on it too is opt-in, because tracing each small
# case costs minutes: ARRAYBN_TEST_BACKENDS=numpy,jax (or any list naming jax).
_OPT_IN = {"jax"}


EPS32 = float(np.finfo(np.float32).eps)


def assert_close(actual, expected: np.ndarray, exact: bool, what: str) -> None:  # type: ignore[no-untyped-def]
    """Same dtype and, unless ``exact``, within a few float32 ulps of the values' scale.

    The tolerance for comparing one backend with another: their reductions may
    run in another order.
    """
    actual = np.asarray(actual)
    assert actual.dtype == expected.dtype, what
    if exact:
        np.testing.assert_array_equal(actual, expected, err_msg=what)
    else:
        scale = max(1.0, float(np.max(np.abs(expected))))
        np.testing.assert_allclose(actual, expected, rtol=8 * EPS32, atol=8 * EPS32 * scale, err_msg=what)


def library_copy(name: str):  # type: ignore[no-untyped-def]
    """A function giving a NumPy array's copy as an array of library ``name`` ("numpy" or "torch"; the test
    is skipped without torch)."""
    if name == "numpy":
        return lambda a: a.copy()
    torch = pytest.importorskip("torch")
    return lambda a: torch.from_numpy(a.copy())


@pytest.fixture(params=["numpy", "torch"])
def to_lib(request):  # type: ignore[no-untyped-def]
    """`library_copy` for NumPy and for torch."""
    return library_copy(request.param)


def host_array(a):  # type: ignore[no-untyped-def]
    """A NumPy array or a torch CPU tensor as a NumPy array."""
    return np.asarray(a.detach().numpy() if hasattr(a, "detach") else a)


def recorded(monkeypatch, owner, name: str, keep=lambda result: True) -> list:  # type: ignore[no-untyped-def]
    """Wrap ``owner.name`` for the test: it still computes, and its results that ``keep`` accepts are
    appended to the list returned (which calls took a schedule's path, say)."""
    results: list = []  # type: ignore[type-arg]
    original = getattr(owner, name)

    def recording(*args, **kwargs):  # type: ignore[no-untyped-def]
        result = original(*args, **kwargs)
        if keep(result):
            results.append(result)
        return result

    monkeypatch.setattr(owner, name, recording)
    return results


def _selected() -> set[str] | None:
    env = os.environ.get("ARRAYBN_TEST_BACKENDS")
    if not env:
        return {b.value for b in Backend} - _OPT_IN
    return {b.strip() for b in env.split(",") if b.strip()}


def _namespace(backend: Backend, *, dedicated: bool = False):  # type: ignore[no-untyped-def]
    """(compat namespace, device) for ``backend``, or pytest.skip with the reason.

    ``dedicated=True`` is for tests written for one backend (tests/test_jax.py):
    they run whenever the backend is installed, unless ARRAYBN_TEST_BACKENDS is
    set and leaves it out.
    """
    import array_api_compat

    env = os.environ.get("ARRAYBN_TEST_BACKENDS")
    sel = _selected() if not (dedicated and not env) else None
    if sel is not None and backend.value not in sel:
        why = "opt-in: name it in" if backend.value in _OPT_IN else "not in"
        pytest.skip(f"{backend.value} {why} ARRAYBN_TEST_BACKENDS")
    if backend is Backend.NUMPY:
        import numpy as np

        return array_api_compat.array_namespace(np.empty(0)), None
    if backend is Backend.ARRAY_API_STRICT:
        xp = pytest.importorskip("array_api_strict")
        xp.set_array_api_strict_flags(api_version="2024.12")
        return xp, None
    if backend in (Backend.TORCH, Backend.TORCH_CUDA):
        torch = pytest.importorskip("torch")
        if backend is Backend.TORCH_CUDA:
            if not torch.cuda.is_available():
                pytest.skip("torch CUDA: no GPU on this machine")
            # the index spelled out: tensors report cuda:0, and torch.device("cuda") != cuda:0
            return array_api_compat.array_namespace(torch.empty(0)), torch.device("cuda", torch.cuda.current_device())
        return array_api_compat.array_namespace(torch.empty(0)), torch.device("cpu")
    if backend is Backend.CUPY:
        try:
            cp = importlib.import_module("cupy")
            cp.cuda.runtime.getDeviceCount()
        except Exception as err:  # ImportError, or CUDA runtime errors without a GPU
            pytest.skip(f"cupy: no usable GPU ({type(err).__name__}: {err})")
        return array_api_compat.array_namespace(cp.empty(0)), None
    if backend is Backend.JAX:
        jax = pytest.importorskip("jax")
        jax.config.update("jax_enable_x64", True)
        import jax.numpy as jnp

        return array_api_compat.array_namespace(jnp.empty(0)), None
    if backend is Backend.DASK:
        da = pytest.importorskip("dask.array")
        return array_api_compat.array_namespace(da.empty(0)), None
    raise AssertionError(backend)


@pytest.fixture(params=list(Backend), ids=[b.value for b in Backend])
def backend(request: pytest.FixtureRequest) -> Backend:
    return request.param


@pytest.fixture
def backend_name(backend: Backend) -> str:
    return backend.value


@pytest.fixture
def xp_device(backend: Backend):  # type: ignore[no-untyped-def]
    return _namespace(backend)


@pytest.fixture
def xp(xp_device):  # type: ignore[no-untyped-def]
    return xp_device[0]


@pytest.fixture
def device(xp_device):  # type: ignore[no-untyped-def]
    return xp_device[1]


@pytest.fixture
def asarray(xp, device):  # type: ignore[no-untyped-def]
    """NumPy -> the backend under test, on its device."""

    def convert(a, dtype=None):  # type: ignore[no-untyped-def]
        import numpy as np

        a = np.asarray(a)
        out = xp.asarray(a, device=device) if device is not None else xp.asarray(a)
        return out if dtype is None else xp.astype(out, dtype)

    return convert


def _backend_of(nodeid: str) -> str:
    """The backend id inside a test id's brackets (``test_x[torch_cuda-shape0]`` -> ``torch_cuda``)."""
    if "[" not in nodeid:
        return "backend-free"
    parts = nodeid[nodeid.index("[") + 1 : -1].split("-")
    return next((b.value for b in Backend if b.value in parts), "backend-free")


def pytest_terminal_summary(terminalreporter, exitstatus, config):  # type: ignore[no-untyped-def]
    """Per-backend counts, so a CI log shows which namespaces really ran."""
    counts: dict[str, dict[str, int]] = {}
    for outcome in ("passed", "failed", "skipped", "xfailed", "error"):
        for rep in terminalreporter.stats.get(outcome, []):
            if getattr(rep, "when", "call") not in ("call", "setup") or (outcome == "passed" and rep.when != "call"):
                continue
            name = _backend_of(getattr(rep, "nodeid", ""))
            counts.setdefault(name, {}).setdefault(outcome, 0)
            counts[name][outcome] += 1
    terminalreporter.section("tests per backend")
    for name in sorted(counts):
        parts = ", ".join(f"{n} {o}" for o, n in sorted(counts[name].items()))
        terminalreporter.write_line(f"{name:>18}: {parts}")


@pytest.fixture(autouse=True)
def _schedules_switched_off_by_a_test_stay_in_that_test():  # type: ignore[no-untyped-def]
    """A schedule that fails switches itself off for the process (``arraybn._schedules.disable``); the
    test where that happened fails on the warning, and the next tests start with every schedule on."""
    from arraybn import _schedules

    before = dict(_schedules._DISABLED)
    yield
    _schedules._DISABLED.clear()
    _schedules._DISABLED.update(before)
