"""tmcgraph: Tensor Monte Carlo inference over factor graphs.

Declare a model and a proposal as graphs, draw K particles per latent, and get the TMC
estimate of log p(x) as a planned log-space tensor contraction.

The package is laid out as the stages data flows through, each importing only from the
ones before it: :mod:`tmcgraph.model` (declarations) -> :mod:`tmcgraph.particles` and
:mod:`tmcgraph.sampling` (particles and couplings) -> :mod:`tmcgraph.ops` (factor graphs,
planning, contraction; independent of the model layer) -> :mod:`tmcgraph.infer`
(estimators, objectives, queries). Applications live outside the core and are imported
on demand: :mod:`tmcgraph.models` (the papers' models), :mod:`tmcgraph.data` (dataset
loaders), :mod:`tmcgraph.contrib` (process-level tuning).
"""

from .errors import TMCGraphError
from .infer import (
    IWAE,
    MPRWS,
    MPVI,
    QEM,
    RWS,
    SMC,
    TMC,
    VAE,
    Evaluation,
    MeanFieldNormal,
    Posterior,
    diagnose,
    fit,
    log_evidence,
    marginal_ess,
    objective,
    posterior,
    predictive_log_likelihood,
    subsample,
    weight_ess,
)
from .model import Model, Plate, Proposal
from .ops import Factor, FactorGraph, brute_force
from .sampling import Group, Mixture, Paired, Permutation

__version__ = "0.1.0"

__all__ = [
    "TMCGraphError",
    "Model",
    "Plate",
    "Proposal",
    "Paired",
    "Mixture",
    "Permutation",
    "Group",
    "TMC",
    "IWAE",
    "VAE",
    "log_evidence",
    "Evaluation",
    "objective",
    "posterior",
    "Posterior",
    "predictive_log_likelihood",
    "diagnose",
    "marginal_ess",
    "weight_ess",
    "RWS",
    "SMC",
    "fit",
    "MPVI",
    "MPRWS",
    "QEM",
    "MeanFieldNormal",
    "subsample",
    "Factor",
    "FactorGraph",
    "brute_force",
]
