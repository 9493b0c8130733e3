"""Crossed plates (users x items): rejected with the options at validation; with ``q.joint`` exact
against brute force on the same particles and unbiased against the closed-form evidence.

Model (linear Gaussian, closed form)::

    a_u ~ N(0, SA^2) (plate users),  b_i ~ N(0, SB^2) (plate items),  mu ~ N(0, 1)
    y_ui ~ N(mu + a_u + b_i, S^2)   (plates users x items)

so y ~ N(0, 1 1^T + SA^2 [u = u'] + SB^2 [i = i'] + S^2 I).
"""

import math

import pytest
import torch
from torch.distributions import MultivariateNormal, Normal
from unbiased import assert_unbiased, z_score

import tmcgraph as tg
from tmcgraph.ops.oracle import brute_force

SA, SB, S = 0.8, 1.1, 0.6


def crossed(U, NI, with_mu=True, joint=None, K=None, reps=None):
    """The model and proposal; ``reps``: an outer plate of independent replicates (one call, many estimates)."""
    m = tg.Model()
    outer = ()
    if reps is not None:
        m.plate("rep", size=reps)
        outer = ("rep",)
    m.plate("users", size=U)
    m.plate("items", size=NI)
    if with_mu:
        m.latent("mu", lambda: Normal(0.0, 1.0), plate=outer or None)
    m.latent("a", lambda: Normal(0.0, SA), plate=outer + ("users",))
    m.latent("b", lambda: Normal(0.0, SB), plate=outer + ("items",))
    if with_mu:
        m.observed("y", lambda mu, a, b: Normal(mu + a + b, S), plate=outer + ("users", "items"))
    else:
        m.observed("y", lambda a, b: Normal(a + b, S), plate=outer + ("users", "items"))
    q = tg.Proposal(m)
    if with_mu:
        q.latent("mu", lambda: Normal(0.1, 1.2), K=K, plate=outer or None)
    q.latent("a", lambda: Normal(0.0, 1.0), plate=outer + ("users",))
    q.latent("b", lambda: Normal(0.05, 1.3), plate=outer + ("items",))
    if joint is not None:
        q.joint(joint)
    return m, q


def exact_log_evidence(y, with_mu=True):
    U, NI = y.shape
    u = torch.arange(U).repeat_interleave(NI)
    i = torch.arange(NI).repeat(U)
    cov = SA**2 * (u[:, None] == u[None, :]) + SB**2 * (i[:, None] == i[None, :]) + S**2 * torch.eye(U * NI)
    if with_mu:
        cov = cov + 1.0
    return float(MultivariateNormal(torch.zeros(U * NI, dtype=torch.float64), cov.double()).log_prob(y.reshape(-1)))


def test_validation_names_the_crossed_plates_and_the_options():
    m, q = crossed(3, 2)
    with pytest.raises(tg.TMCGraphError) as e:
        tg.TMC(m, q, K=4)  # before any data
    msg = str(e.value)
    for part in ("crossed plates", "['a']", "['b']", "'users'", "'items'", "q.joint", "'auto'"):
        assert part in msg, (part, msg)


def test_unknown_or_repeated_joint_plate_is_rejected():
    m, q = crossed(3, 2)
    with pytest.raises(tg.TMCGraphError, match="unknown plate 'rows'"):
        q.joint("rows")
    q.joint("items")
    with pytest.raises(tg.TMCGraphError, match="declared twice"):
        q.joint("items")


def test_auto_picks_the_smaller_plate():
    m, q = crossed(5, 2, joint="auto")
    assert q.joint_plates == ("items",)
    m, q = crossed(2, 5, joint="auto")
    assert q.joint_plates == ("users",)


@pytest.mark.parametrize("joint", ["users", "items", "auto"])
@pytest.mark.parametrize("with_mu", [False, True])
def test_equals_brute_force_on_the_same_particles(f64, joint, with_mu):
    m, q = crossed(3, 2, with_mu=with_mu, joint=joint, K=2)
    y = torch.randn(3, 2, generator=torch.Generator().manual_seed(1))
    for compile in (False, True):
        est = tg.TMC(m, q, K=3, compile=compile)
        for seed in range(3):  # the first call, then the structure's program
            r = est.run({"y": y}, seed=seed)
            assert float(r.log_evidence) == pytest.approx(float(brute_force(r.graph)), rel=1e-10)
    across = [d for d in r.samples.sizes if d.startswith("_across_")]
    assert across == [f"_across_{q.joint_plates[0]}"]


def test_posterior_marginals_and_draws_run_on_crossed_plates(f64):
    m, q = crossed(3, 2, joint="items")
    y = torch.randn(3, 2, generator=torch.Generator().manual_seed(2))
    post = tg.posterior(tg.TMC(m, q, K=4), {"y": y}, seed=0)
    assert post.marginal("a").shape == (4, 3)
    mb = post.marginal("b")  # one index for the whole item vector: the same weights for every item
    assert mb.shape == (4, 2) and torch.allclose(mb[:, 0], mb[:, 1])
    assert torch.allclose(post.marginal("a").sum(0), torch.ones(3, dtype=torch.float64))
    draws = post.sample(7, seed=1)
    assert draws["b"].shape == (7, 2) and draws["a"].shape == (7, 3)


@pytest.mark.parametrize("joint", ["items", "users"])
def test_unbiased_against_the_closed_form_evidence(f64, joint):
    """3000 independent estimates in one call: replicates are an outer plate kept per element."""
    U, NI, R = 4, 3, 3000
    y = torch.randn(U, NI, generator=torch.Generator().manual_seed(3)) * 1.5
    exact = exact_log_evidence(y)
    m, q = crossed(U, NI, joint=joint, reps=R)
    vals = tg.TMC(m, q, K=8, compile=False).log_evidence({"y": y.expand(R, U, NI)}, seed=0, elementwise="rep")
    assert vals.shape == (R,)
    assert_unbiased(vals.detach(), exact)
    # power: a factor-2 error in the estimate (e.g. a wrong denominator) is detected
    z, _ = z_score(vals.detach() + math.log(2.0), exact)
    assert abs(z) > 5
