"""The deep groups: real sizes, real values, long runs, attributes changed between calls, ranks.

Plain data, like ``cases.py``. A deep case is an ordinary case with a ``deep`` field::

    "deep": {"x": {recipe}, "mask": null | {"dtype": "bool" | "float64", "p": ...},
             "samples": n, "poison": null | {weight name: "nan" | "inf" | "-inf"}}

Its inputs are regenerated from ``conformance.deep`` specs (seeded, checksummed), its
outputs stored at ``samples`` positions plus per-channel summaries, and a call may carry
``"set": {attribute: value}`` (set on the layer before the call) and ``"set_weights": true``
(new weights drawn and set before the call). See docs/conformance.md, "Deep groups".
"""

from __future__ import annotations

from .adjustments import MARKER
from .cases import _seed

T, F, N = True, False, None
SAMPLES = 1024


def _case(group, parts, shape, axis, *, calls, dtype="float32", x=None, mask=None, poison=None, weights="random",
          samples=SAMPLES, record_every=1, **kw):
    cid = group + "/" + "/".join(parts)
    init = {"axis": axis, "momentum": 0.9, "epsilon": 1e-3}
    init.update({k: v for k, v in kw.items()})
    init = {k: v for k, v in init.items() if v is not None or k in ("momentum", "epsilon")}
    dims = {p.split("=")[0]: (p.split("=", 1)[1] if "=" in p else p) for p in parts}
    return {
        "id": cid,
        "dims": dims,
        "init_kwargs": init,
        "input_shape": list(shape),
        "input_dtype": dtype,
        "calls": [dict({"training": c, "mask": "deep" if mask else None}) if not isinstance(c, dict)
                  else dict({"mask": "deep" if mask else None}, **c) for c in calls],
        "weights": weights,
        "magnitude": 1.0,
        "step": None,
        "random_initializer": False,
        "seed": _seed(cid),
        "deep": {"x": x or {"kind": "normal", "mean": 2.0, "spread": 1.5}, "mask": mask, "samples": samples,
                 "poison": poison, "record_every": record_every},
    }


SEQ = [T, T, F, N]

# --------------------------------------------------------------------------- #

#: layout name -> (shape (float32: >= 1 MiB), axis, fusable)
LAYOUTS = {
    "NHWC": ((16, 32, 32, 16), -1, True),
    "NCHW": ((16, 16, 32, 32), 1, True),
    "NDHWC": ((8, 8, 16, 16, 16), -1, True),
    "NCDHW": ((8, 16, 8, 16, 16), 1, True),
    "2D": ((4096, 64), -1, False),
    "axes13": ((32, 16, 32, 16), [1, 3], False),
    "3D": ((64, 64, 64), -1, False),
}


def _sizes():
    cases = []
    for name, (shape, axis, fusable) in LAYOUTS.items():
        for fused in ([None, False] if fusable else [None]):
            for mom in (0.9,):
                cases.append(_case("deep_sizes", [name, f"fused={fused}"], shape, axis, calls=SEQ, fused=fused,
                                   momentum=mom))
    # ghost batches, masks, 16-bit inputs at real sizes
    cases.append(_case("deep_sizes", ["NHWC", "vbs=8"], (64, 16, 16, 16), -1, calls=SEQ, virtual_batch_size=8))
    cases.append(_case("deep_sizes", ["NCHW", "vbs=4", "renorm"], (32, 16, 16, 32), 1, calls=SEQ,
                       virtual_batch_size=4, renorm=True, renorm_clipping={"rmax": 1.2, "dmax": 0.5}))
    cases.append(_case("deep_sizes", ["3D", "mask=bool"], (64, 64, 64), -1, calls=SEQ, mask={"dtype": "bool"}))
    cases.append(_case("deep_sizes", ["NHWC", "mask=bool", "fused=False"], (16, 32, 32, 16), -1, calls=SEQ,
                       mask={"dtype": "bool"}, fused=False))
    cases.append(_case("deep_sizes", ["NHWC", "mask=bool", "fused=None"], (16, 32, 32, 16), -1, calls=SEQ,
                       mask={"dtype": "bool"}))
    for fused in (None, False):
        cases.append(_case("deep_sizes", ["NHWC", "f16", "mixed_float16", f"fused={fused}"], (32, 32, 32, 16), -1,
                           calls=SEQ, dtype="float16", fused=fused, dtype_policy="mixed_float16"))
        cases.append(_case("deep_sizes", ["NCHW", "f64in", "float16", f"fused={fused}"], (8, 16, 32, 32), 1,
                           calls=SEQ, dtype="float64", fused=fused, dtype_policy="float16"))
    cases.append(_case("deep_sizes", ["NHWC", "f64", "float64"], (8, 32, 32, 16), -1, calls=SEQ, dtype="float64",
                       dtype_policy="float64"))
    cases.append(_case("deep_sizes", ["NHWC", "renorm"], (16, 32, 32, 16), -1, calls=SEQ, renorm=True,
                       renorm_momentum=0.9))
    return cases


def _values():
    cases = []
    shape4, shape3 = (32, 8, 8, 16), (64, 32, 16)
    recipes = {
        "offset1e3": {"kind": "offset", "mean": 1000.0, "spread": 0.01},
        "offset1e4": {"kind": "offset", "mean": 10000.0, "spread": 0.5},
        "mixed": {"kind": "mixed", "mean": 1.0, "spread": 1.0},
        "normal": {"kind": "normal", "mean": 3.0, "spread": 2.0},
    }
    for rname, rec in recipes.items():
        for fused in (None, False):
            cases.append(_case("deep_values", [rname, "f32", f"fused={fused}"], shape4, -1, calls=SEQ, x=rec,
                               fused=fused))
    # values not exact in the compute dtype: float64/float32 inputs under 16-bit policies
    for ind in ("float64", "float32"):
        for pol in ("float16", "mixed_float16", "bfloat16", "mixed_bfloat16"):
            for fused in (None, False):
                cases.append(_case("deep_values", ["normal", f"in={ind}", f"policy={pol}", f"fused={fused}"], shape4,
                                   -1, calls=SEQ, dtype=ind, x=recipes["normal"], fused=fused, dtype_policy=pol))
            cases.append(_case("deep_values", ["normal", f"in={ind}", f"policy={pol}", "mask=float64"], shape3, -1,
                               calls=SEQ, dtype=ind, x=recipes["normal"], mask={"dtype": "float64"},
                               dtype_policy=pol))
            if ind == "float64":  # values 2**-36 off a 16-bit tie: a direct cast rounds the other way
                half = "bfloat16" if "bfloat16" in pol else "float16"
                ties = {"dtype": half, "fraction": 0.25}
                for fused in (None, False):
                    cases.append(_case("deep_values", ["ties", f"in={ind}", f"policy={pol}", f"fused={fused}"],
                                       shape4, -1, calls=SEQ, dtype=ind, x=dict(recipes["normal"], ties=ties),
                                       fused=fused, dtype_policy=pol))
                cases.append(_case("deep_values", ["ties", f"in={ind}", f"policy={pol}", "mask=float64"], shape3, -1,
                                   calls=SEQ, dtype=ind, x=dict(recipes["normal"], ties=ties),
                                   mask={"dtype": "float64", "ties": ties}, dtype_policy=pol))
                cases.append(_case("deep_values", ["ties", "in=float32", f"policy={pol}", "mask=float64"], shape3,
                                   -1, calls=SEQ, x=recipes["normal"], mask={"dtype": "float64", "ties": ties},
                                   dtype_policy=pol))
        cases.append(_case("deep_values", ["offset1e3", f"in={ind}", "policy=mixed_float16", "mask=bool"], shape3, -1,
                           calls=SEQ, dtype=ind, x=recipes["offset1e3"], mask={"dtype": "bool"},
                           dtype_policy="mixed_float16"))
    cases.append(_case("deep_values", ["normal", "in=float32", "mask=float64"], shape3, -1, calls=SEQ,
                       x=recipes["normal"], mask={"dtype": "float64"}))
    # NaN and inf in the inputs
    special = {"kind": "special", "mean": 1.0, "spread": 1.0, "nan": 3, "inf": 2, "ninf": 2}
    for fused in (None, False):
        cases.append(_case("deep_values", ["special", f"fused={fused}"], shape4, -1, calls=SEQ, x=special,
                           fused=fused))
        cases.append(_case("deep_values", ["special", "f16", f"fused={fused}"], shape4, 1, calls=SEQ, x=special,
                           fused=fused, dtype="float16", dtype_policy="float16"))
    # NaN / inf in the moving statistics, recovered or not
    for poison in ({"moving_mean": "nan", "moving_variance": "inf"}, {"moving_variance": "nan"},
                   {"moving_mean": "-inf"}):
        ptag = ",".join(f"{k}={v}" for k, v in sorted(poison.items()))
        for fused in (None, False):
            for mom in (0.0, 0.9):
                cases.append(_case("deep_values", ["poison", ptag, f"mom={mom}", f"fused={fused}"], shape4, -1,
                                   calls=[F, T, F, T], poison=poison, fused=fused, momentum=mom))
        cases.append(_case("deep_values", ["poison", ptag, "mom=0.0", "renorm"], shape4, -1, calls=[F, T, F, T],
                           poison=poison, renorm=True, renorm_momentum=0.0, momentum=0.0))
    # subnormals
    for ind, pol in (("float16", "float16"), ("float16", None), ("float32", None), ("float64", "float64")):
        for fused in (None, False):
            for eps in (0.0, 1e-3):
                cases.append(_case("deep_values", ["subnormal", f"in={ind}", f"policy={pol}", f"eps={eps}",
                                                   f"fused={fused}"], shape4, -1, calls=SEQ, dtype=ind,
                                   x={"kind": "subnormal", "mean": 1.0, "spread": 1.0}, fused=fused, epsilon=eps,
                                   dtype_policy=pol))
    return cases


def _long():
    cases = []
    shape = (32, 4, 4, 8)
    n = 60
    seq = [T] * n + [F, N]
    for tag, kw in [
        ("fused", {}),
        ("nonfused", {"fused": False}),
        ("nonfused/mom=0.99", {"fused": False, "momentum": 0.99}),
        ("fused/mom=0.99", {"momentum": 0.99}),
        ("renorm", {"renorm": True, "renorm_momentum": 0.9, "renorm_clipping": {"rmax": 2.0, "rmin": 0.5, "dmax": 1}}),
        ("vbs=8", {"virtual_batch_size": 8}),
        ("mask", {"fused": False}),
        ("mixed_float16/fused", {"dtype_policy": "mixed_float16"}),
        ("mixed_float16/nonfused", {"dtype_policy": "mixed_float16", "fused": False}),
        ("float64", {"dtype_policy": "float64"}),
        ("offset1e3/fused", {}),
        ("offset1e3/nonfused", {"fused": False}),
    ]:
        x = {"kind": "offset", "mean": 1000.0, "spread": 0.05} if "offset" in tag else None
        cases.append(_case("deep_long", [tag, f"n={n}"], shape, -1, calls=seq, x=x, samples=512, record_every=10,
                           mask={"dtype": "bool"} if tag == "mask" else None,
                           dtype="float64" if tag == "float64" else "float32", **kw))
    return cases


def _changes():
    """Every attribute the layer reads per call, set after build (and set_weights between calls)."""
    cases = []
    shape = (16, 4, 4, 8)

    def add(tag, sets, path_kw, calls=None, **kw):
        for pname, pk in path_kw:
            pk = dict(pk)
            axis = pk.pop("axis", -1)
            seq = calls or [T, {"training": T, "set": sets}, T, F]
            cases.append(_case("deep_changes", [tag, pname], shape if axis == -1 else (16, 8, 4, 4), axis,
                               calls=seq, samples=512, **{**pk, **kw}))

    both = [("fused", {}), ("nonfused", {"fused": False})]
    nonfused = [("nonfused", {"fused": False})]
    add("center=False", {"center": False}, both)
    add("scale=False", {"scale": False}, both)
    add("center,scale=False", {"center": False, "scale": False}, both)
    add("center=True", {"center": True}, both, center=False)
    add("scale=True", {"scale": True}, both, scale=False)
    add("epsilon=0.25", {"epsilon": 0.25}, both)
    add("epsilon=0", {"epsilon": 0.0}, both)
    add("momentum=0", {"momentum": 0.0}, both)
    add("momentum=0.5", {"momentum": 0.5}, both)
    add("momentum=1", {"momentum": 1.0}, both)
    add("trainable=False", {"trainable": False}, both)
    add("trainable=True", {"trainable": True}, both, trainable=False)
    add("fused=False", {"fused": False}, [("fused", {})])
    add("fused=True", {"fused": True}, nonfused)
    add("renorm=True", {"renorm": True}, both)
    add("renorm=False", {"renorm": False}, [("renorm", {"renorm": True, "renorm_clipping": {"rmax": 1.1}})])
    add("renorm_clipping", {"renorm_clipping": {"rmin": 0.9, "dmax": 0.1}}, [("renorm", {"renorm": True})])
    add("renorm_clipping={}", {"renorm_clipping": {}},
        [("renorm", {"renorm": True, "renorm_clipping": {"rmax": 1.05, "dmax": 0.02}})])
    add("renorm_momentum=0", {"renorm_momentum": 0.0}, [("renorm", {"renorm": True})])
    add("virtual_batch_size=4", {"virtual_batch_size": 4}, [("vbs=8", {"virtual_batch_size": 8})])
    add("virtual_batch_size=None", {"virtual_batch_size": None}, [("vbs=8", {"virtual_batch_size": 8})])
    add("virtual_batch_size=8", {"virtual_batch_size": 8}, both)
    add("momentum=0.5,epsilon=0.1", {"momentum": 0.5, "epsilon": 0.1},
        [("mixed_float16", {"dtype_policy": "mixed_float16"}),
         ("mixed_float16/nonfused", {"dtype_policy": "mixed_float16", "fused": False})])
    add("center=False/mask", {"center": False}, nonfused, mask={"dtype": "bool"})
    renorm = [("renorm", {"renorm": True, "renorm_clipping": {"rmax": 1.5, "dmax": 0.5}})]
    add("trainable=False/renorm", {"trainable": False}, renorm)
    add("epsilon=0.25/renorm", {"epsilon": 0.25}, renorm)
    add("momentum=0/renorm", {"momentum": 0.0}, renorm)
    add("center,scale=False/renorm", {"center": False, "scale": False}, renorm)
    add("momentum=0/vbs", {"momentum": 0.0}, [("vbs=8", {"virtual_batch_size": 8})])
    add("scale=False/mixed_float16", {"scale": False}, [("fused", {"dtype_policy": "mixed_float16"})])
    add("center=False/NCHW", {"center": False}, [("fused", {"axis": 1})])
    add("adjustment=batch_affine", {"adjustment": {MARKER: "batch_affine"}}, both)
    add("adjustment=None", {"adjustment": None}, [("adjust", {"adjustment": {MARKER: "last_dim_affine"}})])
    add("adjustment=batch_affine/renorm", {"adjustment": {MARKER: "batch_affine"}}, [("renorm", {"renorm": True})])
    add("adjustment=last_dim_affine/vbs", {"adjustment": {MARKER: "last_dim_affine"}},
        [("vbs=8", {"virtual_batch_size": 8})])
    # set_weights between calls (every path), and before an inference call
    for pname, pk in [*both, ("renorm", {"renorm": True}), ("vbs=8", {"virtual_batch_size": 8})]:
        cases.append(_case("deep_changes", ["set_weights", pname], shape, -1, samples=512,
                           calls=[T, {"training": T, "set_weights": True}, {"training": F, "set_weights": True}, T],
                           **pk))
    return cases


def _ranks():
    cases = []
    for rank, shape, axes in [
        (1, (1024,), [-1, 0]),
        (2, (512, 64), [-1, 0, 1]),
        (3, (64, 32, 16), [-1, 1, [1, 2]]),
        (6, (8, 4, 3, 5, 6, 7), [-1, 1, 3, [1, 5], [2, 3, 4]]),
        (7, (4, 3, 2, 3, 4, 2, 5), [-1, 2]),
    ]:
        for axis in axes:
            ax = axis if isinstance(axis, int) else "[" + ",".join(map(str, axis)) + "]"
            cases.append(_case("deep_ranks", [f"r{rank}", f"ax={ax}"], shape, axis, calls=SEQ, samples=512))
        if rank == 6:
            cases.append(_case("deep_ranks", ["r6", "ax=-1", "mask"], shape, -1, calls=SEQ, samples=512,
                               mask={"dtype": "bool"}))
            cases.append(_case("deep_ranks", ["r6", "ax=-1", "vbs=2"], shape, -1, calls=SEQ, samples=512,
                               virtual_batch_size=2))
            cases.append(_case("deep_ranks", ["r6", "ax=-1", "renorm"], shape, -1, calls=SEQ, samples=512,
                               renorm=True))
            cases.append(_case("deep_ranks", ["r6", "ax=1", "float16"], shape, 1, calls=SEQ, samples=512,
                               dtype="float16", dtype_policy="float16"))
    return cases


def deep_groups():
    def fix(cases):
        for c in cases:  # dtype_policy -> the constructor's dtype
            pol = c["init_kwargs"].pop("dtype_policy", None)
            if pol is not None:
                c["init_kwargs"]["dtype"] = pol
        return cases

    return [
        {"name": "deep_sizes", "description": "Real sizes (>= 1 MiB inputs) in every layout, ghost batches, masks.",
         "crossed": ["layout", "fused"], "pairwise": [], "cases": fix(_sizes()), "deep": True},
        {"name": "deep_values", "description": "Real values: large means, mixed magnitudes, inexact casts, "
                                               "NaN/inf in inputs and moving statistics, subnormals.",
         "crossed": ["recipe", "dtype/policy", "fused"], "pairwise": [], "cases": fix(_values()), "deep": True},
        {"name": "deep_long", "description": "60 training calls then inference: the moving statistics' drift.",
         "crossed": ["path"], "pairwise": [], "cases": fix(_long()), "deep": True},
        {"name": "deep_changes", "description": "Attributes set between calls; set_weights between calls.",
         "crossed": ["attribute", "path"], "pairwise": [], "cases": fix(_changes()), "deep": True},
        {"name": "deep_ranks", "description": "Ranks 1, 2, 3, 6, 7 with several axes; rank 6 masks, ghost batches, "
                                              "renorm, float16.",
         "crossed": ["rank", "axis"], "pairwise": [], "cases": fix(_ranks()), "deep": True},
    ]
