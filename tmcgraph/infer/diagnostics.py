"""Effective sample sizes of the TMC-reweighted posterior.

TMC sums over every combination ``k`` of particle indices (one index per sample dim and
per element of the plates the dim is local to)::

    P_TMC = sum_k w(k),   w(k) = prod_f exp(f[k]),   pi(k) = w(k) / P_TMC

(``f``: the log-factors ``log P - log q - log K``, see :mod:`tmcgraph.infer.factors`).
Two kinds of effective sample size (Kish 1965) summarise how evenly that weight is
spread:

* **Marginal ESS** (:func:`marginal_ess`), per latent and plate element. With
  ``pi_k = pi(k_{j,e} = k)`` the posterior probability of particle ``k`` of latent ``j``
  at element ``e`` (:meth:`~tmcgraph.infer.posterior.Posterior.marginal`)::

      ESS_{j,e} = 1 / sum_k pi_k^2          (1 <= ESS_{j,e} <= K_j)

  It says how many of that latent's K particles carry the marginal posterior there: the
  marginal moments (``Posterior.mean``, ``var``) at that element are weighted averages
  of about ``ESS_{j,e}`` particles.

* **Weight ESS** (:func:`weight_ess`, :func:`graph_weight_ess`) of the joint importance
  weights over the combinations of a chosen set ``D`` of sample dims, every other dim
  summed out. With ``k_D`` the indices of the dims in ``D`` (at every element of their
  plates) and ``k_R`` the rest::

      w_D(k_D) = sum_{k_R} w(k_D, k_R),    ESS_D = (sum_{k_D} w_D)^2 / sum_{k_D} w_D^2

  (``1 <= ESS_D <= n_D``, the number of combinations of ``k_D``:
  ``n_D = prod_{d in D} K_d^{#elements of d's plates}``). Both sums are contractions
  of the same kind as ``P_TMC`` itself, so nothing is enumerated:

  - ``sum_{k_D} w_D = P_TMC``;
  - ``sum_{k_D} w_D(k_D)^2 = sum_{k_D, k_R, k_R'} w(k_D, k_R) w(k_D, k_R')``: the
    contraction of a graph in which every factor that touches a dim of ``R`` appears
    twice (once on ``R``, once on a copy ``R'`` of those dims, with the same plates),
    and every other factor once with doubled log values ``2 f``. With ``R`` empty it is
    the plan of ``P_TMC`` on ``2 f``.

  Plates enter through the weights: the weight of a combination is a product over
  plate elements of per-element factors, and summing out a local dim ``r`` happens per
  element (``w_D`` is a product over elements of per-element sums). Three choices of
  ``D`` are named:

  - ``"global"`` (default): the sampled dims outside every plate (the global latents).
    ``ESS_global`` is the importance-sampling ESS of the ``prod_g K_g`` combinations
    of global particles, with every local latent integrated out by its own particles
    (Rao-Blackwellised): the TMC counterpart of IWAE's ESS. In IWAE with a global
    latent it *is* the usual ESS of the K joint weights. Without global dims there is
    one combination and ``ESS_global = 1``.
  - ``"all"``: every sampled dim. ``ESS_all`` is the ESS of ``pi`` over all ``n``
    combinations; when every dim is local to one plate, the combinations factorise over
    its elements and ``ESS_all`` is the product of the per-element ESSes (so report
    ``log_ess``: it can exceed the floating range).
  - ``elementwise=True`` (or a plate name): one ESS per element of the outermost (or
    named) plate, the graph contracted with that plate kept (as
    ``log_evidence(..., elementwise=True)``); allowed when no sample dim is shared
    across its elements. ``"global"`` then means the dims local to exactly that plate.

  Enumerated latents (``q.enumerate``) are not samples: they are always summed out
  (in ``R``) unless named explicitly.

Both are diagnostics of the particles, not of posterior draws: ``S`` draws from ``pi``
(:meth:`~tmcgraph.infer.posterior.Posterior.sample`) are exact draws, but repeat the
same few combinations when the ESS is small.

Reference: L. Kish, *Survey Sampling* (1965); A. Kong, "A note on importance sampling
using standardized weights" (1992); L. Aitchison, "Tensor Monte Carlo: particle methods
for the GPU era" (2019).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch

from ..errors import TMCGraphError
from ..ops.contract import contract
from ..ops.factor import Factor, FactorGraph
from ..ops.plan import plan_for
from ..sampling.couplings import Enumerated
from .posterior import Posterior

__all__ = [
    "kish_ess",
    "marginal_ess",
    "WeightESS",
    "graph_weight_ess",
    "weight_ess",
    "Diagnostics",
    "diagnose",
]

#: Suffix of the copies of summed-out dims in the graph of ``sum w_D^2``.
COPY = "'"


def kish_ess(weights: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Kish's effective sample size ``(sum_k p_k)^2 / sum_k p_k^2`` along ``dim``.

    Args:
        weights: Non-negative weights (probabilities or unnormalised).
        dim: The axis of the particles.

    Returns:
        The ESS, with ``dim`` reduced; between 1 and ``weights.shape[dim]`` wherever
        some weight is positive (NaN where all are zero).

    Example:
        >>> import torch
        >>> kish_ess(torch.tensor([0.25, 0.25, 0.25, 0.25])), kish_ess(torch.tensor([1., 0., 0.]))
        (tensor(4.), tensor(1.))
    """
    if weights.dim() == 0:
        raise TMCGraphError("kish_ess needs at least one axis of weights")
    if not weights.is_floating_point():
        weights = weights.to(torch.get_default_dtype())
    top = weights.amax(dim, keepdim=True)
    p = weights / top  # scale-free: (sum p)^2 / sum p^2 is invariant to scaling
    return p.sum(dim) ** 2 / (p * p).sum(dim)


def marginal_ess(post: Posterior, names: Union[str, Sequence[str], None] = None):
    """Per-latent, per-plate-element ESS of the posterior marginals: ``1 / sum_k pi_k^2``.

    Args:
        post: A :class:`~tmcgraph.infer.posterior.Posterior`.
        names: A latent name (returns one tensor), a list of them, or ``None`` (every
            latent; returns a dict).

    Returns:
        ``[*plate sizes]`` per latent (1 = one particle carries the marginal; K = all
        particles equally).

    Example:
        >>> import torch, tmcgraph as tg
        >>> from tmcgraph.models.toys import gaussian_toy
        >>> m, q = gaussian_toy()
        >>> post = tg.posterior(tg.TMC(m, q, K=32), {"x": torch.tensor([0.5, 1.0])}, seed=0)
        >>> marginal_ess(post, "z").shape, bool((marginal_ess(post, "theta") <= 32).all())
        (torch.Size([2]), True)
    """
    one = isinstance(names, str)
    wanted = [names] if one else list(post.samples.values) if names is None else list(names)
    out = {}
    for n in wanted:
        m = post.marginal(n)  # [K, *plates], raises on unknown names
        K = m.shape[0]
        out[n] = kish_ess(m, 0).clamp(1.0, float(K))
    return out[names] if one else out


@dataclass
class WeightESS:
    """The Kish ESS of the importance weights over the combinations of some sample dims.

    Attributes:
        log_ess: ``log ESS_D = 2 log sum_{k_D} w_D - log sum_{k_D} w_D^2`` (a scalar, or
            ``[plate size]`` per element of the kept plate), clamped to
            ``[0, log_combinations]`` against rounding.
        log_combinations: ``log n_D``: the log of the number of combinations of the dims.
        dims: The sample dims ``D`` whose combinations are weighed.
        keep: The plate kept per element, or ``None``.
        log_z: ``log sum_{k_D} w_D`` (``log P_TMC``).
        log_z2: ``log sum_{k_D} w_D^2``.
    """

    log_ess: torch.Tensor
    log_combinations: float
    dims: tuple
    keep: Optional[str] = None
    log_z: torch.Tensor = field(default=None, repr=False)
    log_z2: torch.Tensor = field(default=None, repr=False)

    @property
    def ess(self) -> torch.Tensor:
        """``ESS_D`` (``inf`` where it exceeds the floating range: use :attr:`log_ess`)."""
        return self.log_ess.exp()

    @property
    def efficiency(self) -> torch.Tensor:
        """``ESS_D / n_D`` in ``[1/n_D, 1]``: the fraction of combinations that effectively count."""
        return (self.log_ess - self.log_combinations).exp()


def _dims_set(graph: FactorGraph, dims) -> tuple:
    used = graph.sample_dims
    dims = tuple(dict.fromkeys(dims))
    unknown = [d for d in dims if d not in used]
    if unknown:
        raise TMCGraphError(f"unknown sample dim(s) {list(unknown)}; the factors use {used}")
    return dims


def squared_weight_graph(graph: FactorGraph, dims) -> FactorGraph:
    """The graph whose value is ``log sum_{k_D} w_D(k_D)^2`` (``D`` = ``dims``, the rest summed out).

    Factors touching a summed-out dim appear twice, the second time on copies of those
    dims (named ``dim + "'"``, same ordinals); the others once with ``2 f``.
    """
    dims = _dims_set(graph, dims)
    summed = [d for d in graph.sample_dims if d not in dims]
    clash = [d + COPY for d in summed if d + COPY in graph.sample_dims]
    if clash:
        raise TMCGraphError(f"sample dim name(s) {clash} are reserved for copies of summed-out dims")
    ren = {d: d + COPY for d in summed}
    out = []
    for f in graph.factors:
        if any(d in ren for d in f.sample_dims):
            out.append(f)
            out.append(Factor(f.name + COPY, f.tensor, tuple(ren.get(d, d) for d in f.sample_dims), f.plates))
        else:
            out.append(f.with_tensor(2.0 * f.tensor))
    ordinals = {**{d: tuple(graph.ordinals[d]) for d in graph.sample_dims},
                **{ren[d]: tuple(graph.ordinals[d]) for d in summed}}
    markov = {p: tuple(pairs) + tuple((ren[a], ren[b]) for a, b in pairs if a in ren and b in ren)
              for p, pairs in graph.markov.items()}
    return FactorGraph(tuple(out), ordinals, graph.keep, markov=markov)


def graph_weight_ess(graph: FactorGraph, dims=None, strategy="auto", memory_limit=None,
                     log_z: Optional[torch.Tensor] = None) -> WeightESS:
    """ESS of the weights of a factor graph over the combinations of ``dims`` (the rest summed out).

    Args:
        graph: The factor graph (its kept plate, if any, gives one ESS per element).
        dims: Sample dims ``D`` whose combinations are weighed (default: all of them).
        strategy: Path strategy for both contractions.
        memory_limit: Largest tensor (elements) for the planner.
        log_z: The graph's value if already known (saves one contraction).

    Returns:
        The :class:`WeightESS`.

    Raises:
        TMCGraphError: unknown dims, or a graph whose value is zero (no combination
            carries weight: the ESS is undefined).

    Example:
        >>> import torch, tmcgraph as tg
        >>> f = tg.Factor("a", torch.zeros(4), ("i",), ())          # 4 equal weights
        >>> g = tg.FactorGraph([f], {"i": ()})
        >>> round(float(graph_weight_ess(g).ess), 6)
        4.0
    """
    graph = graph.detach()
    dims = tuple(graph.sample_dims) if dims is None else _dims_set(graph, dims)
    if log_z is None:
        log_z = contract(plan_for(graph, strategy, memory_limit), graph.tensors)
    log_z = log_z.detach()
    if not bool(torch.isfinite(log_z).all()):
        raise TMCGraphError(
            f"the contraction is zero or not finite (log value {log_z.flatten()[:4].tolist()}): no particle "
            "combination carries weight, so the effective sample size is undefined"
        )
    # A Markov pair's previous-index dim is its dim one element earlier: weighed with it, never counted.
    prev_of = {d: pd for pairs in graph.markov.values() for pd, d in pairs}
    dims = tuple(d for d in dims if d not in graph.prev_dims)
    g2 = squared_weight_graph(graph, dims + tuple(prev_of[d] for d in dims if d in prev_of))
    log_z2 = contract(plan_for(g2, strategy, memory_limit), g2.tensors)
    # The first element's free previous index carries weight 1/K in one factor (it is summed
    # out, not a particle): squared and summed it gives 1/K instead of 1 per chain, so add log K.
    sizes = graph.sizes
    for plate, pairs in graph.markov.items():
        for pd, d in pairs:
            if d in dims:
                chains = math.prod(sizes[p] for p in graph.ordinals[d] if p not in (plate, graph.keep))
                log_z2 = log_z2 + chains * math.log(sizes[d])
    sizes = graph.sizes
    log_n = 0.0
    for d in dims:
        elems = math.prod(sizes[p] for p in graph.ordinals[d] if p != graph.keep)
        log_n += elems * math.log(sizes[d])
    log_ess = (2.0 * log_z - log_z2).clamp(0.0, log_n)
    return WeightESS(log_ess, log_n, dims, graph.keep, log_z, log_z2)


def _enumerated_dims(post: Posterior) -> set:
    s = post.samples
    enum = {s.dims[n] for n, c in s.couplings.items() if isinstance(c, Enumerated) and n in s.dims}
    shared = {s.dims[n] for n, c in s.couplings.items() if not isinstance(c, Enumerated) and n in s.dims}
    return enum - shared


def _keep_plate(post: Posterior, elementwise) -> Optional[str]:
    if elementwise is False or elementwise is None:
        return None
    plates = list(post.samples.plate_sizes)
    if elementwise is True:
        if not plates:
            raise TMCGraphError("elementwise=True needs a plate; the model declares none")
        return plates[0]
    if elementwise not in plates:
        raise TMCGraphError(f"elementwise: unknown plate {elementwise!r}; plates are {plates}")
    return elementwise


def weight_ess(post: Posterior, over: Union[str, Sequence[str]] = "global", elementwise=False) -> WeightESS:
    """ESS of the TMC importance weights over combinations of particles (see the module docstring).

    Args:
        post: A :class:`~tmcgraph.infer.posterior.Posterior`.
        over: ``"global"`` (the sampled dims outside every plate, or local to exactly the
            kept plate), ``"all"`` (every sampled dim), or latent names / sample dim
            names (a list, or one name) whose combinations are weighed; every other dim
            is summed out. Enumerated latents are summed out unless named.
        elementwise: ``False`` (one ESS), ``True`` (one per element of the outermost
            plate) or a plate name.

    Returns:
        The :class:`WeightESS` (``dims`` names the sample dims weighed).

    Raises:
        TMCGraphError: an unknown name or plate, or a plate that cannot be kept per
            element (a sample dim is shared across its elements).

    Example:
        >>> import torch, tmcgraph as tg
        >>> from tmcgraph.models.toys import gaussian_toy
        >>> m, q = gaussian_toy()
        >>> post = tg.posterior(tg.TMC(m, q, K=32), {"x": torch.tensor([0.5, 1.0])}, seed=0)
        >>> r = weight_ess(post)                       # over the 32 particles of theta
        >>> r.dims, 1 <= float(r.ess) <= 32
        (('theta',), True)
    """
    s = post.samples
    graph = post.graph
    keep = _keep_plate(post, elementwise)
    if keep is not None:
        why = graph.why_not_keep(keep)
        if why:
            raise TMCGraphError(f"cannot compute the ESS per element of plate {keep!r}: {why}")
        graph = graph.with_keep(keep)
    used = graph.sample_dims
    enum = _enumerated_dims(post)
    root = set() if keep is None else {keep}
    if isinstance(over, str) and over == "global":
        dims = [d for d in used if d not in enum and set(graph.ordinals[d]) == root]
    elif isinstance(over, str) and over == "all":
        dims = [d for d in used if d not in enum]
    else:
        names = [over] if isinstance(over, str) else list(over)
        dims = []
        for n in names:
            if n in s.dims:
                dims.append(s.dims[n])
            elif n in used:
                dims.append(n)
            else:
                raise TMCGraphError(
                    f"weight_ess: {n!r} is neither a latent nor a sample dim (or 'global' / 'all'); "
                    f"latents are {list(s.dims)}, sample dims {used}"
                )
    log_z = post.log_evidence if keep is None else None
    return graph_weight_ess(graph, dims, post.strategy, post.memory_limit, log_z)


@dataclass
class Diagnostics:
    """Marginal and weight ESS of one :class:`~tmcgraph.infer.posterior.Posterior`.

    Attributes:
        log_evidence: ``log P_TMC``.
        K: Latent name -> its number of particles.
        marginal: Latent name -> marginal ESS ``[*plate sizes]``.
        weights: ``"global"`` and ``"all"`` -> :class:`WeightESS`.
        enumerated: Latents that are enumerated (their marginal ESS is the effective
            number of states, not a particle count).
    """

    log_evidence: torch.Tensor
    K: dict
    marginal: dict
    weights: dict
    enumerated: tuple = ()

    def __str__(self) -> str:
        lines = [f"log P_TMC = {float(self.log_evidence):.4f}",
                 f"{'latent':<16}{'K':>6}{'min ESS':>10}{'median':>10}{'max':>10}{'min ESS/K':>11}"]
        for n, e in self.marginal.items():
            flat = e.flatten().to(torch.float64)
            tag = " (enumerated)" if n in self.enumerated else ""
            lines.append(f"{n:<16}{self.K[n]:>6}{float(flat.min()):>10.2f}{float(flat.median()):>10.2f}"
                         f"{float(flat.max()):>10.2f}{float(flat.min()) / self.K[n]:>11.3f}{tag}")
        for level, w in self.weights.items():
            lines.append(f"weight ESS ({level}, dims {list(w.dims)}): log ESS = {float(w.log_ess):.3f} "
                         f"of log n = {w.log_combinations:.3f} (efficiency {float(w.efficiency):.3g})")
        return "\n".join(lines)


def diagnose(post: Posterior) -> Diagnostics:
    """Every ESS of a posterior at once: marginal per latent, weight ESS ``"global"`` and ``"all"``.

    Example:
        >>> import torch, tmcgraph as tg
        >>> from tmcgraph.models.toys import gaussian_toy
        >>> m, q = gaussian_toy()
        >>> d = diagnose(tg.posterior(tg.TMC(m, q, K=16), {"x": torch.tensor([0.5, 1.0])}, seed=0))
        >>> sorted(d.marginal), sorted(d.weights)
        (['theta', 'z'], ['all', 'global'])
    """
    s = post.samples
    enum = tuple(n for n, c in s.couplings.items() if isinstance(c, Enumerated))
    return Diagnostics(
        post.log_evidence,
        {n: int(v.shape[0]) for n, v in s.values.items()},
        marginal_ess(post),
        {"global": weight_ess(post, "global"), "all": weight_ess(post, "all")},
        enum,
    )
