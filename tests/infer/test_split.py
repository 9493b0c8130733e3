"""Plate splitting (``split={plate: chunk}``) against brute force on the same particles.

Truth: :func:`tmcgraph.ops.brute_force` (every index combination enumerated) of the
factor graph at the particles the split estimator drew; gradients likewise. On a
larger model (beyond brute force) the split value and gradients equal the unsplit
contraction of the same particles to float rounding, for chunks that do and do not
divide the plate.
"""

import pytest
import torch
from torch.distributions import Normal

import tmcgraph as tg
from tmcgraph.errors import TMCGraphError

D = torch.float64


def model(N, J=2, scale=None):
    scale = scale if scale is not None else torch.tensor(1.0, dtype=D, requires_grad=True)
    m = tg.Model()
    m.plate("data", size=N)
    m.plate("obs", size=J)
    m.latent("a", lambda: Normal(0.0, 1.0))
    m.latent("z", lambda a: Normal(a, scale), plate="data")
    m.observed("x", lambda z: Normal(z, 0.5), plate=("data", "obs"))
    q = tg.Proposal(m)
    q.latent("a", lambda: Normal(0.1, 1.3))
    q.latent("z", lambda a, x: Normal(0.5 * a + 0.3 * x.mean(-1), 1.1), plate="data", coupling="mixture")
    return m, q, scale


@pytest.mark.parametrize("chunk", [1, 2, 3])
def test_split_value_and_gradient_equal_brute_force(chunk):
    N, K = 3, 2
    m, q, scale = model(N)
    x = torch.randn(N, 2, generator=torch.Generator().manual_seed(0), dtype=D)
    est = tg.TMC(m, q, K=K, dtype=D, split={"data": chunk})
    ev = est.run({"x": x}, seed=1)
    s = ev.samples.detached()
    got = est.log_evidence(samples=s)
    want = tg.brute_force(est.factor_graph(s))
    assert torch.allclose(got, want, rtol=1e-12)
    g1 = torch.autograd.grad(est.log_evidence(samples=s), scale)[0]
    g2 = torch.autograd.grad(tg.brute_force(est.factor_graph(s)), scale)[0]
    assert torch.allclose(g1, g2, rtol=1e-10)


@pytest.mark.parametrize("chunk", [7, 50, 200, 1000])
def test_split_equals_the_unsplit_contraction_on_the_same_particles(chunk):
    N, K = 200, 8
    m, q, scale = model(N)
    x = torch.randn(N, 2, generator=torch.Generator().manual_seed(0), dtype=D)
    whole = tg.TMC(m, q, K=K, dtype=D)
    s = whole.run({"x": x}, seed=3).samples
    split = tg.TMC(m, q, K=K, dtype=D, split={"data": chunk})
    for _ in range(3):  # first call, then the program's calls
        a = whole.log_evidence(samples=s)
        b = split.log_evidence(samples=s)
        assert torch.allclose(a, b, rtol=1e-12)
    ga = torch.autograd.grad(whole.log_evidence(samples=s), scale, retain_graph=True)[0]
    gb = torch.autograd.grad(split.log_evidence(samples=s), scale, retain_graph=True)[0]
    assert torch.allclose(ga, gb, rtol=1e-10)


def test_split_training_objective_matches_unsplit_gradients():
    N, K = 40, 4
    m, q, scale = model(N)
    x = torch.randn(N, 2, generator=torch.Generator().manual_seed(0), dtype=D)
    grads = []
    for split in (None, {"data": 6}):
        est = tg.TMC(m, q, K=K, dtype=D, split=split)
        v = est.log_evidence({"x": x}, seed=5)
        grads.append(torch.autograd.grad(v, scale)[0])
    assert torch.allclose(grads[0], grads[1], rtol=1e-10)


def test_split_errors_name_the_plate():
    m, q, _ = model(4)
    with pytest.raises(TMCGraphError, match="unknown plate 'nope'"):
        tg.TMC(m, q, split={"nope": 2})
    with pytest.raises(TMCGraphError, match="positive integer"):
        tg.TMC(m, q, split={"data": 0})
    with pytest.raises(TMCGraphError, match="one plate"):
        tg.TMC(m, q, split={"data": 2, "obs": 1})
    mm = tg.Model()
    mm.plate("time", size=3, markov=True)
    mm.latent("z", lambda z_prev: Normal(z_prev, 1.0), plate="time", init=lambda: Normal(0.0, 1.0))
    qq = tg.Proposal(mm)
    qq.prior("z")
    with pytest.raises(TMCGraphError, match="Markov plate 'time'"):
        tg.TMC(mm, qq, split={"time": 2})
