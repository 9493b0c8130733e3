"""Planning a plated sum-product contraction of a :class:`~tmcgraph.ops.factor.FactorGraph`.

Factors live at *ordinals* (:mod:`tmcgraph.ops.ordinals`), which form a tree under
inclusion. Elimination runs from the leaves up, as in the paper's Fig. 2: at ordinal S,
every sample dim that is local to a plate in S but not to its parent ordinal is summed
out (one contraction, batched over the plates of S), then the plates S \\ parent(S) are
multiplied out (a sum of logs). The result joins the parent ordinal's inputs. Loopy
graphs (Fig. 1) are just contractions with cycles.

Each step's pairwise order comes from a ``PathOptimizer`` (:mod:`tmcgraph.ops.paths`;
strategy ``"auto"`` by default). With ``memory_limit`` (elements) no tensor the
contraction allocates or reads is larger than the limit: paths are chosen to fit, and
where none does, contracted indices are sliced (:mod:`tmcgraph.ops.slicing`).

Planning is separate from execution (as opt_einsum's ``contract_expression``): a
:class:`Plan` is made once per structure (layouts, shapes, ordinals, kept plate),
strategy and limit, and kept in a bounded LRU cache (:func:`plan_cache_info` counts the
path searches); :func:`tmcgraph.ops.contract.contract` runs it on any tensors of that
structure.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import opt_einsum as oe
from opt_einsum.paths import ssa_to_linear

from ..errors import TMCGraphError
from .factor import FactorGraph
from .ordinals import ordinal_tree, why_not_keep
from .paths import STRATEGIES, get_optimizer, simulate
from .slicing import slice_to_fit

__all__ = ["Plan", "Step", "make_plan", "plan_for", "plan_cache_info", "plan_cache_clear", "STRATEGIES"]

_STATS = {"searches": 0}
#: Plans kept in the LRU cache.
CACHE_SIZE = 256


@dataclass(frozen=True)
class Step:
    """One ordinal's contraction.

    Attributes:
        ordinal: Plates of the inputs (``keep`` plate excluded).
        inputs: Slot indices of the inputs (factors first, then step results).
        equation: The einsum equation over sample dims and plates.
        path_info: ``opt_einsum`` path information of the chosen path (on sliced sizes).
        reduce_axes: Output axes (plates) multiplied out after the contraction.
        reduced_plates: Names of those plates.
        out_dims: Sample dims of the result.
        out_plates: Plates of the result.
        program: Pairwise operations ``(a, b, term_a, term_b, term_out, free)`` on SSA
            slots (``free``: slots read for the last time); executed by
            :func:`tmcgraph.ops.contract.contract`.
        sliced: ``(name, size, axes)`` per sliced index; ``axes[i]`` is its axis in input
            ``i`` (or ``None``).
        largest: Largest tensor (elements) the step allocates or reads per slice.
        scale: Exponent of the product over the reduced plates (the product of their
            scales; 1 without subsampled plates).
        markov: ``()``, or for a step that multiplies out a Markov plate
            ``(plate, n_out, state_sizes, time_axis)``: the contraction's result is laid
            out ``[*out_dims, *prev states, *states, *plates]`` and the plate (axis
            ``time_axis``) is multiplied out as a chain over the flattened states
            (:func:`tmcgraph.ops.scan.log_chain_vector`) before ``reduce_axes`` (then
            counted in the layout without the states and that plate) are.
    """

    ordinal: tuple
    inputs: tuple
    equation: str
    path_info: object
    reduce_axes: tuple
    reduced_plates: tuple
    out_dims: tuple
    out_plates: tuple
    program: tuple = ()
    sliced: tuple = ()
    largest: int = 0
    scale: float = 1.0
    markov: tuple = ()

    @property
    def n_slices(self) -> int:
        """Number of slices the step runs (1 when nothing is sliced)."""
        return math.prod(n for _, n, _ in self.sliced)


@dataclass(frozen=True)
class Plan:
    """A compiled contraction: steps in elimination order; the last one is the result.

    Attributes:
        steps: The :class:`Step` list.
        n_inputs: Number of factor tensors expected.
        keep: Plate left un-multiplied (per-element results), or ``None``.
        strategy: The path strategy used.
        memory_limit: The memory limit (elements) the plan respects, or ``None``.
        keep_scale: The scale of the kept plate (its per-element values are multiplied
            by it), 1 when it has none.
        structure: ``(sample dims, plates, shape)`` of every input factor.
    """

    steps: tuple
    n_inputs: int
    keep: object
    strategy: str
    memory_limit: object = field(default=None)
    keep_scale: float = 1.0
    structure: tuple = ()

    @property
    def cost(self) -> int:
        """Estimated floating point operations (opt_einsum's cost model, times the slices)."""
        return int(sum(int(s.path_info.opt_cost) * s.n_slices for s in self.steps))

    @property
    def largest_intermediate(self) -> int:
        """Elements of the largest intermediate tensor over all steps (per slice)."""
        return int(max(int(s.path_info.largest_intermediate) for s in self.steps))

    @property
    def largest_tensor(self) -> int:
        """Elements of the largest tensor any step allocates or reads (per slice)."""
        return int(max(s.largest for s in self.steps))

    def __str__(self) -> str:
        lines = [
            f"Plan: {len(self.steps)} step(s), strategy={self.strategy!r}, keep={self.keep!r}, "
            f"cost={self.cost:.3g} flops, largest intermediate={self.largest_intermediate} elements"
        ]
        for i, s in enumerate(self.steps):
            sl = f"; sliced over {[(n, k) for n, k, _ in s.sliced]}" if s.sliced else ""
            chain = f"; Markov plate {s.markov[0]!r} as a chain over states {list(s.markov[2])}" if s.markov else ""
            lines.append(
                f"  step {i}: plates {list(s.ordinal)} inputs {list(s.inputs)}: {s.equation}; "
                f"path {s.path_info.path}{sl}{chain}; then multiply out plates {list(s.reduced_plates)}"
                f" -> dims {list(s.out_dims)} plates {list(s.out_plates)}"
            )
            for c in s.path_info.contraction_list:
                lines.append(f"      {c[2]}")
        return "\n".join(lines)


def plan_for(graph: FactorGraph, strategy="auto", memory_limit=None) -> Plan:
    """The cached :class:`Plan` of a factor graph (its layouts, shapes, ordinals and kept plate).

    Args:
        graph: The :class:`~tmcgraph.ops.factor.FactorGraph`.
        strategy: A name from :data:`STRATEGIES` or an opt_einsum ``PathOptimizer``.
        memory_limit: Largest tensor (elements) the contraction may allocate or read at
            once (``None``: no limit).

    Raises:
        TMCGraphError: unknown strategy, bad limit, non-nested plates, a kept plate some
            factor or sample dim lies outside, or a memory limit that no slicing can meet.
    """
    factors, ordinals, keep, scales, markov = graph.structure()
    return make_plan(factors, ordinals, keep, strategy, memory_limit, scales, markov)


def make_plan(structure: tuple, ordinals: tuple, keep=None, strategy="auto", memory_limit=None, scales=(),
              markov=()) -> Plan:
    """Plan a plated log-space contraction from its structure alone (no tensors).

    Args:
        structure: One ``(sample dims, plates, shape)`` per factor.
        ordinals: ``(sample dim, plates it is local to)`` pairs.
        keep: A plate to keep in the result (per-element values), or ``None``.
        strategy: A name from :data:`STRATEGIES` or an opt_einsum ``PathOptimizer``.
        memory_limit: Largest tensor (elements), or ``None``.
        scales: ``(plate, exponent)`` pairs (see :class:`~tmcgraph.ops.factor.FactorGraph`).
        markov: ``(plate, ((prev_dim, dim), ...))`` pairs: Markov plates (see
            :class:`~tmcgraph.ops.factor.FactorGraph`).

    Returns:
        The :class:`Plan` (cached).
    """
    get_optimizer(strategy)  # reject unknown names before the cache sees them
    if memory_limit is not None and (isinstance(memory_limit, bool) or int(memory_limit) != memory_limit
                                     or memory_limit < 1):
        raise TMCGraphError(f"memory_limit must be a positive number of elements or None, got {memory_limit!r}")
    markov = tuple(sorted((p, tuple(tuple(x) for x in pairs)) for p, pairs in dict(markov).items()))
    return _cached_plan(structure, ordinals, keep, strategy, None if memory_limit is None else int(memory_limit),
                        tuple(sorted(dict(scales).items())), markov)


def plan_cache_info():
    """``functools.lru_cache`` statistics and the number of path searches run."""
    return {"searches": _STATS["searches"], **_cached_plan.cache_info()._asdict()}


def plan_cache_clear() -> None:
    """Empty the plan cache and reset the search counter."""
    _cached_plan.cache_clear()
    _STATS["searches"] = 0


def _program(pairs, inputs, out, sizes):
    """The pairwise program ``((a, b, term_a, term_b, term_out, free), ...)`` on SSA slots.

    ``b`` (and ``term_b``) is ``None`` for a single-operand reduction; ``free`` lists the
    slots read for the last time (released after the operation, to bound memory).
    """
    res_terms, _, _ = simulate(pairs, inputs, out, sizes)
    terms = list(inputs) + res_terms
    prog = []
    for con, res in zip(pairs, res_terms):
        b = con[1] if len(con) == 2 else None
        prog.append((con[0], b, terms[con[0]], None if b is None else terms[b], res))
    if not pairs:
        prog.append((0, None, inputs[0], None, out))
    last = {}
    for k, (a, b, *_) in enumerate(prog):
        last[a] = k
        if b is not None:
            last[b] = k
    return tuple((a, b, ta, tb, to, tuple(i for i in (a, b) if i is not None and last[i] == k))
                 for k, (a, b, ta, tb, to) in enumerate(prog))


def _sizes(structure) -> tuple:
    """Size of every dim and plate, and the plates in order of first use."""
    sizes, plate_order = {}, []
    for dims, plates, shape in structure:
        for name, n in zip(dims + plates, shape):
            if sizes.setdefault(name, n) != n:
                raise TMCGraphError(f"dim {name!r} has inconsistent sizes {sizes[name]} and {n} across factors")
        for p in plates:
            if p not in plate_order:
                plate_order.append(p)
    return sizes, plate_order


@functools.lru_cache(maxsize=CACHE_SIZE)
def _cached_plan(structure, ordinals, keep, strategy, memory_limit, scales=(), markov=()) -> Plan:
    """Make the plan of one structure (see :func:`make_plan`); memoised, bounded.

    Builds the ordinal tree, then one :class:`Step` per non-empty ordinal, leaves first:
    the step's inputs (factors at that ordinal and child steps' results), the dims it
    sums (local to it but not to its parent), its path and slicing, and its program.
    """
    _STATS["searches"] += 1
    ordinals = dict(ordinals)
    scales = dict(scales)
    markov = dict(markov)
    state_of = {d: (p, i, role) for p, pairs in markov.items() for i, pair in enumerate(pairs)
                for role, d in zip(("prev", "cur"), pair)}

    def scale_of(plates):
        return math.prod(scales.get(p, 1.0) for p in plates)
    optimizer = get_optimizer(strategy)
    sizes, plate_order = _sizes(structure)
    if keep is not None:
        why = why_not_keep([(i, pl) for i, (_, pl, _) in enumerate(structure)], ordinals, keep)
        if why:
            raise TMCGraphError(f"cannot keep plate {keep!r} per element: {why}")
    def ordinal(plates):
        return frozenset(p for p in plates if p != keep)

    # A factor's plates that none of its sample dims is local to can be multiplied out
    # at once (its value does not depend on their elements' indices): the factor then
    # lives at the plates its dims are local to. This is what makes crossed plates
    # contractable when one side's latents share a sample dim across their plate.
    lives = []
    for dims, plates, _ in structure:
        local = set().union(*(ordinals[d] for d in dims)) if dims else set()
        lives.append(tuple(p for p in plates if p in local or p == keep))
    tree, parent = ordinal_tree(lives, ordinals, keep)

    symbols = {name: oe.get_symbol(i) for i, name in enumerate(sizes)}
    sym_sizes = {symbols[k]: v for k, v in sizes.items()}
    names = {v: k for k, v in symbols.items()}

    def term(dims, plates):
        return "".join(symbols[x] for x in dims + plates)

    pending = {S: [] for S in tree}  # ordinal -> [(slot, dims, plates)]
    steps = []
    slot = len(structure)
    for i, (dims, plates, _) in enumerate(structure):
        if lives[i] == tuple(plates) or ordinal(lives[i]) == ordinal(plates):
            pending[ordinal(plates)].append((i, dims, plates))
            continue
        # A pre-step: multiply out the plates the factor's dims are not local to.
        t_in = term(dims, plates)
        out_plates = tuple(p for p in plate_order if p in lives[i])
        kept_plates = tuple(p for p in plate_order if p in plates)
        t_out = term(dims, kept_plates)
        shape = tuple(sizes[x] for x in dims + plates)
        if memory_limit is not None and math.prod(shape) > memory_limit:
            raise TMCGraphError(
                f"memory_limit={memory_limit} elements cannot be met: an input factor over {list(dims + plates)} "
                f"has {math.prod(shape)} elements and no summed index to slice; raise the limit"
            )
        _, info = oe.contract_path(f"{t_in}->{t_out}", shape, shapes=True)
        reduced = tuple(p for p in kept_plates if p not in out_plates)
        steps.append(Step(tuple(sorted(ordinal(plates))), (i,), f"{t_in}->{t_out}", info,
                          tuple(len(dims) + kept_plates.index(p) for p in reduced), reduced, tuple(dims), out_plates,
                          _program([], [t_in], t_out, sym_sizes), (), int(math.prod(shape)), scale_of(reduced)))
        pending[ordinal(out_plates)].append((slot, tuple(dims), out_plates))
        slot += 1
    for S in sorted(tree, key=lambda T: (-len(T), sorted(T))):
        items = pending[S]
        if not items:
            continue
        P = parent.get(S)
        up = frozenset() if P is None else P
        kept_plates = tuple(p for p in plate_order if p in S or p == keep)
        out_plates = tuple(p for p in plate_order if p in up or p == keep)
        in_dims = list(dict.fromkeys(d for _, dims, _ in items for d in dims))
        out_dims = () if P is None else tuple(d for d in in_dims if ordinal(ordinals[d]) <= up)
        reduced = tuple(p for p in kept_plates if p not in out_plates)
        chain, states = (), ()
        summed_states = [d for d in in_dims if d in state_of and d not in out_dims]
        if summed_states:
            plates_m = sorted({state_of[d][0] for d in summed_states})
            if len(plates_m) > 1 or plates_m[0] not in reduced:
                raise TMCGraphError(
                    f"Markov dims {summed_states} (plates {plates_m}) would be summed at a step that multiplies "
                    f"out plates {list(reduced)}: a Markov plate's states must be summed where that plate is "
                    "multiplied out (one Markov plate per step; states local to no other inner plate)")
            pm = plates_m[0]
            pairs = markov[pm]
            used = sorted({state_of[d][1] for d in summed_states})
            prevs = tuple(pairs[i][0] for i in used)
            curs = tuple(pairs[i][1] for i in used)
            missing = [d for d in prevs + curs if d not in in_dims]
            if missing:
                raise TMCGraphError(f"Markov plate {pm!r}: dims {missing} of its pairs are used by no factor of "
                                    f"the step that multiplies it out (it uses {in_dims})")
            if len({tuple(ordinals[d]) for d in prevs + curs}) > 1:
                raise TMCGraphError(f"Markov plate {pm!r}: the states {list(curs)} of one chain need one ordinal")
            states = prevs + curs
            state_sizes = tuple(sizes[d] for d in curs)
            rest = tuple(p for p in kept_plates if p != pm)
            chain = (pm, len(out_dims), state_sizes, len(out_dims) + len(states) + kept_plates.index(pm))
            reduce_after = tuple(len(out_dims) + rest.index(p) for p in reduced if p != pm)
        in_terms = [term(dims, plates) for _, dims, plates in items]
        out_term = term(out_dims + states, kept_plates)
        eq = ",".join(in_terms) + "->" + out_term
        pairs, sliced, _, largest = slice_to_fit(optimizer, in_terms, out_term, sym_sizes, memory_limit, names)
        local = {c: (1 if c in sliced else n) for c, n in sym_sizes.items()}
        ssa = [tuple(c) for c in pairs]
        try:
            _, info = oe.contract_path(eq, *[tuple(local[c] for c in t) for t in in_terms], shapes=True,
                                       optimize=[tuple(c) for c in ssa_to_linear(ssa)])
        except Exception as e:  # noqa: BLE001  # pragma: no cover
            raise TMCGraphError(f"opt_einsum could not cost {eq!r}: {e}") from e
        program = _program(pairs, in_terms, out_term, local)
        sl = tuple((names[c], sym_sizes[c], tuple(t.index(c) if c in t else None for t in in_terms))
                   for c in sliced)
        if chain:
            reduce_axes = reduce_after
        else:
            reduce_axes = tuple(len(out_dims) + kept_plates.index(p) for p in reduced)
        steps.append(
            Step(tuple(sorted(S)), tuple(i for i, _, _ in items), eq, info, reduce_axes, reduced, out_dims,
                 out_plates, program, sl, int(largest), scale_of(reduced), chain)
        )
        if P is not None:
            pending[P].append((slot, out_dims, out_plates))
        slot += 1
    return Plan(tuple(steps), len(structure), keep, strategy, memory_limit, scales.get(keep, 1.0), tuple(structure))
