"""Contraction vs brute force on random DAGs (hypothesis).

Random linear-Gaussian DAGs with 1 to 6 latents, random edges (loopy ones included),
K from 1 to 4, with and without a plate, factorised / amortised / non-factorised
(paired, mixture and permutation couplings) / prior proposals. The independent oracle here recomputes every
density from the random specification with numpy (not from the library's factors) and
enumerates all index combinations of the *same* particles, plates unrolled.
"""

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch.distributions import Normal

import tmcgraph as tg
from tmcgraph.ops.plan import STRATEGIES

MAX_COMBINATIONS = 3000


def npnorm(x, mu, sd):
    return -0.5 * ((x - mu) / sd) ** 2 - math.log(sd) - 0.5 * math.log(2 * math.pi)


def _coupled(v):
    return v["qparents"] if v["qkind"] == "nonfact" else (v["parents"] if v["qkind"] == "prior" else [])


def _fix_paired(lat):
    for v in lat:
        if v["coupling"] == "paired" and any(lat[p]["K"] != v["K"] for p in _coupled(v)):
            v["coupling"] = "mixture"


@st.composite
def dag_specs(draw):
    n = draw(st.integers(1, 6))
    P = draw(st.sampled_from([None, 1, 2]))
    coef = st.floats(-1.5, 1.5, allow_nan=False)
    sd = st.floats(0.5, 2.0, allow_nan=False)
    lat = []
    for j in range(n):
        plated = P is not None and draw(st.booleans())
        cands = [i for i in range(j) if plated or not lat[i]["plated"]]
        parents = draw(st.lists(st.sampled_from(cands), unique=True, max_size=3)) if cands else []
        K = draw(st.integers(1, 4))
        qkind = draw(st.sampled_from(["factorised", "amortised", "nonfact", "prior"]))
        qparents = draw(st.lists(st.sampled_from(cands), unique=True, min_size=1, max_size=2)) if cands else []
        coupling = draw(st.sampled_from(["paired", "mixture", "permutation"]))
        lat.append(dict(
            plated=plated, parents=parents, w=[draw(coef) for _ in parents], b=draw(coef), sd=draw(sd), K=K,
            qkind=qkind, qparents=qparents, qw=[draw(coef) for _ in qparents], qb=draw(coef), qsd=draw(sd),
            coupling=coupling, obs=draw(st.booleans()), c=draw(coef),
        ))
    # one extra observation with two latent parents (closes loops)
    pair = None
    if n >= 2 and draw(st.booleans()):
        pair = tuple(draw(st.lists(st.integers(0, n - 1), unique=True, min_size=2, max_size=2)))
    if not any(v["obs"] for v in lat) and pair is None:
        lat[-1]["obs"] = True
    for v in lat:
        if v["qkind"] == "amortised" and not v["obs"]:  # amortised proposals condition on their own observation
            v["qkind"] = "factorised"
        if v["qkind"] == "nonfact" and not v["qparents"]:
            v["qkind"] = "factorised"
    _fix_paired(lat)
    total = math.prod(v["K"] ** ((P or 1) if v["plated"] else 1) for v in lat)
    while total > MAX_COMBINATIONS:
        big = max(range(n), key=lambda j: lat[j]["K"])
        lat[big]["K"] -= 1
        _fix_paired(lat)
        total = math.prod(v["K"] ** ((P or 1) if v["plated"] else 1) for v in lat)
    return dict(lat=lat, P=P, pair=pair, seed=draw(st.integers(0, 2**16)))


def _lin(w, b):
    def f(*args):
        out = b
        for wi, a in zip(w, args):
            out = out + wi * a
        return out
    return f


def build(spec):
    lat, P = spec["lat"], spec["P"]
    m = tg.Model()
    if P is not None:
        m.plate("p", size=P)
    names = [f"z{j}" for j in range(len(lat))]
    for j, v in enumerate(lat):
        mean = _lin(v["w"], v["b"])
        m.latent(names[j], lambda *a, mean=mean, sd=v["sd"]: Normal(mean(*a), sd),
                 plate="p" if v["plated"] else None, parents=[names[p] for p in v["parents"]])
    for j, v in enumerate(lat):
        if v["obs"]:
            m.observed(f"x{j}", lambda z, c=v["c"]: Normal(c * z, 1.0), plate="p" if v["plated"] else None,
                       parents=[names[j]])
    if spec["pair"]:
        a, b = spec["pair"]
        plated = lat[a]["plated"] or lat[b]["plated"]
        m.observed("xy", lambda u, v: Normal(u - v, 1.5), plate="p" if plated else None,
                   parents=[names[a], names[b]])
    q = tg.Proposal(m)
    for j, v in enumerate(lat):
        kind = v["qkind"]
        if kind == "prior":
            q.prior(names[j], coupling=v["coupling"], K=v["K"])
        elif kind == "factorised":
            q.latent(names[j], lambda b=v["qb"], s=v["qsd"]: Normal(b, s), parents=[], K=v["K"])
        elif kind == "amortised":
            q.latent(names[j], lambda x, b=v["qb"], s=v["qsd"]: Normal(0.5 * x + b, s), parents=[f"x{j}"], K=v["K"])
        else:
            mean = _lin(v["qw"], v["qb"])
            q.latent(names[j], lambda *a, mean=mean, s=v["qsd"]: Normal(mean(*a), s),
                     parents=[names[p] for p in v["qparents"]], coupling=v["coupling"], K=v["K"])
    return m, q


def make_data(spec, m):
    g = np.random.default_rng(spec["seed"])
    P = spec["P"] or 1
    data = {}
    for name in m.observed_names:
        shape = (P,) if m[name].plates else ()
        data[name] = torch.tensor(g.normal(size=shape) * 1.5)
    return data


def oracle(spec, samples, data, shared=False):
    """Independent brute force: numpy densities from the spec, every index combination."""
    lat, P = spec["lat"], spec["P"] or 1
    z = {j: samples.values[f"z{j}"].detach().numpy() for j in range(len(lat))}
    x = {k: v.numpy() for k, v in data.items()}

    def elems(j):
        return range(P) if lat[j]["plated"] else [None]

    def val(j, k, e):
        return z[j][k] if e is None else z[j][k, e]

    def pe(p, e):
        return e if lat[p]["plated"] else None

    def xv(name, e):
        return x[name] if e is None else x[name][e]

    def log_q(j, k, e):
        v = lat[j]
        kind = v["qkind"]
        zz = val(j, k, e)
        if kind == "factorised":
            return npnorm(zz, v["qb"], v["qsd"])
        if kind == "amortised":
            return npnorm(zz, 0.5 * xv(f"x{j}", e) + v["qb"], v["qsd"])
        if kind == "prior":
            ps, ws, b, s = v["parents"], v["w"], v["b"], v["sd"]
        else:
            ps, ws, b, s = v["qparents"], v["qw"], v["qb"], v["qsd"]
        coupling = "paired" if shared else v["coupling"]
        if coupling == "paired":
            mu = b + sum(w * val(p, k, pe(p, e)) for p, w in zip(ps, ws))
            return npnorm(zz, mu, s)
        terms = []
        for js in itertools.product(*[range(lat[p]["K"]) for p in ps]):
            mu = b + sum(w * val(p, jp, pe(p, e)) for p, w, jp in zip(ps, ws, js))
            terms.append(npnorm(zz, mu, s))
        return np.logaddexp.reduce(terms) - sum(math.log(lat[p]["K"]) for p in ps)

    keys = [(j, e) for j in range(len(lat)) for e in elems(j)]
    if shared and spec["P"] is not None and all(v["plated"] for v in lat):
        # IWAE's joint index is local to the plate every latent lies in: one per element
        K = lat[0]["K"]
        combos = [dict(zip(keys, [ks[e] for _, e in keys])) for ks in itertools.product(range(K), repeat=P)]
        norm = -P * math.log(K)
    elif shared:
        K = lat[0]["K"]
        combos = [{key: k for key in keys} for k in range(K)]
        norm = -math.log(K)
    else:
        combos = [dict(zip(keys, ks)) for ks in itertools.product(*[range(lat[j]["K"]) for j, _ in keys])]
        norm = -sum(math.log(lat[j]["K"]) for j, _ in keys)
    logw = []
    for c in combos:
        def idx(p, e):
            return c[(p, pe(p, e))]
        total = 0.0
        for j, v in enumerate(lat):
            for e in elems(j):
                k = c[(j, e)]
                mu = v["b"] + sum(w * val(p, idx(p, e), pe(p, e)) for p, w in zip(v["parents"], v["w"]))
                total += npnorm(val(j, k, e), mu, v["sd"]) - log_q(j, k, e)
                if v["obs"]:
                    total += npnorm(xv(f"x{j}", e), v["c"] * val(j, k, e), 1.0)
        if spec["pair"]:
            a, b = spec["pair"]
            plated = lat[a]["plated"] or lat[b]["plated"]
            for e in (range(P) if plated else [None]):
                ua = val(a, idx(a, e), pe(a, e))
                ub = val(b, idx(b, e), pe(b, e))
                total += npnorm(xv("xy", e), ua - ub, 1.5)
        logw.append(total)
    return float(np.logaddexp.reduce(logw) + norm)


SETTINGS = dict(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
#: Largest operand count each exhaustive path search is run on.
EXHAUSTIVE_MAX = {"optimal": 8, "branch-all": 8, "branch-2": 10}


@settings(**SETTINGS)
@given(dag_specs())
def test_tmc_equals_independent_brute_force(spec):
    torch.set_default_dtype(torch.float64)
    m, q = build(spec)
    data = make_data(spec, m)
    r = tg.TMC(m, q, K=2).run(data, seed=spec["seed"])
    truth = oracle(spec, r.samples, data)
    assert float(r.log_evidence) == pytest.approx(truth, rel=1e-6, abs=1e-8)
    # the library's factor-level oracle agrees too
    bf = tg.brute_force(r.graph)
    assert float(bf) == pytest.approx(truth, rel=1e-6, abs=1e-8)


@settings(**SETTINGS)
@given(dag_specs(), st.sampled_from([s for s in STRATEGIES if s != "random-greedy"]))
def test_every_path_strategy_matches_oracle(spec, strategy):
    torch.set_default_dtype(torch.float64)
    m, q = build(spec)
    data = make_data(spec, m)
    # Exhaustive searches are exponential in the number of operands (as in opt_einsum,
    # whose "auto" uses them only on small steps): keep them to graphs of their size.
    n_factors = len(tg.TMC(m, q, K=2).run(data, seed=spec["seed"]).factors)
    assume(n_factors <= EXHAUSTIVE_MAX.get(strategy, n_factors))
    r = tg.TMC(m, q, K=2, strategy=strategy).run(data, seed=spec["seed"])
    bf = tg.brute_force(r.graph)
    assert float(r.log_evidence) == pytest.approx(float(bf), rel=1e-6, abs=1e-8)
    assert r.plan.strategy == strategy


@settings(**SETTINGS)
@given(dag_specs())
def test_iwae_equals_textbook_formula(spec):
    """One joint index k (per plate element when every latent is plated)."""
    torch.set_default_dtype(torch.float64)
    for v in spec["lat"]:
        v["K"] = spec["lat"][0]["K"]
    m, q = build(spec)
    data = make_data(spec, m)
    r = tg.IWAE(m, q, K=spec["lat"][0]["K"]).run(data, seed=spec["seed"])
    truth = oracle(spec, r.samples, data, shared=True)
    assert float(r.log_evidence) == pytest.approx(truth, rel=1e-6, abs=1e-8)


@settings(**SETTINGS)
@given(dag_specs())
def test_elementwise_matches_oracle_per_element(spec):
    torch.set_default_dtype(torch.float64)
    if spec["P"] is None:
        spec["P"] = 2
    for v in spec["lat"]:
        v["plated"] = True
        v["K"] = min(v["K"], 2)
    m, q = build(spec)
    data = make_data(spec, m)
    est = tg.TMC(m, q, K=2)
    r = est.run(data, seed=spec["seed"], elementwise=True)
    assert r.log_evidence.shape == (spec["P"],)
    per = tg.brute_force(r.graph.with_keep("p"))
    torch.testing.assert_close(r.log_evidence, per, rtol=1e-6, atol=1e-8)
    # the per-element values multiply to the total estimate on the same particles
    total = est.run(data, samples=r.samples).log_evidence
    assert float(r.log_evidence.sum()) == pytest.approx(float(total), rel=1e-9, abs=1e-9)


def _bounded(m, q, data, seed, K=2):
    """An estimator under the smallest memory limit (a power of 2) its plan can meet, and its first value."""
    limit = 1
    while True:
        est = tg.TMC(m, q, K=K, memory_limit=limit, compile=False)
        try:
            return est, est.run(data, seed=seed)
        except tg.TMCGraphError as e:
            if "cannot be met" not in str(e) and "too small" not in str(e):
                raise
            limit *= 2


@settings(**SETTINGS)
@given(dag_specs())
def test_memory_limited_streaming_equals_independent_brute_force(spec):
    """Under the tightest memory limit, factors are built per slice inside the steps; values stay exact."""
    torch.set_default_dtype(torch.float64)
    m, q = build(spec)
    data = make_data(spec, m)
    est, first = _bounded(m, q, data, spec["seed"])
    assert float(first.log_evidence) == pytest.approx(oracle(spec, first.samples, data), rel=1e-6, abs=1e-8)
    second = est.run(data, seed=spec["seed"] + 1)  # the structure's program
    assert len(est.programs) == 1
    assert float(second.log_evidence) == pytest.approx(oracle(spec, second.samples, data), rel=1e-6, abs=1e-8)
