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
# runs them all. The deep group of long runs is left out on dask in CI: each training call's
# moving statistics are a graph over every earlier batch (docs/backends.md), so reading the
# weights after each of 60 calls costs about a minute a case; the full run includes it.
STRIDE = {"dask": 40}
EXCLUDE = {"dask": r"^deep_long/"}


def test_conformance(xp, device, backend_name):
    pytest.importorskip("arraybn")
    summary = runner.run(xp=xp, device=device, progress=False, stride=STRIDE.get(backend_name, 1),
                         exclude=EXCLUDE.get(backend_name))
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


def test_deep_groups_are_sensitive():
    """The deep groups' tolerance (a multiple of TF's own error) still rejects wrong implementations."""
    include = r"^deep_(sizes|ranks)/"
    good = runner.run(backend="numpy", include=include, xfails=None, progress=False)
    assert good.outcomes and not good.failures, _fail_message(good)
    for bad in (toy.unbiased_factory, toy.epsilon_factory):
        s = runner.run(backend="numpy", factory=bad, include=include, xfails=None, progress=False)
        supported = [o for o in s.outcomes if o.status != "unsupported"]  # the toy port declares what it lacks
        assert len(supported) >= 10
        assert len(s.failures) >= len(supported) - 2


def test_deep_inputs_are_checksummed(tmp_path):
    """A regenerated input that does not match its stored checksum stops the run."""
    import gzip
    import json
    import shutil

    src = runner.DEFAULT_GOLDENS
    for name in ("manifest.json", "deep_ranks.json.gz", "deep_ranks.npz"):
        shutil.copy(os.path.join(src, name), tmp_path / name)
    man = json.loads((tmp_path / "manifest.json").read_text())
    man["files"] = [f for f in man["files"] if f["chunk"] == "deep_ranks"]
    (tmp_path / "manifest.json").write_text(json.dumps(man))
    with gzip.open(tmp_path / "deep_ranks.json.gz", "rt") as f:
        doc = json.load(f)
    doc["cases"][0]["calls"][0]["x"]["gen"]["seed"] += 1
    with gzip.open(tmp_path / "deep_ranks.json.gz", "wt") as f:
        json.dump(doc, f)
    s = runner.run(backend="numpy", goldens=str(tmp_path), xfails=None, progress=False)
    first = next(o for o in s.outcomes if o.id == doc["cases"][0]["id"])
    assert first.status == "fail" and "checksum" in " ".join(first.problems)


def test_errors_are_checked():
    """Error parity: missing errors and wrong exception types/stages are failures."""
    s = runner.run(backend="numpy", factory=toy.factory,
                   include=r"^errors/(axis_str|epsilon_none|axis_duplicate)$", xfails=None, progress=False)
    by_id = {o.id: o for o in s.outcomes}
    assert by_id["errors/axis_str"].status == "pass"                 # TypeError at init, like TF
    assert by_id["errors/epsilon_none"].status == "fail"             # toy raises nothing
    assert by_id["errors/axis_duplicate"].status == "fail"          # wrong type and stage
