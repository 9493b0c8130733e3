"""Markov-chain scans (tmcgraph.ops.scan) against brute-force enumeration and the sequential oracle.

Truths: (a) brute force: the joint log-weight of every index path z_0..z_n as one
broadcast tensor, reduced with a single float64 ``torch.logsumexp`` (also
``tg.brute_force`` on the same factors); (b) the sequential ``torch.logsumexp`` loop
(:func:`naive_log_chain`) on float64 copies of the inputs (after rounding them to the
tested dtype). Hypothesis draws chain lengths T = n + 1 in 1..40, state counts 1..5 (per
step too), batch shapes and log values up to +-1000 nats with ``-inf`` entries.
"""

import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import tmcgraph as tg
from tmcgraph.ops import Factor
from tmcgraph.ops.scan import (
    AUTO_SCAN_ELEMENTS,
    choose_method,
    log_chain,
    log_chain_marginals,
    log_chain_vector,
    naive_log_chain,
)

SETTINGS = dict(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DTYPES = [torch.float32, torch.float64]
INF = math.inf


# ------------------------------------------------------------------------------ helpers


def random_mats(g, ks, batch=(), scale=1.0, p_inf=0.0, dtype=torch.float64):
    """Log-matrices ``[*batch, ks[t], ks[t+1]]``; entries -inf with prob ``p_inf``, never a whole row."""
    out = []
    for a, b in zip(ks[:-1], ks[1:]):
        m = torch.randn(*batch, a, b, generator=g, dtype=torch.float64) * scale
        if p_inf:
            dead = torch.rand(*batch, a, b, generator=g, dtype=torch.float64) < p_inf
            keep = torch.randint(0, b, (*batch, a, 1), generator=g)
            dead.scatter_(-1, keep, False)
            m = m.masked_fill(dead, -INF)
        out.append(m.to(dtype))
    return out


def brute_joint(mats, init=None, final=None):
    """Joint log-weight ``[..., K_0, ..., K_n]`` of every path (float64), by broadcasting."""
    n = len(mats)
    batch = torch.broadcast_shapes(*[m.shape[:-2] for m in mats])
    nb = len(batch)
    joint = torch.zeros(batch + (1,) * (n + 1), dtype=torch.float64)
    for t, m in enumerate(mats):
        mb = m.dim() - 2
        shape = list(m.shape[:-2]) + [1] * (n + 1)
        shape[mb + t], shape[mb + t + 1] = m.shape[-2], m.shape[-1]
        joint = joint + m.double().reshape([1] * (nb - m.dim() + 2) + shape)
    if init is not None:
        shape = [1] * (n + 1)
        shape[0] = init.shape[-1]
        joint = joint + init.double().reshape(init.shape[:-1] + tuple(shape))
    if final is not None:
        shape = [1] * (n + 1)
        shape[-1] = final.shape[-1]
        joint = joint + final.double().reshape(final.shape[:-1] + tuple(shape))
    return joint


def brute_chain(mats):
    """``[..., K_0, K_n]``: logsumexp of the joint over the intermediate states."""
    j = brute_joint(mats)
    n = len(mats)
    inner = tuple(range(j.dim() - n, j.dim() - 1))
    return torch.logsumexp(j, inner) if inner else j


def brute_marginals(mats, init, final=None):
    """Per-step marginals (list of ``[..., K_t]``) and log Z from the normalised joint."""
    j = brute_joint(mats, init, final)
    n = len(mats)
    dims = tuple(range(j.dim() - n - 1, j.dim()))
    log_z = torch.logsumexp(j, dims)
    p = torch.exp(j - log_z.reshape(log_z.shape + (1,) * (n + 1)))
    return [p.sum([d for d in dims if d != dims[t]]) if n else p for t in range(n + 1)], log_z


def leaf(x, dtype):
    """A fresh autograd leaf: ``x`` rounded to ``dtype`` (never the same object as ``x``)."""
    return x.detach().to(dtype).clone().requires_grad_()


def f64(xs):
    return [x.double() for x in xs]


def tol(dtype, mats, extra=0.0):
    """Absolute tolerance: rounding of each step's largest finite magnitude, accumulated along the chain."""
    eps = torch.finfo(dtype).eps
    mats = [m.detach() for m in mats]
    mags = [float(m[torch.isfinite(m)].abs().max()) if torch.isfinite(m).any() else 0.0 for m in mats]
    return 64 * eps * (1.0 + sum(mags) + extra) + 64 * eps * len(mats)


def assert_same_support_and_close(got, want, atol):
    """``-inf`` exactly where the truth is ``-inf``; finite (never NaN) and close elsewhere."""
    assert not torch.isnan(got).any()
    fin = torch.isfinite(want)
    assert torch.equal(torch.isfinite(got), fin), f"support differs: got {got}, want {want}"
    assert torch.equal(got.detach().double()[~fin], want[~fin])
    if fin.any():
        err = float((got.detach().double()[fin] - want[fin]).abs().max())
        assert err <= atol, f"max error {err:.3g} > {atol:.3g}"


@st.composite
def chains(draw, max_T=40, max_K=5, per_step=True, max_joint=None):
    """``(mats, ks, batch, scale, generator)``: a chain of T = len(mats) + 1 steps, T in 1..max_T."""
    T = draw(st.integers(1, max_T))
    vary = per_step and draw(st.booleans())
    K = draw(st.integers(1, max_K))
    ks = [draw(st.integers(1, max_K)) for _ in range(T)] if vary else [K] * T
    if max_joint is not None:
        assume(math.prod(ks) <= max_joint)
    batch = draw(st.sampled_from([(), (2,), (2, 3)]))
    scale = draw(st.sampled_from([1.0, 30.0, 300.0, 1000.0]))
    p_inf = draw(st.sampled_from([0.0, 0.0, 0.3, 0.6]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**20)))
    mats = random_mats(g, ks, batch, scale, p_inf)
    return mats, ks, batch, scale, g


def as_input(mats, ks, dtype, stacked):
    mats = [m.to(dtype) for m in mats]
    if stacked and len(set(ks)) == 1 and mats:
        return torch.stack(mats, -3), mats
    return mats, mats


# ------------------------------------------------------------------------------ values


@settings(**SETTINGS)
@given(chains(), st.sampled_from(DTYPES), st.booleans())
def test_log_chain_matches_sequential_oracle(chain, dtype, stacked):
    mats, ks, batch, scale, g = chain
    assume(mats)
    inp, rounded = as_input(mats, ks, dtype, stacked)
    got = log_chain(inp)
    assert got.dtype == dtype and got.shape == batch + (ks[0], ks[-1])
    want = naive_log_chain(f64(rounded))
    assert_same_support_and_close(got, want, tol(dtype, rounded))


@settings(**SETTINGS)
@given(chains(max_T=7, max_K=3, max_joint=3000), st.sampled_from(DTYPES))
def test_log_chain_matches_brute_force(chain, dtype):
    mats, ks, batch, scale, g = chain
    assume(mats)
    rounded = [m.to(dtype) for m in mats]
    got = log_chain(rounded)
    want = brute_chain(rounded)
    assert_same_support_and_close(got, want, tol(dtype, rounded))
    # the oracle itself agrees with brute force
    assert_same_support_and_close(naive_log_chain(f64(rounded)), want, tol(torch.float64, rounded))


@settings(**SETTINGS)
@given(chains(), st.sampled_from(DTYPES), st.sampled_from(["scan", "sequential", "auto"]), st.booleans(),
       st.booleans())
def test_log_chain_vector_matches_oracle(chain, dtype, method, with_final, stacked):
    mats, ks, batch, scale, g = chain
    init = (torch.randn(ks[0], generator=g, dtype=torch.float64) * scale).to(dtype)
    final = (torch.randn(*batch[-1:], ks[-1], generator=g, dtype=torch.float64) * scale).to(dtype) \
        if with_final else None
    inp, rounded = as_input(mats, ks, dtype, stacked)
    if not rounded:
        inp = torch.zeros(*batch, 0, ks[0], ks[0], dtype=dtype)
    got = log_chain_vector(init, inp, final, method=method)
    want = naive_log_chain(f64(rounded) if rounded else inp.double(), init.double(),
                           None if final is None else final.double())
    assert got.dtype == dtype and got.shape == want.shape
    extra = 2 * scale * 4
    assert_same_support_and_close(got, want, tol(dtype, rounded, extra))


@settings(**SETTINGS)
@given(chains(max_T=7, max_K=3, max_joint=3000), st.sampled_from(["scan", "sequential"]))
def test_log_z_matches_tmcgraph_brute_force(chain, method):
    mats, ks, batch, scale, g = chain
    assume(not batch)
    init = torch.randn(ks[0], generator=g, dtype=torch.float64) * scale
    got = log_chain_vector(init, mats, torch.zeros(ks[-1], dtype=torch.float64), method=method) if mats \
        else torch.logsumexp(init, 0)
    factors = [Factor("init", init, ("z0",), ())] + [Factor(f"m{t}", m, (f"z{t}", f"z{t + 1}"), ()) for t, m in
                                                  enumerate(mats)]
    want = tg.brute_force(tg.FactorGraph(tuple(factors), {f"z{t}": () for t in range(len(ks))}))
    assert_same_support_and_close(got.reshape(1), want.reshape(1), tol(torch.float64, mats, scale))


def test_empty_chain_is_the_log_identity():
    eye = log_chain(torch.zeros(2, 0, 3, 3))
    assert eye.shape == (2, 3, 3)
    assert torch.equal(eye.exp(), torch.eye(3).expand(2, 3, 3))
    v = torch.randn(3)
    assert torch.equal(log_chain_vector(v, torch.zeros(0, 3, 3)), v)
    assert torch.equal(naive_log_chain(torch.zeros(0, 3, 3)), log_chain(torch.zeros(0, 3, 3)))


def test_single_rectangular_matrix_and_broadcast_batches():
    g = torch.Generator().manual_seed(1)
    m = torch.randn(4, 1, 2, 5, generator=g, dtype=torch.float64)
    assert torch.equal(log_chain(m), m[..., 0, :, :])
    mats = [torch.randn(3, 2, generator=g, dtype=torch.float64), torch.randn(4, 2, 5, generator=g, dtype=torch.float64),
            torch.randn(5, 1, generator=g, dtype=torch.float64), torch.randn(1, 1, 3, generator=g, dtype=torch.float64)]
    got = log_chain(mats)
    assert got.shape == (4, 3, 3)
    assert_same_support_and_close(got, brute_chain(mats), 1e-10)


def test_equal_shaped_list_and_stacked_tensor_agree():
    g = torch.Generator().manual_seed(2)
    mats = random_mats(g, [4] * 12, (3,), 100.0, 0.3)
    assert torch.allclose(log_chain(mats), log_chain(torch.stack(mats, -3)), rtol=0, atol=1e-9)


# ------------------------------------------------------------------------------ extremes


@pytest.mark.parametrize("dtype", DTYPES)
def test_extreme_chains_never_lose_finite_values(dtype):
    """Steps where only a few entries matter and the rest sit 1000 nats below, +-1000 entries, long chains."""
    g = torch.Generator().manual_seed(3)
    K, n = 5, 39
    cases = []
    # sticky chain: diagonal 0, off-diagonal -1000: the product is dominated by staying put
    sticky = torch.full((K, K), -1000.0, dtype=torch.float64).fill_diagonal_(0.0)
    cases.append(sticky.expand(n, K, K))
    # permutation-like steps with huge offsets: every other path underflows in exp space
    perm = torch.full((n, K, K), -1000.0, dtype=torch.float64)
    for t in range(n):
        pi = torch.randperm(K, generator=g)
        perm[t, torch.arange(K), pi] = torch.randn(K, generator=g, dtype=torch.float64) * 1000
    cases.append(perm)
    # uniform +-1000 entries and rows with a single finite entry
    wild = torch.empty(n, K, K, dtype=torch.float64).uniform_(-1000, 1000, generator=g)
    single = torch.full((n, K, K), -INF, dtype=torch.float64)
    single[torch.arange(n)[:, None], torch.arange(K), torch.randint(0, K, (n, K), generator=g)] = 500.0
    cases += [wild, single]
    for mats in cases:
        x = mats.to(dtype)
        want = naive_log_chain(x.double())
        for got in (log_chain(x), log_chain(list(x.unbind(0)))):
            assert_same_support_and_close(got, want, tol(dtype, list(x.unbind(0))))
        init = torch.zeros(K, dtype=dtype)
        for method in ("scan", "sequential"):
            v = log_chain_vector(init, x, method=method)
            assert_same_support_and_close(v, naive_log_chain(x.double(), init.double()), tol(dtype, list(x)))


# ------------------------------------------------------------------------------ gradients


@settings(**SETTINGS)
@given(chains(max_T=40, max_K=5), st.sampled_from(DTYPES), st.booleans())
def test_log_chain_gradients_match_torch_logsumexp_autograd(chain, dtype, stacked):
    """Finite chains: d(sum c * P)/dM against autograd through the float64 ``torch.logsumexp`` loop."""
    mats, ks, batch, scale, g = chain
    assume(mats)
    mats = [torch.where(torch.isfinite(m), m, torch.zeros_like(m)) / max(scale / 30.0, 1.0) for m in mats]
    leaves = [leaf(m, dtype) for m in mats]
    ref = [leaf(leaf(m, dtype), torch.float64) for m in mats]
    inp = torch.stack(leaves, -3) if stacked and len(set(ks)) == 1 else leaves
    out = log_chain(inp)
    c = torch.randn(out.shape, generator=g, dtype=torch.float64)
    (out * c.to(dtype)).sum().backward()
    (naive_log_chain(ref) * c).sum().backward()
    atol = 1e-9 if dtype == torch.float64 else 5e-4
    for a, b in zip(leaves, ref):
        assert torch.isfinite(a.grad).all()
        assert torch.allclose(a.grad.double(), b.grad, rtol=1e-3 if dtype == torch.float32 else 1e-7, atol=atol)


@settings(**SETTINGS)
@given(chains(max_T=7, max_K=3, max_joint=3000), st.sampled_from(DTYPES), st.sampled_from(["scan", "sequential"]))
def test_log_z_gradients_with_inf_entries_match_brute_force(chain, dtype, method):
    """With -inf entries: gradients of log Z equal those of one float64 logsumexp over all paths."""
    mats, ks, batch, scale, g = chain
    assume(mats)
    init = torch.randn(*batch, ks[0], generator=g, dtype=torch.float64) * min(scale, 30.0)
    mats = [m / max(scale / 30.0, 1.0) for m in mats]
    leaves = [leaf(m, dtype) for m in mats]
    init_l = leaf(init, dtype)
    ref = [leaf(leaf(m, dtype), torch.float64) for m in mats]
    init_r = leaf(init_l, torch.float64)
    j = brute_joint(ref, init_r)
    want = torch.logsumexp(j.flatten(len(batch)), -1)
    assume(torch.isfinite(want).all())
    got = log_chain_vector(init_l, leaves, torch.zeros(ks[-1], dtype=dtype), method=method)
    assert_same_support_and_close(got, want.detach(), tol(dtype, mats, 60))
    got.sum().backward()
    want.sum().backward()
    atol = 1e-9 if dtype == torch.float64 else 2e-4
    for a, b in zip(leaves + [init_l], ref + [init_r]):
        assert torch.isfinite(a.grad).all()
        assert torch.allclose(a.grad.double(), b.grad, rtol=0, atol=atol)


def test_impossible_entries_get_zero_not_nan_gradients():
    a = torch.tensor([[0.0, -INF], [-INF, -INF]], requires_grad=True)
    b = torch.tensor([[1.0, -INF], [2.0, -INF]], requires_grad=True)
    out = log_chain([a, b, b])
    assert torch.isinf(out[1]).all() and torch.isinf(out[:, 1]).all() and torch.isfinite(out[0, 0])
    torch.where(torch.isfinite(out), out, torch.zeros_like(out)).sum().backward()
    for x in (a, b):
        assert torch.isfinite(x.grad).all()
    assert float(a.grad[0, 0]) == pytest.approx(1.0)
    assert float(a.grad[1].abs().sum()) == 0.0


# ------------------------------------------------------------------------------ marginals


@settings(**SETTINGS)
@given(chains(max_T=7, max_K=3, max_joint=3000), st.sampled_from(DTYPES), st.sampled_from(["scan", "sequential"]),
       st.booleans(), st.booleans())
def test_marginals_match_brute_force(chain, dtype, method, stacked, with_final):
    mats, ks, batch, scale, g = chain
    init = torch.randn(*batch, ks[0], generator=g, dtype=torch.float64) * min(scale, 30.0)
    final = torch.randn(ks[-1], generator=g, dtype=torch.float64) * min(scale, 30.0) if with_final else None
    mats = [m / max(scale / 100.0, 1.0) for m in mats]
    rounded = [m.to(dtype) for m in mats]
    want, log_z = brute_marginals(rounded, init.to(dtype), None if final is None else final.to(dtype))
    assume(torch.isfinite(log_z).all())
    inp = torch.stack(rounded, -3) if (stacked and len(set(ks)) == 1 and rounded) \
        else (rounded or torch.zeros(*batch, 0, ks[0], ks[0], dtype=dtype))
    got, got_z = log_chain_marginals(init.to(dtype), inp, None if final is None else final.to(dtype), method=method,
                                     return_log_z=True)
    got = list(got.unbind(-2)) if isinstance(got, torch.Tensor) else got
    assert len(got) == len(ks)
    atol = 1e-9 if dtype == torch.float64 else 2e-4
    for t, (a, b) in enumerate(zip(got, want)):
        assert a.shape == batch + (ks[t],) and a.dtype == dtype
        assert torch.allclose(a.double(), b, rtol=0, atol=atol), f"step {t}"
        assert torch.allclose(a.double().sum(-1), torch.ones(()).double(), atol=atol)
    assert_same_support_and_close(got_z, log_z, tol(dtype, rounded, 200))


@pytest.mark.parametrize("dtype", DTYPES)
def test_long_extreme_chain_marginals_sum_to_one_and_agree(dtype):
    g = torch.Generator().manual_seed(4)
    mats = random_mats(g, [5] * 40, (3,), 1000.0, 0.3, dtype)
    x = torch.stack(mats, -3)
    init = torch.zeros(5, dtype=dtype)
    a = log_chain_marginals(init, x, method="scan")
    b = log_chain_marginals(init, x, method="sequential")
    assert a.shape == (3, 40, 5)
    assert torch.allclose(a.sum(-1).double(), torch.ones(3, 40).double(), atol=1e-5)
    assert torch.allclose(a, b, atol=1e-4)
    # independent check of a few steps: condition on z_t = k by masking and compare log-ratios
    ref = naive_log_chain([m.double() for m in mats], init.double(), torch.zeros(5, dtype=torch.float64))
    for t in (0, 17, 39):
        mask = torch.full((5,), -INF, dtype=torch.float64)
        k = int(a[0, t].argmax())
        mask[k] = 0.0
        if t == 0:
            part = naive_log_chain([m.double() for m in mats], init.double() + mask, torch.zeros(5).double())
        else:
            ms = [m.double() for m in mats]
            ms[t - 1] = ms[t - 1] + mask
            part = naive_log_chain(ms, init.double(), torch.zeros(5).double())
        assert float(torch.exp(part - ref)[0]) == pytest.approx(float(a[0, t, k]), abs=1e-4)


def test_marginals_with_per_step_sizes_return_a_list():
    g = torch.Generator().manual_seed(5)
    ks = [2, 3, 1, 4]
    mats = random_mats(g, ks)
    init = torch.randn(2, dtype=torch.float64)
    got = log_chain_marginals(init, mats)
    want, _ = brute_marginals(mats, init)
    assert [m.shape[-1] for m in got] == ks
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-12)


def test_marginals_are_detached_and_inputs_keep_their_graph():
    m = torch.randn(6, 3, 3, requires_grad=True)
    out = log_chain_marginals(torch.zeros(3), m)
    assert not out.requires_grad and m.grad is None


def test_zero_weight_chain_raises():
    m = torch.full((2, 2, 2), -INF)
    with pytest.raises(tg.TMCGraphError, match="total weight is zero"):
        log_chain_marginals(torch.zeros(2), m)


# ------------------------------------------------------------------------------ options and errors


def test_auto_method_rule():
    assert choose_method(1, 10, 100) == "scan"
    assert choose_method(64, 100, 100) == "sequential"
    assert choose_method(10**6, 100, 1) == "scan"
    k = 1
    while (k + 1) ** 2 <= AUTO_SCAN_ELEMENTS:
        k += 1
    assert choose_method(1, k, 50) == "scan" and choose_method(1, k + 1, 50) == "sequential"


@pytest.mark.parametrize("bad, match", [
    (torch.zeros(3, 3), r"mats: a stacked chain needs shape"),
    (torch.zeros(2, 3, 4), r"needs square matrices"),
    (torch.zeros(2, 3, 3, dtype=torch.long), r"floating point"),
    ([], r"empty list"),
    ([torch.zeros(2, 3), torch.zeros(2, 2)], r"mats\[1\] has 2 rows but mats\[0\] has 3 columns"),
    ([torch.zeros(2, 2, 2), torch.zeros(3, 2, 2)], r"do not broadcast"),
    ([torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.float64)], r"mats\[1\]: dtype/device"),
    ([torch.zeros(2, 2), torch.zeros(2)], r"mats\[1\]: expected a tensor"),
    (5, r"expected a tensor"),
])
def test_bad_chains_raise_clear_errors(bad, match):
    with pytest.raises(tg.TMCGraphError, match=match):
        log_chain(bad)


def test_bad_vectors_and_methods_raise():
    m = torch.zeros(4, 3, 3)
    with pytest.raises(tg.TMCGraphError, match="init has 2 states"):
        log_chain_vector(torch.zeros(2), m)
    with pytest.raises(tg.TMCGraphError, match="final has 4 states"):
        log_chain_vector(torch.zeros(3), m, torch.zeros(4))
    with pytest.raises(tg.TMCGraphError, match="method must be one of"):
        log_chain_vector(torch.zeros(3), m, method="fast")
    with pytest.raises(tg.TMCGraphError, match="batch shapes"):
        log_chain_vector(torch.zeros(2, 3), torch.zeros(5, 4, 3, 3))
    with pytest.raises(tg.TMCGraphError, match="method must be one of"):
        log_chain_marginals(torch.zeros(3), m, method="fast")
