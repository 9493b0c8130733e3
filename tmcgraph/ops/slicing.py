"""Slicing contracted indices so that a step's tensors fit a memory limit.

If no path of a step keeps every tensor it allocates or reads under ``memory_limit``
(elements), contracted indices are *sliced*: the step runs once per value of the sliced
indices, on views of the inputs, and the results are summed in log space
(:func:`tmcgraph.ops.contract.contract` checkpoints each slice under autograd, so saved
activations stay bounded too). Indices are added greedily, each time the one whose
slicing gives the cheapest fitting path (slices times cost). If even slicing every
contracted index does not fit (the step's result or an input factor alone exceeds the
limit), or it would take more than :data:`MAX_SLICES` slices, planning raises
:class:`~tmcgraph.errors.TMCGraphError` naming the largest tensor, before anything is
allocated.
"""

from __future__ import annotations

import math

from ..errors import TMCGraphError
from .paths import score_path

__all__ = ["MAX_SLICES", "best_path", "slice_to_fit"]

#: A step needing more slices than this to meet the memory limit is refused.
MAX_SLICES = 1 << 16


def _size(term, sizes) -> int:
    return math.prod(sizes[c] for c in term)


def best_path(optimizer, inputs, out, sizes, memory_limit):
    """``(pairs, cost, largest)`` of ``optimizer``'s path for one step."""
    try:
        linear = optimizer([frozenset(t) for t in inputs], frozenset(out), sizes, memory_limit)
    except TMCGraphError:
        raise
    except Exception as e:  # noqa: BLE001 - opt_einsum's errors re-raised with the equation
        raise TMCGraphError(f"{optimizer!r} could not plan {','.join(inputs)}->{out}: {e}") from e
    _, pairs, cost, largest = score_path(linear, inputs, out, sizes, memory_limit)
    return pairs, cost, largest


def slice_to_fit(optimizer, inputs, out, sizes, memory_limit, names=None):
    """Path and sliced indices of one step: ``(pairs, sliced, cost, largest)``.

    Args:
        optimizer: The step's ``PathOptimizer``.
        inputs: Index strings of the step's inputs.
        out: Index string of its result.
        sizes: Index -> size.
        memory_limit: Largest tensor (elements), or ``None``.
        names: Index -> readable name, for errors.
    """
    pairs, cost, largest = best_path(optimizer, inputs, out, sizes, memory_limit)
    first_largest = largest
    sliced = []
    if memory_limit is None or largest <= memory_limit:
        return pairs, sliced, cost, largest
    cheap = optimizer.without_probes() if hasattr(optimizer, "without_probes") else optimizer
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
            t_pairs, t_cost, t_largest = best_path(cheap, inputs, out, loc2, memory_limit)
            n_sl = math.prod(sizes[s] for s in sliced + [c])
            over = t_largest > memory_limit
            trial.append(((over, t_largest if over else 0, t_cost * n_sl), c, t_pairs, t_cost, t_largest))
        trial.sort(key=lambda r: r[0])
        _, c, pairs, cost, largest = trial[0]
        local[c] = 1
        sliced.append(c)
        if math.prod(sizes[x] for x in sliced) > MAX_SLICES:
            raise TMCGraphError(
                f"memory_limit={memory_limit} elements is too small: meeting it needs more than {MAX_SLICES} "
                f"slices (the best unsliced path's largest intermediate has {first_largest} elements); "
                "raise the limit"
            )
    return pairs, sliced, cost, largest
