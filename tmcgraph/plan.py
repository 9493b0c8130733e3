"""Planning a plated sum-product contraction with opt_einsum.

The factors of a TMC estimate live at *ordinals*: the set of plates each factor is in.
Ordinals must form a tree under inclusion (nested plates). Elimination runs from the
leaves up, as in the paper's Fig. 2: at ordinal S, every sample dim that is local to a
plate in S but not to its parent ordinal is summed out (one opt_einsum contraction,
batched over the plates of S), then the plates S \\ parent(S) are multiplied out (a
sum of logs). The result joins the parent ordinal's inputs. Loopy graphs (Fig. 1) are
just contractions with cycles, which opt_einsum orders.

A :class:`Plan` is compiled once per structure and shapes and kept in a bounded LRU
cache; executing it is :func:`tmcgraph.contract.contract`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import opt_einsum as oe

from .errors import TMCGraphError

__all__ = ["Plan", "Step", "make_plan", "plan_for", "plan_cache_info", "plan_cache_clear", "STRATEGIES"]

#: Path strategies accepted by ``make_plan`` (passed to ``opt_einsum``).
STRATEGIES = ("auto", "auto-hq", "optimal", "dp", "greedy", "branch-all", "branch-2", "branch-1", "random-greedy")

_STATS = {"searches": 0}
_CACHE_SIZE = 256


@dataclass(frozen=True)
class Step:
    """One ordinal's contraction.

    Attributes:
        ordinal: Plates of the inputs (``keep`` plate excluded).
        inputs: Slot indices of the inputs (factors first, then step results).
        equation: The einsum equation over sample dims and plates.
        expression: The compiled ``opt_einsum`` expression.
        path_info: ``opt_einsum`` path information (cost, largest intermediate).
        reduce_axes: Output axes (plates) multiplied out after the contraction.
        reduced_plates: Names of those plates.
        out_dims: Sample dims of the result.
        out_plates: Plates of the result.
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


@dataclass(frozen=True)
class Plan:
    """A compiled contraction: steps in elimination order; the last one is the result.

    Attributes:
        steps: The :class:`Step` list.
        n_inputs: Number of factor tensors expected.
        keep: Plate left un-multiplied (per-element results), or ``None``.
        strategy: The opt_einsum path strategy used.
    """

    steps: tuple
    n_inputs: int
    keep: object
    strategy: str

    @property
    def cost(self) -> int:
        """Estimated floating point operations (sum of opt_einsum's ``opt_cost``)."""
        return int(sum(int(s.path_info.opt_cost) for s in self.steps))

    @property
    def largest_intermediate(self) -> int:
        """Elements of the largest intermediate tensor over all steps."""
        return int(max(int(s.path_info.largest_intermediate) for s in self.steps))

    def __str__(self) -> str:
        lines = [
            f"Plan: {len(self.steps)} step(s), strategy={self.strategy!r}, keep={self.keep!r}, "
            f"cost={self.cost:.3g} flops, largest intermediate={self.largest_intermediate} elements"
        ]
        for i, s in enumerate(self.steps):
            lines.append(
                f"  step {i}: plates {list(s.ordinal)} inputs {list(s.inputs)}: {s.equation}; "
                f"path {s.path_info.path}; then multiply out plates {list(s.reduced_plates)}"
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
        strategy: opt_einsum path strategy, one of :data:`STRATEGIES`.
        memory_limit: Largest intermediate (elements) opt_einsum may plan for.

    Returns:
        The compiled :class:`Plan` (cached).
    """
    if strategy not in STRATEGIES:
        raise TMCGraphError(f"unknown path strategy {strategy!r}; choose one of {STRATEGIES}")
    return _cached_plan(structure, levels, keep, strategy, memory_limit)


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
        eq = ",".join(term(dims, plates) for _, dims, plates in items) + "->" + term(out_dims, kept_plates)
        shapes = [tuple(sizes[x] for x in dims + plates) for _, dims, plates in items]
        try:
            path, info = oe.contract_path(eq, *shapes, shapes=True, optimize=strategy, memory_limit=memory_limit)
        except Exception as e:
            raise TMCGraphError(f"opt_einsum could not plan {eq!r} with shapes {shapes}: {e}") from e
        expr = oe.contract_expression(eq, *shapes, optimize=path)
        reduced = tuple(p for p in kept_plates if p not in out_plates)
        reduce_axes = tuple(len(out_dims) + kept_plates.index(p) for p in reduced)
        steps.append(
            Step(tuple(sorted(S)), tuple(i for i, _, _ in items), eq, expr, info, reduce_axes, reduced, out_dims,
                 out_plates)
        )
        if P is not None:
            pending[P].append((slot, out_dims, out_plates))
        slot += 1
    return Plan(tuple(steps), len(structure), keep, strategy)
