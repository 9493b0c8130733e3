"""Log-space contraction numerics: extreme factors, -inf, gradients (hypothesis).

The reference is a float64 brute-force logsumexp over every index combination
(:func:`tmcgraph.brute_force` on float64 copies of the same factors).
"""

import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import tmcgraph as tg
from tmcgraph.ops import Factor
from tmcgraph.ops.backends import log as logb

SETTINGS = dict(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def factor_graphs(draw):
    """Random plated factor graphs over 1-4 dims with log-values spanning up to +-1000 nats."""
    n = draw(st.integers(1, 4))
    P = draw(st.sampled_from([None, 2, 3]))
    dims = [f"d{i}" for i in range(n)]
    sizes = {d: draw(st.integers(1, 4)) for d in dims}
    levels = {d: (("p",) if P and draw(st.booleans()) else ()) for d in dims}
    assume(math.prod(sizes[d] ** (P if levels[d] else 1) for d in dims) <= 5000)
    scale = draw(st.sampled_from([1.0, 30.0, 100.0, 1000.0]))
    nf = draw(st.integers(1, 5))
    factors = []
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**20)))
    for i in range(nf):
        fd = draw(st.lists(st.sampled_from(dims), unique=True, min_size=0, max_size=3))
        plated = any(levels[d] for d in fd) or (P is not None and draw(st.booleans()))
        plates = ("p",) if plated else ()
        shape = [sizes[d] for d in fd] + ([P] if plated else [])
        t = torch.randn(shape, generator=g, dtype=torch.float64) * scale
        if draw(st.booleans()):  # sprinkle impossible values
            t = torch.where(torch.rand(shape, generator=g, dtype=torch.float64) < 0.3, -math.inf, t)
        factors.append(Factor(f"f{i}", t, tuple(fd), plates))
    # every dim appears at least once
    for d in dims:
        if not any(d in f.sample_dims for f in factors):
            plates = ("p",) if levels[d] else ()
            shape = [sizes[d]] + ([P] if plates else [])
            factors.append(Factor(f"u{d}", torch.randn(shape, generator=g, dtype=torch.float64) * scale, (d,), plates))
    return factors, levels


def cast(factors, dtype, grad=False):
    return [Factor(f.name, f.tensor.to(dtype).detach().requires_grad_(grad), f.sample_dims, f.plates) for f in factors]


@settings(**SETTINGS)
@given(factor_graphs(), st.sampled_from([torch.float32, torch.float64]))
def test_extreme_factors_match_float64_brute_force(graph, dtype):
    factors, levels = graph
    ref = float(tg.brute_force(tg.FactorGraph(cast(factors, torch.float64), levels)))
    fs = cast(factors, dtype)
    got = tg.ops.contract(tg.ops.plan_for(tg.FactorGraph(fs, levels)), [f.tensor for f in fs])
    assert got.dtype == dtype
    if math.isinf(ref):
        assert float(got) == -math.inf
    else:
        assert math.isfinite(float(got)), f"finite truth {ref} came back as {float(got)}"
        tol = 1e-9 if dtype == torch.float64 else 1e-5
        # rounding of a float sum of log values scales with their total magnitude
        mag = sum(float(f.tensor[torch.isfinite(f.tensor)].abs().sum()) for f in factors)
        assert float(got) == pytest.approx(ref, rel=tol, abs=tol * (1 + mag))


@settings(**SETTINGS)
@given(factor_graphs(), st.sampled_from([torch.float32, torch.float64]))
def test_gradients_finite_and_match_brute_force(graph, dtype):
    factors, levels = graph
    ref_f = cast(factors, torch.float64, grad=True)
    ref = tg.brute_force(tg.FactorGraph(ref_f, levels))
    fs = cast(factors, dtype, grad=True)
    got = tg.ops.contract(tg.ops.plan_for(tg.FactorGraph(fs, levels)), [f.tensor for f in fs])
    if not torch.isfinite(ref):
        assert float(got.detach()) == -math.inf
        got.backward()
        for f in fs:
            assert f.tensor.grad is None or not torch.isnan(f.tensor.grad).any()
        return
    ref.backward()
    got.backward()
    for a, b in zip(fs, ref_f):
        assert torch.isfinite(a.tensor.grad).all()
        tol = 1e-7 if dtype == torch.float64 else 2e-3
        torch.testing.assert_close(a.tensor.grad.double(), b.tensor.grad, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("span", [100.0, 1000.0])
def test_logmatmul_separate_maxima_do_not_underflow(dtype, span):
    """Rows and columns whose maxima sit at different j: the shifted product underflows."""
    a = torch.tensor([[0.0, -span], [-span, 0.0]], dtype=dtype)
    b = torch.tensor([[-span, 0.0], [0.0, -span]], dtype=dtype)
    got = logb.logmatmul(a, b)
    ref = torch.logsumexp(a.double()[:, :, None] + b.double()[None, :, :], 1)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_all_minus_inf_gives_minus_inf_and_zero_gradients(dtype):
    a = torch.full((3, 4), -math.inf, dtype=dtype, requires_grad=True)
    b = torch.randn(4, 2, dtype=dtype, requires_grad=True)
    c = torch.full((2,), -math.inf, dtype=dtype, requires_grad=True)
    fs = [Factor("a", a, ("i", "j"), ()), Factor("b", b, ("j", "k"), ()), Factor("c", c, ("k",), ())]
    levels = {"i": (), "j": (), "k": ()}
    out = tg.ops.contract(tg.ops.plan_for(tg.FactorGraph(fs, levels)), [a, b, c])
    assert float(out.detach()) == -math.inf
    out.backward()
    for t in (a, b, c):
        assert t.grad is not None and not torch.isnan(t.grad).any()
    ls = logb.logsumexp(torch.full((5,), -math.inf, dtype=dtype, requires_grad=True), 0)
    assert float(ls.detach()) == -math.inf


def test_tmc_with_extreme_likelihood_is_finite_in_float32():
    """A model whose factors span ~1000 nats: the float32 estimate matches float64 brute force."""
    from torch.distributions import Normal

    m = tg.Model()
    m.latent("a", lambda: Normal(0.0, 1.0))
    m.latent("b", lambda a: Normal(a, 0.01))
    m.observed("x", lambda a, b: Normal(a + b, 0.01))
    q = tg.Proposal(m)
    q.latent("a", lambda: Normal(0.0, 3.0))
    q.latent("b", lambda: Normal(0.0, 3.0))
    r = tg.TMC(m, q, K=8).run({"x": torch.tensor(2.0)}, seed=0)
    assert any(float(f.tensor.max() - f.tensor.min()) > 500 for f in r.factors)
    ref = tg.brute_force(tg.FactorGraph(cast(r.factors, torch.float64), r.samples.ordinals))
    assert math.isfinite(float(r.log_evidence))
    assert float(r.log_evidence) == pytest.approx(float(ref), rel=1e-5, abs=1e-2)
