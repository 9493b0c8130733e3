"""Group coupling: latents sharing one sample dim, against hand-written sums and exact evidence.

Truths: the TMC sum over the group indices written out with numpy/scipy densities of the
drawn particles (plates unrolled, no planner), the same for the posterior marginal of the
group index, and the closed-form evidence of a linear-Gaussian network (unbiasedness:
mean of exp(log P_hat - log p(x)) within 4 standard errors of 1 over 3000 replicates).
"""

import math

import numpy as np
import pytest
import torch
from lingauss import LinearGaussian
from scipy import stats
from scipy.special import logsumexp
from torch.distributions import Normal
from unbiased import assert_unbiased

import tmcgraph as tg
from tmcgraph.infer.posterior import posterior
from tmcgraph.sampling.group import Group, group_members

F64 = torch.float64
N = 2


@pytest.fixture(autouse=True)
def _one_thread():
    """Small tensors: one torch thread is faster than two competing ones (conftest restores the count)."""
    torch.set_num_threads(1)


def tiny(K=3, paired_parent=False):
    """a, b global in group g; c, d in plate n in group h; x_n | a, b, c, d."""
    m = tg.Model()
    m.plate("n", size=N)
    m.latent("a", lambda: Normal(0.0, 1.0))
    m.latent("b", lambda: Normal(0.0, 1.5))
    m.latent("c", lambda a: Normal(a, 1.0), plate="n")
    m.latent("d", lambda b: Normal(0.5 * b, 0.8), plate="n")
    m.observed("x", lambda a, b, c, d: Normal(c + d + 0.3 * a * b, 0.7), plate="n")
    q = tg.Proposal(m)
    q.latent("a", lambda: Normal(0.2, 1.1), coupling=Group("g"))
    if paired_parent:  # b's proposal depends on its group mate a
        q.latent("b", lambda a: Normal(0.5 * a, 1.3), coupling=Group("g"))
    else:
        q.latent("b", lambda: Normal(-0.1, 1.3), coupling=Group("g"))
    q.latent("c", lambda: Normal(0.1, 1.2), plate="n", coupling=Group("h"))
    # d's proposal depends on c (same group) and on a (outside the group: paired along h)
    q.latent("d", lambda c, a: Normal(0.2 * c - 0.1 * a, 1.0), plate="n", coupling=Group("h"))
    return m, q, {"x": torch.tensor([0.4, -1.1], dtype=F64)}


def test_dims_sizes_and_ordinals(f64):
    m, q, data = tiny()
    s = tg.TMC(m, q, K=4, dtype=F64).sample(data, seed=0)
    assert s.dims == {"a": "_group_g", "b": "_group_g", "c": "_group_h", "d": "_group_h"}
    assert s.sizes == {"_group_g": 4, "_group_h": 4}
    assert s.ordinals == {"_group_g": (), "_group_h": ("n",)}
    assert group_members(q, "h") == ["c", "d"]


def test_group_dim_local_to_intersection_of_plates(f64):
    m = tg.Model()
    m.plate("p", size=3)
    m.plate("r", size=2)
    m.latent("u", lambda: Normal(0.0, 1.0), plate="p")
    m.latent("v", lambda u: Normal(u, 1.0), plate=("p", "r"))
    m.latent("w", lambda: Normal(0.0, 1.0))
    m.observed("x", lambda v, w: Normal(v + w, 1.0), plate=("p", "r"))
    q = tg.Proposal(m)
    q.latent("u", lambda: Normal(0.0, 1.0), coupling=Group("s"))
    q.latent("v", lambda: Normal(0.0, 1.0), plate=("p", "r"), coupling=Group("s"))
    q.latent("w", lambda: Normal(0.0, 1.0))
    s = tg.TMC(m, q, K=5).sample({"x": torch.zeros(3, 2)}, seed=1)
    assert s.ordinals["_group_s"] == ("p",) and s.ordinals["w"] == ()
    assert s.values["v"].shape == (5, 3, 2)


def _hand_log_evidence(s, data, K):
    """log P_hat written out: 1/K sum_g [ w_g(a, b) prod_n 1/K sum_h w_h,n ]."""
    a, b = s.values["a"].numpy(), s.values["b"].numpy()          # [K]
    c, d = s.values["c"].numpy(), s.values["d"].numpy()          # [K_h, N]
    x = data["x"].numpy()
    lq_a, lq_b = s.log_q["a"].numpy(), s.log_q["b"].numpy()
    lq_c, lq_d = s.log_q["c"].numpy(), s.log_q["d"].numpy()
    total = []
    for g in range(K):
        lw = stats.norm.logpdf(a[g], 0, 1) + stats.norm.logpdf(b[g], 0, 1.5) - lq_a[g] - lq_b[g]
        for e in range(N):
            inner = []
            for h in range(K):
                inner.append(stats.norm.logpdf(c[h, e], a[g], 1.0) + stats.norm.logpdf(d[h, e], 0.5 * b[g], 0.8)
                             + stats.norm.logpdf(x[e], c[h, e] + d[h, e] + 0.3 * a[g] * b[g], 0.7)
                             - lq_c[h, e] - lq_d[h, e])
            lw += logsumexp(inner) - math.log(K)
        total.append(lw)
    total = np.array(total)
    return logsumexp(total) - math.log(K), total


@pytest.mark.parametrize("paired_parent", [False, True])
def test_estimate_and_marginals_equal_hand_written_sum(f64, paired_parent):
    K = 3
    m, q, data = tiny(K, paired_parent)
    est = tg.TMC(m, q, K=K, dtype=F64, compile=False)
    for seed in range(3):
        s = est.sample(data, seed=seed)
        # the density each particle was drawn from, recomputed independently (paired along the group dims)
        a, b, c, d = (s.values[n].numpy() for n in "abcd")
        np.testing.assert_allclose(s.log_q["a"].numpy(), stats.norm.logpdf(a, 0.2, 1.1), rtol=1e-12)
        want_b = stats.norm.logpdf(b, 0.5 * a, 1.3) if paired_parent else stats.norm.logpdf(b, -0.1, 1.3)
        np.testing.assert_allclose(s.log_q["b"].numpy(), want_b, rtol=1e-12)
        np.testing.assert_allclose(s.log_q["d"].numpy(), stats.norm.logpdf(d, 0.2 * c - 0.1 * a[:, None], 1.0),
                                   rtol=1e-12)
        want, per_g = _hand_log_evidence(s, data, K)
        assert float(est.log_evidence(samples=s)) == pytest.approx(want, abs=1e-10)
        post = posterior(est, samples=s)
        pg = np.exp(per_g - logsumexp(per_g))
        np.testing.assert_allclose(post.marginal("a").numpy(), pg, atol=1e-10)
        np.testing.assert_allclose(post.marginal("b").numpy(), pg, atol=1e-10)


def test_unbiased_against_exact_evidence(f64):
    """Groups on a linear-Gaussian network with R independent replicates (outer plate rep)."""
    R = 3000
    lg = LinearGaussian()
    lg.add("a", sd=1.0)
    lg.add("b", {"a": 0.5}, sd=0.8)
    lg.add("c", {"a": 1.0, "b": -0.5}, sd=0.6)
    lg.add("d", {"b": 1.0}, sd=0.7)
    lg.add("x1", {"c": 1.0}, sd=0.5)
    lg.add("x2", {"c": 0.5, "d": 1.0}, sd=0.5)
    obs = {"x1": 0.7, "x2": -0.4}
    exact = lg.log_evidence(obs)

    m = tg.Model()
    m.plate("rep", size=R)
    m.latent("a", lambda: Normal(0.0, 1.0), plate="rep")
    m.latent("b", lambda a: Normal(0.5 * a, 0.8), plate="rep")
    m.latent("c", lambda a, b: Normal(a - 0.5 * b, 0.6), plate="rep")
    m.latent("d", lambda b: Normal(b, 0.7), plate="rep")
    m.observed("x1", lambda c: Normal(c, 0.5), plate="rep")
    m.observed("x2", lambda c, d: Normal(0.5 * c + d, 0.5), plate="rep")
    q = tg.Proposal(m)
    q.latent("a", lambda: Normal(0.0, 1.2), plate="rep", coupling=Group("ab"))
    q.latent("b", lambda a: Normal(0.3 * a, 1.0), plate="rep", coupling=Group("ab"))
    q.latent("c", lambda: Normal(0.2, 1.0), plate="rep", coupling=Group("cd"))
    q.latent("d", lambda c, a: Normal(-0.2 + 0.2 * a, 1.0), plate="rep", coupling=Group("cd"))
    data = {"x1": torch.full((R,), obs["x1"], dtype=F64), "x2": torch.full((R,), obs["x2"], dtype=F64)}
    est = tg.TMC(m, q, K=3, dtype=F64)
    log_est = est.log_evidence(data, seed=0, elementwise="rep")
    assert log_est.shape == (R,)
    assert_unbiased(log_est, exact)


def test_iwae_override_replaces_groups(f64):
    m, q, data = tiny()
    s = tg.IWAE(m, q, K=4, dtype=F64).sample(data, seed=0)
    assert set(s.dims.values()) == {"_joint"}


def test_errors():
    with pytest.raises(tg.TMCGraphError, match="identifier"):
        Group("not a name")
    with pytest.raises(tg.TMCGraphError, match="positive integer"):
        Group("g", K=0)
    m, _, data = tiny()
    q = tg.Proposal(m)
    q.latent("a", lambda: Normal(0.0, 1.0), coupling=Group("g", K=3))
    q.latent("b", lambda: Normal(0.0, 1.0), coupling=Group("g"))
    q.latent("c", lambda: Normal(0.0, 1.0), plate="n")
    q.latent("d", lambda: Normal(0.0, 1.0), plate="n", K=2, coupling=Group("h"))
    with pytest.raises(tg.TMCGraphError, match="group"):
        tg.TMC(m, q, K=3).sample(data, seed=0)
    assert repr(Group("g", K=3)) == "Group('g', K=3)"
    assert Group("g") == Group("g") and Group("g") != Group("h")
