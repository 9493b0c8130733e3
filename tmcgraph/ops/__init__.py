"""The contraction engine: factor graphs, planning, execution, adjoint passes, oracle.

Nothing in ``tmcgraph.ops`` knows about models, proposals or particles: it contracts
plated sum-products of log-factors (:class:`FactorGraph`) in log space. Planning
(:mod:`~tmcgraph.ops.ordinals`, :mod:`~tmcgraph.ops.paths`, :mod:`~tmcgraph.ops.slicing`,
:mod:`~tmcgraph.ops.plan`) is separate from execution (:mod:`~tmcgraph.ops.contract`,
:mod:`~tmcgraph.ops.backends.log`); :mod:`~tmcgraph.ops.adjoint` runs the plan backwards
for marginals and samples, :mod:`~tmcgraph.ops.scan` contracts the chains of Markov
plates, and :mod:`~tmcgraph.ops.oracle` is the naive definition every fast path is
tested against.
"""

from .adjoint import DRAWS, dim_marginals, gather_particles, sample_indices
from .contract import contract, run_step
from .factor import Factor, FactorGraph
from .oracle import brute_force
from .paths import STRATEGIES, Auto, BestOf, Named, VariableElimination
from .plan import Plan, Step, make_plan, plan_cache_clear, plan_cache_info, plan_for
from .scan import log_chain, log_chain_marginals, log_chain_vector, naive_log_chain, sample_log_chain

__all__ = [
    "Factor",
    "FactorGraph",
    "Plan",
    "Step",
    "plan_for",
    "make_plan",
    "plan_cache_info",
    "plan_cache_clear",
    "STRATEGIES",
    "Auto",
    "BestOf",
    "Named",
    "VariableElimination",
    "contract",
    "run_step",
    "dim_marginals",
    "sample_indices",
    "gather_particles",
    "DRAWS",
    "brute_force",
    "log_chain",
    "log_chain_vector",
    "log_chain_marginals",
    "sample_log_chain",
    "naive_log_chain",
]
