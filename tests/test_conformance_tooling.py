"""The conformance runner as a port author uses it: outcomes, expected-failure files, capability
declarations, a crashing external program, --list --json, behaviour tags and the report.

Small and fast: every run here is a few dozen cases of the toy ports (conformance/toy.py,
conformance/toy_exec.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conformance import cases, runner, toy
from conformance.report import _rates, likely_causes, write_report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAVE_GOLDENS = os.path.exists(os.path.join(runner.DEFAULT_GOLDENS, "manifest.json"))
pytestmark = pytest.mark.skipif(not HAVE_GOLDENS, reason="conformance goldens not present")

#: plain path and renorm cases of one layout: the toy passes the first, raises NotImplementedError on the second
SUBSET = r"^core/r2/ax=-1/fused=None/renorm=(off|on)/mode=plain/"


def _run(**kw):
    kw.setdefault("xfails", None)
    kw.setdefault("progress", False)
    return runner.run(backend="numpy", include=kw.pop("include", SUBSET), **kw)


def _cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "conformance", *args], cwd=ROOT, capture_output=True, text=True,
                          **kw)


# --------------------------------------------------------------------------- #
# Outcomes
# --------------------------------------------------------------------------- #

def test_not_implemented_is_unsupported_and_counted_per_feature():
    s = _run(factory=toy.factory)
    c = s.counts()
    renorm = [o for o in s.outcomes if "/renorm=on/" in o.id]
    assert renorm and all(o.status == "unsupported" and o.feature == "renorm" for o in renorm)
    assert c["unsupported"] == len(renorm) and c["fail"] == 0 and c["pass"] == len(s.outcomes) - len(renorm)
    assert s.unsupported_by_feature() == [("renorm", len(renorm))]
    assert s.exit_code == 0
    # one summary line; its counts add up to the number of cases
    line = s.summary_line()
    nums = [int(part.rsplit(" ", 1)[1]) for part in line.split(" -- ")[1].split(", ")]
    assert sum(nums) == len(s.outcomes)
    assert f"unsupported {len(renorm)}" in line


def test_declared_capabilities_skip_running():
    calls = []

    def factory(kwargs):
        calls.append(kwargs)
        return toy.ToyBatchNormalization(**kwargs)

    factory.unsupported = {"mask": "the toy port takes no mask"}
    s = _run(factory=factory, include=r"^core/r2/ax=-1/fused=None/renorm=off/mode=plain/")
    masked = [o for o in s.outcomes if "/mask=True/" in o.id]
    assert masked and all(o.status == "unsupported" and o.feature == "mask" for o in masked)
    assert len(calls) == len(s.outcomes) - len(masked)  # declared cases never reach the factory


def test_capability_file(tmp_path):
    f = tmp_path / "caps.toml"
    f.write_text('[unsupported]\n"renorm" = "no renorm"\n"mask" = "no masks"\n')
    assert runner.load_capabilities(str(f)) == {"renorm": "no renorm", "mask": "no masks"}
    with pytest.raises(runner.XFailFileError, match="not found"):
        runner.load_capabilities(str(tmp_path / "nope.json"))


def test_api_checks_are_a_category_of_their_own():
    def factory(kwargs):
        layer = toy.ToyBatchNormalization(**kwargs)
        layer.get_config = lambda: {"axis": -1}
        return layer

    s = _run(factory=factory, include=r"^core/r2/ax=-1/fused=None/renorm=off/mode=plain/mask=False/")
    assert {o.status for o in s.outcomes} == {"api_fail"}
    assert all(o.api_problems and not o.problems for o in s.outcomes)
    assert s.exit_code == 1
    s = _run(factory=factory, include=r"^core/r2/ax=-1/fused=None/renorm=off/mode=plain/mask=False/",
             numerics_only=True)
    assert {o.status for o in s.outcomes} == {"pass"}


# --------------------------------------------------------------------------- #
# Expected failures
# --------------------------------------------------------------------------- #

def test_xfail_lines_keep_regex_alternatives(tmp_path):
    f = tmp_path / "xf.txt"
    f.write_text("# comment\n\nrenorm=(on|clip) | no renorm | yet\n^errors/\nbehaviour:mask | masks later\n")
    xs = runner.load_xfails(str(f))
    assert [x.pattern.pattern if x.pattern else None for x in xs] == ["renorm=(on|clip)", "^errors/", None]
    assert xs[0].reason == "no renorm | yet" and xs[1].reason == "no reason given"
    assert xs[2].behaviour == "mask"
    assert xs[0].matches("core/r2/renorm=clip/x", []) and not xs[0].matches("core/r2/renorm=off/x", [])
    assert xs[2].matches("anything", ["mask", "path:nonfused"]) and not xs[2].matches("anything", ["path:fused"])


def test_xfail_json_and_toml(tmp_path):
    j = tmp_path / "xf.json"
    j.write_text(json.dumps({"xfail": [{"pattern": "a | b", "reason": "spaces and bars"},
                                       {"behaviour": "epsilon:0", "reason": "eps"}]}))
    xs = runner.load_xfails(str(j))
    assert xs[0].pattern.pattern == "a | b" and xs[1].behaviour == "epsilon:0"
    t = tmp_path / "xf.toml"
    t.write_text("[[xfail]]\npattern = 'renorm=(on|clip)'\nreason = 'r'\n[[xfail]]\nbehaviour = 'mask'\n")
    xs = runner.load_xfails(str(t))
    assert xs[0].pattern.pattern == "renorm=(on|clip)" and xs[1].behaviour == "mask"


def test_xfail_errors(tmp_path):
    with pytest.raises(runner.XFailFileError, match="not found"):
        runner.load_xfails(str(tmp_path / "missing.txt"))
    bad = tmp_path / "bad.txt"
    bad.write_text("ok/regex\nrenorm=(on | why\n")
    with pytest.raises(runner.XFailFileError, match=r"bad\.txt:2: bad regex"):
        runner.load_xfails(str(bad))
    p = _cli("--impl", "conformance.toy:factory", "--xfails", str(tmp_path / "missing.txt"), "--no-progress")
    assert p.returncode == 2 and "not found" in p.stderr and "Traceback" not in p.stderr


def test_xfail_outcomes_and_heatmap_rate(tmp_path):
    f = tmp_path / "xf.txt"
    f.write_text("/eps=0\\.25/ | the toy ignores epsilon\n")
    s = _run(factory=toy.epsilon_factory, include=toy.TOY_CASES, xfails=str(f))
    xf = [o for o in s.outcomes if o.status == "xfail"]
    assert xf and all("/eps=0.25/" in o.id and o.xfail_reason == "the toy ignores epsilon" for o in xf)
    # an expected failure is not a pass in the heat map; unsupported cases are apart too
    p, u, x = _rates({"pass": 2, "xfail": 1, "unsupported": 1})
    assert (p, u, x) == (0.5, 0.25, 0.25)
    data = write_report(s, str(tmp_path / "rep"))
    assert data["expected_failures_by_reason"] == {"the toy ignores epsilon": len(xf)}


# --------------------------------------------------------------------------- #
# External programs
# --------------------------------------------------------------------------- #

def test_exec_crash_is_one_failed_case_and_the_run_goes_on(tmp_path):
    crash = "core/r2/ax=-1/fused=None/renorm=off/mode=plain/mask=False/trainable=True/mom=0.99"
    prog = f"{sys.executable} -m conformance.toy_exec --crash-on ^{crash}"
    s = runner.run(exec_cmd=prog, include=r"^core/r2/ax=-1/fused=None/renorm=off/mode=plain/", xfails=None,
                   progress=False, exec_batch=8, report_dir=str(tmp_path))
    failed = [o for o in s.outcomes if o.status == "fail"]
    assert [o.id.startswith(crash) for o in failed] == [True]
    assert "external program failed on this case alone: exit status 3" in failed[0].problems[0]
    assert s.count("pass") == len(s.outcomes) - 1
    assert (tmp_path / "conformance-exec.md").exists()


def test_exec_needs_no_array_library():
    # bfloat16 cases are skipped on NumPy in-process, but an external program gets them (as uint16 bits)
    s = runner.run(exec_cmd=f"{sys.executable} -m conformance.toy_exec", include=r"^bfloat16/.*/r2/", xfails=None,
                   progress=False)
    assert s.backend == "exec" and s.outcomes
    assert s.count("skip") == 0
    assert {o.status for o in s.outcomes} == {"unsupported"}  # the toy has no dtype policies


# --------------------------------------------------------------------------- #
# --list
# --------------------------------------------------------------------------- #

def test_list_json():
    p = _cli("--list", "--json", "--include", "^errors/axis_")
    assert p.returncode == 0, p.stderr
    rows = [json.loads(line) for line in p.stdout.splitlines()]
    assert rows and all(r["id"].startswith("errors/axis_") and r["status"] in ("ok", "error") for r in rows)
    assert "error:TypeError@init" in next(r for r in rows if r["id"] == "errors/axis_str")["behaviours"]
    p = _cli("--list", "--include", "^regularizers/")
    assert all(len(line.split("\t")) == 2 for line in p.stdout.splitlines())  # ids may hold spaces


def test_list_into_head_is_quiet():
    p = subprocess.run(f"{sys.executable} -m conformance --list | head -1", shell=True, cwd=ROOT,
                       capture_output=True, text=True)
    assert len(p.stdout.splitlines()) == 1
    assert "Traceback" not in p.stderr and "BrokenPipe" not in p.stderr


# --------------------------------------------------------------------------- #
# Behaviour tags and the report
# --------------------------------------------------------------------------- #

def test_effective_fused_matches_tf():
    n = 0
    for _, case in runner.iter_cases(stride=3):
        tf_fused = (case.get("resolved") or {}).get("fused")
        mine = cases.effective_fused(case)
        if tf_fused is not None and mine is not None:
            assert mine == bool(tf_fused), case["id"]  # TF keeps fused as given (0, ''): its truth is the path
            n += 1
    assert n > 2000


def test_behaviours_of_a_case():
    c = {"id": "small_batch/x", "init_kwargs": {"axis": -1, "momentum": 0.5, "fused": True},
         "input_shape": [1, 1, 1, 3], "input_dtype": "float32",
         "calls": [{"training": True, "mask": None}, {"training": None, "mask": None}], "weights": "random"}
    t = cases.behaviours(c)
    assert {"path:fused", "moving_variance:bessel", "reduction:1", "training:none", "weights:set"} <= set(t)
    c["init_kwargs"].update(renorm=True, dtype="float64", momentum=0.99, trainable=False)
    t = cases.behaviours(c)
    assert {"path:nonfused", "fused_fallback", "renorm", "policy:float64", "frozen"} <= set(t)
    assert "moving_variance:biased" not in t  # a frozen layer updates nothing
    assert set(t) <= set(cases.BEHAVIOURS)


def test_report_names_the_behaviour_a_port_gets_wrong(tmp_path):
    # a port that updates the moving variance with the unbiased variance, like torch
    def factory(kwargs):
        layer = toy.ToyBatchNormalization(**kwargs)
        call = layer.__call__

        def bessel(x, training=None, mask=None):
            mv = layer._w["moving_variance"].copy() if layer._w else None
            y = call(x, training=training, mask=mask)
            if training and layer.trainable and mask is None:
                n = x.shape[0]
                f = 1 - layer.momentum
                # replace the biased update by the unbiased one
                batch_var = (layer._w["moving_variance"] - (1 - f) * mv) / f if f else None
                if batch_var is not None:
                    layer._w["moving_variance"][...] = (1 - f) * mv + f * batch_var * n / (n - 1)
            return y

        layer.__class__ = type("Bessel", (toy.ToyBatchNormalization,), {"__call__": lambda self, *a, **k: bessel(*a, **k)})
        return layer

    s = _run(factory=factory, include=r"^core/r2/ax=-1/fused=None/renorm=off/mode=plain/mask=False/")
    causes, _ = likely_causes(s.outcomes)
    assert s.failures and causes and causes[0][0] == "moving_variance:biased"
    write_report(s, str(tmp_path))
    md = (tmp_path / "conformance-numpy.md").read_text()
    assert md.index("## Which TF behaviours this port gets wrong") < md.index("## By failure kind")
    assert "`moving_variance:biased`" in md


# --------------------------------------------------------------------------- #
# The framework adapters (each where its framework is installed; every 40th case)
# --------------------------------------------------------------------------- #

from conformance.adapters import ADAPTERS  # noqa: E402
from conformance.matrix import PACKAGES  # noqa: E402


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_adapter_runs(name):
    import importlib.util

    missing = [m for m in PACKAGES[name] if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"{name} needs {missing}")
    s = runner.run(backend="numpy", impl=ADAPTERS[name], xfails=None, progress=False, stride=40, numerics_only=True)
    assert len(s.outcomes) > 150
    # the adapter maps every case it accepts; nothing breaks the runner's surface
    assert not [o.id for o in s.outcomes if any(" at runner" in p or " at resolve" in p for p in o.problems)]
    assert s.count("pass") > 0 and s.count("unsupported") > 0


def test_torch_adapter_finds_torchs_deviations():
    pytest.importorskip("torch")
    s = runner.run(backend="numpy", impl=ADAPTERS["torch.nn.functional.batch_norm"], xfails=None, progress=False,
                   include=r"^(core/r2/ax=-1/fused=None/renorm=(off|on)/mode=plain|small_batch/|edges/)",
                   numerics_only=True)
    feats = dict(s.unsupported_by_feature())
    assert feats.get("renorm", 0) > 0
    # torch's three deviations: the running variance always Bessel-corrected, epsilon=0 refused in
    # training, one value per channel refused in training
    causes = [c[0] for c in likely_causes(s.outcomes)[0]]
    assert causes == ["moving_variance:biased", "epsilon:0", "reduction:1"]


# --------------------------------------------------------------------------- #
# Gradient goldens through the public layer protocol
# --------------------------------------------------------------------------- #

def test_gradient_goldens_through_the_public_protocol():
    from conformance import gradients

    r = gradients.check_port(runner.load_factory(None))
    assert r["ran"] > 300 and not r["failures"] and not r["unsupported"], r["failures"]
    r = gradients.check_port(toy.factory)  # the toy has no forward/backward pair
    assert r["ran"] > 300 and len(r["unsupported"]) + len(r["failures"]) == r["ran"]


def test_gradient_goldens_through_an_external_program():
    from conformance import gradients

    r = gradients.check_exec(f"{sys.executable} -m conformance.grad_exec")
    assert r["ran"] > 300 and not r["failures"] and not r["unsupported"], list(r["failures"].items())[:3]
    r = gradients.check_exec("false", batch=500)  # a program that always crashes: every case fails, no abort
    assert len(r["failures"]) == r["ran"]
    assert all("external program failed on this case alone: exit status 1" in p[0] for p in r["failures"].values())
