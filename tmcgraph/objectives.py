"""Training objectives with three gradient estimators for TMC and IWAE.

For a batch of independent data points (the outermost plate, e.g. ``"data"``) each
objective is the mean over data points of a per-point estimate ``log P_hat(x_b)``:

* TMC (Aitchison, Eq. 3): ``log P_TMC(x_b) = log 1/prod K sum_{k_1..k_n} w_{k_1..k_n}``
  with ``w = P(x_b, z^{k}) / prod_i q_i(z_i^{k_i})``, contracted with the estimator's
  plan keeping the data plate.
* IWAE (Burda et al. 2016): ``log P_IWAE(x_b) = log 1/K sum_k w_k``, with K joint
  samples *per data point*: the per-sample log-weights are the sums of the IWAE
  factors over every plate but the data plate.

Gradient estimators, selected by ``grad``:

``"reparam"``
    Plain reparameterisation: differentiate ``log P_hat`` w.r.t. everything.
``"stl"``
    Sticking the landing (Roeder et al. 2017): the proposal densities in ``w`` are
    evaluated with the proposal's parameters detached (``est.sample(...,
    detach_proposal=True)``), so the proposal parameters receive only the path
    derivative through the reparameterised particles, ``sum_i w~_i d log w_i/dz_i
    dz_i/dphi`` (w~ the normalised weights); model parameters get the usual gradient.
``"dregs"``
    Doubly reparameterised gradients (Tucker et al. 2018). Model parameters get the
    usual gradient of ``log P_hat``; proposal parameters ``phi`` get

        sum_i (w_i / sum_j w_j)^2  d log w^_i / d phi,                              (16)

    where ``w^`` drops the direct dependence on ``phi`` (path derivative only). For IWAE
    this is computed from the per-sample weights (the standard estimator). For TMC,
    whose weights are never materialised, the TMC paper's appendix 7.5 surrogate
    (Eq. 22) has this gradient:

        1/2 * stop_grad( sum_i w_i^2 / (sum_j w_j)^2 ) * log sum_i w^_i^2,

    where ``log sum_i w_i`` is the usual contraction of the log-factors and
    ``log sum_i w_i^2`` is the same (cached) plan applied to the doubled log-factors
    (the ``1/K`` constants cancel in the ratio). Both sums are per data point.
    The two losses are back-propagated into their own parameter groups
    (:meth:`Objective.backward`).

STL and DReGs need the proposal's parameters to be registered (``nn.Module``
callables on the :class:`~tmcgraph.Proposal`), and reparameterisable proposals.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from .contract import contract
from .errors import TMCGraphError
from .estimators import TMC
from .sampling import SHARED_DIM

__all__ = ["GRADS", "Objective", "objective", "bound", "log_estimates", "keep_plate", "iwae_log_weights"]

#: Gradient estimators.
GRADS = ("reparam", "stl", "dregs")


@dataclass
class Objective:
    """One minibatch objective with its gradient estimator.

    Attributes:
        value: Per-data-point estimates ``log P_hat(x_b)`` (vector over the data plate,
            or a scalar when the model has no plate every variable lies in), with graph.
        loss: Loss to minimise: ``-mean(value)``; its gradient w.r.t. the model
            parameters is the estimator's (for ``reparam``/``stl`` also w.r.t. the proposal).
        proposal_loss: DReGs only: the loss whose proposal-parameter gradient is Eq. 16.
        grad: The estimator name.
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


def keep_plate(est: TMC, factors: list, levels: dict) -> Optional[str]:
    """The outermost plate when every factor (and, for TMC, every sample dim) lies in it, else ``None``."""
    plates = list(est.model.plates)
    if not plates:
        return None
    p = plates[0]
    if any(p not in f.plates for f in factors):
        return None
    if est.shared:
        return p
    used = {d for f in factors for d in f.dims}
    return p if all(p in levels[d] for d in used) else None


def _reduce_to(t: torch.Tensor, dims: tuple, plates: tuple, keep: Optional[str]) -> torch.Tensor:
    """A log-factor summed over every plate but ``keep``: ``[K or 1, (size of keep)]``."""
    if not dims:
        t = t.unsqueeze(0)
    axes = [1 + i for i, p in enumerate(plates) if p != keep]
    if axes:
        t = t.sum(dim=axes)
    if keep is not None and keep not in plates:
        t = t.unsqueeze(1)
    return t


def iwae_log_weights(factors: list, keep: Optional[str]) -> Optional[torch.Tensor]:
    """Per-sample IWAE log-weights ``log w_k - log K``, ``[K, (size of keep)]``.

    Returns ``None`` when some factor carries a sample dim other than the shared one
    (enumerated latents), where weights are not per-sample.
    """
    if any(set(f.dims) - {SHARED_DIM} for f in factors):
        return None
    out = None
    for f in factors:
        t = _reduce_to(f.tensor, f.dims, f.plates, keep)
        out = t if out is None else out + t
    return out


def log_estimates(est: TMC, samples, factors: list, keep: Optional[str], scale: float = 1.0) -> torch.Tensor:
    """``log P_hat`` per element of ``keep`` (scalar if ``None``) from log-factors times ``scale``.

    ``scale=2`` gives ``log sum w^2`` (with the 1/K constants squared).
    """
    tensors = [f.tensor if scale == 1.0 else scale * f.tensor for f in factors]
    if est.shared:
        logw = iwae_log_weights([type(f)(f.name, t, f.dims, f.plates) for f, t in zip(factors, tensors)], keep)
        if logw is not None:
            return torch.logsumexp(logw, dim=0)
    plan = est.plan(factors, samples.levels, keep)
    return contract(plan, tensors)


def objective(est: TMC, data: dict, grad: str = "reparam", seed: Optional[int] = None) -> Objective:
    """The minibatch objective of ``est`` (a :class:`~tmcgraph.TMC` or :class:`~tmcgraph.IWAE`).

    Args:
        est: The estimator (its model, proposal and K).
        data: Observed name -> tensor.
        grad: ``"reparam"``, ``"stl"`` or ``"dregs"`` (see the module docstring).
        seed: Optional seed for the particles.

    Returns:
        The :class:`Objective`; call :meth:`Objective.backward`.

    Raises:
        TMCGraphError: unknown ``grad``, or STL/DReGs with a proposal that registers no parameters.
    """
    if grad not in GRADS:
        raise TMCGraphError(f"grad must be one of {GRADS}, got {grad!r}")
    if not isinstance(est, TMC):
        raise TMCGraphError(f"objective needs a tmcgraph estimator (TMC, IWAE or VAE), got {type(est).__name__}")
    pp = list(est.proposal.parameters())
    if grad != "reparam" and not pp:
        raise TMCGraphError(
            f"grad={grad!r} detaches the proposal's parameters, but the proposal registers none; "
            "declare its callables as nn.Modules"
        )
    s = est.sample(data, seed=seed, detach_proposal=grad != "reparam")
    fs = est.factors(s)
    keep = keep_plate(est, fs, s.levels)
    value = log_estimates(est, s, fs, keep)
    loss = -value.mean()
    proposal_loss = None
    if grad == "dregs":
        logw = iwae_log_weights(fs, keep) if est.shared else None
        if logw is not None:
            wt = torch.softmax(logw.detach(), dim=0)
            proposal_loss = -(wt * wt * logw).sum(0).mean()
        else:
            log_sum_w2 = log_estimates(est, s, fs, keep, scale=2.0)
            ratio = torch.exp(log_sum_w2.detach() - 2 * value.detach())
            proposal_loss = -(0.5 * ratio * log_sum_w2).mean()
    return Objective(value, loss, proposal_loss, grad, list(est.model.parameters()), pp)


@torch.no_grad()
def bound(est: TMC, data: dict, seed: Optional[int] = None) -> torch.Tensor:
    """Per-data-point estimates ``log P_hat(x_b)`` without gradients (evaluation).

    TMC contracts with the data plate kept; IWAE uses K joint samples per data point.
    """
    s = est.sample(data, seed=seed)
    fs = est.factors(s)
    return log_estimates(est, s, fs, keep_plate(est, fs, s.levels))
