"""Training objectives with three gradient estimators for TMC and IWAE.

For a batch of independent data points (the outermost plate, e.g. ``"data"``) each
objective is the mean over data points of a per-point estimate ``log P_hat(x_b)``:

* TMC (Aitchison, Eq. 3): ``log P_TMC(x_b) = log 1/prod K sum_{k_1..k_n} w_{k_1..k_n}``
  with ``w = P(x_b, z^{k}) / prod_i q_i(z_i^{k_i})``, contracted with the estimator's
  plan keeping the data plate.
* IWAE (Burda et al. 2016): ``log P_IWAE(x_b) = log 1/K sum_k w_k``, with K joint
  samples *per data point* (the joint dim is local to the data plate): the same
  contraction, keeping the data plate.

Gradient estimators are objective classes (as numpyro's ELBO subclasses):

:class:`Reparam` (``"reparam"``)
    Plain reparameterisation: differentiate ``log P_hat`` w.r.t. everything.
:class:`STL` (``"stl"``)
    Sticking the landing (Roeder et al. 2017): the proposal densities in ``w`` are
    evaluated with the proposal's parameters detached (``est.sample(...,
    detach_proposal=True)``), so the proposal parameters receive only the path
    derivative through the reparameterised particles, ``sum_i w~_i d log w_i/dz_i
    dz_i/dphi`` (w~ the normalised weights); model parameters get the usual gradient.
:class:`DReGs` (``"dregs"``)
    Doubly reparameterised gradients (Tucker et al. 2018). Model parameters get the
    usual gradient of ``log P_hat``; proposal parameters ``phi`` get

        sum_i (w_i / sum_j w_j)^2  d log w^_i / d phi,                              (16)

    where ``w^`` drops the direct dependence on ``phi`` (path derivative only). The
    weights are never materialised: the TMC paper's appendix 7.5 surrogate (Eq. 22)
    has this gradient, for TMC and IWAE alike (for IWAE it is exactly the standard
    estimator of Tucker et al.):

        1/2 * stop_grad( sum_i w_i^2 / (sum_j w_j)^2 ) * log sum_i w^_i^2,

    where ``log sum_i w_i`` is the usual contraction of the log-factors and
    ``log sum_i w_i^2`` is the same (cached) plan applied to the doubled log-factors
    (the ``1/K`` constants cancel in the ratio). Both sums are per data point.
    The two losses are back-propagated into their own parameter groups
    (:meth:`Loss.backward`).

STL and DReGs need the proposal's parameters to be registered (``nn.Module``
callables on the :class:`~tmcgraph.Proposal`), and reparameterisable proposals.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from ..errors import TMCGraphError
from .estimators import TMC
from .pipeline import PER_BATCH, Evaluation

__all__ = ["Objective", "Reparam", "STL", "DReGs", "Loss", "GRADS", "get_objective", "objective", "bound"]


@dataclass
class Loss:
    """One minibatch objective, ready to back-propagate.

    Attributes:
        value: Per-data-point estimates ``log P_hat(x_b)`` (vector over the data plate,
            or a scalar when the model has no plate every variable lies in), with graph.
        loss: Loss to minimise: ``-mean(value)``; its gradient w.r.t. the model
            parameters is the estimator's (for ``reparam``/``stl`` also w.r.t. the proposal).
        proposal_loss: DReGs only: the loss whose proposal-parameter gradient is Eq. 16.
        grad: The objective's name.
        model_params: Parameters of the model.
        proposal_params: Parameters of the proposal.
    """

    value: torch.Tensor
    loss: torch.Tensor
    proposal_loss: Optional[torch.Tensor]
    grad: str
    model_params: list = field(default_factory=list)
    proposal_params: list = field(default_factory=list)

    @property
    def mean(self) -> float:
        """Mean estimate per data point (a float, for logging)."""
        return float(self.value.detach().mean())

    def backward(self) -> None:
        """Accumulate gradients into ``.grad`` of the model and proposal parameters."""
        if self.proposal_loss is None:
            self.loss.backward()
            return
        mp = [p for p in self.model_params if p.requires_grad]
        pp = [p for p in self.proposal_params if p.requires_grad]
        if mp:
            torch.autograd.backward(self.loss, inputs=mp, retain_graph=True)
        if pp:
            torch.autograd.backward(self.proposal_loss, inputs=pp)


class Objective:
    """A training objective: the estimator's per-data-point bound and a gradient estimator.

    Subclasses set :attr:`detach_proposal` (how particles' densities are drawn) and
    :meth:`proposal_loss` (a separate surrogate for the proposal's parameters, or ``None``).
    """

    #: Name accepted by :func:`objective`.
    name = ""
    #: Evaluate the proposal densities with its parameters detached (path derivative only).
    detach_proposal = False

    def __call__(self, est: TMC, data: dict, seed=None) -> Loss:
        """The minibatch :class:`Loss` of ``est`` on ``data``."""
        if not isinstance(est, TMC):
            raise TMCGraphError(
                f"objective needs a tmcgraph estimator (TMC, IWAE or VAE), got {type(est).__name__}")
        pp = list(est.proposal.parameters())
        if self.detach_proposal and not pp:
            raise TMCGraphError(
                f"grad={self.name!r} detaches the proposal's parameters, but the proposal registers none; "
                "declare its callables as nn.Modules"
            )
        ev = est.run(data, seed, PER_BATCH, detach_proposal=self.detach_proposal)
        value = ev.log_evidence
        return Loss(value, -value.mean(), self.proposal_loss(ev), self.name, list(est.model.parameters()), pp)

    def proposal_loss(self, ev: Evaluation) -> Optional[torch.Tensor]:
        """A loss whose gradient w.r.t. the proposal's parameters replaces ``loss``'s, or ``None``."""
        return None

    def __repr__(self):
        return f"{type(self).__name__}()"


class Reparam(Objective):
    """Plain reparameterised gradients of ``log P_hat``."""

    name = "reparam"


class STL(Objective):
    """Sticking the landing (Roeder et al. 2017): proposal densities with detached parameters."""

    name = "stl"
    detach_proposal = True


class DReGs(Objective):
    """Doubly reparameterised gradients (Tucker et al. 2018) via the TMC surrogate (Eq. 22)."""

    name = "dregs"
    detach_proposal = True

    def proposal_loss(self, ev: Evaluation) -> torch.Tensor:
        value = ev.log_evidence
        log_sum_w2 = ev.contract(2.0 * t for t in ev.graph.tensors)
        ratio = torch.exp(log_sum_w2.detach() - 2 * value.detach())
        return -(0.5 * ratio * log_sum_w2).mean()


#: Objectives by name.
GRADS = {c.name: c for c in (Reparam, STL, DReGs)}


def get_objective(grad) -> Objective:
    """The :class:`Objective` of a name in :data:`GRADS` or an instance."""
    if isinstance(grad, Objective):
        return grad
    if isinstance(grad, str) and grad in GRADS:
        return GRADS[grad]()
    raise TMCGraphError(f"grad must be one of {tuple(GRADS)} or an Objective, got {grad!r}")


def objective(est: TMC, data: dict, grad="reparam", seed=None) -> Loss:
    """The minibatch objective of ``est`` (a :class:`~tmcgraph.TMC` or :class:`~tmcgraph.IWAE`).

    Args:
        est: The estimator (its model, proposal and K).
        data: Observed name -> tensor.
        grad: ``"reparam"``, ``"stl"``, ``"dregs"`` or an :class:`Objective`.
        seed: Optional seed for the particles.

    Returns:
        The :class:`Loss`; call :meth:`Loss.backward`.

    Raises:
        TMCGraphError: unknown ``grad``, or STL/DReGs with a proposal that registers no parameters.
    """
    return get_objective(grad)(est, data, seed)


@torch.no_grad()
def bound(est: TMC, data: dict, seed=None) -> torch.Tensor:
    """Per-data-point estimates ``log P_hat(x_b)`` without gradients (evaluation).

    TMC contracts with the data plate kept; IWAE uses K joint samples per data point.
    """
    return est.run(data, seed, PER_BATCH).log_evidence
