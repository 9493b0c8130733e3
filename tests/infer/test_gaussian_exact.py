"""Linear-Gaussian models with closed-form evidence: unbiasedness of P_TMC.

Each test declares an outer plate ``rep`` of R independent copies of the model with the
same data, so one call returns R independent estimates (``elementwise="rep"``). With
w_r = exp(log P_hat_r - log p(x)), E[w] = 1 for an unbiased estimator; we require
|mean(w) - 1| < 4 standard errors and a standard error small enough to have power.
The truth comes from :mod:`lingauss` (numpy, independent of the library).
"""

import math

import pytest
import torch
from lingauss import LinearGaussian
from torch.distributions import Normal
from unbiased import assert_unbiased, z_score

import tmcgraph as tg
from tmcgraph.models.toys import gaussian_toy, gaussian_toy_data, gaussian_toy_log_evidence
from tmcgraph.ops import Factor

R = 3000


# --------------------------------------------------------------------------- toy
XTOY = [0.3, -1.2, 2.0]


def toy_truth(x):
    lg = LinearGaussian()
    lg.add("theta")
    for i in range(len(x)):
        lg.add(f"z{i}", {"theta": 1.0})
        lg.add(f"x{i}", {f"z{i}": 1.0})
    return lg.log_evidence({f"x{i}": v for i, v in enumerate(x)})


def toy_model(qz: str, qtheta: str = "own", K=3):
    m = tg.Model()
    m.plate("rep", size=R)
    m.plate("data", size=len(XTOY))
    m.latent("theta", lambda: Normal(0.0, 1.0), plate="rep")
    m.latent("z", lambda theta: Normal(theta, 1.0), plate=("rep", "data"))
    m.observed("x", lambda z: Normal(z, 1.0), plate=("rep", "data"))
    q = tg.Proposal(m)
    if qtheta == "prior":
        q.prior("theta", K=K)
    else:
        q.latent("theta", lambda: Normal(0.2, 1.1), plate="rep", K=K)
    if qz == "factorised":
        q.latent("z", lambda: Normal(0.0, math.sqrt(2.0)), plate=("rep", "data"), K=K)
    elif qz in ("paired", "mixture"):
        q.latent("z", lambda theta, x: Normal(0.5 * theta + 0.4 * x, 0.9), plate=("rep", "data"),
                 coupling=qz, K=K)
    else:  # prior-paired / prior-mixture
        q.prior("z", coupling=qz.split("-")[1], K=K)
    return m, q


def toy_data():
    return {"x": torch.tensor(XTOY).expand(R, len(XTOY))}


def test_toy_exact_formula_matches_linear_gaussian_oracle(f64):
    x = gaussian_toy_data(6, seed=3)
    assert float(gaussian_toy_log_evidence(x)) == pytest.approx(toy_truth(x.tolist()), abs=1e-9)


@pytest.mark.parametrize(
    "qz,qtheta",
    [("factorised", "own"), ("mixture", "own"), ("paired", "own"), ("prior-mixture", "own"),
     ("prior-paired", "own"), ("mixture", "prior"), ("prior-mixture", "prior")],
)
def test_toy_unbiased(f64, qz, qtheta):
    m, q = toy_model(qz, qtheta)
    est = tg.TMC(m, q, K=3).log_evidence(toy_data(), seed=1, elementwise="rep")
    assert est.shape == (R,)
    assert_unbiased(est, toy_truth(XTOY))


def test_toy_iwae_and_vae_unbiased(f64):
    m, q = toy_model("mixture")
    truth = toy_truth(XTOY)
    assert_unbiased(tg.IWAE(m, q, K=3).log_evidence(toy_data(), seed=2, elementwise="rep"), truth)
    m, q = toy_model("mixture", K=None)
    assert_unbiased(tg.VAE(m, q).log_evidence(toy_data(), seed=3, elementwise="rep"), truth, max_se=0.2)


def test_toy_tmc_converges_to_exact_at_large_K(f64):
    """The paper's Fig. 3A regime: N = 32, K = 512 is within a nat, far better than IWAE."""
    x = gaussian_toy_data(32, seed=0)
    m, q = gaussian_toy(32)
    exact = float(gaussian_toy_log_evidence(x))
    tmc = [float(tg.TMC(m, q, K=512).log_evidence({"x": x}, seed=s)) for s in range(3)]
    iwae = [float(tg.IWAE(m, q, K=512).log_evidence({"x": x}, seed=s)) for s in range(3)]
    assert all(exact - 1.0 < t < exact + 1.0 for t in tmc), (exact, tmc)
    assert max(iwae) < min(tmc) - 5, (iwae, tmc)


# ------------------------------------------------------------------------- chain
CHAIN_X = {"x2": 0.8, "x4": -0.5}


def chain_truth():
    lg = LinearGaussian()
    lg.add("z1", sd=1.0)
    lg.add("z2", {"z1": 0.9}, sd=0.5)
    lg.add("x2", {"z2": 1.0}, sd=0.7)
    lg.add("z3", {"z2": 0.9}, sd=0.5)
    lg.add("z4", {"z3": 0.9}, sd=0.5)
    lg.add("x4", {"z4": 1.0}, sd=0.7)
    return lg.log_evidence(CHAIN_X)


@pytest.mark.parametrize("coupling", ["paired", "mixture"])
def test_chain_with_several_observations_unbiased(f64, coupling):
    m = tg.Model()
    m.plate("rep", size=R)
    m.latent("z1", lambda: Normal(0.0, 1.0), plate="rep")
    m.latent("z2", lambda z1: Normal(0.9 * z1, 0.5), plate="rep")
    m.observed("x2", lambda z2: Normal(z2, 0.7), plate="rep")
    m.latent("z3", lambda z2: Normal(0.9 * z2, 0.5), plate="rep")
    m.latent("z4", lambda z3: Normal(0.9 * z3, 0.5), plate="rep")
    m.observed("x4", lambda z4: Normal(z4, 0.7), plate="rep")
    q = tg.Proposal(m)
    q.latent("z1", lambda: Normal(0.3, 1.0), plate="rep")
    q.latent("z2", lambda z1, x2: Normal(0.4 * z1 + 0.5 * x2, 0.6), plate="rep", coupling=coupling)
    q.prior("z3", coupling=coupling)
    q.latent("z4", lambda z3, x4: Normal(0.5 * z3 + 0.4 * x4, 0.6), plate="rep", coupling=coupling)
    data = {k: torch.full((R,), v) for k, v in CHAIN_X.items()}
    est = tg.TMC(m, q, K=3).log_evidence(data, seed=4, elementwise="rep")
    assert_unbiased(est, chain_truth())


# ------------------------------------------------------------------ nested plates
NESTED_X = [[0.5, 1.1, 0.2], [-0.7, -1.5, -0.4]]


def nested_truth():
    lg = LinearGaussian()
    lg.add("theta", sd=1.0)
    obs = {}
    for i, row in enumerate(NESTED_X):
        lg.add(f"z{i}", {"theta": 1.0}, sd=0.8)
        for j, v in enumerate(row):
            lg.add(f"x{i}{j}", {f"z{i}": 1.0}, sd=0.6)
            obs[f"x{i}{j}"] = v
    return lg.log_evidence(obs)


@pytest.mark.parametrize("coupling", ["paired", "mixture"])
def test_plated_model_with_shared_global_latent_unbiased(f64, coupling):
    m = tg.Model()
    m.plate("rep", size=R)
    m.plate("data", size=2)
    m.plate("obs", size=3)
    m.latent("theta", lambda: Normal(0.0, 1.0), plate="rep")
    m.latent("z", lambda theta: Normal(theta, 0.8), plate=("rep", "data"))
    m.observed("x", lambda z: Normal(z, 0.6), plate=("rep", "data", "obs"))
    q = tg.Proposal(m)
    q.latent("theta", lambda: Normal(0.0, 1.2), plate="rep")
    # amortised over the group's observations: x arrives with its extra "obs" plate trailing
    q.latent("z", lambda theta, x: Normal(0.3 * theta + 0.6 * x.mean(-1), 0.7), plate=("rep", "data"),
             coupling=coupling)
    data = {"x": torch.tensor(NESTED_X).expand(R, 2, 3)}
    est = tg.TMC(m, q, K=3).log_evidence(data, seed=5, elementwise="rep")
    assert_unbiased(est, nested_truth())


# ---------------------------------------------- the wrong densities are detectably biased
def _replace(factors, name, tensor):
    return [Factor(f.name, tensor, f.sample_dims, f.plates) if f.name == name else f for f in factors]


def _contract_rep(est, factors, levels):
    return tg.ops.contract(est.plan(tg.FactorGraph(factors, levels, keep="rep")), [f.tensor for f in factors])


def test_grid_proposal_density_is_biased_but_mixture_density_is_not(f64):
    """Evaluating Q over the full child x parent grid (instead of the mixture density) is biased."""
    m, q = toy_model("mixture")
    est = tg.TMC(m, q, K=3)
    r = est.run(toy_data(), seed=6, elementwise="rep")
    truth = toy_truth(XTOY)
    assert_unbiased(r.log_evidence, truth)
    s = r.samples
    fz = next(f for f in r.factors if f.name == "z")
    assert fz.sample_dims == ("z", "theta")
    th = s.values["theta"][None, :, :, None]  # [1, K_theta, R, 1]
    zz = s.values["z"][:, None]  # [K_z, 1, R, N]
    x = torch.tensor(XTOY)
    lq_grid = Normal(0.5 * th + 0.4 * x, 0.9).log_prob(zz)  # [K_z, K_theta, R, N]
    wrong = fz.tensor + s.log_q["z"][:, None] - lq_grid
    biased = _contract_rep(est, _replace(r.factors, "z", wrong), s.ordinals)
    z, _ = z_score(biased, truth)
    assert abs(z) > 5, f"grid density should be detectably biased, z = {z:.2f}"


def test_cancelling_prior_sampled_site_is_biased(f64):
    """Cancelling P/Q of a prior-sampled latent over the full grid is biased; the engine does not."""
    m, q = toy_model("prior-mixture")
    est = tg.TMC(m, q, K=3)
    r = est.run(toy_data(), seed=7, elementwise="rep")
    truth = toy_truth(XTOY)
    assert_unbiased(r.log_evidence, truth)
    fz = next(f for f in r.factors if f.name == "z")
    wrong = torch.full_like(fz.tensor, -math.log(3))
    biased = _contract_rep(est, _replace(r.factors, "z", wrong), r.samples.ordinals)
    z, _ = z_score(biased, truth)
    assert abs(z) > 5, f"cancelled prior factor should be detectably biased, z = {z:.2f}"
