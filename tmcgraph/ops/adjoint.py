"""Adjoint passes along a plan: marginals of every index, and exact backward sampling.

A factor graph's value is ``log Z`` with ``Z = sum_k w(k)``, ``w(k) = prod_f exp(f[k])``
over every index combination ``k`` (one index per sample dim and element of its
ordinal). Normalising gives a distribution ``pi(k) = w(k) / Z`` over combinations.

* **Marginals** (:func:`dim_marginals`). Add a zero log-weight ``u_d[k, e]`` per sample
  dim ``d`` (and element ``e`` of its ordinal) as an extra factor. Then
  ``d log Z / d u_d[k, e] = pi(k_{d,e} = k)``: one contraction and one backward pass
  (the adjoint of the plan) give every single-dim marginal.
* **Samples** (:func:`sample_indices`): exact draws of ``k ~ pi`` by backward sampling
  along the plan: one contraction records the message each plate-level step sends to
  its parent; then, root first, each step's own dims are drawn one at a time from their
  marginals given the indices already drawn (factors and messages clamped by index
  selection). The ``S`` draws are a batch plate (:data:`DRAWS`) kept per element.

Cost. Marginals cost one contraction and its backward pass. Sampling ``S`` draws costs
one contraction plus, for each plan step with ``d`` own sample dims, ``d`` contractions
(and backward passes) of that step's inputs batched over ``S``: ``O(C + S * sum_j d_j
C_j)`` time and ``O(S * M_j)`` memory, with ``C_j``/``M_j`` the cost/largest tensor of
step ``j`` alone. ``batch_size`` bounds the memory. Clamped dims leave the factors, so
later contractions are cheaper.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..errors import TMCGraphError
from .backends.log import einsum as log_einsum
from .contract import contract, run_step
from .factor import Factor, FactorGraph
from .plan import plan_for
from .scan import sample_log_chain

__all__ = ["DRAWS", "dim_marginals", "sample_indices", "gather_particles"]

#: Name of the batch plate that holds the S posterior draws while sampling.
DRAWS = "_draws"


def dim_marginals(graph: FactorGraph, dims=None, strategy="auto", memory_limit=None, differentiable: bool = False):
    """Marginal of every particle index, by differentiating the contraction.

    For each sample dim ``d`` a zero log-weight ``u_d`` (dims ``(d,)``, plates
    ``graph.ordinals[d]``) joins the factors; ``d log Z / d u_d[k, e]`` is the probability
    that dim ``d`` takes index ``k`` at element ``e`` under ``pi(k) ∝ prod_f exp(f[k])``.

    Args:
        graph: The factor graph (its kept plate, if any, is an independent batch: the
            marginals are then per element of it).
        dims: Sample dims to report (default: every dim the factors use, except the
            ``prev_dim`` of Markov pairs, which are their dims one element earlier).
        strategy: Path strategy.
        memory_limit: Largest tensor (elements) for the planner.
        differentiable: Keep ``log Z`` attached to the factors' graph (the marginals
            themselves are always detached); otherwise the factors are detached first.

    Returns:
        ``(log_Z, marginals)``: the log of the sum-product, and a dict dim -> tensor
        ``[K_d, *sizes of its ordinal]`` whose entries sum to one over the first axis.

    Raises:
        TMCGraphError: unknown dims, or a sum-product that is zero (no combination
            carries weight, so the distribution is undefined).
    """
    used = graph.sample_dims
    dims = [d for d in used if d not in graph.prev_dims] if dims is None else list(dims)
    unknown = [d for d in dims if d not in used]
    if unknown:
        raise TMCGraphError(f"unknown sample dim(s) {unknown}; the factors use {used}")
    if not differentiable:
        graph = graph.detach()
    sizes = graph.sizes
    ref = graph.factors[0].tensor
    with torch.enable_grad():
        weights = {
            d: torch.zeros([sizes[d]] + [sizes[p] for p in graph.ordinals[d]], dtype=ref.dtype, device=ref.device,
                           requires_grad=True)
            for d in dims
        }
        g = graph.extend(Factor(f"_marginal_{d}", weights[d], (d,), tuple(graph.ordinals[d])) for d in dims)
        log_z = contract(plan_for(g, strategy, memory_limit), g.tensors)
        if not bool(torch.isfinite(log_z.detach()).all()):
            raise TMCGraphError(
                "the contraction is zero or not finite (log value "
                f"{log_z.detach().flatten()[:4].tolist()}): no particle combination carries weight, "
                "so the posterior over particles is undefined"
            )
        grads = torch.autograd.grad(log_z.sum(), [weights[d] for d in dims], retain_graph=differentiable) \
            if dims else []
    # A scaled plate (exponent c) multiplies d log Z / d u_d by c for the dims local to it;
    # the marginal is the per-element conditional, so divide the exponents back out.
    marg = {}
    for d, gr in zip(dims, grads):
        c = 1.0
        for p in graph.ordinals[d]:
            c *= graph.scales.get(p, 1.0)
        marg[d] = (gr.detach() / c if c != 1.0 else gr.detach()).clamp_min(0.0)
    return (log_z if differentiable else log_z.detach()), marg


def _place_index(k: torch.Tensor, k_plates: tuple, plates: tuple, sizes: dict, lead: int = 0) -> torch.Tensor:
    """Index ``k`` (``[S, *k_plates]``) in the layout ``[1]*lead + [S, *plates]``, expanded over ``plates``."""
    order = [p for p in plates if p in k_plates]
    if len(order) != len(k_plates):
        extra = [p for p in k_plates if p not in plates]
        raise TMCGraphError(f"index over plates {k_plates} cannot be placed in plates {plates} (extra {extra})")
    if tuple(order) != tuple(k_plates):
        k = k.permute([0] + [1 + k_plates.index(p) for p in order])
    shape = [k.shape[0]] + [sizes[p] if p in k_plates else 1 for p in plates]
    full = [k.shape[0]] + [sizes[p] for p in plates]
    return k.reshape([1] * lead + shape).expand([1] * lead + full)


def _clamp(f: Factor, d: str, k: torch.Tensor, k_plates: tuple, sizes: dict) -> Factor:
    """Select index ``k[s, e]`` of dim ``d`` in a factor laid out ``[*dims, DRAWS, *plates]``."""
    if d not in f.sample_dims:
        return f
    i = f.sample_dims.index(d)
    t = f.tensor
    plates = tuple(f.plates[1:])  # f.plates[0] is DRAWS
    shape = list(t.shape)
    shape[i] = 1
    ix = _place_index(k, k_plates, plates, sizes, lead=len(f.sample_dims)).expand(shape)
    out = torch.gather(t, i, ix).squeeze(i)
    return Factor(f.name, out, f.sample_dims[:i] + f.sample_dims[i + 1:], f.plates)


def sample_indices(
    graph: FactorGraph,
    S: int,
    generator: Optional[torch.Generator] = None,
    batch_size: Optional[int] = None,
    strategy="auto",
    memory_limit=None,
) -> dict:
    """Exact draws of particle indices from ``pi(k) ∝ prod_f exp(f[k])``.

    Backward sampling along the plan. One plain contraction records every step's
    result: the message from an ordinal to its parent, a function of the parent's dims
    summed over everything below. The steps are then visited root first. At a step,
    every dim from an enclosing ordinal is already drawn, so the step's inputs (its
    factors and its children's messages) with those dims clamped (index-selected per
    draw) are proportional to the conditional of the step's own dims, independently per
    plate element. The own dims are drawn one at a time, each from its conditional
    marginal (:func:`dim_marginals` with the draws as a kept batch plate :data:`DRAWS`).
    By the chain rule the joint draw is exact.

    Args:
        graph: The factor graph (no kept plate; detached here).
        S: Number of joint draws.
        generator: Generator for the draws (``None``: torch's global one). Draws depend
            on ``batch_size``.
        batch_size: Draws per batched contraction (bounds memory); default all ``S``,
            or with a ``memory_limit`` as many as keep every batched step input under it
            (at least one).
        strategy: Path strategy.
        memory_limit: Largest tensor for the planner of the one unbatched contraction;
            the batched ones are bounded through ``batch_size``.

    Returns:
        Dict dim -> LongTensor ``[S, *sizes of its ordinal]``.
    """
    if isinstance(S, bool) or int(S) != S or S < 1:
        raise TMCGraphError(f"S (number of posterior draws) must be a positive integer, got {S!r}")
    S = int(S)
    if batch_size is not None and (int(batch_size) != batch_size or batch_size < 1):
        raise TMCGraphError(f"batch_size must be a positive integer or None, got {batch_size!r}")
    if graph.keep is not None:
        raise TMCGraphError(f"sample_indices needs a graph without a kept plate, got keep={graph.keep!r}")
    graph = graph.detach()
    for f in graph.factors:
        if DRAWS in f.plates:
            raise TMCGraphError(f"factor {f.name!r} already uses the reserved plate {DRAWS!r}")
    groups = _step_inputs(graph, strategy, memory_limit)
    sizes = graph.sizes
    if batch_size is None and memory_limit is not None:
        per_draw = max(f.tensor.numel() for _, inputs in groups for f in inputs)
        batch_size = max(1, int(memory_limit) // max(per_draw, 1))
    B = S if batch_size is None else min(int(batch_size), S)
    chunks = []
    for start in range(0, S, B):
        n = min(B, S - start)
        drawn = {}
        for step, inputs in groups:
            chain = (step.markov[0], graph.markov[step.markov[0]]) if step.markov else None
            drawn.update(_sample_step(inputs, graph.ordinals, drawn, sizes, n, generator, strategy, chain))
        chunks.append(drawn)
    prev = graph.prev_dims
    return {d: torch.cat([c[d] for c in chunks], 0) for d in chunks[0] if d not in prev}


def _step_inputs(graph: FactorGraph, strategy, memory_limit) -> list:
    """Per plan step, root first: its inputs as factors (messages from child steps included)."""
    plan = plan_for(graph, strategy, memory_limit)
    slots = list(graph.factors)
    groups = []
    for i, step in enumerate(plan.steps):
        inputs = [slots[j] for j in step.inputs]
        groups.append((step, inputs))
        if i + 1 < len(plan.steps):
            msg = run_step(step, [f.tensor for f in inputs])
            slots.append(Factor(f"_message_{i}", msg, tuple(step.out_dims), tuple(step.out_plates)))
    return groups[::-1]


def _sample_step(inputs, ordinals, drawn, sizes, S, generator, strategy, chain=None) -> dict:
    """Draw the not-yet-drawn dims of one step's inputs given the drawn ones.

    ``chain``: ``(plate, pairs)`` for a step that multiplies out a Markov plate: its
    states are drawn first, jointly along the plate, by forward filtering and backward
    sampling (:func:`tmcgraph.ops.scan.sample_log_chain`) of the step's per-element
    log-matrices (its other own dims summed out); the rest given them, per element.
    """
    sizes = dict(sizes, **{DRAWS: S})
    work = []
    for f in inputs:
        t = f.tensor
        nd = len(f.sample_dims)
        t = t.unsqueeze(nd).expand(*t.shape[:nd], S, *t.shape[nd:])
        g = Factor(f.name, t, tuple(f.sample_dims), (DRAWS,) + tuple(f.plates))
        for d in f.sample_dims:
            if d in drawn:
                g = _clamp(g, d, drawn[d], tuple(ordinals[d]), sizes)
        work.append(g)
    out = {}
    if chain is not None:
        work, states = _sample_chain(work, ordinals, sizes, S, generator, chain)
        out.update(states)
    own = list(dict.fromkeys(d for f in work for d in f.sample_dims))
    lv = {d: (DRAWS,) + tuple(ordinals[d]) for d in own}
    for d in own:
        _, marg = dim_marginals(FactorGraph(tuple(work), lv, DRAWS), [d], strategy=strategy)
        m = marg[d]  # [K_d, S, *ordinals[d]]
        K = m.shape[0]
        probs = m.movedim(0, -1).reshape(-1, K)
        k = torch.multinomial(probs, 1, generator=generator).reshape(m.shape[1:])
        out[d] = k
        work = [_clamp(f, d, k, tuple(ordinals[d]), sizes) for f in work]
    return out


def _sample_chain(work, ordinals, sizes, S, generator, chain):
    """Draw a Markov step's states jointly (FFBS); return the clamped factors and the draws."""
    plate, pairs = chain
    present = {d for f in work for d in f.sample_dims}
    used = [(p, c) for p, c in pairs if p in present or c in present]
    prevs, curs = [p for p, _ in used], [c for _, c in used]
    lv = tuple(ordinals[curs[0]])
    rest = tuple(p for p in lv if p != plate)
    names = list(dict.fromkeys([DRAWS] + list(rest) + [plate] + prevs + curs
                               + [x for f in work for x in tuple(f.sample_dims) + tuple(f.plates)]))
    if len(names) > 52:
        raise TMCGraphError(f"too many dims and plates ({len(names)}) to sample Markov plate {plate!r}")
    sym = {x: "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"[i] for i, x in enumerate(names)}
    terms = ["".join(sym[x] for x in tuple(f.sample_dims) + tuple(f.plates)) for f in work]
    out_names = [DRAWS] + list(rest) + [plate] + prevs + curs
    m = log_einsum(",".join(terms) + "->" + "".join(sym[x] for x in out_names), *[f.tensor for f in work])
    K = 1
    for c in curs:
        K *= sizes[c]
    lead = m.shape[:2 + len(rest)]
    m = m.reshape(*lead, K, K)  # [DRAWS, *rest, T, K, K]
    path = sample_log_chain(m, generator)  # [DRAWS, *rest, T + 1]: the extra first index, then k_0 .. k_{T-1}
    flat_cur, flat_prev = path[..., 1:], path[..., :-1]
    out = {}
    sz = [sizes[c] for c in curs]
    for i, (p, c) in enumerate(used):
        div = 1
        for k in sz[i + 1:]:
            div *= k
        for name, flat in ((c, flat_cur), (p, flat_prev)):
            k = (flat // div) % sz[i]
            # layout [S, *ordinal] with the plate at its place in the ordinal
            k = k.movedim(-1, 1 + lv.index(plate)) if len(rest) else k
            out[name] = k
    for d, k in out.items():
        work = [_clamp(f, d, k, lv, dict(sizes, **{DRAWS: S})) for f in work]
    return work, out


def gather_particles(values: torch.Tensor, index: torch.Tensor, index_plates: tuple, plates: tuple) -> torch.Tensor:
    """Particles at drawn indices: ``out[s, e, ...] = values[index[s, e|index_plates], e, ...]``.

    Args:
        values: Particles ``[K, *plate sizes, *event]``.
        index: LongTensor ``[S, *sizes of index_plates]``.
        index_plates: Plates of the index (a subset of ``plates``).
        plates: Plates of ``values``.

    Returns:
        ``[S, *plate sizes, *event]``.
    """
    sizes = dict(zip(plates, values.shape[1:1 + len(plates)]))
    ix = _place_index(index, tuple(index_plates), tuple(plates), sizes)
    ev = values.dim() - 1 - len(plates)
    ix = ix.reshape(*ix.shape, *([1] * ev)).expand(ix.shape[0], *values.shape[1:])
    return torch.gather(values, 0, ix)
