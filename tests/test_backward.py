"""The backward pass (``arraybn._reference.batch_norm_vjp``): TensorFlow's gradients on every namespace.

* the gradient goldens (``conformance/goldens_grad``, recorded with
  ``tf.GradientTape`` on tf-keras's v1 layer) pass on every backend of
  conftest's ``xp``, through the functional pair and through the layer pair;
* a hypothesis property: in float64 the VJP agrees with central finite
  differences of `batch_norm` for random shapes, axes and options;
* inputs with a large mean and a small variance keep float32 accuracy;
* the layer pair leaves the layer exactly as a plain call does.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import arraybn
from arraybn import BNConfig, BNGrads, BNParams, BNState, batch_norm, batch_norm_backward, batch_norm_forward, batch_norm_vjp
from arraybn._backward import layer_backward, layer_forward
from arraybn._namespace import numpy_namespace, to_numpy
from arraybn._validation import param_shape
from conformance import gradients as G


@functools.lru_cache(maxsize=1)
def _goldens() -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    return G.load()


GROUPS = sorted({c["group"] for c in G.cases()})


def _cases(group: str) -> list[dict[str, Any]]:
    doc, _ = _goldens()
    return [c for c in doc["cases"] if c["group"] == group and c["result"]["status"] == "ok"]


def _runnable(case: dict[str, Any], xp: Any, backend_name: str) -> bool:
    if G.supported(case, xp):
        return False
    # dask builds a graph per call and JAX compiles every op per new shape: a share of the grid
    stride = {"dask": 3, "jax": 6}.get(backend_name, 1)
    return case["index"] % stride == 0


# --------------------------------------------------------------------------- #
# Goldens
# --------------------------------------------------------------------------- #


def test_goldens_are_complete() -> None:
    doc, arrays = _goldens()
    assert doc["definition_hash"] == G._definition_hash(G.cases()), "goldens are stale: regenerate them"
    assert len(doc["cases"]) >= 300
    errors = [c for c in doc["cases"] if c["result"]["status"] != "ok"]
    # the only cases TensorFlow cannot run: renorm in training with a float64 policy
    assert all(c["init_kwargs"]["dtype"] == "float64" and c["init_kwargs"].get("renorm") for c in errors)
    assert all(c["training"] for c in errors)
    for c in doc["cases"]:
        if c["result"]["status"] == "ok":
            assert {"x", "dy", "dx", "y"} <= set(c["result"]["arrays"])


@pytest.mark.parametrize("group", GROUPS)
def test_vjp_matches_tensorflow(group: str, xp: Any, device: Any, backend_name: str) -> None:
    _, arrays = _goldens()
    failures = {}
    ran = 0
    for case in _cases(group):
        if not _runnable(case, xp, backend_name):
            continue
        ran += 1
        problems = G.check_case(case, arrays, G.run_case(case, arrays, xp, device))
        if problems:
            failures[case["id"]] = problems
    assert ran, f"no {group} case runs on {backend_name}"
    assert not failures, failures


@pytest.mark.parametrize("group", GROUPS)
def test_layer_pair_matches_tensorflow(group: str, xp: Any, device: Any, backend_name: str) -> None:
    """``layer_forward``/``layer_backward``: TF's y and gradients, and the same layer state as ``layer(x)``."""
    _, arrays = _goldens()
    failures = {}
    for case in _cases(group)[::2]:
        if not _runnable(case, xp, backend_name):
            continue
        inp = G.case_inputs(case, arrays)
        x = G.to_backend(inp["x"], xp, device)
        dy = G.to_backend(inp["dy"], xp, device)
        mask = None if inp["mask"] is None else G.to_backend(inp["mask"], xp, device)
        layer = G.build_layer(case, arrays, xp, device)
        twin = G.build_layer(case, arrays, xp, device)
        with pytest.warns(UserWarning, match="Masking is not supported") if (
            mask is not None and layer.fused
        ) else _nothing():
            y, ctx = layer_forward(layer, x, training=case["training"], mask=mask)
        with pytest.warns(UserWarning, match="Masking is not supported") if (
            mask is not None and twin.fused
        ) else _nothing():
            y_twin = twin(x, training=case["training"], mask=mask)
        np.testing.assert_array_equal(to_numpy(y), to_numpy(y_twin))
        for a, b in zip(layer.get_weights(), twin.get_weights(), strict=True):
            np.testing.assert_array_equal(a, b)
        dx, grads = layer_backward(layer, ctx, dy)
        results = {"y": to_numpy(y), "dx": to_numpy(dx)}
        results.update({"d" + k: to_numpy(v) for k, v in grads.items()})
        if not layer.trainable:
            assert grads == {}
            results.update({k: v for k, v in G.golden_outputs(case, arrays).items() if k in ("dgamma", "dbeta")})
        problems = G.check_case(case, arrays, results)
        if problems:
            failures[case["id"]] = problems
    assert not failures, failures


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


# --------------------------------------------------------------------------- #
# Finite differences (float64, NumPy)
# --------------------------------------------------------------------------- #

NP = numpy_namespace()


@st.composite
def _problems(draw: st.DrawFn) -> dict[str, Any]:
    rank = draw(st.integers(2, 4))
    shape = [draw(st.integers(2, 4)) for _ in range(rank)]
    nax = draw(st.integers(1, rank - 1))
    axes = sorted(draw(st.permutations(range(rank)))[:nax])
    vbs = None
    if 0 not in axes and draw(st.booleans()):
        vbs = draw(st.sampled_from([1, 2]))
        shape[0] = vbs * draw(st.integers(2, 3))
    as_int = len(axes) == 1 and draw(st.booleans())
    return {
        "shape": tuple(shape),
        "axis": (axes[0] - rank if draw(st.booleans()) else axes[0]) if as_int else axes,
        "vbs": vbs,
        "training": draw(st.booleans()),
        "center": draw(st.booleans()),
        "scale": draw(st.booleans()),
        "renorm": draw(st.sampled_from([None, {}, {"rmax": 1.2, "rmin": 0.8, "dmax": 0.2}])),
        "mask": vbs is None and draw(st.booleans()),
        "adjust": vbs is None and draw(st.booleans()),
        "epsilon": draw(st.sampled_from([1e-3, 0.1])),
        "offset": draw(st.sampled_from([0.0, 3.0, 100.0])),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


def _setup(pb: dict[str, Any]) -> dict[str, Any]:
    rng = np.random.default_rng(pb["seed"])
    shape = pb["shape"]
    from arraybn._validation import validate_axis

    axes = validate_axis(pb["axis"], shape)
    ps = param_shape(shape, axes, pb["vbs"])
    renorm = pb["renorm"] is not None
    config = BNConfig(
        axis=tuple(axes),
        rank=len(shape),
        param_shape=ps,
        epsilon=pb["epsilon"],
        renorm=renorm,
        renorm_clipping=pb["renorm"] or {},
        virtual_batch_size=pb["vbs"],
        compute_dtype="float64",
        param_dtype="float64",
    )
    params = BNParams(
        rng.uniform(0.5, 1.5, ps) * rng.choice([-1.0, 1.0], ps) if pb["scale"] else None,
        rng.normal(size=ps) if pb["center"] else None,
    )
    state = BNState(
        rng.normal(size=ps),
        rng.uniform(0.5, 2.0, ps),
        rng.uniform(0.5, 2.0, ps) if renorm else None,
        0.3 * rng.normal(size=ps) if renorm else None,
        rng.uniform(0.7, 1.3, ps) if renorm else None,
    )
    x = pb["offset"] + rng.normal(size=shape)
    mask = None
    if pb["mask"]:
        mask = rng.random(shape[:-1]) < 0.7
        mask.reshape(-1)[:2] = True
    adjust = (lambda s: (1.0 + 1.0 / s[0], 0.1 * len(s))) if pb["adjust"] else None
    return {"config": config, "params": params, "state": state, "x": x, "mask": mask, "adjust": adjust,
            "dy": rng.normal(size=shape)}


def _frozen_renorm(s: dict[str, Any]) -> tuple[BNConfig, Any]:
    """The renorm forward with ``r``, ``d`` held at their values (TF's stop_gradient):
    renorm off, and the adjustment ``(r * a, d * a + b)`` in its place."""
    from arraybn._reference import moments, renorm_correction, weighted_moments

    config = s["config"]
    if not config.renorm or not s["training"]:
        return config, s["adjust"]
    x = s["x"]
    vbs = config.virtual_batch_size
    axis = tuple(config.axis)
    if vbs is not None:
        x = np.reshape(x, (vbs, x.shape[0] // vbs, *x.shape[1:]))
        axis = tuple(a + 1 for a in axis)
    red = [i for i in range(x.ndim) if i not in axis]
    if vbs is not None:
        del red[1]
    if s["mask"] is None:
        mean, var = moments(x, red, xp=NP)
    else:
        mean, var = weighted_moments(x, red, np.expand_dims(s["mask"].astype(np.float64), -1), xp=NP)
    if vbs is not None:
        mean, var = mean.mean(axis=1, keepdims=True), var.mean(axis=1, keepdims=True)
    r, d, _ = renorm_correction(
        mean.reshape(config.param_shape), var.reshape(config.param_shape), s["state"].renorm_mean,
        s["state"].renorm_stddev, epsilon=config.epsilon, clipping=config.renorm_clipping, xp=NP,
    )
    bshape = tuple(x.shape[i] if i in axis else 1 for i in range(x.ndim))
    r, d = r.reshape(bshape), d.reshape(bshape)
    a, b = s["adjust"](tuple(s["x"].shape)) if s["adjust"] else (1.0, 0.0)
    frozen = BNConfig(**{**config.__dict__, "renorm": False, "renorm_clipping": {}})
    if vbs is not None:  # the adjustment argument cannot go with ghost batches: fold r, d into the weights
        return frozen, ("fold", r * a, d * a + b)
    return frozen, (lambda shape: (r * a, d * a + b))


def _loss(s: dict[str, Any], x: np.ndarray, gamma: Any, beta: Any) -> float:
    config, adjust = _frozen_renorm(s)
    params = BNParams(gamma, beta)
    if isinstance(adjust, tuple):  # ghost batches: y = gamma * (A xhat + B) + beta, via scale-off forward
        _, a, b = adjust
        xhat, _ = batch_norm(x, BNParams(None, None), s["state"], training=True, config=config, xp=NP)
        vbs = config.virtual_batch_size
        xh = np.reshape(xhat, (vbs, x.shape[0] // vbs, *x.shape[1:]))
        g = 1.0 if gamma is None else gamma
        y = g * (a * xh + b) + (0.0 if beta is None else beta)
        y = np.reshape(y, x.shape)
    else:
        y, _ = batch_norm(x, params, s["state"], training=s["training"], config=config, mask=s["mask"],
                          adjustment=adjust, xp=NP)
    return float(np.sum(y * s["dy"]))


def _central(f: Any, a: np.ndarray, h: float) -> np.ndarray:
    out = np.zeros_like(a)
    for i in np.ndindex(a.shape):
        b = a.copy()
        b[i] += h
        fp = f(b)
        b[i] -= 2 * h
        fm = f(b)
        out[i] = (fp - fm) / (2 * h)
    return out


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_problems())
def test_vjp_matches_finite_differences(pb: dict[str, Any]) -> None:
    s = _setup(pb)
    s["training"] = pb["training"]
    grads = batch_norm_vjp(s["x"], s["params"], s["state"], s["dy"], training=pb["training"], config=s["config"],
                           mask=s["mask"], adjustment=s["adjust"])
    gamma, beta = s["params"]
    h = 1e-5
    # central differences: truncation O(h^2 f''') plus rounding O(eps |f| / h); both ~1e-8 relative here
    fd_dx = _central(lambda a: _loss(s, a, gamma, beta), s["x"], h)
    tol = 2e-6 * (1.0 + float(np.max(np.abs(fd_dx))))
    np.testing.assert_allclose(grads.dx, fd_dx, rtol=0, atol=tol)
    if gamma is not None:
        fd = _central(lambda a: _loss(s, s["x"], a, beta), gamma, h)
        np.testing.assert_allclose(grads.dgamma, fd, rtol=0, atol=2e-6 * (1.0 + float(np.max(np.abs(fd)))))
    else:
        assert grads.dgamma is None
    if beta is not None:
        fd = _central(lambda a: _loss(s, s["x"], gamma, a), beta, h)
        np.testing.assert_allclose(grads.dbeta, fd, rtol=0, atol=2e-6 * (1.0 + float(np.max(np.abs(fd)))))
    else:
        assert grads.dbeta is None


def test_renorm_r_and_d_are_constants() -> None:
    """Differences of the real renorm forward differ from the VJP (r, d depend on x), the frozen ones agree."""
    pb = {"shape": (6, 3), "axis": -1, "vbs": None, "training": True, "center": True, "scale": True,
          "renorm": {}, "mask": False, "adjust": False, "epsilon": 1e-3, "offset": 0.0, "seed": 3}
    s = _setup(pb)
    s["training"] = True
    s["state"] = s["state"]._replace(renorm_mean=s["state"].renorm_mean + 1.0)
    grads = batch_norm_vjp(s["x"], s["params"], s["state"], s["dy"], training=True, config=s["config"])

    def through_r(a: np.ndarray) -> float:
        y, _ = batch_norm(a, s["params"], s["state"], training=True, config=s["config"], xp=NP)
        return float(np.sum(y * s["dy"]))

    assert np.max(np.abs(_central(through_r, s["x"], 1e-5) - grads.dx)) > 1e-3
    fd = _central(lambda a: _loss(s, a, *s["params"]), s["x"], 1e-5)
    np.testing.assert_allclose(grads.dx, fd, atol=1e-6)


# --------------------------------------------------------------------------- #
# Numerics and API
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(("offset", "std"), [(1e3, 0.1), (1e4, 1.0), (1e2, 1e-2)])
def test_large_mean_small_variance_keeps_float32_accuracy(offset: float, std: float) -> None:
    """float32 gradients on |mean| >> std inputs agree with float64 ones on the same values to ~1e-6.

    The naive uncentered ``sum(dy * x) - mean * sum(dy)`` loses ~1e-2 here.
    """
    rng = np.random.default_rng(0)
    x = (offset + std * rng.normal(size=(256, 4))).astype(np.float32)
    dy = rng.normal(size=x.shape).astype(np.float32)
    g = np.linspace(0.5, 1.5, 4, dtype=np.float32)
    b = np.zeros(4, np.float32)
    state = BNState(np.zeros(4, np.float32), np.ones(4, np.float32))
    c32 = BNConfig(axis=(1,), rank=2, param_shape=(4,), epsilon=1e-6)
    c64 = BNConfig(axis=(1,), rank=2, param_shape=(4,), epsilon=1e-6, compute_dtype="float64", param_dtype="float64")
    r32 = batch_norm_vjp(x, BNParams(g, b), state, dy, training=True, config=c32)
    f = lambda a: a.astype(np.float64)  # noqa: E731
    r64 = batch_norm_vjp(f(x), BNParams(f(g), f(b)), BNState(f(state[0]), f(state[1])), f(dy), training=True,
                         config=c64)
    for got, want in ((r32.dx, r64.dx), (r32.dgamma, r64.dgamma), (r32.dbeta, r64.dbeta)):
        assert got.dtype == np.float32
        assert np.max(np.abs(got - want)) <= 2e-6 * np.max(np.abs(want))


def test_forward_matches_batch_norm_bitwise(xp: Any, asarray: Any, backend_name: str) -> None:
    rng = np.random.default_rng(1)
    x = asarray(rng.normal(size=(8, 3)).astype(np.float32))
    config = BNConfig(axis=(1,), rank=2, param_shape=(3,), renorm=True, renorm_clipping={"rmax": 1.1})
    ones, zeros = asarray(np.ones(3, np.float32)), asarray(np.zeros(3, np.float32))
    params = BNParams(asarray(np.full(3, 1.5, np.float32)), zeros)
    state = BNState(zeros, ones, ones, zeros, ones)
    calls = []

    def adjust(shape: tuple[int, ...]) -> tuple[float, float]:
        calls.append(shape)
        return 2.0, 0.5

    y1, s1 = batch_norm(x, params, state, training=True, config=config, adjustment=adjust)
    y2, s2, ctx = batch_norm_forward(x, params, state, training=True, config=config, adjustment=adjust)
    assert calls == [(8, 3), (8, 3)]
    assert ctx.adjustment == (2.0, 0.5)
    assert ctx.state is state
    np.testing.assert_array_equal(to_numpy(y1), to_numpy(y2))
    for a, b in zip(s1, s2, strict=True):
        np.testing.assert_array_equal(to_numpy(a), to_numpy(b))
    grads = batch_norm_backward(ctx, asarray(np.ones((8, 3), np.float32)))
    assert isinstance(grads, BNGrads)
    assert tuple(grads.dx.shape) == (8, 3)


# (shape, config keywords): fused NHWC, non-fused 2-D, ghost batches, renorm with an adjustment, a mask,
# and a 1 MiB input (where the NumPy schedules start)
REUSE_CASES = [
    ((6, 5, 4, 8), {"axis": (3,), "rank": 4, "param_shape": (8,), "fused": True}),
    ((4096, 64), {"axis": (1,), "rank": 2, "param_shape": (64,)}),
    ((64, 6), {"axis": (1,), "rank": 2, "param_shape": (6,)}),
    ((12, 5, 3), {"axis": (2,), "rank": 3, "param_shape": (3,), "virtual_batch_size": 4}),
    ((16, 4), {"axis": (1,), "rank": 2, "param_shape": (4,), "renorm": True}),
    ((10, 7, 3), {"axis": (2,), "rank": 3, "param_shape": (3,), "mask": True}),
]


@pytest.mark.parametrize(
    ("shape", "options"), REUSE_CASES, ids=["fused", "1 MiB", "non-fused", "ghost", "renorm", "mask"]
)
def test_backward_reuses_the_forwards_statistics(
    shape: tuple[int, ...], options: dict[str, Any], xp: Any, asarray: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the forward ran under a schedule, the pair's backward takes the statistics it computed (no
    second pass over ``x``): the same bits as `batch_norm_vjp`, which recomputes them. Under the reference's
    operations (small NumPy inputs, array-api-strict) and for a mask's weighted statistics nothing is
    kept, and the backward recomputes."""
    from conftest import recorded

    from arraybn import _reference

    options = dict(options)
    with_mask = options.pop("mask", False)
    config = BNConfig(**options)
    rng = np.random.default_rng(len(shape))
    x = asarray((rng.normal(size=shape) * 3 + 50).astype(np.float32))
    dy = asarray(rng.normal(size=shape).astype(np.float32))
    c = config.param_shape[0]
    params = BNParams(asarray(rng.uniform(0.5, 2, c).astype(np.float32)), asarray(rng.normal(size=c).astype(np.float32)))
    ones, zeros = asarray(np.ones(c, np.float32)), asarray(np.zeros(c, np.float32))
    state = BNState(zeros, ones, ones if config.renorm else None, zeros if config.renorm else None,
                    ones if config.renorm else None)  # fmt: skip
    mask = asarray((rng.uniform(size=shape[:-1]) > 0.3).astype(np.float32)) if with_mask else None
    adjustment = (lambda s: (1.5, 0.25)) if config.renorm else None
    _, _, ctx = batch_norm_forward(x, params, state, training=True, config=config, mask=mask, adjustment=adjustment)
    kept = not with_mask and arraybn._schedules.select(x, ctx.xp) is not _reference.REFERENCE
    assert (ctx.moments is not None) == kept
    passes = recorded(monkeypatch, _reference, "moments")
    weighted = recorded(monkeypatch, _reference, "weighted_moments")
    got = batch_norm_backward(ctx, dy)
    assert (len(passes), len(weighted)) == ((0, 1) if with_mask else (0, 0) if kept else (1, 0))
    monkeypatch.undo()
    want = batch_norm_vjp(x, params, state, dy, training=True, config=config, mask=mask, adjustment=adjustment)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(to_numpy(a), to_numpy(b))


def test_statistics_of_other_operations_are_recomputed(monkeypatch: pytest.MonkeyPatch) -> None:
    """A forward under one schedule, its backward under another: the backward computes its own statistics
    (its gradients are those of its own schedule); a forward under the reference's operations and an
    inference context keep none."""
    from conftest import recorded

    from arraybn import _reference

    rng = np.random.default_rng(3)
    x = (rng.normal(size=(512, 1024)) * 2 + 7).astype(np.float32)  # 2 MiB: the NumPy schedules' size
    dy = rng.normal(size=x.shape).astype(np.float32)
    config = BNConfig(axis=(1,), rank=2, param_shape=(1024,))
    params = BNParams(np.ones(1024, np.float32), np.zeros(1024, np.float32))
    state = BNState(np.zeros(1024, np.float32), np.ones(1024, np.float32))
    with arraybn.schedule("numpy-blocked"):
        _, _, ctx = batch_norm_forward(x, params, state, training=True, config=config)
    assert ctx.moments is not None and ctx.moments.ops.name == "numpy-blocked"
    passes = recorded(monkeypatch, _reference, "moments")
    got = batch_norm_backward(ctx, dy)
    auto = arraybn._schedules.select(x, ctx.xp).name
    assert len(passes) == (0 if auto == "numpy-blocked" else 1)
    monkeypatch.undo()
    want = batch_norm_vjp(x, params, state, dy, training=True, config=config)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)
    with arraybn.schedule("reference"):
        _, _, ctx = batch_norm_forward(x, params, state, training=True, config=config)
    assert ctx.moments is None
    _, ctx = layer_forward(arraybn.BatchNormalization(), x, training=False)
    assert ctx.moments is None
    layer = arraybn.BatchNormalization()
    _, ctx = layer_forward(layer, x)
    assert ctx.moments is not None and layer._recording is None  # the layer pair records them too


def test_random_adjustment_is_differentiated_with_the_forward_values() -> None:
    rng = np.random.default_rng(0)
    draws = iter([(1.5, 0.25), (0.5, -1.0)])
    layer = arraybn.BatchNormalization(adjustment=lambda shape: next(draws))
    x = rng.normal(size=(8, 3)).astype(np.float32)
    y, ctx = layer_forward(layer, x)
    assert ctx.adjustment == (1.5, 0.25)
    _, grads = layer_backward(layer, ctx, np.ones_like(x))
    xhat = (y - 0.25) / 1.5  # gamma = 1, beta = 0
    np.testing.assert_allclose(grads["gamma"], np.sum(1.5 * xhat + 0.25, axis=0), rtol=1e-5, atol=1e-5)


def test_layer_pair_errors_and_defaults() -> None:
    x = np.ones((4, 3), np.float32)
    a, b = arraybn.BatchNormalization(), arraybn.BatchNormalization()
    _, ctx = layer_forward(a, x)
    assert ctx.training is True  # the default of forward, unlike layer(x)
    b(x)
    with pytest.raises(ValueError, match="not produced by this layer"):
        layer_backward(b, ctx, x)
    with pytest.raises(ValueError, match="must match"):
        layer_backward(a, ctx, np.ones((4, 2), np.float32))
    _, ctx = layer_forward(a, x, training=None)
    assert ctx.training is False
    frozen = arraybn.BatchNormalization(trainable=False)
    _, ctx = layer_forward(frozen, x)
    dx, grads = layer_backward(frozen, ctx, x)
    assert grads == {}
    assert dx.shape == x.shape


def test_fully_masked_channel_has_inference_like_gradient() -> None:
    x = np.random.default_rng(0).normal(size=(4, 5, 2)).astype(np.float64)
    config = BNConfig(axis=(2,), rank=3, param_shape=(2,), compute_dtype="float64", param_dtype="float64")
    gamma = np.array([2.0, 3.0])
    state = BNState(np.zeros(2), np.ones(2))
    dy = np.ones_like(x)
    mask = np.zeros((4, 5), bool)
    g = batch_norm_vjp(x, BNParams(gamma, np.zeros(2)), state, dy, training=True, config=config, mask=mask)
    # mean = var = 0 (div_no_nan): y = gamma * x / sqrt(eps) + beta, every statistic a constant
    np.testing.assert_allclose(g.dx, dy * gamma / math.sqrt(1e-3))
    np.testing.assert_allclose(g.dgamma, np.sum(x, axis=(0, 1)) / math.sqrt(1e-3))


def test_numpy_training_example_reduces_the_loss(capsys: pytest.CaptureFixture[str]) -> None:
    import runpy
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "examples" / "train_numpy.py"
    main = runpy.run_path(str(path))["main"]
    losses = main(steps=20)
    assert losses[-1] < 0.5 * losses[0]
    assert "loss" in capsys.readouterr().out
