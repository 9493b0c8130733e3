"""Particles and the named-dim layout every stage shares.

A latent's particles are a tensor ``[K, *plate sizes, *event]``: one leading sample
dim, then the variable's plates in the model's plate order. When a callable is
evaluated, every input is *placed* (:func:`place`) into a local layout ``[sample
dims..., plates..., event]`` in which each parent keeps its own sample dim (size K) and
every other position is a singleton. Networks therefore see each parent sample once
(cost linear in K, the paper's section 2.4) and broadcasting builds the K x K grid only
in the log-density.

Each sample dim is local to an *ordinal*: the set of plates it is repeated over (one
independent index per element). A latent's own dim is local to its plates; IWAE's joint
dim is local to the plates every sampled latent shares.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from .errors import TMCGraphError

__all__ = ["Samples", "Deferred", "place", "parent_inputs", "expand_plates", "check_batch_shape"]


@dataclass(frozen=True)
class Deferred:
    """A tensor computed when first needed: ``fn(recipe, *tensors)``.

    Sampling defers the densities that need a K x K grid (the mixture density of the
    mixture and permutation couplings), so that a compiled program computes them inside
    the same fused kernels as the factors that consume them. ``recipe`` is hashable and
    static for a structure; ``tensors`` are the inputs.
    """

    fn: object
    recipe: tuple
    tensors: tuple

    def __call__(self) -> torch.Tensor:
        return self.fn(self.recipe, *self.tensors)


@dataclass
class Samples:
    """Particles drawn from a proposal, with their bookkeeping.

    Attributes:
        values: Latent name -> particles ``[K, *plate sizes, *event]``.
        dims: Latent name -> name of its sample dim.
        sizes: Sample dim name -> number of particles.
        ordinals: Sample dim name -> plates it is local to (one index per element).
        log_q: Latent name -> ``[K, *plate sizes]`` log density each particle was drawn from.
        data: Observed name -> data tensor ``[*plate sizes, *event]``.
        plate_sizes: Plate name -> size.
        plates: Variable name -> its plates.
        order: Sampling order.
        couplings: Latent name -> the coupling object its particles were drawn with.
    """

    values: dict
    dims: dict
    sizes: dict
    ordinals: dict
    log_q: dict
    data: dict
    plate_sizes: dict
    plates: dict = field(default_factory=dict)
    order: list = field(default_factory=list)
    couplings: dict = field(default_factory=dict)

    def dims_of(self, name: str) -> tuple:
        """Sample dims carried by variable ``name`` itself (empty for observed)."""
        return (self.dims[name],) if name in self.dims else ()

    def value(self, name: str) -> torch.Tensor:
        """Particles of a latent or the data of an observed variable."""
        return self.values[name] if name in self.values else self.data[name]

    def materialize(self) -> "Samples":
        """Compute every :class:`Deferred` density in place; returns ``self``."""
        for n, v in list(self.log_q.items()):
            if isinstance(v, Deferred):
                self.log_q[n] = v()
        return self

    def detached(self) -> "Samples":
        """A copy whose particles and densities carry no gradient (score-function objectives)."""
        self.materialize()
        return _replace(self, values={n: v.detach() for n, v in self.values.items()},
                        log_q={n: v.detach() for n, v in self.log_q.items()})


def _replace(s: Samples, **changes) -> Samples:
    kw = {f: getattr(s, f) for f in s.__dataclass_fields__}
    kw.update(changes)
    return Samples(**kw)


def place(t: torch.Tensor, t_dims: tuple, t_plates: tuple, dims: tuple, plates: tuple) -> torch.Tensor:
    """Reshape ``t`` (``[*t_dims, *t_plates, *event]``) into the layout ``[*dims, *plates, *event]``.

    Positions ``t`` lacks become singletons. ``t_dims`` (at most one dim) must be in
    ``dims``. Plates of ``t`` missing from ``plates`` become trailing dims in front of
    the event dims (in ``t``'s plate order).
    """
    lead = len(t_dims) + len(t_plates)
    extra = [p for p in t_plates if p not in plates]
    if extra:
        # Plates of ``t`` outside the target (observed data in deeper plates seen by a
        # proposal) move behind the target plates and travel with the event dims.
        nd = len(t_dims)
        inner = [nd + i for i, p in enumerate(t_plates) if p in plates]
        outer = [nd + i for i, p in enumerate(t_plates) if p not in plates]
        t = t.permute(list(range(nd)) + inner + outer + list(range(lead, t.dim())))
        t_plates = tuple(p for p in t_plates if p in plates)
        lead = nd + len(t_plates)
    shape = []
    for d in dims:
        shape.append(t.shape[t_dims.index(d)] if d in t_dims else 1)
    for p in plates:
        shape.append(t.shape[len(t_dims) + t_plates.index(p)] if p in t_plates else 1)
    return t.reshape(shape + list(t.shape[lead:]))


def parent_inputs(parents, samples: Samples, dims: tuple, plates: tuple, rename: Optional[dict] = None) -> dict:
    """Values of ``parents`` placed into the layout ``[*dims, *plates, ...]``.

    ``rename`` maps a parent to ``(tensor, dim)`` replacing its particles (paired and
    gathered parents: ``tensor`` is ``[K, *plates, *event]`` along ``dim``).
    """
    vals = {}
    for p in parents:
        if rename and p in rename:
            t, tdim = rename[p]
            vals[p] = place(t, (tdim,), plates, dims, plates)
        elif p in samples.values:
            vals[p] = place(samples.values[p], samples.dims_of(p), samples.plates[p], dims, plates)
        else:
            vals[p] = place(samples.data[p], (), samples.plates[p], dims, plates)
    return vals


def expand_plates(samples: Samples, p: str, plates: tuple, pshape: list) -> torch.Tensor:
    """Particles of latent ``p`` broadcast to a child's plates: ``[K_p, *pshape, *event]``."""
    v = samples.values[p]
    t = place(v, (samples.dims[p],), samples.plates[p], (samples.dims[p],), plates)
    return t.expand(v.shape[0], *pshape, *t.shape[1 + len(plates):])


def check_batch_shape(name: str, role: str, d, target: list, labels: list) -> None:
    """Raise unless ``d.batch_shape`` broadcasts (right-aligned) to ``target``."""
    bs = tuple(d.batch_shape)
    ok = len(bs) <= len(target) and all(
        b in (1, t) for b, t in zip(bs[::-1], target[::-1])
    )
    if not ok:
        want = ", ".join(f"{lab}={t}" for lab, t in zip(labels, target))
        raise TMCGraphError(
            f"{role} distribution of {name!r} has batch shape {bs} (event shape {tuple(d.event_shape)}); "
            f"expected a shape broadcastable to [{want}] (sample dims, then plates)"
        )
