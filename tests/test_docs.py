"""The tutorial's code blocks run in order, and its claims hold."""

import re

import pytest
import torch
from conftest import ROOT

import tmcgraph as tg
from tmcgraph.models import toys


def blocks(name):
    text = (ROOT / "docs" / name).read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_tutorial_runs_and_its_claims_hold(capsys):
    ns = {}
    for code in blocks("tutorial.md"):
        exec(compile(code, "tutorial.md", "exec"), ns)
    assert list(ns["m"].graph.edges) == [("mu", "b"), ("b", "y")]
    # the trained proposal's TMC estimate is close to the exact evidence
    torch.manual_seed(0)
    est = ns["est"]
    vals = torch.stack([est.log_evidence({"y": ns["y"]}, seed=s).detach() for s in range(5)])
    assert float(vals.mean()) == pytest.approx(float(ns["exact"]), abs=1.0)
    tiny = ns["tiny"]
    bf = tg.brute_force(tiny.graph)
    assert float(tiny.log_evidence.detach()) == pytest.approx(float(bf.detach()), rel=1e-5)
    r = ns["r"]
    fb = next(f for f in r.factors if f.name == "b")
    assert fb.sample_dims == ("b", "mu") and tuple(fb.tensor.shape) == (32, 32, ns["G"])


def test_readme_example_runs(capsys):
    text = (ROOT / "README.md").read_text()
    code = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert code
    ns = {}
    exec(compile(code[0], "README.md", "exec"), ns)
    est, x = ns["est"], ns["x"]
    v = float(est.log_evidence({"x": x}, seed=0))
    exact = float(toys.gaussian_toy_log_evidence(x))
    assert exact - 10 < v < exact + 3


def test_readme_quick_start_matches_ci():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python -m pytest -q" in readme and "python -m pytest -q" in ci
    assert "torch==2.13.0" in ci and 'pip install --quiet -e ".[dev]"' in ci
