"""docs/large_models.md: its code blocks run in order, and its claims hold."""

import re

import pytest
import torch
from conftest import ROOT

import tmcgraph as tg


def blocks(name):
    text = (ROOT / "docs" / name).read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


@pytest.fixture(scope="module")
def namespaces():
    code = blocks("large_models.md")
    assert len(code) == 5
    out = []
    for block in code:
        ns = dict(out[-1]) if out else {}  # blocks run in order, each seeing the earlier ones' names
        exec(compile(block, "large_models.md", "exec"), ns)
        out.append(ns)
    return out


def test_subsampled_plates_section(namespaces):
    ns = namespaces[0]
    m, est, x, N = ns["m"], ns["est"], ns["x"], ns["N"]
    assert m.plates["data"].subsample and m.plates["data"].index == "data_index"
    assert torch.equal(ns["batch"]["x"], x[ns["batch"]["data_index"]])
    # all N indices: the plain estimator, exactly
    full = est.log_evidence({"x": x}, seed=3)
    given = est.log_evidence(ns["subsample"](m, {"x": x}, {"data": torch.arange(N)}), seed=3)
    assert torch.equal(full, given)
    # training moved the per-element proposal parameters of the elements it saw
    assert float(ns["loc"].detach().abs().max()) > 0
    assert torch.isfinite(ns["loss"].value)


def test_discrete_latents_section(namespaces, capsys):
    ns = namespaces[1]
    est, y = ns["est"], ns["y"]
    with pytest.raises(tg.TMCGraphError, match="'c'"):
        tg.objective(est, {"y": y}, grad="reparam", seed=0)
    assert ns["logits"].grad is not None and ns["slope"].grad is not None
    # the trained proposal puts more mass on the right category than the uniform start (1/3); measured 0.64
    probs = torch.softmax(ns["logits"] + ns["slope"] * y[:, None], -1).detach()
    truth = torch.tensor([0, 1, 2, 1] * 5)
    assert float(probs[torch.arange(20), truth].mean()) > 0.5


def test_markov_plates_section(namespaces):
    ns = namespaces[2]
    A, mu, x, T, S = ns["A"], ns["mu"], ns["x"], ns["T"], ns["S"]
    # the forward algorithm in float64
    e = torch.distributions.Normal(mu.double()[:, None], 1.0).log_prob(x.double()[None, :])
    a = torch.log(torch.full((S,), 1.0 / S, dtype=torch.float64)) + e[:, 0]
    for t in range(1, T):
        a = torch.logsumexp(a[:, None] + torch.log(A.double()), 0) + e[:, t]
    assert abs(float(ns["log_px"]) - float(torch.logsumexp(a, 0))) < 1e-3 * T
    sm = ns["smoothed"]
    assert sm.shape == (S, T) and torch.allclose(sm.sum(0), torch.ones(T, dtype=sm.dtype))
    assert ns["paths"].shape == (100, T)
    assert torch.isfinite(ns["bound"])


def test_crossed_plates_section(namespaces):
    ns = namespaces[3]
    for word in ("users", "items", "q.joint"):
        assert word in ns["crossed_error"]
    assert torch.isfinite(ns["crossed_bound"])


def test_plate_splitting_section(namespaces):
    a, b = namespaces[4]["same"]
    assert torch.allclose(a, b, rtol=1e-5)
