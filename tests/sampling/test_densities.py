"""tmcgraph.sampling.densities: fused log-densities against torch.distributions and by hand.

Truths: ``torch.distributions``' own ``log_prob`` (values and gradients, in float64), the
Bernoulli log-likelihood written out as ``x log sigmoid(l) + (1 - x) log sigmoid(-l)``,
and brute-force enumeration of the TMC sum on a model with a Bernoulli likelihood.
"""

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributions import Bernoulli, Independent, Normal

import tmcgraph as tg
from tmcgraph.errors import TMCGraphError
from tmcgraph.sampling import densities
from tmcgraph.sampling.densities import bernoulli_logits_log_prob, log_prob, register_log_prob


def _by_hand(logits, x):
    lg, x = logits.double(), x.double()
    return (x * torch.nn.functional.logsigmoid(lg) + (1 - x) * torch.nn.functional.logsigmoid(-lg)).sum(-1)


shapes = st.sampled_from([
    ((5,), (5,)), ((3, 5), (5,)), ((3, 5), (3, 5)), ((4, 3, 5), (3, 5)), ((4, 1, 3, 5), (2, 3, 5)),
    ((1, 3, 5), (4, 3, 5)), ((2, 1, 7), (1, 6, 7)),
])


@settings(max_examples=60, deadline=None)
@given(shapes=shapes, scale=st.sampled_from([1e-3, 1.0, 30.0, 1e4]), grey=st.booleans(), seed=st.integers(0, 2**16),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_bernoulli_values_and_gradients_match_torch(shapes, scale, grey, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    ls, xs = shapes
    logits = (scale * torch.randn(ls, generator=g, dtype=torch.float64)).to(dtype).requires_grad_()
    x = torch.rand(xs, generator=g, dtype=torch.float64)
    x = (x if grey else (x < 0.4).double()).to(dtype)
    d = Independent(Bernoulli(logits=logits, validate_args=not grey), 1)
    got = log_prob(d, x)
    ref = d.log_prob(x)  # torch's path: the distribution's own method
    assert got.shape == ref.shape == torch.broadcast_shapes(torch.Size(ls), torch.Size(xs))[:-1]
    assert torch.isfinite(got).all()
    tol = 1e-4 * (1 + ref.detach().abs()) if dtype == torch.float32 else 1e-10 * (1 + ref.detach().abs())
    assert ((got - ref).abs() <= tol).all()
    assert ((got.double() - _by_hand(logits.detach(), x)).abs() <= tol.double()).all()
    w = torch.randn(got.shape, generator=g, dtype=torch.float64).to(dtype)
    (ga,) = torch.autograd.grad((got * w).sum(), logits)
    (gb,) = torch.autograd.grad((ref * w).sum(), logits)
    assert torch.allclose(ga, gb, rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=1e-5)


def test_bernoulli_with_probs_and_a_gradient_to_the_value():
    p = torch.tensor([[0.1, 0.5, 0.999], [1e-6, 0.3, 0.7]], dtype=torch.float64, requires_grad=True)
    x = torch.tensor([0.2, 1.0, 0.0], dtype=torch.float64, requires_grad=True)
    d = Independent(Bernoulli(probs=p, validate_args=False), 1)
    got, ref = log_prob(d, x), d.log_prob(x)
    assert torch.allclose(got, ref, rtol=1e-12)
    ga = torch.autograd.grad(got.sum(), (p, x), retain_graph=True)  # the lazy logits are shared
    gb = torch.autograd.grad(ref.sum(), (p, x))
    assert all(torch.allclose(u, v, rtol=1e-10) for u, v in zip(ga, gb))


def test_support_is_validated_as_torch_does():
    d = Independent(Bernoulli(logits=torch.zeros(3), validate_args=True), 1)
    with pytest.raises(ValueError, match="support"):
        d.log_prob(torch.tensor([0.5, 1.0, 0.0]))
    with pytest.raises(ValueError, match="support"):
        log_prob(d, torch.tensor([0.5, 1.0, 0.0]))


@pytest.mark.parametrize("case", ["mixed-dtype", "broadcast-event", "two-event-dims", "normal", "subclass"])
def test_other_cases_fall_back_to_the_distributions_own_log_prob(case, monkeypatch):
    calls = []
    monkeypatch.setattr(densities, "bernoulli_logits_log_prob", lambda *a: calls.append(a))
    lg = torch.randn(2, 3, 4, dtype=torch.float64)
    if case == "mixed-dtype":
        d, x = Independent(Bernoulli(logits=lg), 1), torch.ones(4)
    elif case == "broadcast-event":
        d, x = Independent(Bernoulli(logits=lg[..., :1]), 1), torch.ones(4, dtype=torch.float64)
    elif case == "two-event-dims":
        d, x = Independent(Bernoulli(logits=lg), 2), torch.ones(3, 4, dtype=torch.float64)
    elif case == "normal":
        d, x = Independent(Normal(lg, 1.0), 1), torch.ones(4, dtype=torch.float64)
    else:
        class Mine(Independent):
            pass
        d, x = Mine(Bernoulli(logits=lg), 1), torch.ones(4, dtype=torch.float64)
    assert torch.equal(log_prob(d, x), d.log_prob(x)) and not calls


def test_register_log_prob_rejects_bad_input_and_replaces():
    with pytest.raises(TMCGraphError, match="Distribution subclass"):
        register_log_prob(int)
    with pytest.raises(TMCGraphError, match="callable"):
        register_log_prob(Normal)(3)

    class Flat(Normal):
        pass

    try:
        register_log_prob(Flat)(lambda d, v: torch.zeros(v.shape))
        assert torch.equal(log_prob(Flat(0.0, 1.0), torch.ones(2)), torch.zeros(2))
        register_log_prob(Flat)(lambda d, v: NotImplemented)
        assert torch.allclose(log_prob(Flat(0.0, 1.0), torch.ones(2)), Normal(0.0, 1.0).log_prob(torch.ones(2)))
    finally:
        densities._REGISTRY.pop(Flat, None)


def test_bernoulli_logits_log_prob_never_forms_the_particle_product():
    """[K, B, D] logits against [B, D] data: the result is [K, B] and equals torch's."""
    lg = torch.randn(7, 3, 11)
    x = (torch.rand(3, 11) < 0.5).float()
    got = bernoulli_logits_log_prob(lg, x)
    assert got.shape == (7, 3)
    assert torch.allclose(got, Independent(Bernoulli(logits=lg), 1).log_prob(x), atol=1e-4)


@pytest.mark.parametrize("compile", [False, True])
def test_tmc_with_a_bernoulli_likelihood_equals_brute_force_enumeration(compile):
    """The pipeline's estimate at drawn particles equals the explicit K^2-term sum (eager and compiled)."""
    D, K = 6, 3
    w1, w2 = torch.randn(2, D, dtype=torch.float64), torch.randn(D, dtype=torch.float64)
    x = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    m = tg.Model()
    m.latent("a", lambda: Normal(torch.zeros((), dtype=torch.float64), 1.0))
    m.latent("b", lambda a: Normal(a, 1.0))
    m.observed("x", lambda a, b: Independent(Bernoulli(logits=a[..., None] * w1[0] + b[..., None] * w1[1] + w2), 1))
    q = tg.Proposal(m)
    q.latent("a", lambda: Normal(torch.tensor(0.3, dtype=torch.float64), 1.2))
    q.latent("b", lambda: Normal(torch.tensor(-0.2, dtype=torch.float64), 0.9))
    est = tg.TMC(m, q, K=K, compile=compile)

    def N(loc, scale):  # float64 parameters, as the declarations' broadcast gives
        return Normal(torch.as_tensor(loc, dtype=torch.float64), torch.as_tensor(scale, dtype=torch.float64))

    for seed in range(3):  # the first call builds the program, later ones run it
        val = est.log_evidence({"x": x}, seed=seed)
        s = est.sample({"x": x}, seed=seed)
        a, b = s.values["a"].reshape(-1), s.values["b"].reshape(-1)
        terms = []
        for i, j in itertools.product(range(K), range(K)):
            lp = N(0.0, 1.0).log_prob(a[i]) + N(a[i], 1.0).log_prob(b[j])
            lp = lp + _by_hand(a[i] * w1[0] + b[j] * w1[1] + w2, x)
            lq = N(0.3, 1.2).log_prob(a[i]) + N(-0.2, 0.9).log_prob(b[j])
            terms.append(lp - lq)
        ref = torch.logsumexp(torch.stack(terms), 0) - 2 * math.log(K)
        assert float(val) == pytest.approx(float(ref), abs=1e-9)
