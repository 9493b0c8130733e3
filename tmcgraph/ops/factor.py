"""Log-factors and factor graphs: the values the contraction engine works on.

A :class:`Factor` is a tensor of log values with named dims: sample dims first, then
plates. A :class:`FactorGraph` is the whole plated sum-product to contract: its
factors, the *ordinal* of every sample dim (the plates it is local to: one independent
index per element of them) and the plate kept per element in the result (``keep``), or
``None`` for the scalar. Its value is

    log sum over every index (one per sample dim and element of its ordinal) of
        prod over factors and their plate elements of exp(f[...])

(:func:`tmcgraph.ops.oracle.brute_force` computes exactly this by enumeration). Nothing
here knows about models or proposals.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from ..errors import TMCGraphError
from .ordinals import why_not_keep

__all__ = ["Factor", "FactorGraph", "Lazy"]


class Lazy:
    """A log-factor tensor built when the contraction first reads it, and dropped after.

    :func:`tmcgraph.ops.contract.contract` accepts a ``Lazy`` wherever it accepts a
    tensor. It calls ``build(narrowed)`` inside the plan step that consumes the factor,
    so a factor exists only while that step runs (peak memory is the largest step, not
    the sum of all factors). A step sliced to meet a memory limit narrows its inputs
    along the sliced sample dims; narrowing a ``Lazy`` records the slice and ``build``
    must return the factor already restricted to it, so the factor itself is never
    built at full size.

    Args:
        build: ``build(narrowed) -> tensor``; ``narrowed`` is a tuple of
            ``(axis, index)`` (the returned tensor has size 1 along that axis, holding
            entry ``index`` of the full factor) and ``(axis, start, length)`` entries
            (entries ``start .. start + length - 1``).
        narrowed: Slices recorded so far.

    Example:
        >>> import torch
        >>> full = torch.arange(6.).reshape(2, 3)
        >>> def build(narrowed):
        ...     t = full
        ...     for ax, i in narrowed:
        ...         t = t.narrow(ax, i, 1)
        ...     return t
        >>> Lazy(build).narrow(1, 2, 1)()
        tensor([[2.],
                [5.]])
    """

    __slots__ = ("build", "narrowed")

    def __init__(self, build, narrowed: tuple = ()):
        self.build = build
        self.narrowed = narrowed

    def narrow(self, axis: int, start: int, length: int) -> "Lazy":
        """The factor restricted to ``length`` entries of ``axis`` from ``start``.

        A length-1 narrowing is recorded as ``(axis, start)`` (sample dims sliced under a
        memory limit), a longer one as ``(axis, start, length)`` (a chunk of a split
        plate).
        """
        if length < 1:
            raise ValueError(f"Lazy factors narrow to at least one entry, got length {length}")
        entry = (axis, start) if length == 1 else (axis, start, length)
        return Lazy(self.build, self.narrowed + (entry,))

    def __call__(self) -> torch.Tensor:
        return self.build(self.narrowed)


@dataclass(frozen=True)
class Factor:
    """A log-factor tensor and the names of its dims.

    Attributes:
        name: What the factor belongs to (a variable, a constant, a marginal weight).
        tensor: Log values, shape ``[*sizes of sample_dims, *sizes of plates]``.
        sample_dims: Sample dim names, in tensor order.
        plates: Plate names, in tensor order (after the sample dims).
    """

    name: str
    tensor: torch.Tensor
    sample_dims: tuple
    plates: tuple

    def __post_init__(self):
        if self.tensor.dim() != len(self.sample_dims) + len(self.plates):
            raise TMCGraphError(
                f"factor {self.name!r}: tensor of shape {tuple(self.tensor.shape)} does not match "
                f"sample dims {self.sample_dims} + plates {self.plates}"
            )

    def with_tensor(self, tensor: torch.Tensor) -> "Factor":
        """The same factor with another tensor of the same layout."""
        return Factor(self.name, tensor, self.sample_dims, self.plates)


@dataclass(frozen=True)
class FactorGraph:
    """A plated sum-product: factors, the ordinal of each sample dim, the kept plate.

    Attributes:
        factors: The :class:`Factor` tuple.
        ordinals: Sample dim -> plates it is local to (every dim a factor uses must appear).
        keep: A plate left un-multiplied (per-element results), or ``None``.
        scales: Plate -> exponent ``c``: the product over that plate's elements becomes
            ``prod_e m_e^c`` (``c * sum_e log m_e`` for the log-messages ``m_e`` of its
            elements): subsampled plates, ``c = N / B``. Empty: no scaling.
        markov: Plate -> ``((prev_dim, dim), ...)``: a *Markov plate*, whose elements
            ``t = 0 .. T-1`` form a chain. ``dim`` is local to the plate (an index
            ``k_t`` per element) and ``prev_dim`` is its previous value: at element
            ``t >= 1`` the index of ``prev_dim`` *is* ``k_{t-1}`` (not a new index), and at
            ``t = 0`` it is one extra free index ``k_{-1}`` summed over its range (a
            factor that is constant in it at ``t = 0`` should carry ``-log K`` there, so
            the sum averages it away). Both dims need the same ordinal. The
            contraction multiplies such a plate out as a chain of log-matrix products
            (:mod:`tmcgraph.ops.scan`) instead of a product of independent elements.
    """

    factors: tuple
    ordinals: dict = field(default_factory=dict)
    keep: Optional[str] = None
    scales: dict = field(default_factory=dict)
    markov: dict = field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "factors", tuple(self.factors))
        if not self.factors:
            raise TMCGraphError("a factor graph needs at least one factor")
        missing = [d for d in self.sample_dims if d not in self.ordinals]
        if missing:
            raise TMCGraphError(f"no ordinal (plates it is local to) for sample dim(s) {missing}")
        self.sizes  # noqa: B018 - checks sizes agree
        for plate, c in self.scales.items():
            if not (isinstance(c, (int, float)) and c > 0):
                raise TMCGraphError(f"scale of plate {plate!r} must be a positive number, got {c!r}")
        object.__setattr__(self, "scales", {p: float(c) for p, c in self.scales.items() if c != 1})
        object.__setattr__(self, "markov", {p: tuple(tuple(pair) for pair in pairs)
                                            for p, pairs in self.markov.items() if pairs})
        self._check_markov()
        if self.keep is not None:
            why = self.why_not_keep(self.keep)
            if why:
                raise TMCGraphError(f"cannot keep plate {self.keep!r} per element: {why}")

    def _check_markov(self) -> None:
        sizes = self.sizes
        seen = set()
        for plate, pairs in self.markov.items():
            if plate in self.scales:
                raise TMCGraphError(f"Markov plate {plate!r} cannot be scaled (subsampled): its elements form a chain")
            if plate == self.keep:
                raise TMCGraphError(f"Markov plate {plate!r} cannot be kept per element: its elements form a chain")
            for pair in pairs:
                if len(pair) != 2:
                    raise TMCGraphError(f"Markov plate {plate!r}: expected (prev_dim, dim) pairs, got {pair!r}")
                prev, dim = pair
                for d in pair:
                    if d in seen:
                        raise TMCGraphError(f"sample dim {d!r} appears in two Markov pairs")
                    seen.add(d)
                    if d not in self.ordinals:
                        raise TMCGraphError(f"Markov pair {pair!r} of plate {plate!r}: dim {d!r} has no ordinal")
                if plate not in self.ordinals[dim]:
                    raise TMCGraphError(f"Markov pair {pair!r}: dim {dim!r} is not local to plate {plate!r} "
                                        f"(its ordinal is {tuple(self.ordinals[dim])})")
                if tuple(self.ordinals[prev]) != tuple(self.ordinals[dim]):
                    raise TMCGraphError(f"Markov pair {pair!r}: {prev!r} and {dim!r} need the same ordinal, got "
                                        f"{tuple(self.ordinals[prev])} and {tuple(self.ordinals[dim])}")
                if prev in sizes and dim in sizes and sizes[prev] != sizes[dim]:
                    raise TMCGraphError(f"Markov pair {pair!r}: sizes differ ({sizes[prev]} and {sizes[dim]})")

    @property
    def prev_dims(self) -> set:
        """The ``prev_dim`` of every Markov pair (aliases of their dims at the previous element)."""
        return {prev for pairs in self.markov.values() for prev, _ in pairs}

    @property
    def tensors(self) -> list:
        """The factor tensors, in factor order."""
        return [f.tensor for f in self.factors]

    @property
    def sample_dims(self) -> list:
        """Every sample dim a factor uses, in order of first use."""
        return list(dict.fromkeys(d for f in self.factors for d in f.sample_dims))

    @property
    def plates(self) -> list:
        """Every plate a factor lies in, in order of first use."""
        return list(dict.fromkeys(p for f in self.factors for p in f.plates))

    @property
    def sizes(self) -> dict:
        """Size of every sample dim and plate (raises if two factors disagree)."""
        sizes = {}
        for f in self.factors:
            for name, n in zip(tuple(f.sample_dims) + tuple(f.plates), f.tensor.shape):
                if sizes.setdefault(name, int(n)) != int(n):
                    raise TMCGraphError(
                        f"dim or plate {name!r} has inconsistent sizes {sizes[name]} and {int(n)} "
                        f"(factor {f.name!r})"
                    )
        return sizes

    def structure(self) -> tuple:
        """A hashable key of everything planning depends on (layouts, shapes, ordinals, keep, scales, Markov pairs)."""
        fs = tuple((f.sample_dims, f.plates, tuple(f.tensor.shape)) for f in self.factors)
        ords = tuple(sorted((d, tuple(self.ordinals[d])) for d in self.sample_dims))
        return fs, ords, self.keep, tuple(sorted(self.scales.items())), tuple(sorted(self.markov.items()))

    def why_not_keep(self, plate: str) -> Optional[str]:
        """Why ``plate`` cannot be kept per element, or ``None`` when it can."""
        return why_not_keep([(f.name, f.plates) for f in self.factors],
                            {d: self.ordinals[d] for d in self.sample_dims}, plate)

    def with_keep(self, keep: Optional[str]) -> "FactorGraph":
        """The same graph with another kept plate (checked)."""
        return FactorGraph(self.factors, self.ordinals, keep, self.scales, self.markov)

    def with_tensors(self, tensors) -> "FactorGraph":
        """The same graph on other tensors of the same layouts (e.g. scaled, masked)."""
        tensors = list(tensors)
        if len(tensors) != len(self.factors):
            raise TMCGraphError(f"factor graph has {len(self.factors)} factors, got {len(tensors)} tensors")
        return FactorGraph(tuple(f.with_tensor(t) for f, t in zip(self.factors, tensors)), self.ordinals, self.keep,
                           self.scales, self.markov)

    def detach(self) -> "FactorGraph":
        """The same graph with detached tensors."""
        return self.with_tensors(t.detach() for t in self.tensors)

    def extend(self, factors, ordinals: Optional[dict] = None) -> "FactorGraph":
        """The graph with more factors (and ordinals for new sample dims)."""
        return FactorGraph(self.factors + tuple(factors), {**self.ordinals, **(ordinals or {})}, self.keep,
                           self.scales, self.markov)

    def __str__(self) -> str:
        lines = [f"FactorGraph: {len(self.factors)} factor(s), keep={self.keep!r}"]
        for f in self.factors:
            n = len(f.sample_dims)
            ds = ", ".join(f"{d}={k}" for d, k in zip(f.sample_dims, f.tensor.shape[:n]))
            ps = ", ".join(f"{p}={k}" for p, k in zip(f.plates, f.tensor.shape[n:]))
            lines.append(f"  {f.name}: sample dims [{ds}] plates [{ps}]")
        return "\n".join(lines)
