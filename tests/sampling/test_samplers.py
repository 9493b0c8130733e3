"""tmcgraph.sampling.samplers: generator-driven draws against independent truths.

Truths used: torch's own ``rsample``/``sample`` on the global RNG (same seed, same
stream), ``d.mean``/``d.variance``/``d.covariance_matrix``, ``d.cdf`` or scipy's cdf
(KS tests on the probability integral transform), ``d.log_prob`` (frequencies), and
closed forms (Gumbel-max for relaxed categoricals, the logistic law of the Concrete
distribution, von Mises circular moments, d E[Gamma]/d concentration).
"""

import math
import threading
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest
import torch
import torch.distributions as D
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import special, stats
from torch.distributions import constraints
from torch.distributions.relaxed_bernoulli import LogitRelaxedBernoulli
from torch.distributions.relaxed_categorical import ExpRelaxedCategorical

import tmcgraph.sampling.samplers as samplers
from tmcgraph.errors import TMCGraphError
from tmcgraph.sampling.samplers import GlobalRNGWarning, draw_sample, has_sampler, register_sampler

pytestmark = pytest.mark.filterwarnings("error::tmcgraph.sampling.samplers.GlobalRNGWarning")

B = (2, 3)  # batch shape of every case
N = 20000  # draws for distributional checks
Z = 5.0  # standard errors allowed


def gen(seed):
    return torch.Generator().manual_seed(seed)


def _u(g, dtype, shape, lo, hi):
    return lo + (hi - lo) * torch.rand(shape, generator=g, dtype=dtype)


def _tril(g, dtype, shape):
    """Lower-triangular factors with positive diagonal, ``shape + (k, k)`` built from leaves."""
    return {"off": _u(g, dtype, shape, -0.5, 0.5), "diag": _u(g, dtype, shape[:-1], 0.5, 1.5)}


def _scale_tril(off, diag):
    return off.tril(-1) + torch.diag_embed(diag)


# ----------------------------------------------------------------------------- checks


def _assert_within(est, truth, se, what):
    est, truth, se = est.double(), truth.double(), se.double()
    tol = Z * se + 1e-9 * (1 + truth.abs())
    bad = (est - truth).abs() > tol
    zmax = ((est - truth).abs() / se.clamp(min=1e-300)).max()
    assert not bad.any(), f"{what}: max |z| = {float(zmax):.2f}\nestimate {est}\ntruth {truth}"


def _assert_mean(x, truth, what):
    n = x.shape[0]
    _assert_within(x.mean(0), truth, x.std(0) / math.sqrt(n), what)


def _assert_uniform(u):
    u = np.asarray(u, dtype=np.float64).reshape(u.shape[0], -1)
    pvalues = [stats.kstest(u[:, i], "uniform").pvalue for i in range(u.shape[1])]
    assert min(pvalues) > 1e-4, f"KS p-values {pvalues}"


def check_ks(d, x):
    """KS test of the probability integral transform through torch's own cdf."""
    _assert_uniform(d.cdf(x).double().numpy())


def pit(fn):
    """KS test of ``fn(d, x)``, a probability integral transform from an independent cdf."""
    return lambda d, x: _assert_uniform(fn(d, x.double()))


def check_moments(d, x):
    """Sample mean, variance (and covariance for Gaussians) within Z standard errors."""
    x = x.double()
    _assert_mean(x, d.mean, "mean")
    c = x - x.mean(0)
    _assert_mean(c**2 * N / (N - 1), d.variance, "variance")
    if isinstance(d, (D.MultivariateNormal, D.LowRankMultivariateNormal)):
        _assert_mean(c.unsqueeze(-1) * c.unsqueeze(-2), d.covariance_matrix, "covariance")


def check_freq(d, x):
    """Frequencies of each support value against ``d.log_prob(v).exp()``."""
    try:
        values = d.enumerate_support(expand=True)
    except NotImplementedError:
        values = None
    if values is None:
        top = int(x.max()) + 1
        values = torch.arange(top + 1, dtype=x.dtype).reshape((-1,) + (1,) * len(B)).expand((-1,) + B)
    ev = len(d.event_shape)
    total = torch.zeros(B, dtype=torch.float64)
    for v in values:
        hit = x == v
        if ev:
            hit = hit.flatten(-ev).all(-1)
        p = d.log_prob(v).exp().double()
        se = (p * (1 - p) / x.shape[0]).sqrt()
        _assert_within(hit.double().mean(0), p, se + 1.0 / x.shape[0], f"P(X = {v.tolist()})")
        total += p
    assert (1 - total <= 10.0 / x.shape[0]).all(), "mass outside the observed values is not negligible"


def check_argmax_categorical(d, x):
    """Gumbel-max: the argmax of a relaxed one-hot draw is Categorical(probs) at any temperature."""
    hit = torch.nn.functional.one_hot(x.argmax(-1), x.shape[-1]).double()
    p = d.probs.double().expand(hit.shape[1:])
    _assert_within(hit.mean(0), p, (p * (1 - p) / x.shape[0]).sqrt(), "P(argmax = k)")


def _logistic_pit(d, y):
    """Concrete distribution: T * logit-sample - logit(p) ~ Logistic(0, 1)."""
    logit_p = d.logits.double()
    return torch.sigmoid(d.temperature.double() * y - logit_p).numpy()


def _relaxed_bernoulli_pit(d, x):
    return _logistic_pit(d, torch.log(x) - torch.log1p(-x))


def _logistic_normal_pit(d, x):
    """Stick breaking: log(x_i / sum_{j>i} x_j) + log(K - i) ~ Normal(loc_i, scale_i)."""
    k = d.loc.shape[-1]
    tail = x.flip(-1).cumsum(-1).flip(-1)[..., 1:]
    y = torch.log(x[..., :-1] / tail) + torch.log(torch.arange(k, 0, -1, dtype=x.dtype))
    return stats.norm.cdf(y.numpy(), d.loc.double().numpy(), d.scale.double().numpy())


def check_von_mises(d, x):
    """E cos(x - loc) = I1(kappa) / I0(kappa) and E sin(x - loc) = 0."""
    kappa = d.concentration.double().numpy()
    angle = x.double() - d.loc.double()
    _assert_mean(torch.cos(angle), torch.from_numpy(special.i1(kappa) / special.i0(kappa)), "E cos")
    _assert_mean(torch.sin(angle), torch.zeros(B, dtype=torch.float64), "E sin")


# ----------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    """A distribution family with leaf parameters, a builder and a distributional check."""

    name: str
    params: Callable  # (generator, dtype) -> {name: leaf tensor}
    build: Callable  # (**params) -> Distribution
    check: Callable  # (d, draws [N, *batch, *event]) -> None

    def leaves(self, dtype=torch.float32, requires_grad=False):
        p = self.params(gen(20240611), dtype)
        if requires_grad:
            p = {k: v.requires_grad_() if v.is_floating_point() else v for k, v in p.items()}
        return p

    def make(self, dtype=torch.float32):
        return self.build(**self.leaves(dtype))

    def __repr__(self):
        return self.name


def _loc_scale(g, t):
    return {"loc": _u(g, t, B, -1, 1), "scale": _u(g, t, B, 0.5, 2)}


def _mvn_params(g, t):
    return {"loc": _u(g, t, B + (3,), -1, 1), **_tril(g, t, B + (3, 3))}


CASES = [
    Case("normal", _loc_scale, D.Normal, check_ks),
    Case("uniform", lambda g, t: {"low": _u(g, t, B, -2, -1), "high": _u(g, t, B, 0.5, 2)}, D.Uniform, check_ks),
    Case("exponential", lambda g, t: {"rate": _u(g, t, B, 0.5, 2)}, D.Exponential, check_ks),
    Case("laplace", _loc_scale, D.Laplace, check_ks),
    Case("cauchy", _loc_scale, D.Cauchy, check_ks),
    Case("gamma", lambda g, t: {"concentration": _u(g, t, B, 0.4, 3), "rate": _u(g, t, B, 0.5, 2)}, D.Gamma,
         check_ks),
    Case("chi2", lambda g, t: {"df": _u(g, t, B, 1, 5)}, D.Chi2, check_ks),
    Case("beta", lambda g, t: {"concentration1": _u(g, t, B, 0.5, 3), "concentration0": _u(g, t, B, 0.5, 3)},
         D.Beta, check_moments),
    Case("dirichlet", lambda g, t: {"concentration": _u(g, t, B + (4,), 0.8, 3)}, D.Dirichlet, check_moments),
    Case("student_t", lambda g, t: {"df": _u(g, t, B, 2.5, 8), **_loc_scale(g, t)}, D.StudentT,
         pit(lambda d, x: stats.t.cdf(((x - d.loc) / d.scale).numpy(), d.df.double().numpy()))),
    Case("mvn", _mvn_params, lambda loc, off, diag: D.MultivariateNormal(loc, scale_tril=_scale_tril(off, diag)),
         check_moments),
    Case("mvn_covariance", _mvn_params,
         lambda loc, off, diag: D.MultivariateNormal(loc, _scale_tril(off, diag) @ _scale_tril(off, diag).mT),
         check_moments),
    Case("lowrank_mvn",
         lambda g, t: {"loc": _u(g, t, B + (3,), -1, 1), "cov_factor": _u(g, t, B + (3, 2), -1, 1),
                       "cov_diag": _u(g, t, B + (3,), 0.3, 1.5)},
         D.LowRankMultivariateNormal, check_moments),
    Case("continuous_bernoulli", lambda g, t: {"probs": _u(g, t, B, 0.05, 0.95)}, D.ContinuousBernoulli, check_ks),
    Case("generalized_pareto", lambda g, t: {**_loc_scale(g, t), "concentration": _u(g, t, B, -0.3, 0.3)},
         D.GeneralizedPareto, check_ks),
    Case("fisher_snedecor", lambda g, t: {"df1": _u(g, t, B, 2, 8), "df2": _u(g, t, B, 3, 9)}, D.FisherSnedecor,
         pit(lambda d, x: stats.f.cdf(x.numpy(), d.df1.double().numpy(), d.df2.double().numpy()))),
    Case("von_mises", lambda g, t: {"loc": _u(g, t, B, -3, 3), "concentration": _u(g, t, B, 0.05, 4)},
         D.VonMises, check_von_mises),
    # TransformedDistribution subclasses (one generic sampler)
    Case("half_normal", lambda g, t: {"scale": _u(g, t, B, 0.5, 2)}, D.HalfNormal, check_ks),
    Case("half_cauchy", lambda g, t: {"scale": _u(g, t, B, 0.5, 2)}, D.HalfCauchy, check_ks),
    Case("log_normal", _loc_scale, D.LogNormal, check_ks),
    Case("gumbel", _loc_scale, D.Gumbel, check_ks),
    Case("weibull", lambda g, t: {"scale": _u(g, t, B, 0.5, 2), "concentration": _u(g, t, B, 0.5, 3)},
         D.Weibull, check_ks),
    Case("pareto", lambda g, t: {"scale": _u(g, t, B, 0.5, 2), "alpha": _u(g, t, B, 0.5, 3)}, D.Pareto, check_ks),
    Case("kumaraswamy",
         lambda g, t: {"concentration1": _u(g, t, B, 0.5, 3), "concentration0": _u(g, t, B, 0.5, 3)},
         D.Kumaraswamy, check_ks),
    Case("inverse_gamma", lambda g, t: {"concentration": _u(g, t, B, 0.5, 3), "rate": _u(g, t, B, 0.5, 2)},
         D.InverseGamma, check_ks),
    Case("logistic_normal",
         lambda g, t: {"loc": _u(g, t, B + (3,), -1, 1), "scale": _u(g, t, B + (3,), 0.3, 1.2)},
         D.LogisticNormal, pit(_logistic_normal_pit)),
    Case("relaxed_bernoulli", lambda g, t: {"temperature": _u(g, t, B, 0.8, 2), "probs": _u(g, t, B, 0.2, 0.8)},
         D.RelaxedBernoulli, pit(_relaxed_bernoulli_pit)),
    Case("logit_relaxed_bernoulli",
         lambda g, t: {"temperature": _u(g, t, B, 0.5, 2), "logits": _u(g, t, B, -2, 2)},
         LogitRelaxedBernoulli, pit(_logistic_pit)),
    Case("relaxed_one_hot",
         lambda g, t: {"temperature": _u(g, t, (), 0.8, 1.2), "logits": _u(g, t, B + (4,), -2, 2)},
         D.RelaxedOneHotCategorical, check_argmax_categorical),
    Case("exp_relaxed_categorical",
         lambda g, t: {"temperature": _u(g, t, (), 0.8, 1.2), "logits": _u(g, t, B + (4,), -2, 2)},
         ExpRelaxedCategorical, check_argmax_categorical),
    # structural
    Case("independent", lambda g, t: {"loc": _u(g, t, B + (4,), -1, 1), "scale": _u(g, t, B + (4,), 0.5, 2)},
         lambda loc, scale: D.Independent(D.Normal(loc, scale), 1), check_moments),
    Case("expanded_normal", lambda g, t: {"loc": _u(g, t, (3,), -1, 1), "scale": _u(g, t, (3,), 0.5, 2)},
         lambda loc, scale: D.Normal(loc, scale).expand(B), check_ks),
    Case("expanded_weibull", lambda g, t: {"scale": _u(g, t, (3,), 0.5, 2), "concentration": _u(g, t, (3,), 1, 3)},
         lambda scale, concentration: D.Weibull(scale, concentration).expand(B), check_ks),
    Case("mixture_normal",
         lambda g, t: {"logits": _u(g, t, B + (2,), -1, 1), "loc": _u(g, t, B + (2,), -3, 3),
                       "scale": _u(g, t, B + (2,), 0.5, 1.5)},
         lambda logits, loc, scale: D.MixtureSameFamily(D.Categorical(logits=logits), D.Normal(loc, scale)),
         check_ks),
    Case("mixture_mvn",
         lambda g, t: {"probs": _u(g, t, B + (2,), 0.2, 1), "loc": _u(g, t, B + (2, 3), -3, 3),
                       **_tril(g, t, B + (2, 3, 3))},
         lambda probs, loc, off, diag: D.MixtureSameFamily(
             D.Categorical(probs), D.MultivariateNormal(loc, scale_tril=_scale_tril(off, diag))),
         check_moments),
    # discrete
    Case("bernoulli", lambda g, t: {"probs": _u(g, t, B, 0.05, 0.95)}, D.Bernoulli, check_freq),
    Case("bernoulli_logits", lambda g, t: {"logits": _u(g, t, B, -3, 3)},
         lambda logits: D.Bernoulli(logits=logits), check_freq),
    Case("categorical", lambda g, t: {"probs": _u(g, t, B + (4,), 0.1, 1)}, D.Categorical, check_freq),
    Case("categorical_logits", lambda g, t: {"logits": _u(g, t, B + (4,), -2, 2)},
         lambda logits: D.Categorical(logits=logits), check_freq),
    Case("one_hot", lambda g, t: {"probs": _u(g, t, B + (4,), 0.1, 1)}, D.OneHotCategorical, check_freq),
    Case("one_hot_straight_through", lambda g, t: {"probs": _u(g, t, B + (4,), 0.1, 1)},
         D.OneHotCategoricalStraightThrough, check_freq),
    Case("binomial", lambda g, t: {"total_count": torch.full(B, 5.0, dtype=t), "probs": _u(g, t, B, 0.1, 0.9)},
         D.Binomial, check_freq),
    Case("binomial_inhomogeneous",
         lambda g, t: {"total_count": torch.tensor([[2.0, 5, 9], [1, 4, 30]], dtype=t),
                       "probs": _u(g, t, B, 0.1, 0.9)},
         D.Binomial, check_moments),
    Case("poisson", lambda g, t: {"rate": _u(g, t, B, 0.3, 6)}, D.Poisson, check_freq),
    Case("geometric", lambda g, t: {"probs": _u(g, t, B, 0.2, 0.8)}, D.Geometric, check_freq),
    Case("negative_binomial",
         lambda g, t: {"total_count": _u(g, t, B, 0.5, 4), "probs": _u(g, t, B, 0.1, 0.6)},
         D.NegativeBinomial, check_freq),
    Case("multinomial", lambda g, t: {"probs": _u(g, t, B + (4,), 0.1, 1)},
         lambda probs: D.Multinomial(7, probs), check_moments),
]
RSAMPLE_CASES = [c for c in CASES if c.make().has_rsample]
SAMPLE_CASES = [c for c in CASES if not c.make().has_rsample]


def torch_draw(d, sample_shape):
    return d.rsample(sample_shape) if d.has_rsample else d.sample(sample_shape)


# ----------------------------------------------------------------------------- per family


def test_every_case_and_its_components_are_registered():
    for case in CASES:
        d = case.make()
        assert has_sampler(d) and has_sampler(type(d)), case.name
    assert has_sampler(D.Chi2) and D.Gamma in D.Chi2.__mro__


@pytest.mark.parametrize("sample_shape", [(), (4, 5)])
@pytest.mark.parametrize("case", CASES, ids=repr)
def test_shape_dtype_device(case, sample_shape):
    for dtype in (torch.float32, torch.float64):
        d = case.make(dtype)
        x = draw_sample(d, sample_shape, gen(0))
        reference = torch_draw(d, torch.Size(sample_shape))
        assert x.shape == torch.Size(sample_shape) + d.batch_shape + d.event_shape
        assert x.shape == reference.shape and x.dtype == reference.dtype and x.device == reference.device
        if x.is_floating_point():
            assert x.dtype == dtype


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_reproducible_and_global_rng_untouched(case):
    d = case.make()
    state = torch.get_rng_state()
    a = draw_sample(d, (50,), gen(123))
    b = draw_sample(d, (50,), gen(123))
    c = draw_sample(d, (50,), gen(124))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_same_stream_as_torch_with_same_seed(case):
    """A CPU generator seeded s reproduces torch.manual_seed(s); d.rsample() (torch's formula and order)."""
    d = case.make()
    x = draw_sample(d, (4, 5), gen(11))
    torch.manual_seed(11)
    torch.testing.assert_close(x, torch_draw(d, torch.Size((4, 5))))


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_distribution(case):
    d = case.make()
    x = draw_sample(d, (N,), gen(2024))
    case.check(d, x)


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_samples_in_support(case):
    d = case.make()
    x = draw_sample(d, (200,), gen(5))
    assert d.support.check(x).all()
    assert torch.isfinite(d.log_prob(x)).all()


# ----------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("case", RSAMPLE_CASES, ids=repr)
def test_reparameterised_gradients_equal_torch_rsample(case):
    p = case.leaves(requires_grad=True)
    leaves = [v for v in p.values() if v.requires_grad]
    z = draw_sample(case.build(**p), (3,), gen(7))
    torch.manual_seed(7)
    z_ref = case.build(**p).rsample((3,))
    w = torch.linspace(-1, 2, z.numel()).reshape(z.shape)
    grads = torch.autograd.grad((w * z).sum(), leaves, allow_unused=True)
    grads_ref = torch.autograd.grad((w * z_ref).sum(), leaves, allow_unused=True)
    assert any(g is not None for g in grads)
    for g, g_ref in zip(grads, grads_ref):
        assert (g is None) == (g_ref is None)
        if g is not None:
            assert torch.isfinite(g).all()
            torch.testing.assert_close(g, g_ref)


@pytest.mark.parametrize("case", SAMPLE_CASES, ids=repr)
def test_non_reparameterised_draws_carry_no_gradient(case):
    x = draw_sample(case.build(**case.leaves(requires_grad=True)), (3,), gen(7))
    assert not x.requires_grad


def test_normal_dz_dloc_is_identity():
    scale = torch.full(B, 0.7, dtype=torch.float64)
    loc = torch.zeros(B, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda m: draw_sample(D.Normal(m, scale), (), gen(3)), loc)
    torch.testing.assert_close(jac.reshape(6, 6), torch.eye(6, dtype=torch.float64), rtol=0, atol=0)


def test_mvn_dz_dloc_is_identity():
    tril = torch.tensor([[1.0, 0, 0], [0.5, 2, 0], [-0.3, 0.2, 0.4]], dtype=torch.float64)
    loc = torch.tensor([0.1, -0.2, 0.3], dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(
        lambda m: draw_sample(D.MultivariateNormal(m, scale_tril=tril), (), gen(3)), loc)
    torch.testing.assert_close(jac, torch.eye(3, dtype=torch.float64), rtol=0, atol=0)


def test_gamma_pathwise_gradient_is_unbiased_for_d_mean_d_concentration():
    alpha = torch.tensor([0.3, 0.7, 2.5], dtype=torch.float64)
    rate = torch.tensor([1.5, 0.8, 2.0], dtype=torch.float64)
    conc = alpha.expand(N, 3).clone().requires_grad_()
    z = draw_sample(D.Gamma(conc, rate), (), gen(99))
    (dz_dalpha,) = torch.autograd.grad(z.sum(), conc)  # one independent dz/dalpha per draw
    _assert_mean(dz_dalpha, 1 / rate, "E dz/dalpha")


# ----------------------------------------------------------------------------- properties


def _family(name, batch, dtype, g):
    if name == "normal":
        return D.Normal(torch.randn(batch, generator=g, dtype=dtype), torch.rand(batch, generator=g, dtype=dtype) + 0.1)
    if name == "bernoulli":
        return D.Bernoulli(torch.rand(batch, generator=g, dtype=dtype))
    k = int(torch.randint(1, 5, (), generator=g))
    return D.Categorical(torch.rand(batch + (k,), generator=g, dtype=dtype) + 0.01)


@settings(max_examples=60, deadline=None)
@given(
    name=st.sampled_from(["normal", "bernoulli", "categorical"]),
    batch=st.lists(st.integers(1, 4), max_size=3).map(tuple),
    sample_shape=st.lists(st.integers(1, 4), max_size=2).map(tuple),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**63 - 1),
)
def test_property_shapes_dtypes_reproducibility(name, batch, sample_shape, dtype, seed):
    d = _family(name, batch, dtype, gen(seed % 1000))
    state = torch.get_rng_state()
    a = draw_sample(d, sample_shape, gen(seed))
    b = draw_sample(d, torch.Size(sample_shape), gen(seed))
    assert torch.equal(torch.get_rng_state(), state)
    assert a.shape == torch.Size(sample_shape) + batch
    assert a.dtype == (torch.int64 if name == "categorical" else dtype)
    assert torch.equal(a, b)


# ----------------------------------------------------------------------------- fallback, registry


def _user_distribution(name):
    """A fresh Distribution subclass (no sampler registered) drawing from the global RNG."""

    def __init__(self, loc):
        self.loc = loc
        D.Distribution.__init__(self, loc.shape, validate_args=False)

    def rsample(self, sample_shape=torch.Size()):
        return self.loc + torch.randn(self._extended_shape(sample_shape), dtype=self.loc.dtype)

    attrs = {"arg_constraints": {}, "support": constraints.real, "has_rsample": True,
             "__init__": __init__, "rsample": rsample}
    return type(name, (D.Distribution,), attrs)


def _record(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn()
    return result, [w for w in caught if issubclass(w.category, GlobalRNGWarning)]


def test_fallback_warns_once_per_type_then_registration_fixes_it():
    first, second = _user_distribution("FirstUserDist"), _user_distribution("SecondUserDist")
    d1, d2 = first(torch.zeros(B)), second(torch.zeros(B))
    assert not has_sampler(d1)

    def draws():
        return [draw_sample(d, (4,), gen(1)) for d in (d1, d1, d2, d1, d2)]

    xs, caught = _record(draws)
    assert all(x.shape == (4,) + B for x in xs)
    assert len(caught) == 2
    for w, name in zip(caught, ["FirstUserDist", "SecondUserDist"]):
        message = str(w.message)
        assert name in message and "global RNG" in message and "seed=" in message
        assert "tmcgraph.sampling.samplers.register_sampler" in message
    assert not torch.equal(xs[0], xs[1])  # the global RNG moved on: not reproducible

    _, caught = _record(draws)
    assert caught == []  # once per type, not once per call site

    @register_sampler(first)
    def _(d, sample_shape, generator):
        return d.loc + torch.randn(sample_shape + d.batch_shape, generator=generator)

    state = torch.get_rng_state()
    (a, b), caught = _record(lambda: [draw_sample(d1, (4,), gen(1)), draw_sample(d1, (4,), gen(1))])
    assert caught == [] and torch.equal(a, b) and torch.equal(state, torch.get_rng_state())


def test_fallback_inside_structural_distribution_warns_for_the_component():
    inner = _user_distribution("InnerUserDist")
    d = D.Independent(inner(torch.zeros(B)), 1)
    assert has_sampler(d)
    x, caught = _record(lambda: draw_sample(d, (2,), gen(0)))
    assert x.shape == (2,) + B
    assert len(caught) == 1 and "InnerUserDist" in str(caught[0].message)


def test_mro_lookup_most_specific_wins_and_cache_follows_registration():
    parent = _user_distribution("ParentUserDist")
    child = type("ChildUserDist", (parent,), {})
    assert not has_sampler(child)  # cached negative lookup ...
    register_sampler(parent)(lambda d, s, g: torch.zeros(s + d.batch_shape))
    assert has_sampler(child)  # ... is invalidated by registration
    assert torch.equal(draw_sample(child(torch.ones(2)), (1,), gen(0)), torch.zeros(1, 2))
    register_sampler(child)(lambda d, s, g: torch.ones(s + d.batch_shape))
    assert torch.equal(draw_sample(child(torch.ones(2)), (1,), gen(0)), torch.ones(1, 2))
    assert torch.equal(draw_sample(parent(torch.ones(2)), (1,), gen(0)), torch.zeros(1, 2))


def test_chi2_uses_the_gamma_sampler():
    df = torch.tensor([1.5, 3.0, 7.0])
    a = draw_sample(D.Chi2(df), (5,), gen(4))
    b = draw_sample(D.Gamma(0.5 * df, torch.full_like(df, 0.5)), (5,), gen(4))
    assert torch.equal(a, b)


def test_generator_none_is_plain_torch():
    unregistered = _user_distribution("NoGeneratorUserDist")
    for d in [c.make() for c in CASES] + [unregistered(torch.zeros(B))]:
        torch.manual_seed(17)
        x, caught = _record(lambda: draw_sample(d, (3,)))
        torch.manual_seed(17)
        assert torch.equal(x, torch_draw(d, torch.Size((3,)))), type(d).__name__
        assert caught == []


def test_threads_with_own_generators_match_sequential_draws():
    d = D.Gamma(torch.full(B, 0.8), torch.ones(B))
    expected = [draw_sample(d, (100,), gen(s)) for s in range(4)]
    results = [None] * 4

    def work(s):
        results[s] = draw_sample(d, (100,), gen(s))

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(r, e) for r, e in zip(results, expected))


# ----------------------------------------------------------------------------- errors


def test_device_mismatch_raises_naming_type_and_devices():
    # CPU-only torch has no meta (or CUDA) generator, so the parameters go to the meta device instead.
    loc = torch.zeros(B, device="meta")
    for d, name in [(D.Normal(loc, loc + 1, validate_args=False), "Normal"),
                    (D.Independent(D.Normal(loc, loc + 1, validate_args=False), 1), "Independent")]:
        with pytest.raises(TMCGraphError, match=rf"{name}.*'meta'.*'cpu'"):
            draw_sample(d, (2,), gen(0))
    try:
        meta_generator = torch.Generator(device="meta")
    except RuntimeError:
        return
    with pytest.raises(TMCGraphError, match=r"Normal.*'cpu'.*'meta'"):
        draw_sample(D.Normal(torch.zeros(2), torch.ones(2)), (), meta_generator)


def test_bad_arguments_raise_tmcgraph_error():
    d = D.Normal(torch.zeros(2), torch.ones(2))
    with pytest.raises(TMCGraphError, match="Distribution"):
        draw_sample(torch.zeros(2), (), gen(0))
    with pytest.raises(TMCGraphError, match="generator"):
        draw_sample(d, (), generator=0)
    with pytest.raises(TMCGraphError, match="sample_shape"):
        draw_sample(d, 3, gen(0))
    with pytest.raises(TMCGraphError, match="Distribution subclass"):
        register_sampler(int)
    with pytest.raises(TMCGraphError, match="callable"):
        register_sampler(D.Normal)(None)


def test_public_names():
    assert sorted(samplers.__all__) == ["GlobalRNGWarning", "draw_sample", "has_sampler", "register_sampler"]
    assert issubclass(GlobalRNGWarning, UserWarning)
