"""Posterior queries on Pyro programs, keyed by site name.

:class:`SitePosterior` wraps a :class:`tmcgraph.infer.posterior.Posterior` (the
TMC-reweighted posterior over every combination of the particles of one draw: exact
marginals by the adjoint pass, moments as weighted sums of particles, exact backward
samples) and translates Pyro site names to the translation's variable names. Tensors are
laid out as tmcgraph lays out particles: ``[K, *the site's plate sizes (in dim order),
*event]`` for particles and marginals, ``[*plate sizes, *event]`` for moments, ``[S,
*plate sizes, *event]`` for samples.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from ..errors import TMCGraphError
from ..infer.posterior import Posterior

__all__ = ["SitePosterior"]


class SitePosterior:
    """The TMC-reweighted posterior of a Pyro model's latent sites.

    Args:
        posterior: The tmcgraph posterior of the translation.
        names: Site name -> tmcgraph variable name.
    """

    def __init__(self, posterior: Posterior, names: dict):
        self.posterior = posterior
        self.names = dict(names)

    @property
    def log_evidence(self) -> torch.Tensor:
        """The estimate log P_TMC of the draw (detached)."""
        return self.posterior.log_evidence

    @property
    def sites(self) -> list:
        """The latent sites."""
        latent = set(self.posterior.samples.values)
        return [n for n, tg in self.names.items() if tg in latent]

    def _tg(self, site: str) -> str:
        tg = self.names.get(site)
        if tg is None or tg not in self.posterior.samples.values:
            raise TMCGraphError(f"unknown latent site {site!r}; the latent sites are {self.sites}")
        return tg

    def particles(self, site: str) -> torch.Tensor:
        """The particles of ``site``: ``[K, *plate sizes, *event]`` (detached)."""
        return self.posterior.samples.values[self._tg(site)].detach()

    def marginal(self, site: str) -> torch.Tensor:
        """The posterior probability of each particle of ``site``: ``[K, *plate sizes]``, summing to one over K."""
        return self.posterior.marginal(self._tg(site))

    def moment(self, site: str, f: Optional[Callable] = None) -> torch.Tensor:
        """``E[f(z)]`` per plate element; ``f`` maps particles ``[K, *plates, *event]`` to ``[K, *plates, ...]``."""
        return self.posterior.moment(self._tg(site), f)

    def mean(self, site: str) -> torch.Tensor:
        """Posterior mean of ``site``: ``[*plate sizes, *event]``."""
        return self.posterior.mean(self._tg(site))

    def var(self, site: str) -> torch.Tensor:
        """Posterior variance (elementwise) of ``site``."""
        return self.posterior.var(self._tg(site))

    def std(self, site: str) -> torch.Tensor:
        """Posterior standard deviation (elementwise) of ``site``."""
        return self.posterior.std(self._tg(site))

    def sample(self, S: int, seed=None, batch_size: Optional[int] = None) -> dict:
        """``S`` exact joint draws from the reweighted posterior: site name -> ``[S, *plate sizes, *event]``."""
        draws = self.posterior.sample(S, seed=seed, batch_size=batch_size)
        back = {tg: n for n, tg in self.names.items()}
        return {back[tg]: v for tg, v in draws.values.items()}

    def __repr__(self):
        return f"SitePosterior(sites={self.sites}, log_evidence={float(self.log_evidence):.4f})"
