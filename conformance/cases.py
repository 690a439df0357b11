"""The conformance grid, as plain data.

Nothing here imports TensorFlow: the grid is a pure function of this file and
is shared by the generator (which runs TensorFlow on it) and the docs.

``groups()`` returns a list of ``{"name", "description", "crossed", "pairwise",
"cases"}`` dicts; every case is a JSON-serialisable dict::

    {
      "id":           unique, "/"-separated, regex friendly,
      "dims":         {dimension: value-as-string} (used for report breakdowns),
      "init_kwargs":  constructor kwargs (JSON; adjustment as {"__adjustment__": name}),
      "input_shape":  shape used for ``build`` and (unless overridden) every call,
      "input_dtype":  "float16" | "float32" | "float64" | "bfloat16",
      "calls":        [{"training": true|false|null, "mask": null|"rows"|"all",
                        optional "shape": [...]}],
      "weights":      "init" (keep initializer values) | "random" (set_weights after build),
      "magnitude":    input scale factor (float16 overflow group),
      "step":         null | {"dy": true} -> one SGD step (constraints group),
      "random_initializer": true when an initializer is random (values not compared),
      "seed":         int, seeds all arrays of the case.
    }

How the switches are combined (crossed fully vs. all-pairs) is stated in each
group's ``crossed`` / ``pairwise`` fields and in docs/conformance.md.
"""

from __future__ import annotations

import hashlib
import itertools
import json

from .adjustments import MARKER

# --------------------------------------------------------------------------- #
# Building blocks
# --------------------------------------------------------------------------- #

#: input shape per rank: batch first, all other sizes distinct where possible
#: so that normalizing the wrong axis shows up as a shape error.
SHAPES = {
    1: (6,),
    2: (6, 3),
    3: (6, 3, 2),
    4: (4, 2, 1, 3),
    5: (4, 2, 1, 2, 3),
}

#: (rank, axis) settings of the structural grid.
AXES = [
    (2, -1), (2, 1), (2, [1]),
    (3, -1), (3, 1), (3, [1, 2]),
    (4, -1), (4, 1), (4, 3), (4, -3), (4, 2), (4, [1, 2]), (4, [-1, -2]),
    (5, -1), (5, 1), (5, 2), (5, [1, 4]),
]

#: a small subset of AXES covering: rank 2, fused NHWC, fused NCHW, multi-axis,
#: and 5-D fused NCDHW.
AXES_SMALL = [(2, -1), (4, -1), (4, 1), (4, [1, 2]), (5, 1)]

FUSED = [None, True, False]
RENORM = ["off", "on", "clip"]
MODE = ["plain", "vbs", "adjust"]          # vbs+adjust is an error case (group errors)
MASK = [False, True]
BOOL = [True, False]
INPUT_DTYPES = ["float32", "float16", "float64"]
POLICIES = ["default", "float64", "float16", "mixed_float16"]

SEQUENCES = {
    "TTFN": [True, True, False, None],
    "FTTFN": [False, True, True, False, None],
    "NTTFN": [None, True, True, False, None],
}

#: values drawn pairwise (every pair of values of two parameters appears in at
#: least one case of a group, also pairs with the crossed switches).
NUMERIC = {
    "momentum": [0.99, 0.9, 0.5, 0.0, 1.0],
    "epsilon": [1e-3, 1.001e-5, 1e-6, 0.0, 0.25],
    "weights": ["random", "init"],
    "sequence": list(SEQUENCES),
}
RENORM_NUMERIC = {
    "renorm_momentum": [0.99, 0.5, 0.0, 1.0],
}
CLIP_NUMERIC = {
    "renorm_clipping": [
        {"rmax": 1.5, "rmin": 0.7, "dmax": 0.3},
        {"rmax": 1.1},
        {"rmin": 0.95, "dmax": 0.05},
        {"dmax": 0.0},
        {"rmin": 1.0, "rmax": 1.0},
    ],
}
VBS_NUMERIC = {"vbs": ["2", "batch"]}
ADJ_NUMERIC = {"adjustment": ["batch_affine", "last_dim_affine"]}
AFFINE_NUMERIC = {"center": BOOL, "scale": BOOL}
TRAINABLE_NUMERIC = {"trainable": BOOL}


def _axis_str(axis):
    if isinstance(axis, list):
        return "[" + ",".join(str(a) for a in axis) + "]"
    return str(axis)


def _seed(case_id):
    return int.from_bytes(hashlib.sha256(case_id.encode()).digest()[:4], "little")


def _calls(sequence, mask):
    return [{"training": t, "mask": ("rows" if mask else None)} for t in SEQUENCES[sequence]]


def _base_case(group, parts, rank, axis, **kw):
    cid = group + "/" + "/".join(parts)
    case = {
        "id": cid,
        "dims": {},
        "init_kwargs": {"axis": axis},
        "input_shape": list(SHAPES[rank]),
        "input_dtype": "float32",
        "calls": _calls("TTFN", False),
        "weights": "random",
        "magnitude": 1.0,
        "step": None,
        "random_initializer": False,
        "seed": _seed(cid),
    }
    case.update(kw)
    return case


# --------------------------------------------------------------------------- #
# Deterministic all-pairs covering
# --------------------------------------------------------------------------- #

def allpairs_fill(rows, free, relevant=None):
    """Fill the free parameters of ``rows`` so that every pair is covered.

    ``rows``: list of dicts already holding the crossed ("fixed") switches.
    ``free``: {param: [values]}.  ``relevant(row, param)`` says whether a
    parameter applies to a row (e.g. ``renorm_momentum`` only with renorm).

    Greedy in the style of IPOG: for each row and each free parameter (in
    order) choose the value covering most still-uncovered pairs with the
    values already in the row (fixed switches and earlier free parameters);
    ties rotate with the row index so choices are balanced.  Pairs of two
    free parameters that are still uncovered afterwards get an extra row
    (a copy of a row where both apply).  Returns the number of extra rows.
    """
    relevant = relevant or (lambda row, p: True)
    names = list(free)

    def key(v):
        return json.dumps(v, sort_keys=True)

    fixed_names = sorted({k for r in rows for k in r if k not in free})
    vkeys = {p: [key(v) for v in free[p]] for p in names}
    covered = set()

    def fill(i, row, forced=None):
        forced = forced or {}
        done = [(q, key(row[q])) for q in fixed_names if q in row]
        for p in names:
            if not relevant(row, p):
                row[p] = None
                continue
            vals = free[p]
            if p in forced:
                best = forced[p]
            else:
                best, best_gain = None, -1
                for j in range(len(vals)):
                    jj = (i + j) % len(vals)
                    kv = vkeys[p][jj]
                    gain = 0
                    for q, kw in done:
                        if (p, kv, q, kw) not in covered:
                            gain += 1
                    if gain > best_gain:
                        best, best_gain = vals[jj], gain
            kb = key(best)
            for q, kw in done:
                covered.add((p, kb, q, kw))
                covered.add((q, kw, p, kb))
            row[p] = best
            done.append((p, kb))

    for i, row in enumerate(rows):
        fill(i, row)
    extra = []
    for a, b in itertools.combinations(names, 2):
        for va in free[a]:
            for vb in free[b]:
                if (a, key(va), b, key(vb)) in covered:
                    continue
                base = next((r for r in rows if relevant(r, a) and relevant(r, b)), None)
                if base is None:
                    continue
                row = {k: v for k, v in base.items() if k not in free}
                row["_extra"] = len(extra)
                fill(len(rows) + len(extra), row, {a: va, b: vb})
                extra.append(row)
    rows.extend(extra)
    return len(extra)


# --------------------------------------------------------------------------- #
# Structural groups
# --------------------------------------------------------------------------- #

def _relevant(row, p):
    if p == "renorm_momentum":
        return row["renorm"] != "off"
    if p == "renorm_clipping":
        return row["renorm"] == "clip"
    if p == "vbs":
        return row["mode"] == "vbs"
    if p == "adjustment":
        return row["mode"] == "adjust"
    return True


def _finish(group, row, parts, order):
    rank, axis = row["rank"], row["axis"]
    shape = SHAPES[rank]
    kw = {"axis": axis, "momentum": row["momentum"], "epsilon": row["epsilon"]}
    if row.get("fused", None) is not None:
        kw["fused"] = row["fused"]
    if row.get("center") is False:
        kw["center"] = False
    if row.get("scale") is False:
        kw["scale"] = False
    if row.get("trainable") is False:
        kw["trainable"] = False
    if row["renorm"] != "off":
        kw["renorm"] = True
        kw["renorm_momentum"] = row["renorm_momentum"]
        if row["renorm"] == "clip":
            kw["renorm_clipping"] = row["renorm_clipping"]
    if row["mode"] == "vbs":
        kw["virtual_batch_size"] = 2 if row["vbs"] == "2" else shape[0]
    if row["mode"] == "adjust":
        kw["adjustment"] = {MARKER: row["adjustment"]}
    policy = row.get("policy", "default")
    if policy != "default":
        kw["dtype"] = policy
    cid = group + "/" + "/".join(parts)
    dims = {k: (_axis_str(row[k]) if k == "axis" else
                json.dumps(row[k], sort_keys=True) if isinstance(row[k], dict) else str(row[k]))
            for k in order if row.get(k, None) is not None or k in ("fused",)}
    dims["rank"] = str(rank)
    return {
        "id": cid,
        "dims": dims,
        "init_kwargs": kw,
        "input_shape": list(shape),
        "input_dtype": row.get("input_dtype", "float32"),
        "calls": _calls(row["sequence"], row["mask"]),
        "weights": row["weights"],
        "magnitude": 1.0,
        "step": None,
        "random_initializer": False,
        "seed": _seed(cid),
    }


def _structural(group, axes, crossed, free_extra):
    """Full cross product of ``crossed`` switches over ``axes``; the rest pairwise."""
    choices = {
        "fused": FUSED, "renorm": RENORM, "mode": MODE, "mask": MASK,
        "trainable": BOOL, "center": BOOL, "scale": BOOL,
        "input_dtype": INPUT_DTYPES, "policy": POLICIES,
    }
    rows = []
    for (rank, axis) in axes:
        for combo in itertools.product(*[choices[c] for c in crossed]):
            row = {"rank": rank, "axis": axis}
            row.update(dict(zip(crossed, combo)))
            rows.append(row)
    free = dict(NUMERIC)
    free.update(free_extra)
    free.update(RENORM_NUMERIC)
    free.update(CLIP_NUMERIC)
    free.update(VBS_NUMERIC)
    free.update(ADJ_NUMERIC)
    allpairs_fill(rows, free, _relevant)
    cases = []
    order = ["axis", *crossed, *free]
    for r in rows:
        rank, ax = r["rank"], r["axis"]
        parts = [f"r{rank}", f"ax={_axis_str(ax)}"]
        for c in crossed:
            parts.append(f"{c}={r[c]}")
        # free values are part of the id to keep ids unique and greppable
        parts.append(f"mom={r['momentum']}")
        parts.append(f"eps={r['epsilon']}")
        for p in ("center", "scale", "trainable"):
            if p in free:
                parts.append(f"{p}={r[p]}")
        parts.append(f"w={r['weights']}")
        parts.append(f"seq={r['sequence']}")
        if "_extra" in r:
            parts.append(f"extra{r.pop('_extra')}")
        if r["renorm"] != "off":
            parts.append(f"rmom={r['renorm_momentum']}")
        if r["renorm"] == "clip":
            parts.append("clip=" + "".join(f"{k}{v}" for k, v in sorted(r["renorm_clipping"].items())))
        if r["mode"] == "vbs":
            parts.append(f"vbs={r['vbs']}")
        if r["mode"] == "adjust":
            parts.append(f"adj={r['adjustment']}")
        cases.append(_finish(group, r, parts, order))
    return cases


# --------------------------------------------------------------------------- #
# Dedicated groups
# --------------------------------------------------------------------------- #

def _vbs_nondividing():
    cases = []
    for rank, axis in AXES:
        batch = SHAPES[rank][0]
        vbs = 4 if batch == 6 else 3
        for seq in ("TTFN", "FTTFN"):
            c = _base_case("vbs_nondividing", [f"r{rank}", f"ax={_axis_str(axis)}", f"seq={seq}"], rank, axis)
            c["init_kwargs"]["virtual_batch_size"] = vbs
            c["calls"] = _calls(seq, False)
            c["dims"] = {"rank": str(rank), "axis": _axis_str(axis), "sequence": seq}
            cases.append(c)
    return cases


REGULARIZERS = [
    "l1", "l2", "l1_l2",
    {"class_name": "L1L2", "config": {"l1": 0.01, "l2": 0.02}},
    {"class_name": "L1", "config": {"l1": 0.3}},
    {"class_name": "L2", "config": {"l2": 0.25}},
]


def _regularizers():
    cases = []
    combos = []
    for i, g in enumerate(REGULARIZERS):
        combos.append((g, REGULARIZERS[(i + 2) % len(REGULARIZERS)]))
        combos.append((g, None))
        combos.append((None, g))
    for g, b in combos:
        for (rank, axis), policy, center, scale in [
            ((2, -1), "default", True, True),
            ((4, [1, 2]), "mixed_float16", True, True),
            ((3, 1), "float64", True, False),
            ((4, 1), "default", False, True),
        ]:
            name = lambda r: "none" if r is None else (r if isinstance(r, str) else r["class_name"] + json.dumps(r["config"], sort_keys=True))
            parts = [f"gamma={name(g)}", f"beta={name(b)}", f"r{rank}", f"ax={_axis_str(axis)}", f"policy={policy}",
                     f"center={center}", f"scale={scale}"]
            c = _base_case("regularizers", parts, rank, axis)
            kw = c["init_kwargs"]
            if g is not None:
                kw["gamma_regularizer"] = g
            if b is not None:
                kw["beta_regularizer"] = b
            if policy != "default":
                kw["dtype"] = policy
            if not center:
                kw["center"] = False
            if not scale:
                kw["scale"] = False
            c["dims"] = {"gamma_regularizer": name(g), "beta_regularizer": name(b), "policy": policy,
                         "rank": str(rank), "axis": _axis_str(axis)}
            c["calls"] = _calls("TTFN", False)[:2]
            cases.append(c)
    return cases


CONSTRAINTS = [
    "non_neg", "unit_norm", "max_norm", "min_max_norm",
    {"class_name": "MaxNorm", "config": {"max_value": 0.5, "axis": 0}},
    {"class_name": "MinMaxNorm", "config": {"min_value": 0.5, "max_value": 0.8, "rate": 0.5, "axis": 0}},
    {"class_name": "UnitNorm", "config": {"axis": -1}},
    {"class_name": "MaxNorm", "config": {"max_value": 1.0, "axis": [0, 1]}},
    {"class_name": "MinMaxNorm", "config": {"min_value": 1.0, "max_value": 2.0, "rate": 1.0, "axis": 1}},
]


def _constraints():
    cases = []
    layouts = [
        ((2, -1), None, "default"),
        ((3, 1), None, "default"),
        ((4, [1, 2]), None, "default"),
        ((4, 3), None, "mixed_float16"),
        ((2, -1), 2, "default"),
        ((4, -1), None, "float64"),
    ]
    for ci, con in enumerate(CONSTRAINTS):
        cname = con if isinstance(con, str) else con["class_name"] + json.dumps(con["config"], sort_keys=True)
        for (rank, axis), vbs, policy in layouts:
            # axis=1 constraints need a parameter of rank >= 2
            for target in ("gamma", "beta", "both"):
                parts = [cname, f"r{rank}", f"ax={_axis_str(axis)}", f"vbs={vbs}", f"policy={policy}", f"on={target}"]
                c = _base_case("constraints", parts, rank, axis)
                kw = c["init_kwargs"]
                if target in ("gamma", "both"):
                    kw["gamma_constraint"] = con
                if target in ("beta", "both"):
                    kw["beta_constraint"] = con
                if vbs:
                    kw["virtual_batch_size"] = vbs
                if policy != "default":
                    kw["dtype"] = policy
                c["calls"] = []
                c["step"] = {"learning_rate": 0.1}
                c["dims"] = {"constraint": cname, "target": target, "policy": policy,
                             "rank": str(rank), "axis": _axis_str(axis), "vbs": str(vbs)}
                cases.append(c)
    return cases


def _errors():
    E = []

    def add(name, rank, axis, kw=None, calls=None, shape=None, weights="random", input_dtype="float32"):
        c = _base_case("errors", [name], rank, axis)
        if kw:
            c["init_kwargs"].update(kw)
        if calls is not None:
            c["calls"] = calls
        if shape is not None:
            c["input_shape"] = list(shape)
        c["weights"] = weights
        c["input_dtype"] = input_dtype
        c["dims"] = {"error": name}
        E.append(c)

    T = {"training": True, "mask": None}
    F = {"training": False, "mask": None}
    add("axis_str", 2, "a")
    add("axis_float", 2, 1.0)
    add("axis_none", 2, None)
    add("axis_list_of_str", 2, ["a"])
    add("axis_out_of_range_pos", 4, 4)
    add("axis_out_of_range_neg", 4, -5)
    add("axis_list_out_of_range", 4, [1, 7])
    add("axis_duplicate", 4, [1, 1])
    add("axis_duplicate_neg", 4, [3, -1])
    add("axis_list_valid_control", 4, [1, 2])
    add("axis_0", 4, 0)
    add("axis_0_fused_true", 4, 0, {"fused": True})
    add("rank1_input", 1, -1)
    add("rank1_input_axis0", 1, 0)
    add("wrong_channels_second_call", 4, -1, calls=[T, {"training": True, "mask": None, "shape": [4, 2, 1, 2]}])
    add("wrong_rank_second_call", 4, -1, calls=[T, {"training": True, "mask": None, "shape": [4, 2, 3]}])
    add("other_batch_second_call", 4, -1, calls=[T, {"training": True, "mask": None, "shape": [6, 2, 1, 3]}, F])
    add("other_spatial_second_call", 4, 1, calls=[T, {"training": True, "mask": None, "shape": [4, 2, 3, 2]}, F])
    add("renorm_clipping_bad_key", 2, -1, {"renorm": True, "renorm_clipping": {"rmax": 2.0, "foo": 1.0}})
    add("renorm_clipping_bad_key_no_renorm", 2, -1, {"renorm_clipping": {"foo": 1.0}})
    add("fused_true_renorm", 4, -1, {"fused": True, "renorm": True})
    add("fused_true_multi_axis", 4, [1, 2], {"fused": True})
    add("fused_true_axis2", 4, 2, {"fused": True})
    add("fused_true_rank2", 2, -1, {"fused": True})
    add("fused_true_rank3", 3, -1, {"fused": True})
    add("fused_true_vbs", 4, -1, {"fused": True, "virtual_batch_size": 2})
    add("fused_true_adjustment", 4, -1, {"fused": True, "adjustment": {MARKER: "batch_affine"}})
    add("fused_true_float64", 4, -1, {"fused": True, "dtype": "float64"})
    add("fused_true_mask", 4, -1, {"fused": True}, calls=[{"training": True, "mask": "rows"}, {"training": False, "mask": "rows"}])
    add("vbs_zero", 2, -1, {"virtual_batch_size": 0})
    add("vbs_negative", 2, -1, {"virtual_batch_size": -2})
    add("vbs_axis0", 2, 0, {"virtual_batch_size": 2})
    add("vbs_axis_list_with_0", 3, [0, 2], {"virtual_batch_size": 2})
    add("vbs_with_adjustment", 2, -1, {"virtual_batch_size": 2, "adjustment": {MARKER: "batch_affine"}})
    add("vbs_larger_than_batch", 2, -1, {"virtual_batch_size": 12})
    add("vbs_mask_training", 2, -1, {"virtual_batch_size": 2}, calls=[{"training": True, "mask": "rows"}])
    add("vbs_mask_inference", 2, -1, {"virtual_batch_size": 2}, calls=[{"training": False, "mask": "rows"}, {"training": None, "mask": "rows"}])
    add("set_weights_too_few", 2, -1, weights="too_few")
    add("set_weights_too_many", 2, -1, weights="too_many")
    add("set_weights_wrong_shape", 2, -1, weights="wrong_shape")
    add("momentum_none", 2, -1, {"momentum": None})
    add("epsilon_none", 2, -1, {"epsilon": None})
    add("unknown_kwarg", 2, -1, {"foo": 1})
    add("bad_dtype_policy", 2, -1, {"dtype": "int32"})
    # TF accepts an integer policy and then fails inside its own ops (a TF
    # defect); a port may instead reject it up front with ValueError/TypeError.
    E[-1]["allow_reject"] = True
    add("bad_dtype_policy_name", 2, -1, {"dtype": "mixed_int8"})
    add("bad_initializer_name", 2, -1, {"gamma_initializer": "no_such_initializer"})
    add("bad_regularizer_name", 2, -1, {"beta_regularizer": "no_such_regularizer"})
    add("bad_constraint_name", 2, -1, {"gamma_constraint": "no_such_constraint"})
    add("mask_wrong_shape", 3, -1, calls=[{"training": True, "mask": "wrong_shape"}])
    return E


INITIALIZERS = [
    ("zeros", False), ("ones", False),
    ({"class_name": "Constant", "config": {"value": 0.5}}, False),
    ({"class_name": "Constant", "config": {"value": -2.0}}, False),
    ("random_normal", True), ("glorot_uniform", True),
    ({"class_name": "RandomUniform", "config": {"minval": 0.5, "maxval": 1.5, "seed": 3}}, True),
]


def _initializers():
    cases = []
    targets = ["gamma_initializer", "beta_initializer", "moving_mean_initializer", "moving_variance_initializer"]
    for ii, (init, is_random) in enumerate(INITIALIZERS):
        iname = init if isinstance(init, str) else init["class_name"] + json.dumps(init["config"], sort_keys=True)
        for ti, target in enumerate(targets):
            for (rank, axis), renorm, policy in [((2, -1), False, "default"), ((4, [1, 2]), True, "mixed_float16"),
                                                 ((4, 1), False, "float64")]:
                parts = [f"{target}={iname}", f"r{rank}", f"ax={_axis_str(axis)}", f"renorm={renorm}", f"policy={policy}"]
                c = _base_case("initializers", parts, rank, axis)
                kw = c["init_kwargs"]
                kw[target] = init
                if renorm:
                    kw["renorm"] = True
                if policy != "default":
                    kw["dtype"] = policy
                c["weights"] = "random" if is_random else "init"
                c["random_initializer"] = is_random
                # a positive variance keeps the outputs finite
                if target == "moving_variance_initializer" and not is_random and iname.startswith(("zeros", "Constant")) and "-2" in iname:
                    kw["epsilon"] = 0.5
                c["dims"] = {"initializer": iname, "target": target, "policy": policy, "renorm": str(renorm)}
                cases.append(c)
    return cases


def _edges():
    cases = []
    for mom in [0.0, 1.0, 0.5, 0.999999]:
        for eps in [0.0, 1e-7, 1e-5, 1.001e-5, 1e-3, 1.0, 10.0]:
            for (rank, axis), fused in [((4, -1), None), ((4, 1), None), ((4, -1), False), ((2, -1), None)]:
                parts = [f"mom={mom}", f"eps={eps}", f"r{rank}", f"ax={_axis_str(axis)}", f"fused={fused}"]
                c = _base_case("edges", parts, rank, axis)
                kw = c["init_kwargs"]
                kw["momentum"] = mom
                kw["epsilon"] = eps
                if fused is not None:
                    kw["fused"] = fused
                c["dims"] = {"momentum": str(mom), "epsilon": str(eps), "path": f"{rank}:{_axis_str(axis)}:{fused}"}
                cases.append(c)
    return cases


def _f16_large():
    cases = []
    for policy in ["mixed_float16", "float16", "default"]:
        for (rank, axis), fused in [((4, -1), None), ((4, -1), False), ((4, 1), None), ((2, -1), None), ((3, [1, 2]), None)]:
            for renorm in (False, True):
                for mag in (1e3, 3e4):
                    parts = [f"policy={policy}", f"r{rank}", f"ax={_axis_str(axis)}", f"fused={fused}",
                             f"renorm={renorm}", f"mag={mag:g}"]
                    c = _base_case("f16_large", parts, rank, axis)
                    kw = c["init_kwargs"]
                    if policy != "default":
                        kw["dtype"] = policy
                    if fused is not None:
                        kw["fused"] = fused
                    if renorm:
                        kw["renorm"] = True
                    c["input_dtype"] = "float16"
                    c["magnitude"] = mag
                    c["weights"] = "init"
                    c["dims"] = {"policy": policy, "magnitude": f"{mag:g}", "renorm": str(renorm),
                                 "path": f"{rank}:{_axis_str(axis)}:{fused}"}
                    cases.append(c)
    return cases


def _fully_masked():
    cases = []
    for (rank, axis) in [(2, -1), (3, -1), (3, 1), (4, -1), (4, [1, 2])]:
        for policy in ["default", "mixed_float16", "float64"]:
            for renorm in (False, True):
                for fused in (None, False):
                    parts = [f"r{rank}", f"ax={_axis_str(axis)}", f"policy={policy}", f"renorm={renorm}", f"fused={fused}"]
                    c = _base_case("fully_masked", parts, rank, axis)
                    kw = c["init_kwargs"]
                    if policy != "default":
                        kw["dtype"] = policy
                    if renorm:
                        kw["renorm"] = True
                    if fused is not None:
                        kw["fused"] = fused
                    c["calls"] = [{"training": True, "mask": "all"}, {"training": True, "mask": "rows"},
                                  {"training": False, "mask": "all"}, {"training": None, "mask": "all"}]
                    c["dims"] = {"rank": str(rank), "axis": _axis_str(axis), "policy": policy,
                                 "renorm": str(renorm), "fused": str(fused)}
                    cases.append(c)
    return cases


def _small_batch():
    cases = []
    for n in (1, 2, 3):
        for shape, axis in [((n, 1, 1, 3), -1), ((n, 3, 1, 1), 1), ((n, 3), -1), ((n, 1, 1, 1, 2), -1)]:
            for fused in (None, False):
                for renorm in (False, True):
                    rank = len(shape)
                    parts = [f"n={n}", "x".join(map(str, shape)), f"ax={_axis_str(axis)}", f"fused={fused}",
                             f"renorm={renorm}"]
                    c = _base_case("small_batch", parts, rank, axis)
                    c["input_shape"] = list(shape)
                    kw = c["init_kwargs"]
                    kw["momentum"] = 0.5
                    if fused is not None:
                        kw["fused"] = fused
                    if renorm:
                        kw["renorm"] = True
                    c["dims"] = {"n": str(n), "fused": str(fused), "renorm": str(renorm), "rank": str(rank)}
                    cases.append(c)
    return cases


def _bfloat16():
    cases = []
    for policy in ["mixed_bfloat16", "bfloat16"]:
        for input_dtype in ["bfloat16", "float32"]:
            for (rank, axis), fused in [((4, -1), None), ((4, 1), None), ((4, -1), False), ((2, -1), None),
                                        ((4, [1, 2]), None)]:
                for renorm, mask in [(False, False), (True, False), (False, True)]:
                    parts = [f"policy={policy}", f"x={input_dtype}", f"r{rank}", f"ax={_axis_str(axis)}",
                             f"fused={fused}", f"renorm={renorm}", f"mask={mask}"]
                    c = _base_case("bfloat16", parts, rank, axis)
                    kw = c["init_kwargs"]
                    kw["dtype"] = policy
                    if fused is not None:
                        kw["fused"] = fused
                    if renorm:
                        kw["renorm"] = True
                    c["input_dtype"] = input_dtype
                    c["calls"] = _calls("TTFN", mask)
                    c["dims"] = {"policy": policy, "input_dtype": input_dtype, "renorm": str(renorm),
                                 "mask": str(mask), "path": f"{rank}:{_axis_str(axis)}:{fused}"}
                    cases.append(c)
    return cases


ACTIVITY = ["l1", "l2", "l1_l2", {"class_name": "L2", "config": {"l2": 0.25}}]


def _activity():
    """activity_regularizer -> layer.losses (the output's penalty over the batch size). A gamma of
    70 makes the float16 L2 sum of squares (about 88000) overflow where TF's sum of halved squares
    (about 44000) does not."""
    cases = []
    for reg in ACTIVITY:
        name = reg if isinstance(reg, str) else reg["class_name"] + json.dumps(reg["config"], sort_keys=True)
        for (rank, axis), fused in [((2, -1), None), ((4, -1), None), ((4, 1), False)]:
            for policy in ["default", "mixed_float16", "float16", "float64"]:
                for big in (False, True):
                    parts = [f"reg={name}", f"r{rank}", f"ax={_axis_str(axis)}", f"fused={fused}",
                             f"policy={policy}", f"gamma={'70' if big else 'random'}"]
                    c = _base_case("activity", parts, rank, axis)
                    kw = c["init_kwargs"]
                    kw["activity_regularizer"] = reg
                    kw["gamma_regularizer"] = "l2"
                    if fused is not None:
                        kw["fused"] = fused
                    if policy != "default":
                        kw["dtype"] = policy
                    c["calls"] = _calls("TTFN", False)
                    if big:  # training calls only: normalized outputs stay below 256 (no float16 square overflows)
                        kw["gamma_initializer"] = {"class_name": "Constant", "config": {"value": 70.0}}
                        c["weights"] = "init"
                        c["calls"] = c["calls"][:2]
                    c["dims"] = {"regularizer": name, "policy": policy, "gamma": "70" if big else "random",
                                 "path": f"{rank}:{_axis_str(axis)}:{fused}"}
                    cases.append(c)
    return cases


def _frozen_momentum():
    """momentum that is not a number (None) or odd (a bool) with trainable=False: TF reads momentum in
    the updates a frozen layer skips, except on the fused path, which converts it to a tensor."""
    cases = []
    for mom in (None, True):
        for (rank, axis), fused, extra in [((2, -1), None, {}), ((4, -1), False, {}), ((4, -1), None, {}),
                                           ((2, -1), None, {"renorm": True}),
                                           ((2, -1), None, {"virtual_batch_size": 2})]:
            for trainable in (False, True):
                tag = "+".join(f"{k}={v}" for k, v in extra.items()) or "plain"
                parts = [f"mom={mom}", f"r{rank}", f"ax={_axis_str(axis)}", f"fused={fused}", tag,
                         f"trainable={trainable}"]
                c = _base_case("frozen_momentum", parts, rank, axis)
                kw = c["init_kwargs"]
                kw["momentum"] = mom
                kw["trainable"] = trainable
                kw.update(extra)
                if fused is not None:
                    kw["fused"] = fused
                c["dims"] = {"momentum": str(mom), "trainable": str(trainable), "path": f"{rank}:{fused}:{tag}"}
                cases.append(c)
    return cases


# --------------------------------------------------------------------------- #

def groups():
    """All groups, in generation order."""
    core_crossed = ["fused", "renorm", "mode", "mask", "trainable"]
    affine_crossed = ["center", "scale", "fused", "renorm", "mode", "mask", "trainable"]
    dtype_crossed = ["input_dtype", "policy", "fused", "renorm", "mode", "mask"]
    G = [
        {
            "name": "core",
            "description": "Structural code paths, float32 input, default policy.",
            "crossed": ["rank/axis (17 settings)"] + core_crossed,
            "pairwise": ["center", "scale"] + list(NUMERIC) + list(RENORM_NUMERIC) + list(CLIP_NUMERIC)
                        + list(VBS_NUMERIC) + list(ADJ_NUMERIC),
            "cases": _structural("core", AXES, core_crossed, AFFINE_NUMERIC),
        },
        {
            "name": "affine",
            "description": "center/scale against every path that composes gamma/beta.",
            "crossed": ["rank/axis (5 settings)"] + affine_crossed,
            "pairwise": list(NUMERIC) + list(RENORM_NUMERIC) + list(CLIP_NUMERIC) + list(VBS_NUMERIC)
                        + list(ADJ_NUMERIC),
            "cases": _structural("affine", AXES_SMALL, affine_crossed, {}),
        },
        {
            "name": "dtype",
            "description": "Input dtype x dtype policy against every path.",
            "crossed": ["rank/axis (5 settings)"] + dtype_crossed,
            "pairwise": ["center", "scale", "trainable"] + list(NUMERIC) + list(RENORM_NUMERIC)
                        + list(CLIP_NUMERIC) + list(VBS_NUMERIC) + list(ADJ_NUMERIC),
            "cases": _structural("dtype", AXES_SMALL, dtype_crossed, {**AFFINE_NUMERIC, **TRAINABLE_NUMERIC}),
        },
        {"name": "vbs_nondividing", "description": "virtual_batch_size not dividing the batch.",
         "crossed": ["rank/axis (17 settings)", "first call mode"], "pairwise": [], "cases": _vbs_nondividing()},
        {"name": "regularizers", "description": "gamma/beta regularizers -> layer.losses.",
         "crossed": [], "pairwise": [], "cases": _regularizers()},
        {"name": "constraints", "description": "gamma/beta constraints applied after one SGD step.",
         "crossed": ["constraint", "layout", "target"], "pairwise": [], "cases": _constraints()},
        {"name": "errors", "description": "One case per rejection reason.",
         "crossed": [], "pairwise": [], "cases": _errors()},
        {"name": "initializers", "description": "Initializer names and configs.",
         "crossed": ["initializer", "target", "layout"], "pairwise": [], "cases": _initializers()},
        {"name": "edges", "description": "momentum/epsilon edge values on fused and non-fused paths.",
         "crossed": ["momentum", "epsilon", "path"], "pairwise": [], "cases": _edges()},
        {"name": "f16_large", "description": "float16 inputs of large magnitude (variance would overflow in half).",
         "crossed": ["policy", "path", "renorm", "magnitude"], "pairwise": [], "cases": _f16_large()},
        {"name": "fully_masked", "description": "All rows masked out.",
         "crossed": ["rank/axis", "policy", "renorm", "fused"], "pairwise": [], "cases": _fully_masked()},
        {"name": "small_batch", "description": "Reduction sizes 1, 2, 3 (fused Bessel correction).",
         "crossed": ["n", "layout", "fused", "renorm"], "pairwise": [], "cases": _small_batch()},
        {"name": "bfloat16", "description": "bfloat16 policies (arrays stored as uint16 bit patterns).",
         "crossed": ["policy", "input dtype", "path", "renorm/mask"], "pairwise": [], "cases": _bfloat16()},
        {"name": "activity", "description": "activity_regularizer -> layer.losses, 16-bit policies included.",
         "crossed": ["regularizer", "path", "policy", "gamma"], "pairwise": [], "cases": _activity()},
        {"name": "frozen_momentum", "description": "momentum None/True, frozen and not, on every path.",
         "crossed": ["momentum", "path", "trainable"], "pairwise": [], "cases": _frozen_momentum()},
        _errors_fuzz_group(),
    ]
    from .deep_cases import deep_groups

    G.extend(deep_groups())
    seen = set()
    for g in G:
        for c in g["cases"]:
            assert c["id"] not in seen, c["id"]
            seen.add(c["id"])
    return G


def _errors_fuzz_group():
    from .fuzz_cases import error_fuzz_cases  # a module of its own: the fuzzer's pools

    return {"name": "errors_fuzz", "description": "Bad constructor arguments and training values drawn "
            "by a seeded fuzzer (conformance/fuzz_cases.py).", "crossed": [], "pairwise": [],
            "cases": error_fuzz_cases()}


def group_hash(group, extra=""):
    """Hash of a group's definition (used to skip groups already generated)."""
    blob = json.dumps({"cases": group["cases"], "extra": extra}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


if __name__ == "__main__":  # pragma: no cover
    for g in groups():
        print(f"{g['name']:16s} {len(g['cases']):6d}")
    print("total", sum(len(g["cases"]) for g in groups()))


# --------------------------------------------------------------------------- #
# TF behaviours a case exercises
# --------------------------------------------------------------------------- #

#: tag -> what TF does (the rule a port has to follow); reports and docs/frameworks.md use it.
BEHAVIOURS = {
    "path:fused": "v1 layer on the fused kernel (rank 4/5, one axis 1 or last, no renorm/ghost batches/"
                  "adjustment, compute dtype not float64; fused=None means True)",
    "path:nonfused": "v1 layer on the non-fused path (tf.nn.moments + tf.nn.batch_normalization)",
    "fused_fallback": "fused=True asked for but silently not possible: the v1 layer falls back to non-fused",
    "moving_variance:bessel": "fused training updates the moving variance with the unbiased (n/(n-1)) variance",
    "moving_variance:biased": "non-fused training updates the moving variance with the biased batch variance",
    "momentum:rounding": "decay = float32(1 - momentum), also for float64 variables",
    "momentum:0": "momentum=0: the moving statistics become the batch's",
    "momentum:1": "momentum=1: the moving statistics never change",
    "momentum:not_a_number": "momentum None or a bool: read only by the updates that run",
    "epsilon:0": "epsilon=0 accepted on both paths (no floor)",
    "epsilon:tiny": "epsilon below 1.001e-5 used as given (no cuDNN floor)",
    "reduction:1": "one value per channel in a training batch (variance 0; Bessel uses max(n - 1, 1))",
    "training:none": "training=None is inference in eager tf-keras v1",
    "inference_first": "an inference call before any training call (initial moving statistics)",
    "frozen": "trainable=False: training calls normalize with batch statistics, no moving update",
    "center:off": "center=False: no beta",
    "scale:off": "scale=False: no gamma",
    "axis:multi": "several feature axes (parameters of rank > 1)",
    "axis:not_last": "a feature axis other than the last (channels first)",
    "rank:1": "rank-1 input: nothing to reduce",
    "rank:5": "rank-5 input",
    "policy:float64": "float64 policy: float64 variables and compute",
    "policy:float16": "float16 policy: float16 inputs, compute and outputs; the batch-norm weights stay float32",
    "policy:mixed": "mixed_float16/mixed_bfloat16: float32 variables, 16-bit compute and outputs",
    "policy:bfloat16": "a bfloat16 policy",
    "cast:input": "the input is cast to the compute dtype (input dtype differs from the policy's)",
    "float16:large": "float16 inputs whose variance overflows in half precision (computed in float32)",
    "renorm": "batch renormalization (renorm=True)",
    "renorm:clipping": "renorm_clipping with rmax/rmin/dmax",
    "ghost_batch": "virtual_batch_size: ghost batches",
    "ghost_batch:nondividing": "virtual_batch_size not dividing the batch: error in training only",
    "adjustment": "an adjustment callable (scale, bias) applied in training",
    "mask": "a mask: frequency weights for the moments on the non-fused path",
    "mask:ignored_on_fused": "a mask on the fused path: ignored (with a warning)",
    "mask:fully_masked": "every position masked: mean 0 and variance 0 (divide-no-nan)",
    "weights:set": "set_weights with given values after build",
    "initializer": "a non-default initializer",
    "initializer:random": "a random initializer (only shapes compared)",
    "regularizer": "gamma/beta regularizers: layer.losses",
    "activity_regularizer": "activity_regularizer: layer.losses after every call",
    "constraint": "gamma/beta constraints applied after an optimizer step",
    "config": "get_config() in Keras's serialized form",
}


def _policy_name(dtype):
    if isinstance(dtype, dict):
        dtype = (dtype.get("config") or {}).get("name")
    return dtype


def _compute_dtype(policy):
    return {None: "float32", "float32": "float32", "float64": "float64", "float16": "float16",
            "mixed_float16": "float16", "bfloat16": "bfloat16", "mixed_bfloat16": "bfloat16"}.get(policy)


def effective_fused(case):
    """The v1 layer's ``fused`` after build, from the case's arguments (docs/semantics.md, section 1);
    None where the arguments do not give a layer that builds."""
    kw = case["init_kwargs"]
    rank = len(case["input_shape"])
    fused = kw.get("fused", None)
    if fused is not None and not fused:  # False, 0, '' ...: TF compares by truth (docs/semantics.md section 1)
        return False
    forced = fused is not None and fused is not True  # a truthy non-True value asks for the kernel outright
    axis = kw.get("axis", -1)
    axes = axis if isinstance(axis, list) else [axis]
    if not all(isinstance(a, int) and not isinstance(a, bool) for a in axes) or not axes:
        return None
    if not all(-rank <= a < rank for a in axes):
        return None
    axes = sorted({a % rank for a in axes})
    compute = _compute_dtype(_policy_name(kw.get("dtype")))
    if compute is None:
        return None
    shape_ok = rank in (4, 5) and len(axes) == 1 and axes[0] in (1, rank - 1)
    if forced:  # renorm and adjustment are ignored; a shape the kernel cannot take is an error
        return True if shape_ok and not kw.get("virtual_batch_size") else None
    return (shape_ok
            and not kw.get("renorm") and not kw.get("virtual_batch_size") and kw.get("adjustment") is None
            and compute != "float64")


def behaviours(case):
    """Sorted tags (keys of `BEHAVIOURS`, plus ``error:<Type>@<stage>`` for a case TF rejects) of the
    TF rules a case exercises, from its arguments; works on a definition of `groups()` and on a
    golden case record (which adds the recorded error)."""
    tags = set()
    kw = case.get("init_kwargs") or {}
    group = case["id"].split("/", 1)[0]
    err = case.get("error")
    if err and case.get("status", "error") == "error":
        tags.add(f"error:{err.get('expected_type') or err.get('tf_type')}@{err.get('stage')}")
    try:
        shape = [int(s) for s in case["input_shape"]]
        rank = len(shape)
        fused = effective_fused(case)
        if err and case.get("status", "error") == "error" and err.get("stage") in ("init", "build"):
            fused = None  # no layer to run
        policy = _policy_name(kw.get("dtype"))
        compute = _compute_dtype(policy)
        calls = case.get("calls") or []
        trainings = [c.get("training") for c in calls]
        trainable = kw.get("trainable", True) is not False
        mom = kw.get("momentum", 0.99)
        eps = kw.get("epsilon", 1e-3)
        vbs = kw.get("virtual_batch_size")
        masked = [c for c in calls if c.get("mask") is not None]
        if fused is not None:
            tags.add("path:fused" if fused else "path:nonfused")
            if kw.get("fused") is True and not fused:
                tags.add("fused_fallback")
        if True in trainings and trainable and fused is not None and mom != 1:  # momentum 1: nothing moves
            tags.add("moving_variance:bessel" if fused else "moving_variance:biased")
            if isinstance(mom, (int, float)) and not isinstance(mom, bool) and compute == "float64" \
                    and float(1.0 - mom) != float(_f32(1.0 - mom)):
                tags.add("momentum:rounding")
        if mom is None or isinstance(mom, bool):
            tags.add("momentum:not_a_number")
        elif mom == 0:
            tags.add("momentum:0")
        elif mom == 1:
            tags.add("momentum:1")
        if isinstance(eps, (int, float)) and not isinstance(eps, bool):
            if eps == 0:
                tags.add("epsilon:0")
            elif eps < 1.001e-5:
                tags.add("epsilon:tiny")
        axis = kw.get("axis", -1)
        axes = axis if isinstance(axis, list) else [axis]
        if all(isinstance(a, int) and not isinstance(a, bool) and -rank <= a < rank for a in axes) and axes:
            nax = sorted({a % rank for a in axes})
            if len(nax) > 1:
                tags.add("axis:multi")
            if nax[-1] != rank - 1:
                tags.add("axis:not_last")
            if True in trainings:
                n = 1
                for i, s in enumerate(shape):
                    if i not in nax:
                        n *= s
                if isinstance(vbs, int) and vbs > 0 and shape[0] % vbs == 0:
                    n = n // shape[0] * vbs
                if n == 1:
                    tags.add("reduction:1")
        if rank == 1:
            tags.add("rank:1")
        elif rank == 5:
            tags.add("rank:5")
        if None in trainings:
            tags.add("training:none")
        if trainings and trainings[0] is not True:
            tags.add("inference_first")
        if not trainable and True in trainings:
            tags.add("frozen")
        if kw.get("center") is False:
            tags.add("center:off")
        if kw.get("scale") is False:
            tags.add("scale:off")
        if policy in ("float64", "float16"):
            tags.add(f"policy:{policy}")
        elif policy in ("mixed_float16", "mixed_bfloat16"):
            tags.add("policy:mixed")
        if policy in ("bfloat16", "mixed_bfloat16"):
            tags.add("policy:bfloat16")
        if compute and case.get("input_dtype", "float32") != compute:
            tags.add("cast:input")
        if case.get("magnitude", 1.0) and case.get("magnitude", 1.0) > 100 and case.get("input_dtype") == "float16":
            tags.add("float16:large")
        if kw.get("renorm"):
            tags.add("renorm")
            if kw.get("renorm_clipping"):
                tags.add("renorm:clipping")
        if vbs:
            tags.add("ghost_batch")
            if isinstance(vbs, int) and vbs > 0 and shape[0] % vbs:
                tags.add("ghost_batch:nondividing")
        if kw.get("adjustment") is not None:
            tags.add("adjustment")
        if masked:
            tags.add("mask:ignored_on_fused" if fused else "mask")
            if group == "fully_masked" or any(c.get("mask") == "all" for c in masked):
                tags.add("mask:fully_masked")
        if case.get("weights") == "random" and not case.get("random_initializer"):
            tags.add("weights:set")
        if any(k.endswith("_initializer") for k in kw):
            tags.add("initializer")
            if case.get("random_initializer"):
                tags.add("initializer:random")
        if kw.get("gamma_regularizer") or kw.get("beta_regularizer"):
            tags.add("regularizer")
        if kw.get("activity_regularizer"):
            tags.add("activity_regularizer")
        if kw.get("gamma_constraint") or kw.get("beta_constraint") or case.get("step"):
            tags.add("constraint")
    except (TypeError, ValueError, KeyError, ZeroDivisionError):
        tags.add("arguments:invalid")
    return sorted(tags)


def _f32(v):
    import struct

    return struct.unpack("f", struct.pack("f", v))[0]
