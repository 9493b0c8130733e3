"""Objectives: the TMC estimate of log p(x), and IWAE and the VAE bound as special cases.

TMC (Aitchison, "Tensor Monte Carlo", Eq. 1 and 3) draws K_i particles per latent and
averages the importance ratio over all prod_i K_i combinations::

    P_TMC = 1/prod_i K_i  sum_{k_1..k_n}  P(x, z_1^{k_1}, ..., z_n^{k_n}) / prod_i q_i(z_i^{k_i})

where q_i is the density particle k_i was drawn from (for non-factorised proposals it
depends on the parents' particles, see :mod:`tmcgraph.sampling`). E[P_TMC] = p(x), so
log P_TMC is a lower bound on log p(x) in expectation (Jensen). The sum is a plated
tensor contraction done in log space.

IWAE (Burda et al.) is the same machinery with every sampled latent sharing one sample
dim: P_IWAE = 1/K sum_k P(x, z^k)/Q(z^k). With K = 1 both reduce to the single-sample
VAE bound (ELBO) estimate log P(x, z) - log Q(z).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .contract import contract
from .errors import TMCGraphError
from .factors import build_factors
from .graph import Model, Proposal, check_inference_inputs
from .plan import STRATEGIES, Plan, plan_for
from .sampling import Samples, draw, execution_context

__all__ = ["TMC", "IWAE", "VAE", "Result", "log_evidence"]


@dataclass
class Result:
    """Everything one estimate produced.

    Attributes:
        log_evidence: The estimate (scalar, or a vector over the kept plate).
        samples: The particles and their densities.
        factors: The log-factors.
        plan: The contraction plan used.
    """

    log_evidence: torch.Tensor
    samples: Samples
    factors: list
    plan: Plan


class TMC:
    """Tensor Monte Carlo estimator of log p(x) for a model and a proposal.

    Args:
        model: The generative model P.
        proposal: The proposal Q for every latent of ``model``.
        K: Particles per latent (a proposal may set its own ``K``).
        strategy: opt_einsum path strategy (see :data:`tmcgraph.plan.STRATEGIES`).
        memory_limit: Largest intermediate (elements) the planner may use.
        device: Device for data and for distributions built from Python numbers.
        dtype: Floating dtype for data and for distributions built from Python numbers.

    Example:
        >>> import torch; from torch.distributions import Normal
        >>> import tmcgraph as tg
        >>> m = tg.Model(); m.plate("data", size=4)
        >>> m.latent("theta", lambda: Normal(0., 1.))
        >>> m.latent("z", lambda theta: Normal(theta, 1.), plate="data")
        >>> m.observed("x", lambda z: Normal(z, 1.), plate="data")
        >>> q = tg.Proposal(m); q.latent("theta", lambda: Normal(0., 1.))
        >>> q.latent("z", lambda: Normal(0., 2 ** 0.5), plate="data")
        >>> est = tg.TMC(m, q, K=16)
        >>> est.log_evidence({"x": torch.zeros(4)}, seed=0).shape
        torch.Size([])
    """

    shared = False

    def __init__(
        self,
        model: Model,
        proposal: Proposal,
        K: int = 16,
        strategy: str = "auto",
        memory_limit: Optional[int] = None,
        device=None,
        dtype: Optional[torch.dtype] = None,
    ):
        check_inference_inputs(model, proposal, K)
        if strategy not in STRATEGIES:
            raise TMCGraphError(f"unknown path strategy {strategy!r}; choose one of {STRATEGIES}")
        if dtype is not None and not dtype.is_floating_point:
            raise TMCGraphError(f"dtype must be a floating dtype, got {dtype}")
        self.model = model
        self.proposal = proposal
        self.K = int(K)
        self.strategy = strategy
        self.memory_limit = memory_limit
        self.device = None if device is None else torch.device(device)
        self.dtype = dtype
        proposal.validate()

    def _context(self, seed=None):
        return execution_context(self.device, self.dtype, seed)

    def sample(self, data: dict, seed: Optional[int] = None, detach_proposal: bool = False) -> Samples:
        """Draw particles for every latent (reproducible with ``seed``).

        ``detach_proposal=True`` evaluates the proposal densities with its parameters
        detached (sticking-the-landing gradients).
        """
        with self._context(seed):
            return draw(
                self.model, self.proposal, data, self.K, self.shared, self.device, self.dtype, detach_proposal
            )

    def factors(self, samples: Samples) -> list:
        """Log-factors for given particles."""
        with self._context():
            return build_factors(self.model, samples)

    def plan(self, factors: list, levels: dict, keep=None) -> Plan:
        """The (cached) contraction plan for these factors."""
        return plan_for(factors, levels, keep, self.strategy, self.memory_limit)

    def _keep(self, elementwise) -> Optional[str]:
        if elementwise is False or elementwise is None:
            return None
        if elementwise is True:
            if not self.model.plates:
                raise TMCGraphError("elementwise=True needs a plate; the model declares none")
            return next(iter(self.model.plates))
        if elementwise not in self.model.plates:
            raise TMCGraphError(f"elementwise: unknown plate {elementwise!r}; plates are {list(self.model.plates)}")
        return elementwise

    def run(self, data: dict, seed: Optional[int] = None, elementwise=False, samples: Optional[Samples] = None):
        """Sample, build factors, plan and contract; return a :class:`Result`.

        Args:
            data: Observed name -> tensor ``[*plate sizes, *event]``.
            seed: An int or a ``torch.Generator`` for reproducible sampling (the
                global RNG state is restored afterwards).
            elementwise: ``False`` for the scalar; ``True`` (outermost plate) or a plate
                name for per-element values (no latent may lie outside that plate).
            samples: Reuse these particles instead of sampling.
        """
        keep = self._keep(elementwise)
        if samples is None:
            samples = self.sample(data, seed)
        fs = self.factors(samples)
        plan = self.plan(fs, samples.levels, keep)
        value = contract(plan, [f.tensor for f in fs])
        return Result(value, samples, fs, plan)

    def log_evidence(self, data: dict, seed: Optional[int] = None, elementwise=False, samples=None) -> torch.Tensor:
        """The estimate of log p(x) (differentiable). See :meth:`run` for arguments."""
        return self.run(data, seed, elementwise, samples).log_evidence

    __call__ = log_evidence

    def __repr__(self):
        return f"{type(self).__name__}(K={self.K}, strategy={self.strategy!r})"


class IWAE(TMC):
    """Importance-weighted bound: all sampled latents share one sample dim of size K.

    log P_IWAE = logsumexp_k [log P(x, z^k) - log Q(z^k)] - log K, with z^k drawn
    jointly (non-factorised proposals are paired). Enumerated latents are still summed
    exactly inside each joint sample.
    """

    shared = True


class VAE(IWAE):
    """Single-sample VAE bound: log P(x, z) - log Q(z) with z ~ Q (IWAE with K = 1)."""

    def __init__(self, model: Model, proposal: Proposal, **kwargs):
        if kwargs.pop("K", 1) != 1:
            raise TMCGraphError("VAE uses K=1; use IWAE or TMC for more samples")
        super().__init__(model, proposal, K=1, **kwargs)


def log_evidence(model: Model, proposal: Proposal, data: dict, K: int = 16, method: str = "tmc", **kwargs):
    """Functional form: ``method`` is ``"tmc"``, ``"iwae"`` or ``"vae"``."""
    cls = {"tmc": TMC, "iwae": IWAE, "vae": VAE}.get(method)
    if cls is None:
        raise TMCGraphError(f"method must be 'tmc', 'iwae' or 'vae', got {method!r}")
    seed = kwargs.pop("seed", None)
    elementwise = kwargs.pop("elementwise", False)
    est = cls(model, proposal, **kwargs) if cls is VAE else cls(model, proposal, K=K, **kwargs)
    return est.log_evidence(data, seed=seed, elementwise=elementwise)
