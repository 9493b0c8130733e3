"""Brute-force reference: sum over every index combination with plates unrolled.

This is the naive definition of the plated sum-product, with no elimination order:
every (sample dim, plate element) pair becomes its own index, all ``prod K``
combinations are enumerated, and the per-combination log-weights (a sum over factors
and plate elements) are combined with one logsumexp. Exponential cost; for tests and
tiny models only.
"""

from __future__ import annotations

import itertools
import math

import torch

__all__ = ["brute_force", "enumerate_log_weights", "unroll_markov", "MAX_COMBINATIONS"]

#: Refuse to enumerate more combinations than this.
MAX_COMBINATIONS = 2_000_000


def brute_force(graph, ordinals=None, keep=None) -> torch.Tensor:
    """Log of the plated sum-product of a :class:`~tmcgraph.ops.factor.FactorGraph` by full enumeration.

    Args:
        graph: The factor graph (its ``keep`` plate, if any, gives per-element values),
            or a sequence of factors, with ``ordinals`` (sample dim -> plates it is local
            to) and optionally ``keep``.
        ordinals: With a sequence of factors: their sample dims' ordinals.
        keep: With a sequence of factors: a plate to keep per element.

    Returns:
        A scalar (or a vector over ``keep``), differentiable w.r.t. the factor tensors.
    """
    if ordinals is None and keep is None and hasattr(graph, "factors"):
        if graph.scales:
            raise ValueError(f"brute_force does not enumerate scaled plates {sorted(graph.scales)}: "
                             "compare a graph with the plates' elements repeated instead")
        if graph.markov:
            factors, ordinals = unroll_markov(graph)
            return _brute_force(factors, ordinals, graph.keep)
        return _brute_force(graph.factors, graph.ordinals, graph.keep)
    if ordinals is None:
        raise TypeError("brute_force needs a FactorGraph, or factors and their ordinals")
    return _brute_force(list(graph), dict(ordinals), keep)


def _brute_force(factors, ordinals: dict, keep=None) -> torch.Tensor:
    if keep is not None:
        n = _sizes(factors)[keep]
        outs = []
        for i in range(n):
            sliced = [_Slice(f, keep, i) for f in factors]
            lv = {d: tuple(p for p in lv0 if p != keep) for d, lv0 in ordinals.items()}
            outs.append(_brute_force(sliced, lv))
        return torch.stack(outs)
    _, _, logw = enumerate_log_weights(factors, ordinals)
    return torch.logsumexp(logw, 0) if torch.isfinite(logw).any() else logw.max()


def enumerate_log_weights(factors, ordinals: dict):
    """Every index combination (plates unrolled) and its summed log-weight.

    Args:
        factors: Objects with ``tensor`` (log values), ``sample_dims`` and ``plates``.
        ordinals: Sample dim -> plates it is local to.

    Returns:
        ``(variables, combos, logw)``: ``variables`` lists the index variables as
        ``(dim, {plate: element})``, one per dim and element of the plates it is local to;
        ``combos`` is a LongTensor ``[n, len(variables)]`` of all combinations; ``logw``
        ``[n]`` is the sum over factors and plate elements of the factor values there
        (differentiable w.r.t. the factor tensors).
    """
    sizes = _sizes(factors)
    # One index variable per (dim, element of the plates the dim is local to).
    variables = []
    for d in dict.fromkeys(d for f in factors for d in f.sample_dims):
        for e in itertools.product(*[range(sizes[p]) for p in ordinals[d]]):
            variables.append((d, dict(zip(ordinals[d], e))))
    total = math.prod(sizes[d] for d, _ in variables)
    if total > MAX_COMBINATIONS:
        raise ValueError(f"brute force would enumerate {total} combinations (> {MAX_COMBINATIONS})")
    device = factors[0].tensor.device
    grids = torch.cartesian_prod(*[torch.arange(sizes[d], device=device) for d, _ in variables]) \
        if variables else torch.zeros(1, 0, dtype=torch.long, device=device)
    if grids.dim() == 1:
        grids = grids[:, None]
    logw = torch.zeros(grids.shape[0], dtype=factors[0].tensor.dtype, device=device)
    for f in factors:
        for e in itertools.product(*[range(sizes[p]) for p in f.plates]):
            elem = dict(zip(f.plates, e))
            idx = []
            for d in f.sample_dims:
                want = {p: elem[p] for p in ordinals[d]}
                col = next(i for i, (dd, ee) in enumerate(variables) if dd == d and ee == want)
                idx.append(grids[:, col])
            logw = logw + f.tensor[tuple(idx) + tuple(e)]
    return variables, grids, logw


def unroll_markov(graph):
    """A Markov graph's factors with its Markov plates unrolled: the definition, spelled out.

    Every factor in a Markov plate ``p`` of size ``T`` becomes ``T`` factors, one per
    element ``t``, outside ``p``; a dim ``d`` local to ``p`` becomes one dim ``d@p=t`` per
    element, and the ``prev_dim`` of a pair ``(prev_dim, d)`` at element ``t`` becomes
    ``d@p=t-1`` (at ``t = 0``: the extra free index ``d@p=-1``).

    Args:
        graph: A :class:`~tmcgraph.ops.factor.FactorGraph`.

    Returns:
        ``(factors, ordinals)`` of the equivalent graph without Markov plates.
    """
    factors = list(graph.factors)
    ordinals = {d: tuple(graph.ordinals[d]) for d in graph.sample_dims}
    sizes = _sizes(factors)
    for plate, pairs in graph.markov.items():
        prev_of = {prev: dim for prev, dim in pairs}
        out = []
        for f in factors:
            if plate not in f.plates:
                if any(plate in ordinals[d] for d in f.sample_dims):
                    raise ValueError(f"factor {getattr(f, 'name', '?')!r} uses dims local to plate {plate!r} "
                                     "outside it")
                out.append(f)
                continue
            ax = len(f.sample_dims) + f.plates.index(plate)
            for t in range(sizes[plate]):
                names = []
                for d in f.sample_dims:
                    if plate not in ordinals[d]:
                        names.append(d)
                    elif d in prev_of:
                        names.append(f"{prev_of[d]}@{plate}={t - 1}")
                    else:
                        names.append(f"{d}@{plate}={t}")
                out.append(_Plain(f.tensor.select(ax, t), tuple(names), tuple(p for p in f.plates if p != plate)))
        new = {}
        for d, lv in ordinals.items():
            if plate not in lv:
                new[d] = lv
                continue
            if d in prev_of:
                continue
            rest = tuple(p for p in lv if p != plate)
            for t in range(-1 if d in prev_of.values() else 0, sizes[plate]):
                new[f"{d}@{plate}={t}"] = rest
        factors, ordinals = out, new
    used = {d for f in factors for d in f.sample_dims}
    return factors, {d: lv for d, lv in ordinals.items() if d in used}


class _Plain:
    """A factor as the oracle reads it: tensor, sample dims, plates."""

    def __init__(self, tensor, sample_dims, plates):
        self.tensor, self.sample_dims, self.plates = tensor, sample_dims, plates


def _sizes(factors) -> dict:
    sizes = {}
    for f in factors:
        for name, n in zip(tuple(f.sample_dims) + tuple(f.plates), f.tensor.shape):
            sizes[name] = n
    return sizes


class _Slice:
    """A factor restricted to element ``i`` of plate ``keep``."""

    def __init__(self, f, keep, i):
        self.sample_dims = f.sample_dims
        self.plates = tuple(p for p in f.plates if p != keep)
        self.tensor = f.tensor.select(len(f.sample_dims) + f.plates.index(keep), i) if keep in f.plates else f.tensor
