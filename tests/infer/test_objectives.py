"""Gradient estimators (reparam, STL, DReGs) for TMC and IWAE against independent truths.

Truths: hand-written per-sample IWAE formulas on the same noise; brute-force
enumeration of all K^n TMC index combinations; zero path gradients at the exact
posterior; and the unbiasedness of STL (K = 1) and IWAE-DReGs in expectation.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Normal

import tmcgraph as tg
from tmcgraph.infer.objectives import GRADS, bound, objective


class Lik(nn.Module):
    """x | z ~ N(w z, 1) with a learned weight ``w``."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(1.3))

    def forward(self, z):
        return Normal(self.w * z, 1.0)


class Enc(nn.Module):
    """q(z | x) = N(a x + b, softplus(c)^2)."""

    def __init__(self, a=0.3, b=0.1, sd=0.8):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(float(a)))
        self.b = nn.Parameter(torch.tensor(float(b)))
        self.c = nn.Parameter(torch.tensor(math.log(math.expm1(sd))))

    def forward(self, x):
        return Normal(self.a * x + self.b, F.softplus(self.c))


def one_layer(a=0.3, b=0.1, sd=0.8):
    """z_b ~ N(0, 1), x_b | z_b ~ N(w z_b, 1), amortised q(z_b | x_b)."""
    m = tg.Model()
    m.plate("data")
    m.latent("z", lambda: Normal(0.0, 1.0), plate="data")
    m.observed("x", Lik(), plate="data", parents=["z"])
    q = tg.Proposal(m)
    q.latent("z", Enc(a, b, sd), plate="data", parents=["x"])
    return m, q


def grads(params):
    out = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]
    for p in params:
        p.grad = None
    return torch.stack(out)


def textbook_iwae(m, q, x, z):
    """Per-sample IWAE quantities written out by hand (no engine code) for given particles ``z`` [K, B].

    Returns log w with live parameters, and log w^ whose proposal density has detached
    parameters but whose particles z(eps; phi) carry the path derivative.
    """
    enc, lik = q.fns["z"], m.fns["x"]
    mu, sd = enc.a * x + enc.b, F.softplus(enc.c)
    eps = ((z - mu) / sd).detach()
    zz = mu + sd * eps  # the same particles as functions of phi
    log_p = Normal(0.0, 1.0).log_prob(zz) + Normal(lik.w * zz, 1.0).log_prob(x)
    logw = log_p - Normal(mu, sd).log_prob(zz)
    logw_hat = log_p - Normal(mu.detach(), sd.detach()).log_prob(zz)
    return logw, logw_hat


@pytest.mark.parametrize("grad", GRADS)
def test_iwae_gradients_equal_textbook_per_sample_formulas(f64, grad):
    torch.manual_seed(1)
    m, q = one_layer()
    x = torch.randn(5) * 2
    est = tg.IWAE(m, q, K=7)
    o = objective(est, {"x": x}, grad, seed=3)
    o.backward()
    pq, pm = list(q.parameters()), list(m.parameters())
    g_q, g_m = grads(pq), grads(pm)

    z = est.sample({"x": x}, seed=3).values["z"].detach()
    logw, logw_hat = textbook_iwae(m, q, x, z)
    # the value: per-point log (1/K) sum_k w_k
    assert torch.allclose(o.value, torch.logsumexp(logw, 0) - math.log(7), atol=1e-10)
    # model parameters: the IWAE gradient for every estimator
    t_m = torch.autograd.grad((torch.logsumexp(logw, 0)).mean(), pm, retain_graph=True)
    assert torch.allclose(-g_m, torch.stack(t_m), atol=1e-9)
    wt = torch.softmax(logw.detach(), 0)
    if grad == "reparam":
        target = torch.logsumexp(logw, 0).mean()
    elif grad == "stl":  # sum_k w~_k d log w^_k / d phi
        target = (wt * logw_hat).sum(0).mean()
    else:  # DReGs, Tucker et al. Eq. 7: sum_k w~_k^2 d log w^_k / d phi
        target = (wt**2 * logw_hat).sum(0).mean()
    t_q = torch.stack(torch.autograd.grad(target, pq))
    assert torch.allclose(-g_q, t_q, atol=1e-9)


class SharedFeatures(nn.Module):
    """A feature map read by several latents' proposals (like a factorised encoder's chain)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(0.4))
        self.b = nn.Parameter(torch.tensor(-0.2))
        self.register_buffer("shift", torch.tensor(0.1))

    def forward(self, x):
        return self.a * x + self.b + self.shift


class Head(nn.Module):
    """q(z_i | x) = N(c_i * features(x), softplus(s)^2); ``s`` may be a Parameter shared with another head."""

    def __init__(self, features, c, s=None):
        super().__init__()
        self.features = features
        self.c = nn.Parameter(torch.tensor(float(c)))
        self.s = s if s is not None else nn.Parameter(torch.tensor(0.3))

    def forward(self, x):
        return Normal(self.c * self.features(x), F.softplus(self.s))


@pytest.mark.parametrize("grad", ["stl", "dregs"])
def test_detached_proposals_with_shared_modules_and_tied_weights(f64, grad):
    """A module and a Parameter shared by two latents' proposals: every call trains them.

    Truth: the textbook per-sample formulas of the IWAE path gradients (STL: sum_k w~_k
    d log w^_k; DReGs: sum_k w~_k^2 d log w^_k), written out by hand on the particles the
    estimator drew, on three consecutive calls; and the module's parameters stay the same
    objects (a detached copy left behind would stop the proposal from training).
    """
    m = tg.Model()
    m.plate("data")
    m.latent("z1", lambda: Normal(0.0, 1.0), plate="data")
    m.latent("z2", lambda: Normal(0.0, 1.0), plate="data")
    m.observed("x", lambda z1, z2: Normal(z1 + z2, 1.0), plate="data")
    feats = SharedFeatures()
    h1 = Head(feats, 0.5)
    h2 = Head(feats, -0.3, s=h1.s)  # a tied Parameter across modules
    q = tg.Proposal(m)
    q.latent("z1", h1, plate="data", parents=["x"])
    q.latent("z2", h2, plate="data", parents=["x"])
    before = {n: p for n, p in q.named_parameters(remove_duplicate=False)}
    x = torch.tensor([0.5, -1.2, 2.0])
    K = 3
    est = tg.IWAE(m, q, K=K)
    pq = list(q.parameters())
    for seed in range(3):
        o = objective(est, {"x": x}, grad, seed=seed)
        o.backward()
        g_q = grads(pq)
        assert {n: p for n, p in q.named_parameters(remove_duplicate=False)} == before
        assert all(isinstance(p, nn.Parameter) for p in before.values())
        assert float(g_q.abs().min()) > 0  # every parameter, the shared ones included, gets a gradient
        z = est.sample({"x": x}, seed=seed).values
        logw_hat, logw = 0.0, 0.0
        for n, h in (("z1", h1), ("z2", h2)):
            mu, sd = h.c * feats(x), F.softplus(h.s)
            eps = ((z[n].detach() - mu) / sd).detach()
            zz = mu + sd * eps
            z[n] = zz
            logw_hat = logw_hat - Normal(mu.detach(), sd.detach()).log_prob(zz)
            logw = logw - Normal(mu, sd).log_prob(zz)
        log_p = Normal(0.0, 1.0).log_prob(z["z1"]) + Normal(0.0, 1.0).log_prob(z["z2"])
        log_p = log_p + Normal(z["z1"] + z["z2"], 1.0).log_prob(x)
        logw, logw_hat = logw + log_p, logw_hat + log_p
        assert torch.allclose(o.value, torch.logsumexp(logw, 0) - math.log(K), atol=1e-10)
        wt = torch.softmax(logw.detach(), 0)
        target = ((wt if grad == "stl" else wt**2) * logw_hat).sum(0).mean()
        t_q = torch.stack(torch.autograd.grad(target, pq))
        assert torch.allclose(-g_q, t_q, atol=1e-9)


def chain(coupling, lik=None):
    """Two-latent chain in a data plate with a non-factorised amortised proposal."""

    class Q2(nn.Module):
        def __init__(self):
            super().__init__()
            self.u = nn.Parameter(torch.tensor(0.7))
            self.v = nn.Parameter(torch.tensor(0.2))
            self.c = nn.Parameter(torch.tensor(-0.3))

        def forward(self, z1, x):
            return Normal(self.u * z1 + self.v * x, F.softplus(self.c) + 0.2)

    class P2(nn.Module):
        def __init__(self):
            super().__init__()
            self.r = nn.Parameter(torch.tensor(0.9))

        def forward(self, z1):
            return Normal(self.r * z1, 0.7)

    m = tg.Model()
    m.plate("data")
    m.latent("z1", lambda: Normal(0.0, 1.0), plate="data")
    m.latent("z2", P2(), plate="data", parents=["z1"])
    m.observed("x", lik if lik is not None else Lik(), plate="data", parents=["z2"])
    q = tg.Proposal(m)
    q.latent("z1", Enc(0.2, 0.0, 0.9), plate="data", parents=["x"])
    q.latent("z2", Q2(), plate="data", parents=["z1", "x"], coupling=coupling)
    return m, q


def all_combinations(factors, dims):
    """Log-weight of every index combination: tensor ``[K_d for d in dims] + [B]`` by broadcasting."""
    total = 0
    for f in factors:
        t = f.tensor
        shape = [t.shape[f.sample_dims.index(d)] if d in f.sample_dims else 1 for d in dims] + [t.shape[-1]]
        perm = [f.sample_dims.index(d) for d in dims if d in f.sample_dims] + [len(f.sample_dims)]
        total = total + t.permute(perm).reshape(shape)
    return total


@pytest.mark.parametrize("warm", [0, 2], ids=["first-call", "program"])
@pytest.mark.parametrize("coupling", ["mixture", "paired"])
@pytest.mark.parametrize("grad", GRADS)
def test_tmc_gradients_equal_enumeration_of_all_combinations(f64, grad, coupling, warm):
    """``warm`` earlier calls: the checked call then runs through the structure's cached program."""
    torch.manual_seed(2)
    m, q = chain(coupling)
    x = torch.randn(3)
    K = 3
    est = tg.TMC(m, q, K=K)
    for w in range(warm):
        objective(est, {"x": x}, grad, seed=100 + w)
    o = objective(est, {"x": x}, grad, seed=5)
    o.backward()
    pq, pm = list(q.parameters()), list(m.parameters())
    g_q, g_m = grads(pq), grads(pm)

    s = est.sample({"x": x}, seed=5, detach_proposal=grad != "reparam")
    fs = est.factor_graph(s).factors
    # value: the brute-force oracle, point by point
    assert torch.allclose(o.value, tg.brute_force(tg.FactorGraph(fs, s.ordinals).with_keep("data")), atol=1e-10)
    logw = all_combinations(fs, ("z1", "z2")).reshape(K * K, -1)  # [K^2, B], includes -log K per latent
    assert torch.allclose(o.value, torch.logsumexp(logw, 0), atol=1e-10)
    t_m = torch.stack(torch.autograd.grad(torch.logsumexp(logw, 0).mean(), pm, retain_graph=True))
    assert torch.allclose(-g_m, t_m, atol=1e-9)
    if grad == "dregs":  # Eq. 16 over all K^2 combinations
        wt = torch.softmax(logw.detach(), 0)
        target = (wt**2 * logw).sum(0).mean()
    else:  # reparam, or STL (the factors already hold the detached proposal densities)
        target = torch.logsumexp(logw, 0).mean()
    t_q = torch.stack(torch.autograd.grad(target, pq))
    assert torch.allclose(-g_q, t_q, atol=1e-9)


class CountingLik(Lik):
    """:class:`Lik` that counts its calls (each builds the likelihood factor once)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, z):
        self.calls += 1
        return super().forward(z)


@pytest.mark.parametrize("cls", [tg.TMC, tg.IWAE])
def test_every_gradient_estimator_builds_each_factor_once_per_call(cls):
    """DReGs contracts the factors twice (sum w and sum w^2) but builds them once.

    Truth: the number of calls of the likelihood's callable. After the first call a
    structure's value comes from its cached program; reading the factor graph afterwards
    would build every factor (and its autograd graph) a second time.
    """
    for grad in GRADS:
        lik = CountingLik()
        m, q = chain("mixture", lik)
        est = cls(m, q, K=3)
        x = torch.randn(4)
        for call in range(3):
            before = lik.calls
            o = objective(est, {"x": x}, grad, seed=call)
            o.backward()
            assert lik.calls - before == 1, (grad, call, lik.calls - before)


def test_tmc_dregs_surrogate_is_papers_eq22_with_brute_force_sums(f64):
    """Appendix 7.5, Eq. 22, with log sum w and log sum w^2 from the oracle."""
    torch.manual_seed(3)
    m, q = chain("mixture")
    x = torch.randn(2)
    est = tg.TMC(m, q, K=2)
    o = objective(est, {"x": x}, "dregs", seed=9)
    s = est.sample({"x": x}, seed=9, detach_proposal=True)
    fs = est.factor_graph(s).factors
    l1 = tg.brute_force(tg.FactorGraph(fs, s.ordinals).with_keep("data"))
    doubled = [tg.Factor(f.name, 2 * f.tensor, f.sample_dims, f.plates) for f in fs]
    l2 = tg.brute_force(tg.FactorGraph(doubled, s.ordinals).with_keep("data"))
    surrogate = -(0.5 * torch.exp(l2 - 2 * l1).detach() * l2).mean()
    assert float(o.proposal_loss.detach()) == pytest.approx(float(surrogate.detach()), abs=1e-10)


@pytest.mark.parametrize("cls,K", [(tg.VAE, 1), (tg.IWAE, 5)])
def test_path_gradients_vanish_at_the_exact_posterior(f64, cls, K):
    """With q = p(z | x) every log-weight equals log p(x): STL and DReGs give exactly zero."""
    m, q = one_layer(a=0.5, b=0.0, sd=math.sqrt(0.5))
    m.fns["x"].w.data.fill_(1.0)  # x | z ~ N(z, 1): posterior N(x / 2, 1 / 2)
    x = torch.tensor([0.3, -1.2, 2.0])
    est = cls(m, q) if cls is tg.VAE else cls(m, q, K=K)
    for grad in ("stl", "dregs"):
        objective(est, {"x": x}, grad, seed=0).backward()
        assert grads(list(q.parameters())).abs().max() < 1e-12
    objective(est, {"x": x}, "reparam", seed=0).backward()
    assert grads(list(q.parameters())).abs().max() > 1e-3


@pytest.mark.parametrize("cls,K,grad", [(tg.VAE, 1, "stl"), (tg.IWAE, 4, "dregs")])
def test_expected_proposal_gradient_equals_reparam(f64, cls, K, grad):
    """STL (K = 1) and IWAE-DReGs are unbiased: paired differences average to zero (4 s.e.)."""
    m, q = one_layer()
    x = torch.full((64,), 1.5)
    est = cls(m, q) if cls is tg.VAE else cls(m, q, K=K)
    pq = list(q.parameters())
    diffs = []
    for seed in range(100):
        objective(est, {"x": x}, grad, seed=seed).backward()
        a = grads(pq)
        objective(est, {"x": x}, "reparam", seed=seed).backward()
        diffs.append(a - grads(pq))
    d = torch.stack(diffs)
    mean, se = d.mean(0), d.std(0) / math.sqrt(len(d))
    assert (mean.abs() < 4 * se + 1e-12).all(), (mean, se)
    assert (d.abs().max(0).values > 1e-6).all()  # not trivially equal


def test_tmc_bound_equals_oracle_per_data_point(f64):
    m, q = chain("mixture")
    x = torch.randn(4)
    est = tg.TMC(m, q, K=3)
    b = bound(est, {"x": x}, seed=4)
    s = est.sample({"x": x}, seed=4)
    assert torch.allclose(b, tg.brute_force(est.factor_graph(s).with_keep("data")), atol=1e-10)


def test_bad_options_are_clear_errors():
    m, q = one_layer()
    est = tg.TMC(m, q, K=2)
    with pytest.raises(tg.TMCGraphError, match="grad must be one of"):
        objective(est, {"x": torch.zeros(2)}, "dreg")
    m2 = tg.Model()
    m2.plate("data")
    m2.latent("z", lambda: Normal(0.0, 1.0), plate="data")
    m2.observed("x", lambda z: Normal(z, 1.0), plate="data")
    q2 = tg.Proposal(m2)
    q2.latent("z", lambda x: Normal(x / 2, 1.0), plate="data")
    with pytest.raises(tg.TMCGraphError, match="registers none"):
        objective(tg.IWAE(m2, q2, K=2), {"x": torch.zeros(2)}, "stl")
    with pytest.raises(tg.TMCGraphError, match="estimator"):
        objective(object(), {"x": torch.zeros(2)})
