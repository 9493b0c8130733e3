"""Sampled discrete latents: pathwise objectives refuse them, the score-function objective is unbiased.

Truth: E_Q[log P_TMC] computed exactly, by enumerating every configuration of the K
particles of a tiny discrete model (and, for a continuous latent, Gauss-Hermite
quadrature over its reparameterisation noise), differentiated by autograd. Replicates
are the elements of a plate with per-element parameters (each element is an independent
copy of the same one-point problem, and its parameters' gradient is that copy's
estimate), so one call gives thousands of independent gradient estimates.
"""

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.distributions import Bernoulli, Categorical, Normal

import tmcgraph as tg
from tmcgraph.infer.objectives import GRADS, OBJECTIVES, ScoreFunction, objective

PI = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
MU = torch.tensor([-1.0, 0.5, 2.0], dtype=torch.float64)
PHI = torch.tensor([0.3, -0.5, 0.1], dtype=torch.float64)
X0 = 1.2


def discrete_replicates(M):
    """M independent copies of: c ~ Cat(pi), x | c ~ N(mu[c], 1), q(c) = Cat(logits=phi)."""
    phi = PHI.repeat(M, 1).requires_grad_()
    mu = MU.repeat(M, 1).requires_grad_()
    m = tg.Model()
    m.plate("data", size=M)
    m.latent("c", lambda: Categorical(probs=PI), plate="data")
    m.observed("x", lambda c: Normal(torch.gather(mu.expand(*c.shape, 3), -1, c[..., None])[..., 0], 1.0),
               plate="data")
    q = tg.Proposal(m)
    q.latent("c", lambda: Categorical(logits=phi), plate="data")
    return m, q, phi, mu, {"x": torch.full((M,), X0, dtype=torch.float64)}


def exact_discrete_gradient(K):
    """grad of E_Q[log P_TMC] w.r.t. (phi, mu) for one point, every particle configuration enumerated."""
    phi, mu = PHI.clone().requires_grad_(), MU.clone().requires_grad_()
    lq = torch.log_softmax(phi, 0)
    logw = torch.log(PI) + Normal(mu, 1.0).log_prob(torch.tensor(X0, dtype=torch.float64)) - lq
    E = 0.0
    for cfg in itertools.product(range(3), repeat=K):
        cfg = list(cfg)
        E = E + torch.exp(lq[cfg].sum()) * (torch.logsumexp(logw[cfg], 0) - math.log(K))
    return torch.autograd.grad(E, (phi, mu))


def per_element(param, M):
    """The per-copy gradient estimates: loss is -mean over copies, so copy e's is -M * grad[e]."""
    g = -M * param.grad
    param.grad = None
    return g


def assert_within(g, exact, n_se=4.0):
    mean, se = g.mean(0), g.std(0) / math.sqrt(g.shape[0])
    z = (mean - exact) / se
    assert bool((z.abs() < n_se).all()), f"mean {mean}, exact {exact}, se {se}, z {z}"
    return se


@pytest.mark.parametrize("K", [2, 3])
@pytest.mark.parametrize("baseline,R", [("loo", 2), ("none", 1)])
def test_score_function_gradient_is_unbiased_for_exact_expectation(f64, K, baseline, R):
    M = 4000
    m, q, phi, mu, data = discrete_replicates(M)
    est = tg.TMC(m, q, K=K)
    objective(est, data, ScoreFunction(num_samples=R, baseline=baseline), seed=K).backward()
    g_phi, g_mu = per_element(phi, M), per_element(mu, M)
    e_phi, e_mu = exact_discrete_gradient(K)
    se = assert_within(g_phi, e_phi)
    assert float(se.max()) < 0.05  # the test has power: the exact gradient is ~0.5
    assert_within(g_mu, e_mu)


def test_forced_reparam_gradient_is_wrong(f64):
    """The power check: the pathwise gradient (what reparam silently gave) misses the exact one by far."""
    M = 4000
    m, q, phi, _, data = discrete_replicates(M)
    est = tg.TMC(m, q, K=2)
    est.log_evidence(data, seed=0, elementwise=True).sum().backward()
    g = phi.grad.clone()
    e_phi, _ = exact_discrete_gradient(2)
    z = (g.mean(0) - e_phi) / (g.std(0) / math.sqrt(M))
    assert float(z.abs().max()) > 20
    assert float((g.mean(0) - e_phi).abs().max()) > 0.3


def test_leave_one_out_baseline_reduces_variance(f64):
    M = 4000
    out = {}
    for baseline, R in [("loo", 2), ("none", 2)]:
        m, q, phi, _, data = discrete_replicates(M)
        objective(tg.TMC(m, q, K=2), data, ScoreFunction(num_samples=R, baseline=baseline), seed=1).backward()
        out[baseline] = per_element(phi, M).var(0).sum()
    assert float(out["loo"]) < 0.7 * float(out["none"])  # measured: 0.52


def gauss_hermite(n):
    x, w = np.polynomial.hermite_e.hermegauss(n)
    return torch.tensor(x), torch.tensor(w / math.sqrt(2 * math.pi))


B_SHIFT = torch.tensor([-1.0, 0.5, 1.5], dtype=torch.float64)
A0, LS0, W0 = 0.4, math.log(0.8), 0.7
V = torch.tensor([1.0, 0.0, -1.0], dtype=torch.float64)  # how z moves the proposal's logits


def mixed_replicates(M):
    """Per copy: m ~ N(0, 1) (reparameterised), c ~ Cat(pi) sampled from q(c | m), x ~ N(m + b[c], 1)."""
    a = torch.full((M,), A0, dtype=torch.float64, requires_grad=True)
    ls = torch.full((M,), LS0, dtype=torch.float64, requires_grad=True)
    phi = PHI.repeat(M, 1).requires_grad_()
    w = torch.full((M,), W0, dtype=torch.float64, requires_grad=True)
    m = tg.Model()
    m.plate("data", size=M)
    m.latent("z", lambda: Normal(torch.tensor(0.0, dtype=torch.float64), 1.0), plate="data")
    m.latent("c", lambda: Categorical(probs=PI), plate="data")
    m.observed("x", lambda z, c: Normal(z + B_SHIFT[c], 1.0), plate="data")
    q = tg.Proposal(m)
    q.latent("z", lambda: Normal(a, ls.exp()), plate="data")
    q.latent("c", lambda z: Categorical(logits=phi + w[:, None] * z[..., None] * V), plate="data", coupling="mixture")
    return m, q, (a, ls, phi, w), {"x": torch.full((M,), X0, dtype=torch.float64)}


def exact_mixed_gradient(K=2, n=40):
    """E over z^1, z^2 (Gauss-Hermite in the noise) and c^1, c^2 (each from the mixture density) of log P_TMC."""
    a, ls = torch.tensor(A0, requires_grad=True), torch.tensor(LS0, requires_grad=True)
    phi, w = PHI.clone().requires_grad_(), torch.tensor(W0, requires_grad=True)
    a, ls, w = a.double(), ls.double(), w.double()
    x, wt = gauss_hermite(n)
    e1, e2 = x[:, None], x[None, :]
    weight = wt[:, None] * wt[None, :]
    z = torch.stack([a + ls.exp() * e1.expand(n, n), a + ls.exp() * e2.expand(n, n)], -1)  # [n, n, K]
    f_z = Normal(0.0, 1.0).log_prob(z) - Normal(a, ls.exp()).log_prob(z) - math.log(K)  # [n, n, K]
    lq_c = torch.log_softmax(phi + w * z[..., None] * V, -1)  # [n, n, K(parent), C]
    log_mix = torch.logsumexp(lq_c, -2) - math.log(K)  # [n, n, C]: density of each c particle
    E = 0.0
    for cfg in itertools.product(range(3), repeat=K):
        cfg = list(cfg)
        f_c = torch.log(PI)[cfg] - log_mix[..., cfg] - math.log(K)  # [n, n, K]
        f_x = Normal(z[..., :, None] + B_SHIFT[cfg], 1.0).log_prob(torch.tensor(X0, dtype=torch.float64))
        logp = torch.logsumexp((f_z[..., :, None] + f_c[..., None, :] + f_x).flatten(-2), -1)
        E = E + (weight * log_mix[..., cfg].sum(-1).exp() * logp).sum()
    return torch.autograd.grad(E, (a, ls, phi, w))


def test_score_function_mixed_with_reparameterised_latent_matches_quadrature(f64):
    M = 4000
    m, q, params, data = mixed_replicates(M)
    objective(tg.TMC(m, q, K=2), data, "score", seed=3).backward()
    exact = exact_mixed_gradient()
    for p, e in zip(params, exact):
        assert_within(per_element(p, M), e)


def test_score_function_with_global_discrete_latent(f64):
    """A global c (scalar reward) over a plate of observations: replicate calls."""
    x = torch.tensor([0.3, 1.9, 1.1], dtype=torch.float64)
    phi = PHI.clone().requires_grad_()
    m = tg.Model()
    m.plate("data", size=3)
    m.latent("c", lambda: Categorical(probs=PI))
    m.observed("x", lambda c: Normal(MU[c], 1.0), plate="data")
    q = tg.Proposal(m)
    q.latent("c", lambda: Categorical(logits=phi))
    est = tg.TMC(m, q, K=2)
    sf = ScoreFunction(num_samples=4)
    gs = []
    for r in range(300):
        objective(est, {"x": x}, sf, seed=r).backward()
        gs.append(phi.grad.clone())
        phi.grad = None
    g = -torch.stack(gs)  # loss = -value for a scalar estimate
    p0 = PHI.clone().requires_grad_()
    lq = torch.log_softmax(p0, 0)
    logw = torch.log(PI) + Normal(MU[:, None], 1.0).log_prob(x).sum(-1) - lq
    E = sum(torch.exp(lq[list(c)].sum()) * (torch.logsumexp(logw[list(c)], 0) - math.log(2))
            for c in itertools.product(range(3), repeat=2))
    exact, = torch.autograd.grad(E, p0)
    se = assert_within(g, exact)
    assert float(se.max()) < 0.1 * float(exact.abs().max())


class Enc(nn.Module):
    def __init__(self):
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(2))

    def forward(self):
        return Categorical(logits=self.logits)


def discrete_model(proposal="module"):
    m = tg.Model()
    m.latent("c", lambda: Categorical(probs=torch.tensor([0.3, 0.7])))
    m.observed("x", lambda c: Normal(2.0 * c, 1.0))
    q = tg.Proposal(m)
    if proposal == "module":
        q.latent("c", Enc())
    elif proposal == "fixed":
        q.latent("c", lambda: Categorical(logits=torch.zeros(2)))
    elif proposal == "enumerate":
        q.enumerate("c")
    return m, q


@pytest.mark.parametrize("grad", ["reparam", "stl", "dregs"])
def test_pathwise_objectives_refuse_sampled_discrete_latent(grad):
    m, q = discrete_model()
    with pytest.raises(tg.TMCGraphError) as e:
        objective(tg.TMC(m, q, K=3), {"x": torch.tensor(1.0)}, grad, seed=0)
    msg = str(e.value)
    for part in ["'c'", "Categorical", "rsample", "grad='score'", "RWS", "q.enumerate('c')"]:
        assert part in msg, part


def test_refusal_names_a_closed_over_parameter_and_an_iwae_estimator():
    logits = torch.zeros(2, requires_grad=True)
    m, q = discrete_model("none")
    q.latent("c", lambda: Categorical(logits=logits))
    with pytest.raises(tg.TMCGraphError, match="'c'"):
        objective(tg.IWAE(m, q, K=3), {"x": torch.tensor(1.0)}, "reparam", seed=0)
    logits.requires_grad_(False)  # a fixed proposal: the pathwise gradient of the model is right
    objective(tg.IWAE(m, q, K=3), {"x": torch.tensor(1.0)}, "reparam", seed=0)


@pytest.mark.parametrize("proposal", ["fixed", "enumerate"])
def test_no_refusal_without_a_gradient_through_the_sampling(proposal):
    m, q = discrete_model(proposal)
    objective(tg.TMC(m, q, K=3), {"x": torch.tensor(1.0)}, "reparam", seed=0)


def test_prior_proposal_with_learned_prior_is_refused():
    logits = nn.Parameter(torch.zeros(2))
    m = tg.Model()
    m.latent("c", lambda: Bernoulli(logits=logits.sum()))
    m.observed("x", lambda c: Normal(c, 1.0))
    q = tg.Proposal(m)
    q.prior("c")
    with pytest.raises(tg.TMCGraphError, match="'c'"):
        objective(tg.TMC(m, q, K=2), {"x": torch.tensor(1.0)}, "reparam", seed=0)
    objective(tg.TMC(m, q, K=2), {"x": torch.tensor(1.0)}, "score", seed=0).backward()
    assert logits.grad is not None


def test_check_runs_once_per_structure():
    calls = []
    logits = torch.zeros(2)

    def fn():
        calls.append(1)
        return Categorical(logits=logits)

    m, q = discrete_model("none")
    q.latent("c", fn)
    est = tg.TMC(m, q, K=3)
    objective(est, {"x": torch.tensor(1.0)}, "reparam", seed=0)
    first = len(calls)
    objective(est, {"x": torch.tensor(1.0)}, "reparam", seed=1)
    assert len(calls) == first + 1  # the second call only draws: the check ran on the first call alone
    logits.requires_grad_(True)  # not a registered parameter: no new check, yet...
    m2, q2 = discrete_model()  # ...a registered one that starts to require grad is seen
    est2 = tg.TMC(m2, q2, K=3)
    q2.fns["c"].logits.requires_grad_(False)
    objective(est2, {"x": torch.tensor(1.0)}, "reparam", seed=0)
    q2.fns["c"].logits.requires_grad_(True)
    with pytest.raises(tg.TMCGraphError):
        objective(est2, {"x": torch.tensor(1.0)}, "reparam", seed=0)


def test_score_refuses_permutation_coupling_from_latent_parents():
    M = 3
    m, q, _, data = mixed_replicates(M)
    q2 = tg.Proposal(m)
    q2.latent("z", q["z"].fn, plate="data")
    q2.latent("c", q["c"].fn, plate="data", coupling="permutation")
    with pytest.raises(tg.TMCGraphError, match="coupling='mixture'"):
        objective(tg.TMC(m, q2, K=2), data, "score", seed=0)


def test_score_value_and_loss_value():
    m, q = discrete_model()
    est = tg.TMC(m, q, K=3)
    x = {"x": torch.tensor(1.0)}
    o = objective(est, x, ScoreFunction(num_samples=3), seed=5)
    g = torch.Generator()
    g.manual_seed(5)
    vals = torch.stack([est.log_evidence(x, seed=g) for _ in range(3)])
    assert torch.allclose(o.value, vals.mean(), atol=1e-6)
    assert float(o.loss.detach()) == pytest.approx(-float(o.value.detach()), abs=1e-6)
    assert OBJECTIVES["score"] is ScoreFunction and "score" not in GRADS


def test_score_function_ema_baseline_runs_and_keeps_state():
    m, q = discrete_model()
    est = tg.TMC(m, q, K=3)
    sf = ScoreFunction(num_samples=1, baseline="ema", decay=0.5)
    for s in range(3):
        objective(est, {"x": torch.tensor(1.0)}, sf, seed=s).backward()
    assert sf._average is not None and torch.isfinite(sf._average)


@pytest.mark.parametrize("kwargs,match", [
    ({"num_samples": 0}, "num_samples"),
    ({"num_samples": 1}, "leave-one-out"),
    ({"baseline": "mean"}, "baseline"),
    ({"baseline": "ema", "decay": 1.0}, "decay"),
])
def test_score_function_arguments(kwargs, match):
    with pytest.raises(tg.TMCGraphError, match=match):
        ScoreFunction(**kwargs)
