"""ArviZ export (tmcgraph.export.arviz): layout, values, ArviZ's own functions, exact posterior means.

Truths: closed-form densities of the Gaussian toy written here (log-likelihood, log
joint, log weight of each draw), exact Gaussian conditioning (tests/lingauss.py) for the
posterior means, and the data itself for observed_data.
"""

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT
from lingauss import LinearGaussian
from torch.distributions import Categorical, Independent, Normal

import tmcgraph as tg
from tmcgraph.export import from_estimator, to_inference_data
from tmcgraph.export.arviz import DIAGNOSTICS
from tmcgraph.infer.diagnostics import marginal_ess, weight_ess
from tmcgraph.models.toys import gaussian_toy

az = pytest.importorskip("arviz")
xr = pytest.importorskip("xarray")

X = torch.tensor([0.3, -1.2, 2.0], dtype=torch.float64)
GROUPS = {"posterior", "log_likelihood", "sample_stats", "observed_data", DIAGNOSTICS}


def _toy(K=32, cls=tg.TMC):
    m, q = gaussian_toy()
    return cls(m, q, K=K, dtype=torch.float64), {"x": X}


def _rich(K=4):
    """Nested plates, a vector latent, two observed variables (one with an event dim)."""
    m = tg.Model()
    m.plate("groups", size=2)
    m.plate("obs", size=3)
    m.latent("mu", lambda: Independent(Normal(torch.zeros(2), 1.0), 1))
    m.latent("g", lambda mu: Normal(mu.sum(-1), 1.0), plate="groups")
    m.observed("y", lambda mu, g: Independent(Normal(mu + g[..., None], 1.0), 1), plate="groups")
    m.observed("x", lambda g: Normal(g, 1.0), plate=("groups", "obs"))
    q = tg.Proposal(m)
    q.latent("mu", lambda: Independent(Normal(torch.zeros(2), 1.5), 1))
    q.latent("g", lambda mu: Normal(mu.sum(-1), 1.2), plate="groups")
    data = {"x": torch.tensor([[0.1, 0.5, -0.2], [1.0, 1.3, 0.7]]), "y": torch.tensor([[0.2, -0.1], [0.9, 1.1]])}
    return tg.TMC(m, q, K=K), data


def test_layout_names_and_coords_round_trip():
    est, data = _rich()
    idata = from_estimator(est, data, chains=3, draws=40, seed=1, coords={"groups": ["a", "b"]})
    assert isinstance(idata, az.InferenceData) and set(idata.groups()) == GROUPS
    post = idata.posterior
    assert post["mu"].dims == ("chain", "draw", "mu_dim_0") and post["mu"].shape == (3, 40, 2)
    assert post["g"].dims == ("chain", "draw", "groups") and post["g"].shape == (3, 40, 2)
    assert list(post.coords["groups"].values) == ["a", "b"]
    assert list(post.coords["chain"].values) == [0, 1, 2] and list(post.coords["draw"].values) == list(range(40))
    ll = idata.log_likelihood
    assert ll["x"].dims == ("chain", "draw", "groups", "obs") and ll["x"].shape == (3, 40, 2, 3)
    assert ll["y"].dims == ("chain", "draw", "groups") and ll["y"].shape == (3, 40, 2)
    assert list(ll.coords["obs"].values) == [0, 1, 2]
    obs = idata.observed_data
    assert obs["x"].dims == ("groups", "obs") and obs["y"].dims == ("groups", "y_dim_0")
    np.testing.assert_array_equal(obs["x"].values, data["x"].numpy())
    np.testing.assert_array_equal(obs["y"].values, data["y"].numpy())
    ss = idata.sample_stats
    for n in ("lp", "log_weight", "log_evidence", "weight_ess", "log_weight_ess_all"):
        assert ss[n].dims == ("chain", "draw") and bool(np.isfinite(ss[n].values).all()), n
    diag = idata[DIAGNOSTICS]
    assert diag["marginal_ess_g"].dims == ("chain", "groups") and diag["marginal_ess_mu"].dims == ("chain",)
    assert diag["log_evidence"].dims == ("chain",)
    # per-chain constants are the chain's own diagnostics
    np.testing.assert_array_equal(ss["log_evidence"].values, np.repeat(diag["log_evidence"].values[:, None], 40, 1))
    assert idata.posterior.attrs["inference_library"] == "tmcgraph"


def test_values_match_closed_form_densities():
    """log_likelihood, lp and log_weight of every draw, recomputed from the toy's densities."""
    K = 8
    est, data = _toy(K)
    post = tg.posterior(est, data, seed=3)
    idata = to_inference_data(post, est, draws=300, seed=4)
    theta = torch.from_numpy(idata.posterior["theta"].values[0])  # [S]
    z = torch.from_numpy(idata.posterior["z"].values[0])  # [S, N]
    ll = Normal(z, 1.0).log_prob(X)
    np.testing.assert_allclose(idata.log_likelihood["x"].values[0], ll.numpy(), rtol=1e-12, atol=1e-12)
    lp = Normal(0.0, 1.0).log_prob(theta) + Normal(theta[:, None], 1.0).log_prob(z).sum(1) + ll.sum(1)
    np.testing.assert_allclose(idata.sample_stats["lp"].values[0], lp.numpy(), rtol=1e-10)
    log_q = Normal(0.0, 1.0).log_prob(theta) + Normal(0.0, math.sqrt(2.0)).log_prob(z).sum(1)
    logw = lp - log_q - (1 + len(X)) * math.log(K)
    # (float32 rounding of the proposal's Python-number constants, see tmcgraph.sampling.context)
    np.testing.assert_allclose(idata.sample_stats["log_weight"].values[0], logw.numpy(), rtol=1e-7)
    # the draws are particles
    parts = post.samples.values["theta"]
    assert all(bool((parts == t).any()) for t in theta)
    d = idata[DIAGNOSTICS]
    assert float(d["log_evidence"][0]) == pytest.approx(float(post.log_evidence), rel=1e-12)
    assert float(d["weight_ess"][0]) == pytest.approx(float(weight_ess(post).ess), rel=1e-12)
    np.testing.assert_allclose(d["marginal_ess_z"].values[0], marginal_ess(post, "z").numpy(), rtol=1e-12)


def test_arviz_functions_accept_it():
    est, data = _rich(K=8)
    idata = from_estimator(est, data, chains=2, draws=200, seed=0)
    summ = az.summary(idata)
    assert {"mu[0]", "mu[1]", "g[0]", "g[1]"} <= set(summ.index)
    assert np.isfinite(summ["mean"].values).all() and np.isfinite(summ["ess_bulk"].values).all()
    ess = az.ess(idata)
    assert ess["g"].dims == ("groups",) and bool((ess["g"].values > 0).all())
    assert bool(np.isfinite(az.rhat(idata)["g"].values).all())
    with pytest.raises(TypeError, match="several log likelihood"):  # two observed variables: name one
        az.loo(idata)
    loo = az.loo(idata, var_name="x")
    assert np.isfinite(loo["elpd_loo"]) and loo["n_data_points"] == 6
    assert np.isfinite(az.waic(idata, var_name="y")["elpd_waic"])
    assert np.isfinite(az.summary(idata, group="sample_stats")["mean"].values).all()
    # one observed variable: loo needs no var_name
    est1, data1 = _toy(16)
    loo1 = az.loo(from_estimator(est1, data1, chains=2, draws=200, seed=0))
    assert loo1["n_data_points"] == 3 and np.isfinite(loo1["elpd_loo"])


def test_posterior_means_agree_with_exact_linear_gaussian():
    """Exported draws over independent particle sets: mean within 4 standard errors of the exact mean."""
    lg = LinearGaussian()
    lg.add("theta")
    for i in range(len(X)):
        lg.add(f"z{i}", {"theta": 1.0})
        lg.add(f"x{i}", {f"z{i}": 1.0})
    names = ["theta"] + [f"z{i}" for i in range(len(X))]
    mean, cov = lg.posterior({f"x{i}": float(v) for i, v in enumerate(X)}, names)
    sd = np.sqrt(np.diag(cov))
    C, S = 8, 500
    est, data = _toy(K=128)
    idata = from_estimator(est, data, chains=C, draws=S, seed=11)
    draws = np.concatenate([idata.posterior["theta"].values[..., None], idata.posterior["z"].values], -1)  # [C,S,4]
    chain_means = draws.mean(1)
    se = chain_means.std(0, ddof=1) / math.sqrt(C)  # between independent particle sets: particles + draws
    err = chain_means.mean(0) - mean
    assert (se < 0.1 * sd).all(), se  # the test has power
    assert (np.abs(err) < 4 * se).all(), (err, se)
    # and the draw standard deviation matches the exact one
    np.testing.assert_allclose(draws.reshape(-1, 4).std(0), sd, rtol=0.1)


def test_iwae_enumerated_and_single_chain():
    est, data = _toy(K=16, cls=tg.IWAE)
    idata = to_inference_data(tg.posterior(est, data, seed=0), est, draws=50, seed=0)
    assert idata.posterior["theta"].shape == (1, 50) and idata.posterior["z"].shape == (1, 50, 3)
    m = tg.Model()
    m.plate("data", size=2)
    m.latent("theta", lambda: Normal(0.0, 1.0))
    m.latent("c", lambda theta: Categorical(logits=torch.stack([theta, -theta], -1)), plate="data")
    m.observed("x", lambda theta, c: Normal(theta * (2.0 * c - 1.0), 1.0), plate="data")
    q = tg.Proposal(m)
    q.latent("theta", lambda: Normal(0.0, 1.5))
    q.enumerate("c")
    est = tg.TMC(m, q, K=8)
    idata = from_estimator(est, {"x": torch.tensor([0.9, -0.2])}, chains=2, draws=100, seed=0)
    c = idata.posterior["c"].values
    assert c.shape == (2, 100, 2) and set(np.unique(c)) <= {0, 1}
    theta = idata.posterior["theta"].values
    sign = 2 * c - 1
    ll = Normal(torch.from_numpy(theta[..., None] * sign).float(), 1.0).log_prob(torch.tensor([0.9, -0.2]))
    np.testing.assert_allclose(idata.log_likelihood["x"].values, ll.numpy(), rtol=1e-5, atol=1e-6)
    assert idata[DIAGNOSTICS]["marginal_ess_c"].dims == ("chain", "data")


def test_batched_draws_give_the_same_layout_and_consistent_values():
    est, data = _toy(K=8)
    post = tg.posterior(est, data, seed=0)
    idata = to_inference_data(post, est, draws=25, seed=0, batch_size=7)
    assert idata.posterior["z"].shape == (1, 25, 3)
    z = torch.from_numpy(idata.posterior["z"].values[0])
    np.testing.assert_allclose(idata.log_likelihood["x"].values[0], Normal(z, 1.0).log_prob(X).numpy(), rtol=1e-12)


def test_datatree_container():
    est, data = _toy(K=8)
    dt = from_estimator(est, data, chains=2, draws=20, seed=0, container="datatree")
    assert isinstance(dt, xr.DataTree)
    assert {c for c in dt.children} == GROUPS
    assert dt["posterior"]["z"].dims == ("chain", "draw", "data")
    back = az.InferenceData.from_datatree(dt)
    idata = from_estimator(est, data, chains=2, draws=20, seed=0)
    np.testing.assert_array_equal(back.posterior["z"].values, idata.posterior["z"].values)
    assert az.summary(back).shape[0] == 4


def test_auto_container_follows_the_arviz_version(monkeypatch):
    est, data = _toy(K=4)
    post = tg.posterior(est, data, seed=0)
    monkeypatch.setattr(az, "__version__", "1.0.0")
    assert isinstance(to_inference_data(post, est, draws=5), xr.DataTree)
    monkeypatch.setattr(az, "__version__", "0.23.4")
    assert isinstance(to_inference_data(post, est, draws=5), az.InferenceData)


def test_errors(monkeypatch):
    est, data = _toy(K=4)
    post = tg.posterior(est, data, seed=0)
    with pytest.raises(tg.TMCGraphError, match="container"):
        to_inference_data(post, est, container="netcdf")
    with pytest.raises(tg.TMCGraphError, match="draws"):
        to_inference_data(post, est, draws=0)
    with pytest.raises(tg.TMCGraphError, match="chains"):
        from_estimator(est, data, chains=0)
    with pytest.raises(tg.TMCGraphError, match="Posterior"):
        to_inference_data([], est)
    with pytest.raises(tg.TMCGraphError, match="plate 'data'.*shape"):
        to_inference_data(post, est, draws=5, coords={"data": ["a", "b"]})
    with pytest.raises(tg.TMCGraphError, match="unknown plate 'rows'"):
        to_inference_data(post, est, draws=5, coords={"rows": [0]})
    other = tg.posterior(est, {"x": X[:2]}, seed=0)
    with pytest.raises(tg.TMCGraphError, match="chain 1"):
        to_inference_data([post, other], est, draws=5)
    m = tg.Model()
    m.plate("draw", size=2)
    m.latent("z", lambda: Normal(0.0, 1.0), plate="draw")
    m.observed("x", lambda z: Normal(z, 1.0), plate="draw")
    q = tg.Proposal(m)
    q.prior("z")
    with pytest.raises(tg.TMCGraphError, match=r"\['draw'\] collide"):
        from_estimator(tg.TMC(m, q, K=2), {"x": torch.zeros(2)}, chains=1, draws=2)
    monkeypatch.setitem(sys.modules, "arviz", None)
    with pytest.raises(ImportError, match=r"tmcgraph\[arviz\]"):
        to_inference_data(post, est, draws=5)


def test_import_loads_no_arviz():
    code = "import tmcgraph, tmcgraph.export, sys; print('arviz' in sys.modules, 'xarray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"]
