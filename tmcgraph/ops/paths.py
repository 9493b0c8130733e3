"""Contraction path heuristics, as opt_einsum ``PathOptimizer`` s.

Each optimizer is called like opt_einsum's: ``optimizer(inputs, output, size_dict,
memory_limit)`` with ``inputs`` a list of index sets, and returns a linear path (a list
of tuples of operand positions), so it can also be passed to ``opt_einsum.contract``
as ``optimize=``.

* :class:`VariableElimination`: greedy variable elimination. Repeatedly eliminate the
  index whose elimination makes the smallest tensor (``order="size"``) or costs least
  (``order="cost"``). Elimination orders are optimal on trees such as chains
  (vector-matrix products, ``O(n K^2)``), which pairwise greedy searches over many
  operands often miss (matrix-matrix products, ``O(n K^3)``). Disconnected components
  end as separate terms, combined last (smallest first).
* :class:`Named`: one of opt_einsum's own strategies by name (``"greedy"``, ``"dp"``, ...).
* :class:`BestOf`: the cheapest of several optimizers' paths under :func:`simulate`'s
  cost model (fewest estimated flops among the paths whose largest tensor fits the
  memory limit, else the smallest largest tensor).
* :class:`Auto` (strategy ``"auto"``): the best of opt_einsum's ``"auto"`` and both
  elimination orders; on expensive steps (loopy graphs, lattices) also greedy paths
  planned with one summed index at a time pretended free (:func:`probe_paths`), which
  change which pairs greedy joins first and are often several times cheaper.
"""

from __future__ import annotations

import math

import opt_einsum as oe
from opt_einsum.paths import PathOptimizer, linear_to_ssa, ssa_to_linear

from ..errors import TMCGraphError

__all__ = [
    "VariableElimination",
    "Named",
    "BestOf",
    "Auto",
    "STRATEGIES",
    "get_optimizer",
    "simulate",
    "pairwise",
    "probe_paths",
]

#: Path strategies accepted by name (a :class:`PathOptimizer` instance is accepted too).
STRATEGIES = ("auto", "auto-hq", "optimal", "dp", "greedy", "branch-all", "branch-2", "branch-1", "random-greedy")

#: Steps estimated to cost more flops than this get extra (probing) path candidates under "auto".
PROBE_COST = 10**7


def _size(term, sizes) -> int:
    return math.prod(sizes[c] for c in term)


def _equation(inputs, output) -> str:
    return ",".join("".join(sorted(t)) for t in inputs) + "->" + "".join(sorted(output))


def _shapes(inputs, sizes) -> list:
    return [tuple(sizes[c] for c in sorted(t)) for t in inputs]


class VariableElimination(PathOptimizer):
    """Greedy variable elimination order.

    Args:
        order: ``"size"``: eliminate next the index whose result is smallest (ties: the
            smallest union); ``"cost"``: the one whose union (cost) is smallest.
    """

    def __init__(self, order: str = "size"):
        if order not in ("size", "cost"):
            raise TMCGraphError(f"VariableElimination order must be 'size' or 'cost', got {order!r}")
        self.order = order

    def __call__(self, inputs, output, size_dict, memory_limit=None):
        return ssa_to_linear(self.ssa_path(inputs, output, size_dict))

    def ssa_path(self, inputs, output, sizes) -> list:
        """The elimination order as an SSA path (any arity per step)."""
        key = (lambda r, u: (r, u)) if self.order == "size" else (lambda r, u: (u, r))
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

    def __repr__(self):
        return f"VariableElimination(order={self.order!r})"


class Named(PathOptimizer):
    """One of opt_einsum's strategies by name (``"auto"``, ``"greedy"``, ``"dp"``, ...)."""

    def __init__(self, name: str):
        self.name = name

    def __call__(self, inputs, output, size_dict, memory_limit=None):
        if self.name == "random-greedy":
            from opt_einsum.path_random import RandomGreedy

            opt = RandomGreedy(max_repeats=32)
        else:
            opt = self.name
        path, _ = oe.contract_path(_equation(inputs, output), *_shapes(inputs, size_dict), shapes=True,
                                   optimize=opt, memory_limit=memory_limit)
        return path

    def __repr__(self):
        return f"Named({self.name!r})"


def pairwise(ssa_path, n: int) -> list:
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


def simulate(ssa_pairs, terms, out, sizes):
    """Result terms, estimated cost and largest tensor of a pairwise SSA path.

    Args:
        ssa_pairs: Pairwise (or single-operand) SSA contractions.
        terms: Index strings of the inputs.
        out: Index string of the result.
        sizes: Index -> size.

    Returns:
        ``(result terms, flops, largest tensor elements)``; the cost counts one
        multiply-add per element of each pairwise union (and one more when it sums).
    """
    terms = ["".join(t) for t in terms]
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
            res = "".join(out)
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


def score_path(linear_path, inputs, output, sizes, memory_limit=None) -> tuple:
    """``(score, pairs, cost, largest)`` of a linear path: lower scores are better."""
    ssa = [tuple(sorted(c)) for c in linear_to_ssa(linear_path)]
    pairs = pairwise(ssa, len(inputs))
    _, cost, largest = simulate(pairs, ["".join(sorted(t)) for t in inputs], "".join(sorted(output)), sizes)
    fits = memory_limit is None or largest <= memory_limit
    return (not fits, cost if fits else largest, cost), pairs, cost, largest


class BestOf(PathOptimizer):
    """The best path of several optimizers under :func:`simulate`'s cost model.

    Args:
        optimizers: The candidates (``PathOptimizer`` s or opt_einsum strategy names).
            A candidate that fails is skipped unless every one fails.
    """

    def __init__(self, *optimizers):
        self.optimizers = tuple(Named(o) if isinstance(o, str) else o for o in optimizers)

    def candidates(self, inputs, output, size_dict, memory_limit=None) -> list:
        """Linear paths of every candidate optimizer that succeeds."""
        paths, errors = [], []
        for opt in self.optimizers:
            try:
                paths.append(opt(inputs, output, size_dict, memory_limit))
            except Exception as e:  # noqa: BLE001 - reported when no candidate works
                errors.append(f"{opt!r}: {e}")
        if not paths:
            raise TMCGraphError(f"no path optimizer could plan {_equation(inputs, output)}: {'; '.join(errors)}")
        return paths

    def __call__(self, inputs, output, size_dict, memory_limit=None):
        if len(inputs) == 1:
            return [(0,)]
        paths = self.candidates(inputs, output, size_dict, memory_limit)
        return min(paths, key=lambda p: score_path(p, inputs, output, size_dict, memory_limit)[0])

    def __repr__(self):
        return f"BestOf{self.optimizers!r}"


def probe_paths(inputs, output, sizes, memory_limit=None) -> list:
    """Greedy linear paths planned with one summed index at a time set to size 1.

    Pretending an index is free changes which pairs the greedy search joins first; on
    loopy graphs (lattices) the resulting orders, costed at the true sizes, are often
    several times cheaper than plain greedy.
    """
    paths = []
    for c in dict.fromkeys(c for t in inputs for c in sorted(t)):
        if c in output or sizes[c] == 1:
            continue
        loc = dict(sizes)
        loc[c] = 1
        try:
            paths.append(Named("greedy")(inputs, output, loc, memory_limit))
        except Exception:  # noqa: BLE001 - a probe that fails is just not a candidate  # pragma: no cover
            continue
    return paths


class Auto(BestOf):
    """The default strategy: opt_einsum's ``"auto"`` and both elimination orders, plus probes.

    Args:
        probe_cost: Steps whose best candidate costs more flops than this (and with
            more than four operands) also try :func:`probe_paths`; ``None`` never probes.
    """

    def __init__(self, probe_cost=PROBE_COST):
        super().__init__(Named("auto"), VariableElimination("size"), VariableElimination("cost"))
        self.probe_cost = probe_cost

    def __call__(self, inputs, output, size_dict, memory_limit=None):
        if len(inputs) == 1:
            return [(0,)]
        paths = self.candidates(inputs, output, size_dict, memory_limit)
        scored = [(score_path(p, inputs, output, size_dict, memory_limit), p) for p in paths]
        if self.probe_cost is not None and len(inputs) > 4 and min(s[0][2] for s, _ in scored) > self.probe_cost:
            for p in probe_paths(inputs, output, size_dict, memory_limit):
                scored.append((score_path(p, inputs, output, size_dict, memory_limit), p))
        return min(scored, key=lambda sp: sp[0][0])[1]

    def without_probes(self) -> "Auto":
        """The same strategy without probing (used inside slicing searches)."""
        return Auto(probe_cost=None)

    def __repr__(self):
        return f"Auto(probe_cost={self.probe_cost!r})"


def get_optimizer(strategy) -> PathOptimizer:
    """The ``PathOptimizer`` of a strategy name (see :data:`STRATEGIES`) or instance."""
    if isinstance(strategy, PathOptimizer):
        return strategy
    if strategy == "auto":
        return _AUTO
    if strategy in STRATEGIES:
        return Named(strategy)
    raise TMCGraphError(f"unknown path strategy {strategy!r}; choose one of {STRATEGIES} or pass a PathOptimizer")


_AUTO = Auto()
