"""The ``errors_fuzz`` group: bad constructor arguments and ``training`` values drawn, with a fixed
seed, from the pools of the differential fuzzer (``conformance/fuzz_errors.py``).

Only values the golden format can hold are drawn (JSON: None, bools, ints, finite floats,
strings, lists and dicts of those). Each case is an ordinary case of ``conformance/cases.py``'s
format: TensorFlow's outcome (an error's class and stage, or the values when it runs) is what
``conformance.generate`` records, so every port replays TF's behaviour on bad input.
"""

from __future__ import annotations

import math
import random
from typing import Any

from . import fuzz_errors as fz

N_CASES = 300
SEED = 18
TRAINING_VALUES = [True, False, None, 1, 0, 1.0, "yes", 2, 0.5, "", -1, [True]]
AXES = [(2, -1), (4, -1), (4, 1), (4, [1, 2]), (5, 1), (3, -1)]


def jsonable(value: Any) -> bool:
    if value is None or isinstance(value, (bool, str)):
        return True
    if type(value) is int:
        return True
    if type(value) is float:
        return math.isfinite(value)
    if type(value) is list:
        return all(jsonable(v) for v in value)
    if type(value) is dict:
        return all(isinstance(k, str) and jsonable(v) for k, v in value.items())
    return False


def error_fuzz_cases(n: int = N_CASES, seed: int = SEED) -> list[dict[str, Any]]:
    from .cases import _base_case, _calls

    rng = random.Random(seed)
    args = [a for a in fz.INIT_ARGS if a != "unknown_kwarg"]
    out: list[dict[str, Any]] = []
    while len(out) < n:
        rank, axis = rng.choice(AXES)
        sequence = rng.choice(["TTFN", "FTTFN", "NTTFN"])
        mask = rng.random() < 0.25
        if rng.random() < 0.8:
            arg = rng.choice(args)
            value = rng.choice(fz.pool_for(arg))
            if not jsonable(value):
                continue
            c = _base_case("errors_fuzz", [f"{len(out):03d}", "init", arg], rank, axis)
            if arg == "axis":
                c["init_kwargs"]["axis"] = value
            else:
                c["init_kwargs"][arg] = value
            c["calls"] = _calls(sequence, mask)
            c["dims"] = {"error": "init", "argument": arg}
            if arg == "dtype":
                c["allow_reject"] = True  # a policy TF builds but cannot run: rejecting it at build is allowed
        else:
            value = rng.choice(TRAINING_VALUES)
            c = _base_case("errors_fuzz", [f"{len(out):03d}", "training"], rank, axis)
            calls = _calls(sequence, mask)
            calls[rng.randrange(len(calls))]["training"] = value
            c["calls"] = calls
            c["dims"] = {"error": "training", "argument": "training"}
        if any(isinstance(v, str) and v.lower() in ("randomnormal", "glorot_uniform") for v in c["init_kwargs"].values()) or any(
            k.endswith("_initializer") and v is None for k, v in c["init_kwargs"].items()
        ):
            c["random_initializer"] = True
        out.append(c)
    return out
