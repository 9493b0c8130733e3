"""Estimators: the TMC estimate of log p(x), and IWAE and the VAE bound as special cases.

TMC (Aitchison, "Tensor Monte Carlo", Eq. 1 and 3) draws K_i particles per latent and
averages the importance ratio over all prod_i K_i combinations::

    P_TMC = 1/prod_i K_i  sum_{k_1..k_n}  P(x, z_1^{k_1}, ..., z_n^{k_n}) / prod_i q_i(z_i^{k_i})

where q_i is the density particle k_i was drawn from (for non-factorised proposals it
depends on the parents' particles, see :mod:`tmcgraph.sampling.couplings`).
E[P_TMC] = p(x), so log P_TMC is a lower bound on log p(x) in expectation (Jensen). The
sum is a plated tensor contraction done in log space (:mod:`tmcgraph.infer.pipeline`).

IWAE (Burda et al. 2016) is the same machinery with the
:class:`~tmcgraph.sampling.couplings.Joint` coupling: every sampled latent shares one
sample dim, P_IWAE = 1/K sum_k P(x, z^k)/Q(z^k). With K = 1 both reduce to the
single-sample VAE bound (ELBO) estimate log P(x, z) - log Q(z).
"""

from __future__ import annotations

from typing import Optional

import torch

from ..errors import TMCGraphError
from ..model import Model, Proposal, check_inference_inputs
from ..ops.factor import FactorGraph
from ..ops.paths import get_optimizer
from ..ops.plan import Plan, plan_for
from ..particles import Samples
from ..sampling.context import Context, resolve_device
from ..sampling.couplings import Coupling, Joint
from ..sampling.draw import couplings_of, draw
from .factors import factor_graph
from .pipeline import Evaluation, evaluate
from .program import COMPILE_MODES, ProgramCache

__all__ = ["TMC", "IWAE", "VAE", "log_evidence"]


def _check_split(model: Model, split) -> Optional[tuple]:
    """``split={plate: chunk}`` as ``(plate, chunk)`` (checked), or ``None``."""
    if split is None:
        return None
    if not isinstance(split, dict) or len(split) != 1:
        raise TMCGraphError(f"split must be a dict with one plate, {{plate: chunk}}, got {split!r}")
    (plate, chunk), = split.items()
    if plate not in model.plates:
        raise TMCGraphError(f"split: unknown plate {plate!r}; plates are {list(model.plates)}")
    if model.plates[plate].markov:
        raise TMCGraphError(f"split: Markov plate {plate!r} is a chain; its elements cannot be evaluated apart")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise TMCGraphError(f"split: chunk of plate {plate!r} must be a positive integer, got {chunk!r}")
    return plate, int(chunk)


class TMC:
    """Tensor Monte Carlo estimator of log p(x) for a model and a proposal.

    Args:
        model: The generative model P.
        proposal: The proposal Q for every latent of ``model``.
        K: Particles per latent (a proposal may set its own ``K``).
        strategy: Path strategy: a name from :data:`tmcgraph.ops.STRATEGIES` or an
            opt_einsum ``PathOptimizer``.
        memory_limit: Largest tensor (elements) the contraction may allocate or read.
        device: Device for data and distribution parameters.
        dtype: Floating dtype for data and distribution parameters.
        compile: Run factor construction and contraction as ``torch.compile`` d programs,
            one per structure: ``"auto"`` (default: a program is compiled once its eager
            calls have cost as much CPU time as compiling it is estimated to), ``True``
            (every program from its second call) or ``False`` (always eager).
            Falls back to eager execution, with one warning, where compilation fails.
            See :mod:`tmcgraph.infer.program`.
        split: ``{plate: chunk}``: evaluate everything inside that plate in chunks of
            ``chunk`` elements (factors built per chunk, each chunk checkpointed under
            autograd), so peak memory is bounded by a chunk; the value and gradients
            are the unsplit ones up to float rounding (:func:`tmcgraph.ops.contract`).
            Callables must get per-element tensors as data or parents (not by closure).
            Posterior queries (``marginals``) do not split.

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

    #: A coupling that replaces every sampled latent's own (IWAE: :class:`Joint`).
    coupling: Optional[Coupling] = None

    def __init__(
        self,
        model: Model,
        proposal: Proposal,
        K: int = 16,
        strategy="auto",
        memory_limit: Optional[int] = None,
        device=None,
        dtype: Optional[torch.dtype] = None,
        compile="auto",
        split: Optional[dict] = None,
    ):
        check_inference_inputs(model, proposal, K)
        self.split = _check_split(model, split)
        if not any(compile is m for m in COMPILE_MODES):
            raise TMCGraphError(f"compile must be one of {COMPILE_MODES}, got {compile!r}")
        get_optimizer(strategy)
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TMCGraphError(f"dtype must be a floating dtype, got {dtype}")
        self.model = model
        self.proposal = proposal
        self.K = int(K)
        self.strategy = strategy
        self.memory_limit = memory_limit
        self.device = resolve_device(device)
        self.dtype = dtype
        self.compile = compile
        #: The estimator's programs (:class:`tmcgraph.infer.program.ProgramCache`).
        self.programs = ProgramCache()
        proposal.validate()
        couplings_of(proposal, self.coupling)  # unknown coupling names fail here

    def context(self, seed=None) -> Context:
        """The execution context of one call (device, dtype, generator seeded from ``seed``)."""
        return Context(self.device, self.dtype, seed, self.memory_limit, getattr(self, "split", None))

    def sample(self, data: dict, seed=None, detach_proposal: bool = False, defer: bool = False) -> Samples:
        """Draw particles for every latent (reproducible with ``seed``).

        ``detach_proposal=True`` evaluates the proposal densities with its parameters
        detached (sticking-the-landing gradients). ``defer=True`` leaves grid densities
        to be computed later (by a program, or ``Samples.materialize()``).
        """
        return draw(self.model, self.proposal, data, self.K, self.context(seed), self.coupling, detach_proposal,
                    defer)

    def factor_graph(self, samples: Samples) -> FactorGraph:
        """The factor graph (one log-factor per variable) at given particles."""
        return factor_graph(self.model, samples, self.context())

    def plan(self, graph: FactorGraph) -> Plan:
        """The (cached) contraction plan of a factor graph."""
        return plan_for(graph, self.strategy, self.memory_limit)

    def run(self, data: Optional[dict] = None, seed=None, elementwise=False, samples: Optional[Samples] = None,
            **options) -> Evaluation:
        """Sample, build the factor graph, plan and contract; return the :class:`Evaluation`.

        Args:
            data: Observed name -> tensor ``[*plate sizes, *event]``.
            seed: An int or a ``torch.Generator`` for reproducible sampling (private to
                the call: torch's global RNG is neither used nor changed).
            elementwise: ``False`` for the scalar; ``True`` (outermost plate) or a plate
                name for per-element values (no latent may lie outside that plate).
            samples: Reuse these particles instead of sampling.
            **options: Further options of :func:`tmcgraph.infer.pipeline.evaluate`.
        """
        return evaluate(self, data, seed, elementwise, samples, **options)

    def log_evidence(self, data: Optional[dict] = None, seed=None, elementwise=False, samples=None) -> torch.Tensor:
        """The estimate of log p(x) (differentiable). See :meth:`run` for arguments."""
        return self.run(data, seed, elementwise, samples).log_evidence

    __call__ = log_evidence

    def __repr__(self):
        return f"{type(self).__name__}(K={self.K}, strategy={self.strategy!r}, compile={self.compile!r})"


class IWAE(TMC):
    """Importance-weighted bound: all sampled latents share one sample dim of size K.

    log P_IWAE = logsumexp_k [log P(x, z^k) - log Q(z^k)] - log K, with z^k drawn
    jointly (:class:`~tmcgraph.sampling.couplings.Joint`: non-factorised proposals are
    paired along the joint dim). Enumerated latents are still summed exactly inside
    each joint sample.
    """

    coupling = Joint()


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
