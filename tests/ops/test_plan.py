"""Plans: printable, cached in a bounded LRU cache, and reused without a new path search."""

import torch
from torch.distributions import Normal

import tmcgraph as tg
from tmcgraph.models.toys import gaussian_toy, gaussian_toy_data
from tmcgraph.ops.plan import CACHE_SIZE, plan_cache_clear, plan_cache_info


def test_plan_is_printable_with_order_cost_and_largest_intermediate():
    m, q = gaussian_toy(16)
    r = tg.TMC(m, q, K=8).run({"x": gaussian_toy_data(16)}, seed=0)
    text = str(r.plan)
    assert "cost=" in text and "largest intermediate=" in text and "multiply out plates ['data']" in text
    assert r.plan.cost > 0 and r.plan.largest_intermediate >= 8 * 8


def test_second_call_does_no_path_search():
    plan_cache_clear()
    m, q = gaussian_toy(16)
    est = tg.TMC(m, q, K=8)
    x = {"x": gaussian_toy_data(16)}
    est.log_evidence(x, seed=0)
    searches = plan_cache_info()["searches"]
    for s in range(5):
        est.log_evidence(x, seed=s)  # the estimator's program holds the plan
        tg.TMC(m, q, K=8).log_evidence(x, seed=s)  # a new estimator finds it in the plan cache
    info = plan_cache_info()
    assert info["searches"] == searches
    assert info["hits"] >= 5
    assert info["maxsize"] == CACHE_SIZE
    assert est.programs.info()["programs"] == 1


def test_loopy_graph_plan_matches_brute_force(f64):
    """The paper's Fig. 1 loop: z1 -> z2, z1 -> z3, z2 -> z4, z3 -> z4 (factors f(k1,k2) ... f(k3,k4))."""
    m = tg.Model()
    m.latent("z1", lambda: Normal(0.0, 1.0))
    m.latent("z2", lambda z1: Normal(z1, 1.0))
    m.latent("z3", lambda z1: Normal(-z1, 1.0))
    m.latent("z4", lambda z2, z3: Normal(z2 + z3, 1.0))
    m.observed("x", lambda z4: Normal(z4, 1.0))
    q = tg.Proposal(m)
    for n in ("z1", "z2", "z3", "z4"):
        q.latent(n, lambda: Normal(0.0, 1.5), parents=[])
    for strategy in ("greedy", "optimal", "dp"):
        r = tg.TMC(m, q, K=4, strategy=strategy).run({"x": torch.tensor(0.7)}, seed=1)
        assert float(r.log_evidence) == float(tg.brute_force(r.graph)) or abs(
            float(r.log_evidence) - float(tg.brute_force(r.graph))) < 1e-10


def test_device_and_dtype_options():
    m, q = gaussian_toy(4)
    x = gaussian_toy_data(4, dtype=torch.float32)
    v = tg.TMC(m, q, K=4, device="cpu", dtype=torch.float64).log_evidence({"x": x}, seed=0)
    assert v.dtype == torch.float64 and v.device.type == "cpu"
    assert torch.get_default_dtype() == torch.float32  # restored
    v32 = tg.TMC(m, q, K=4).log_evidence({"x": x}, seed=0)
    assert v32.dtype == torch.float32


def test_seed_does_not_disturb_global_rng():
    m, q = gaussian_toy(4)
    x = gaussian_toy_data(4)
    torch.manual_seed(123)
    a = torch.rand(3)
    torch.manual_seed(123)
    tg.TMC(m, q, K=4).log_evidence({"x": x}, seed=7)
    b = torch.rand(3)
    assert torch.equal(a, b)


def test_generator_makes_sampling_reproducible():
    m, q = gaussian_toy(4)
    x = {"x": gaussian_toy_data(4)}
    est = tg.TMC(m, q, K=4)
    a = est.log_evidence(x, seed=torch.Generator().manual_seed(5))
    b = est.log_evidence(x, seed=torch.Generator().manual_seed(5))
    c = est.log_evidence(x, seed=torch.Generator().manual_seed(6))
    assert float(a) == float(b) != float(c)
