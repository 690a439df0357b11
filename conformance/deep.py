"""Seeded arrays, sampled outputs and a float64 recomputation for the deep golden groups.

The deep groups (real sizes, real values, long runs, attributes changed between calls,
other ranks) keep their goldens small on disk:

* an input or mask is not stored but regenerated from a *spec* (seed, shape, dtype, value
  recipe) with a stored SHA-256 of its bytes (``make_array``, ``checksum``);
* an output is stored at sampled positions (``sample_positions``) plus per-channel
  summaries (``channel_summary``: mean and standard deviation of the output over the
  reduced axes, in float64);
* the weights after each call are stored whole (one value per channel).

Beside each stored output the generator records TensorFlow's own error against a float64
recomputation of the layer (``reference64``) fed TensorFlow's own casts of the inputs and
the weights TensorFlow held before the call; the runner accepts an implementation within a
small multiple of that error (docs/conformance.md, "Tolerances of the deep groups").

Pure NumPy: shared by the generator and the runner. The value recipes use only
``numpy.random.Generator.random`` and ``integers`` (PCG64), whose streams NumPy keeps
stable; the stored checksum catches any change.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np

#: recipes draw float64 values; they are then rounded once to the stored dtype
RECIPES = ("normal", "offset", "mixed", "special", "subnormal", "grid")


def _uniform_normal(rng, shape):
    """An approximately normal sample (sum of four uniforms, unit variance)."""
    u = rng.random((4,) + tuple(shape))
    return (u.sum(axis=0) - 2.0) * math.sqrt(3.0)


def _channel_shape(shape, axes):
    return tuple(shape[a] if a in axes else 1 for a in range(len(shape)))


def _f16_to_bf16_bits(x64):
    f32 = np.asarray(x64, np.float32)
    bits = f32.view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def make_values(spec):
    """The float64 values of an input spec (before rounding to its dtype)."""
    rng = np.random.default_rng(spec["seed"])
    shape = tuple(spec["shape"])
    axes = tuple(spec.get("axes", (len(shape) - 1,)))
    kind = spec.get("kind", "normal")
    cshape = _channel_shape(shape, axes)
    mean = float(spec.get("mean", 0.0))
    spread = float(spec.get("spread", 1.0))
    if kind == "grid":  # k / 32: exact in every float dtype
        return rng.integers(-150, 151, size=shape) / 32.0
    # per-channel mean in [-mean, mean] (or +mean for "offset"), spread in [0.5, 1.5] * spread
    mu = mean * (2.0 * rng.random(cshape) - 1.0) if kind != "offset" else mean * (1.0 + 0.01 * rng.random(cshape))
    sd = spread * (0.5 + rng.random(cshape))
    x = mu + sd * _uniform_normal(rng, shape)
    if kind == "mixed":  # magnitudes 10**-3 .. 10**3 mixed element by element
        x = x * 10.0 ** rng.integers(-3, 4, size=shape)
    elif kind == "subnormal":  # values of the dtype's subnormal range (and some normal ones)
        tiny = {"float16": 2.0**-24, "float32": 2.0**-149, "float64": 2.0**-1074}[spec["dtype"]]
        k = rng.integers(-1000, 1001, size=shape)
        x = np.where(rng.random(shape) < 0.9, k * tiny, x * 1e-3)
    elif kind == "special":  # NaN, +inf, -inf at a few positions
        flat = x.reshape(-1)
        for value, n in (("nan", spec.get("nan", 0)), ("inf", spec.get("inf", 0)), ("-inf", spec.get("ninf", 0))):
            if n:
                flat[rng.integers(0, flat.size, size=n)] = float(value)
    return _ties(rng, x, spec)


def _ties(rng, v, spec):
    """Move a fraction of the values just off a 16-bit rounding tie (``spec["ties"]``).

    ``{"dtype": "float16" | "bfloat16", "fraction": f}``: the chosen values become the midpoint
    between two neighbours of that dtype plus or minus 2**-36 of it, so that rounding float64
    to float32 first lands on the tie (then to even) while a direct rounding goes the other
    way. This pins a cast from float64 that must go through float32, as TensorFlow's does.
    """
    t = spec.get("ties")
    if not t:
        return v
    v = np.array(v, np.float64)
    flat = v.reshape(-1)
    idx = rng.choice(flat.size, size=int(flat.size * t["fraction"]), replace=False)
    a = flat[idx]
    if t["dtype"] == "float16":
        lo = np.asarray(a, np.float16)
        hi = np.nextafter(lo, np.float16(np.inf))
        lo, hi = lo.astype(np.float64), hi.astype(np.float64)
    else:
        bits = np.asarray(a, np.float32).view(np.uint32) & np.uint32(0xFFFF0000)
        lo = bits.view(np.float32).astype(np.float64)
        hi = (bits + np.uint32(0x10000)).view(np.float32).astype(np.float64)
    mid = (lo + hi) / 2.0
    sign = np.where(rng.random(a.shape) < 0.5, -1.0, 1.0)
    flat[idx] = np.where(np.isfinite(mid), mid + sign * np.abs(mid) * 2.0**-36, a)
    return v


def make_mask_values(spec):
    """A mask over ``shape[:-1]``: bool (``p`` kept) or float64 weights in [0, 1]."""
    rng = np.random.default_rng(spec["seed"])
    shape = tuple(spec["shape"])
    u = rng.random(shape)
    if spec["dtype"] == "bool":
        m = u < spec.get("p", 0.6)
        m[:2] = True
        return m
    w = np.where(u < spec.get("p", 0.6), rng.random(shape), 0.0)
    w[:2] = np.maximum(w[:2], 0.5)
    return _ties(rng, w, spec)


def make_array(spec):
    """The stored-dtype array of a spec (bfloat16 as uint16 bit patterns)."""
    if spec.get("mask"):
        v = make_mask_values(spec)
        return v if spec["dtype"] == "bool" else np.asarray(v, spec["dtype"])
    v = make_values(spec)
    if spec["dtype"] == "bfloat16":
        return _f16_to_bf16_bits(v)
    with np.errstate(over="ignore"):
        return np.asarray(v, spec["dtype"])


def checksum(a):
    a = np.ascontiguousarray(a)
    h = hashlib.sha256()
    h.update(f"{a.dtype.str}{list(a.shape)}".encode())
    h.update(a.tobytes())
    return h.hexdigest()


def axes_of(case):
    """The normalized axes of a case (before any ghost-batch shift)."""
    rank = len(case["input_shape"])
    axis = case["init_kwargs"]["axis"]
    return sorted(a % rank for a in ([axis] if isinstance(axis, int) else axis))


def sample_positions(size, n, seed):
    """``n`` distinct flat positions (sorted), always with the first and the last."""
    if size <= n:
        return np.arange(size, dtype=np.int64)
    rng = np.random.default_rng(seed)
    pos = rng.choice(size, size=n - 2, replace=False)
    return np.unique(np.concatenate([[0, size - 1], pos])).astype(np.int64)


def channel_summary(y, axes):
    """``[mean, std]`` of ``y`` (float64) over all axes but ``axes``; shape ``(2, C)``."""
    y = np.asarray(y, np.float64)
    red = tuple(i for i in range(y.ndim) if i not in axes)
    with np.errstate(all="ignore"):
        m = y.mean(axis=red) if red else y
        s = y.std(axis=red) if red else np.zeros_like(y)
    return np.stack([np.reshape(m, -1), np.reshape(s, -1)])


# --------------------------------------------------------------------------- #
# The float64 recomputation (exact arithmetic of the layer's definition)
# --------------------------------------------------------------------------- #

def tf_cast_values(a, dtype):
    """Values of ``tf.cast(a, dtype)`` as float64 (float64 -> 16-bit goes through float32)."""
    a = np.asarray(a)
    if dtype in ("float16", "bfloat16") and a.dtype == np.float64:
        a = a.astype(np.float32)
    if dtype == "bfloat16":
        bits = _f16_to_bf16_bits(np.asarray(a, np.float32))
        return (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    with np.errstate(over="ignore"):
        return np.asarray(a, dtype).astype(np.float64)


def reference64(x, mask, weights, cfg):
    """One call of the layer in float64.

    ``x``: float64 values of the input after TF's cast to the compute dtype; ``mask``:
    float64 mask weights after TF's cast (or None); ``weights``: {name: float64 array}
    before the call; ``cfg``: the attributes this call reads (``fused``, ``training``,
    ``momentum``, ``epsilon``, ``center``, ``scale``, ``renorm``, ``renorm_clipping``,
    ``renorm_momentum``, ``virtual_batch_size``, ``trainable``, ``axes``, ``adjustment``: the
    name of a ``conformance.adjustments`` function or None). Returns
    ``(y, new_weights)``; NaN and inf propagate as the formulas make them.
    """
    with np.errstate(all="ignore"):
        return _reference64(x, mask, weights, cfg)


def _reference64(x, mask, weights, cfg):
    w = {k: np.asarray(v, np.float64) for k, v in weights.items()}
    new = dict(w)
    shape = x.shape
    eps = float(cfg["epsilon"])
    training = bool(cfg["training"])
    axes = tuple(cfg["axes"])  # normalized axes of the caller's input
    if cfg["fused"]:
        eps = float(np.float32(eps))
        (c,) = axes
        red = tuple(i for i in range(x.ndim) if i != c)
        cs = _channel_shape(shape, axes)
        gamma = w["gamma"] if cfg["scale"] and "gamma" in w else np.ones(shape[c])
        beta = w["beta"] if cfg["center"] and "beta" in w else np.zeros(shape[c])
        if training:
            mean = x.mean(axis=red)
            var = ((x - mean.reshape(cs)) ** 2).mean(axis=red)
            if cfg["trainable"]:
                n = x.size // shape[c]
                unb = var * (n / max(n - 1, 1))
                mom = cfg["momentum"]
                if isinstance(mom, (int, float)) and not isinstance(mom, bool):
                    f = float(np.float32(1.0 - mom))
                    if f == 1.0:  # the kernel replaces the statistics by the batch's
                        new["moving_mean"], new["moving_variance"] = mean, unb
                    else:
                        new["moving_mean"] = (1 - f) * w["moving_mean"] + f * mean
                        new["moving_variance"] = (1 - f) * w["moving_variance"] + f * unb
                else:
                    d = float(np.float32(1.0 - float(mom)))
                    new["moving_mean"] = w["moving_mean"] - (w["moving_mean"] - mean) * d
                    new["moving_variance"] = w["moving_variance"] - (w["moving_variance"] - unb) * d
        else:
            mean, var = w["moving_mean"], w["moving_variance"]
        inv = gamma / np.sqrt(var + eps)
        y = (x - mean.reshape(cs)) * inv.reshape(cs) + beta.reshape(cs)
        return y, new
    vbs = cfg.get("virtual_batch_size")
    xs = x
    ax = axes
    if vbs is not None:
        xs = x.reshape((vbs, -1) + shape[1:]) if training else x.reshape((-1, 1) + shape[1:])
        ax = tuple(a + 1 for a in axes)
    nd = xs.ndim
    red = [i for i in range(nd) if i not in ax]
    if vbs is not None:
        del red[1]
    red = tuple(red)
    pshape = tuple(w["moving_mean"].shape)  # the weights' shape (with ghost-batch axes)
    bshape = tuple(xs.shape[i] if i in ax else 1 for i in range(nd))
    if vbs is not None:
        bshape = tuple(1 if i == 1 else bshape[i] for i in range(nd))

    def b(v):
        return np.reshape(v, bshape) if v.size == math.prod(bshape) else v

    gamma = w.get("gamma")
    beta = w.get("beta")
    scale = None if gamma is None else b(gamma)
    offset = None if beta is None else b(beta)
    if not training:
        mean, var = b(w["moving_mean"]), b(w["moving_variance"])
    else:
        if cfg.get("adjustment"):  # _compose_transforms(adj_scale, adj_bias, gamma, beta)
            from .adjustments import ADJUSTMENTS

            a_s, a_b = ADJUSTMENTS[cfg["adjustment"]](xs.shape)
            a_s, a_b = np.float64(np.float32(a_s)), np.float64(np.float32(a_b))
            if scale is not None:
                a_s, a_b = a_s * scale, a_b * scale
            if offset is not None:
                a_b = a_b + offset
            scale, offset = a_s, a_b
        if mask is None:
            mean = xs.mean(axis=red, keepdims=True)
            var = ((xs - mean) ** 2).mean(axis=red, keepdims=True)
        else:
            mw = np.broadcast_to(mask[..., None], xs.shape)
            sw = mw.sum(axis=red, keepdims=True)
            mean = np.where(sw != 0, (mw * xs).sum(axis=red, keepdims=True) / np.where(sw != 0, sw, 1), 0.0)
            var = np.where(sw != 0, (mw * (xs - mean) ** 2).sum(axis=red, keepdims=True) / np.where(sw != 0, sw, 1),
                           0.0)
        bm = mean.mean(axis=1, keepdims=True) if vbs is not None else mean
        bv = var.mean(axis=1, keepdims=True) if vbs is not None else var
        bm, bv = bm.reshape(pshape), bv.reshape(pshape)
        if cfg["renorm"]:
            std = np.sqrt(bv + eps)
            rs = np.maximum(w["renorm_stddev"], math.sqrt(eps))
            r = std / rs
            d = (bm - w["renorm_mean"]) / rs
            clip = cfg.get("renorm_clipping") or {}
            if clip.get("rmin") is not None:
                r = np.maximum(r, clip["rmin"])
            if clip.get("rmax") is not None:
                r = np.minimum(r, clip["rmax"])
            if clip.get("dmax") is not None:
                d = np.minimum(np.maximum(d, -clip["dmax"]), clip["dmax"])
            rdec = float(np.float32(1.0 - cfg["renorm_momentum"]))
            new["renorm_mean"] = w["renorm_mean"] - (w["renorm_mean"] - bm) * rdec
            new["renorm_stddev"] = w["renorm_stddev"] - (w["renorm_stddev"] - std) * rdec
            if cfg["trainable"]:
                dec = float(np.float32(1.0 - cfg["momentum"]))
                new["moving_mean"] = w["moving_mean"] - (w["moving_mean"] - bm) * dec
                ms = w["moving_stddev"] - (w["moving_stddev"] - np.sqrt(bv + eps)) * dec
                new["moving_stddev"] = ms
                new["moving_variance"] = np.maximum(ms * ms - eps, 0.0)
            r, d = b(r), b(d)
            if scale is not None:  # _compose_transforms(r, d, gamma, beta)
                r, d = r * scale, d * scale
            scale, offset = r, (d if offset is None else d + offset)
        elif cfg["trainable"]:
            dec = float(np.float32(1.0 - cfg["momentum"]))
            new["moving_mean"] = w["moving_mean"] - (w["moving_mean"] - bm) * dec
            new["moving_variance"] = w["moving_variance"] - (w["moving_variance"] - bv) * dec
    inv = 1.0 / np.sqrt(var + eps)
    if scale is not None:
        inv = inv * scale
    shift = -mean * inv if offset is None else offset - mean * inv
    y = xs * inv + shift
    return y.reshape(shape), new


def max_error(got, ref):
    """Largest |got - ref| over positions finite in both (0 where none)."""
    got = np.asarray(got, np.float64)
    ref = np.asarray(ref, np.float64)
    both = np.isfinite(got) & np.isfinite(ref)
    if not both.any():
        return 0.0
    return float(np.max(np.abs(got[both] - ref[both])))
