"""Autodiff straight through the forward: torch autograd and JAX give TensorFlow's gradients.

Differentiating `arraybn.batch_norm` with the namespace's own autodiff (no
VJP from arraybn) reproduces the gradient goldens and agrees with
`arraybn.batch_norm_backward`, so torch and JAX users need no VJP.

Renorm's ``r`` and ``d``, which TensorFlow wraps in ``tf.stop_gradient``, are
held constant by the forward too (torch's ``detach``, JAX's
``lax.stop_gradient``), so renorm cases in training are checked like the rest.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import pytest

from arraybn import BNParams, BNState, batch_norm
from arraybn import batch_norm_backward, batch_norm_forward
from conformance import gradients as G

@functools.lru_cache(maxsize=1)
def _goldens() -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    return G.load()


def _ok_cases(every: int = 1) -> list[dict[str, Any]]:
    doc, _ = _goldens()
    return [c for c in doc["cases"] if c["result"]["status"] == "ok"][::every]


def _compare(case: dict[str, Any], arrays: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> list[str]:
    """Against the goldens, and against arraybn's VJP (NumPy) with the same tolerances."""
    problems = G.check_case(case, arrays, got)
    import array_api_compat

    vjp = G.run_case(case, arrays, array_api_compat.array_namespace(np.empty(0)))
    compute = G.COMPUTE[case["init_kwargs"]["dtype"]]
    inp = G.case_inputs(case, arrays)
    gamma = inp["weights"].get("gamma")
    scale = float(np.max(np.abs(inp["dy"]))) * max(1.0, float(np.max(np.abs(gamma))) if gamma is not None else 1.0)
    for k in ("dx", "dgamma", "dbeta"):
        if k in vjp:
            tol = G.tolerance_dtype(str(vjp[k].dtype), compute) if k == "dx" else str(vjp[k].dtype)
            msg = G.compare(k + " vs VJP", got[k], vjp[k], tol_dtype=tol, scale=scale if k == "dx" else 0.0)
            if msg:
                problems.append(msg)
    return problems


def _inputs(case: dict[str, Any], arrays: dict[str, np.ndarray], xp: Any, device: Any) -> dict[str, Any]:
    layer = G.build_layer(case, arrays, xp, device)
    inp = G.case_inputs(case, arrays)
    v = layer._vars
    return {
        "layer": layer,
        "inp": inp,
        "state": BNState(v["moving_mean"], v["moving_variance"], v.get("moving_stddev"), v.get("renorm_mean"),
                         v.get("renorm_stddev")),
        "gamma": v.get("gamma"),
        "beta": v.get("beta"),
    }


# --------------------------------------------------------------------------- #
# torch autograd
# --------------------------------------------------------------------------- #


def _torch_devices() -> list[Any]:
    out = [pytest.param("cpu", id="cpu")]
    out.append(pytest.param("cuda", id="cuda", marks=pytest.mark.gpu))
    return out


@pytest.mark.parametrize("device_name", _torch_devices())
def test_torch_autograd_through_forward(device_name: str) -> None:
    torch = pytest.importorskip("torch")
    if device_name == "cuda" and not torch.cuda.is_available():
        pytest.skip("torch CUDA: no GPU on this machine")
    import array_api_compat

    xp = array_api_compat.array_namespace(torch.empty(0))
    device = torch.device(device_name)
    _, arrays = _goldens()
    failures = {}
    for case in _ok_cases():
        s = _inputs(case, arrays, xp, device)
        inp = s["inp"]
        x = torch.tensor(inp["x"], device=device, requires_grad=True)
        params = [p.detach().clone().requires_grad_(True) if p is not None else None for p in (s["gamma"], s["beta"])]
        mask = None if inp["mask"] is None or s["layer"].fused else torch.tensor(inp["mask"], device=device)
        y, _ = batch_norm(x, BNParams(*params), s["state"], training=inp["training"], config=s["layer"]._config,
                          mask=mask, adjustment=inp["kwargs"].get("adjustment"))
        y.backward(torch.tensor(inp["dy"], device=device))
        got = {"y": y.detach().cpu().numpy(), "dx": x.grad.cpu().numpy()}
        for name, p in zip(("dgamma", "dbeta"), params, strict=True):
            if p is not None:
                got[name] = p.grad.cpu().numpy()
        problems = _compare(case, arrays, got)
        if problems:
            failures[case["id"]] = problems
    assert not failures, failures


# --------------------------------------------------------------------------- #
# JAX
# --------------------------------------------------------------------------- #


def test_jax_vjp_through_forward() -> None:
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    import array_api_compat
    import jax.numpy as jnp

    xp = array_api_compat.array_namespace(jnp.empty(0))
    _, arrays = _goldens()
    failures = {}
    for case in _ok_cases(every=10):  # eager jax.vjp compiles every op per new shape: a tenth of the grid
        s = _inputs(case, arrays, xp, None)
        inp = s["inp"]
        config = s["layer"]._config
        mask = None if inp["mask"] is None or s["layer"].fused else jnp.asarray(inp["mask"])
        adjustment = inp["kwargs"].get("adjustment")
        state = s["state"]

        def f(x: Any, gamma: Any, beta: Any, *, _c: Any = config, _m: Any = mask, _a: Any = adjustment,
              _s: Any = state, _t: bool = inp["training"]) -> Any:
            return batch_norm(x, BNParams(gamma, beta), _s, training=_t, config=_c, mask=_m, adjustment=_a, xp=xp)[0]

        y, pullback = jax.vjp(f, jnp.asarray(inp["x"]), s["gamma"], s["beta"])
        dx, dgamma, dbeta = pullback(jnp.asarray(inp["dy"]))
        got = {"y": np.asarray(y), "dx": np.asarray(dx)}
        if dgamma is not None:
            got["dgamma"] = np.asarray(dgamma)
        if dbeta is not None:
            got["dbeta"] = np.asarray(dbeta)
        problems = _compare(case, arrays, got)
        if problems:
            failures[case["id"]] = problems
    assert not failures, failures


def test_jax_grad_of_a_scalar_loss() -> None:
    """``jax.grad`` of ``sum(y * dy)`` is the VJP (one case per group, float64 where possible)."""
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    import array_api_compat
    import jax.numpy as jnp

    xp = array_api_compat.array_namespace(jnp.empty(0))
    _, arrays = _goldens()
    seen = set()
    for case in _ok_cases():
        if case["group"] in seen or case["input_dtype"] == "float16":
            continue
        seen.add(case["group"])
        s = _inputs(case, arrays, xp, None)
        inp = s["inp"]
        config = s["layer"]._config
        dy = jnp.asarray(inp["dy"])
        mask = None if inp["mask"] is None or s["layer"].fused else jnp.asarray(inp["mask"])

        def loss(x: Any, gamma: Any, _s: Any = s, _c: Any = config, _m: Any = mask, _i: Any = inp, _dy: Any = dy) -> Any:
            y = batch_norm(x, BNParams(gamma, _s["beta"]), _s["state"], training=_i["training"], config=_c, mask=_m,
                           adjustment=_i["kwargs"].get("adjustment"), xp=xp)[0]
            return jnp.sum(y * _dy)

        if s["gamma"] is None:
            continue
        dx, dgamma = jax.grad(loss, argnums=(0, 1))(jnp.asarray(inp["x"]), s["gamma"])
        got = {"dx": np.asarray(dx), "dgamma": np.asarray(dgamma)}
        want = {k: v for k, v in G.golden_outputs(case, arrays).items() if k in got}
        for k, w in want.items():
            tol = G.tolerance_dtype(str(w.dtype), G.COMPUTE[case["init_kwargs"]["dtype"]])
            assert G.compare(k, got[k], w, tol_dtype=tol, scale=float(np.max(np.abs(inp["dy"])))) is None, case["id"]
    assert len(seen) >= 6
