"""Groups: several latents sharing one sample dim, drawn paired along it.

TMC gives every latent its own sample dim, so a factor with n latent parents is a
K^(n+1) grid and the estimate averages over K^n combinations of their particles. When
several latents sit at the same level of a hierarchy (the global hyper-parameters, or
the per-group mean, scale and slopes of a hierarchical regression) that grid is where
the cost goes, and the combinations add little: the latents are proposed jointly anyway.
A *group* declares that the latents using it share one sample dim::

    q.latent("global_mean", Q1, coupling=Group("globals"))
    q.latent("global_log_sigma", Q2, coupling=Group("globals"))

* **The dim.** Every latent declared with ``Group(name)`` gets the sample dim
  ``"_group_<name>"``; it is local to the intersection of the members' plates (one
  shared index per element of the plates all members lie in; a member in deeper plates
  has one particle per element of its own plates, all indexed by the shared dim, as in
  IWAE's :class:`~tmcgraph.sampling.couplings.Joint`).
* **Drawing.** Particle k of every member is drawn from its proposal given particle k of
  its parents (paired, :class:`~tmcgraph.sampling.couplings.Paired`): members of the same
  group are read at the same index, and a parent outside the group is paired along the
  group dim too (it must then have the same K). The density in the denominator is the one
  each particle was drawn from, ``Q(z^k | z_pa^k)``.
* **The estimator.** With dims ``d`` (groups and ungrouped latents), the estimate is

      P_hat = 1/prod_d K_d  sum_{k_d}  P(x, z^{k}) / prod_j q_j(z_j^{k_{d(j)}}),

  where ``d(j)`` is the dim of latent j: a group contributes K joint samples of its
  members instead of K^|group| combinations. Each term is an ordinary importance ratio
  of a joint draw, so ``E[P_hat] = p(x)`` (unbiased) for any grouping; one group holding
  every sampled latent is IWAE, no groups is TMC. Factors shrink accordingly: a
  likelihood whose parents are the members of one group is a ``K`` (not ``K^|group|``)
  vector per element.

Enumerated latents cannot be grouped (they keep their support as particles). An
estimator with its own coupling override (``tg.IWAE``) replaces groups by its joint dim.
"""

from __future__ import annotations

from typing import Optional

from ..errors import TMCGraphError
from ..model import Variable
from .couplings import Joint, Site

__all__ = ["Group", "group_members"]


def group_members(proposal, name: str) -> list:
    """Latents of ``proposal`` declared with ``Group(name)``, in declaration order."""
    return [n for n, v in proposal.variables.items()
            if isinstance(v.coupling, Group) and v.coupling.group == name and not v.enumerate]


class Group(Joint):
    """Latents declared with the same ``Group(name)`` share one sample dim, drawn paired along it.

    Args:
        name: The group's name (an identifier); its sample dim is ``"_group_<name>"``.
        K: Particles of the group (default: the estimator's K). Members may not set their
            own ``K`` unless it equals this one.

    Example:
        >>> import torch; from torch.distributions import Normal
        >>> import tmcgraph as tg
        >>> from tmcgraph.sampling.group import Group
        >>> m = tg.Model(); m.plate("data", size=3)
        >>> m.latent("a", lambda: Normal(0., 1.)); m.latent("b", lambda: Normal(0., 1.))
        >>> m.observed("x", lambda a, b: Normal(a + b, 1.), plate="data")
        >>> q = tg.Proposal(m)
        >>> q.latent("a", lambda: Normal(0., 1.), coupling=Group("g"))
        >>> q.latent("b", lambda: Normal(0., 1.), coupling=Group("g"))
        >>> s = tg.TMC(m, q, K=5).sample({"x": torch.zeros(3)}, seed=0)
        >>> s.dims["a"], s.dims["b"], s.sizes["_group_g"]
        ('_group_g', '_group_g', 5)
    """

    name = "group"

    def __init__(self, name: str, K: Optional[int] = None):
        if not isinstance(name, str) or not name.isidentifier():
            raise TMCGraphError(f"Group name must be an identifier, got {name!r}")
        if K is not None and (isinstance(K, bool) or int(K) != K or K < 1):
            raise TMCGraphError(f"Group({name!r}): K must be a positive integer, got {K!r}")
        self.group = name
        self.K = None if K is None else int(K)
        super().__init__(dim=f"_group_{name}")

    def dim(self, site: Site) -> tuple:
        q = site.proposal
        members = group_members(q, self.group)
        if site.name not in members:  # pragma: no cover - draw always passes a member
            members.append(site.name)
        for n in members:
            other = q[n].coupling
            if other.K != self.K:
                raise TMCGraphError(
                    f"Group({self.group!r}) is declared with K={self.K} for {site.name!r} but K={other.K} for {n!r}; "
                    "members of one group share one sample dim"
                )
        plates = [q[n].plates for n in members]
        return self.dim_name, tuple(p for p in q.model.plates if all(p in pl for pl in plates))

    def num_particles(self, var: Variable, K: int) -> int:
        n = self.K if self.K is not None else int(K)
        if var.K is not None and int(var.K) != n:
            raise TMCGraphError(
                f"proposal for {var.name!r} sets K={var.K} but its group {self.group!r} has K={n}; "
                f"set K on the group: Group({self.group!r}, K=...)"
            )
        return n

    def __repr__(self):
        return f"Group({self.group!r})" if self.K is None else f"Group({self.group!r}, K={self.K})"
