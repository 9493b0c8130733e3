"""Log-space backend fast paths, path search and memory limits against float64 references.

The reference for every contraction is a float64 broadcast logsumexp: the operands are
cast to float64, broadcast against each other over all indices, added and reduced with
``torch.logsumexp`` (the definition of the log-space sum-product), independent of the
backend's shifts, gauges and fallbacks.
"""

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tmcgraph as tg
from tmcgraph.models import toys
from tmcgraph.ops.backends import log as logb
from tmcgraph.ops.slicing import MAX_SLICES

SETTINGS = dict(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DTYPES = [torch.float32, torch.float64]


def _values(seed, shape, scale, p_inf, dtype):
    """Random log-values: Gaussian of scale ``scale`` plus per-row offsets, a fraction ``-inf``."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=shape) * scale
    if len(shape) >= 1:
        x = x + rng.normal(size=shape[:-1] + (1,)) * scale  # rows far apart: defeats naive shifts
    x[rng.random(size=shape) < p_inf] = -np.inf
    return torch.tensor(x, dtype=dtype)


def _ref_matmul(a, b):
    a64, b64 = a.double(), b.double()
    return torch.logsumexp(a64.unsqueeze(-1) + b64.unsqueeze(-3), dim=-2)


def _tol(dtype, *xs):
    big = max([1.0] + [float(x[torch.isfinite(x)].abs().max()) for x in xs if bool(torch.isfinite(x).any())])
    return (2e-5 if dtype == torch.float32 else 1e-12) * big


def _check(out, ref, dtype, *inputs):
    assert out.shape == ref.shape
    fin = torch.isfinite(ref)
    assert not bool(torch.isnan(out).any())
    assert bool(torch.isfinite(out[fin]).all()), "a finite true value came back non-finite"
    assert bool((out[~fin] == -math.inf).all()), "a -inf true value came back finite"
    err = (out.double()[fin] - ref[fin]).abs().max() if bool(fin.any()) else torch.tensor(0.0)
    assert float(err) <= _tol(dtype, *inputs, ref), float(err)


shapes = st.tuples(st.integers(1, 3), st.integers(1, 6), st.integers(1, 6), st.integers(1, 6))
scales = st.sampled_from([0.1, 1.0, 30.0, 100.0, 300.0, 1000.0])


@settings(**SETTINGS)
@given(shape=shapes, scale=scales, p_inf=st.sampled_from([0.0, 0.0, 0.2, 0.7, 1.0]),
       seed=st.integers(0, 2**31), dtype=st.sampled_from(DTYPES))
def test_logmatmul_matches_float64_broadcast_logsumexp(shape, scale, p_inf, seed, dtype):
    B, M, J, K = shape
    a = _values(seed, (B, M, J), scale, p_inf, dtype)
    b = _values(seed + 1, (B, J, K), scale, p_inf, dtype)
    _check(logb.logmatmul(a, b), _ref_matmul(a, b), dtype, a, b)


@settings(**SETTINGS)
@given(shape=shapes, scale=scales, p_inf=st.sampled_from([0.0, 0.3, 1.0]), seed=st.integers(0, 2**31),
       dtype=st.sampled_from(DTYPES))
def test_logmatmul_gradients_match_reference_and_are_never_nan(shape, scale, p_inf, seed, dtype):
    B, M, J, K = shape
    a = _values(seed, (B, M, J), scale, p_inf, dtype).requires_grad_()
    b = _values(seed + 1, (B, J, K), scale, p_inf, dtype).requires_grad_()
    w = torch.rand(B, M, K, dtype=torch.float64, generator=torch.Generator().manual_seed(seed % 1000))
    out = logb.logmatmul(a, b)
    out.sum().backward()  # includes -inf outputs: their gradient must be zero, not NaN
    assert bool(torch.isfinite(a.grad).all()) and bool(torch.isfinite(b.grad).all())
    a.grad = b.grad = None
    ref = _ref_matmul(a, b).detach()
    fin = torch.isfinite(ref)
    out = logb.logmatmul(a, b)
    (torch.where(fin, out.double(), torch.zeros_like(ref)) * w).sum().backward()
    # Reference gradient: d out_ik / d a_ij = exp(a_ij + b_jk - out_ik), zero where out_ik = -inf.
    a64, b64 = a.detach().double(), b.detach().double()
    expo = a64.unsqueeze(-1) + b64.unsqueeze(-3) - torch.where(fin, ref, torch.zeros_like(ref)).unsqueeze(-2)
    P = torch.where(fin.unsqueeze(-2), torch.exp(expo), torch.zeros_like(expo))
    ga = (P * w.unsqueeze(-2)).sum(-1)
    gb = (P * w.unsqueeze(-2)).sum(-3)
    tol = 1e-4 if dtype == torch.float32 else 1e-9
    assert torch.allclose(a.grad.double(), ga, atol=tol, rtol=tol)
    assert torch.allclose(b.grad.double(), gb, atol=tol, rtol=tol)


@settings(**SETTINGS)
@given(n_idx=st.integers(1, 5), data=st.data(), scale=scales, p_inf=st.sampled_from([0.0, 0.3]),
       seed=st.integers(0, 2**31), dtype=st.sampled_from(DTYPES))
def test_compiled_pairwise_contraction_matches_reference(n_idx, data, scale, p_inf, seed, dtype):
    """Every route (broadcast add, broadcast logsumexp, batched matmul) on random index patterns."""
    idx = "abcde"[:n_idx]
    sizes = {c: data.draw(st.integers(1, 4)) for c in idx}
    tx = "".join(data.draw(st.permutations(idx))[: data.draw(st.integers(1, n_idx))])
    ty = "".join(data.draw(st.permutations(idx))[: data.draw(st.integers(1, n_idx))])
    union = "".join(dict.fromkeys(tx + ty))
    out = "".join(data.draw(st.permutations(union))[: data.draw(st.integers(0, len(union)))])
    x = _values(seed, tuple(sizes[c] for c in tx), scale, p_inf, dtype)
    y = _values(seed + 7, tuple(sizes[c] for c in ty), scale, p_inf, dtype)
    res = logb.compile_pair(tx, ty, out)(x, y)
    # Reference: align both on `union`, add, logsumexp over indices not in `out`.
    xa = x.double().permute([tx.index(c) for c in union if c in tx]).reshape(
        [sizes[c] if c in tx else 1 for c in union])
    ya = y.double().permute([ty.index(c) for c in union if c in ty]).reshape(
        [sizes[c] if c in ty else 1 for c in union])
    s = xa + ya
    drop = [i for i, c in enumerate(union) if c not in out]
    r = torch.logsumexp(s, dim=drop) if drop else s
    kept = [c for c in union if c in out]
    ref = r.permute([kept.index(c) for c in out]) if out else r
    _check(res, ref.reshape(res.shape), dtype, x, y)
    eq = logb.einsum(f"{tx},{ty}->{out}", x, y)
    _check(eq, ref.reshape(eq.shape), dtype, x, y)


@pytest.mark.parametrize("dtype", DTYPES)
def test_lse_add_exact_for_rows_hundreds_of_nats_apart(dtype):
    x = torch.tensor([[0.0, -500.0, -900.0], [-800.0, -1.0, -2000.0]], dtype=dtype)
    y = torch.tensor([[-700.0, 0.0, 600.0]], dtype=dtype)
    out = logb.lse_add(x, y, -1)
    ref = torch.logsumexp((x + y).double(), -1, keepdim=True)
    assert torch.allclose(out.double(), ref, rtol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_underflow_is_detected_and_recomputed(dtype):
    """Gauge-shifted products that underflow are recomputed (float64 retry and/or exact), never -inf."""
    J = 8
    d = 300.0 if dtype == torch.float32 else 3000.0  # beyond float32 range; beyond float64 for the second
    a = torch.full((4, J), -d, dtype=dtype)
    b = torch.full((J, 4), -d, dtype=dtype)
    for i in range(4):  # row i of a and column k of b peak at different j: products ~ exp(-d)
        a[i, i] = 0.0
        b[(i + 4) % J, i] = 0.0
    a[0, 1] = 50.0
    b[0, 0] = 40.0
    logb.fallback_count(reset=True)
    out = logb.logmatmul(a, b)
    counts = logb.fallback_count()
    ref = _ref_matmul(a, b)
    assert counts["calls"] + counts["f64_calls"] >= 1
    _check(out, ref, dtype, a, b)


def test_all_minus_inf_operands_give_minus_inf_and_zero_gradient():
    a = torch.full((2, 3, 4), -math.inf, requires_grad=True)
    b = torch.randn(2, 4, 5, requires_grad=True)
    out = logb.logmatmul(a, b)
    assert bool((out == -math.inf).all())
    out.sum().backward()
    assert bool((a.grad == 0).all()) and bool((b.grad == 0).all())


# ---------------------------------------------------------------- planning

def _chain_factors(n, K, seed=0):
    m, q = toys.gaussian_chain(n, "factorised")
    est = tg.TMC(m, q, K=K)
    s = est.sample({"x": torch.tensor(0.3)}, seed=seed)
    return est, s, est.factor_graph(s).factors


def test_chain_plan_is_vector_matrix():
    """Variable elimination keeps every intermediate a vector: cost linear in n, largest K."""
    n, K = 60, 50
    est, s, fs = _chain_factors(n, K)
    plan = est.plan(tg.FactorGraph(fs, s.ordinals))
    assert plan.largest_intermediate <= K
    assert plan.cost <= 3 * (n + 1) * K * K


def _lattice(R):
    from torch.distributions import Normal

    m = tg.Model()
    q = tg.Proposal(m)
    for r in range(R):
        for c in range(R):
            ps = ([f"z{r}_{c - 1}"] if c else []) + ([f"z{r - 1}_{c}"] if r else [])
            m.latent(f"z{r}_{c}", (lambda *a: Normal(0.5 * sum(a), 1.0)) if ps else (lambda: Normal(0.0, 1.0)),
                     parents=ps)
            m.observed(f"x{r}_{c}", lambda z: Normal(z, 1.0), parents=[f"z{r}_{c}"])
            q.latent(f"z{r}_{c}", lambda: Normal(0.0, 1.5), parents=[])
    data = {f"x{r}_{c}": torch.tensor(0.3 * (r - c)) for r in range(R) for c in range(R)}
    return m, q, data


@pytest.mark.parametrize("limit", [10, 16, 40])
def test_memory_limit_slices_and_keeps_value_and_gradient(f64, limit):
    R, K = 3, 4
    m, q, data = _lattice(R)
    free = tg.TMC(m, q, K=K)
    s = free.sample(data, seed=3)
    fs = [f.with_tensor(f.tensor.detach().requires_grad_()) for f in free.factor_graph(s).factors]
    p0 = free.plan(tg.FactorGraph(fs, s.ordinals))
    assert p0.largest_tensor > limit
    p1 = tg.TMC(m, q, K=K, memory_limit=limit).plan(tg.FactorGraph(fs, s.ordinals))
    assert p1.largest_tensor <= limit
    assert any(st.sliced for st in p1.steps)
    v0 = tg.ops.contract(p0, [f.tensor for f in fs])
    g0 = torch.autograd.grad(v0, [f.tensor for f in fs])
    v1 = tg.ops.contract(p1, [f.tensor for f in fs])
    g1 = torch.autograd.grad(v1, [f.tensor for f in fs])
    bf = tg.brute_force(tg.FactorGraph(fs, s.ordinals)) if K ** (R * R) <= 300_000 else v0
    v0, v1, bf = float(v0.detach()), float(v1.detach()), float(bf.detach())
    assert abs(v1 - bf) < 1e-9 and abs(v0 - bf) < 1e-9
    for a, b in zip(g0, g1):
        assert torch.allclose(a, b, atol=1e-10)


def test_memory_limit_on_plated_model(f64):
    m, q = toys.gaussian_toy()
    x = toys.gaussian_toy_data(6)
    v0 = tg.TMC(m, q, K=5).log_evidence({"x": x}, seed=1)
    est = tg.TMC(m, q, K=5, memory_limit=30)  # the plate step's result is K x N = 30
    r = est.run({"x": x}, seed=1)
    assert r.plan.largest_tensor <= 30 and any(st.sliced for st in r.plan.steps)
    assert abs(float(r.log_evidence) - float(v0)) < 1e-10
    assert abs(float(r.log_evidence) - float(tg.brute_force(r.graph))) < 1e-10


def test_unmeetable_memory_limit_raises_before_contracting():
    m, q = toys.gaussian_toy()
    x = toys.gaussian_toy_data(50)
    msg = r"memory_limit=10 elements cannot be met.*'theta', 'data'\] has 400 elements"
    with pytest.raises(tg.TMCGraphError, match=msg):
        tg.TMC(m, q, K=8, memory_limit=10).log_evidence({"x": x}, seed=0)  # the plate result alone is 8 x 50
    mm, qq, data = _lattice(4)
    with pytest.raises(tg.TMCGraphError, match=f"more than {MAX_SLICES} slices"):
        tg.TMC(mm, qq, K=8, memory_limit=2).log_evidence(data, seed=0)


@pytest.mark.parametrize("bad", [0, -5, 2.5, "lots"])
def test_invalid_memory_limit_is_rejected(bad):
    m, q = toys.gaussian_toy()
    with pytest.raises((tg.TMCGraphError, TypeError, ValueError)):
        tg.TMC(m, q, K=2, memory_limit=bad).log_evidence({"x": toys.gaussian_toy_data(3)}, seed=0)


def test_auto_plan_no_worse_than_opt_einsum_greedy_on_lattice():
    import opt_einsum as oe

    m, q, data = _lattice(4)
    est = tg.TMC(m, q, K=6)
    s = est.sample(data, seed=0)
    fs = est.factor_graph(s).factors
    plan = est.plan(tg.FactorGraph(fs, s.ordinals))
    _, info = oe.contract_path(plan.steps[0].equation, *[tuple(f.tensor.shape) for f in fs], shapes=True,
                               optimize="greedy")
    assert plan.cost <= int(info.opt_cost)
