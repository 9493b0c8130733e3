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

    A subsampled plate (``model.plate(p, size=N, subsample=True)``) takes B of its N
    elements: the data along it are those elements and ``data["<p>_index"]`` holds their
    indices (a vector of B integers in ``[0, N)``; with all N elements it may be left out
    and is ``arange(N)``). Its size in ``plate_sizes`` is B.

    Raises:
        TMCGraphError: missing or extra data, non-finite values, plate size mismatch,
            element indices of the wrong type, shape or range, or indices for a plate not
            declared subsample-able.
    """
    ctx = ctx or Context()
    if not isinstance(data, dict):
        raise TMCGraphError(f"data must be a dict of observed name -> tensor, got {type(data).__name__}")
    obs = model.observed_names
    indices = {v.index_of: n for n, v in model.variables.items() if v.index_of is not None}
    missing = [n for n in obs if n not in data and model[n].index_of is None]
    if missing:
        raise TMCGraphError(f"no data for observed variable(s) {missing}")
    extra = [n for n in data if n not in obs]
    for n in extra:
        p = n[: -len("_index")] if n.endswith("_index") else None
        if p in model.plates:
            raise TMCGraphError(
                f"data for {n!r}: plate {p!r} is not declared subsample-able; declare it with "
                f"model.plate({p!r}, size=N, subsample=True) to give minibatches of its elements"
            )
    if extra:
        kinds = {n: ("a latent" if n in model else "not in the model") for n in extra}
        raise TMCGraphError(f"data for variable(s) that are not observed: {kinds}")
    sizes = {p.name: (None if p.subsample else p.size) for p in model.plates.values()}
    seen = {}
    out = {}
    for n in obs:
        if n not in data:
            continue  # a subsampled plate's indices, filled in below
        x = data[n]
        if not torch.is_tensor(x):
            x = torch.as_tensor(x)
        x = ctx.to(x)
        if x.is_floating_point() or x.is_complex():
            _check_finite(n, x)
        if model[n].index_of is not None:
            _check_indices(n, model[n].index_of, x, model.plates[model[n].index_of].size)
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
                hint = "" if p in seen else (
                    f" (to give minibatches of a plate of known full size, declare it with "
                    f"model.plate({p!r}, size=N, subsample=True))")
                raise TMCGraphError(
                    f"data for {n!r} has size {s} along plate {p!r} (dim {i}, shape {tuple(x.shape)}) "
                    f"but {src} gives size {sizes[p]}{hint}"
                )
            sizes[p] = s
            seen.setdefault(p, n)
        out[n] = x
    for p, n in indices.items():
        _bind_indices(model, p, n, out, sizes, ctx)
    unknown = [p for p, s in sizes.items() if s is None]
    if unknown:
        raise TMCGraphError(f"size of plate(s) {unknown} is unknown: declare size= or give data in them")
    return out, sizes


def _bind_indices(model: Model, plate: str, name: str, out: dict, sizes: dict, ctx: Context) -> None:
    """Fill in the element indices of a subsampled plate given whole (or refuse a minibatch without them)."""
    N = model.plates[plate].size
    if name in out:
        return
    if sizes[plate] not in (None, N):
        raise TMCGraphError(
            f"plate {plate!r} is subsampled (full size {N}) and the data have {sizes[plate]} elements along "
            f"it: give their indices as data[{name!r}] (integers in [0, {N})), e.g. with "
            f"tg.subsample(model, data, {{{plate!r}: idx}})"
        )
    sizes[plate] = N
    out[name] = ctx.to(torch.arange(N))


def _check_indices(name: str, plate: str, idx: torch.Tensor, N: int) -> None:
    """Raise unless ``idx`` is a non-empty integer vector of indices in ``[0, N)``."""
    if idx.is_floating_point() or idx.is_complex() or idx.dtype == torch.bool:
        raise TMCGraphError(f"data for {name!r} (element indices of plate {plate!r}) must be integers, got {idx.dtype}")
    if idx.dim() != 1 or idx.shape[0] < 1:
        raise TMCGraphError(
            f"data for {name!r} (element indices of plate {plate!r}) must be a non-empty vector [B], "
            f"got shape {tuple(idx.shape)}"
        )
    bad = (idx < 0) | (idx >= N)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise TMCGraphError(
            f"data for {name!r}: index {int(idx[i])} (at position {i}) is out of range for plate {plate!r} "
            f"of full size {N}: indices must lie in [0, {N})"
        )
