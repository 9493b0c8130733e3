"""tmcgraph: Tensor Monte Carlo inference over factor graphs.

Declare a model and a proposal as graphs, draw K particles per latent, and get the TMC
estimate of log p(x) as a planned log-space tensor contraction.
"""

from . import datasets, deep, objectives, queries, runtime, rws, toys
from .contract import contract
from .errors import TMCGraphError
from .estimators import IWAE, TMC, VAE, Result, log_evidence
from .factors import Factor, build_factors
from .graph import COUPLINGS, Model, Plate, Proposal
from .oracle import brute_force
from .plan import Plan, plan_cache_clear, plan_cache_info, plan_for
from .queries import Posterior, posterior, predictive_log_likelihood
from .runtime import tune_allocator
from .rws import RWS
from .sampling import Samples, bind_data, draw, proposal_log_q
from .smc import SMC, SMCResult

__version__ = "0.1.0"

__all__ = [
    "TMCGraphError",
    "COUPLINGS",
    "Model",
    "Plate",
    "Proposal",
    "Samples",
    "bind_data",
    "draw",
    "proposal_log_q",
    "Factor",
    "build_factors",
    "Plan",
    "plan_for",
    "plan_cache_info",
    "plan_cache_clear",
    "contract",
    "brute_force",
    "TMC",
    "IWAE",
    "VAE",
    "Result",
    "log_evidence",
    "toys",
    "datasets",
    "deep",
    "objectives",
    "queries",
    "rws",
    "runtime",
    "tune_allocator",
    "Posterior",
    "posterior",
    "predictive_log_likelihood",
    "RWS",
    "SMC",
    "SMCResult",
]
