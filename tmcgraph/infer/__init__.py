"""Inference: estimators, training objectives, posterior queries, RWS, SMC, training loops.

Stage four of the pipeline (model -> sampling -> ops -> infer): everything here runs
:func:`tmcgraph.infer.pipeline.evaluate` (sample, build the factor graph, plan,
contract) and interprets the result. :mod:`~tmcgraph.infer.fit` is the training loop
(:func:`fit` with the methods :class:`MPVI`, :class:`MPRWS` and :mod:`~tmcgraph.infer.qem`'s
:class:`QEM`); :mod:`~tmcgraph.infer.subsample` builds minibatches of subsampled plates.

The functions :func:`fit`, :func:`subsample` and :func:`posterior` share their names with
the modules that define them, so ``tmcgraph.infer.fit`` is the function; import a
module's other names from the module (``from tmcgraph.infer.fit import iteration_seed``).
"""

from .diagnostics import Diagnostics, WeightESS, diagnose, graph_weight_ess, kish_ess, marginal_ess, weight_ess
from .estimators import IWAE, TMC, VAE, log_evidence
from .fit import MPRWS, MPVI, FitResult, GradientMethod, Method, fit, iteration_seed, load_history
from .objectives import STL, DReGs, Loss, Objective, Reparam, ScoreFunction, bound, objective
from .pipeline import PER_BATCH, Evaluation, evaluate
from .posterior import Posterior, PosteriorSamples, posterior, predictive_log_likelihood
from .qem import QEM, ExponentialFamily, MeanFieldNormal, families, qem_update
from .rws import RWS, RWSResult
from .smc import SMC, SMCResult
from .subsample import is_subsampled, plate_scales, subsample

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
    "fit",
    "FitResult",
    "Method",
    "GradientMethod",
    "MPVI",
    "MPRWS",
    "iteration_seed",
    "load_history",
    "QEM",
    "ExponentialFamily",
    "MeanFieldNormal",
    "qem_update",
    "families",
    "subsample",
    "plate_scales",
    "is_subsampled",
]
