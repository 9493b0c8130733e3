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

:class:`ScoreFunction` (``"score"``)
    For proposals with non-reparameterisable latents (discrete latents that are sampled
    rather than enumerated). It estimates, without bias, the gradient w.r.t. every
    parameter (model and proposal) of

        L(theta, phi) = E_{z ~ Q_phi}[ log P_TMC(x, z; theta, phi) ],

    the expectation over the whole drawing procedure (particles, coupling indices). With
    the particles split into reparameterised ones, z_r = g(eps; phi, z_<), and the others,
    z_n, drawn from densities q_n(z_n | earlier particles; phi) (the density each particle
    was drawn from, as recorded by its coupling), the surrogate of the stochastic
    computation graph (Schulman et al. 2015, "Gradient estimation using stochastic
    computation graphs")

        f + stop_grad(f - b) * sum_n log q_n(z_n),     f = log P_TMC

    has E[grad] = grad L: the pathwise gradient of f (through the reparameterised
    particles and every explicit dependence of the factors on the parameters) plus the
    REINFORCE term (Williams 1992) for the non-reparameterised particles, whose densities
    stay differentiable through their reparameterised parents. Reparameterisable
    latents therefore keep their pathwise gradient. ``b`` is a baseline independent of
    the particles it multiplies: by default the leave-one-out mean of the rewards of
    ``num_samples`` independent draws (Kool et al. 2019, "Buy 4 REINFORCE samples, get a
    baseline for free!"; the RLOO estimator), or an exponential moving average of past
    rewards (Williams 1992; Mnih & Gregor 2014). Rewards are per data point when the
    data plate is kept (no global latents): each point's score is weighted by its own
    estimate only, which removes the other points' noise. Non-reparameterised latents
    drawn with the ``"permutation"`` coupling from latent parents are refused (their
    particles are not independent given the parents, so the product of recorded
    densities is not their joint density); use ``"mixture"`` or ``"paired"`` there.

Objectives that need reparameterised gradients (:class:`Reparam`, :class:`STL`,
:class:`DReGs`) check, once per structure (the first call after each declaration, and
after a change of which parameters require grad), that no sampled latent has a
proposal without ``rsample`` whose distribution depends on tensors that require grad:
its gradient would silently lack the score-function term. They raise a
:class:`~tmcgraph.TMCGraphError` naming the latent and the options: ``grad="score"``,
reweighted wake-sleep (:class:`tmcgraph.RWS`), or ``q.enumerate``.

Subsampled plates (:mod:`tmcgraph.infer.subsample`): when a call gives a subsampled plate
B of its N elements, the objective is the scalar scaled estimate for the full data set
(not per data point) and ``loss = -value``, as in Pyro. DReGs is refused there.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import NamedTuple, Optional

import torch

from ..errors import TMCGraphError
from ..particles import Deferred, Samples
from ..sampling.couplings import Mixture, Paired, Permutation, Site
from .estimators import TMC
from .pipeline import PER_BATCH, Evaluation
from .subsample import is_subsampled

__all__ = ["Objective", "Reparam", "STL", "DReGs", "ScoreFunction", "Loss", "GRADS", "OBJECTIVES", "get_objective",
           "objective", "bound", "sampled_latents", "SampledLatent", "check_reparameterised"]


@dataclass
class Loss:
    """One minibatch objective, ready to back-propagate.

    Attributes:
        value: Per-data-point estimates ``log P_hat(x_b)`` (vector over the data plate,
            or a scalar when the model has no plate every variable lies in, or when a
            plate is subsampled), with graph.
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

    Subclasses set :attr:`detach_proposal` (how particles' densities are drawn),
    :attr:`reparam` (whether the gradient is pathwise only) and :meth:`proposal_loss`
    (a separate surrogate for the proposal's parameters, or ``None``).
    """

    #: Name accepted by :func:`objective`.
    name = ""
    #: Evaluate the proposal densities with its parameters detached (path derivative only).
    detach_proposal = False
    #: The gradient is pathwise only: refuse non-reparameterisable latents whose proposal needs a gradient.
    reparam = True
    #: Whether the estimator is valid when a plate is subsampled.
    subsample = True
    #: :meth:`proposal_loss` reads the factor graph: build it once, with the value.
    needs_graph = False

    def _start(self, est: TMC, data: dict) -> tuple:
        """Check the estimator; the proposal's parameters and the ``elementwise`` option of the runs."""
        if not isinstance(est, TMC):
            raise TMCGraphError(
                f"objective needs a tmcgraph estimator (TMC, IWAE or VAE), got {type(est).__name__}")
        sub = is_subsampled(est.model, data)
        if sub and not self.subsample:
            raise TMCGraphError(f"grad={self.name!r} does not support subsampled plates; use 'reparam', 'stl' "
                                "or 'score'")
        pp = list(est.proposal.parameters())
        if self.detach_proposal and not pp:
            raise TMCGraphError(
                f"grad={self.name!r} detaches the proposal's parameters, but the proposal registers none; "
                "declare its callables as nn.Modules"
            )
        return pp, (False if sub else PER_BATCH)

    def __call__(self, est: TMC, data: dict, seed=None) -> Loss:
        """The minibatch :class:`Loss` of ``est`` on ``data``."""
        pp, elementwise = self._start(est, data)
        ev = est.run(data, seed, elementwise, detach_proposal=self.detach_proposal, with_graph=self.needs_graph)
        if self.reparam:
            check_reparameterised(est, ev.samples, self.name)
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
    subsample = False  # the doubled factors of a subsampled plate's message are not sum w^2
    needs_graph = True

    def proposal_loss(self, ev: Evaluation) -> torch.Tensor:
        value = ev.log_evidence
        log_sum_w2 = ev.contract(2.0 * t for t in ev.graph.tensors)
        ratio = torch.exp(log_sum_w2.detach() - 2 * value.detach())
        return -(0.5 * ratio * log_sum_w2).mean()


class ScoreFunction(Objective):
    """Score-function (REINFORCE) gradients for non-reparameterisable latents, pathwise for the rest.

    An unbiased estimate of the gradient, w.r.t. model and proposal parameters, of
    ``E_Q[log P_TMC]`` (see the module docstring for the surrogate). ``loss`` has the
    value ``-mean(value)``; only its gradient carries the score-function term.

    Args:
        num_samples: Independent draws of the particles per call (R); the value and the
            gradient are averaged over them.
        baseline: ``"loo"`` (default; needs ``num_samples >= 2``): draw r's baseline is
            the mean reward of the other R - 1 draws (RLOO, Kool et al. 2019), per data
            point when rewards are; ``"ema"``: an exponential moving average of the mean
            reward of earlier calls (state kept in this object); ``"none"``.
        decay: The moving average's decay (``baseline="ema"``).

    Example:
        >>> import torch, tmcgraph as tg
        >>> from torch.distributions import Categorical, Normal
        >>> logits = torch.zeros(2, requires_grad=True)
        >>> m = tg.Model(); m.latent("c", lambda: Categorical(probs=torch.tensor([0.3, 0.7])))
        >>> m.observed("x", lambda c: Normal(2.0 * c, 1.0))
        >>> q = tg.Proposal(m); q.latent("c", lambda: Categorical(logits=logits))
        >>> loss = tg.objective(tg.TMC(m, q, K=2), {"x": torch.tensor(1.5)}, grad="score", seed=0)
        >>> loss.backward(); logits.grad.shape
        torch.Size([2])
    """

    name = "score"
    reparam = False

    def __init__(self, num_samples: int = 2, baseline: str = "loo", decay: float = 0.9):
        if isinstance(num_samples, bool) or int(num_samples) != num_samples or num_samples < 1:
            raise TMCGraphError(f"ScoreFunction: num_samples must be a positive integer, got {num_samples!r}")
        if baseline not in ("loo", "ema", "none"):
            raise TMCGraphError(f"ScoreFunction: baseline must be 'loo', 'ema' or 'none', got {baseline!r}")
        if baseline == "loo" and num_samples < 2:
            raise TMCGraphError("ScoreFunction: the leave-one-out baseline needs num_samples >= 2")
        if not 0.0 <= decay < 1.0:
            raise TMCGraphError(f"ScoreFunction: decay must lie in [0, 1), got {decay!r}")
        self.num_samples = int(num_samples)
        self.baseline = baseline
        self.decay = float(decay)
        self._average = None

    def __call__(self, est: TMC, data: dict, seed=None) -> Loss:
        pp, elementwise = self._start(est, data)
        gen = _generator(est, seed)
        runs = [est.run(data, gen, elementwise) for _ in range(self.num_samples)]
        latents = [n for n, k in sampled_latents(est, runs[0].samples).items() if not k.rsample]
        _check_score_couplings(est, runs[0].samples, latents)
        f = torch.stack([ev.log_evidence for ev in runs])  # [R, *points]
        score = torch.stack([_score(ev.samples, latents, ev.plan.keep, f[0]) for ev in runs])
        fd = f.detach()
        if self.baseline == "loo":
            b = (fd.sum(0, keepdim=True) - fd) / (self.num_samples - 1)
        elif self.baseline == "ema":
            b = fd.new_zeros(()) if self._average is None else self._average.to(fd)
            mean = fd.mean()
            self._average = mean if self._average is None else self.decay * self._average + (1 - self.decay) * mean
        else:
            b = fd.new_zeros(())
        surrogate = f + (fd - b) * (score - score.detach())
        value = f.mean(0)
        return Loss(value, -surrogate.mean(), None, self.name, list(est.model.parameters()), pp)

    def __repr__(self):
        return f"ScoreFunction(num_samples={self.num_samples}, baseline={self.baseline!r})"


def _generator(est: TMC, seed):
    """One generator for the call's independent draws (``None``: torch's global RNG)."""
    if seed is None or isinstance(seed, torch.Generator):
        return seed
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TMCGraphError(f"seed must be an int, a torch.Generator or None, got {seed!r}")
    g = torch.Generator(device=est.device or "cpu")
    g.manual_seed(seed)
    return g


def _score(samples: Samples, latents: list, keep: Optional[str], like: torch.Tensor) -> torch.Tensor:
    """Sum of the recorded log densities of ``latents``' particles, per element of ``keep`` (or in total)."""
    total = None
    for n in latents:
        lq = samples.log_q[n]
        if isinstance(lq, Deferred):
            lq = lq()
        if keep is not None:
            ax = 1 + tuple(samples.plates[n]).index(keep)
            lq = lq.sum([i for i in range(lq.dim()) if i != ax])
        else:
            lq = lq.sum()
        total = lq if total is None else total + lq
    if total is None:
        return torch.zeros_like(like)
    return total.to(like.dtype).expand(like.shape)


def _check_score_couplings(est: TMC, samples: Samples, latents: list) -> None:
    """Raise for a score-function latent whose recorded densities are not the joint density of its particles."""
    for n in latents:
        c = samples.couplings[n]
        parents = [p for p in est.proposal[n].parents if p in samples.values]
        if parents and (isinstance(c, Permutation) or not isinstance(c, (Paired, Mixture))):
            raise TMCGraphError(
                f"grad='score': latent {n!r} is not reparameterisable and is drawn from its latent parents "
                f"{parents} with the {type(c).__name__} coupling, whose particles are not independent given the "
                f"parents; declare it with coupling='mixture' or coupling='paired'"
            )


#: The pathwise gradient estimators by name.
GRADS = {c.name: c for c in (Reparam, STL, DReGs)}
#: Every objective by name (:data:`GRADS` and the score-function estimator).
OBJECTIVES = {**GRADS, ScoreFunction.name: ScoreFunction}


def _requires_grad(obj, seen=None) -> bool:
    """Whether a distribution (or transform) holds a tensor that requires grad."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return False
    seen.add(id(obj))
    if torch.is_tensor(obj):
        return obj.requires_grad
    if isinstance(obj, (list, tuple)):
        return any(_requires_grad(o, seen) for o in obj)
    if isinstance(obj, (torch.distributions.Distribution, torch.distributions.Transform)):
        return any(_requires_grad(v, seen) for v in vars(obj).values())
    return False


def _kinds_key(est: TMC) -> tuple:
    params = itertools.chain(est.model.parameters(), est.proposal.parameters())
    return (est.model._version, est.proposal._version, torch.is_grad_enabled(),
            tuple(p.requires_grad for p in params))


class SampledLatent(NamedTuple):
    """What a pathwise objective needs to know of a sampled latent's proposal."""

    rsample: bool
    grad: bool
    dist: str


def sampled_latents(est: TMC, samples: Samples) -> dict:
    """Sampled (not enumerated) latent -> :class:`SampledLatent` ``(rsample, grad, dist)`` of its proposal.

    ``rsample``: the distribution has ``rsample``; ``dist``: its class name; ``grad``: the
    distribution the particles were drawn from holds a tensor that requires grad (its
    parameters, or parent particles that carry a gradient). Computed
    once per structure (by evaluating each proposal at the drawn particles) and cached on
    the estimator, keyed by the declarations and by which parameters require grad.
    """
    cache = est.__dict__.setdefault("_sampled_latents", {})
    key = _kinds_key(est)
    kinds = cache.get(key)
    if kinds is not None:
        return kinds
    q, ctx, s = est.proposal, est.context(), samples
    kinds = {}
    for n in s.order:
        var = q[n]
        if var.enumerate:
            continue
        site = Site(n, var, q, s, int(s.values[n].shape[0]), var.plates, [s.plate_sizes[p] for p in var.plates],
                    ctx, s.dims[n])
        dims = tuple(dict.fromkeys([s.dims[n]] + [s.dims[p] for p in site.latent_parents]))
        d = site.evaluate(dims)
        kinds[n] = SampledLatent(bool(d.has_rsample), _requires_grad(d), type(d).__name__)
    if len(cache) > 64:
        cache.clear()
    cache[key] = kinds
    return kinds


def check_reparameterised(est: TMC, samples: Samples, grad: str = "reparam") -> None:
    """Raise unless every sampled latent whose proposal needs a gradient is reparameterisable.

    A latent drawn without ``rsample`` from a distribution that depends on tensors
    requiring grad gets no score-function term from a pathwise objective: its gradient
    would be wrong without any sign. Checked once per structure (see :func:`sampled_latents`).
    """
    kinds = sampled_latents(est, samples)
    bad = [n for n, k in kinds.items() if k.grad and not k.rsample]
    if bad:
        q = est.proposal
        kinds = ", ".join(f"{n!r} ({kinds[n].dist})" for n in bad)
        first = bad[0]
        raise TMCGraphError(
            f"grad={grad!r} needs reparameterised particles, but latent(s) {kinds} are sampled from a proposal "
            "without rsample whose parameters (or parent particles) require grad: the pathwise gradient would "
            "miss their score-function term and be silently wrong. Options: grad='score' "
            "(tmcgraph.infer.objectives.ScoreFunction: REINFORCE for these latents, pathwise for the rest); "
            "reweighted wake-sleep (tmcgraph.RWS), which trains the proposal without reparameterisation; "
            f"q.enumerate({first!r}) to sum the latent exactly"
            + ("" if q[first].prior else "; or a proposal whose parameters do not require grad")
        )


def get_objective(grad) -> Objective:
    """The :class:`Objective` of a name in :data:`OBJECTIVES` or an instance."""
    if isinstance(grad, Objective):
        return grad
    if isinstance(grad, str) and grad in OBJECTIVES:
        return OBJECTIVES[grad]()
    raise TMCGraphError(f"grad must be one of {tuple(OBJECTIVES)} or an Objective, got {grad!r}")


def objective(est: TMC, data: dict, grad="reparam", seed=None) -> Loss:
    """The minibatch objective of ``est`` (a :class:`~tmcgraph.TMC` or :class:`~tmcgraph.IWAE`).

    Args:
        est: The estimator (its model, proposal and K).
        data: Observed name -> tensor.
        grad: ``"reparam"``, ``"stl"``, ``"dregs"``, ``"score"`` or an :class:`Objective`.
        seed: Optional seed for the particles.

    Returns:
        The :class:`Loss`; call :meth:`Loss.backward`.

    Raises:
        TMCGraphError: unknown ``grad``; STL/DReGs with a proposal that registers no
            parameters; a pathwise objective with a non-reparameterisable latent whose
            proposal needs a gradient; DReGs on a subsampled plate.
    """
    return get_objective(grad)(est, data, seed)


@torch.no_grad()
def bound(est: TMC, data: dict, seed=None) -> torch.Tensor:
    """Per-data-point estimates ``log P_hat(x_b)`` without gradients (evaluation).

    TMC contracts with the data plate kept; IWAE uses K joint samples per data point. With
    a subsampled plate: the scalar scaled estimate.
    """
    return est.run(data, seed, False if is_subsampled(est.model, data) else PER_BATCH).log_evidence
