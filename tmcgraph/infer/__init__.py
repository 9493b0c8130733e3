"""Inference: estimators, training objectives, posterior queries, RWS and SMC.

Stage four of the pipeline (model -> sampling -> ops -> infer): everything here runs
:func:`tmcgraph.infer.pipeline.evaluate` (sample, build the factor graph, plan,
contract) and interprets the result.
"""

from .diagnostics import Diagnostics, WeightESS, diagnose, graph_weight_ess, kish_ess, marginal_ess, weight_ess
from .estimators import IWAE, TMC, VAE, log_evidence
from .objectives import STL, DReGs, Loss, Objective, Reparam, ScoreFunction, bound, objective
from .pipeline import PER_BATCH, Evaluation, evaluate
from .posterior import Posterior, PosteriorSamples, posterior, predictive_log_likelihood
from .rws import RWS, RWSResult
from .smc import SMC, SMCResult

__all__ = [
    "TMC",
    "IWAE",
    "VAE",
    "log_evidence",
    "Evaluation",
    "evaluate",
    "PER_BATCH",
    "Objective",
    "Reparam",
    "STL",
    "DReGs",
    "ScoreFunction",
    "Loss",
    "objective",
    "bound",
    "Posterior",
    "PosteriorSamples",
    "posterior",
    "predictive_log_likelihood",
    "RWS",
    "RWSResult",
    "SMC",
    "SMCResult",
    "Diagnostics",
    "WeightESS",
    "diagnose",
    "graph_weight_ess",
    "kish_ess",
    "marginal_ess",
    "weight_ess",
]
