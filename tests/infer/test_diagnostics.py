"""Effective sample sizes (tmcgraph.infer.diagnostics) against explicit enumeration.

The truth enumerates every index combination of the same particles with itertools
(one index per sample dim and element of its plates, plates unrolled), sums each
combination's log-weight over factors and plate elements in float64, and computes

* the marginal Kish ESS ``1 / sum_k pi(k_{d,e} = k)^2`` from the enumerated marginals;
* the weight ESS over the combinations of a set D of dims: group the combinations by
  their D-indices, ``w_D = sum of w in the group``, ESS = ``(sum w_D)^2 / sum w_D^2``.
"""

import itertools
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.distributions import Categorical, Normal

import tmcgraph as tg
from tmcgraph.infer.diagnostics import (
    diagnose,
    graph_weight_ess,
    kish_ess,
    marginal_ess,
    squared_weight_graph,
    weight_ess,
)
from tmcgraph.models.toys import gaussian_toy
from tmcgraph.ops import Factor, FactorGraph, dim_marginals

# ----------------------------------------------------------------------------------------
# Explicit enumeration.


def enumerate_combinations(factors, ordinals):
    """``(variables, combos, logw)``: index variables (dim, element), all combinations, float64 log-weights."""
    sizes = {}
    for f in factors:
        sizes.update(zip(tuple(f.sample_dims) + tuple(f.plates), f.tensor.shape))
    dims = list(dict.fromkeys(d for f in factors for d in f.sample_dims))
    variables = [(d, dict(zip(ordinals[d], e)))
                 for d in dims for e in itertools.product(*[range(sizes[p]) for p in ordinals[d]])]
    combos = torch.tensor(list(itertools.product(*[range(sizes[d]) for d, _ in variables])), dtype=torch.long)
    combos = combos.reshape(-1, len(variables))
    logw = torch.zeros(combos.shape[0], dtype=torch.float64)
    for f in factors:
        t = f.tensor.detach().to(torch.float64)
        for e in itertools.product(*[range(sizes[p]) for p in f.plates]):
            elem = dict(zip(f.plates, e))
            idx = []
            for d in f.sample_dims:
                want = {p: elem[p] for p in ordinals[d]}
                idx.append(combos[:, variables.index((d, want))])
            logw = logw + t[tuple(idx) + tuple(e)]
    return variables, combos, logw


def _group_lse(logw, key):
    """logsumexp of ``logw`` within each group of equal rows of ``key``."""
    if key.shape[1] == 0:
        return torch.logsumexp(logw, 0, keepdim=True)
    _, inv = torch.unique(key, dim=0, return_inverse=True)
    G = int(inv.max()) + 1
    m = torch.full((G,), -math.inf, dtype=logw.dtype).scatter_reduce(0, inv, logw, "amax")
    m0 = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    s = torch.zeros(G, dtype=logw.dtype).scatter_add(0, inv, (logw - m0[inv]).exp())
    return m0 + s.log()


def brute_log_ess(factors, ordinals, dims):
    """log ESS of the weights over combinations of ``dims`` (others summed), by enumeration."""
    variables, combos, logw = enumerate_combinations(factors, ordinals)
    cols = [i for i, (d, _) in enumerate(variables) if d in dims]
    lw = _group_lse(logw, combos[:, cols])
    return float(2 * torch.logsumexp(lw, 0) - torch.logsumexp(2 * lw, 0))


def _slice(factors, ordinals, keep, i):
    out = []
    for f in factors:
        if keep in f.plates:
            j = len(f.sample_dims) + f.plates.index(keep)
            f = Factor(f.name, f.tensor.select(j, i), f.sample_dims, tuple(p for p in f.plates if p != keep))
        out.append(f)
    return out, {d: tuple(p for p in lv if p != keep) for d, lv in ordinals.items()}


def brute_marginal_ess(factors, ordinals):
    """dim -> [*ordinal sizes] Kish ESS of the enumerated marginals."""
    variables, combos, logw = enumerate_combinations(factors, ordinals)
    probs = torch.softmax(logw, 0)
    sizes = {}
    for f in factors:
        sizes.update(zip(tuple(f.sample_dims) + tuple(f.plates), f.tensor.shape))
    out = {}
    for col, (d, elem) in enumerate(variables):
        e = out.setdefault(d, torch.zeros([sizes[p] for p in ordinals[d]], dtype=torch.float64))
        pk = torch.stack([probs[combos[:, col] == k].sum() for k in range(sizes[d])])
        e[tuple(elem[p] for p in ordinals[d])] = 1.0 / (pk**2).sum()
    return out


# ----------------------------------------------------------------------------------------
# Tiny models (float64 particles and factors).

F64 = {"dtype": torch.float64}


def _toy(K=3, N=2, method="tmc"):
    m, q = gaussian_toy()
    cls = {"tmc": tg.TMC, "iwae": tg.IWAE}[method]
    return cls(m, q, K=K, **F64), {"x": torch.tensor([1.3, -0.4, 0.8][:N])}


def _nonfactorised(K=3):
    m = tg.Model()
    m.plate("data", size=2)
    m.latent("a", lambda: Normal(0.0, 1.0))
    m.latent("b", lambda a: Normal(a, 1.0), plate="data")
    m.latent("c", lambda b: Normal(0.5 * b, 1.0), plate="data")
    m.observed("x", lambda b, c: Normal(b + c, 1.0), plate="data")
    q = tg.Proposal(m)
    q.latent("a", lambda: Normal(0.3, 1.5))
    q.latent("b", lambda a: Normal(a, 1.2), plate="data", coupling="mixture")
    q.latent("c", lambda b, x: Normal(0.3 * b + 0.2 * x, 1.2), plate="data", coupling="paired")
    return tg.TMC(m, q, K=K, **F64), {"x": torch.tensor([0.7, -1.1])}


def _nested(K=2):
    m = tg.Model()
    m.plate("groups", size=2)
    m.plate("obs", size=2)
    m.latent("mu", lambda: Normal(0.0, 1.0))
    m.latent("g", lambda mu: Normal(mu, 1.0), plate="groups")
    m.latent("h", lambda g: Normal(g, 1.0), plate=("groups", "obs"))
    m.observed("x", lambda h: Normal(h, 1.0), plate=("groups", "obs"))
    q = tg.Proposal(m)
    q.latent("mu", lambda: Normal(0.0, 1.5))
    q.prior("g")
    q.latent("h", lambda x: Normal(0.5 * x, 1.2), plate=("groups", "obs"))
    return tg.TMC(m, q, K=K, **F64), {"x": torch.tensor([[0.5, 1.0], [-0.3, 0.2]])}


def _enumerated(K=3):
    m = tg.Model()
    m.plate("data", size=2)
    m.latent("theta", lambda: Normal(0.0, 1.0))
    m.latent("c", lambda theta: Categorical(logits=torch.stack([theta, -theta], -1)), plate="data")
    m.observed("x", lambda theta, c: Normal(theta * (2.0 * c - 1.0), 1.0), plate="data")
    q = tg.Proposal(m)
    q.latent("theta", lambda: Normal(0.0, 1.5))
    q.enumerate("c")
    return tg.TMC(m, q, K=K, **F64), {"x": torch.tensor([0.9, -0.2])}


def _two_globals(K=3):
    """Two global latents (a, b) and a local one: the global ESS weighs K^2 combinations."""
    m = tg.Model()
    m.plate("data", size=2)
    m.latent("a", lambda: Normal(0.0, 1.0))
    m.latent("b", lambda a: Normal(a, 1.0))
    m.latent("z", lambda a, b: Normal(a - b, 1.0), plate="data")
    m.observed("x", lambda z: Normal(z, 0.5), plate="data")
    q = tg.Proposal(m)
    q.latent("a", lambda: Normal(0.0, 1.5))
    q.latent("b", lambda: Normal(0.0, 2.0))
    q.latent("z", lambda x: Normal(0.5 * x, 1.0), plate="data")
    return tg.TMC(m, q, K=K, **F64), {"x": torch.tensor([1.5, -2.0])}


def _local_only(K=3):
    """Every latent local to the plate: per-element ESS is defined."""
    m = tg.Model()
    m.plate("data", size=3)
    m.latent("z", lambda: Normal(0.0, 1.0), plate="data")
    m.latent("y", lambda z: Normal(z, 1.0), plate="data")
    m.observed("x", lambda y: Normal(y, 0.7), plate="data")
    q = tg.Proposal(m)
    q.latent("z", lambda: Normal(0.0, 1.3), plate="data")
    q.latent("y", lambda z, x: Normal(0.5 * (z + x), 1.0), plate="data", coupling="mixture")
    return tg.TMC(m, q, K=K, **F64), {"x": torch.tensor([0.3, 2.5, -1.0])}


TINY = {
    "toy_tmc": _toy,
    "toy_iwae": lambda: _toy(K=5, method="iwae"),
    "nonfactorised": _nonfactorised,
    "nested": _nested,
    "enumerated": _enumerated,
    "two_globals": _two_globals,
    "local_only": _local_only,
}


# ----------------------------------------------------------------------------------------
# Kish ESS.


def test_kish_ess_basic_values():
    assert float(kish_ess(torch.full((7,), 0.3))) == pytest.approx(7.0)
    assert float(kish_ess(torch.tensor([0.0, 5.0, 0.0]))) == pytest.approx(1.0)
    p = torch.tensor([[0.5, 0.1], [0.3, 0.1], [0.2, 0.8]], dtype=torch.float64)
    torch.testing.assert_close(kish_ess(p, 0), 1.0 / (p / p.sum(0)).pow(2).sum(0))
    # scale-free, even for weights far beyond the floating range of their squares
    torch.testing.assert_close(kish_ess(p * 1e200, 0), kish_ess(p, 0))
    torch.testing.assert_close(kish_ess(p * 1e-300, 0), kish_ess(p, 0))
    with pytest.raises(tg.TMCGraphError, match="axis"):
        kish_ess(torch.tensor(1.0))


# ----------------------------------------------------------------------------------------
# Posterior-level ESS vs enumeration of the same particles.


@pytest.mark.parametrize("name", list(TINY))
def test_marginal_ess_equals_enumeration(name):
    est, data = TINY[name]()
    post = tg.posterior(est, data, seed=1)
    s = post.samples
    truth = brute_marginal_ess(post.graph.factors, s.ordinals)
    ess = marginal_ess(post)
    assert set(ess) == set(s.values)
    for lat, e in ess.items():
        d = s.dims[lat]
        assert e.shape == s.log_q[lat].shape[1:]
        # the latent's layout [*its plates] vs the dim's ordinal (IWAE: broadcast)
        want = truth[d]
        lv = tuple(s.ordinals[d])
        want = want.permute([lv.index(p) for p in s.plates[lat] if p in lv]) if lv else want
        want = want.reshape([s.plate_sizes[p] if p in lv else 1 for p in s.plates[lat]]).expand(e.shape)
        torch.testing.assert_close(e, want, rtol=1e-9, atol=1e-9)
        assert bool((e >= 1 - 1e-12).all()) and bool((e <= s.sizes[d] + 1e-9).all())
    assert torch.equal(marginal_ess(post, next(iter(s.values))), ess[next(iter(s.values))])


def _sampled_dims(post):
    s = post.samples
    return [s.dims[n] for n, c in s.couplings.items() if type(c).__name__ != "Enumerated"]


@pytest.mark.parametrize("name", list(TINY))
def test_weight_ess_equals_enumeration(name):
    est, data = TINY[name]()
    post = tg.posterior(est, data, seed=2)
    s, g = post.samples, post.graph
    sampled = list(dict.fromkeys(_sampled_dims(post)))
    globals_ = [d for d in sampled if not s.ordinals[d]]
    cases = {"global": globals_, "all": sampled}
    for lat in s.values:  # each latent alone, and every latent named
        cases[lat] = [s.dims[lat]]
    cases[tuple(s.values)] = list(dict.fromkeys(s.dims[n] for n in s.values))
    for over, dims in cases.items():
        r = weight_ess(post, list(over) if isinstance(over, tuple) else over)
        assert set(r.dims) == set(dims), over
        truth = brute_log_ess(g.factors, s.ordinals, set(dims))
        assert float(r.log_ess) == pytest.approx(truth, abs=1e-8), over
        n = sum(math.prod(s.plate_sizes[p] for p in s.ordinals[d]) * math.log(s.sizes[d]) for d in dims)
        assert r.log_combinations == pytest.approx(n)
        assert 0.0 <= float(r.log_ess) <= n + 1e-12
        assert 0.0 < float(r.efficiency) <= 1.0 + 1e-12
        torch.testing.assert_close(r.log_z, post.log_evidence)
    # one global dim: its weight ESS is its marginal ESS
    if len(globals_) == 1 and name != "toy_iwae":
        lat = next(n for n in s.values if s.dims[n] == globals_[0])
        torch.testing.assert_close(weight_ess(post).ess, marginal_ess(post, lat), rtol=1e-9, atol=0)


def test_enumerated_latents_are_summed_out_unless_named():
    est, data = _enumerated()
    post = tg.posterior(est, data, seed=0)
    assert weight_ess(post, "all").dims == ("theta",)
    named = weight_ess(post, ["theta", "c"])
    assert set(named.dims) == {"theta", "c"}
    truth = brute_log_ess(post.graph.factors, post.samples.ordinals, {"theta", "c"})
    assert float(named.log_ess) == pytest.approx(truth, abs=1e-8)


def test_global_ess_is_one_without_global_dims():
    est, data = _local_only()
    post = tg.posterior(est, data, seed=0)
    r = weight_ess(post)
    assert r.dims == () and float(r.log_ess) == 0.0 and r.log_combinations == 0.0


def test_elementwise_ess_equals_enumeration_per_element():
    est, data = _local_only()
    post = tg.posterior(est, data, seed=3)
    s, g = post.samples, post.graph
    for over, dims in {"all": {"z", "y"}, "global": {"z", "y"}, "z": {"z"}, "y": {"y"}}.items():
        r = weight_ess(post, over, elementwise=True)
        assert r.keep == "data" and r.log_ess.shape == (3,)
        assert set(r.dims) == dims
        for i in range(3):
            fs, lv = _slice(g.factors, s.ordinals, "data", i)
            assert float(r.log_ess[i]) == pytest.approx(brute_log_ess(fs, lv, dims), abs=1e-8)
        # the combinations factorise over elements: log ESS_all = sum of the per-element ones
        # ("global" per element is the dims local to exactly the plate: here all of them)
        whole = weight_ess(post, "all" if over == "global" else over)
        assert float(whole.log_ess) == pytest.approx(float(r.log_ess.sum()), abs=1e-8)
        assert whole.log_combinations == pytest.approx(3 * r.log_combinations)
    torch.testing.assert_close(weight_ess(post, "all", elementwise="data").log_ess,
                               weight_ess(post, "all", elementwise=True).log_ess)


def test_errors_name_what_is_wrong():
    est, data = _toy()
    post = tg.posterior(est, data, seed=0)
    with pytest.raises(tg.TMCGraphError, match="'nope'.*latents are"):
        weight_ess(post, "nope")
    with pytest.raises(tg.TMCGraphError, match="unknown plate 'rows'"):
        weight_ess(post, elementwise="rows")
    with pytest.raises(tg.TMCGraphError, match="plate 'data'.*'theta'.*outside"):
        weight_ess(post, elementwise=True)
    with pytest.raises(tg.TMCGraphError, match="unknown latent 'w'"):
        marginal_ess(post, ["theta", "w"])
    f = Factor("a", torch.full((3,), -math.inf), ("i",), ())
    with pytest.raises(tg.TMCGraphError, match="no particle combination carries weight"):
        graph_weight_ess(FactorGraph([f], {"i": ()}))
    f = Factor("a", torch.zeros(2, 2), ("i", "i'"), ())
    with pytest.raises(tg.TMCGraphError, match="reserved"):
        squared_weight_graph(FactorGraph([f], {"i": (), "i'": ()}), ["i'"])
    with pytest.raises(tg.TMCGraphError, match="unknown sample dim"):
        graph_weight_ess(FactorGraph([f], {"i": (), "i'": ()}), ["j"])


def test_diagnose_collects_everything():
    est, data = _enumerated()
    post = tg.posterior(est, data, seed=0)
    d = diagnose(post)
    assert d.enumerated == ("c",) and d.K == {"theta": 3, "c": 2}
    torch.testing.assert_close(d.marginal["theta"], marginal_ess(post, "theta"))
    torch.testing.assert_close(d.weights["global"].log_ess, weight_ess(post).log_ess)
    text = str(d)
    assert "theta" in text and "(enumerated)" in text and "weight ESS (global" in text


def test_uniform_proposal_equal_weights_give_full_ess():
    """Prior proposal and no observation: every weight is equal, so every ESS is maximal."""
    m = tg.Model()
    m.plate("data", size=2)
    m.latent("a", lambda: Normal(0.0, 1.0))
    m.latent("z", lambda: Normal(0.0, 1.0), plate="data")
    q = tg.Proposal(m)
    q.prior("a")
    q.prior("z")
    post = tg.posterior(tg.TMC(m, q, K=4, **F64), {}, seed=0)
    for over in ("global", "all"):
        r = weight_ess(post, over)
        assert float(r.log_ess) == pytest.approx(r.log_combinations, abs=1e-9)
    torch.testing.assert_close(marginal_ess(post, "z"), torch.full((2,), 4.0, dtype=torch.float64))


# ----------------------------------------------------------------------------------------
# Random plated graphs and extreme log values (hypothesis).

PLATE_CHAINS = [(), ("p",), ("p", "q")]


@st.composite
def random_graphs(draw):
    sizes = {"p": draw(st.integers(1, 3)), "q": draw(st.integers(1, 2))}
    nested = draw(st.booleans())
    levels = PLATE_CHAINS if nested else PLATE_CHAINS[:2]
    n_dims = draw(st.integers(1, 3))
    dims = {}
    for i in range(n_dims):
        dims[f"d{i}"] = (draw(st.integers(1, 3)), draw(st.sampled_from(levels)))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    scale = draw(st.sampled_from([0.1, 1.0, 5.0, 300.0]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    factors = []
    n_f = draw(st.integers(1, 4))
    for j in range(n_f + n_dims):
        if j < n_dims:  # one factor per dim, so every dim is used
            d0 = f"d{j}"
            plates = dims[d0][1]  # the planner wants a factor at every ordinal a dim is local to
            fd = [d0] + [d for d in dims if d != d0 and set(dims[d][1]) <= set(plates) and draw(st.booleans())]
        else:
            plates = draw(st.sampled_from(levels))
            fd = [d for d in dims if set(dims[d][1]) <= set(plates) and draw(st.booleans())]
        shape = [dims[d][0] for d in fd] + [sizes[p] for p in plates]
        offset = draw(st.sampled_from([-1000.0, 0.0, 1000.0]))
        t = offset + scale * torch.randn(shape, generator=gen, dtype=torch.float64)
        factors.append(Factor(f"f{j}", t.to(dtype), tuple(fd), tuple(plates)))
    ordinals = {d: lv for d, (_, lv) in dims.items()}
    g = FactorGraph(tuple(factors), ordinals)
    n_vars = sum(math.prod(sizes[p] for p in lv) for _, lv in dims.values())
    combos = math.prod(k ** math.prod(sizes[p] for p in lv) for k, lv in dims.values())
    over = draw(st.lists(st.sampled_from(sorted(dims)), unique=True))
    return g, over, combos, n_vars


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(random_graphs())
def test_random_graphs_weight_ess_equals_enumeration(case):
    g, over, combos, _ = case
    if combos > 3000:
        return
    r = graph_weight_ess(g, over)
    assert bool(torch.isfinite(r.log_ess)), r
    assert 0.0 <= float(r.log_ess) <= r.log_combinations
    truth = brute_log_ess(g.factors, g.ordinals, set(over))
    log_z = float(torch.logsumexp(enumerate_combinations(g.factors, g.ordinals)[2], 0))
    # float32: the two contractions carry ~1e-7 relative error of log values up to ~1e4
    tol = 1e-7 if g.factors[0].tensor.dtype == torch.float64 else 2e-3 + 1e-6 * abs(log_z)
    assert float(r.log_ess) == pytest.approx(min(max(truth, 0.0), r.log_combinations), abs=tol)
    assert float(r.log_z) == pytest.approx(log_z, abs=tol)
    # marginal ESS of every dim from the adjoint marginals
    _, marg = dim_marginals(g)
    truth_m = brute_marginal_ess(g.factors, g.ordinals)
    for d, m in marg.items():
        e = kish_ess(m, 0)
        assert bool(torch.isfinite(e).all()) and bool((e >= 1 - 1e-4).all()) and bool((e <= m.shape[0] + 1e-3).all())
        rtol = 1e-7 if m.dtype == torch.float64 else 1e-3
        torch.testing.assert_close(e.to(torch.float64), truth_m[d], rtol=rtol, atol=rtol)
    # keeping the outer plate: one ESS per element, when the graph allows it
    if g.why_not_keep("p") is None:
        rk = graph_weight_ess(g.with_keep("p"), over)
        assert rk.log_ess.shape == (g.sizes["p"],) and bool(torch.isfinite(rk.log_ess).all())
        for i in range(g.sizes["p"]):
            fs, lv = _slice(g.factors, g.ordinals, "p", i)
            assert float(rk.log_ess[i]) == pytest.approx(max(brute_log_ess(fs, lv, set(over)), 0.0), abs=tol)


@settings(max_examples=25, deadline=None)
@given(random_graphs(), st.floats(-2000.0, 2000.0))
def test_shifts_leave_the_ess_unchanged_and_never_give_nan(case, shift):
    """Adding a constant to a factor rescales every weight alike: the ESS is unchanged."""
    g, over, combos, _ = case
    r = graph_weight_ess(g, over)
    t0 = g.factors[0].tensor
    shifted = g.with_tensors([t0 + shift] + g.tensors[1:])
    rs = graph_weight_ess(shifted, over)
    assert bool(torch.isfinite(rs.log_ess)) and bool(torch.isfinite(rs.log_z2))
    tol = 1e-6 if t0.dtype == torch.float64 else 5e-2
    assert float(rs.log_ess) == pytest.approx(float(r.log_ess), abs=tol)


def test_partly_zero_weights():
    """-inf entries (zero weights) are fine as long as some combination carries weight."""
    t = torch.tensor([[0.0, -math.inf], [-math.inf, -math.inf], [2.0, 1.0]], dtype=torch.float64)
    fs = (Factor("a", t, ("i", "j"), ()), Factor("b", torch.tensor([0.5, -math.inf], dtype=torch.float64),
                                                 ("j",), ()))
    g = FactorGraph(fs, {"i": (), "j": ()})
    for over in ([], ["i"], ["j"], ["i", "j"]):
        r = graph_weight_ess(g, over)
        assert float(r.log_ess) == pytest.approx(max(brute_log_ess(fs, g.ordinals, set(over)), 0.0), abs=1e-12)
