"""Binding observed data to a model: checks, conversion and plate sizes."""

from __future__ import annotations

import threading
import weakref

import torch

from ..errors import TMCGraphError
from ..model import Model
from .context import Context

__all__ = ["bind_data"]

# Data tensors already found finite: id -> (weak reference, version counter). A tensor is
# checked again after any in-place change (its version moves) and never confused with
# another one that reuses its id (the weak reference must still point at it).
_FINITE: dict = {}
_FINITE_MAX = 1024
_LOCK = threading.Lock()


def _known_finite(x: torch.Tensor) -> bool:
    entry = _FINITE.get(id(x))
    return entry is not None and entry[0]() is x and entry[1] == x._version


def _remember_finite(x: torch.Tensor) -> None:
    with _LOCK:
        if len(_FINITE) >= _FINITE_MAX:
            _FINITE.clear()
        try:
            _FINITE[id(x)] = (weakref.ref(x), x._version)
        except TypeError:  # pragma: no cover - tensor subclasses without weak references
            pass


def _check_finite(n: str, x: torch.Tensor) -> None:
    """Raise naming the first non-finite entry of ``x``; each tensor version is checked once."""
    if _known_finite(x):
        return
    if not bool(torch.isfinite(x).all()):
        bad = (~torch.isfinite(x)).nonzero()[0].tolist()
        raise TMCGraphError(f"data for {n!r} has non-finite values (first at index {bad})")
    _remember_finite(x)


def bind_data(model: Model, data: dict, ctx: Context = None):
    """Validate observed data and infer plate sizes.

    Args:
        model: The model.
        data: Observed name -> tensor ``[*plate sizes, *event]``.
        ctx: Execution context: data moves to its device, floating data to its dtype.

    Returns:
        ``(data, plate_sizes)`` with tensors converted and sizes of every plate.

    Raises:
        TMCGraphError: missing or extra data, non-finite values, plate size mismatch.
    """
    ctx = ctx or Context()
    if not isinstance(data, dict):
        raise TMCGraphError(f"data must be a dict of observed name -> tensor, got {type(data).__name__}")
    obs = model.observed_names
    missing = [n for n in obs if n not in data]
    if missing:
        raise TMCGraphError(f"no data for observed variable(s) {missing}")
    extra = [n for n in data if n not in obs]
    if extra:
        kinds = {n: ("a latent" if n in model else "not in the model") for n in extra}
        raise TMCGraphError(f"data for variable(s) that are not observed: {kinds}")
    sizes = {p.name: p.size for p in model.plates.values()}
    seen = {}
    out = {}
    for n in obs:
        x = data[n]
        if not torch.is_tensor(x):
            x = torch.as_tensor(x)
        x = ctx.to(x)
        if x.is_floating_point() or x.is_complex():
            _check_finite(n, x)
        plates = model[n].plates
        if x.dim() < len(plates):
            raise TMCGraphError(
                f"data for {n!r} has shape {tuple(x.shape)} but lies in plates {plates}: "
                f"expected leading dims [{', '.join(plates)}]"
            )
        for i, p in enumerate(plates):
            s = int(x.shape[i])
            if sizes[p] is not None and sizes[p] != s:
                src = f"data for {seen[p]!r}" if p in seen else "its declaration"
                raise TMCGraphError(
                    f"data for {n!r} has size {s} along plate {p!r} (dim {i}, shape {tuple(x.shape)}) "
                    f"but {src} gives size {sizes[p]}"
                )
            sizes[p] = s
            seen.setdefault(p, n)
        out[n] = x
    unknown = [p for p, s in sizes.items() if s is None]
    if unknown:
        raise TMCGraphError(f"size of plate(s) {unknown} is unknown: declare size= or give data in them")
    return out, sizes
