"""Gradients of log P_TMC, and the IWAE / VAE special cases, against independent formulas."""

import math

import pytest
import torch
from torch import nn
from torch.distributions import Independent, Normal

import tmcgraph as tg


class Lin(nn.Module):
    """Normal(w * parent + b, softplus(s)) with learnable parameters."""

    def __init__(self, w=0.5, b=0.1, s=0.5):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(w))
        self.b = nn.Parameter(torch.tensor(b))
        self.s = nn.Parameter(torch.tensor(s))

    def forward(self, parent):
        return Normal(self.w * parent + self.b, nn.functional.softplus(self.s))


class Root(nn.Module):
    def __init__(self, b=0.0, s=0.5):
        super().__init__()
        self.b = nn.Parameter(torch.tensor(b))
        self.s = nn.Parameter(torch.tensor(s))

    def forward(self):
        return Normal(self.b, nn.functional.softplus(self.s))


def learnable(coupling="mixture"):
    m = tg.Model()
    m.plate("data", size=2)
    m.latent("a", Root())
    m.latent("b", Lin(), plate="data", parents=["a"])
    m.observed("x", Lin(1.0, 0.0, 0.3), plate="data", parents=["b"])
    q = tg.Proposal(m)
    q.latent("a", Root(0.2, 0.8))
    q.latent("b", Lin(0.3, 0.0, 0.7), plate="data", parents=["a"], coupling=coupling)
    return m, q


@pytest.mark.parametrize("coupling", ["paired", "mixture"])
@pytest.mark.parametrize("method", [tg.TMC, tg.IWAE])
def test_gradients_match_brute_force_on_same_noise(f64, coupling, method):
    m, q = learnable(coupling)
    data = {"x": torch.tensor([0.4, -0.9])}
    est = method(m, q, K=3)
    params = list(m.parameters()) + list(q.parameters())
    assert len(params) == 13
    r = est.run(data, seed=3)
    g_fast = torch.autograd.grad(r.log_evidence, params, retain_graph=True)
    bf = tg.brute_force(r.graph)
    g_ref = torch.autograd.grad(bf, params)
    assert float(r.log_evidence.detach()) == pytest.approx(float(bf.detach()), rel=1e-10)
    for a, b in zip(g_fast, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
    # and a fresh run with the same seed reproduces the same noise
    assert float(est.log_evidence(data, seed=3).detach()) == float(r.log_evidence.detach())


def test_gradients_reach_every_parameter_through_reparameterised_samples(f64):
    m, q = learnable()
    r = tg.TMC(m, q, K=4).run({"x": torch.tensor([0.4, -0.9])}, seed=0)
    r.log_evidence.backward()
    for name, p in list(m.named_parameters()) + list(q.named_parameters()):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs() > 0, name


def test_k1_equals_single_sample_elbo(f64):
    """K = 1: TMC, IWAE and VAE all equal log P(x, z) - log Q(z) at the drawn z."""
    m, q = learnable()
    data = {"x": torch.tensor([0.4, -0.9])}
    for method in (tg.TMC, tg.IWAE):
        r = method(m, q, K=1).run(data, seed=5)
        a = r.samples.values["a"][0]
        b = r.samples.values["b"][0]
        mm, qq = m.fns, q.fns
        log_p = mm["a"]().log_prob(a) + mm["b"](a).log_prob(b).sum() + mm["x"](b).log_prob(data["x"]).sum()
        log_q = qq["a"]().log_prob(a) + qq["b"](a).log_prob(b).sum()
        assert float(r.log_evidence.detach()) == pytest.approx(float((log_p - log_q).detach()), rel=1e-12)
    v = tg.VAE(m, q).log_evidence(data, seed=5)
    assert float(v.detach()) == pytest.approx(float((log_p - log_q).detach()), rel=1e-12)


def test_iwae_vector_latents_equal_textbook_logsumexp(f64):
    """IWAE with vector (Independent) latents: logsumexp_k log w_k - log K on the same samples."""
    D = 3
    m = tg.Model()
    m.latent("z", lambda: Independent(Normal(torch.zeros(D), 1.0), 1))
    m.latent("h", lambda z: Independent(Normal(0.5 * z, 0.7), 1))
    m.observed("x", lambda h: Independent(Normal(h, 1.0), 1))
    q = tg.Proposal(m)
    q.latent("z", lambda x: Independent(Normal(0.3 * x, 1.1), 1))
    q.latent("h", lambda z, x: Independent(Normal(0.2 * z + 0.4 * x, 0.9), 1))
    x = torch.tensor([0.5, -1.0, 2.0])
    K = 6
    r = tg.IWAE(m, q, K=K).run({"x": x}, seed=1)
    z, h = r.samples.values["z"], r.samples.values["h"]
    assert z.shape == (K, D)
    lp = Independent(Normal(torch.zeros(D), 1.0), 1).log_prob(z) + Independent(Normal(0.5 * z, 0.7), 1).log_prob(h)
    lp = lp + Independent(Normal(h, 1.0), 1).log_prob(x)
    lq = Independent(Normal(0.3 * x, 1.1), 1).log_prob(z) + Independent(Normal(0.2 * z + 0.4 * x, 0.9), 1).log_prob(h)
    truth = torch.logsumexp(lp - lq, 0) - math.log(K)
    assert float(r.log_evidence) == pytest.approx(float(truth), rel=1e-12)


def test_networks_see_each_parent_sample_once(f64):
    """Linear cost in K: the proposal network runs on K parent samples, never a K x K grid."""
    seen = []

    class Net(nn.Module):
        def forward(self, a):
            seen.append(a.numel())
            return Normal(0.5 * a, 1.0)

    m = tg.Model()
    m.latent("a", lambda: Normal(0.0, 1.0))
    m.latent("b", lambda a: Normal(a, 1.0))
    m.observed("x", lambda b: Normal(b, 1.0))
    q = tg.Proposal(m)
    q.latent("a", lambda: Normal(0.0, 1.0))
    q.latent("b", Net(), coupling="mixture")
    K = 50
    tg.TMC(m, q, K=K).log_evidence({"x": torch.tensor(0.3)}, seed=0)
    assert seen and max(seen) <= K


def test_mixture_density_when_proposal_ignores_a_parent(f64):
    """A mixture proposal that does not use its parent has density Q(z) exactly (no stray log K)."""
    m = tg.Model()
    m.latent("a", lambda: Normal(0.0, 1.0))
    m.latent("b", lambda a: Normal(a, 1.0))
    m.observed("x", lambda b: Normal(b, 1.0))
    q = tg.Proposal(m)
    q.latent("a", lambda: Normal(0.0, 1.0))
    q.latent("b", lambda a: Normal(0.3, 1.5), coupling="mixture")
    r = tg.TMC(m, q, K=5).run({"x": torch.tensor(0.2)}, seed=0)
    torch.testing.assert_close(r.samples.log_q["b"], Normal(0.3, 1.5).log_prob(r.samples.values["b"]))
    for detach in (False, True):
        lq = tg.sampling.proposal_log_q(q, r.samples, "b", detach_params=detach)
        torch.testing.assert_close(lq, r.samples.log_q["b"])
