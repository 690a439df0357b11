"""JAX: the functional core under ``jax.jit``, the stateful layer eagerly.

``batch_norm`` takes its configuration (``config``, ``training``,
``trainable``) as Python values: under ``jax.jit`` they are static, passed
through a closure or ``static_argnames``. The core makes no decision from
array values, so tracing succeeds and one compiled function serves every
batch of the same shape. Results are compared with NumPy on the same data
(XLA fuses and reorders the reductions: a few float32 ulps apart).
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import pytest
from conftest import Backend, _namespace, assert_close

import arraybn
from arraybn import BNConfig, BNParams, BNState, batch_norm

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")

CONFIGS = [
    ("2d-axis-1", (16, 3), BNConfig(axis=(1,), rank=2, param_shape=(3,)), False),
    ("4d-fused-nhwc", (8, 4, 4, 3), BNConfig(axis=(3,), rank=4, param_shape=(3,), fused=True), False),
    ("4d-fused-nchw", (8, 3, 4, 4), BNConfig(axis=(1,), rank=4, param_shape=(3,), fused=True), False),
    ("4d-multi-axis", (8, 3, 5, 2), BNConfig(axis=(1, 3), rank=4, param_shape=(3, 2)), False),
    ("3d-masked", (8, 6, 3), BNConfig(axis=(2,), rank=3, param_shape=(3,)), True),
    (
        "2d-renorm",
        (16, 3),
        BNConfig(
            axis=(1,), rank=2, param_shape=(3,), renorm=True, renorm_clipping={"rmax": 1.5, "rmin": 0.5, "dmax": 0.5}
        ),
        False,
    ),
    ("2d-virtual-batch", (16, 3), BNConfig(axis=(1,), rank=2, param_shape=(1, 3), virtual_batch_size=4), False),
]
IDS = [c[0] for c in CONFIGS]


@pytest.fixture(autouse=True)
def _jax_selected() -> None:
    _namespace(Backend.JAX, dedicated=True)  # skips without jax, or when ARRAYBN_TEST_BACKENDS leaves it out


def _data(shape: tuple[int, ...], seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * 2.0 + 0.5).astype(np.float32)


def _mask(shape: tuple[int, ...], seed: int) -> np.ndarray:
    m = np.random.default_rng(seed).random(shape[:-1]) < 0.7
    m[0] = True
    return m


def _weights(config: BNConfig, convert: Any) -> tuple[BNParams, BNState]:
    rng = np.random.default_rng(123)
    shape = config.param_shape

    def w(a: np.ndarray) -> Any:
        return convert(a.astype(np.float32))

    params = BNParams(w(1.0 + 0.1 * rng.standard_normal(shape)), w(0.1 * rng.standard_normal(shape)))
    renorm = config.renorm
    state = BNState(
        w(0.1 * rng.standard_normal(shape)),
        w(1.0 + 0.1 * rng.random(shape)),
        w(np.sqrt(1.0 + 0.1 * rng.random(shape))) if renorm else None,
        w(0.1 * rng.standard_normal(shape)) if renorm else None,
        w(np.sqrt(1.0 + 0.1 * rng.random(shape))) if renorm else None,
    )
    return params, state


def _numpy_steps(config: BNConfig, masked: bool, shape: tuple[int, ...]) -> list[tuple[Any, BNState]]:
    params, state = _weights(config, np.asarray)
    out = []
    for step, training in enumerate((True, True, False)):
        mask = _mask(shape, 10 + step) if masked and not config.fused else None
        y, state = batch_norm(_data(shape, step), params, state, training=training, config=config, mask=mask)
        out.append((y, state))
    return out


def _check(results: list[tuple[Any, BNState]], expected: list[tuple[Any, BNState]]) -> None:
    for i, ((y, state), (y_ref, state_ref)) in enumerate(zip(results, expected, strict=True)):
        assert isinstance(y, jax.Array)
        assert_close(y, y_ref, False, f"output of step {i}")
        for name, a, b in zip(BNState._fields, state, state_ref, strict=True):
            assert (a is None) == (b is None), name
            if a is not None:
                assert_close(a, b, False, f"{name} after step {i}")


@pytest.mark.parametrize("case", CONFIGS, ids=IDS)
def test_jit_with_config_in_a_closure(case) -> None:  # type: ignore[no-untyped-def]
    _, shape, config, masked = case
    traces = []

    def step(x, params, state, mask, *, training):  # type: ignore[no-untyped-def]
        traces.append(training)
        return batch_norm(x, params, state, training=training, config=config, mask=mask)

    compiled = {t: jax.jit(functools.partial(step, training=t)) for t in (True, False)}
    params, state = _weights(config, jnp.asarray)
    results = []
    for i, training in enumerate((True, True, False)):
        mask = jnp.asarray(_mask(shape, 10 + i)) if masked and not config.fused else None
        y, state = compiled[training](jnp.asarray(_data(shape, i)), params, state, mask)
        results.append((y, state))
    _check(results, _numpy_steps(config, masked, shape))
    assert traces == [True, False], "traced once per training value; the second step reused the compiled code"


@pytest.mark.parametrize("case", CONFIGS, ids=IDS)
def test_jit_with_static_argnames(case) -> None:  # type: ignore[no-untyped-def]
    """``config`` as a static argument: it must be hashable (a frozen dataclass)."""
    _, shape, config, masked = case
    hash(config)
    compiled = jax.jit(batch_norm, static_argnames=("training", "config"))
    params, state = _weights(config, jnp.asarray)
    results = []
    for i, training in enumerate((True, True, False)):
        mask = jnp.asarray(_mask(shape, 10 + i)) if masked and not config.fused else None
        y, state = compiled(jnp.asarray(_data(shape, i)), params, state, training=training, config=config, mask=mask)
        results.append((y, state))
    _check(results, _numpy_steps(config, masked, shape))


def test_jit_gradient_of_the_core() -> None:
    """The core is differentiable by JAX under jit (gamma's gradient of a loss)."""
    config = BNConfig(axis=(1,), rank=2, param_shape=(3,))
    params, state = _weights(config, jnp.asarray)
    x = jnp.asarray(_data((16, 3), 0))

    def loss(gamma):  # type: ignore[no-untyped-def]
        y, _ = batch_norm(x, params._replace(gamma=gamma), state, training=True, config=config)
        return jnp.sum(y * y)

    g = jax.jit(jax.grad(loss))(params.gamma)
    # y = gamma * xhat + beta, so d/dgamma sum(y^2) = sum(2 * y * xhat) over the batch
    xn = np.asarray(x)
    xhat = (xn - xn.mean(0)) / np.sqrt(xn.var(0) + config.epsilon)
    expected = np.sum(2 * (np.asarray(params.gamma) * xhat + np.asarray(params.beta)) * xhat, axis=0)
    np.testing.assert_allclose(np.asarray(g), expected, rtol=1e-5)


def test_whole_layer_forward_traces_under_jit() -> None:
    """Build and call a layer inside ``jax.jit``: no host read and no branch on a value anywhere."""

    def step(x):  # type: ignore[no-untyped-def]
        layer = arraybn.BatchNormalization(fused=False, renorm=True)
        y = layer(x, training=True)
        return y, layer.weights

    x = _data((16, 3), 0)
    y, weights = jax.jit(step)(jnp.asarray(x))
    reference = arraybn.BatchNormalization(fused=False, renorm=True)
    y_ref = reference(x, training=True)
    assert_close(y, y_ref, False, "output")
    for w, w_ref in zip(weights, reference.get_weights(), strict=True):
        assert_close(w, w_ref, False, "weight")


@pytest.mark.parametrize(
    ("shape", "kwargs", "masked"),
    [
        ((16, 3), {}, False),
        ((8, 4, 4, 3), {}, False),
        ((8, 3, 4, 4), {"axis": 1}, False),
        ((8, 6, 3), {"fused": False}, True),
        ((16, 3), {"virtual_batch_size": 4, "fused": False}, False),
    ],
    ids=["2d", "4d-fused", "4d-axis1", "masked", "virtual-batch"],
)
def test_layer_runs_eagerly_on_jax_arrays(shape, kwargs, masked) -> None:  # type: ignore[no-untyped-def]
    layer = arraybn.BatchNormalization(**kwargs)
    reference = arraybn.BatchNormalization(**kwargs)
    for step, training in enumerate((True, True, False)):
        x = _data(shape, step)
        mask = _mask(shape, 10 + step) if masked else None
        y = layer(jnp.asarray(x), training=training, mask=None if mask is None else jnp.asarray(mask))
        y_ref = reference(x, training=training, mask=mask)
        assert isinstance(y, jax.Array)
        assert_close(y, y_ref, False, f"output of step {step}")
    assert all(isinstance(w, jax.Array) for w in layer.weights)
    for w, w_ref in zip(layer.get_weights(), reference.get_weights(), strict=True):
        assert isinstance(w, np.ndarray)
        assert_close(w, w_ref, False, "weight")


def test_jax_layer_rejects_numpy_input() -> None:
    layer = arraybn.BatchNormalization()
    layer(jnp.asarray(_data((16, 3), 0)), training=True)
    before = list(layer.weights)
    with pytest.raises(TypeError):
        layer(_data((16, 3), 1), training=True)
    assert all(a is b for a, b in zip(layer.weights, before, strict=True))


def test_an_eager_layer_runs_inference_under_transformations() -> None:
    """A layer built by an eager call serves inference inside ``jax.jit``/``jax.grad``/``jax.vmap``
    (its weights are constants there; before, the device check refused the tracer's device)."""
    layer = arraybn.BatchNormalization()
    x = jnp.asarray(_data((16, 3), 0))
    layer(x, training=True)
    before = layer.get_weights()
    expected = layer(x, training=False)
    assert_close(jax.jit(lambda v: layer(v, training=False))(x), expected, False, "jit")
    g = jax.grad(lambda v: layer(v, training=False).sum())(x)
    assert_close(g, np.broadcast_to(to_numpy_scale(layer), (16, 3)), False, "grad")
    assert_close(jax.vmap(lambda v: layer(v[None], training=False)[0])(x), expected, False, "vmap")
    for a, b in zip(layer.get_weights(), before, strict=True):
        np.testing.assert_array_equal(a, b)


def to_numpy_scale(layer: Any) -> np.ndarray:
    """d y / d x of an inference call: gamma / sqrt(moving_variance + epsilon), per channel."""
    gamma, _, _, variance = layer.get_weights()
    return gamma / np.sqrt(variance + np.float32(layer.epsilon))


@pytest.mark.parametrize("transform", ["jit", "vmap"])
def test_training_an_eager_layer_under_a_transformation_raises(transform) -> None:  # type: ignore[no-untyped-def]
    """The moving statistics would become tracers and leak out of the transformation (later calls
    then failed with UnexpectedTracerError, get_weights with TracerArrayConversionError)."""
    layer = arraybn.BatchNormalization()
    x = jnp.asarray(_data((16, 3), 0))
    layer(x, training=True)
    before = layer.get_weights()
    f = {
        "jit": jax.jit(lambda v: layer(v, training=True)),
        "vmap": jax.vmap(lambda v: layer(v[None], training=True)[0]),
    }[transform]
    with pytest.raises(RuntimeError, match="inside a JAX transformation"):
        f(x)
    for a, b in zip(layer.get_weights(), before, strict=True):  # untouched, and still concrete
        np.testing.assert_array_equal(a, b)
    layer(x, training=True)  # and still usable eagerly


def test_training_under_grad_updates_the_statistics_as_an_eager_call() -> None:
    """Under ``jax.grad`` alone the primal values are concrete, and the new statistics (held
    constant for the gradient) are concrete arrays: the update is the eager one."""
    x = jnp.asarray(_data((16, 3), 0))
    layer, eager = arraybn.BatchNormalization(), arraybn.BatchNormalization()
    g = jax.grad(lambda v: layer(v, training=True).sum())(x)
    eager(x, training=True)
    assert np.isfinite(np.asarray(g)).all()
    for a, b in zip(layer.get_weights(), eager.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_layer_built_inside_jit_is_refused_afterwards() -> None:
    holder = {}

    def step(v):  # type: ignore[no-untyped-def]
        holder["layer"] = layer = arraybn.BatchNormalization()
        return layer(v, training=True)

    x = jnp.asarray(_data((16, 3), 0))
    jax.jit(step)(x)
    with pytest.raises(RuntimeError, match="transformation .*that has ended"):
        holder["layer"](x, training=True)


def test_float64_policy_needs_x64() -> None:
    """Without ``jax_enable_x64`` JAX makes float32 arrays where float64 is asked for: the float64
    policy raises (as a missing dtype does) instead of running silently in float32."""
    enabled = jax.config.read("jax_enable_x64")
    try:
        jax.config.update("jax_enable_x64", False)
        layer = arraybn.BatchNormalization(dtype="float64")
        with pytest.raises(TypeError, match="jax_enable_x64"):
            layer(jnp.ones((4, 3), jnp.float32), training=True)
        assert not layer.built
        jax.config.update("jax_enable_x64", True)
        y = layer(jnp.ones((4, 3), jnp.float64), training=True)
        assert y.dtype == jnp.float64
    finally:
        jax.config.update("jax_enable_x64", enabled)


def test_a_concrete_mask_under_a_transformation() -> None:
    """A mask captured by the traced function is concrete while the input is traced: no device
    check between them (the tracer has none)."""
    x = jnp.asarray(_data((16, 5, 3), 0))
    m = jnp.asarray(_mask((16, 5, 3), 1))
    layer = arraybn.BatchNormalization(fused=False)
    layer(x, training=True, mask=m)
    expected = layer(x, training=False, mask=m)
    assert_close(jax.jit(lambda v: layer(v, training=False, mask=m))(x), expected, False, "jit")
    g = jax.grad(lambda v: layer(v, training=True, mask=m).sum())(x)
    assert np.isfinite(np.asarray(g)).all()


def test_activity_loss_under_transformations() -> None:
    """Under jax.grad the kept loss is its value; under jax.jit it would be a tracer kept on the
    layer (a leak): RuntimeError, the layer unchanged."""
    x = jnp.asarray(_data((16, 3), 0))
    layer, eager = arraybn.BatchNormalization(activity_regularizer="l2"), arraybn.BatchNormalization(
        activity_regularizer="l2"
    )
    jax.grad(lambda v: layer(v, training=True).sum())(x)
    eager(x, training=True)
    np.testing.assert_allclose(float(layer.losses[0]), float(eager.losses[0]), rtol=1e-6)
    before = layer.get_weights()
    with pytest.raises(RuntimeError, match="activity regularizer"):
        jax.jit(lambda v: layer(v, training=False))(x)
    np.testing.assert_allclose(float(layer.losses[0]), float(eager.losses[0]), rtol=1e-6)
    for a, b in zip(layer.get_weights(), before, strict=True):
        np.testing.assert_array_equal(a, b)
