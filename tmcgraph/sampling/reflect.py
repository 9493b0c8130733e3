"""Rebuilding a distribution with transformed parameters (gathering, casting).

Two sampling jobs need a distribution like the one a callable returned, but with every
parameter tensor transformed: the mixture and permutation couplings gather the
parameters of a grid-layout distribution at the drawn parent indices (one network pass
for both the draw and the density), and an explicit ``dtype``/``device`` casts the
parameters of distributions built from Python numbers. Both go through :func:`rebuild`,
which reads the parameters named by ``arg_constraints`` and calls the constructor again.

Supported: ``Independent`` (recursively), and any distribution whose ``arg_constraints``
parameters (one of ``probs``/``logits``, whichever was given) are tensor attributes and
whose constructor takes exactly those (plus ``validate_args``): ``Normal``,
``Bernoulli``, ``Categorical``, ``Laplace``, ``Gamma``, ... Others raise
:class:`Unsupported` and the caller takes a slower path.
"""

from __future__ import annotations

import inspect

import torch
from torch.distributions import Independent

__all__ = ["Unsupported", "params", "rebuild", "gather_dist", "cast_dist", "flatten", "unflatten"]


class Unsupported(Exception):
    """A distribution whose parameters cannot be read and rebuilt."""


_CONSTRUCTORS: dict = {}  # class -> accepted keywords, or None when not rebuildable (a plain dict: traceable)


def _constructor(cls) -> tuple:
    """The keyword names ``cls.__init__`` accepts; raises Unsupported (cached per class)."""
    if cls not in _CONSTRUCTORS:
        if len(_CONSTRUCTORS) > 1024:
            _CONSTRUCTORS.clear()
        _CONSTRUCTORS[cls] = _read_constructor(cls)
    accepts = _CONSTRUCTORS[cls]
    if accepts is None:
        raise Unsupported
    return accepts


def _read_constructor(cls):
    try:
        sig = inspect.signature(cls.__init__)
    except (TypeError, ValueError):
        return None
    accepts = [k for k in sig.parameters if k != "self"]
    kinds = [sig.parameters[k].kind for k in accepts]
    if any(v in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD) for v in kinds):
        return None
    return tuple(accepts)


def _param_names(d) -> list:
    names = list(getattr(type(d), "arg_constraints", {}) or {})
    if not names:
        raise Unsupported
    if "probs" in names and "logits" in names:
        given = "logits" if "logits" in d.__dict__ else "probs"
        names = [k for k in names if k not in ("probs", "logits")] + [given]
    if not all(k in d.__dict__ and torch.is_tensor(d.__dict__[k]) for k in names):
        raise Unsupported
    return names


def params(d) -> dict:
    """Parameter name -> tensor of a rebuildable distribution (``Independent`` unwrapped)."""
    while type(d) is Independent:
        d = d.base_dist
    return {k: d.__dict__[k] for k in _param_names(d)}


def rebuild(d, fn):
    """``d`` rebuilt with every parameter tensor ``t`` replaced by ``fn(t)``; raises Unsupported."""
    if type(d) is Independent:
        return Independent(rebuild(d.base_dist, fn), d.reinterpreted_batch_ndims, validate_args=False)
    names = _param_names(d)
    accepts = _constructor(type(d))
    optional = {"validate_args", "probs", "logits"}
    if any(k not in names and k not in optional for k in accepts) or any(k not in accepts for k in names):
        raise Unsupported
    kw = {k: fn(d.__dict__[k]) for k in names}
    if "validate_args" in accepts:
        kw["validate_args"] = False
    return type(d)(**kw)


def cast_dist(d, dtype=None, device=None):
    """``d`` with floating parameters in ``dtype`` on ``device`` (``d`` itself when they already are).

    Integer parameters (e.g. ``Binomial``'s counts as long) only move device. Returns ``d``
    unchanged when it cannot be rebuilt; callers cast what it returns instead.
    """
    if dtype is None and device is None:
        return d
    try:
        ps = params(d)
    except Unsupported:
        return d

    def off(t):
        return (device is not None and t.device != device) or (
            dtype is not None and t.is_floating_point() and t.dtype != dtype)

    if not any(off(t) for t in ps.values()):
        return d

    def conv(t):
        t = t.to(device) if device is not None else t
        return t.to(dtype) if dtype is not None and t.is_floating_point() else t

    try:
        return rebuild(d, conv)
    except Unsupported:
        return d


def gather_dist(d, idxs: list, target: list, Kps: list):
    """The distribution of particle k with parents at the drawn indices, from the grid-layout ``d``.

    ``d`` has batch shape broadcastable to ``[1, *K_pa, *plates]``; the result has batch
    shape ``[K_c, *plates]`` (or singletons) with parameters at ``(k, e)`` equal to those
    of ``d`` at ``(0, j_1[k, e], ..., j_n[k, e], e)``, ``idxs = [j_1, ..., j_n]`` each
    ``[K_c, *plates]`` with values below ``Kps = [K_1, ..., K_n]``. Parameters are
    gathered by indexing, so gradients reach them (and reparameterised samples carry them).
    Returns ``None`` when ``d`` cannot be rebuilt (the caller then evaluates the proposal
    on gathered parent particles).
    """
    full = [1] + list(Kps) + list(target[1:])
    bs = tuple(d.batch_shape)
    if len(bs) > len(full):
        return None
    lead = len(full) - len(bs)
    sizes = [1] * lead + list(bs)
    if sizes[0] != 1:
        return None
    if any(b not in (1, f) for b, f in zip(sizes, full)):
        return None
    try:
        return rebuild(d, lambda t: _gather_param(t, len(bs), lead, full, idxs, target))
    except Unsupported:
        return None


def _gather_param(t, nb: int, lead: int, full: list, idxs: list, target: list) -> torch.Tensor:
    """Gather one parameter ``[*batch (nb dims), *rest]`` (batch right-aligned to ``full``) at the drawn indices."""
    if not torch.is_tensor(t) or t.dim() < nb:
        raise Unsupported
    rest = tuple(t.shape[nb:])
    t = t.reshape([1] * lead + list(t.shape))
    if any(b not in (1, f) for b, f in zip(t.shape[: len(full)], full)):
        raise Unsupported
    n = len(idxs)
    psz = list(t.shape[1:1 + n])
    if all(k == 1 for k in psz):  # Q ignores its latent parents: no gather needed
        return t.reshape([1] + list(t.shape[1 + n:]))
    pl = len(target) - 1
    index = []
    for j, k in zip(idxs, psz):
        index.append(j if k != 1 else torch.zeros((), dtype=torch.long, device=t.device))
    for i in range(pl):
        if t.shape[1 + n + i] == 1:
            index.append(torch.zeros((), dtype=torch.long, device=t.device))
        else:
            shape = [1] * (1 + pl)
            shape[1 + i] = target[1 + i]
            index.append(torch.arange(target[1 + i], device=t.device).reshape(shape))
    out = t[0][tuple(index)]  # [K_c, *plates, *rest]
    return out.reshape(list(out.shape[: 1 + pl]) + list(rest))


def flatten(d) -> tuple:
    """``(spec, tensors)`` of a rebuildable distribution: its hashable structure and its parameters.

    :func:`unflatten` inverts it. Raises :class:`Unsupported` for distributions
    :func:`rebuild` cannot handle.
    """
    if type(d) is Independent:
        spec, ts = flatten(d.base_dist)
        return ("independent", d.reinterpreted_batch_ndims, spec), ts
    names = _param_names(d)
    accepts = _constructor(type(d))
    optional = {"validate_args", "probs", "logits"}
    if any(k not in names and k not in optional for k in accepts) or any(k not in accepts for k in names):
        raise Unsupported
    return ("dist", type(d), tuple(names), "validate_args" in accepts), tuple(d.__dict__[k] for k in names)


def unflatten(spec: tuple, tensors) -> object:
    """The distribution of :func:`flatten`'s ``spec`` with parameters ``tensors``."""
    if spec[0] == "independent":
        return Independent(unflatten(spec[2], tensors), spec[1], validate_args=False)
    _, cls, names, validate = spec
    kw = dict(zip(names, tensors))
    if validate:
        kw["validate_args"] = False
    return cls(**kw)
