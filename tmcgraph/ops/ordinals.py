"""The ordinal tree of a plated factor graph.

Every factor lives at an *ordinal*: the set of plates it is in (the kept plate
excluded: it is a batch dim everywhere). Ordinals must form a tree under inclusion
(nested plates): the parent of ordinal S is the largest ordinal strictly inside it.
Elimination runs from the leaves up (the paper's Fig. 2).
"""

from __future__ import annotations

from typing import Optional

from ..errors import TMCGraphError

__all__ = ["ordinal_tree", "why_not_keep"]


def ordinal_tree(factor_plates, dim_ordinals: dict, keep: Optional[str] = None) -> tuple:
    """Ordinals of a graph's factors and their parents.

    Args:
        factor_plates: Plates of each factor.
        dim_ordinals: Sample dim -> plates it is local to.
        keep: The kept plate (dropped from every ordinal), or ``None``.

    Returns:
        ``(ordinals, parent)``: the set of ordinals (frozensets, the empty one included)
        and ordinal -> parent ordinal for every non-empty one.

    Raises:
        TMCGraphError: plates that are not nested, or a sample dim local to plates where
            no factor lives.
    """

    def ordinal(plates):
        return frozenset(p for p in plates if p != keep)

    ordinals = {frozenset()} | {ordinal(pl) for pl in factor_plates}
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
    for d, lv in dim_ordinals.items():
        if ordinal(lv) not in ordinals:
            raise TMCGraphError(f"sample dim {d!r} is local to plates {tuple(lv)} where no factor lives")
    return ordinals, parent


def why_not_keep(factors, dim_ordinals: dict, plate: str) -> Optional[str]:
    """Why ``plate`` cannot be kept per element, or ``None`` when it can.

    A plate can be kept (a batch of independent sums, one per element) when every factor
    lies in it and every sample dim is local to it.

    Args:
        factors: ``(name, plates)`` of each factor.
        dim_ordinals: Sample dim -> plates it is local to (dims the factors use).
        plate: The plate to keep.
    """
    outside = [name for name, plates in factors if plate not in plates]
    if outside:
        return f"factor(s) {outside} lie outside it"
    shared = [d for d, lv in dim_ordinals.items() if plate not in lv]
    if shared:
        return f"sample dim(s) {shared} are shared across its elements"
    return None
