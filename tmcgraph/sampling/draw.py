"""Drawing K particles per latent from the proposal, in its topological order.

Each latent is drawn by its coupling (:mod:`tmcgraph.sampling.couplings`): the one its
declaration names, :class:`~tmcgraph.sampling.couplings.Enumerated` for
``q.enumerate``, or an override for every sampled latent (IWAE's
:class:`~tmcgraph.sampling.couplings.Joint`). The coupling records the density each
particle was drawn from; :func:`proposal_log_q` re-evaluates it later (reweighted
wake-sleep) with the same coupling.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..errors import TMCGraphError
from ..model import Model, Proposal
from ..particles import Samples
from .context import Context
from .couplings import Across, Coupling, Enumerated, Site, get_coupling
from .data import bind_data
from .markov import _init_var, check_counts, draw_markov, markov_log_density, per_element_counts

__all__ = ["draw", "proposal_log_q", "couplings_of"]

_ENUMERATED = Enumerated()


def couplings_of(proposal: Proposal, override: Optional[Coupling] = None) -> dict:
    """Latent -> coupling object of every declaration (resolving names; raises on unknown ones).

    Cached on the proposal until its next declaration.
    """
    key = (proposal._version, proposal.model._version, override)
    cached = getattr(proposal, "_couplings", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    joints = proposal.joint_plates if override is None else ()
    out = {}
    for name, v in proposal.variables.items():
        if v.enumerate:
            out[name] = _ENUMERATED
        elif override is not None:
            out[name] = override
        elif any(p in joints for p in v.plates):
            out[name] = Across(next(p for p in joints if p in v.plates))
        else:
            out[name] = get_coupling(v.coupling, name)
    object.__setattr__(proposal, "_couplings", (key, out))
    return out


def draw(
    model: Model,
    proposal: Proposal,
    data: dict,
    K: int,
    ctx: Optional[Context] = None,
    override: Optional[Coupling] = None,
    detach_proposal: bool = False,
    defer: bool = False,
) -> Samples:
    """Draw particles for every latent in the proposal's topological order.

    Args:
        model: The model P.
        proposal: The proposal Q.
        data: Observed name -> tensor.
        K: Default number of particles per latent.
        ctx: Execution context (generator, dtype, device); default: global RNG, tensors as given.
        override: A coupling used for every sampled latent instead of its declared one
            (IWAE's :class:`~tmcgraph.sampling.couplings.Joint`).
        detach_proposal: Evaluate ``log_q`` with the proposal's parameters detached
            (sticking-the-landing, Roeder et al. 2017): gradients reach the proposal
            only through the reparameterised particles. Parameters must be registered
            on the proposal (``nn.Module`` callables).
        defer: Let couplings leave grid densities as :class:`~tmcgraph.particles.Deferred`
            (for a compiled program to compute); call ``Samples.materialize()`` to compute
            them.

    Returns:
        The :class:`~tmcgraph.particles.Samples`.
    """
    if isinstance(K, bool) or int(K) != K or K < 1:
        raise TMCGraphError(f"K must be a positive integer, got {K!r}")
    ctx = ctx or Context()
    order = proposal.validate()
    couplings = couplings_of(proposal, override)
    data, plate_sizes = bind_data(model, data, ctx)
    s = Samples({}, {}, {}, {}, {}, data, plate_sizes)
    s.plates = {n: v.plates for n, v in model.variables.items()}
    s.order = order
    for name in order:
        q = proposal[name]
        coupling = couplings[name]
        site = Site(name, q, proposal, s, coupling.num_particles(q, K), q.plates,
                    [plate_sizes[p] for p in q.plates], ctx, detach=detach_proposal, defer=defer)
        dim, ordinal = coupling.dim(site)
        site.dim = dim
        if q.K_steps is not None:
            check_counts(q, model.plates, plate_sizes)
        if q.prev and q.enumerate:  # the support does not depend on previous values
            site.var = _init_var(q)
            z, log_q = coupling.sample(site)
        elif q.prev:
            z, log_q = draw_markov(Site, name, q, proposal, s, coupling, site.K, dim, ordinal, ctx, detach_proposal)
        else:
            z, log_q = coupling.sample(site)
        if q.K_steps is not None:
            log_q = per_element_counts(q, model.plates, log_q, plate_sizes)
        s.values[name] = z
        s.dims[name] = dim
        s.sizes[dim] = int(z.shape[0])
        s.ordinals[dim] = ordinal
        s.log_q[name] = log_q
        s.couplings[name] = coupling
    return s


def proposal_log_q(proposal: Proposal, samples: Samples, name: str, detach_params: bool = False,
                   ctx: Optional[Context] = None) -> torch.Tensor:
    """Re-evaluate ``log q`` of the particles of latent ``name`` (as recorded by :func:`draw`).

    The density is the one the particles were drawn from, by the coupling they were
    drawn with: Q(z^k | z_pa^k) for paired coupling (and proposals without latent
    parents), (1/prod K_pa) sum_j Q(z^k | z_pa^j) for the mixture and permutation
    couplings, -log |support| for enumerated latents. Gradients flow to the proposal's
    parameters (unless ``detach_params``) and to whatever the particles in ``samples``
    carry; detach them first for score-function objectives.

    Args:
        proposal: The proposal that drew ``samples``.
        samples: The particles.
        name: A latent.
        detach_params: Evaluate with the proposal's parameters detached.
        ctx: Execution context (dtype, device) of the evaluation.

    Returns:
        ``[K, *plate sizes]`` log densities.
    """
    if name not in samples.values:
        raise TMCGraphError(f"unknown latent {name!r}; the latents are {list(samples.values)}")
    q = proposal[name]
    z = samples.values[name]
    ctx = ctx or Context()
    if q.prev and not q.enumerate:
        d = samples.dims[name]
        return markov_log_density(Site, name, q, proposal, samples, samples.couplings[name], z, d,
                                  samples.ordinals[d], ctx, detach_params)
    site = Site(name, q, proposal, samples, int(z.shape[0]), q.plates,
                [samples.plate_sizes[p] for p in q.plates], ctx, samples.dims[name], detach_params)
    return samples.couplings[name].log_density(site, z)
