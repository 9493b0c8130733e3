"""Pyro programs on tmcgraph: an unbiased drop-in for Pyro's ``TraceTMC_ELBO``, and posterior queries.

Install with ``pip install tmcgraph[pyro]``; ``import tmcgraph`` never loads this package.

Why. Pyro's ``TraceTMC_ELBO`` computes the TMC estimate with each guide site's log
density evaluated over the grid of all its parents' particles, Q(z^k | z_pa^j) for every
(k, j), and divides by it. Particle k was drawn from Q(. | z_pa^k) (``tmc="diagonal"``)
or from a parent particle picked at random (``tmc="mixture"``), so that is not the
density it was drawn from, and the estimate of p(x) is biased for non-factorised guides
(on a two-latent chain, by +30% to +53% of p(x); ``docs/pyro.md``). Its log-space einsum
also shifts each operand by its own maximum, which underflows to -inf in float32 when the
operands' maxima sit about 104 nats apart. tmcgraph divides by the density each particle
was drawn from (couplings ``"paired"``, ``"mixture"``, ``"permutation"``) and contracts
with exact underflow fallbacks.

Design: one pipeline. A traced Pyro model and guide become a :class:`tmcgraph.Model`
and a :class:`tmcgraph.Proposal` (:class:`Translation`), and tmcgraph's own pipeline runs
on them: particles drawn with its couplings and private generators, factors, planned
contraction, adjoint pass for posterior queries. The translation has three parts:

1. *Structure* (:mod:`tmcgraph.pyro.trace`). The guide and the model (against the
   guide's values, as ``poutine.replay``) are traced with ``poutine.trace`` under a
   handler that draws every latent value from a private generator. Sample sites, observed
   sites, plates (name, size, dim) and ``infer`` settings come from the trace; each
   site's parents from provenance tracking (``pyro.ops.provenance``, the mechanism of
   ``pyro.infer.inspect.get_dependencies``): the upstream sites in the provenance of
   ``fn.log_prob(value)``.
2. *Variables* (:mod:`tmcgraph.pyro.runner`). Each site's callable re-runs its Pyro
   program up to that site with the parents' particles substituted (``poutine.condition``)
   and the program stopped at the site (``poutine.escape``), and returns the
   distribution Pyro was about to sample from. Particles arrive from tmcgraph laid out
   ``[sample dims..., plates..., event]`` and are handed to Pyro with the sample dims to
   the left of Pyro's ``max_plate_nesting`` plate positions, as Pyro's own parallel
   enumeration lays them out (:mod:`tmcgraph.pyro.layout`), so ``pyro.param``,
   ``PyroModule`` and ``nn.Module`` parameters work unchanged and receive gradients.
   Any distribution works: the program computes it from the particles themselves.
3. *Settings*. ``infer={"num_samples": n}`` sets the site's K; ``enumerate="parallel"``
   without ``num_samples`` marginalises it exactly; ``tmc="diagonal"`` maps to the paired
   coupling and ``tmc="mixture"`` to the mixture coupling; the bridge's ``coupling=``
   (e.g. ``"permutation"``) overrides them; model latents the guide lacks are drawn from
   their prior, with the prior's density in the denominator.

The alternative, driving the Pyro program under handlers that place tmcgraph's
particles in one global layout, would need a second sampling and factor pipeline beside
tmcgraph's and could not use its couplings on distributions it cannot rebuild; re-running
keeps one pipeline at the cost of running each program's prefix once per site (Python
overhead quadratic in the number of sites of a sequential program; see
``benchmarks/pyro_bridge.py``).

Refused, with a :class:`tmcgraph.TMCGraphError` naming the site or plate: control flow
or site existence that depends on sampled values (traces with different draws must agree,
and each program must run with every sampled site carrying two values at once),
``pyro.markov``, subsampled plates, scaled or masked sites, sequential enumeration,
observed sites in the guide, guide sites the model lacks, and a site that depends on a
site in a plate it is not in.

Public API:

* :class:`TMC` — ``TMC(model, guide, max_plate_nesting, K, coupling, ...)`` with
  ``log_evidence(*args, seed=, elementwise=, **kwargs)``, ``run``, ``posterior``,
  ``translate``.
* :class:`TraceTMC_ELBO` — Pyro's ELBO interface for ``pyro.infer.SVI``.
* :class:`SitePosterior` — marginals, moments and backward samples by site name.
* :class:`Translation` — the tmcgraph model, proposal and estimator of one structure.
"""

from __future__ import annotations

try:
    import pyro  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("tmcgraph.pyro needs Pyro: pip install 'tmcgraph[pyro]' (or pyro-ppl)") from e

from .bridge import TMC, Translation, check_structure
from .elbo import TraceTMC_ELBO
from .posterior import SitePosterior

__all__ = ["TMC", "TraceTMC_ELBO", "SitePosterior", "Translation", "check_structure"]
