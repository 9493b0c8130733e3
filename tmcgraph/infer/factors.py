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

__all__ = ["factor_graph"]


def _log_prob(role: str, name: str, d, value, target: list, labels: list) -> torch.Tensor:
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


def factor_graph(model: Model, samples: Samples, ctx: Context = None) -> FactorGraph:
    """The :class:`~tmcgraph.ops.factor.FactorGraph` of ``model`` at ``samples``.

    One factor per model variable, in the model's topological order, plus a constant
    ``-log K`` factor for a sample dim whose first owner does not live exactly at the
    dim's ordinal (IWAE's joint dim). All tensors share one floating dtype.
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
            ref = s.log_q[owners[d]]
            t = torch.full([s.plate_sizes[p] for p in ordinal], -math.log(s.sizes[d]), dtype=ref.dtype,
                           device=ref.device)
            out.append(Factor(f"_logK_{d}", t, (), ordinal))
    for name in model.validate():
        v = model[name]
        own = s.dims_of(name)
        pdims = [s.dims[p] for p in v.parents if p in s.dims]
        dims = tuple(dict.fromkeys(list(own) + pdims))
        plates = v.plates
        target = [s.sizes[d] for d in dims] + [s.plate_sizes[p] for p in plates]
        labels = [f"K[{d}]" for d in dims] + list(plates)
        d = ctx.dist(v.dist(parent_inputs(v.parents, s, dims, plates)))
        value = place(s.value(name), own, plates, dims, plates)
        role = "model" if v.kind == "latent" else "likelihood"
        lp = _log_prob(role, name, d, value, target, labels)
        if v.kind == "latent":
            lq = place(s.log_q[name], own, plates, dims, plates)
            if folded.get(own[0]) == name:  # fold -log K into the small tensor: one pass over the grid
                lq = lq + math.log(s.sizes[own[0]])
            lp = lp - lq
        out.append(Factor(name, lp, dims, plates))
    # One floating dtype for the whole contraction (e.g. float32 priors with float64 data).
    dtype = out[0].tensor.dtype
    for f in out[1:]:
        dtype = torch.promote_types(dtype, f.tensor.dtype)
    out = [f if f.tensor.dtype == dtype else f.with_tensor(f.tensor.to(dtype)) for f in out]
    return FactorGraph(tuple(out), {d: tuple(s.ordinals[d]) for d in s.sizes})
