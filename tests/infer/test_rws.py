"""Reweighted wake-sleep (tmcgraph.rws) against brute-force weighted formulas.

The brute force here recomputes every density in closed form from the particles (not
from the library's factors), enumerates all K^n index combinations with plates
unrolled, and forms the RWS gradients as explicit weighted sums.
"""

import itertools
import math

import pytest
import torch
from torch import nn
from torch.distributions import Categorical, Normal

import tmcgraph as tg
from tmcgraph.infer.rws import RWS, proposal_log_density

# ----------------------------------------------------------------------------------------
# proposal_log_density re-evaluates the density each particle was drawn from.


def _chain_model():
    m = tg.Model()
    m.plate("data", size=3)
    m.latent("a", lambda: Normal(0.0, 1.0))
    m.latent("b", lambda a: Normal(a, 1.0), plate="data")
    m.latent("c", lambda a, b: Normal(a + b, 1.0), plate="data")
    m.observed("x", lambda c: Normal(c, 1.0), plate="data")
    return m


def _proposals(m):
    loc = nn.Linear(1, 1)
    yield "factorised", {}, lambda q: (q.latent("a", lambda: Normal(0.1, 1.3)),
                                        q.latent("b", lambda: Normal(0.0, 1.4), plate="data"),
                                        q.latent("c", lambda: Normal(0.0, 1.5), plate="data"))
    yield "amortised+mixture", {}, lambda q: (
        q.latent("a", lambda: Normal(0.1, 1.3)),
        q.latent("b", lambda a, x: Normal(a + 0.3 * x, 1.1), plate="data", coupling="mixture", K=4),
        q.latent("c", lambda a, b: Normal(0.5 * a + b, 1.2), plate="data", coupling="mixture"))
    yield "paired+prior", {}, lambda q: (
        q.latent("a", lambda: Normal(loc(torch.ones(1)).squeeze(-1), 1.3)),
        q.latent("b", lambda a: Normal(a, 1.1), plate="data", coupling="paired"),
        q.prior("c", coupling="mixture"))


# IWAE shares one K, so the proposal that sets K=4 for b is TMC only.
@pytest.mark.parametrize("method,which", [("tmc", 0), ("tmc", 1), ("tmc", 2), ("iwae", 0), ("iwae", 2)])
def test_proposal_log_density_equals_sampling_density(f64, method, which):
    m = _chain_model()
    name, _, declare = list(_proposals(m))[which]
    q = tg.Proposal(m)
    declare(q)
    cls = {"tmc": tg.TMC, "iwae": tg.IWAE}[method]
    est = cls(m, q, K=3)
    s = est.sample({"x": torch.tensor([0.5, -1.0, 2.0])}, seed=0)
    lq = proposal_log_density(est, s, latents=list(s.values))
    for n in s.values:
        torch.testing.assert_close(lq[n], s.log_q[n].detach())
    default = proposal_log_density(est, s)
    assert ("c" in default) == (which != 2)  # prior proposals have no wake-phi term


# ----------------------------------------------------------------------------------------
# Gradients against the brute-force weighted formulas.


class TinyProposal(nn.Module):
    """Parameters of q(c) = Cat(softmax(logits)) and q(z | c) = N(loc[c], exp(log_sd))."""

    def __init__(self):
        super().__init__()
        self.logits = nn.Parameter(torch.tensor([0.2, -0.1, 0.3]))
        self.loc = nn.Parameter(torch.tensor([-0.5, 0.4, 1.1]))
        self.log_sd = nn.Parameter(torch.tensor(0.2))


def _tiny(method, coupling="mixture"):
    """Global discrete c (sampled, 3 values), plated z | c, observed x | z."""
    theta_logits = nn.Parameter(torch.tensor([0.1, 0.5, -0.2]))
    theta_shift = nn.Parameter(torch.tensor(0.3))
    P = TinyProposal()
    m = tg.Model()
    m.plate("data", size=2)
    m.latent("c", lambda: Categorical(logits=theta_logits))
    m.latent("z", lambda c: Normal(c.to(theta_shift.dtype) + theta_shift, 1.0), plate="data")
    m.observed("x", lambda z: Normal(z, 1.0), plate="data")
    q = tg.Proposal(m)
    q.latent("c", lambda: Categorical(logits=P.logits))
    q.latent("z", lambda c: Normal(P.loc[c], P.log_sd.exp()), plate="data", coupling=coupling)
    cls = {"tmc": tg.TMC, "iwae": tg.IWAE}[method]
    return cls(m, q, K=3), (theta_logits, theta_shift), P, {"x": torch.tensor([0.8, 2.1])}


def _brute_rws(method, s, theta, P, x, coupling):
    """Closed-form log weights of every combination, and the two RWS gradients."""
    theta_logits, theta_shift = theta
    c = s.values["c"].detach()  # [K]
    z = s.values["z"].detach()  # [K, 2]
    K = c.shape[0]
    sd = P.log_sd.exp()
    log_qc = torch.log_softmax(P.logits, 0)[c]  # [K]
    if method == "tmc" and coupling == "mixture":
        # Mixture over every particle of c: (1/K) sum_l N(z; loc[c^l], sd).
        lqz = torch.logsumexp(Normal(P.loc[c][None, None, :], sd).log_prob(z[:, :, None]), -1) - math.log(K)
    else:
        lqz = Normal(P.loc[c][:, None], sd).log_prob(z)  # paired (IWAE: joint samples)
    log_pc = torch.log_softmax(theta_logits, 0)[c]
    rows = []
    if method == "tmc":
        combos = itertools.product(range(K), range(K), range(K))  # (k_c, k_z at element 0, k_z at element 1)
    else:
        combos = ((k, k, k) for k in range(K))
    logw, logq, logp = [], [], []
    for kc, k0, k1 in combos:
        lp = log_pc[kc]
        lq = log_qc[kc]
        for e, kz in enumerate((k0, k1)):
            lp = lp + Normal(c[kc].to(z.dtype) + theta_shift, 1.0).log_prob(z[kz, e])
            lp = lp + Normal(z[kz, e], 1.0).log_prob(x[e])
            lq = lq + lqz[kz, e]
        rows.append((kc, k0, k1))
        logp.append(lp)
        logq.append(lq)
        logw.append(lp.detach() - lq.detach())
    logw = torch.stack(logw)
    n_avg = K ** 3 if method == "tmc" else K
    log_ptmc = torch.logsumexp(torch.stack(logp) - torch.stack(logq).detach(), 0) - math.log(n_avg)
    wbar = torch.softmax(logw, 0)
    wake_phi = (wbar * torch.stack(logq)).sum()
    return log_ptmc, wake_phi


@pytest.mark.parametrize("method,coupling", [("tmc", "mixture"), ("tmc", "paired"), ("iwae", "paired")])
def test_gradients_equal_brute_force(f64, method, coupling):
    est, theta, P, data = _tiny(method, coupling)
    r = RWS(est)(data, seed=3)
    s = r.samples
    log_ptmc, wake_phi = _brute_rws(method, s, theta, P, data["x"], coupling)
    torch.testing.assert_close(r.log_evidence, log_ptmc.detach())
    torch.testing.assert_close(-r.proposal_loss, wake_phi)
    phis = list(P.parameters())
    g_rws = torch.autograd.grad(r.proposal_loss, phis, retain_graph=True)
    g_bf = torch.autograd.grad(-wake_phi, phis)
    for a, b in zip(g_rws, g_bf):
        torch.testing.assert_close(a, b)
    g_rws = torch.autograd.grad(r.model_loss, theta, retain_graph=True)
    g_bf = torch.autograd.grad(-log_ptmc, theta)
    for a, b in zip(g_rws, g_bf):
        torch.testing.assert_close(a, b)
    # The parts do not leak into each other's parameters.
    assert all(g is None for g in torch.autograd.grad(r.model_loss, phis, allow_unused=True, retain_graph=True))
    assert all(g is None for g in torch.autograd.grad(r.proposal_loss, theta, allow_unused=True, retain_graph=True))
    # The combined loss carries both.
    total = torch.autograd.grad(r.loss, list(theta) + phis)
    assert all(g is not None and torch.isfinite(g).all() for g in total)


# ----------------------------------------------------------------------------------------
# Training a mixture model with a sampled discrete assignment.


class Assign(nn.Module):
    """Amortised q(c_i | x_i) = Cat(softmax(a x_i + b))."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.zeros(2))
        self.b = nn.Parameter(torch.zeros(2))

    def forward(self, x):
        return Categorical(logits=x[..., None] * self.a + self.b)


def test_rws_trains_discrete_sampled_latent(f64):
    g = torch.Generator().manual_seed(0)
    N = 30
    c_true = torch.randint(2, (N,), generator=g)
    x = torch.tensor([-2.0, 2.0])[c_true] + torch.randn(N, generator=g)
    mu = nn.Parameter(torch.tensor([-0.5, 0.3]))
    m = tg.Model()
    m.plate("data")
    m.latent("c", lambda: Categorical(logits=torch.zeros(2)), plate="data")
    m.observed("x", lambda c: Normal(mu[c], 1.0), plate="data")
    q = tg.Proposal(m)
    q.latent("c", Assign(), plate="data")  # sampled, not enumerated
    est = tg.TMC(m, q, K=3)

    def exact():  # log p(x) by summing out every c_i
        with torch.no_grad():
            return torch.logsumexp(math.log(0.5) + Normal(mu, 1.0).log_prob(x[:, None]), 1).sum().item()

    def bound():  # mean TMC estimate over fixed seeds
        with torch.no_grad():
            return sum(est.log_evidence({"x": x}, seed=1000 + i).item() for i in range(10)) / 10

    exact0, bound0 = exact(), bound()
    rws = RWS(est)
    opt = torch.optim.Adam([mu] + list(q.parameters()), lr=0.05)
    for step in range(120):
        opt.zero_grad()
        rws({"x": x}, seed=step).loss.backward()
        opt.step()
    exact1, bound1 = exact(), bound()
    assert bound1 > bound0 + 20, (bound0, bound1)
    assert exact1 > exact0 + 20, (exact0, exact1)
    # The proposal learned the assignments: the bound is much tighter than at the start.
    assert abs(exact1 - bound1) < 0.5 * abs(exact0 - bound0), (exact0, bound0, exact1, bound1)


def test_rws_errors():
    with pytest.raises(tg.TMCGraphError, match="RWS needs a tmcgraph.TMC"):
        RWS(object())
    m = tg.Model()
    m.latent("c", lambda: Categorical(logits=torch.tensor([0.0, -math.inf])))
    m.observed("x", lambda c: Normal(c.to(torch.get_default_dtype()), 1.0))
    q = tg.Proposal(m)
    q.latent("c", lambda: Categorical(probs=torch.tensor([0.0, 1.0])))  # only impossible values
    with pytest.raises(tg.TMCGraphError, match="no particle combination carries weight"):
        RWS(tg.TMC(m, q, K=2))({"x": torch.tensor(0.0)}, seed=0)
