"""Conformance of arraybn against the TensorFlow goldens (conformance/goldens).

* ``test_conformance``: the whole golden set on every backend of the ``xp``
  fixture, run in one test per backend (thousands of cases; failures are
  listed by case id in the assertion message).
* the ``toy`` tests check the runner itself: a correct toy implementation of
  the plain path passes its subset, deliberately wrong ones are rejected, both
  through the Python factory adapter and the external-program adapter.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conformance import runner, toy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAVE_GOLDENS = os.path.exists(os.path.join(runner.DEFAULT_GOLDENS, "manifest.json"))
pytestmark = pytest.mark.skipif(not HAVE_GOLDENS, reason="conformance goldens not present")


def _fail_message(summary):
    return (f"{len(summary.failures)} conformance case(s) fail on {summary.backend} "
            f"(rerun: python -m conformance --backend {summary.backend} --include 'ID'):\n"
            + summary.failure_text(limit=40))


# dask builds a task graph for every operation of every case (about 0.3 s a case on two
# cores): CI runs every 40th case of each group there; `python -m conformance --backend dask`
# runs them all.
STRIDE = {"dask": 40}


def test_conformance(xp, device, backend_name):
    pytest.importorskip("arraybn")
    summary = runner.run(xp=xp, device=device, progress=False, stride=STRIDE.get(backend_name, 1))
    assert summary.outcomes, "no cases ran"
    assert not summary.failures, _fail_message(summary)


# --------------------------------------------------------------------------- #
# The runner rejects wrong implementations
# --------------------------------------------------------------------------- #

def test_toy_correct_passes_its_subset():
    s = runner.run(backend="numpy", factory=toy.factory, include=toy.TOY_CASES, xfails=None, progress=False)
    assert len(s.outcomes) > 50
    assert not s.failures, _fail_message(s)


@pytest.mark.parametrize("bad", [toy.unbiased_factory, toy.epsilon_factory])
def test_toy_wrong_factory_rejected(bad):
    s = runner.run(backend="numpy", factory=bad, include=toy.TOY_CASES, xfails=None, progress=False)
    assert s.exit_code == 1
    failed = {o.id for o in s.failures}
    assert any("output" in p for o in s.failures for p in o.problems)
    if bad is toy.epsilon_factory:
        # an epsilon of 0.25 is visible in every case; tiny ones may hide below the tolerance
        big = {o.id for o in s.outcomes if "/eps=0.25/" in o.id}
        assert big and big <= failed
    else:
        # the unbiased variance changes every training-mode output
        assert len(failed) == len(s.outcomes)


def test_cli_impl_adapter_rejects_wrong_toy(tmp_path):
    cmd = [sys.executable, "-m", "conformance", "--backend", "numpy", "--impl", "conformance.toy:unbiased_factory",
           "--include", toy.TOY_CASES, "--xfails", "", "--no-progress", "--report", str(tmp_path)]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 1, p.stdout + p.stderr
    assert "FAILED" in p.stderr
    assert (tmp_path / "conformance-numpy.md").exists()
    assert (tmp_path / "conformance-numpy.json").exists()


@pytest.mark.parametrize("bug,expected_rc", [(None, 0), ("epsilon", 1)])
def test_cli_exec_adapter(bug, expected_rc):
    prog = f"{sys.executable} -m conformance.toy_exec" + (f" --bug {bug}" if bug else "")
    cmd = [sys.executable, "-m", "conformance", "--backend", "numpy", "--exec", prog,
           "--include", toy.TOY_CASES, "--xfails", "", "--no-progress"]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == expected_rc, p.stdout + p.stderr[-3000:]


def test_errors_are_checked():
    """Error parity: missing errors and wrong exception types/stages are failures."""
    s = runner.run(backend="numpy", factory=toy.factory,
                   include=r"^errors/(axis_str|epsilon_none|axis_duplicate)$", xfails=None, progress=False)
    by_id = {o.id: o for o in s.outcomes}
    assert by_id["errors/axis_str"].status == "pass"                 # TypeError at init, like TF
    assert by_id["errors/epsilon_none"].status == "fail"             # toy raises nothing
    assert by_id["errors/axis_duplicate"].status == "fail"          # wrong type and stage
