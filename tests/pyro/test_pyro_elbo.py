"""tmcgraph.pyro.TraceTMC_ELBO: unbiased where Pyro's TraceTMC_ELBO is not, finite where Pyro's underflows,
and a working loss for pyro.infer.SVI."""

import pytest

pyro = pytest.importorskip("pyro")

import pyro.distributions as dist  # noqa: E402
import torch  # noqa: E402
from pyro.infer import SVI  # noqa: E402
from pyro.infer import TraceTMC_ELBO as PyroTraceTMC_ELBO  # noqa: E402
from pyro.optim import Adam  # noqa: E402
from pyro_programs import (  # noqa: E402
    BIAS_LOG_EVIDENCE,
    UNDERFLOW_X,
    bias_guide,
    bias_model,
    plate_model,
    pyro_tmc_per_element,
    underflow_guide,
    underflow_log_evidence,
    underflow_model,
)
from unbiased import assert_unbiased, z_score  # noqa: E402

import tmcgraph as tg  # noqa: E402
import tmcgraph.pyro as tgp  # noqa: E402

R = 3000  # replicates of each estimate, as elements of a plate


@pytest.fixture(autouse=True)
def _clean_param_store():
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()


@pytest.mark.parametrize("K", [3, 10])
@pytest.mark.parametrize("coupling,tmc", [("paired", "diagonal"), ("mixture", "mixture"), ("permutation", None)])
def test_bridge_is_unbiased_and_pyro_is_not(coupling, tmc, K):
    """z1 ~ N(0,1), z2 ~ N(z1,1), x = 2 ~ N(z2,1); guide z1 ~ N(0.5,1), z2 ~ N(0.8 z1 + 0.3, 0.8).

    The bridge: mean of exp(log P_TMC - log p(x)) within 4 standard errors of 1 over R
    independent estimates (one per element of a replicate plate). Pyro's TraceTMC_ELBO on
    the same program (the site's ``tmc`` strategy; per plate element, its elements summing
    to Pyro's loss on the same draws): the same statistic more than 5 standard errors away
    (it divides by the guide's density over the whole grid of parent particles).
    """
    bridge = tgp.TMC(bias_model, bias_guide, max_plate_nesting=1, dtype=torch.float64,
                     coupling=None if tmc else coupling)
    tr = bridge.translate(R, K, tmc)
    assert tr.proposal["z2"].coupling == coupling and tr.proposal["z2"].parents == ("z1",)
    est = bridge.log_evidence(R, K, tmc, seed=K, elementwise="rep")
    assert est.shape == (R,)
    assert_unbiased(est, BIAS_LOG_EVIDENCE)
    if tmc is None:
        return  # Pyro has no permutation coupling
    pyro.set_rng_seed(K)
    small = pyro_tmc_per_element(bias_model, bias_guide, (20, K, tmc))
    pyro.set_rng_seed(K)
    loss = PyroTraceTMC_ELBO(max_plate_nesting=1).loss(bias_model, bias_guide, 20, K, tmc)
    assert float(small.sum()) == pytest.approx(-loss, abs=1e-3)
    theirs = pyro_tmc_per_element(bias_model, bias_guide, (R, K, tmc))
    z, _ = z_score(theirs, BIAS_LOG_EVIDENCE)
    assert z > 5, f"Pyro's TraceTMC_ELBO looked unbiased here (z = {z:.2f}); the bias check has no power"


def test_float32_underflow_case_is_finite_and_exact_where_pyro_gives_minus_inf():
    """Two likelihood factors whose maxima sit at different components, 104 nats apart, in float32."""
    exact = underflow_log_evidence()
    pyro_value = -PyroTraceTMC_ELBO(max_plate_nesting=0).loss(underflow_model, underflow_guide, UNDERFLOW_X)
    assert pyro_value == float("-inf")
    ours = tgp.TMC(underflow_model, underflow_guide, max_plate_nesting=0).log_evidence(UNDERFLOW_X)
    assert ours.dtype == torch.float32 and torch.isfinite(ours)
    assert float(ours) == pytest.approx(exact, abs=1e-3)
    loss = tgp.TraceTMC_ELBO(max_plate_nesting=0).loss(underflow_model, underflow_guide, UNDERFLOW_X)
    assert loss == pytest.approx(-exact, abs=1e-3)


def _guide(x):
    loc = pyro.param("mu_loc", torch.tensor(-2.0))
    a = pyro.param("a", torch.tensor(0.0))
    b = pyro.param("b", torch.tensor(0.0))
    scale = pyro.param("scale", torch.tensor(2.0), constraint=dist.constraints.positive)
    mu = pyro.sample("mu", dist.Normal(loc, 1.0), infer={"num_samples": 4})
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(a * mu + b * x, scale), infer={"num_samples": 4, "tmc": "mixture"})


def _bound(x, reps=10):
    est = tgp.TMC(plate_model, _guide, max_plate_nesting=1)
    with torch.no_grad():
        return float(torch.stack([est.log_evidence(x, seed=s) for s in range(reps)]).mean())


def test_svi_trains_a_small_model_to_a_better_bound():
    g = torch.Generator().manual_seed(1)
    x = 1.5 + torch.randn(10, generator=g) * 1.2
    start = _bound(x)
    svi = SVI(plate_model, _guide, Adam({"lr": 0.05}), loss=tgp.TraceTMC_ELBO(max_plate_nesting=1, seed=0))
    losses = [svi.step(x) for _ in range(100)]
    assert all(isinstance(v, float) for v in losses)
    end = _bound(x)
    assert end > start + 2.0, (start, end)
    assert float(pyro.param("b").detach()) > 0.1  # z's guide learnt to use the data


def test_elbo_interface():
    x = torch.randn(6)
    elbo = tgp.TraceTMC_ELBO(max_plate_nesting=1, seed=3)
    v = elbo.differentiable_loss(plate_model, _guide, x)
    assert torch.is_tensor(v) and v.requires_grad and v.shape == ()
    f = elbo.loss_and_grads(plate_model, _guide, x)
    assert isinstance(f, float) and pyro.param("mu_loc").unconstrained().grad is not None
    assert isinstance(elbo.loss(plate_model, _guide, x), float)
    # an int seed is a private generator advanced by every call: two losses with one seed agree
    a = tgp.TraceTMC_ELBO(max_plate_nesting=1, seed=5)
    b = tgp.TraceTMC_ELBO(max_plate_nesting=1, seed=5)
    assert [a.loss(plate_model, _guide, x) for _ in range(3)] == [b.loss(plate_model, _guide, x) for _ in range(3)]
    # seed=None draws from torch's global generator, so pyro.set_rng_seed reproduces a run
    c = tgp.TraceTMC_ELBO(max_plate_nesting=1, num_particles=2)
    pyro.set_rng_seed(0)
    first = c.loss(plate_model, _guide, x)
    pyro.set_rng_seed(0)
    assert c.loss(plate_model, _guide, x) == first
    # max_plate_nesting found from the traces when not given
    assert tgp.TraceTMC_ELBO(seed=0).loss(plate_model, _guide, x) == tgp.TraceTMC_ELBO(
        max_plate_nesting=1, seed=0).loss(plate_model, _guide, x)
    with pytest.raises(tg.TMCGraphError, match="seed"):
        tgp.TraceTMC_ELBO(seed="x")
