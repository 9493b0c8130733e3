"""The one pipeline every consumer runs: sample -> factor graph -> plan -> contract.

Estimators, objectives (reparameterised, STL, DReGs), posterior marginals and samples,
predictive log-likelihoods and reweighted wake-sleep all call :func:`evaluate`, which

1. draws particles (or reuses given ones) with the estimator's couplings and context,
2. builds the :class:`~tmcgraph.ops.factor.FactorGraph` (one log-factor per variable),
3. fixes the kept plate (per-element results) and finds the cached plan,
4. contracts it, or, with ``marginals=True``, runs the adjoint pass that gives every
   index marginal along with the value,

and returns an :class:`Evaluation` that can contract the same plan again on transformed
tensors (``2 f`` for DReGs' ``sum w^2``, masked likelihoods for predictive estimates).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from ..errors import TMCGraphError
from ..ops.adjoint import dim_marginals
from ..ops.contract import contract
from ..ops.factor import Factor, FactorGraph
from ..ops.plan import Plan, plan_for
from ..particles import Samples
from .factors import factor_builders, factor_graph, graph_meta
from .program import Program, structure_key
from .subsample import plate_scales

__all__ = ["Evaluation", "evaluate", "resolve_keep", "PER_BATCH"]


class _PerBatch:
    """Sentinel: keep the outermost plate when every factor and sample dim lies in it."""

    def __repr__(self):
        return "PER_BATCH"


#: ``elementwise=PER_BATCH``: per-element values over the outermost plate when every
#: factor and sample dim lies in it (independent data points), else the scalar.
PER_BATCH = _PerBatch()


@dataclass
class Evaluation:
    """Everything one pass of the pipeline produced.

    Attributes:
        log_evidence: The log of the contraction: the estimate (scalar, or a vector over
            the kept plate).
        samples: The particles and their densities.
        plan: The contraction plan of :attr:`graph`.
        marginals: Sample dim -> posterior marginal ``[K, *sizes of its ordinal]``
            (detached), when asked for.
    """

    log_evidence: torch.Tensor
    samples: Samples
    plan: Plan
    marginals: Optional[dict] = None
    _graph: Optional[FactorGraph] = field(default=None, repr=False)
    _build: Optional[Callable] = field(default=None, repr=False)

    @property
    def graph(self) -> FactorGraph:
        """The factor graph (with its kept plate); built on first access when a program computed the value."""
        if self._graph is None:
            self._graph = self._build()
        return self._graph

    @property
    def factors(self) -> tuple:
        """The log-factors of :attr:`graph`."""
        return self.graph.factors

    def contract(self, tensors) -> torch.Tensor:
        """The same plan on other tensors of the graph's layouts (e.g. ``2 f`` or masked factors)."""
        return contract(self.plan, list(tensors))


def resolve_keep(model, graph: FactorGraph, elementwise) -> Optional[str]:
    """The plate to keep per element for a user's ``elementwise=`` option.

    ``False``/``None``: none (the scalar); ``True``: the model's outermost plate; a plate
    name: that plate; :data:`PER_BATCH`: the outermost plate if the graph allows it.
    """
    if elementwise is False or elementwise is None:
        return None
    plates = list(model.plates)
    if elementwise is PER_BATCH:
        return plates[0] if plates and graph.why_not_keep(plates[0]) is None else None
    if elementwise is True:
        if not plates:
            raise TMCGraphError("elementwise=True needs a plate; the model declares none")
        return plates[0]
    if elementwise not in model.plates:
        raise TMCGraphError(f"elementwise: unknown plate {elementwise!r}; plates are {plates}")
    return elementwise


def evaluate(
    estimator,
    data: Optional[dict] = None,
    seed=None,
    elementwise=False,
    samples: Optional[Samples] = None,
    detach_proposal: bool = False,
    fixed: bool = False,
    marginals: bool = False,
    with_graph: bool = False,
) -> Evaluation:
    """Run the pipeline of ``estimator`` (a :class:`~tmcgraph.infer.estimators.TMC` or subclass).

    Args:
        estimator: Supplies the model, proposal, K, couplings, planner options and context.
        data: Observed name -> tensor (unused when ``samples`` are given).
        seed: An int or a ``torch.Generator`` for the particles.
        elementwise: Kept plate, see :func:`resolve_keep`.
        samples: Reuse these particles instead of drawing.
        detach_proposal: Draw with the proposal's parameters detached in ``log_q`` (STL).
        fixed: Treat particles and their densities as constants (score-function
            objectives such as RWS): they are detached before the factors are built.
        marginals: Also compute every index marginal (one adjoint pass); the value then
            stays differentiable w.r.t. whatever the factors depend on.
        with_graph: Build the factor graph and contract it here, not through the
            structure's program, so that :attr:`Evaluation.graph` is the graph the value
            was computed from. For consumers that contract the same factors again (the
            sum of squared weights of DReGs, held-out predictives): after a program has
            computed the value, :attr:`Evaluation.graph` would build every factor, and
            its autograd graph, a second time.

    Returns:
        The :class:`Evaluation`.
    """
    programs = getattr(estimator, "programs", None)
    use_program = programs is not None and not marginals and not with_graph
    if samples is None:
        if data is None:
            raise TMCGraphError("evaluate needs data or samples")
        samples = estimator.sample(data, seed=seed, detach_proposal=detach_proposal, defer=use_program)
    if fixed:
        samples = samples.detached()
    model, ctx = estimator.model, estimator.context()
    key = None
    if use_program:
        key = (model._version, elementwise, structure_key(samples))
        prog = programs.get(key)
        if prog is not None:
            def build(s=samples, keep=prog.plan.keep):
                return factor_graph(model, s, ctx).with_keep(keep)

            return Evaluation(prog(samples), samples, prog.plan, _build=build)
    started = time.process_time()
    skeleton = Samples(**{f: getattr(samples, f) for f in samples.__dataclass_fields__})
    skeleton.log_q = dict(samples.log_q)  # keeps the deferred densities' recipes
    split = getattr(estimator, "split", None)
    if use_program and (estimator.memory_limit is not None or split is not None):
        return _first_call_bounded(estimator, samples, skeleton, key, elementwise, started)
    graph = factor_graph(model, samples.materialize(), ctx)
    graph = graph.with_keep(resolve_keep(model, graph, elementwise))
    plan = plan_for(graph, estimator.strategy, estimator.memory_limit)
    if not marginals:
        value = contract(plan, graph.tensors, split)
        if key is not None:
            prog = programs.put(key, Program(model, skeleton, plan, ctx, estimator.compile,
                                                 graph.factors[0].tensor.dtype, split))
            prog.calls += 1
            prog.eager_seconds += time.process_time() - started
        return Evaluation(value, samples, plan, _graph=graph)
    differentiable = torch.is_grad_enabled()
    log_z, marg = dim_marginals(graph, strategy=estimator.strategy, memory_limit=estimator.memory_limit,
                                differentiable=differentiable)
    return Evaluation(log_z, samples, plan, marg, _graph=graph)


def _probe_graph(model, samples: Samples, ctx) -> FactorGraph:
    """The factor graph's structure without its grids: each factor computed at one particle per sample dim.

    Every factor is built (so the user's distributions are called and checked) on the
    first particle of each of its sample dims only, then expanded (a view, no memory) to
    its full shape; the result has the right layouts, shapes and dtypes for planning.
    """
    out = []
    ordinals, markov = graph_meta(model, samples)
    sizes = dict(samples.sizes, **{pd: samples.sizes[d] for pairs in markov.values() for pd, d in pairs})
    for name, dims, plates, build in factor_builders(model, samples, ctx):
        t = build(tuple((i, 0) for i in range(len(dims))))
        out.append(Factor(name, t.expand([sizes[d] for d in dims] + list(t.shape[len(dims):])), dims, plates))
    dtype = out[0].tensor.dtype
    for f in out[1:]:
        dtype = torch.promote_types(dtype, f.tensor.dtype)
    out = [f if f.tensor.dtype == dtype else f.with_tensor(f.tensor.to(dtype)) for f in out]
    return FactorGraph(tuple(out), ordinals, scales=plate_scales(model, samples.plate_sizes), markov=markov)


def _first_call_bounded(estimator, samples: Samples, skeleton: Samples, key, elementwise, started) -> Evaluation:
    """A structure's first evaluation under ``memory_limit``: planned from a probe, run by its program.

    No factor is built whole: the plan comes from :func:`_probe_graph`, and the program
    builds each factor inside the (sliced) step that consumes it.
    """
    model, ctx = estimator.model, estimator.context()
    probe = Samples(**{f: getattr(samples, f) for f in samples.__dataclass_fields__})
    probe.log_q = dict(samples.log_q)
    graph = _probe_graph(model, probe.materialize(), ctx)
    del probe
    graph = graph.with_keep(resolve_keep(model, graph, elementwise))
    plan = plan_for(graph, estimator.strategy, estimator.memory_limit)
    prog = estimator.programs.put(key, Program(model, skeleton, plan, ctx, estimator.compile,
                                               graph.factors[0].tensor.dtype, getattr(estimator, "split", None)))
    value = prog(samples, eager=True)
    prog.eager_seconds += time.process_time() - started

    def build(s=samples, keep=plan.keep):
        return factor_graph(model, s, ctx).with_keep(keep)

    return Evaluation(value, samples, plan, _build=build)
