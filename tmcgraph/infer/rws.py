"""Reweighted wake-sleep (RWS) on the TMC contraction.

RWS (Bornschein & Bengio 2015; Le et al. 2019, "Revisiting reweighted wake-sleep")
trains the model and the proposal on different objectives, so the proposal needs no
reparameterisation and discrete latents can be *sampled* rather than enumerated.

With particles ``z`` drawn from Q and treated as constants, and the TMC-reweighted
posterior ``pi(k) ∝ prod_f exp(f[k])`` over index combinations (see
:mod:`tmcgraph.infer.posterior`):

* **Model (wake-theta)**: ascend ``log P_TMC(x; theta)``; its gradient is
  ``sum_k pi(k) grad_theta log P(x, z^k; theta)``.
* **Proposal (wake-phi)**: ascend ``sum_k pi(k) sum_j log q_j(z_j^{k_j}; phi)`` with
  ``pi`` held fixed (no gradient through the weights or the particles). Because the
  combination's proposal density factorises over latents, this is

      L_phi = sum_j sum_{k, e} pi(k_{j,e} = k) log q_j(z_{j,e}^k; phi)

  with the single-dim marginals of :func:`tmcgraph.ops.dim_marginals`. Its
  gradient is a self-normalised estimate of ``-grad_phi KL(p(z|x) || q(z))``
  (up to the O(1/K) bias of self-normalisation). ``log q_j`` is the density the
  particle was drawn from: for the ``mixture`` coupling the mixture
  ``(1/K) sum_l Q(z^k | z_pa^l)``, recomputed here at the detached particles.

Latents proposed by their prior (``q.prior``) or enumerated get no wake-phi term: their
proposal has no parameters of its own. The sleep phase (training Q on samples from P)
is not included.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..errors import TMCGraphError
from ..particles import Samples
from ..sampling.draw import proposal_log_q
from .estimators import TMC
from .posterior import latent_marginal

__all__ = ["RWS", "RWSResult", "proposal_log_density"]


def proposal_log_density(estimator: TMC, samples: Samples, latents=None) -> dict:
    """``log q_j(z_j^k)`` re-evaluated at the (detached) particles, differentiable in Q's parameters.

    The density :func:`tmcgraph.sampling.draw` records in ``samples.log_q``, by the
    coupling each latent was drawn with (:func:`tmcgraph.sampling.proposal_log_q`):
    ``Q(z^k | z_pa^k)`` for paired coupling (and for proposals without latent parents),
    and ``log (1/prod K_pa) sum_l Q(z^k | z_pa^l)`` over every parent particle for the
    mixture and permutation couplings. Gradients reach the proposal's parameters only,
    never the particles.

    Args:
        estimator: The estimator that drew ``samples``.
        samples: The particles.
        latents: Latent names (default: every latent whose proposal is neither the prior
            nor enumerated).

    Returns:
        Dict latent -> ``[K, *plate sizes]``.
    """
    q = estimator.proposal
    if latents is None:
        latents = [n for n in samples.order if not (q[n].enumerate or q[n].prior)]
    s = samples.detached()
    ctx = estimator.context()
    return {name: proposal_log_q(q, s, name, ctx=ctx) for name in latents}


@dataclass
class RWSResult:
    """The RWS surrogate and its parts for one draw of particles.

    Attributes:
        loss: ``model_loss + proposal_loss``; one ``backward()`` gives both updates.
        model_loss: ``-log P_TMC`` with particles and proposal densities held fixed
            (gradients reach the model only).
        proposal_loss: ``-sum_j sum_k pi_j[k] log q_j(z_j^k)`` with ``pi`` and the
            particles held fixed (gradients reach the proposal only).
        log_evidence: log P_TMC (detached).
        marginals: Sample dim -> posterior marginal ``[K, *plates]`` (detached).
        samples: The particles.
    """

    loss: torch.Tensor
    model_loss: torch.Tensor
    proposal_loss: torch.Tensor
    log_evidence: torch.Tensor
    marginals: dict
    samples: Samples


class RWS:
    """Reweighted wake-sleep objectives on top of a TMC (or IWAE) estimator.

    Args:
        estimator: A :class:`tmcgraph.TMC` or :class:`tmcgraph.IWAE` estimator; it
            supplies the particles, K, and the contraction strategy.

    Example:
        >>> import torch, tmcgraph as tg
        >>> from torch.distributions import Normal
        >>> from tmcgraph.infer.rws import RWS
        >>> m = tg.Model(); loc = torch.nn.Parameter(torch.zeros(()))
        >>> m.latent("z", lambda: Normal(loc, 1.)); m.observed("x", lambda z: Normal(z, 1.))
        >>> q = tg.Proposal(m); q.latent("z", lambda: Normal(0., 2.))
        >>> r = RWS(tg.TMC(m, q, K=8))({"x": torch.tensor(1.)}, seed=0)
        >>> r.loss.backward(); loc.grad is not None
        True
    """

    def __init__(self, estimator: TMC):
        if not isinstance(estimator, TMC):
            raise TMCGraphError(f"RWS needs a tmcgraph.TMC or IWAE estimator, got {type(estimator).__name__}")
        self.estimator = estimator

    def __call__(self, data: dict, seed: Optional[int] = None, samples: Optional[Samples] = None) -> RWSResult:
        """Draw particles and build the RWS surrogate.

        Args:
            data: Observed name -> tensor.
            seed: Seed for drawing the particles.
            samples: Reuse these particles.

        Returns:
            An :class:`RWSResult`; call ``result.loss.backward()`` and step one
            optimiser over model and proposal parameters.
        """
        est = self.estimator
        if samples is None:
            with torch.no_grad():
                samples = est.sample(data, seed)
        try:
            ev = est.run(samples=samples, fixed=True, marginals=True)
        except TMCGraphError as e:
            raise TMCGraphError(f"RWS weights are undefined: {e}") from e
        log_p, marg, fixed = ev.log_evidence, ev.marginals, ev.samples
        log_q = proposal_log_density(est, fixed)
        proposal_loss = log_p.new_zeros(())
        for name, lq in log_q.items():
            proposal_loss = proposal_loss - (latent_marginal(fixed, marg, name) * lq).sum()
        model_loss = -log_p
        return RWSResult(model_loss + proposal_loss, model_loss, proposal_loss, log_p.detach(), marg, samples)

    def __repr__(self):
        return f"RWS({self.estimator!r})"
