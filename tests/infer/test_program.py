"""Compiled programs: the same function as the eager pipeline, checked against the same oracles."""

import warnings

import pytest
import torch
from hypothesis import given, settings
from test_random_dags import build, dag_specs, make_data, oracle
from torch.distributions import Normal

import tmcgraph as tg
from tmcgraph.infer import program as program_mod
from tmcgraph.infer.program import CompileWarning, ProgramCache
from tmcgraph.models import toys


def _compiled_value(est, data, seed):
    """The value of the second call with ``seed`` (the first call is always eager)."""
    est.log_evidence(data, seed=seed)
    return est.run(data, seed=seed)


@settings(max_examples=8, deadline=None, derandomize=True)
@given(dag_specs())
def test_compiled_equals_independent_oracle_on_random_dags(spec):
    torch.set_default_dtype(torch.float64)
    m, q = build(spec)
    data = make_data(spec, m)
    est = tg.TMC(m, q, K=2, compile=True)
    r = _compiled_value(est, data, spec["seed"])
    assert est.programs.info()["compiled"] == 1
    truth = oracle(spec, r.samples, data)
    assert float(r.log_evidence) == pytest.approx(truth, rel=1e-6, abs=1e-8)
    assert float(tg.brute_force(r.graph)) == pytest.approx(truth, rel=1e-6, abs=1e-8)  # graph built on demand


def _toy_with_parameters(N):
    p = {k: torch.tensor(v, requires_grad=True) for k, v in [("mt", 0.1), ("st", -0.2), ("mz", 0.3), ("sz", 0.4)]}
    m = tg.Model()
    m.plate("data", size=N)
    m.latent("theta", lambda: Normal(0.0, 1.0))
    m.latent("z", lambda theta: Normal(theta, 1.0), plate="data")
    m.observed("x", lambda z: Normal(z, 1.0), plate="data")
    q = tg.Proposal(m)
    q.latent("theta", lambda: Normal(p["mt"], p["st"].exp()))
    q.latent("z", lambda theta: Normal(0.5 * theta + p["mz"], p["sz"].exp()), plate="data")
    return m, q, p


@pytest.mark.parametrize("coupling", ["mixture", "permutation", "paired"])
def test_compiled_gradients_equal_eager(f64, coupling):
    m, q, p = _toy_with_parameters(6)
    q["z"].coupling = coupling
    data = {"x": toys.gaussian_toy_data(6)}
    out = {}
    for mode in (False, True):
        est = tg.TMC(m, q, K=4, compile=mode)
        est.log_evidence(data, seed=1)
        v = est.log_evidence(data, seed=3)
        grads = torch.autograd.grad(v, list(p.values()))
        out[mode] = (v.detach(), grads)
        assert est.programs.info()["compiled"] == (1 if mode else 0)
    torch.testing.assert_close(out[True][0], out[False][0], rtol=1e-10, atol=1e-10)
    for a, b in zip(out[True][1], out[False][1]):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_compiled_iwae_and_per_element_values_match_eager(f64):
    m, q, p = _toy_with_parameters(5)
    data = {"x": toys.gaussian_toy_data(5)}
    mp = tg.Model()
    mp.plate("data", size=5)
    mp.latent("z", lambda: Normal(0.0, 1.0), plate="data")
    mp.observed("x", lambda z: Normal(z, 1.0), plate="data")
    qp = tg.Proposal(mp)
    qp.latent("z", lambda x: Normal(0.5 * x + p["mz"], p["sz"].exp()), plate="data")
    for cls, (mm, qq), kw in [(tg.TMC, (m, q), {}), (tg.IWAE, (m, q), {}), (tg.TMC, (mp, qp), {"elementwise": True}),
                              (tg.IWAE, (mp, qp), {"elementwise": True})]:
        vals = []
        for mode in (False, True):
            est = cls(mm, qq, K=3, compile=mode)
            est.log_evidence(data, seed=0, **kw)
            vals.append(est.log_evidence(data, seed=2, **kw).detach())
        assert vals[0].shape == ((5,) if kw else ())
        torch.testing.assert_close(vals[0], vals[1], rtol=1e-10, atol=1e-10)


def test_auto_compiles_once_eager_calls_have_cost_a_compile(monkeypatch):
    m, q = toys.gaussian_toy()
    small = tg.TMC(m, q, K=4)  # compile="auto"
    x = {"x": toys.gaussian_toy_data(8)}
    for s in range(3):
        small.log_evidence(x, seed=s)
    assert small.programs.info() == {"programs": 1, "compiled": 0, "failed": []}  # cheap calls: never worth it
    monkeypatch.setattr(program_mod, "COMPILE_SECONDS", 0.0)
    monkeypatch.setattr(program_mod, "COMPILE_SECONDS_PER_FACTOR", 1e-9)  # a compile "costs" almost nothing
    est = tg.TMC(m, q, K=16)
    a = est.log_evidence(x, seed=1)
    b = est.log_evidence(x, seed=1)  # the eager first call already cost more: compiled
    assert est.programs.info()["compiled"] == 1
    assert float(a) == pytest.approx(float(b), rel=1e-5)


def test_compile_failure_falls_back_to_eager_with_one_warning(monkeypatch):
    def broken(fn, **kw):
        def call(*a, **k):
            raise RuntimeError("no C++ compiler here")
        return call

    monkeypatch.setattr(torch, "compile", broken)
    m, q = toys.gaussian_toy()
    est = tg.TMC(m, q, K=4, compile=True)
    x = {"x": toys.gaussian_toy_data(4)}
    ref = tg.TMC(m, q, K=4, compile=False)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        vals = [est.log_evidence(x, seed=s) for s in range(4)]
    assert sum(issubclass(x.category, CompileWarning) for x in w) == 1
    assert "no C++ compiler here" in str(next(x for x in w if issubclass(x.category, CompileWarning)).message)
    assert est.programs.info()["failed"]
    for s, v in enumerate(vals):
        assert torch.equal(v, ref.log_evidence(x, seed=s))


def test_program_cache_is_bounded_and_lru():
    c = ProgramCache(maxsize=2)
    c.put("a", object())
    c.put("b", object())
    c.get("a")
    c.put("c", object())
    assert c.get("b") is None and c.get("a") is not None and len(c) == 2


def test_new_shapes_or_declarations_get_new_programs():
    m, q = toys.gaussian_toy()
    est = tg.TMC(m, q, K=4, compile=False)
    est.log_evidence({"x": toys.gaussian_toy_data(4)}, seed=0)
    est.log_evidence({"x": toys.gaussian_toy_data(5)}, seed=0)
    assert est.programs.info()["programs"] == 2
    est.log_evidence({"x": toys.gaussian_toy_data(5)}, seed=0, elementwise=False)
    assert est.programs.info()["programs"] == 2


def test_bad_compile_option():
    m, q = toys.gaussian_toy()
    with pytest.raises(tg.TMCGraphError, match="compile must be one of"):
        tg.TMC(m, q, compile="yes")


def test_compiled_calls_leave_distribution_validation_as_it_was():
    from torch.distributions import Distribution

    before = Distribution._validate_args
    m, q = toys.gaussian_toy()
    est = tg.TMC(m, q, K=4, compile=True)
    x = {"x": toys.gaussian_toy_data(4)}
    for s in range(3):
        est.log_evidence(x, seed=s)
    assert est.programs.info()["compiled"] == 1
    assert Distribution._validate_args == before
