"""Sampling: binding data and drawing K particles per latent with a coupling.

Stage two of the pipeline (model -> sampling -> ops -> infer): it reads the declared
:class:`~tmcgraph.model.Model` and :class:`~tmcgraph.model.Proposal` and produces
:class:`~tmcgraph.particles.Samples`. Couplings say how each latent's particles are drawn
given its parents' (:mod:`~tmcgraph.sampling.couplings`); :class:`Group`
(:mod:`~tmcgraph.sampling.group`) lets several latents share one sample dim.
"""

from .context import Context
from .couplings import COUPLINGS, DEFAULT, Coupling, Enumerated, Joint, Mixture, Paired, Permutation, Site
from .data import bind_data
from .draw import couplings_of, draw, proposal_log_q
from .group import Group, group_members

__all__ = [
    "Context",
    "Coupling",
    "Paired",
    "Mixture",
    "Permutation",
    "Enumerated",
    "Joint",
    "Site",
    "Group",
    "group_members",
    "COUPLINGS",
    "DEFAULT",
    "bind_data",
    "draw",
    "proposal_log_q",
    "couplings_of",
]
