"""The training loop: resumption reproduces an uninterrupted run, configurations are checked.

The truth for resumption is the uninterrupted run itself (same seed, same method): a run
stopped and resumed from its checkpoint must give the identical history and parameters.
"""

import builtins
import json

import pytest
import torch
from torch import nn
from torch.distributions import Normal

import tmcgraph as tg
from tmcgraph.infer.fit import MPRWS, MPVI, Method, fit, iteration_seed, load_history
from tmcgraph.infer.qem import QEM, MeanFieldNormal

F64 = torch.float64
X = torch.tensor([0.8, -0.3, 1.9], dtype=F64)


@pytest.fixture(autouse=True)
def _one_thread():
    """Small tensors: one torch thread is faster than two competing ones (conftest restores the count)."""
    torch.set_num_threads(1)


def toy(model_param=False):
    """theta -> z_i -> x_i with mean-field Normal proposals (and optionally a learnable prior loc)."""
    m = tg.Model()
    m.plate("n", size=3)
    if model_param:
        prior = nn.Module()
        prior.loc = nn.Parameter(torch.zeros((), dtype=F64))
        m.latent("theta", lambda p=prior: Normal(p.loc, 1.0))
        m.fns["prior"] = prior
    else:
        m.latent("theta", lambda: Normal(torch.zeros((), dtype=F64), 1.0))
    m.latent("z", lambda theta: Normal(theta, 1.0), plate="n")
    m.observed("x", lambda z: Normal(z, 1.0), plate="n")
    q = tg.Proposal(m)
    q.latent("theta", MeanFieldNormal(()).double())
    q.latent("z", MeanFieldNormal([3]).double(), plate="n")
    return m, q


def est_of(cls=tg.TMC, K=4, **kw):
    m, q = toy(**kw)
    return cls(m, q, K=K, dtype=F64, compile=False)


METHODS = [lambda: MPVI(0.05), lambda: MPRWS(0.05), lambda: QEM(0.2)]


@pytest.mark.parametrize("make", METHODS, ids=["mpvi", "mprws", "qem"])
def test_resume_gives_uninterrupted_history(tmp_path, make):
    full = est_of()
    ref = fit(full, {"x": X}, make(), iterations=20, seed=3, progress=False)
    ck, hist = tmp_path / "run.pt", tmp_path / "run.json"
    part = est_of()
    first = fit(part, {"x": X}, make(), iterations=12, seed=3, progress=False, checkpoint=ck, checkpoint_every=5,
                history=hist)
    assert len(first.history) == 12 and ck.exists()
    resumed = est_of()  # a fresh process: new estimator, parameters from the checkpoint
    res = fit(resumed, {"x": X}, make(), iterations=20, seed=3, progress=False, checkpoint=ck, history=hist)
    assert res.resumed_from == 12
    assert res.objectives == ref.objectives
    for a, b in zip(resumed.proposal.parameters(), full.proposal.parameters()):
        assert torch.equal(a, b)
    saved = load_history(hist)
    assert [h["objective"] for h in saved["history"]] == ref.objectives
    assert saved["config"]["method"]["method"] == make().name
    state = torch.load(ck, weights_only=True)
    assert state["iteration"] == 20


def test_refuses_checkpoint_of_another_configuration(tmp_path):
    ck = tmp_path / "run.pt"
    fit(est_of(), {"x": X}, MPVI(0.05), iterations=3, seed=0, progress=False, checkpoint=ck)
    with pytest.raises(tg.TMCGraphError, match=r"different configuration \(method\.lr: checkpoint 0\.05"):
        fit(est_of(), {"x": X}, MPVI(0.01), iterations=5, seed=0, progress=False, checkpoint=ck)
    with pytest.raises(tg.TMCGraphError, match="K: checkpoint 4, this run 8"):
        fit(est_of(K=8), {"x": X}, MPVI(0.05), iterations=5, seed=0, progress=False, checkpoint=ck)
    with pytest.raises(tg.TMCGraphError, match="seed"):
        fit(est_of(), {"x": X}, MPVI(0.05), iterations=5, seed=1, progress=False, checkpoint=ck)
    with pytest.raises(tg.TMCGraphError, match="method.method"):
        fit(est_of(), {"x": X}, MPRWS(0.05), iterations=5, seed=0, progress=False, checkpoint=ck)
    with pytest.raises(tg.TMCGraphError, match="estimator"):
        fit(est_of(tg.IWAE), {"x": X}, MPVI(0.05), iterations=5, seed=0, progress=False, checkpoint=ck)
    with pytest.raises(tg.TMCGraphError, match="data"):
        fit(est_of(), {"x": X + 1}, MPVI(0.05), iterations=5, seed=0, progress=False, checkpoint=ck)
    with pytest.raises(tg.TMCGraphError, match="holds 3 iterations, more than the 2"):
        fit(est_of(), {"x": X}, MPVI(0.05), iterations=2, seed=0, progress=False, checkpoint=ck)
    bad = tmp_path / "bad.pt"
    torch.save({"something": torch.zeros(1)}, bad)
    with pytest.raises(tg.TMCGraphError, match="not a tmcgraph.infer.fit checkpoint"):
        fit(est_of(), {"x": X}, MPVI(0.05), iterations=2, checkpoint=bad, progress=False)


def test_seeded_and_global_rng_untouched():
    state = torch.get_rng_state()
    a = fit(est_of(), {"x": X}, MPRWS(0.05), iterations=5, seed=7, progress=False).objectives
    b = fit(est_of(), {"x": X}, MPRWS(0.05), iterations=5, seed=7, progress=False).objectives
    c = fit(est_of(), {"x": X}, MPRWS(0.05), iterations=5, seed=8, progress=False).objectives
    assert a == b and a != c
    assert torch.equal(torch.get_rng_state(), state)
    assert iteration_seed(7, 3) != iteration_seed(7, 4) != iteration_seed(8, 3)


def test_model_parameters_are_trained_too():
    est = est_of(model_param=True)
    loc = est.model.fns["prior"].loc
    fit(est, {"x": X}, MPVI(0.1), iterations=30, seed=0, progress=False)
    assert float(loc.detach()) > 0.1  # the data mean is 0.8: the prior's loc moves towards it


@pytest.mark.parametrize("tqdm_available", [True, False])
def test_progress_with_and_without_tqdm(monkeypatch, capsys, tqdm_available):
    if not tqdm_available:
        real = builtins.__import__

        def no_tqdm(name, *a, **k):
            if name.startswith("tqdm"):
                raise ImportError(name)
            return real(name, *a, **k)

        monkeypatch.setattr(builtins, "__import__", no_tqdm)
    res = fit(est_of(), {"x": X}, QEM(0.2), iterations=12, seed=0, progress=True)
    assert len(res.history) == 12
    assert all(h["seconds"] > 0 for h in res.history)
    assert res.history[-1]["elapsed"] == pytest.approx(sum(h["seconds"] for h in res.history))
    json.dumps(res.history)


def test_divergence_and_bad_arguments():
    class Nan(Method):
        name = "nan"

        def step(self, estimator, data, seed):
            return float("nan")

    with pytest.raises(tg.TMCGraphError, match="iteration 0 is nan"):
        fit(est_of(), {"x": X}, Nan(0.1), iterations=3, progress=False)
    with pytest.raises(tg.TMCGraphError, match="method must be"):
        fit(est_of(), {"x": X}, "mpvi", iterations=3)
    with pytest.raises(tg.TMCGraphError, match="iterations must be"):
        fit(est_of(), {"x": X}, MPVI(0.1), iterations=-1)
    with pytest.raises(tg.TMCGraphError, match="lr must be"):
        MPVI(-1.0)
    m = tg.Model()
    m.latent("a", lambda: Normal(0.0, 1.0))
    m.observed("x", lambda a: Normal(a, 1.0))
    q = tg.Proposal(m)
    q.latent("a", lambda: Normal(0.0, 1.0))
    with pytest.raises(tg.TMCGraphError, match="no trainable parameters"):
        fit(tg.TMC(m, q, K=2), {"x": torch.tensor(0.0)}, MPVI(0.1), iterations=1, progress=False)
    assert fit(est_of(), {"x": X}, MPVI(0.1), iterations=0, progress=False).history == []
