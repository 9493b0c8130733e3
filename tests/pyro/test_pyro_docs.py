"""docs/pyro.md: its code blocks run in order and their claims hold; its tables are the benchmark's figures."""

import json
import math
import re

import pytest

pyro = pytest.importorskip("pyro")

import torch  # noqa: E402
from conftest import ROOT  # noqa: E402

from tmcgraph.models import toys  # noqa: E402

DOC = ROOT / "docs" / "pyro.md"
RESULTS = ROOT / "benchmarks" / "results" / "pyro_bridge.json"


def blocks():
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


@pytest.fixture
def namespace(capsys):
    pyro.clear_param_store()
    ns = {}
    for i, code in enumerate(blocks()):
        exec(compile(code, f"pyro.md[block {i}]", "exec"), ns)
    out = capsys.readouterr().out
    yield ns, out
    pyro.clear_param_store()


def test_code_blocks_run_and_their_claims_hold(namespace):
    ns, out = namespace
    assert len(blocks()) >= 5
    est, x = ns["est"], ns["x"]
    # the bridge and the native declaration: same particles, same value (asserted in the block), near exact
    vals = torch.stack([est.log_evidence(x, seed=s) for s in range(5)])
    assert abs(float(vals.mean()) - float(toys.gaussian_toy_log_evidence(x))) < 0.5
    tr = ns["tr"]
    assert set(tr.model.graph.edges) == {("theta", "z"), ("z", "x")}
    assert tr.proposal["z"].parents == ("theta",) and tr.proposal["z"].coupling == "mixture"
    # SVI lowered the loss and taught the guide to use the data
    losses = ns["losses"]
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10
    assert float(pyro.param("b").detach()) > 0.2
    # posterior queries by site name
    assert ns["draws"]["z"].shape == (100, 4) and ns["post"].marginal("z").shape == (32, 4)
    # the refused program names its sites
    assert "the model failed after site 'theta' (before site 'z')" in out
    # the underflow case
    assert ns["pyro_value"] == float("-inf")
    exact = -104 + 2 * float(torch.distributions.Normal(0.0, 1.0).log_prob(torch.tensor(0.0, dtype=torch.float64)))
    assert float(ns["ours"]) == pytest.approx(exact, abs=1e-3)


def test_tables_are_the_benchmark_figures():
    text = DOC.read_text()
    assert "BIAS_TABLE" not in text and "COST_TABLE" not in text
    if not RESULTS.exists():
        pytest.skip(f"{RESULTS} not found (run python benchmarks/pyro_bridge.py)")
    data = json.loads(RESULTS.read_text())
    assert data["quick"] is False
    for b in data["bias"]:
        for who in ("pyro", "bridge"):
            if who in b:
                assert f"{b[who]['mean_ratio']:.3f} (z = {b[who]['z']:+.1f})" in text, (b["K"], b["coupling"], who)
                if who == "bridge":
                    assert abs(b[who]["z"]) < 4
                else:
                    assert b[who]["z"] > 5
    for row in data["rows"]:
        for k, r in row["results"].items():
            assert f"{r['median_s'] * 1e3:.1f} ms" in text, (row["workload"], k)
            assert f"{row['values'][k]['median_minus_exact']:+.2f}" in text
    assert math.isclose(data["bias_exact"], -2.1349, abs_tol=1e-4)
