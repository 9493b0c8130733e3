"""Pyro programs of the bridge tests, each beside its native tmcgraph declaration and exact evidence."""

import math

import pyro
import pyro.distributions as dist
import torch
from torch.distributions import Normal

import tmcgraph as tg


def sample_infer(K=None, tmc=None, exact=False):
    """The ``infer`` dict of a TMC site: ``num_samples=K`` (and ``tmc``), or exact enumeration."""
    if exact:
        return {"enumerate": "parallel"}
    out = {"enumerate": "parallel"}
    if K is not None:
        out["num_samples"] = K
    if tmc is not None:
        out["tmc"] = tmc
    return out


# ---------------------------------------------------------------- the TMC paper's Gaussian toy


def toy_model(x, K=16):
    theta = pyro.sample("theta", dist.Normal(0.0, 1.0))
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(theta, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)


def toy_guide(x, K=16):
    pyro.sample("theta", dist.Normal(0.0, 1.0), infer=sample_infer(K))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(0.0, math.sqrt(2.0)), infer=sample_infer(K))


# ---------------------------------------------------------------- a chain with a non-factorised guide


def chain_model(x, n=4, K=3, tmc=None):
    z = pyro.sample("z1", dist.Normal(0.0, 1.0))
    for i in range(2, n + 1):
        z = pyro.sample(f"z{i}", dist.Normal(z, 1.0))
    pyro.sample("x", dist.Normal(z, 1.0), obs=x)


def chain_guide(x, n=4, K=3, tmc=None):
    z = pyro.sample("z1", dist.Normal(0.5, 1.0), infer=sample_infer(K, tmc))
    for i in range(2, n + 1):
        z = pyro.sample(f"z{i}", dist.Normal(0.8 * z + 0.3, 0.8), infer=sample_infer(K, tmc))


def chain_native(n=4, coupling=None):
    """The chain and its guide declared with tmcgraph."""
    m = tg.Model()
    m.latent("z1", lambda: Normal(0.0, 1.0))
    for i in range(2, n + 1):
        m.latent(f"z{i}", lambda p: Normal(p, 1.0), parents=[f"z{i - 1}"])
    m.observed("x", lambda p: Normal(p, 1.0), parents=[f"z{n}"])
    q = tg.Proposal(m)
    q.latent("z1", lambda: Normal(0.5, 1.0))
    for i in range(2, n + 1):
        q.latent(f"z{i}", lambda p: Normal(0.8 * p + 0.3, 0.8), parents=[f"z{i - 1}"], coupling=coupling)
    return m, q


def chain_log_evidence(x, n=4) -> float:
    """x ~ N(0, n + 1)."""
    return float(Normal(0.0, math.sqrt(n + 1.0)).log_prob(torch.as_tensor(x, dtype=torch.float64)))


# ---------------------------------------------------------------- a plate model with a non-factorised guide


def plate_model(x, K=4, tmc=None):
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(mu, 1.0))
        pyro.sample("x", dist.Normal(z, 0.5), obs=x)


def plate_guide(x, K=4, tmc=None):
    mu = pyro.sample("mu", dist.Normal(0.3, 1.0), infer=sample_infer(K))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(0.5 * mu + 0.4 * x, 0.9), infer=sample_infer(K, tmc))


def plate_native(N, coupling=None):
    m = tg.Model()
    m.plate("data", size=N)
    m.latent("mu", lambda: Normal(0.0, 1.0))
    m.latent("z", lambda mu: Normal(mu, 1.0), plate="data")
    m.observed("x", lambda z: Normal(z, 0.5), plate="data")
    q = tg.Proposal(m)
    q.latent("mu", lambda: Normal(0.3, 1.0))
    q.latent("z", lambda mu, x: Normal(0.5 * mu + 0.4 * x, 0.9), plate="data", coupling=coupling)
    return m, q


# ---------------------------------------------------------------- the bias case, replicated over a plate

BIAS_X = 2.0
#: log N(2; 0, 3): z1 ~ N(0, 1), z2 ~ N(z1, 1), x ~ N(z2, 1).
BIAS_LOG_EVIDENCE = -0.5 * math.log(2 * math.pi * 3.0) - BIAS_X**2 / 6.0


def bias_model(R=1, K=3, tmc=None):
    with pyro.plate("rep", R):
        z1 = pyro.sample("z1", dist.Normal(0.0, 1.0))
        z2 = pyro.sample("z2", dist.Normal(z1, 1.0))
        pyro.sample("x", dist.Normal(z2, 1.0), obs=torch.full((R,), BIAS_X))


def bias_guide(R=1, K=3, tmc=None):
    with pyro.plate("rep", R):
        z1 = pyro.sample("z1", dist.Normal(0.5, 1.0), infer=sample_infer(K, tmc))
        pyro.sample("z2", dist.Normal(0.8 * z1 + 0.3, 0.8), infer=sample_infer(K, tmc))


# ---------------------------------------------------------------- the 104-nat underflow case

#: Two component means 14.4222 apart: each observation's log-likelihood is 0 under one
#: component and -104 nats under the other, so the two likelihood factors' maxima sit at
#: different components, 104 nats apart.
GAP = math.sqrt(2 * 104.0)
UNDERFLOW_X = torch.tensor([0.0, GAP])


def underflow_model(x):
    mu = torch.tensor([0.0, GAP])
    c = pyro.sample("c", dist.Categorical(torch.tensor([0.5, 0.5])), infer={"enumerate": "parallel"})
    pyro.sample("x1", dist.Normal(mu[c], 1.0), obs=x[0])
    pyro.sample("x2", dist.Normal(mu[c], 1.0), obs=x[1])


def underflow_guide(x):
    pass


def underflow_log_evidence() -> float:
    """log sum_c 1/2 N(x1; mu_c, 1) N(x2; mu_c, 1), in float64."""
    x = UNDERFLOW_X.double()
    mu = torch.tensor([0.0, GAP], dtype=torch.float64)
    lp = Normal(mu, 1.0).log_prob(x[0]) + Normal(mu, 1.0).log_prob(x[1]) + math.log(0.5)
    return float(torch.logsumexp(lp, 0))


def pyro_tmc_per_element(model, guide, args, plate="rep", max_plate_nesting=1):
    """Pyro's ``TraceTMC_ELBO`` estimate of log p(x) per element of ``plate``.

    The traces and log-factors are those of Pyro's loss (its ``_get_traces``,
    ``_compute_tmc_factors`` and ``_compute_dice_factors``) and the contraction is its
    ``_compute_tmc_estimate``'s log-space einsum (``pyro.ops.einsum.torch_log``) with the
    plate's symbol kept in the output as a batch dim instead of multiplied out (the plate
    must be the programs' only one); the elements sum to minus Pyro's loss on the same
    draws.
    """
    from pyro.infer import TraceTMC_ELBO
    from pyro.infer.tracetmc_elbo import _compute_dice_factors, _compute_tmc_factors
    from pyro.ops.einsum import contract

    elbo = TraceTMC_ELBO(max_plate_nesting=max_plate_nesting)
    model_trace, guide_trace = next(elbo._get_traces(model, guide, args, {}))
    factors = _compute_tmc_factors(model_trace, guide_trace) + _compute_dice_factors(model_trace, guide_trace)
    symbols = {**guide_trace.plate_to_symbol, **model_trace.plate_to_symbol}
    eqn = ",".join(f._pyro_dims for f in factors) + "->" + symbols[plate]
    assert list(symbols) == [plate], symbols
    return contract(eqn, *factors, backend="pyro.ops.einsum.torch_log")
