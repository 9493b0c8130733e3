"""QEM against exact posterior moments (closed-form Gaussian conditioning) and the EMA it promises.

* Conjugate hierarchical Normal model mu -> z_i -> x_i (i = 1..4): the exact posterior
  marginals come from :mod:`lingauss`. QEM's mean-field Normal proposal must converge to
  them as K grows, with tolerances per K on the worst error over seeds (proposal
  parameters averaged over iterations 80..199, lr = 0.1):

  ========  ====================  ==================
  K         max |mean error|      max |sd error|
  ========  ====================  ==================
  3         0.20                  0.20
  10        0.06                  0.06
  30        0.03                  0.03
  ========  ====================  ==================

  (posterior sds 0.46-0.49; measured errors were about half of these bounds; 4 independent
  runs at once, as an outer plate of 4 copies of the model), and the mean error must fall
  with K. The global version (IWAE weights) is checked at K = 30.
* One update equals the EMA of the mean parameters (E z, E z^2) computed by hand from the
  brute-force posterior moments of the same particles.
"""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from lingauss import LinearGaussian
from scipy import stats
from scipy.special import logsumexp, softmax
from torch.distributions import Normal

import tmcgraph as tg
from tmcgraph.infer.fit import fit
from tmcgraph.infer.posterior import posterior
from tmcgraph.infer.qem import QEM, MeanFieldNormal, families

F64 = torch.float64
X = torch.tensor([1.5, 0.3, 2.2, -0.4], dtype=F64)
TOL = {3: 0.20, 10: 0.06, 30: 0.03}


@pytest.fixture(autouse=True)
def _one_thread():
    """Small tensors: one torch thread is faster than two competing ones (conftest restores the count)."""
    torch.set_num_threads(1)


def exact_posterior():
    lg = LinearGaussian()
    lg.add("mu", sd=1.0)
    for i in range(4):
        lg.add(f"z{i}", {"mu": 1.0}, sd=1.0)
    for i in range(4):
        lg.add(f"x{i}", {f"z{i}": 1.0}, sd=0.5)
    mean, cov = lg.posterior({f"x{i}": float(X[i]) for i in range(4)}, ["mu"] + [f"z{i}" for i in range(4)])
    return mean, np.sqrt(np.diag(cov))


def conjugate(R=None):
    """The model; with ``R``, R independent copies of it in an outer plate ``rep`` (R runs in one)."""
    m = tg.Model()
    rep = () if R is None else ("rep",)
    if R is not None:
        m.plate("rep", size=R)
    m.plate("n", size=4)
    m.latent("mu", lambda: Normal(torch.zeros((), dtype=F64), 1.0), plate=rep or None)
    m.latent("z", lambda mu: Normal(mu, 1.0), plate=rep + ("n",))
    m.observed("x", lambda z: Normal(z, 0.5), plate=rep + ("n",))
    q = tg.Proposal(m)
    r = [] if R is None else [R]
    q.latent("mu", MeanFieldNormal(r).double(), plate=rep or None)
    q.latent("z", MeanFieldNormal(r + [4]).double(), plate=rep + ("n",))
    return m, q


def run_qem(cls, K, R=4, seed=0, iterations=200, burn=80):
    """Proposal locs and sds ``[R, 5]`` (mu, z_1..z_4) averaged over iterations ``burn..``, R independent runs."""
    m, q = conjugate(R)
    est = cls(m, q, K=K, dtype=F64, compile=False)
    locs, sds = [], []

    def record(i, rec):
        if i >= burn:
            locs.append(torch.cat([q["mu"].fn.loc.detach()[:, None], q["z"].fn.loc.detach()], 1))
            sds.append(torch.cat([q["mu"].fn.log_scale.detach()[:, None], q["z"].fn.log_scale.detach()], 1).exp())

    fit(est, {"x": X.expand(R, 4)}, QEM(0.1), iterations=iterations, seed=seed, progress=False, callback=record)
    return torch.stack(locs).mean(0).numpy(), torch.stack(sds).mean(0).numpy()


def test_qem_converges_to_exact_posterior_moments_as_K_grows():
    mean, sd = exact_posterior()
    worst = {}
    for K in TOL:
        loc, s = run_qem(tg.TMC, K)
        worst[K] = np.abs(loc - mean).max(), np.abs(s - sd).max()
        assert worst[K][0] < TOL[K], f"K={K}: mean error {worst[K][0]:.3f}"
        assert worst[K][1] < TOL[K], f"K={K}: sd error {worst[K][1]:.3f}"
    assert worst[3][0] > worst[10][0] > worst[30][0] or worst[30][0] < TOL[30] / 2


def test_global_qem_converges_at_K30():
    mean, sd = exact_posterior()
    loc, s = run_qem(tg.IWAE, 30, iterations=150, burn=50)
    assert np.abs(loc - mean).max() < 2 * TOL[30] and np.abs(s - sd).max() < 2 * TOL[30]


def test_one_update_is_ema_of_brute_force_moments():
    m, q = conjugate()
    with torch.no_grad():
        q["mu"].fn.loc.fill_(0.3)
        q["z"].fn.log_scale.fill_(0.2)
    est = tg.TMC(m, q, K=3, dtype=F64, compile=False)
    s = est.sample({"x": X}, seed=4)
    mu, z = s.values["mu"].detach().numpy(), s.values["z"].detach().numpy()   # [3], [3, 4]
    lq_mu, lq_z = s.log_q["mu"].detach().numpy(), s.log_q["z"].detach().numpy()
    # brute force over the 3 * 3^4 index combinations (plates unrolled)
    lw_mu = stats.norm.logpdf(mu, 0, 1) - lq_mu                                       # [3]
    lw_z = (stats.norm.logpdf(z[None], mu[:, None, None], 1) + stats.norm.logpdf(X.numpy(), z[None], 0.5)
            - lq_z[None])                                                             # [3 mu, 3 z, 4]
    inner = logsumexp(lw_z, axis=1)                                                   # [3 mu, 4]
    p_mu = softmax(lw_mu + inner.sum(1))
    p_z = (p_mu[:, None, None] * np.exp(lw_z - inner[:, None, :])).sum(0)             # [3 z, 4]
    m1 = {"mu": (p_mu * mu).sum(), "z": (p_z * z).sum(0)}
    m2 = {"mu": (p_mu * mu ** 2).sum(), "z": (p_z * z ** 2).sum(0)}
    old = {n: (q[n].fn.loc.detach().numpy().copy(), np.exp(2 * q[n].fn.log_scale.detach().numpy())) for n in m1}
    lr = 0.3
    post = posterior(est, samples=s)
    for name, fam in families(est).items():
        fam.update(fam.moments_of(post, name), lr)
    for n in m1:
        loc0, var0 = old[n]
        e1 = (1 - lr) * loc0 + lr * m1[n]
        e2 = (1 - lr) * (var0 + loc0 ** 2) + lr * m2[n]
        np.testing.assert_allclose(q[n].fn.loc.detach().numpy(), e1, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(np.exp(2 * q[n].fn.log_scale.detach().numpy()), e2 - e1 ** 2, rtol=1e-8)


def test_lr_one_sets_the_moments_and_generic_update():
    f = MeanFieldNormal([2]).double()
    f.update((torch.tensor([1.0, 2.0], dtype=F64), torch.tensor([2.0, 4.5], dtype=F64)), 1.0)
    np.testing.assert_allclose(f.loc.detach().numpy(), [1.0, 2.0])
    np.testing.assert_allclose(f.log_scale.detach().exp().numpy() ** 2, [1.0, 0.5])
    # the base-class EMA of mean parameters agrees with the stable form
    g = MeanFieldNormal([2]).double()
    moments = (torch.tensor([0.5, -1.0], dtype=F64), torch.tensor([1.0, 3.0], dtype=F64))
    g.update(moments, 0.25)
    h = MeanFieldNormal([2]).double()
    super(MeanFieldNormal, h).update(moments, 0.25)  # ExponentialFamily.update: EMA of (E z, E z^2)
    np.testing.assert_allclose(g.loc.detach().numpy(), h.loc.detach().numpy(), rtol=1e-12)
    np.testing.assert_allclose(g.log_scale.detach().numpy(), h.log_scale.detach().numpy(), rtol=1e-10)


@settings(max_examples=60, deadline=None)
@given(mu=st.floats(-50, 50), sd=st.floats(1e-3, 20), mu_hat=st.floats(-50, 50), sd_hat=st.floats(0, 20),
       lr=st.floats(1e-3, 1.0))
def test_stable_update_is_the_ema_of_mean_parameters(mu, sd, mu_hat, sd_hat, lr):
    f = MeanFieldNormal([1], min_scale=1e-12).double()
    with torch.no_grad():
        f.loc.fill_(mu)
        f.log_scale.fill_(np.log(sd))
    f.update(tuple(torch.tensor([v], dtype=F64) for v in (mu_hat, sd_hat ** 2 + mu_hat ** 2, sd_hat ** 2)), lr)
    m1 = (1 - lr) * mu + lr * mu_hat
    m2 = (1 - lr) * (sd ** 2 + mu ** 2) + lr * (sd_hat ** 2 + mu_hat ** 2)
    assert float(f.loc.detach()) == pytest.approx(m1, rel=1e-12, abs=1e-12)
    var = float(f.log_scale.detach().exp() ** 2)
    assert var > 0
    assert var == pytest.approx(max(m2 - m1 ** 2, 1e-24), rel=1e-6, abs=1e-9 * (1 + m2))


def test_resized_keeps_fitted_block():
    f = MeanFieldNormal([2, 3], event_dims=1)
    with torch.no_grad():
        f.loc.copy_(torch.arange(6.0).reshape(2, 3))
    g = f.resized([4, 3], loc=9.0, log_scale=1.0)
    assert torch.equal(g.loc[:2], f.loc) and (g.loc[2:] == 9).all() and (g.log_scale[2:] == 1).all()
    with pytest.raises(tg.TMCGraphError, match="event dim"):
        f.resized([4, 5])


def test_errors():
    m, _ = conjugate()
    q = tg.Proposal(m)
    q.latent("mu", lambda: Normal(0.0, 1.0))
    q.latent("z", lambda: Normal(0.0, 1.0), plate="n")
    est = tg.TMC(m, q, K=3)
    with pytest.raises(tg.TMCGraphError, match="no latent's proposal is an ExponentialFamily"):
        fit(est, {"x": X}, QEM(0.1), iterations=1, progress=False)
    q2 = tg.Proposal(m)
    q2.latent("mu", MeanFieldNormal(()))

    class Dep(MeanFieldNormal):
        def forward(self, mu):
            return Normal(mu + self.loc, self.log_scale.exp())

    q2.latent("z", Dep([4]), plate="n")
    with pytest.raises(tg.TMCGraphError, match="has parents"):
        families(tg.TMC(m, q2, K=3))
    with pytest.raises(tg.TMCGraphError, match="EMA rate"):
        QEM(1.5)
    with pytest.raises(tg.TMCGraphError, match="positive number"):
        QEM(0.0)
