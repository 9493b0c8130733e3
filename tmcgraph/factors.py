"""Log-factors with named sample and plate dims, one per model variable.

For a latent ``z_j`` (paper, appendix 7.1 and Eq. 3)::

    f_j[k_j, k_pa(j), plates] = log P(z_j^{k_j} | z_pa^{k_pa}) - log q_j(z_j^{k_j}) - log K_j

where ``q_j`` is the density the particle was actually drawn from (see
:mod:`tmcgraph.sampling`); for an observed ``x``::

    f_x[k_pa(x), plates] = log P(x | z_pa^{k_pa})

so that ``P_TMC = sum over every index of prod_j exp(f_j)`` with plates multiplied out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import TMCGraphError
from .graph import Model
from .sampling import Samples, _inputs, check_batch_shape, place

__all__ = ["Factor", "build_factors", "describe"]


@dataclass(frozen=True)
class Factor:
    """A log-factor tensor and the names of its dims.

    Attributes:
        name: The variable the factor belongs to.
        tensor: Log values, shape ``[*sizes of dims, *sizes of plates]``.
        dims: Sample dim names, in tensor order.
        plates: Plate names, in tensor order (after the sample dims).
    """

    name: str
    tensor: torch.Tensor
    dims: tuple
    plates: tuple

    def __post_init__(self):
        if self.tensor.dim() != len(self.dims) + len(self.plates):
            raise TMCGraphError(
                f"factor {self.name!r}: tensor of shape {tuple(self.tensor.shape)} does not match "
                f"dims {self.dims} + plates {self.plates}"
            )


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


def build_factors(model: Model, samples: Samples) -> list:
    """One :class:`Factor` per model variable, in the model's topological order."""
    s = samples
    out = []
    # -log K_d once per sample dim d and per element of the plates it is local to:
    # folded into its first owner's factor when that owner lives exactly at that level.
    owners = {}
    for name in s.order:
        owners.setdefault(s.dims[name], name)
    folded = {d: n for d, n in owners.items() if s.plates[n] == s.levels[d]}
    for d in owners:
        if d not in folded:
            lvl = s.levels[d]
            ref = s.log_q[owners[d]]
            t = torch.full([s.plate_sizes[p] for p in lvl], -math.log(s.sizes[d]), dtype=ref.dtype, device=ref.device)
            out.append(Factor(f"_logK_{d}", t, (), lvl))
    for name in model.validate():
        v = model[name]
        own = s.dims_of(name)
        pdims = [s.dims[p] for p in v.parents if p in s.dims]
        dims = tuple(dict.fromkeys(list(own) + pdims))
        plates = v.plates
        target = [s.sizes[d] for d in dims] + [s.plate_sizes[p] for p in plates]
        labels = [f"K[{d}]" for d in dims] + list(plates)
        d = v.dist(_inputs(v, s, dims, plates))
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
    return [f if f.tensor.dtype == dtype else Factor(f.name, f.tensor.to(dtype), f.dims, f.plates) for f in out]


def describe(factors: list) -> str:
    """One line per factor: name, dims with sizes, plates with sizes."""
    lines = []
    for f in factors:
        n = len(f.dims)
        ds = ", ".join(f"{d}={k}" for d, k in zip(f.dims, f.tensor.shape[:n]))
        ps = ", ".join(f"{p}={k}" for p, k in zip(f.plates, f.tensor.shape[n:]))
        lines.append(f"{f.name}: dims [{ds}] plates [{ps}]")
    return "\n".join(lines)
