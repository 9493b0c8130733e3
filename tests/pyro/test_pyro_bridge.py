"""The bridge against independent truths: native tmcgraph declarations on the same particles, an
enumeration oracle written with Pyro's own log-densities, closed-form evidence, exact enumeration."""

import itertools
import math

import pytest

pyro = pytest.importorskip("pyro")

import pyro.distributions as dist  # noqa: E402
import torch  # noqa: E402
from pyro import poutine  # noqa: E402
from pyro.nn import PyroModule, PyroParam  # noqa: E402
from pyro_programs import (  # noqa: E402
    chain_guide,
    chain_log_evidence,
    chain_model,
    chain_native,
    plate_guide,
    plate_model,
    plate_native,
    toy_guide,
    toy_model,
)
from torch import nn  # noqa: E402
from torch.distributions import Normal  # noqa: E402

import tmcgraph as tg  # noqa: E402
from tmcgraph.models import toys  # noqa: E402
from tmcgraph.pyro import TMC  # noqa: E402

F64 = torch.float64
COUPLINGS = [("paired", "diagonal"), ("mixture", "mixture"), ("permutation", None)]


@pytest.fixture(autouse=True)
def _clean_param_store():
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()


def native(m, q, K):
    return tg.TMC(m, q, K=K, dtype=F64, compile=False)


# ---------------------------------------------------------------- same particles as native declarations


@pytest.mark.parametrize("seed", [0, 1])
def test_gaussian_toy_equals_native_and_is_near_exact(seed):
    x = toys.gaussian_toy_data(16, seed=3, dtype=F64)
    bridge = TMC(toy_model, toy_guide, max_plate_nesting=1, dtype=F64)
    m, q = toys.gaussian_toy(16)
    v = bridge.log_evidence(x, 16, seed=seed)
    assert float(v) == pytest.approx(float(native(m, q, 16).log_evidence({"x": x}, seed=seed)), abs=1e-6)
    if seed:
        return
    big = torch.stack([bridge.log_evidence(x, 64, seed=s) for s in range(3)])
    exact = float(toys.gaussian_toy_log_evidence(x))  # MVN(0, 2I + 11^T)
    assert abs(float(big.mean()) - exact) < 1.5


@pytest.mark.parametrize("coupling,tmc", COUPLINGS)
def test_chain_equals_native(coupling, tmc):
    x = torch.tensor(1.3, dtype=F64)
    m, q = chain_native(4, coupling)
    want = native(m, q, 3).log_evidence({"x": x}, seed=3)
    if tmc is not None:  # the site's tmc setting
        got = TMC(chain_model, chain_guide, max_plate_nesting=0, dtype=F64).log_evidence(x, 4, 3, tmc, seed=3)
        assert float(got) == pytest.approx(float(want), abs=1e-6)
    # the bridge's coupling= argument
    got = TMC(chain_model, chain_guide, max_plate_nesting=0, dtype=F64, coupling=coupling).log_evidence(
        x, 4, 3, None, seed=3)
    assert float(got) == pytest.approx(float(want), abs=1e-6)


@pytest.mark.parametrize("coupling,tmc", COUPLINGS)
def test_plate_model_equals_native(coupling, tmc):
    x = torch.randn(5, dtype=F64)
    m, q = plate_native(5, coupling)
    for seed in (0, 7):
        want = native(m, q, 4).log_evidence({"x": x}, seed=seed)
        got = TMC(plate_model, plate_guide, max_plate_nesting=1, dtype=F64, coupling=coupling).log_evidence(
            x, 4, tmc, seed=seed)
        assert float(got) == pytest.approx(float(want), abs=1e-6)


def test_chain_near_exact_with_many_particles():
    x = torch.tensor(0.7, dtype=F64)
    bridge = TMC(chain_model, chain_guide, max_plate_nesting=0, dtype=F64, coupling="permutation")
    vals = torch.stack([bridge.log_evidence(x, 4, 200, None, seed=s) for s in range(5)])
    assert abs(float(vals.mean()) - chain_log_evidence(0.7, 4)) < 0.1


# ---------------------------------------------------------------- an oracle from Pyro's own densities


def _pyro_log_p(x, mu, z):
    tr = poutine.trace(poutine.condition(plate_model, data={"mu": mu, "z": z})).get_trace(x)
    return tr.log_prob_sum()


def _pyro_log_q_z(x, mu, z):
    """log Q(z_n | mu) per element from the Pyro guide."""
    tr = poutine.trace(poutine.condition(plate_guide, data={"mu": mu, "z": z})).get_trace(x)
    return tr.nodes["z"]["fn"].log_prob(z)


def _pyro_log_q_mu(x, mu):
    tr = poutine.trace(poutine.condition(plate_guide, data={"mu": mu, "z": torch.zeros_like(x)})).get_trace(x)
    return tr.nodes["mu"]["fn"].log_prob(mu)


@pytest.mark.parametrize("coupling", ["paired", "mixture", "permutation"])
def test_plate_model_equals_enumeration_oracle(coupling):
    """Every index combination of the bridge's particles, densities from Pyro traces (plates unrolled)."""
    N, K = 2, 3
    x = torch.tensor([0.4, -1.1], dtype=F64)
    bridge = TMC(plate_model, plate_guide, max_plate_nesting=1, dtype=F64, coupling=coupling)
    ev = bridge.run(x, K, None, seed=5)
    mu, z = ev.samples.values["mu"], ev.samples.values["z"]  # [K], [K, N]
    # the density each z particle was drawn from, given all particles of mu
    lq_given = torch.stack([_pyro_log_q_z(x, mu[j], z) for j in range(K)])  # [j, k, n]
    if coupling == "paired":
        lq_z = torch.stack([lq_given[k, k] for k in range(K)])
    else:
        lq_z = torch.logsumexp(lq_given, 0) - math.log(K)
    lq_mu = torch.stack([_pyro_log_q_mu(x, mu[k]) for k in range(K)])
    terms = []
    for kmu, *kz in itertools.product(range(K), *[range(K)] * N):
        zc = torch.stack([z[kz[n], n] for n in range(N)])
        lw = _pyro_log_p(x, mu[kmu], zc) - lq_mu[kmu] - sum(lq_z[kz[n], n] for n in range(N))
        terms.append(lw)
    oracle = torch.logsumexp(torch.stack(terms), 0) - (1 + N) * math.log(K)
    assert float(ev.log_evidence) == pytest.approx(float(oracle), abs=1e-6)
    assert float(tg.brute_force(ev.graph)) == pytest.approx(float(oracle), abs=1e-6)


# ---------------------------------------------------------------- per-site settings


def test_per_site_num_samples_and_couplings():
    def guide(x):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0), infer={"num_samples": 3})
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(mu, 1.0), infer={"num_samples": 5, "tmc": "mixture"})

    x = torch.randn(4)
    bridge = TMC(plate_model, guide, max_plate_nesting=1, K=2)
    tr = bridge.translate(x)
    assert tr.proposal["mu"].K == 3 and tr.proposal["z"].K == 5 and tr.proposal["z"].coupling == "mixture"
    ev = bridge.run(x, seed=0)
    assert ev.samples.sizes == {"mu": 3, "z": 5}
    assert tr.model["z"].parents == ("mu",) and tr.model["x"].parents == ("z",)
    assert tr.proposal["z"].parents == ("mu",)


def test_model_latent_without_guide_site_is_drawn_from_its_prior():
    def model(x):
        a = pyro.sample("a", dist.Normal(0.0, 1.0), infer={"enumerate": "parallel", "num_samples": 6})
        pyro.sample("x", dist.Normal(a, 1.0), obs=x)

    def guide(x):
        pass

    x = torch.tensor(0.5, dtype=F64)
    tr = TMC(model, guide, max_plate_nesting=0).translate(x)
    assert tr.proposal["a"].prior and tr.proposal["a"].K == 6
    m = tg.Model()
    m.latent("a", lambda: Normal(0.0, 1.0))
    m.observed("x", lambda a: Normal(a, 1.0))
    q = tg.Proposal(m)
    q.prior("a", K=6)
    want = native(m, q, 6).log_evidence({"x": x}, seed=2)
    got = TMC(model, guide, max_plate_nesting=0, dtype=F64).log_evidence(x, seed=2)
    assert float(got) == pytest.approx(float(want), abs=1e-6)


def test_exact_enumeration_of_a_discrete_site_equals_the_mixture_likelihood():
    w = torch.tensor([0.2, 0.5, 0.3], dtype=F64)
    locs = torch.tensor([-2.0, 0.0, 3.0], dtype=F64)

    def model(x):
        with pyro.plate("data", x.shape[0]):
            c = pyro.sample("c", dist.Categorical(w), infer={"enumerate": "parallel"})
            pyro.sample("x", dist.Normal(locs[c], 1.0), obs=x)

    def guide(x):
        pass

    x = torch.tensor([0.1, 2.5, -1.7, 4.0], dtype=F64)
    exact = torch.logsumexp(Normal(locs, 1.0).log_prob(x[:, None]) + w.log(), -1).sum()
    bridge = TMC(model, guide, max_plate_nesting=1, dtype=F64)
    assert bridge.translate(x).proposal["c"].enumerate
    assert float(bridge.log_evidence(x, seed=0)) == pytest.approx(float(exact), abs=1e-9)
    post = bridge.posterior(x, seed=0)
    resp = torch.softmax(Normal(locs, 1.0).log_prob(x[:, None]) + w.log(), -1)  # exact responsibilities
    assert torch.allclose(post.marginal("c").T, resp, atol=1e-9)


def test_guide_enumerated_site_is_marginalised_exactly():
    def model(x):
        c = pyro.sample("c", dist.Bernoulli(torch.tensor(0.3, dtype=F64)))
        pyro.sample("x", dist.Normal(3.0 * c, 1.0), obs=x)

    def guide(x):
        pyro.sample("c", dist.Bernoulli(torch.tensor(0.9, dtype=F64)), infer={"enumerate": "parallel"})

    x = torch.tensor(2.0, dtype=F64)
    exact = torch.logsumexp(torch.stack([Normal(0.0, 1.0).log_prob(x) + math.log(0.7),
                                         Normal(3.0, 1.0).log_prob(x) + math.log(0.3)]), 0)
    assert float(TMC(model, guide, max_plate_nesting=0, dtype=F64).log_evidence(x)) == pytest.approx(
        float(exact), abs=1e-9)


def test_nested_plates_deterministic_and_factor_sites_are_unbiased():
    """Replicates over an outer plate; pyro.factor and pyro.deterministic inside; exact evidence by quadrature."""
    x = torch.tensor([0.3, -0.8, 1.2], dtype=F64)
    R = 3000

    def model(R):
        with pyro.plate("rep", R, dim=-1):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            w = pyro.deterministic("w", 2 * z)
            pyro.factor("pen", -0.5 * z**2)
            with pyro.plate("data", 3, dim=-2):
                pyro.sample("x", dist.Normal(w / 2, 1.0), obs=x[:, None].expand(3, R))

    def guide(R):
        with pyro.plate("rep", R, dim=-1):
            pyro.sample("z", dist.Normal(0.2, 0.8), infer={"num_samples": 4})

    zs = torch.linspace(-12, 12, 240001, dtype=F64)
    lp = Normal(0.0, 1.0).log_prob(zs) - 0.5 * zs**2 + Normal(zs[:, None], 1.0).log_prob(x).sum(-1)
    exact = float(torch.logsumexp(lp, 0) + math.log(float(zs[1] - zs[0])))
    bridge = TMC(model, guide, max_plate_nesting=2, dtype=F64)
    tr = bridge.translate(R)
    assert list(tr.model.plates) == ["data", "rep"] and "w" not in tr.model and "pen" in tr.model
    v = bridge.log_evidence(R, seed=0, elementwise="rep")
    assert v.shape == (R,)
    w = torch.exp(v - exact)
    assert abs(float(w.mean()) - 1) < 4 * float(w.std()) / math.sqrt(R)


# ---------------------------------------------------------------- posterior queries, gradients, parameters


def test_posterior_by_site_name_equals_native_posterior():
    x = torch.randn(5, dtype=F64)
    m, q = plate_native(5, "mixture")
    want = tg.posterior(native(m, q, 6), {"x": x}, seed=1)
    post = TMC(plate_model, plate_guide, max_plate_nesting=1, dtype=F64).posterior(x, 6, "mixture", seed=1)
    assert set(post.sites) == {"mu", "z"}
    for site in ("mu", "z"):
        assert torch.allclose(post.marginal(site), want.marginal(site), atol=1e-9)
        assert torch.allclose(post.mean(site), want.mean(site), atol=1e-9)
        assert torch.allclose(post.std(site), want.std(site), atol=1e-9)
    assert torch.allclose(post.marginal("z").sum(0), torch.ones(5, dtype=F64))
    draws = post.sample(7, seed=0)
    ref = want.sample(7, seed=0)
    assert set(draws) == {"mu", "z"} and draws["z"].shape == (7, 5)
    assert torch.equal(draws["z"], ref["z"]) and torch.equal(draws["mu"], ref["mu"])
    with pytest.raises(tg.TMCGraphError, match="'x'"):
        post.mean("x")


def test_posterior_mean_near_exact_gaussian_posterior():
    x = toys.gaussian_toy_data(6, seed=1, dtype=F64)
    post = TMC(toy_model, toy_guide, max_plate_nesting=1, dtype=F64).posterior(x, 512, seed=0)
    # exact: theta | x ~ N(sum(x) / (N + 2), 2 / (N + 2))
    assert float(post.mean("theta")) == pytest.approx(float(x.sum()) / 8, abs=0.15)


def test_gradients_reach_pyro_params_as_native():
    x = torch.randn(4, dtype=F64)

    def guide(x):
        loc = pyro.param("loc", torch.tensor(0.3, dtype=F64))
        mu = pyro.sample("mu", dist.Normal(loc, 1.0), infer={"num_samples": 4})
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(0.5 * mu + 0.4 * x, 0.9), infer={"num_samples": 4})

    v = TMC(plate_model, guide, max_plate_nesting=1, dtype=F64).log_evidence(x, seed=4)
    v.backward()
    got = pyro.param("loc").grad.clone()
    loc = torch.tensor(0.3, dtype=F64, requires_grad=True)
    m, q0 = plate_native(4)
    q = tg.Proposal(m)
    q.latent("mu", lambda: Normal(loc, 1.0))
    q.latent("z", q0["z"].fn, plate="data")
    w = native(m, q, 4).log_evidence({"x": x}, seed=4)
    w.backward()
    assert float(v.detach()) == pytest.approx(float(w.detach()), abs=1e-9)
    assert float(got) == pytest.approx(float(loc.grad), abs=1e-9)


def test_pyro_module_and_nn_module_parameters_get_gradients():
    enc = nn.Linear(1, 2)

    class Model(PyroModule):
        def __init__(self):
            super().__init__()
            self.scale = PyroParam(torch.tensor(0.7), constraint=dist.constraints.positive)

        def forward(self, x):
            mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
            with pyro.plate("data", x.shape[0]):
                z = pyro.sample("z", dist.Normal(mu, self.scale))
                pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(x):
        pyro.module("enc", enc)
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0), infer={"num_samples": 3})
        with pyro.plate("data", x.shape[0]):
            out = enc(x.unsqueeze(-1))
            pyro.sample("z", dist.Normal(out[..., 0] + 0.1 * mu, out[..., 1].exp()),
                        infer={"num_samples": 3, "tmc": "mixture"})

    model = Model()
    x = torch.randn(5)
    v = TMC(model, guide, max_plate_nesting=1).log_evidence(x, seed=0)
    assert torch.isfinite(v)
    v.backward()
    assert model.scale_unconstrained.grad is not None and float(model.scale_unconstrained.grad.abs()) > 0
    assert enc.weight.grad is not None and float(enc.weight.grad.abs().sum()) > 0


def test_float32_by_default_and_seeded_reproducibly():
    x = torch.randn(5)
    bridge = TMC(plate_model, plate_guide, max_plate_nesting=1)
    a, b = bridge.log_evidence(x, seed=3), bridge.log_evidence(x, seed=3)
    assert a.dtype == torch.float32 and float(a) == float(b)
    m, q = plate_native(5)
    c = tg.TMC(m, q, K=4, compile=False).log_evidence({"x": x}, seed=3)
    assert c.dtype == torch.float32 and float(a) == pytest.approx(float(c), abs=1e-5)
    state = torch.get_rng_state()
    bridge.log_evidence(x, seed=4)
    assert torch.equal(state, torch.get_rng_state())  # a seeded call leaves the global RNG alone


def test_structure_is_translated_once_per_shape():
    bridge = TMC(plate_model, plate_guide, max_plate_nesting=1)
    t1 = bridge.translate(torch.randn(5))
    assert bridge.translate(torch.randn(5)) is t1
    assert bridge.translate(torch.randn(6)) is not t1  # a new plate size is a new structure
    assert bridge.translate(torch.randn(6)).plates == {"data": (6, -1)}


def test_translation_callables_need_bound_arguments():
    x = torch.randn(3)
    tr = TMC(plate_model, plate_guide, max_plate_nesting=1).translate(x)
    with pytest.raises(tg.TMCGraphError, match="not bound"):
        tr.estimator.log_evidence({"x": x}, seed=0)
    with tr.bound((x,)):
        assert torch.isfinite(tr.estimator.log_evidence({"x": x}, seed=0))


def test_site_names_that_are_not_identifiers():
    def model(x):
        a = pyro.sample("layer.0/a", dist.Normal(0.0, 1.0))
        pyro.sample("obs-x", dist.Normal(a, 1.0), obs=x)

    def guide(x):
        pyro.sample("layer.0/a", dist.Normal(0.0, 1.0), infer={"num_samples": 4})

    x = torch.tensor(0.2)
    bridge = TMC(model, guide, max_plate_nesting=0)
    tr = bridge.translate(x)
    assert tr.names == {"layer.0/a": "layer_0_a", "obs-x": "obs_x"}
    post = bridge.posterior(x, seed=0)
    assert post.marginal("layer.0/a").shape == (4,)
    assert set(post.sample(3, seed=0)) == {"layer.0/a"}
