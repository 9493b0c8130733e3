"""The paper's linear-Gaussian toys, declared with the public API, with exact evidence.

* :func:`gaussian_toy`: theta ~ N(0, 1), z_i | theta ~ N(theta, 1), x_i | z_i ~ N(z_i, 1),
  i = 1..N (the paper's section 3.1, Fig. 3). Marginally x ~ N(0, 2 I + 1 1^T).
* :func:`gaussian_chain`: z_0 = 0, z_i | z_{i-1} ~ N(z_{i-1}, 1/n), x | z_n ~ N(z_n, 1)
  (section 3.2, Fig. 4). Marginally x ~ N(0, 2).
"""

from __future__ import annotations

import math

import torch
from torch.distributions import MultivariateNormal, Normal

from ..model import Model, Proposal

__all__ = [
    "gaussian_toy",
    "gaussian_toy_data",
    "gaussian_toy_log_evidence",
    "gaussian_chain",
    "gaussian_chain_log_evidence",
]


def gaussian_toy(N=None):
    """Model and proposal of the paper's Gaussian toy.

    Q(theta) = N(0, 1) and Q(z_i) = N(0, 2) (variance 2: the marginal of z_i), both
    factorised, as in the paper.

    Args:
        N: Number of data points, or ``None`` to take it from the data.

    Returns:
        ``(model, proposal)``.
    """
    m = Model()
    m.plate("data", size=N)
    m.latent("theta", lambda: Normal(0.0, 1.0))
    m.latent("z", lambda theta: Normal(theta, 1.0), plate="data")
    m.observed("x", lambda z: Normal(z, 1.0), plate="data")
    q = Proposal(m)
    q.latent("theta", lambda: Normal(0.0, 1.0))
    q.latent("z", lambda: Normal(0.0, math.sqrt(2.0)), plate="data")
    return m, q


def gaussian_toy_data(N: int, seed: int = 0, dtype=None) -> torch.Tensor:
    """Draw x (length N) from the toy model with a seeded generator."""
    g = torch.Generator().manual_seed(seed)
    dtype = dtype or torch.get_default_dtype()
    theta = torch.randn((), generator=g, dtype=dtype)
    z = theta + torch.randn(N, generator=g, dtype=dtype)
    return z + torch.randn(N, generator=g, dtype=dtype)


def gaussian_toy_log_evidence(x: torch.Tensor) -> torch.Tensor:
    """Exact log p(x) of the toy: x ~ N(0, 2 I + 1 1^T) (computed in float64)."""
    x = x.detach().to(torch.float64)
    N = x.shape[-1]
    cov = 2.0 * torch.eye(N, dtype=torch.float64) + torch.ones(N, N, dtype=torch.float64)
    return MultivariateNormal(torch.zeros(N, dtype=torch.float64), cov).log_prob(x)


def gaussian_chain(n: int = 100, proposal: str = "factorised", coupling=None):
    """Model and proposal of the paper's chain.

    Args:
        n: Chain length (latents z_1..z_n).
        proposal: ``"factorised"``: Q(z_i) = N(0, i/n) (the marginal variance);
            ``"prior"``: the prior transition Q(z_i | z_{i-1}) = N(z_{i-1}, 1/n).
        coupling: Coupling of the non-factorised (``"prior"``) proposal.

    Returns:
        ``(model, proposal)``; observe ``{"x": tensor(value)}``.
    """
    if proposal not in ("factorised", "prior"):
        raise ValueError(f"proposal must be 'factorised' or 'prior', got {proposal!r}")
    sd = math.sqrt(1.0 / n)
    m = Model()
    m.latent("z1", lambda: Normal(0.0, sd))
    for i in range(2, n + 1):
        m.latent(f"z{i}", lambda prev: Normal(prev, sd), parents=[f"z{i - 1}"])
    m.observed("x", lambda last: Normal(last, 1.0), parents=[f"z{n}"])
    q = Proposal(m)
    for i in range(1, n + 1):
        if proposal == "factorised":
            q.latent(f"z{i}", lambda s=math.sqrt(i / n): Normal(0.0, s), parents=[])
        else:
            q.prior(f"z{i}", coupling=coupling)
    return m, q


def gaussian_chain_log_evidence(x) -> torch.Tensor:
    """Exact log p(x) of the chain: x ~ N(0, 2) whatever n."""
    x = torch.as_tensor(x, dtype=torch.float64)
    return Normal(torch.tensor(0.0, dtype=torch.float64), math.sqrt(2.0)).log_prob(x)
