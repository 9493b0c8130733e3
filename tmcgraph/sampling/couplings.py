"""Couplings: how the K particles of a latent are drawn given its latent parents' particles.

A coupling decides three things for a latent ``z`` whose proposal Q(z | pa) has latent
parents: which parent particle each of its particles is drawn from, the log density
each particle was drawn from (the denominator of the TMC importance ratio), and which
sample dim the particles live on. The density is always the one the particle was
actually drawn from, so the estimator stays unbiased (the paper's appendix 7.2):

* :class:`Paired`: particle k is drawn from Q(. | z_pa^k) (parents need the same K);
  log q = log Q(z^k | z_pa^k). Cheap, but in TMC only consistent index paths carry
  weight, so tightly coupled chains lose most of the K^n combinations.
* :class:`Mixture`: particle k draws a parent index j ~ U{1..K_pa} per parent and plate
  element, then z^k ~ Q(. | z_pa^j); log q = log (1/K_pa) sum_j Q(z^k | z_pa^j).
* :class:`Permutation`: particle k is drawn from Q(. | z_pa^{sigma(k)}) for a uniformly
  random permutation sigma of the parent's particles (independent per parent and plate
  element), so each parent particle is used exactly once (when K equals the parent's K;
  otherwise in blocks of independent permutations, each used once per block). Each
  sigma(k) is marginally uniform, so conditionally on the parents' particles each child
  particle is marginally the mixture, and the density is the mixture's. This is the
  scheme of the TMC authors' MNIST code; it spreads the children over the parents
  instead of leaving some parents unused, which lowers the variance.
* :class:`Enumerated`: the particles are the support of the model's distribution, with
  log q = -log |support| (exact marginalisation, the paper's section 7.3).
* :class:`Joint`: IWAE's joint sample. Every sampled latent shares one sample dim local to
  the plates they all lie in, and is drawn paired along it, so the K^n combinations
  collapse to K joint samples.

Unbiasedness of the mixture density for index couplings: conditionally on all parent
particles, each child particle z^k has density M(z) = (1/K) sum_j Q(z | z_pa^j), so
E[sum_{k_pa} P(x, z_pa^{k_pa}, z^k) / (q_pa M(z^k))] = sum_{k_pa} P(x, z_pa^{k_pa}) / q_pa
(linearity of expectation needs only each particle's marginal, not independence).

Every coupling evaluates the proposal's callable through a :class:`Site`, and the
mixture-type couplings evaluate it once on every parent particle (grid layout): the
same distribution gives the density grid and, with its parameters gathered at the
drawn indices (:func:`tmcgraph.sampling.reflect.gather_dist`), the distribution each
particle is drawn from.

Users pass a coupling by name (``"paired"``, ``"mixture"``, ``"permutation"``) or as an
instance; :data:`DEFAULT` is used when a declaration names none.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Optional

import torch
from torch.utils.checkpoint import checkpoint

from ..errors import TMCGraphError
from ..model import Proposal, Variable
from ..particles import Deferred, Samples, check_batch_shape, expand_plates, parent_inputs, place
from .context import Context
from .densities import log_prob
from .reflect import Unsupported, flatten, gather_dist, unflatten

__all__ = [
    "Site",
    "Coupling",
    "Paired",
    "Mixture",
    "Permutation",
    "Enumerated",
    "STATIC_SUPPORT",
    "Joint",
    "Across",
    "COUPLINGS",
    "DEFAULT",
    "get_coupling",
]


@dataclass
class Site:
    """One latent being drawn: everything a coupling needs.

    Attributes:
        name: The latent.
        var: Its proposal declaration (callable, parents, plates).
        proposal: The proposal (for evaluating with its parameters detached).
        samples: Particles drawn so far (and the data).
        K: Number of particles to draw.
        plates: The latent's plates.
        pshape: Their sizes.
        ctx: The call's execution context (generator, dtype, device).
        dim: The latent's sample dim (set from :meth:`Coupling.dim`).
        detach: Evaluate the density with the proposal's parameters detached (STL).
        defer: A coupling may return its density as a :class:`~tmcgraph.particles.Deferred`
            (computed later, inside a compiled program).
    """

    name: str
    var: Variable
    proposal: Proposal
    samples: Samples
    K: int
    plates: tuple
    pshape: list
    ctx: Context
    dim: Optional[str] = None
    detach: bool = False
    defer: bool = False

    @property
    def latent_parents(self) -> list:
        """The proposal's parents that are latents (already drawn)."""
        return [p for p in self.var.parents if p in self.samples.values and p != self.name]

    @property
    def shape(self) -> list:
        """``[K, *plate sizes]``: the batch shape of the particles."""
        return [self.K] + list(self.pshape)

    def evaluate(self, dims: tuple, rename: Optional[dict] = None, detach: bool = False):
        """The proposal's distribution with parents placed in the layout ``[*dims, *plates]``.

        ``detach`` evaluates it with the proposal's registered parameters detached.
        """
        inputs = parent_inputs(self.var.parents, self.samples, dims, self.plates, rename)
        return _with_params(self.proposal, detach, lambda: self.ctx.dist(self.var.dist(inputs)))

    def check(self, d) -> None:
        """Raise unless ``d``'s batch shape broadcasts to ``[K, *plates]``."""
        check_batch_shape(self.name, "proposal", d, self.shape, [f"K[{self.dim}]"] + list(self.plates))

    def draw(self, d) -> torch.Tensor:
        """``K`` particles from ``d`` (batch shape broadcasting to ``[K, *plates]``)."""
        shape = torch.Size(self.shape)
        bs = tuple(d.batch_shape)
        n = len(shape) - len(bs)
        if n >= 0 and tuple(shape[n:]) == bs:  # leading sample dims only: no expanded copy of d
            return self.ctx.sample(d, shape[:n])
        return self.ctx.sample(d.expand(shape), ())


class Coupling:
    """How the particles of one latent are drawn, and the density they were drawn from.

    Subclasses implement :meth:`sample` and :meth:`log_density`; :meth:`dim` and
    :meth:`num_particles` have defaults (the latent's own dim, local to its plates; the
    declared or the estimator's K).
    """

    #: Name users may pass instead of an instance.
    name: str = ""

    def dim(self, site: Site) -> tuple:
        """``(sample dim name, plates it is local to)`` of the latent's particles."""
        return site.name, tuple(site.plates)

    def num_particles(self, var: Variable, K: int) -> int:
        """Particles to draw for ``var`` when the estimator's K is ``K``."""
        return int(var.K or K)

    def sample(self, site: Site) -> tuple:
        """Draw ``site.K`` particles; return ``(z [K, *plates, *event], log_q [K, *plates])``."""
        raise NotImplementedError

    def log_density(self, site: Site, z: torch.Tensor) -> torch.Tensor:
        """Re-evaluate the density ``z`` was drawn from (``[K, *plates]``), with ``site.detach`` honoured."""
        raise NotImplementedError

    def __repr__(self):
        return f"{type(self).__name__}()"

    def __eq__(self, other):
        return type(self) is type(other) and vars(self) == vars(other)

    def __hash__(self):
        return hash((type(self), tuple(sorted(vars(self).items()))))


def _log_prob_at(d, z: torch.Tensor, shape: list) -> torch.Tensor:
    """``d.log_prob(z)`` with batch shape ``shape``, ``d``'s batch shape broadcasting to it."""
    lp = log_prob(d, z)
    return lp if list(lp.shape) == list(shape) else lp.expand(shape)


class Paired(Coupling):
    """Particle k of the latent is drawn from Q(. | z_pa^k); density Q(z^k | z_pa^k).

    Also the coupling of every latent without latent parents (where all couplings agree).
    """

    name = "paired"

    def _rename(self, site: Site) -> dict:
        rename = {}
        for p in site.latent_parents:
            s = site.samples
            if s.dims[p] == site.dim:
                continue
            Kp = s.values[p].shape[0]
            if Kp != site.K:
                raise TMCGraphError(
                    f"paired coupling on edge {p!r} -> {site.name!r} needs equal K, got K[{p}]={Kp}, "
                    f"K[{site.name}]={site.K}; use coupling='mixture' or 'permutation', or equal K"
                )
            rename[p] = (expand_plates(s, p, site.plates, site.pshape), site.dim)
        return rename

    def sample(self, site: Site) -> tuple:
        d = site.evaluate((site.dim,), self._rename(site))
        site.check(d)
        z = site.draw(d)
        if site.detach:
            return z, self.log_density(site, z)
        return z, _log_prob_at(d, z, site.shape)  # reuse the sampling distribution

    def log_density(self, site: Site, z: torch.Tensor) -> torch.Tensor:
        d = site.evaluate((site.dim,), self._rename(site), detach=site.detach)
        return _log_prob_at(d, z, [z.shape[0]] + list(site.pshape))


_PAIRED = Paired()


class Mixture(Coupling):
    """Each particle draws its parents' particle indices uniformly; density (1/K) sum_j Q(z^k | z_pa^j)."""

    name = "mixture"

    def indices(self, site: Site, K_parent: int, device) -> torch.Tensor:
        """Parent particle index of every particle and plate element: ``[K, *plates]``."""
        return site.ctx.randint(K_parent, site.shape, device)

    def _grid_dims(self, site: Site) -> tuple:
        return tuple(dict.fromkeys(site.samples.dims[p] for p in site.latent_parents))

    def sample(self, site: Site) -> tuple:
        parents = site.latent_parents
        if not parents:
            return _PAIRED.sample(site)
        s = site.samples
        Kps = [s.values[p].shape[0] for p in parents]
        idxs = [self.indices(site, Kp, s.values[p].device) for p, Kp in zip(parents, Kps)]
        pdims = self._grid_dims(site)
        grid = d = None
        if not site.detach:
            # One network pass: the grid-layout distribution (every parent particle at its
            # own position) gives both the sampling distribution (its parameters gathered
            # at the drawn indices) and the mixture density.
            grid = site.evaluate((site.dim,) + pdims)
            if len(pdims) == len(parents):
                d = gather_dist(grid, idxs, site.shape, Kps)
        if d is None:
            rename = {p: (_gather(expand_plates(s, p, site.plates, site.pshape), j), site.dim)
                      for p, j in zip(parents, idxs)}
            d = site.evaluate((site.dim,), rename)
        site.check(d)
        z = site.draw(d)
        if grid is None:
            return z, self.log_density(site, z)
        if site.defer:
            try:
                spec, params = flatten(grid)
            except Unsupported:
                spec = None
            if spec is not None:
                s = site.samples
                recipe = (spec, len(params), site.dim, tuple(site.plates), pdims,
                          tuple(s.sizes[pd] for pd in pdims), tuple(site.pshape), _grid_limit(site))
                return z, Deferred(_mixture_log_q, recipe, tuple(params) + (z,))
        return z, self._reduce(site, grid, z, pdims)

    def log_density(self, site: Site, z: torch.Tensor) -> torch.Tensor:
        if not site.latent_parents:
            return _PAIRED.log_density(site, z)
        pdims = self._grid_dims(site)
        grid = site.evaluate((site.dim,) + pdims, detach=site.detach)
        return self._reduce(site, grid, z, pdims)

    def _reduce(self, site: Site, grid, z: torch.Tensor, pdims: tuple) -> torch.Tensor:
        """``log (1/prod K_pa) sum_j Q(z^k | z_pa^j)`` from the grid-layout distribution."""
        s = site.samples
        return _mixture_reduce(grid, z, site.dim, tuple(site.plates), pdims, [s.sizes[pd] for pd in pdims],
                               site.pshape, _grid_limit(site))


class Permutation(Mixture):
    """Each parent particle is used once (random permutation); the mixture density.

    With K_child = K_parent, sigma is a uniformly random permutation per parent and plate
    element. Otherwise the indices are blocks of independent permutations of the
    parent's particles, cut to K_child, so each index is still marginally uniform.
    """

    name = "permutation"

    def indices(self, site: Site, K_parent: int, device) -> torch.Tensor:
        return site.ctx.permutations(K_parent, site.K, site.pshape, device)


#: Families whose enumerable support depends only on their parameters' shapes.
STATIC_SUPPORT = (torch.distributions.Bernoulli, torch.distributions.Categorical,
                  torch.distributions.OneHotCategorical)

#: Proposal -> {(declaration versions, latent, plate sizes, device, dtype): (particles, log q)}.
_SUPPORTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


class Enumerated(Coupling):
    """The particles are the support of the model's distribution; log q = -log |support|.

    For the families in :data:`STATIC_SUPPORT` the support depends on nothing but shapes,
    so it is computed once per declaration version, latent and plate sizes (at the
    first call, which also checks the distribution) and reused: later calls do not
    evaluate the latent's distribution to draw it.
    """

    name = "enumerate"

    def sample(self, site: Site) -> tuple:
        m = site.proposal.model
        key = (site.proposal._version, m._version, site.name, tuple(site.pshape), site.ctx.device, site.ctx.dtype,
               torch.get_default_dtype())
        cache = _SUPPORTS.get(site.proposal)
        if cache is not None and key in cache:
            return cache[key]
        z, lq, static = self._enumerate(site)
        if static:
            if cache is None or next(iter(cache))[:2] != key[:2]:
                cache = _SUPPORTS[site.proposal] = {}  # a new declaration version drops the old entries
            cache[key] = z, lq
        return z, lq

    def _enumerate(self, site: Site) -> tuple:
        s = site.samples
        pdims = tuple(dict.fromkeys(s.dims[p] for p in site.var.parents if p in s.dims))
        d = site.ctx.dist(site.var.dist(parent_inputs(site.var.parents, s, pdims, site.plates)))
        if not d.has_enumerate_support:
            raise TMCGraphError(
                f"latent {site.name!r} is marked for enumeration but {type(d).__name__} has no enumerable support"
            )
        sup = d.enumerate_support(expand=False)
        n = sup.shape[0]
        ev = tuple(d.event_shape)
        sup = site.ctx.to(sup.reshape(n, *ev))
        z = sup.reshape(n, *([1] * len(site.plates)), *ev).expand(n, *site.pshape, *ev)
        dtype = site.ctx.dtype or (sup.dtype if sup.is_floating_point() else torch.get_default_dtype())
        lq = torch.full((n, *site.pshape), -math.log(n), dtype=dtype, device=sup.device)
        return z, lq, type(d) in STATIC_SUPPORT and not sup.requires_grad

    def log_density(self, site: Site, z: torch.Tensor) -> torch.Tensor:
        return site.samples.log_q[site.name]


class Joint(Paired):
    """IWAE: every sampled latent on one shared sample dim, drawn paired along it.

    The dim is local to the plates every sampled latent lies in (one joint sample per
    element of those plates; a single joint sample when some latent is global).
    Enumerated latents keep their own dims and are summed exactly inside each joint
    sample.

    Args:
        dim: Name of the shared sample dim.
    """

    name = "joint"

    def __init__(self, dim: str = "_joint"):
        self.dim_name = dim

    def dim(self, site: Site) -> tuple:
        q = site.proposal
        sampled = [q[n].plates for n in site.samples.order if not q[n].enumerate]
        # Not local to a Markov plate: a joint sample is a whole trajectory along it.
        return self.dim_name, tuple(p for p, P in q.model.plates.items()
                                    if all(p in pl for pl in sampled) and not P.markov)

    def num_particles(self, var: Variable, K: int) -> int:
        if var.K is not None and var.K != K:
            raise TMCGraphError(f"IWAE shares one sample dim of size K={K}; proposal for {var.name!r} sets K={var.K}")
        return int(K)

    def __repr__(self):
        return f"Joint(dim={self.dim_name!r})"


class Across(Paired):
    """Latents of a joint plate (``q.joint(plate)``): one sample dim shared across the plate's elements.

    Particle ``k`` of every sampled latent in ``plate`` is a draw of the latent's whole
    vector over the plate, paired along the shared dim with the other latents of the
    plate, so the dim is local to the latent's plates *except* ``plate``; its density is
    the product over the plate's elements (the factors multiply out the plate before
    the dim is summed). This is what makes crossed plates contractable.

    Args:
        plate: The joint plate.
    """

    name = "across"

    def __init__(self, plate: str):
        self.plate = plate

    def dim(self, site: Site) -> tuple:
        return f"_across_{self.plate}", tuple(p for p in site.plates if p != self.plate)

    def num_particles(self, var: Variable, K: int) -> int:
        if var.K is not None and var.K != K:
            raise TMCGraphError(
                f"the latents of joint plate {self.plate!r} share one sample dim of size K={K}; proposal for "
                f"{var.name!r} sets K={var.K}")
        return int(K)

    def __repr__(self):
        return f"Across({self.plate!r})"


#: Couplings users may name in a declaration.
COUPLINGS = {c.name: c for c in (Paired, Mixture, Permutation)}

#: The coupling of a declaration that names none.
DEFAULT = "permutation"


def get_coupling(spec, name: str = "?") -> Coupling:
    """The coupling object for a declaration's ``coupling=`` (a name, an instance or ``None``)."""
    if spec is None:
        spec = DEFAULT
    if isinstance(spec, Coupling):
        return spec
    if isinstance(spec, str):
        cls = COUPLINGS.get(spec)
        if cls is None:
            raise TMCGraphError(
                f"proposal for {name!r}: unknown coupling {spec!r}; "
                f"choose one of {sorted(COUPLINGS)} or pass a Coupling"
            )
        return cls()
    raise TMCGraphError(f"proposal for {name!r}: coupling must be a name or a Coupling instance, got {spec!r}")


def _grid_limit(site: Site):
    """Largest grid (elements) a mixture density may build at once: the memory limit, or a split chunk's grid."""
    limit = site.ctx.memory_limit
    split = getattr(site.ctx, "split", None)
    if split is not None and split[0] in site.plates:
        n = site.pshape[list(site.plates).index(split[0])]
        s = site.samples
        grid = site.K * math.prod(s.sizes[s.dims[p]] for p in site.latent_parents) * math.prod(site.pshape)
        chunked = max(1, grid * min(split[1], n) // max(n, 1))
        limit = chunked if limit is None else min(limit, chunked)
    return limit


def _mixture_reduce(grid, z, dim, plates, pdims, Kps, pshape, memory_limit=None) -> torch.Tensor:
    """``log (1/prod K_pa) sum_j Q(z^k | z_pa^j)``: the grid-layout density of ``z``, averaged over parents.

    With ``memory_limit`` (elements) the ``K x prod K_pa x plates`` grid is computed for
    chunks of the particles ``z^k`` that fit (each chunk checkpointed under autograd).
    """
    K = z.shape[0]
    per = math.prod(Kps) * math.prod(pshape)
    step = K if memory_limit is None else max(1, min(K, int(memory_limit) // max(per, 1)))
    if step >= K:
        return _mixture_chunk(grid, z, dim, plates, pdims, Kps, pshape)
    grad = torch.is_grad_enabled()
    parts = []
    for a in range(0, K, step):
        zc = z.narrow(0, a, min(step, K - a))
        if grad:
            parts.append(checkpoint(_mixture_chunk, grid, zc, dim, plates, pdims, Kps, pshape, use_reentrant=False))
        else:
            parts.append(_mixture_chunk(grid, zc, dim, plates, pdims, Kps, pshape))
    return torch.cat(parts, 0)


def _mixture_chunk(grid, z, dim, plates, pdims, Kps, pshape) -> torch.Tensor:
    zg = place(z, (dim,), plates, (dim,) + tuple(pdims), plates)
    lg = log_prob(grid, zg)
    lg = lg.expand([z.shape[0]] + list(Kps) + list(pshape))  # Q may ignore a parent
    red = list(range(1, 1 + len(pdims)))
    return torch.logsumexp(lg, dim=red) - sum(math.log(k) for k in Kps)


def _mixture_log_q(recipe, *tensors) -> torch.Tensor:
    """A deferred mixture density: the grid distribution rebuilt from its parameters, then reduced."""
    spec, n, dim, plates, pdims, Kps, pshape, limit = recipe
    return _mixture_reduce(unflatten(spec, tensors[:n]), tensors[n], dim, plates, pdims, Kps, pshape, limit)


def _with_params(proposal: Proposal, detach: bool, fn):
    """Run ``fn()``, with the proposal's parameters and buffers detached if ``detach``.

    Every module object under the proposal is visited once and each of its own parameter
    and buffer slots is pointed at a detached alias (one alias per tensor, so weights tied
    across modules stay tied), then restored. Modules shared by several latents (a feature
    chain that several recognition layers read) are handled: ``torch.func.functional_call``
    with tied weights restores such modules with the detached tensors, which left the
    proposal untrainable after the first STL or DReGs step.
    """
    if not detach:
        return fn()
    aliases, saved = {}, []
    try:
        for mod in proposal.modules():  # each module object once, however many paths reach it
            for store in (mod._parameters, mod._buffers):
                for name, t in list(store.items()):
                    if t is None:
                        continue
                    alias = aliases.get(id(t))
                    if alias is None:
                        alias = aliases[id(t)] = t.detach()
                    saved.append((store, name, t))
                    store[name] = alias
        return fn()
    finally:
        for store, name, t in reversed(saved):
            store[name] = t


def _gather(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``out[k, e...] = t[idx[k, e], e...]`` along dim 0 (event dims carried along)."""
    ev = t.dim() - idx.dim()
    full = idx.reshape(*idx.shape, *([1] * ev)).expand(idx.shape[0], *t.shape[1:])
    return torch.gather(t, 0, full)
