"""Markov plates in the contraction engine against the unrolled definition.

Truth: :func:`tmcgraph.ops.oracle.unroll_markov` spells a Markov graph out as an
ordinary one (one dim per element, the previous-index dim at element t being the dim at
t-1, a free extra index at t = 0) and :func:`tmcgraph.ops.oracle.enumerate_log_weights`
enumerates it. Random graphs (hypothesis): one or two chains, an outer plate, an inner
plate, a global dim, extreme log-values; every path strategy; marginals; exact samples.
"""

import collections
import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from tmcgraph.errors import TMCGraphError
from tmcgraph.ops import Factor, FactorGraph, brute_force, contract, dim_marginals, plan_for, sample_indices
from tmcgraph.ops.oracle import enumerate_log_weights, unroll_markov

D = torch.float64


def random_graph(seed, T, K, chains=1, outer=0, inner=0, glob=0, scale=1.0, dtype=D):
    g = torch.Generator().manual_seed(seed)
    plates = (("seq",) if outer else ()) + ("time",)
    psz = ([outer] if outer else []) + [T]

    def r(*shape):
        return (scale * torch.randn(*shape, generator=g, dtype=D)).to(dtype)

    factors, ordinals, pairs = [], {}, []
    gd = ("g",) if glob else ()
    if glob:
        factors.append(Factor("g", r(glob), ("g",), ()))
        ordinals["g"] = ()
    for c in range(chains):
        z, zp = f"z{c}", f"z{c}_prev"
        ordinals[z] = ordinals[zp] = plates
        pairs.append((zp, z))
        # chain c's transition also depends on the previous state of chain c - 1
        extra = (f"z{c - 1}_prev",) if c else ()
        dims = gd + (zp,) + extra + (z,)
        shape = ([glob] if glob else []) + [K] * (2 + len(extra)) + psz
        factors.append(Factor(z, r(*shape), dims, plates))
    factors.append(Factor("x", r(*([K] * chains + psz)), tuple(f"z{c}" for c in range(chains)), plates))
    if inner:
        factors.append(Factor("y", r(*([K] + psz + [inner])), ("z0",), plates + ("obs",)))
    return FactorGraph(tuple(factors), ordinals, markov={"time": tuple(pairs)})


graphs = st.tuples(st.integers(0, 10**6), st.integers(1, 4), st.integers(1, 3), st.integers(1, 2),
                   st.integers(0, 2), st.integers(0, 2), st.integers(0, 2))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(graphs, st.sampled_from(["auto", "greedy", "optimal", "branch-1"]))
def test_contraction_equals_the_unrolled_brute_force(spec, strategy):
    seed, T, K, chains, outer, inner, glob = spec
    assume(K ** (chains * (T + 1) * max(outer, 1)) * max(glob, 1) <= 300_000)
    g = random_graph(seed, T, K, chains, outer, inner, glob)
    got = contract(plan_for(g, strategy), g.tensors)
    assert torch.allclose(got, brute_force(g), rtol=1e-10, atol=1e-10)


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 10**6), st.sampled_from([torch.float32, torch.float64]))
def test_extreme_log_values_stay_finite_and_exact(seed, dtype):
    g = random_graph(seed, 4, 3, outer=2, glob=2, scale=400.0, dtype=dtype)
    got = contract(plan_for(g), g.tensors)
    want = brute_force(random_graph(seed, 4, 3, outer=2, glob=2, scale=400.0, dtype=D))
    assert torch.isfinite(got)
    assert abs(float(got) - float(want)) <= (1e-3 if dtype == torch.float32 else 1e-9) * abs(float(want)) + 1e-6


def test_gradients_equal_the_unrolled_brute_force():
    g = random_graph(3, 3, 2, chains=2, outer=2, glob=2)
    leaves = [f.tensor.requires_grad_() for f in g.factors]
    a = torch.autograd.grad(contract(plan_for(g), g.tensors), leaves)
    b = torch.autograd.grad(brute_force(g), leaves)
    for x, y in zip(a, b):
        assert torch.allclose(x, y, rtol=1e-9, atol=1e-12)


def exact_marginals(g):
    factors, ordinals = unroll_markov(g)
    variables, combos, logw = enumerate_log_weights(factors, ordinals)
    p = torch.softmax(logw, 0)
    return variables, combos, p


def test_marginals_equal_enumeration():
    g = random_graph(5, 3, 3, chains=1, outer=2, inner=2, glob=2)
    _, marg = dim_marginals(g)
    assert set(marg) == {"g", "z0"}  # previous-index dims are aliases, not reported
    variables, combos, p = exact_marginals(g)
    for col, (d, elem) in enumerate(variables):
        name, _, t = d.partition("@time=")
        if name != "z0" or t == "-1":
            continue
        for k in range(3):
            want = float(p[combos[:, col] == k].sum())
            assert abs(float(marg["z0"][k, elem["seq"], int(t)]) - want) < 1e-10


def test_samples_are_exact_joint_draws():
    g = random_graph(7, 3, 2, chains=2, outer=0, glob=2)
    N = 30000
    draws = sample_indices(g, N, generator=torch.Generator().manual_seed(0))
    assert set(draws) == {"g", "z0", "z1"} and draws["z0"].shape == (N, 3)
    variables, combos, p = exact_marginals(g)
    keep = [i for i, (d, _) in enumerate(variables) if not d.endswith("=-1")]
    exact = collections.Counter()
    for c, w in zip(combos[:, keep].tolist(), p.tolist()):
        exact[tuple(c)] += w
    names = [variables[i] for i in keep]
    rows = []
    for d, _ in names:
        name, _, t = d.partition("@time=")
        rows.append(draws[name] if not t else draws[name][:, int(t)])
    emp = collections.Counter(map(tuple, torch.stack(rows, 1).tolist()))
    for key, w in exact.items():
        if w > 1e-3:
            assert abs(emp[key] / N - w) < 4.5 * math.sqrt(w * (1 - w) / N), (key, emp[key] / N, w)


def test_plan_prints_the_chain_and_refuses_bad_markov_graphs():
    g = random_graph(1, 3, 2)
    assert "Markov plate 'time' as a chain" in str(plan_for(g))
    f = g.factors
    with pytest.raises(TMCGraphError, match="not local to plate"):
        FactorGraph(f, {**g.ordinals, "z0": (), "z0_prev": ()}, markov={"time": (("z0_prev", "z0"),)})
    with pytest.raises(TMCGraphError, match="cannot be scaled"):
        FactorGraph(f, g.ordinals, scales={"time": 2.0}, markov=g.markov)
    with pytest.raises(TMCGraphError, match="cannot be kept"):
        FactorGraph(f, g.ordinals, keep="time", markov=g.markov)
    with pytest.raises(TMCGraphError, match="two Markov pairs"):
        FactorGraph(f, g.ordinals, markov={"time": (("z0_prev", "z0"), ("z0", "z0_prev"))})
