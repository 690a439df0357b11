"""What gets timed: arraybn on each namespace, the peers, and the copy yardstick.

A target's ``prepare(case, mode, x, dy)`` returns a zero-argument callable that
runs one operation to completion (device work synchronized) and returns its
outputs, or raises `Skip` with the reason shown in the report.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ._cases import Case

EPSILON = 1e-3
MOMENTUM = 0.99


class Skip(Exception):  # noqa: N818 - a reason, not an error
    """The target cannot run this case/mode; ``str(exc)`` says why (e.g. 'pending VJP')."""


@dataclass
class Target:
    key: str  # the --backends name that selects it
    name: str  # as shown in the report
    kind: str  # "arraybn" | "peer" | "copy"
    family: str  # the namespace/device whose copy is this target's yardstick
    memory: str  # a method of _measure.extra_memory
    prepare: Callable[[Case, str, Any, Any], Callable[[], Any]]
    note: str = ""


# ---------------------------------------------------------------------------
# arraybn's backward: picked up automatically once it exists
# ---------------------------------------------------------------------------


def find_vjp() -> tuple[str, Any] | None:
    """arraybn's analytic backward, where the installed arraybn has one.

    Looked for in ``arraybn``: the pair
    ``batch_norm_forward(x, params, state, *, training, config) -> (y, new_state, ctx)``
    / ``batch_norm_backward(ctx, dy) -> (dx, dgamma, dbeta)``, else
    ``batch_norm_vjp(x, params, state, dy, *, training, config)`` after a
    `batch_norm` forward. If the signatures change, `vjp_step` is the one place
    to adapt; until then the report names the mismatch instead of timing.
    """
    import importlib

    import arraybn

    for mod_name in ("arraybn",):
        try:
            mod = importlib.import_module(mod_name)
        except ImportError:
            continue
        fwd, bwd = getattr(mod, "batch_norm_forward", None), getattr(mod, "batch_norm_backward", None)
        if callable(fwd) and callable(bwd):
            return "forward/backward", (fwd, bwd)
        vjp = getattr(mod, "batch_norm_vjp", None)
        if callable(vjp):
            return "batch_norm_vjp", (arraybn.batch_norm, vjp)
    return None


def vjp_step(found: tuple[str, Any], config: Any, params: Any, state: Any, xp: Any) -> Callable[[Any, Any], Any]:
    """``step(x, dy) -> (y, dx, dgamma, dbeta)``: one training step's forward and arraybn's own backward."""
    how, (first, second) = found
    if how == "forward/backward":

        def step(x: Any, dy: Any) -> Any:
            y, _, ctx = first(x, params, state, training=True, config=config, xp=xp)
            return (y, *second(ctx, dy))

        return step

    def vjp_step_(x: Any, dy: Any) -> Any:
        y, _ = first(x, params, state, training=True, config=config, xp=xp)
        return (y, *second(x, params, state, dy, training=True, config=config, xp=xp))

    return vjp_step_


def _build(case: Case, xp: Any, device: Any) -> tuple[Any, Any]:
    """A built arraybn layer and the `BNConfig` it resolved (fused exactly as TF's v1 layer)."""
    import arraybn

    layer = arraybn.BatchNormalization(axis=case.axis, momentum=MOMENTUM, epsilon=EPSILON)
    layer.build(case.shape, xp=xp, device=device)
    config = arraybn.BNConfig(
        axis=tuple(layer.axis),
        rank=len(case.shape),
        param_shape=tuple(layer.moving_mean.shape),
        momentum=MOMENTUM,
        epsilon=EPSILON,
        fused=bool(layer.fused),
    )
    return layer, config


# ---------------------------------------------------------------------------
# arraybn on a namespace
# ---------------------------------------------------------------------------


def _arraybn_prepare(
    to_xp: Callable[[Any], Any], xp_of: Callable[[], tuple[Any, Any]], sync: Callable[[Any], Any], autograd: str | None
) -> Callable[[Case, str, Any, Any], Callable[[], Any]]:
    def prepare(case: Case, mode: str, x_np: Any, dy_np: Any) -> Callable[[], Any]:
        import arraybn

        xp, device = xp_of()
        x = to_xp(x_np)
        layer, config = _build(case, xp, device)
        if mode in ("train", "infer"):
            training = mode == "train"

            def fwd() -> Any:
                return sync(layer(x, training=training))

            return fwd
        dy = to_xp(dy_np)
        params = arraybn.BNParams(layer.gamma, layer.beta)
        state = arraybn.BNState(layer.moving_mean, layer.moving_variance)
        found = find_vjp() if autograd != "jax" else None  # jax: jax.vjp under jit instead
        if found is not None:
            step = vjp_step(found, config, params, state, xp)
            try:
                sync(step(x, dy))
            except TypeError as err:
                msg = f"VJP found ({found[0]}) but its call convention differs from benchmarks/_targets.vjp_step: {err}"
                raise Skip(msg) from err
            fn = lambda: sync(step(x, dy))  # noqa: E731
            fn.note = f"arraybn's analytic backward ({found[0]})"  # type: ignore[attr-defined]
            return fn
        if autograd == "torch":
            import torch

            xg = x.detach().clone().requires_grad_(True)
            g = layer.gamma.detach().clone().requires_grad_(True)
            b = layer.beta.detach().clone().requires_grad_(True)
            st = arraybn.BNState(layer.moving_mean, layer.moving_variance)

            def step() -> Any:
                y, _ = arraybn.batch_norm(xg, arraybn.BNParams(g, b), st, training=True, config=config, xp=xp)
                grads = torch.autograd.grad(y, (xg, g, b), dy)
                return sync((y.detach(), *grads))

            step.note = "torch autograd through arraybn"  # type: ignore[attr-defined]
            return step
        if autograd == "jax":
            import jax

            @jax.jit
            def jstep(x: Any, g: Any, b: Any, dy: Any) -> Any:
                def f(x: Any, g: Any, b: Any) -> Any:
                    y, _ = arraybn.batch_norm(x, arraybn.BNParams(g, b), state, training=True, config=config, xp=xp)
                    return y

                y, vjp = jax.vjp(f, x, g, b)
                return (y, *vjp(dy))

            fn = lambda: sync(jstep(x, layer.gamma, layer.beta, dy))  # noqa: E731
            fn.note = "jax.vjp through arraybn"  # type: ignore[attr-defined]
            return fn
        msg = "pending VJP"
        raise Skip(msg)

    return prepare


def _np_namespace() -> tuple[Any, Any]:
    import array_api_compat
    import numpy as np

    return array_api_compat.array_namespace(np.empty(0)), "cpu"


def _identity(v: Any) -> Any:
    return v


def threaded_copy(x: Any, threads: int) -> Callable[[], Any]:
    """``x.copy()`` cut into ``threads`` contiguous pieces copied at once (``np.copyto`` releases the GIL).

    The memory floor is counted in copies; arraybn's NumPy passes stream
    memory on several threads, and one thread's copy does not reach the
    bandwidth they do on every machine (then a real pass looks "below the
    floor"). The copy therefore runs on as many threads as arraybn's passes.
    """
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    flat = x.reshape(-1)
    bounds = [flat.size * i // threads for i in range(threads + 1)]
    pool = ThreadPoolExecutor(threads - 1) if threads > 1 else None

    def copy() -> Any:
        out = np.empty_like(x)
        dest = out.reshape(-1)
        if pool is None:
            np.copyto(dest, flat)
            return out
        done = [pool.submit(np.copyto, dest[bounds[i] : bounds[i + 1]], flat[bounds[i] : bounds[i + 1]])
                for i in range(1, threads)]  # fmt: skip
        np.copyto(dest[: bounds[1]], flat[: bounds[1]])
        for d in done:
            d.result()
        return out

    return copy


def numpy_targets() -> list[Target]:
    import numpy as np

    from arraybn._schedules.numpy_blocked import thread_count

    threads = thread_count()  # arraybn's CPU passes use this many threads

    def copy_prepare(case: Case, mode: str, x_np: Any, dy_np: Any) -> Callable[[], Any]:
        return threaded_copy(np.array(x_np), threads)

    return [
        Target(
            "numpy", "arraybn[numpy]", "arraybn", "numpy", "tracemalloc",
            _arraybn_prepare(np.array, _np_namespace, _identity, None),
        ),
        Target("numpy", f"copy[numpy] (x.copy() on {threads} threads)", "copy", "numpy", "tracemalloc", copy_prepare),
    ]


def _torch_targets(device: str) -> list[Target]:
    import array_api_compat
    import torch

    dev = torch.device(device)
    fam = "torch-cpu" if device == "cpu" else "torch-cuda"
    mem = "rss" if device == "cpu" else "cuda"

    def sync(out: Any) -> Any:
        if device != "cpu":
            torch.cuda.synchronize()
        return out

    def to_t(a: Any) -> Any:
        return torch.from_numpy(a).to(dev, copy=True)

    def xp_of() -> tuple[Any, Any]:
        return array_api_compat.array_namespace(torch.empty(0)), dev

    def ref_prepare(case: Case, mode: str, x_np: Any, dy_np: Any) -> Callable[[], Any]:
        import torch.nn.functional as F  # noqa: N812

        x = to_t(x_np)
        c = case.channels
        view = x.permute(0, 3, 1, 2) if len(case.shape) == 4 and case.axis == 3 else x  # NHWC: channels_last
        rm = torch.zeros(c, device=dev)
        rv = torch.ones(c, device=dev)
        w = torch.ones(c, device=dev)
        b = torch.zeros(c, device=dev)
        mom = 1.0 - MOMENTUM
        if mode in ("train", "infer"):
            training = mode == "train"

            def fwd() -> Any:
                with torch.no_grad():
                    return sync(F.batch_norm(view, rm, rv, w, b, training, mom, EPSILON))

            return fwd
        dy = to_t(dy_np)
        dyv = dy.permute(0, 3, 1, 2) if view is not x else dy
        xg = view.detach().requires_grad_(True)
        wg = w.clone().requires_grad_(True)
        bg = b.clone().requires_grad_(True)

        def step() -> Any:
            y = F.batch_norm(xg, rm, rv, wg, bg, True, mom, EPSILON)
            return sync((y.detach(), *torch.autograd.grad(y, (xg, wg, bg), dyv)))

        return step

    def copy_prepare(case: Case, mode: str, x_np: Any, dy_np: Any) -> Callable[[], Any]:
        x = to_t(x_np)
        return lambda: sync(torch.clone(x))

    return [
        Target(
            "torch" if device == "cpu" else "torch-cuda", f"arraybn[{fam}]", "arraybn", fam, mem,
            _arraybn_prepare(to_t, xp_of, sync, "torch"),
        ),
        Target(
            "torch" if device == "cpu" else "torch-cuda", f"torch.nn.functional.batch_norm[{device}]", "peer", fam,
            mem, ref_prepare,
        ),
        Target("torch" if device == "cpu" else "torch-cuda", f"copy[{fam}] (torch.clone)", "copy", fam, mem,
               copy_prepare),
    ]


def torch_cpu_targets() -> list[Target]:
    return _torch_targets("cpu")


def torch_cuda_targets() -> list[Target]:
    import torch

    if not torch.cuda.is_available():
        msg = "torch has no CUDA device"
        raise Skip(msg)
    return _torch_targets("cuda")


def cupy_targets() -> list[Target]:
    import array_api_compat
    import cupy

    if cupy.cuda.runtime.getDeviceCount() == 0:
        msg = "no CUDA device"
        raise Skip(msg)

    def sync(out: Any) -> Any:
        cupy.cuda.Device().synchronize()
        return out

    def xp_of() -> tuple[Any, Any]:
        a = cupy.empty(0)
        return array_api_compat.array_namespace(a), a.device

    def copy_prepare(case: Case, mode: str, x_np: Any, dy_np: Any) -> Callable[[], Any]:
        x = cupy.asarray(x_np)
        return lambda: sync(x.copy())

    return [
        Target("cupy", "arraybn[cupy]", "arraybn", "cupy", "cupy", _arraybn_prepare(cupy.asarray, xp_of, sync, None)),
        Target("cupy", "copy[cupy] (x.copy())", "copy", "cupy", "cupy", copy_prepare),
    ]


def jax_targets() -> list[Target]:
    """arraybn under ``jax.jit`` (the functional core is pure), on JAX's default device."""
    import array_api_compat
    import jax
    import jax.numpy as jnp

    import arraybn

    platform = jax.default_backend()
    fam = f"jax-{platform}"
    mem = "rss" if platform == "cpu" else "none"

    def sync(out: Any) -> Any:
        return jax.block_until_ready(out)

    def xp_of() -> tuple[Any, Any]:
        a = jnp.empty(0)
        return array_api_compat.array_namespace(a), array_api_compat.device(a)

    base = _arraybn_prepare(jnp.asarray, xp_of, sync, "jax")

    def prepare(case: Case, mode: str, x_np: Any, dy_np: Any) -> Callable[[], Any]:
        if mode == "train_bwd":
            return base(case, mode, x_np, dy_np)
        xp, device = xp_of()
        layer, config = _build(case, xp, device)
        params = arraybn.BNParams(layer.gamma, layer.beta)
        state = arraybn.BNState(layer.moving_mean, layer.moving_variance)
        training = mode == "train"
        f = jax.jit(lambda x, p, s: arraybn.batch_norm(x, p, s, training=training, config=config, xp=xp))
        x = jnp.asarray(x_np)
        fn = lambda: sync(f(x, params, state)[0])  # noqa: E731
        fn.note = "functional core under jax.jit"  # type: ignore[attr-defined]
        return fn

    def copy_prepare(case: Case, mode: str, x_np: Any, dy_np: Any) -> Callable[[], Any]:
        x = jnp.asarray(x_np)
        return lambda: sync(jnp.array(x, copy=True))

    return [
        Target("jax", f"arraybn[{fam}]", "arraybn", fam, mem, prepare),
        Target("jax", f"copy[{fam}] (jnp.array(copy=True))", "copy", fam, mem, copy_prepare),
    ]


# ---------------------------------------------------------------------------
# TensorFlow (in this process, or in a worker: see _worker)
# ---------------------------------------------------------------------------


def tf_layer_class() -> Any:
    """``tf.compat.v1.keras.layers.BatchNormalization`` from tf-keras, or `Skip` with the reason."""
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    cls = tf.compat.v1.keras.layers.BatchNormalization
    if not cls.__module__.startswith("tf_keras"):
        msg = (
            f"tf.compat.v1.keras resolves to {cls.__module__}, not tf-keras: set TF_USE_LEGACY_KERAS=1 "
            "before TensorFlow is imported and install tf-keras"
        )
        raise Skip(msg)
    return cls


def tf_targets() -> list[Target]:
    cls = tf_layer_class()
    import tensorflow as tf

    def prepare(case: Case, mode: str, x_np: Any, dy_np: Any) -> Callable[[], Any]:
        with tf.device("/CPU:0"):
            x = tf.constant(x_np)
            dy = tf.constant(dy_np)
            layer = cls(axis=case.axis, momentum=MOMENTUM, epsilon=EPSILON)
            layer.build(x.shape)
        if mode in ("train", "infer"):
            training = mode == "train"
            f = tf.function(lambda x: layer(x, training=training))
            return lambda: f(x)

        @tf.function
        def step(x: Any, dy: Any) -> Any:
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = layer(x, training=True)
            return (y, *tape.gradient(y, [x, layer.gamma, layer.beta], output_gradients=dy))

        return lambda: step(x, dy)

    return [
        Target("tf", "tf.compat.v1.keras BatchNormalization[cpu]", "peer", "numpy", "rss", prepare,
               note=f"tf {tf.__version__}, tf.function, {_tf_threads(tf)}"),
    ]


def _tf_threads(tf: Any) -> str:
    n = tf.config.threading.get_intra_op_parallelism_threads()
    return f"intra-op threads {n or os.cpu_count()}"


#: --backends key -> factory, in report order
FACTORIES: dict[str, Callable[[], list[Target]]] = {
    "numpy": numpy_targets,
    "torch": torch_cpu_targets,
    "torch-cuda": torch_cuda_targets,
    "cupy": cupy_targets,
    "jax": jax_targets,
    "tf": tf_targets,
}
