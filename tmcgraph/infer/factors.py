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
from .subsample import plate_scales

__all__ = ["factor_graph", "factor_builders"]


def _log_prob(role: str, name: str, d, value, target: list, labels: list, check: bool = True) -> torch.Tensor:
    if not check:  # a program's later calls: the structure's first call checked these shapes
        return d.log_prob(value).expand(target)
    check_batch_shape(name, role, d, target, labels)
    try:
        lp = d.log_prob(value)
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
    """``t`` (a factor-layout input, possibly broadcast) restricted to the narrowed sample-dim entries."""
    for ax, i in narrowed:
        if t.shape[ax] != 1:
            t = t.narrow(ax, i, 1)
    return t


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
    for d in owners:
        if d not in folded:
            ordinal = s.ordinals[d]

            def build_log_k(narrowed=(), d=d, ordinal=ordinal):
                ref = s.log_q[owners[d]]
                return torch.full([s.plate_sizes[p] for p in ordinal], -math.log(s.sizes[d]), dtype=ref.dtype,
                                  device=ref.device)

            out.append((f"_logK_{d}", (), tuple(ordinal), build_log_k))
    for name in model.validate():
        v = model[name]
        if v.index_of is not None:  # a subsampled plate's element indices: data, no factor
            continue
        own = s.dims_of(name)
        pdims = [s.dims[p] for p in v.parents if p in s.dims]
        dims = tuple(dict.fromkeys(list(own) + pdims))
        plates = v.plates

        def build(narrowed=(), name=name, v=v, own=own, dims=dims, plates=plates):
            cut = dict(narrowed)
            target = [1 if i in cut else s.sizes[d] for i, d in enumerate(dims)] + [s.plate_sizes[p] for p in plates]
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
    return FactorGraph(tuple(out), {d: tuple(samples.ordinals[d]) for d in samples.sizes},
                       scales=plate_scales(model, samples.plate_sizes) if scaled else {})
