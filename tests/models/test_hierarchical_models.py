"""The radon and bus-breakdown models against hand-written densities, and the three methods on them.

Truths: the log joint density of one particle (K = 1: log P_hat = log P(x, z) - log q(z))
written with scipy; the predictive log-likelihood of held-out elements as the ratio of two
sums over every index combination of the same particles, written out here (plates
unrolled, densities from scipy); and the bound of a synthetic radon-shaped data set
before and after 60 training steps, each averaged over 8 independent particle draws.
"""

import itertools
import math

import numpy as np
import pytest
import torch
from scipy import stats
from scipy.special import expit, logsumexp

import tmcgraph as tg
from tmcgraph.infer.fit import MPRWS, MPVI, fit
from tmcgraph.infer.posterior import predictive_log_likelihood
from tmcgraph.infer.qem import QEM, MeanFieldNormal
from tmcgraph.models import hierarchical as H

F64 = torch.float64


@pytest.fixture(autouse=True)
def _one_thread():
    """Small tensors: one torch thread is faster than two competing ones (conftest restores the count)."""
    torch.set_num_threads(1)


def np_(t):
    return t.detach().double().numpy()


def radon_log_joint(v, d, lik_mask=None):
    """log P(x, z) of one radon particle set ``v`` (numpy), likelihood terms where ``lik_mask``."""
    lp = stats.norm.logpdf(v["global_mean"], 0, 1) + stats.norm.logpdf(v["global_log_sigma"], 0, 1)
    lp += stats.norm.logpdf(v["state_mean"], v["global_mean"], np.exp(v["global_log_sigma"])).sum()
    for n in ("state_log_sigma", "beta_u", "beta_basement"):
        lp += stats.norm.logpdf(v[n], 0, 1).sum()
    loc = (v["state_mean"][:, None] + d["basement"] * v["beta_basement"][:, None]
           + d["log_uranium"] * v["beta_u"][:, None])
    lik = stats.norm.logpdf(d["log_radon"], loc, np.exp(v["state_log_sigma"])[:, None])
    return lp + (lik if lik_mask is None else lik * lik_mask).sum()


def bus_log_joint(v, d, lik_mask=None):
    lp = stats.norm.logpdf(v["psi"], 0, 1).sum() + stats.norm.logpdf(v["phi"], 0, 1).sum()
    lp += stats.norm.logpdf(v["sigma_beta"], 0, 1) + stats.norm.logpdf(v["mu_beta"], 0, 1)
    lp += stats.norm.logpdf(v["beta"], v["mu_beta"], np.exp(v["sigma_beta"])).sum()
    lp += stats.norm.logpdf(v["sigma_alpha"], 0, 1).sum()
    lp += stats.norm.logpdf(v["alpha"], v["beta"][:, None], np.exp(v["sigma_alpha"])[:, None]).sum()
    logits = v["alpha"][:, :, None] + d["company"] @ v["phi"] + d["run_type"] @ v["psi"]
    lik = stats.bernoulli.logpmf(d["delay"], expit(logits))
    return lp + (lik if lik_mask is None else lik * lik_mask).sum()


def log_q(est, s):
    """log q of the particles recomputed from the proposal's loc and log-scale: latent -> [K, *plates]."""
    out = {}
    for n, v in est.proposal.variables.items():
        f = v.fn
        lq = stats.norm.logpdf(np_(s.values[n]), np_(f.loc), np.exp(np_(f.log_scale)))
        out[n] = lq.reshape(lq.shape[0], *f.loc.shape[: f.loc.dim() - f.event_dims], -1).sum(-1) \
            if f.event_dims else lq
    return out


def randomise(q, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in q.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))


@pytest.mark.parametrize("groups", [True, False])
def test_radon_single_particle_is_log_joint_minus_log_q(f64, groups):
    d = {k: v.double() for k, v in H.simulate_radon(3, 5, seed=1).items()}
    m, q, obs = H.radon(d, groups=groups)
    q.double()
    randomise(q, 0)
    est = tg.TMC(m, q, K=1, dtype=F64, compile=False)
    s = est.sample(obs, seed=2)
    v = {n: np_(s.values[n])[0] for n in s.values}
    want = radon_log_joint(v, {k: np_(t) for k, t in d.items()}) - sum(x.sum() for x in log_q(est, s).values())
    assert float(est.log_evidence(samples=s).detach()) == pytest.approx(want, abs=1e-9)


@pytest.mark.parametrize("groups", [True, False])
def test_bus_single_particle_is_log_joint_minus_log_q(f64, groups):
    d = {k: v.double() for k, v in H.simulate_bus(2, 3, 4, run_types=3, companies=5, seed=1).items()}
    m, q, obs = H.bus(d, groups=groups)
    q.double()
    randomise(q, 0)
    est = tg.TMC(m, q, K=1, dtype=F64, compile=False)
    s = est.sample(obs, seed=2)
    v = {n: np_(s.values[n])[0] for n in s.values}
    assert v["psi"].shape == (3,) and v["phi"].shape == (5,) and v["alpha"].shape == (2, 3)
    want = bus_log_joint(v, {k: np_(t) for k, t in d.items()}) - sum(x.sum() for x in log_q(est, s).values())
    assert float(est.log_evidence(samples=s).detach()) == pytest.approx(want, abs=1e-9)


def test_group_dims_of_the_models():
    m, q, obs = H.radon(H.simulate_radon(2, 3))
    s = tg.TMC(m, q, K=3).sample(obs, seed=0)
    assert s.ordinals == {"_group_globals": (), "_group_states": ("States",)}
    m, q, obs = H.bus(H.simulate_bus(2, 3, 4, 3, 5))
    s = tg.TMC(m, q, K=3).sample(obs, seed=0)
    assert s.ordinals == {"_group_globals": (), "_group_years": ("Year",), "alpha": ("Year", "Borough")}


def _enumerate_predictive(est, s, d, held, log_joint, dims):
    """log sum_k w_all(k) - log sum_k w_rest(k) over every index combination (plates unrolled).

    ``dims``: list of (dim name, plate element or None); a combination assigns an index
    to each; ``pick(values, combination)`` selects each latent's particle.
    """
    lq = log_q(est, s)
    K = est.K
    vals = {n: np_(t) for n, t in s.values.items()}
    all_, rest = [], []
    for combo in itertools.product(range(K), repeat=len(dims)):
        idx = dict(zip(dims, combo))
        v, q = {}, 0.0
        for n, t in vals.items():
            dim = s.dims[n]
            ordinal = s.ordinals[dim]
            if not ordinal:
                v[n] = t[idx[(dim, None)]]
                q += lq[n][idx[(dim, None)]].sum()
            else:  # one index per element of the dim's ordinal (its leading plate dims)
                shape = t.shape[1:1 + len(ordinal)]
                sel = np.empty(t.shape[1:], dtype=t.dtype)
                for e in itertools.product(*[range(k) for k in shape]):
                    sel[e] = t[(idx[(dim, e)],) + e]
                    q += lq[n][(idx[(dim, e)],) + e].sum()
                v[n] = sel
        all_.append(log_joint(v, d) - q)
        rest.append(log_joint(v, d, lik_mask=~held) - q)
    return logsumexp(all_) - logsumexp(rest)


def test_radon_predictive_equals_brute_force(f64):
    d = {k: v.double() for k, v in H.simulate_radon(2, 5, seed=3).items()}
    train = {k: v[:, :3] for k, v in d.items()}
    held = np.zeros((2, 5), dtype=bool)
    held[:, 3:] = True
    m_tr, q_tr, _ = H.radon(train)
    q_tr.double()
    randomise(q_tr, 1)
    m_all, q_all, obs_all = H.radon(d)
    q_all = H.predictive_proposal(q_tr, q_all.double())
    est = tg.TMC(m_all, q_all, K=3, dtype=F64, compile=False)
    s = est.sample(obs_all, seed=5)
    got = float(predictive_log_likelihood(est, None, {"log_radon": torch.as_tensor(held)}, samples=s).detach())
    dims = [("_group_globals", None)] + [("_group_states", (j,)) for j in range(2)]
    want = _enumerate_predictive(est, s, {k: np_(t) for k, t in d.items()}, held, radon_log_joint, dims)
    assert got == pytest.approx(want, abs=1e-9)


def test_bus_predictive_equals_brute_force(f64):
    d = {k: v.double() for k, v in H.simulate_bus(1, 2, 4, run_types=2, companies=3, seed=3).items()}
    held = np.zeros((1, 2, 4), dtype=bool)
    held[:, :, 2:] = True
    m, q, obs = H.bus(d)
    q.double()
    randomise(q, 2)
    est = tg.TMC(m, q, K=2, dtype=F64, compile=False)
    s = est.sample(obs, seed=1)
    got = float(predictive_log_likelihood(est, None, {"delay": torch.as_tensor(held)}, samples=s).detach())
    dims = [("_group_globals", None), ("_group_years", (0,)), ("alpha", (0, 0)), ("alpha", (0, 1))]
    want = _enumerate_predictive(est, s, {k: np_(t) for k, t in d.items()}, held, bus_log_joint, dims)
    assert got == pytest.approx(want, abs=1e-9)


def test_predictive_proposal_copies_fitted_and_extends():
    m_tr, q_tr, _ = H.radon(H.simulate_radon(2, 3))
    randomise(q_tr, 4)
    m_all, q_all, _ = H.radon(H.simulate_radon(2, 6))
    H.predictive_proposal(q_tr, q_all)
    for (n, a), (_, b) in zip(q_tr.named_parameters(), q_all.named_parameters()):
        assert torch.equal(a, b), n
    # a latent with more plate elements than in training: fitted block kept, new elements N(0, 1)
    src = tg.Proposal(m_tr)
    src.latent("beta_u", MeanFieldNormal([2]))
    with torch.no_grad():
        src["beta_u"].fn.loc.fill_(3.0)
    big = MeanFieldNormal([4])
    new = big.resized([4])
    assert (new.loc == 0).all()
    new = src["beta_u"].fn.resized([4], loc=-1.0, log_scale=0.5)
    assert new.loc.tolist() == [3.0, 3.0, -1.0, -1.0] and new.log_scale.tolist()[2:] == [0.5, 0.5]


def test_covariate_errors():
    with pytest.raises(tg.TMCGraphError, match="same"):
        H.radon_model(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(tg.TMCGraphError, match="2-d"):
        H.radon_model(torch.zeros(6), torch.zeros(6))
    with pytest.raises(tg.TMCGraphError, match="non-finite"):
        H.radon_model(torch.full((2, 3), math.nan), torch.zeros(2, 3))
    with pytest.raises(tg.TMCGraphError, match="share"):
        H.bus_model(torch.zeros(2, 3, 4, 2), torch.zeros(2, 3, 5, 2))


def _mean_bound(est, obs, seeds=range(100, 108)):
    with torch.no_grad():
        return float(np.mean([float(est.log_evidence(obs, seed=s)) for s in seeds]))


@pytest.mark.parametrize("method", [MPVI(0.05), MPRWS(0.05), QEM(0.2)], ids=lambda m: m.name)
def test_each_method_raises_the_bound_on_synthetic_radon(method):
    d = H.simulate_radon(4, 20, seed=7)
    m, q, obs = H.radon(d)
    est = tg.TMC(m, q, K=10, compile=False)
    before = _mean_bound(est, obs)
    res = fit(est, obs, method, iterations=60, seed=0, progress=False)
    after = _mean_bound(est, obs)
    first = float(np.mean(res.objectives[:10]))
    assert after > before + 10, (before, after)  # measured: +24 (MP-VI) to +34 nats
    assert res.final_objective(10) > first + 5
