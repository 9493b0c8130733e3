"""Exact marginalisation of discrete latents by enumeration (paper section 7.3)."""

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lingauss import LinearGaussian
from torch.distributions import Categorical, Independent, Normal

import tmcgraph as tg

PI = [0.5, 0.3, 0.2]
A = [[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.25, 0.25, 0.5]]
MU = [-1.0, 0.5, 2.0]
XS = [0.1, -1.3, 2.2, 1.9, 0.4, -0.2]


def hmm(T, enumerate_all=True):
    pi, trans, mu = torch.tensor(PI), torch.tensor(A), torch.tensor(MU)
    m = tg.Model()
    m.latent("c1", lambda: Categorical(probs=pi))
    for t in range(2, T + 1):
        m.latent(f"c{t}", lambda prev: Categorical(probs=trans[prev]), parents=[f"c{t - 1}"])
    for t in range(1, T + 1):
        m.observed(f"x{t}", lambda c: Normal(mu[c], 1.0), parents=[f"c{t}"])
    q = tg.Proposal(m)
    for t in range(1, T + 1):
        q.enumerate(f"c{t}")
    return m, q


def forward_algorithm(xs):
    """Textbook HMM forward recursion (numpy, float64)."""
    pi, trans, mu = np.array(PI), np.array(A), np.array(MU)
    emis = lambda x: np.exp(-0.5 * (x - mu) ** 2) / math.sqrt(2 * math.pi)  # noqa: E731
    alpha = pi * emis(xs[0])
    logz = 0.0
    for x in xs[1:]:
        c = alpha.sum()
        logz += math.log(c)
        alpha = (alpha / c) @ trans * emis(x)
    return logz + math.log(alpha.sum())


def brute_force_hmm(xs):
    total = []
    for seq in itertools.product(range(3), repeat=len(xs)):
        lp = math.log(PI[seq[0]]) + sum(math.log(A[a][b]) for a, b in zip(seq, seq[1:]))
        lp += sum(-0.5 * (x - MU[c]) ** 2 - 0.5 * math.log(2 * math.pi) for x, c in zip(xs, seq))
        total.append(lp)
    return float(np.logaddexp.reduce(total))


@pytest.mark.parametrize("T", [1, 2, 4, 6])
def test_enumerated_hmm_equals_forward_algorithm(f64, T):
    m, q = hmm(T)
    data = {f"x{t + 1}": torch.tensor(XS[t]) for t in range(T)}
    for method in (tg.TMC, tg.IWAE):
        est = method(m, q, K=7)  # K is irrelevant for enumerated latents
        v = float(est.log_evidence(data))
        assert v == pytest.approx(forward_algorithm(XS[:T]), rel=1e-10, abs=1e-10)
        assert v == pytest.approx(brute_force_hmm(XS[:T]), rel=1e-10, abs=1e-10)


def test_enumerated_hmm_in_float32_matches(f64):
    m, q = hmm(6)
    data = {f"x{t + 1}": torch.tensor(XS[t], dtype=torch.float32) for t in range(6)}
    torch.set_default_dtype(torch.float32)
    v = float(tg.TMC(m, q).log_evidence(data))
    assert v == pytest.approx(forward_algorithm(XS), rel=1e-5)


# ------------------------------------------- enumerated discrete + sampled continuous
R = 3000
X = [0.9, -1.1, 1.4]
W = [0.3, 0.7]


def mixture_truth():
    total = []
    for assign in itertools.product(range(2), repeat=len(X)):
        lg = LinearGaussian()
        lg.add("mu0")
        lg.add("mu1")
        for i, c in enumerate(assign):
            lg.add(f"x{i}", {f"mu{c}": 1.0}, sd=0.5)
        lp = sum(math.log(W[c]) for c in assign)
        total.append(lp + lg.log_evidence({f"x{i}": v for i, v in enumerate(X)}))
    return float(np.logaddexp.reduce(total))


def test_enumerated_assignments_with_sampled_means_unbiased(f64):
    m = tg.Model()
    m.plate("rep", size=R)
    m.plate("data", size=len(X))
    m.latent("mu", lambda: Independent(Normal(torch.zeros(2), 1.0), 1).expand([R]), plate="rep")
    m.latent("c", lambda: Categorical(probs=torch.tensor(W)), plate=("rep", "data"))
    m.observed("x", lambda mu, c: Normal((mu * F.one_hot(c, 2)).sum(-1), 0.5), plate=("rep", "data"))
    q = tg.Proposal(m)
    q.latent("mu", lambda: Independent(Normal(torch.tensor([-0.3, 0.6]), 1.2), 1), plate="rep")
    q.enumerate("c")
    data = {"x": torch.tensor(X).expand(R, len(X))}
    r = tg.TMC(m, q, K=3).run(data, seed=11, elementwise="rep")
    assert r.samples.sizes["c"] == 2
    w = torch.exp(r.log_evidence - mixture_truth())
    se = w.std() / math.sqrt(R)
    assert abs(float(w.mean()) - 1) < 4 * float(se), (float(w.mean()), float(se))
    assert float(se) < 0.1


def test_enumeration_marginalises_exactly_inside_the_contraction(f64):
    """With continuous particles fixed, enumerating c equals summing c out by hand."""
    m = tg.Model()
    m.plate("data", size=len(X))
    m.latent("mu", lambda: Independent(Normal(torch.zeros(2), 1.0), 1))
    m.latent("c", lambda: Categorical(probs=torch.tensor(W)), plate="data")
    m.observed("x", lambda mu, c: Normal((mu * F.one_hot(c, 2)).sum(-1), 0.5), plate="data")
    q = tg.Proposal(m)
    q.latent("mu", lambda: Independent(Normal(torch.zeros(2), 1.2), 1))
    q.enumerate("c")
    r = tg.TMC(m, q, K=4).run({"x": torch.tensor(X)}, seed=2)
    mu = r.samples.values["mu"]  # [K, 2]
    x = torch.tensor(X)
    lw = Independent(Normal(torch.zeros(2), 1.0), 1).log_prob(mu) - r.samples.log_q["mu"]
    per_point = torch.logsumexp(
        torch.log(torch.tensor(W)) + Normal(mu[:, None, :], 0.5).log_prob(x[None, :, None]), -1
    ).sum(-1)
    truth = torch.logsumexp(lw + per_point, 0) - math.log(4)
    assert float(r.log_evidence) == pytest.approx(float(truth), rel=1e-10)


def test_static_supports_are_enumerated_once_and_exact(f64):
    """After the first call the sampler does not evaluate an enumerated latent's distribution;
    the value still equals exact enumeration (the forward algorithm) on every call."""

    calls = []
    trans = torch.tensor([[0.8, 0.2], [0.3, 0.7]])

    def step(z):
        calls.append(tuple(z.shape))
        return torch.distributions.Categorical(probs=trans[z])

    m = tg.Model()
    m.latent("z0", lambda: torch.distributions.Categorical(probs=torch.tensor([0.6, 0.4])))
    m.latent("z1", step, parents=["z0"])
    m.observed("x", lambda z: torch.distributions.Normal(z.to(torch.float64), 1.0), parents=["z1"])
    q = tg.Proposal(m)
    q.enumerate("z0")
    q.enumerate("z1")
    est = tg.TMC(m, q, compile=False)
    x = torch.tensor(0.3, dtype=torch.float64)
    exact = torch.logsumexp(torch.stack([
        torch.log(torch.tensor([0.6, 0.4])[a]) + torch.log(trans[a, b])
        + torch.distributions.Normal(float(b), 1.0).log_prob(x)
        for a, b in itertools.product(range(2), range(2))]), 0)
    est.log_evidence({"x": x})
    first = len(calls)
    for _ in range(3):
        calls.clear()
        assert float(est.log_evidence({"x": x})) == pytest.approx(float(exact), rel=1e-12)
        assert len(calls) == first - 1  # the model factor only, not the sampler
