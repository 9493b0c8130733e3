"""Mixture densities under ``memory_limit``: computed for chunks of particles, equal to the whole grid.

Truth: the mixture density written out, ``log (1/K_pa) sum_j N(z^k; mu(z_pa^j), s)``,
for every particle and plate element, with the drawn particles.
"""

import math

import pytest
import torch
from torch.distributions import Normal

import tmcgraph as tg

D = torch.float64


@pytest.mark.parametrize("limit", [None, 50, 7, 1])
def test_chunked_mixture_density_equals_the_written_out_mixture(limit):
    N, K = 3, 6
    m = tg.Model()
    m.plate("data", size=N)
    m.latent("a", lambda: Normal(0.0, 1.0))
    m.latent("z", lambda a: Normal(a, 1.0), plate="data")
    m.observed("x", lambda z: Normal(z, 1.0), plate="data")
    w = torch.tensor(0.7, dtype=D, requires_grad=True)
    q = tg.Proposal(m)
    q.latent("a", lambda: Normal(0.0, 1.5))
    q.latent("z", lambda a: Normal(w * a, 0.9), plate="data", coupling="mixture")
    est = tg.TMC(m, q, K=K, dtype=D, memory_limit=limit, compile=False)
    x = torch.randn(N, generator=torch.Generator().manual_seed(0), dtype=D)
    s = est.sample({"x": x}, seed=3).materialize()
    a, z = s.values["a"], s.values["z"]  # [K], [K, N]
    want = torch.logsumexp(Normal(w * a[None, :, None], 0.9).log_prob(z[:, None, :]), 1) - math.log(K)
    assert torch.allclose(s.log_q["z"], want, rtol=1e-12)
    g1 = torch.autograd.grad(s.log_q["z"].sum(), w, retain_graph=True)[0]
    g2 = torch.autograd.grad(want.sum(), w)[0]
    assert torch.allclose(g1, g2, rtol=1e-10)
    # and the estimate under the limit runs end to end (the contraction needs >= 18 elements here)
    if limit is None or limit >= 18:
        assert torch.isfinite(est.log_evidence({"x": x}, seed=3))
