"""Factors are built inside the contraction steps that consume them, and per slice under a memory limit.

Oracle: ``tg.brute_force`` on the full factor graph of the same particles (enumerating
every index combination). The size of every log-density grid the model computes is
recorded by a distribution subclass, so the memory bound is checked on what was
actually built, not on the plan's own accounting.
"""

import pytest
import torch
from torch.distributions import Normal

import tmcgraph as tg
from tmcgraph.ops.factor import Lazy

K = 48
LIMIT = 200  # < K * K: every K x K factor must be built in slices


class Recorded(Normal):
    """A Normal that records the number of elements of every log-density it computes."""

    sizes: list = []

    def log_prob(self, value):
        out = super().log_prob(value)
        Recorded.sizes.append(out.numel())
        return out


def chain(n=3, scale=None):
    m = tg.Model()
    m.latent("z0", lambda: Recorded(0.0, 1.0))
    for i in range(1, n):
        m.latent(f"z{i}", lambda z, s=scale: Recorded(0.9 * z, 1.0 if s is None else s), parents=[f"z{i - 1}"])
    m.observed("x", lambda z: Recorded(z, 1.0), parents=[f"z{n - 1}"])
    q = tg.Proposal(m)
    for i in range(n):
        q.latent(f"z{i}", lambda: Normal(0.0, 1.5))
    return m, q


@pytest.mark.parametrize("compile", [False, True])
def test_no_factor_is_built_beyond_the_limit(f64, compile):
    m, q = chain()
    est = tg.TMC(m, q, K=K, memory_limit=LIMIT, compile=compile)
    data = {"x": torch.tensor(1.3)}
    for seed in range(3):  # the first (planning) call, then the structure's program
        Recorded.sizes.clear()
        r = est.run(data, seed=seed)
        assert max(Recorded.sizes) <= LIMIT, (seed, max(Recorded.sizes))
        assert any(s.sliced for s in r.plan.steps)
        assert float(r.log_evidence) == pytest.approx(float(tg.brute_force(r.graph)), rel=1e-9)


def test_unlimited_program_builds_each_factor_once_in_its_step(f64):
    m, q = chain(n=4)
    est = tg.TMC(m, q, K=24, compile=False)
    data = {"x": torch.tensor(-0.4)}
    est.run(data, seed=0)
    Recorded.sizes.clear()
    r = est.run(data, seed=1)
    # one log-density per model variable per call: nothing built twice
    assert len(Recorded.sizes) == len(m.validate())
    assert float(r.log_evidence) == pytest.approx(float(tg.brute_force(r.graph)), rel=1e-9)


def test_sliced_gradients_equal_brute_force(f64):
    scale = torch.tensor(0.8, requires_grad=True)
    m, q = chain(scale=scale)
    est = tg.TMC(m, q, K=16, memory_limit=40, compile=False)
    data = {"x": torch.tensor(0.7)}
    for seed in range(2):
        r = est.run(data, seed=seed)
        (g,) = torch.autograd.grad(r.log_evidence, scale)
        (g_bf,) = torch.autograd.grad(tg.brute_force(r.graph), scale)
        assert float(g) == pytest.approx(float(g_bf), rel=1e-8)


def test_lazy_narrowing_composes():
    full = torch.arange(24.0).reshape(2, 3, 4)

    def build(narrowed):
        t = full
        for ax, i in narrowed:
            t = t.narrow(ax, i, 1)
        return t

    z = Lazy(build).narrow(0, 1, 1).narrow(2, 3, 1)
    assert torch.equal(z(), full[1:2, :, 3:4])
    assert Lazy(build).narrow(1, 1, 2).narrowed == ((1, 1, 2),)  # a chunk of a split plate
    with pytest.raises(ValueError, match="at least one entry"):
        Lazy(build).narrow(0, 0, 0)
