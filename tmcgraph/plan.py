"""Planning a plated sum-product contraction.

The factors of a TMC estimate live at *ordinals*: the set of plates each factor is in.
Ordinals must form a tree under inclusion (nested plates). Elimination runs from the
leaves up, as in the paper's Fig. 2: at ordinal S, every sample dim that is local to a
plate in S but not to its parent ordinal is summed out (one contraction, batched over
the plates of S), then the plates S \\ parent(S) are multiplied out (a sum of logs).
The result joins the parent ordinal's inputs. Loopy graphs (Fig. 1) are just
contractions with cycles.

Paths. For each step the planner picks a pairwise contraction order. Strategy
``"auto"`` takes the cheapest (fewest estimated flops, opt_einsum's cost model) of
opt_einsum's ``"auto"`` path and two greedy variable-elimination orders (eliminate next
the index whose elimination makes the smallest tensor, or costs least). Elimination
orders are optimal on trees such as chains (vector-matrix products, ``O(n K^2)``), which
pairwise greedy searches over many operands often miss (matrix-matrix products,
``O(n K^3)``). Disconnected components are contracted separately and only their
results are combined. Other strategies use that opt_einsum optimizer alone.

Memory. With ``memory_limit`` (elements), no tensor the contraction allocates is larger
than the limit: every pairwise result and every input a pairwise step reads (the
backend's temporaries are at most the size of an operand or a result). If no path
fits, contracted indices are *sliced*: the step runs once per value of the sliced
indices, on views of the inputs, and the results are summed in log space (with
gradient checkpointing per slice under autograd, so saved activations stay bounded
too). If even slicing every contracted index does not fit (the step's result or an
input factor alone exceeds the limit), or it would take more than :data:`MAX_SLICES`
slices, planning raises :class:`TMCGraphError` naming the largest tensor, before
anything is allocated.

A :class:`Plan` is compiled once per structure and shapes and kept in a bounded LRU
cache (:func:`plan_cache_info` counts the path searches); executing it is
:func:`tmcgraph.contract.contract`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import opt_einsum as oe
from opt_einsum.paths import linear_to_ssa, ssa_to_linear

from .errors import TMCGraphError

__all__ = ["Plan", "Step", "make_plan", "plan_for", "plan_cache_info", "plan_cache_clear", "STRATEGIES"]

#: Path strategies accepted by ``make_plan``.
STRATEGIES = ("auto", "auto-hq", "optimal", "dp", "greedy", "branch-all", "branch-2", "branch-1", "random-greedy")

_STATS = {"searches": 0}
_CACHE_SIZE = 256
#: A step needing more slices than this to meet the memory limit is refused.
MAX_SLICES = 1 << 16


@dataclass(frozen=True)
class Step:
    """One ordinal's contraction.

    Attributes:
        ordinal: Plates of the inputs (``keep`` plate excluded).
        inputs: Slot indices of the inputs (factors first, then step results).
        equation: The einsum equation over sample dims and plates.
        expression: An equivalent compiled ``opt_einsum`` expression (unsliced).
        path_info: ``opt_einsum`` path information of the chosen path (on sliced sizes).
        reduce_axes: Output axes (plates) multiplied out after the contraction.
        reduced_plates: Names of those plates.
        out_dims: Sample dims of the result.
        out_plates: Plates of the result.
        program: Pairwise operations ``(a, b, term_a, term_b, term_out, free)`` on SSA
            slots (``free``: slots read for the last time); executed by
            :func:`tmcgraph.contract.contract`.
        sliced: ``(name, size, axes)`` per sliced index; ``axes[i]`` is its axis in input
            ``i`` (or ``None``).
        largest: Largest tensor (elements) the step allocates or reads per slice.
    """

    ordinal: tuple
    inputs: tuple
    equation: str
    expression: object
    path_info: object
    reduce_axes: tuple
    reduced_plates: tuple
    out_dims: tuple
    out_plates: tuple
    program: tuple = ()
    sliced: tuple = ()
    largest: int = 0

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
    """

    steps: tuple
    n_inputs: int
    keep: object
    strategy: str
    memory_limit: object = field(default=None)

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
            lines.append(
                f"  step {i}: plates {list(s.ordinal)} inputs {list(s.inputs)}: {s.equation}; "
                f"path {s.path_info.path}{sl}; then multiply out plates {list(s.reduced_plates)}"
                f" -> dims {list(s.out_dims)} plates {list(s.out_plates)}"
            )
            for c in s.path_info.contraction_list:
                lines.append(f"      {c[2]}")
        return "\n".join(lines)


def plan_cache_info():
    """``functools.lru_cache`` statistics and the number of path searches run."""
    return {"searches": _STATS["searches"], **_cached_plan.cache_info()._asdict()}


def plan_cache_clear() -> None:
    """Empty the plan cache and reset the search counter."""
    _cached_plan.cache_clear()
    _STATS["searches"] = 0


def plan_for(factors, levels: dict, keep=None, strategy: str = "auto", memory_limit=None) -> Plan:
    """The cached :class:`Plan` for a list of factors (anything with ``dims``, ``plates``, ``tensor``)."""
    structure = tuple((f.dims, f.plates, tuple(f.tensor.shape)) for f in factors)
    used = {d for f in factors for d in f.dims}
    lv = tuple(sorted((d, tuple(levels[d])) for d in used))
    return make_plan(structure, lv, keep, strategy, memory_limit)


def make_plan(structure: tuple, levels: tuple, keep=None, strategy: str = "auto", memory_limit=None) -> Plan:
    """Plan a plated log-space contraction.

    Args:
        structure: One ``(dims, plates, shape)`` per factor.
        levels: ``(dim, plates the dim is local to)`` pairs.
        keep: A plate to keep in the result (per-element values), or ``None``.
        strategy: Path strategy, one of :data:`STRATEGIES`.
        memory_limit: Largest tensor (elements) the contraction may allocate or read at
            once (``None``: no limit). Enforced by slicing; see the module docstring.

    Returns:
        The compiled :class:`Plan` (cached).

    Raises:
        TMCGraphError: unknown strategy, inconsistent shapes, non-nested plates, or a
            memory limit that no slicing can meet.
    """
    if strategy not in STRATEGIES:
        raise TMCGraphError(f"unknown path strategy {strategy!r}; choose one of {STRATEGIES}")
    if memory_limit is not None and (int(memory_limit) != memory_limit or memory_limit < 1):
        raise TMCGraphError(f"memory_limit must be a positive number of elements or None, got {memory_limit!r}")
    return _cached_plan(structure, levels, keep, strategy, None if memory_limit is None else int(memory_limit))


def _size(term, sizes) -> int:
    return math.prod(sizes[c] for c in term)


def _ve_path(inputs, output, sizes, key):
    """Greedy variable elimination order as an SSA pairwise path.

    Repeatedly eliminates the index with the smallest ``key(result size, union size)``:
    the terms holding it are contracted pairwise (smallest first), keeping only indices
    still needed by other terms or the output. Components end as separate terms, which
    are multiplied last (smallest first).
    """
    terms = {i: frozenset(t) for i, t in enumerate(inputs)}
    where = {}
    for i, t in terms.items():
        for c in t:
            where.setdefault(c, set()).add(i)
    out = frozenset(output)
    nxt = len(inputs)
    path = []

    def needed(c, excl):
        return c in out or bool(where[c] - excl)

    def merge(ids):
        nonlocal nxt
        ids = set(ids)
        u = frozenset().union(*(terms[i] for i in ids))
        res = frozenset(c for c in u if needed(c, ids))
        for i in ids:
            for c in terms.pop(i):
                where[c].discard(i)
        terms[nxt] = res
        for c in res:
            where[c].add(nxt)
        path.append(tuple(sorted(ids)))
        nxt += 1
        return nxt - 1

    while True:
        best = None
        for v, ids in where.items():
            if v in out or not ids:
                continue
            u = frozenset().union(*(terms[i] for i in ids))
            res = [c for c in u if c != v and needed(c, ids)]
            score = key(_size(res, sizes), _size(u, sizes))
            if best is None or score < best[0]:
                best = (score, v)
        if best is None:
            break
        ids = sorted(where[best[1]], key=lambda i: (_size(terms[i], sizes), i))
        if len(ids) == 1:
            merge(ids)
            continue
        cur = ids[0]
        for i in ids[1:]:
            cur = merge([cur, i])
    rest = sorted(terms, key=lambda i: (_size(terms[i], sizes), i))
    if len(rest) > 1:
        cur = rest[0]
        for i in rest[1:]:
            cur = merge([cur, i])
    return path


def _renumber(ssa_path, n):
    """Pairwise SSA path equivalent to ``ssa_path`` (multi-operand steps split left to right)."""
    out = []
    alias = {}
    nxt = n
    for k, con in enumerate(ssa_path):
        con = [alias.get(i, i) for i in con]
        if len(con) <= 2:
            out.append(tuple(con))
            res = nxt
            nxt += 1
        else:
            cur = con[0]
            for i in con[1:]:
                out.append((cur, i))
                cur = nxt
                nxt += 1
            res = cur
        alias[n + k] = res
    return out


def _simulate(ssa_pairs, terms, out, sizes):
    """Result terms, estimated cost and largest tensor of a pairwise SSA path."""
    terms = list(terms)
    alive = set(range(len(terms)))
    where = {}
    for i, t in enumerate(terms):
        for c in t:
            where.setdefault(c, set()).add(i)
    cost = 0
    largest = max([_size(t, sizes) for t in terms] + [1])
    res_terms = []
    outset = set(out)
    for con in ssa_pairs:
        ids = set(con)
        u = "".join(dict.fromkeys("".join(terms[i] for i in con)))
        last = len(alive) == len(con)
        if last:
            res = out
        else:
            res = "".join(c for c in u if c in outset or (where.get(c, set()) - ids))
        inner = any(c not in res for c in u)
        cost += _size(u, sizes) * (max(1, len(con) - 1) + (1 if inner else 0))
        for i in con:
            alive.discard(i)
            for c in terms[i]:
                where[c].discard(i)
        terms.append(res)
        k = len(terms) - 1
        alive.add(k)
        for c in res:
            where.setdefault(c, set()).add(k)
        largest = max(largest, _size(res, sizes))
        res_terms.append(res)
    return res_terms, cost, largest


def _candidates(inputs, out, sizes, strategy, memory_limit):
    """Candidate SSA paths (any arity per step) for one step."""
    n = len(inputs)
    if n == 1:
        return [[(0,)]]
    cands = []
    oe_strategy = "auto" if strategy == "auto" else strategy
    try:
        if oe_strategy == "random-greedy":
            from opt_einsum.path_random import RandomGreedy

            opt = RandomGreedy(max_repeats=32)
        else:
            opt = oe_strategy
        path, _ = oe.contract_path(
            ",".join(inputs) + "->" + out, *[tuple(sizes[c] for c in t) for t in inputs], shapes=True,
            optimize=opt, memory_limit=memory_limit,
        )
        cands.append([tuple(sorted(c)) for c in linear_to_ssa(path)])
    except Exception as e:  # pragma: no cover - opt_einsum failures are reported only if nothing else works
        if strategy != "auto":
            raise TMCGraphError(f"opt_einsum could not plan {','.join(inputs)}->{out}: {e}") from e
    if strategy == "auto":
        cands.append(_ve_path(inputs, out, sizes, lambda r, u: (r, u)))
        cands.append(_ve_path(inputs, out, sizes, lambda r, u: (u, r)))
    return cands


#: Steps estimated to cost more flops than this get extra path candidates under "auto".
_PROBE_COST = 10**7


def _probe_paths(inputs, out, sizes, memory_limit):
    """Greedy paths planned with one summed index at a time set to size 1.

    Pretending an index is free changes which pairs the greedy search joins first; on
    loopy graphs (lattices) the resulting orders, costed at the true sizes, are often
    several times cheaper than plain greedy.
    """
    paths = []
    for c in dict.fromkeys("".join(inputs)):
        if c in out or sizes[c] == 1:
            continue
        loc = dict(sizes)
        loc[c] = 1
        try:
            path, _ = oe.contract_path(",".join(inputs) + "->" + out, *[tuple(loc[x] for x in t) for t in inputs],
                                       shapes=True, optimize="greedy", memory_limit=memory_limit)
        except Exception:  # pragma: no cover
            continue
        paths.append([tuple(sorted(c)) for c in linear_to_ssa(path)])
    return paths


def _best_path(inputs, out, sizes, strategy, memory_limit, probe=True):
    best = None
    cands = _candidates(inputs, out, sizes, strategy, memory_limit)
    scored = []
    for ssa in cands:
        pairs = _renumber(ssa, len(inputs))
        _, cost, largest = _simulate(pairs, inputs, out, sizes)
        scored.append((ssa, pairs, cost, largest))
    if probe and strategy == "auto" and len(inputs) > 4 and min(c for _, _, c, _ in scored) > _PROBE_COST:
        for ssa in _probe_paths(inputs, out, sizes, memory_limit):
            pairs = _renumber(ssa, len(inputs))
            _, cost, largest = _simulate(pairs, inputs, out, sizes)
            scored.append((ssa, pairs, cost, largest))
    for ssa, pairs, cost, largest in scored:
        fits = memory_limit is None or largest <= memory_limit
        score = (not fits, cost if fits else largest, cost)
        if best is None or score < best[0]:
            best = (score, ssa, pairs, cost, largest)
    return best[1:]


def _plan_step(inputs, out, sizes, strategy, memory_limit, names=None):
    """Path (and sliced indices) for one step: ``(ssa, pairs, sliced names, cost, largest)``."""
    ssa, pairs, cost, largest = _best_path(inputs, out, sizes, strategy, memory_limit)
    first_largest = largest
    sliced = []
    if memory_limit is not None and largest > memory_limit:
        local = dict(sizes)
        contracted = [c for c in dict.fromkeys("".join(inputs)) if c not in out]
        while largest > memory_limit:
            options = [c for c in contracted if local[c] > 1]
            if not options:
                big = max([(_size(t, local), t) for t in inputs] + [(_size(out, sizes), out)])
                nm = names or {}
                what = "the step's result" if big[1] == out else "an input factor"
                raise TMCGraphError(
                    f"memory_limit={memory_limit} elements cannot be met: even with every summed index sliced, "
                    f"{what} over {[nm.get(c, c) for c in big[1]]} has {big[0]} elements; raise the limit"
                )
            trial = []
            for c in options:
                loc2 = dict(local)
                loc2[c] = 1
                t_ssa, t_pairs, t_cost, t_largest = _best_path(inputs, out, loc2, strategy, memory_limit, False)
                n_sl = math.prod(sizes[s] for s in sliced + [c])
                trial.append(((t_largest > memory_limit, t_largest if t_largest > memory_limit else 0,
                               t_cost * n_sl), c, t_ssa, t_pairs, t_cost, t_largest))
            trial.sort(key=lambda r: r[0])
            _, c, ssa, pairs, cost, largest = trial[0]
            local[c] = 1
            sliced.append(c)
            n_slices = math.prod(sizes[x] for x in sliced)
            if n_slices > MAX_SLICES:
                raise TMCGraphError(
                    f"memory_limit={memory_limit} elements is too small: meeting it needs more than {MAX_SLICES} "
                    f"slices (the best unsliced path's largest intermediate has {first_largest} elements); "
                    "raise the limit"
                )
    return ssa, pairs, sliced, cost, largest


def _program(pairs, inputs, out, sizes):
    """The pairwise program ``((a, b, term_a, term_b, term_out, free), ...)`` on SSA slots.

    ``b`` (and ``term_b``) is ``None`` for a single-operand reduction; ``free`` lists the
    slots read for the last time (released after the operation, to bound memory).
    """
    res_terms, _, _ = _simulate(pairs, inputs, out, sizes)
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


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _cached_plan(structure, levels, keep, strategy, memory_limit) -> Plan:
    _STATS["searches"] += 1
    levels = dict(levels)
    sizes = {}
    plate_order = []
    for dims, plates, shape in structure:
        for name, n in zip(dims + plates, shape):
            if sizes.setdefault(name, n) != n:
                raise TMCGraphError(f"dim {name!r} has inconsistent sizes {sizes[name]} and {n} across factors")
        for p in plates:
            if p not in plate_order:
                plate_order.append(p)
    if keep is not None:
        outside = [i for i, (_, plates, _) in enumerate(structure) if keep not in plates]
        if outside:
            raise TMCGraphError(
                f"cannot keep plate {keep!r} per element: {len(outside)} factor(s) lie outside it"
            )
        bad = [d for d, lv in levels.items() if keep not in lv]
        if bad:
            raise TMCGraphError(f"cannot keep plate {keep!r} per element: sample dim(s) {bad} are shared across it")

    def ordinal(plates):
        return frozenset(p for p in plates if p != keep)

    ordinals = {frozenset()} | {ordinal(pl) for _, pl, _ in structure}
    parent = {}
    for S in ordinals:
        if not S:
            continue
        subs = sorted((T for T in ordinals if T < S), key=len)
        for a, b in zip(subs, subs[1:]):
            if not a < b:
                raise TMCGraphError(
                    f"plates are not nested: variables in plates {sorted(S)} also meet variables in "
                    f"{sorted(a)} and {sorted(b)}; nest the plates or add a variable in their union"
                )
        parent[S] = subs[-1]
    for d, lv in levels.items():
        if ordinal(lv) not in ordinals:
            raise TMCGraphError(f"sample dim {d!r} is local to plates {lv} where no factor lives")

    symbols = {}
    for name in list(sizes):
        symbols[name] = oe.get_symbol(len(symbols))
    sym_sizes = {symbols[k]: v for k, v in sizes.items()}
    names = {v: k for k, v in symbols.items()}

    def term(dims, plates):
        return "".join(symbols[x] for x in dims + plates)

    pending = {S: [] for S in ordinals}  # ordinal -> [(slot, dims, plates)]
    for i, (dims, plates, _) in enumerate(structure):
        pending[ordinal(plates)].append((i, dims, plates))
    steps = []
    slot = len(structure)
    for S in sorted(ordinals, key=lambda T: (-len(T), sorted(T))):
        items = pending[S]
        if not items:
            continue
        P = parent.get(S)
        up = frozenset() if P is None else P
        kept_plates = tuple(p for p in plate_order if p in S or p == keep)
        out_plates = tuple(p for p in plate_order if p in up or p == keep)
        in_dims = list(dict.fromkeys(d for _, dims, _ in items for d in dims))
        out_dims = () if P is None else tuple(d for d in in_dims if ordinal(levels[d]) <= up)
        in_terms = [term(dims, plates) for _, dims, plates in items]
        out_term = term(out_dims, kept_plates)
        eq = ",".join(in_terms) + "->" + out_term
        shapes = [tuple(sizes[x] for x in dims + plates) for _, dims, plates in items]
        ssa, pairs, sliced, _, largest = _plan_step(in_terms, out_term, sym_sizes, strategy, memory_limit, names)
        local = {c: (1 if c in sliced else n) for c, n in sym_sizes.items()}
        linear = [tuple(c) for c in ssa_to_linear(ssa)]
        try:
            _, info = oe.contract_path(eq, *[tuple(local[c] for c in t) for t in in_terms], shapes=True,
                                       optimize=linear)
            expr = oe.contract_expression(eq, *shapes, optimize=linear)
        except Exception as e:  # pragma: no cover
            raise TMCGraphError(f"opt_einsum could not plan {eq!r} with shapes {shapes}: {e}") from e
        program = _program(pairs, in_terms, out_term, local)
        sl = tuple((names[c], sym_sizes[c], tuple(t.index(c) if c in t else None for t in in_terms))
                   for c in sliced)
        reduced = tuple(p for p in kept_plates if p not in out_plates)
        reduce_axes = tuple(len(out_dims) + kept_plates.index(p) for p in reduced)
        steps.append(
            Step(tuple(sorted(S)), tuple(i for i, _, _ in items), eq, expr, info, reduce_axes, reduced, out_dims,
                 out_plates, program, sl, int(largest))
        )
        if P is not None:
            pending[P].append((slot, out_dims, out_plates))
        slot += 1
    return Plan(tuple(steps), len(structure), keep, strategy, memory_limit)
