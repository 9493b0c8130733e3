"""The factor graph of a model at drawn particles: one log-factor per model variable.

For a latent ``z_j`` (paper, appendix 7.1 and Eq. 3)::

    f_j[k_j, k_pa(j), plates] = log P(z_j^{k_j} | z_pa^{k_pa}) - log q_j(z_j^{k_j}) - log K_j

where ``q_j`` is the density the particle was actually drawn from (see
:mod:`tmcgraph.sampling.couplings`); for an observed ``x``::

    f_x[k_pa(x), plates] = log P(x | z_pa^{k_pa})

so that ``P_TMC = sum over every index of prod_j exp(f_j)`` with plates multiplied out.
"""

from __future__ import annotations

import math

import torch

from ..errors import TMCGraphError
from ..model import Model
from ..ops.factor import Factor, FactorGraph
from ..particles import Samples, check_batch_shape, parent_inputs, place
from ..sampling.context import Context
from ..sampling.densities import log_prob
from ..sampling.markov import markov_view, prev_dim, prev_pairs
from .subsample import plate_scales

__all__ = ["factor_graph", "factor_builders", "graph_meta"]


def _log_prob(role: str, name: str, d, value, target: list, labels: list, check: bool = True) -> torch.Tensor:
    if not check:  # a program's later calls: the structure's first call checked these shapes
        return log_prob(d, value).expand(target)
    check_batch_shape(name, role, d, target, labels)
    try:
        lp = log_prob(d, value)
    except Exception as e:
        raise TMCGraphError(
            f"{role} log_prob of {name!r} failed: value shape {tuple(value.shape)}, distribution batch shape "
            f"{tuple(d.batch_shape)}, event shape {tuple(d.event_shape)}: {e}"
        ) from e
    try:
        ok = lp.dim() == len(target) and list(torch.broadcast_shapes(lp.shape, torch.Size(target))) == target
    except RuntimeError:
        ok = False
    if not ok:
        raise TMCGraphError(
            f"{role} log_prob of {name!r} has shape {tuple(lp.shape)}, expected [{', '.join(labels)}]="
            f"{target}: value shape {tuple(value.shape)} vs distribution batch {tuple(d.batch_shape)} "
            f"+ event {tuple(d.event_shape)} (vector variables need Independent)"
        )
    return lp.expand(target)


def _narrow(t: torch.Tensor, narrowed: tuple) -> torch.Tensor:
    """``t`` (a factor-layout input, possibly broadcast) restricted to the narrowed entries.

    ``narrowed`` holds ``(axis, index)`` (one entry of a sample dim) and ``(axis, start,
    length)`` (a chunk of a plate) items.
    """
    for entry in narrowed:
        ax, i = entry[0], entry[1]
        if t.shape[ax] != 1:
            t = t.narrow(ax, i, entry[2] if len(entry) == 3 else 1)
    return t


def _target(sizes: list, narrowed: tuple) -> list:
    """The factor's shape after ``narrowed`` (see :func:`_narrow`)."""
    out = list(sizes)
    for entry in narrowed:
        out[entry[0]] = entry[2] if len(entry) == 3 else 1
    return out


def factor_builders(model: Model, samples: Samples, ctx: Context = None, check: bool = True) -> list:
    """One ``(name, sample dims, plates, build)`` per factor of :func:`factor_graph`, in its order.

    ``build(narrowed=())`` computes the factor's log values; ``narrowed`` (``(axis, index)``
    pairs over sample-dim axes, as :class:`tmcgraph.ops.factor.Lazy` passes them) restricts
    the particles, parent values and densities the factor is computed from, so a slice is
    computed at the slice's size. The dtype promotion of :func:`factor_graph` is not applied.
    ``check=False`` skips the shape checks (for structures already checked once).
    """
    ctx = ctx or Context()
    s = samples
    out = []
    # -log K_d once per sample dim d and per element of the plates it is local to:
    # folded into its first owner's factor when that owner lives exactly at that ordinal.
    owners = {}
    for name in s.order:
        owners.setdefault(s.dims[name], name)
    folded = {d: n for d, n in owners.items() if s.plates[n] == s.ordinals[d]}
    claimed = set()  # previous-index dims whose -log K (the free first index) a factor carries
    for d in owners:
        if d not in folded:
            ordinal = s.ordinals[d]

            def build_log_k(narrowed=(), d=d, ordinal=ordinal):
                ref = s.log_q[owners[d]]
                return torch.full(_target([s.plate_sizes[p] for p in ordinal], narrowed), -math.log(s.sizes[d]),
                                  dtype=ref.dtype, device=ref.device)

            out.append((f"_logK_{d}", (), tuple(ordinal), build_log_k))
    for name in model.validate():
        v = model[name]
        if v.index_of is not None:  # a subsampled plate's element indices: data, no factor
            continue
        if v.prev:
            out.append(_markov_builder(name, v, s, ctx, check, folded, claimed))
            continue
        own = s.dims_of(name)
        pdims = [s.dims[p] for p in v.parents if p in s.dims]
        dims = tuple(dict.fromkeys(list(own) + pdims))
        plates = v.plates

        def build(narrowed=(), name=name, v=v, own=own, dims=dims, plates=plates):
            target = _target([s.sizes[d] for d in dims] + [s.plate_sizes[p] for p in plates], narrowed)
            labels = [f"K[{d}]" for d in dims] + list(plates)
            inputs = parent_inputs(v.parents, s, dims, plates)
            if narrowed:
                inputs = {p: _narrow(t, narrowed) for p, t in inputs.items()}
            d = ctx.dist(v.dist(inputs))
            value = _narrow(place(s.value(name), own, plates, dims, plates), narrowed)
            role = "model" if v.kind == "latent" else "likelihood"
            lp = _log_prob(role, name, d, value, target, labels, check)
            if v.kind == "latent":
                lq = _narrow(place(s.log_q[name], own, plates, dims, plates), narrowed)
                if folded.get(own[0]) == name:  # fold -log K into the small tensor: one pass over the grid
                    lq = lq + math.log(s.sizes[own[0]])
                lp = lp - lq
            return lp

        out.append((name, dims, tuple(plates), build))
    return out


def _markov_builder(name, v, s: Samples, ctx, check, folded, claimed):
    """The factor of a variable with previous-value parents along its Markov plate ``p``.

    Elements ``t >= 1`` come from one call of the variable's callable on the view of
    ``[1, T)`` with previous values at ``[0, T-1)``; element 0 from its ``init``. At
    ``t = 0`` the factor does not depend on the previous-index dims; it carries
    ``-log K`` for each of them not carried by an earlier factor (``claimed``), so the
    contraction's free first index of each averages out exactly once.
    """
    plate = v.markov
    T = s.plate_sizes[plate]
    own = s.dims_of(name)
    view1 = markov_view(s, plate, 1, T, v.prev) if T > 1 else None
    view0 = markov_view(s, plate, 0, 1)
    dims1 = [view1.dims[p] for p in v.parents if p in view1.dims] if view1 is not None else []
    dims0 = [view0.dims[p] for p in v.init.parents if p in view0.dims]
    dims = tuple(dict.fromkeys(list(own) + dims1 + dims0))
    prevs = [] if view1 is None else list(dict.fromkeys(
        view1.dims[p] for p, u in v.prev.items()
        if p in view1.dims and u in s.dims and view1.dims[p] == prev_dim(s.dims[u]) and view1.dims[p] not in claimed))
    claimed.update(prevs)
    sizes = dict(s.sizes, **({} if view1 is None else view1.sizes))
    plates = v.plates
    ax = len(dims) + plates.index(plate)
    role = "model" if v.kind == "latent" else "likelihood"

    def part(var, view):
        target = [sizes[d] for d in dims] + [view.plate_sizes[p] for p in plates]
        labels = [f"K[{d}]" for d in dims] + list(plates)
        d = ctx.dist(var.dist(parent_inputs(var.parents, view, dims, plates)))
        value = place(view.value(name), own, plates, dims, plates)
        return _log_prob(role, name, d, value, target, labels, check)

    def build(narrowed=()):
        lp0 = part(v.init, view0)
        if prevs:
            lp0 = lp0 - sum(math.log(sizes[d]) for d in prevs)
        lp = lp0 if view1 is None else torch.cat([lp0, part(v, view1)], ax)
        if v.kind == "latent":
            lq = place(s.log_q[name], own, plates, dims, plates)
            if folded.get(own[0]) == name:
                lq = lq + math.log(s.sizes[own[0]])
            lp = lp - lq
        return _narrow(lp, narrowed)

    return name, dims, tuple(plates), build


def graph_meta(model: Model, samples: Samples) -> tuple:
    """``(ordinals, markov)`` of the factor graph at ``samples``: every sample dim's ordinal
    (previous-index dims of Markov plates included) and the Markov pairs."""
    markov = prev_pairs(model, samples)
    ordinals = {d: tuple(samples.ordinals[d]) for d in samples.sizes}
    for pairs in markov.values():
        for pd, d in pairs:
            ordinals[pd] = ordinals[d]
    return ordinals, markov


def factor_graph(model: Model, samples: Samples, ctx: Context = None, scaled: bool = True) -> FactorGraph:
    """The :class:`~tmcgraph.ops.factor.FactorGraph` of ``model`` at ``samples``.

    One factor per model variable, in the model's topological order, plus a constant
    ``-log K`` factor for a sample dim whose first owner does not live exactly at the
    dim's ordinal (IWAE's joint dim). All tensors share one floating dtype. Subsampled
    plates given B of their N elements get the scale N / B
    (:func:`tmcgraph.infer.subsample.plate_scales`; ``scaled=False``: none).
    """
    out = [Factor(name, build(), dims, plates) for name, dims, plates, build in factor_builders(model, samples, ctx)]
    # One floating dtype for the whole contraction (e.g. float32 priors with float64 data).
    dtype = out[0].tensor.dtype
    for f in out[1:]:
        dtype = torch.promote_types(dtype, f.tensor.dtype)
    out = [f if f.tensor.dtype == dtype else f.with_tensor(f.tensor.to(dtype)) for f in out]
    ordinals, markov = graph_meta(model, samples)
    return FactorGraph(tuple(out), ordinals, scales=plate_scales(model, samples.plate_sizes) if scaled else {},
                       markov=markov)
