"""docs/diagnostics.md: its code blocks run in order, and its claims hold."""

import importlib.util
import math
import re

import pytest
import torch
from conftest import ROOT


def blocks(name):
    text = (ROOT / "docs" / name).read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_diagnostics_page_runs_and_its_claims_hold(capsys):
    code = blocks("diagnostics.md")
    assert len(code) == 4
    ns = {}
    for block in code:
        if "import arviz" in block and importlib.util.find_spec("arviz") is None:
            continue  # the export example needs the optional extra
        exec(compile(block, "diagnostics.md", "exec"), ns)
    out = capsys.readouterr().out
    assert "weight ESS (global, dims ['theta'])" in out
    good, bad = ns["diagnose"](ns["post"]), ns["diagnose"](ns["bad"])
    # the far-off proposal: fewer effective particles for theta, a lower estimate
    assert float(bad.weights["global"].ess) < 0.2 * float(good.weights["global"].ess)
    assert float(bad.log_evidence) < float(good.log_evidence) - 3
    assert float(bad.marginal["theta"]) < 0.2 * float(good.marginal["theta"])
    # one global latent: its weight ESS is its marginal ESS
    assert float(good.weights["global"].ess) == pytest.approx(float(good.marginal["theta"]), rel=1e-5)
    # TMC's global ESS beats IWAE's on the same proposal and K
    assert ns["r_iwae"].dims == ("_joint",) and ns["r_tmc"].dims == ("theta",)
    assert float(ns["r_tmc"].ess) > 5 * float(ns["r_iwae"].ess)
    r_all = ns["r_all"]
    assert r_all.log_combinations == pytest.approx(9 * math.log(64))
    # per data point: one latent per element, so the weight ESS is the marginal ESS; and the sum
    per_point, post2 = ns["per_point"], ns["post2"]
    assert per_point.log_ess.shape == (8,)
    torch.testing.assert_close(per_point.ess, ns["marginal_ess"](post2, "z"), rtol=1e-5, atol=1e-5)
    whole = ns["weight_ess"](post2, "all")
    assert float(whole.log_ess) == pytest.approx(float(per_point.log_ess.sum()), abs=1e-3)
    if "idata" in ns:
        idata = ns["idata"]
        assert idata.posterior["theta"].shape == (4, 500) and idata.posterior["z"].dims[-1] == "data"
        assert ns["loo"]["n_data_points"] == 8
        w = idata.tmc_diagnostics["weight_ess"].values
        assert ((w >= 1) & (w <= 64)).all()


def test_page_names_functions_that_exist():
    """The functions the page documents exist in the module."""
    text = (ROOT / "docs" / "diagnostics.md").read_text()
    from tmcgraph.infer import diagnostics

    for name in ("marginal_ess", "weight_ess", "diagnose"):
        assert f"{name}(" in text and hasattr(diagnostics, name)
