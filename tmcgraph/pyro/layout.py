"""Moving tensors and distributions between tmcgraph's particle layout and Pyro's plate layout.

tmcgraph hands a variable's callable each parent laid out as
``[sample dims..., the variable's plates..., event]`` (:func:`tmcgraph.particles.place`).
Pyro's convention, the one its own parallel enumeration uses, puts every plate at a fixed
dim counted from the right of the batch shape (``plate(..., dim=-1)`` is the rightmost
batch dim) with ``max_plate_nesting`` positions reserved, and enumeration (here: sample)
dims to the left of them::

    tmcgraph:  [K_1, ..., K_L, N_a, N_b, *event]          (the site's plates, in dim order)
    Pyro:      [K_1, ..., K_L, 1, ..., N_a, ..., N_b, *event]   (max_plate_nesting positions)

Plates are declared in tmcgraph in the order of their Pyro dims (most negative first), so
both layouts order a site's plates alike and converting a tensor is a reshape that adds
or removes singleton positions (:func:`to_pyro`, :func:`from_pyro`). A distribution a Pyro
site returns has batch shape ``[K..., positions...]``; :func:`relayout` removes the
positions of plates the site is not in, by rebuilding the distribution with reshaped
parameters (the families :mod:`tmcgraph.sampling.reflect` can rebuild, through
``Independent``), or else by wrapping it in :class:`Relaid`, a distribution that inserts
and removes the positions around every call.
"""

from __future__ import annotations

import torch
from torch.distributions import Distribution, Independent

from ..errors import TMCGraphError
from ..sampling.reflect import Unsupported, params
from ..sampling.samplers import draw_sample, register_sampler

__all__ = ["to_pyro", "from_pyro", "pyro_shape", "relayout", "Relaid"]


def pyro_shape(sizes: dict, positions: dict, m: int) -> list:
    """The ``m`` plate positions of a site: ``sizes[p]`` at ``positions[p]`` (negative dim), 1 elsewhere."""
    shape = [1] * m
    for p, pos in positions.items():
        shape[m + pos] = sizes[p]
    return shape


def to_pyro(t: torch.Tensor, positions: tuple, m: int, event_dim: int) -> torch.Tensor:
    """``t`` laid out ``[lead..., plates..., event]`` as ``[lead..., m positions, event]``.

    ``positions`` are the plates' (negative) Pyro dims, ascending.
    """
    n = len(positions)
    lead = t.dim() - n - event_dim
    if lead < 0:
        raise TMCGraphError(f"a value of shape {tuple(t.shape)} has fewer dims than its {n} plate(s) and "
                            f"{event_dim} event dim(s)")
    shape = list(t.shape[:lead]) + [1] * m + list(t.shape[t.dim() - event_dim:])
    for i, pos in enumerate(positions):
        shape[lead + m + pos] = t.shape[lead + i]
    return t.reshape(shape)


def from_pyro(t: torch.Tensor, name: str, plates: tuple, positions: tuple, sizes: tuple, m: int,
              event_dim: int) -> torch.Tensor:
    """A value Pyro produced at a site (batch right-aligned, no sample dims) as ``[plate sizes..., event]``.

    Raises:
        TMCGraphError: a batch dim that is not one of the site's plates, or a plate dim of
            the wrong size.
    """
    nb = t.dim() - event_dim
    if nb > m:
        raise TMCGraphError(f"site {name!r}: value of shape {tuple(t.shape)} has {nb} batch dim(s) but "
                            f"max_plate_nesting={m}; declare batch dims with pyro.plate or .to_event()")
    full = [1] * (m - nb) + list(t.shape[:nb])
    want = pyro_shape(dict(zip(plates, sizes)), dict(zip(plates, positions)), m)
    for j in range(m):
        if full[j] not in (1, want[j]):
            pos = j - m
            who = [p for p, q in zip(plates, positions) if q == pos]
            what = f"plate {who[0]!r} of size {want[j]}" if who else "no plate of the site"
            raise TMCGraphError(f"site {name!r}: value of shape {tuple(t.shape)} has size {full[j]} at dim {pos}, "
                                f"where it has {what}; use pyro.plate or .to_event() for batch dims")
    ev = list(t.shape[nb:])
    t = t.reshape(full + ev).expand(want + ev)
    return t.reshape([want[m + pos] for pos in positions] + ev)  # the other positions are singletons


def _drops(name: str, bs: tuple, member: set, m: int) -> list:
    """Indices into ``bs`` of plate positions the site is not in (checked to be singletons)."""
    out = []
    for pos in range(-m, 0):
        i = len(bs) + pos
        if i < 0 or pos in member:
            continue
        if bs[i] != 1:
            raise TMCGraphError(f"site {name!r}: distribution has batch shape {tuple(bs)}, with size {bs[i]} at dim "
                                f"{pos}, which is not a plate dim of the site; use pyro.plate or .to_event()")
        out.append(i)
    return out


def relayout(d: Distribution, name: str, positions: tuple, m: int, dtype=None, device=None) -> Distribution:
    """The distribution of a Pyro site in tmcgraph's layout: batch ``[lead..., the site's plates...]``.

    ``positions`` are the (negative) dims of the site's plates. Pyro's ``Independent`` is
    returned as torch's (so tmcgraph can rebuild it); floating parameters are cast to
    ``dtype``/``device`` when given.
    """
    drop = _drops(name, tuple(d.batch_shape), set(positions), m)
    try:
        return _rebuild(d, drop, dtype, device)
    except Unsupported:
        pass
    if not drop:
        return d
    return Relaid(d, [i - len(d.batch_shape) for i in drop])


def _convert(t, dtype, device):
    if device is not None and t.device != device:
        t = t.to(device)
    if dtype is not None and t.is_floating_point() and t.dtype != dtype:
        t = t.to(dtype)
    return t


def _rebuild(d, drop: list, dtype, device):
    """``d`` with batch indices ``drop`` removed (and parameters cast); raises Unsupported."""
    if isinstance(d, Independent):
        base = _rebuild(d.base_dist, drop, dtype, device)
        return Independent(base, d.reinterpreted_batch_ndims, validate_args=False)
    if not drop and dtype is None and device is None:
        return d
    ps = params(d)  # raises Unsupported for families it cannot read
    accepts = _constructor_args(type(d))
    if any(k not in accepts for k in ps):
        raise Unsupported
    nb = len(d.batch_shape)
    kw = {}
    for k, t in ps.items():
        if t.dim() < nb:
            raise Unsupported
        shape = [s for i, s in enumerate(t.shape[:nb]) if i not in drop] + list(t.shape[nb:])
        kw[k] = _convert(t.reshape(shape), dtype, device)
    if "validate_args" in accepts:
        kw["validate_args"] = False
    try:
        return type(d)(**kw)
    except (TypeError, ValueError) as e:
        raise Unsupported from e


_ARGS: dict = {}


def _constructor_args(cls) -> tuple:
    import inspect

    if cls not in _ARGS:
        try:
            sig = inspect.signature(cls.__init__)
            kinds = [p.kind for p in sig.parameters.values()]
            ok = not any(k in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD) for k in kinds)
            _ARGS[cls] = tuple(k for k in sig.parameters if k != "self") if ok else None
        except (TypeError, ValueError):
            _ARGS[cls] = None
    if _ARGS[cls] is None:
        raise Unsupported
    return _ARGS[cls]


class Relaid(Distribution):
    """``base`` with singleton batch dims removed: values and results get them inserted and removed.

    Args:
        base: The distribution (batch shape with singletons at ``drop``).
        drop: Negative indices into ``base.batch_shape`` of the singleton dims to hide.
    """

    arg_constraints: dict = {}

    def __init__(self, base: Distribution, drop: list):
        self.base = base
        self.drop = sorted(int(i) for i in drop)
        bs = [s for i, s in enumerate(base.batch_shape) if i - len(base.batch_shape) not in self.drop]
        super().__init__(torch.Size(bs), base.event_shape, validate_args=False)

    @property
    def support(self):
        return self.base.support

    @property
    def has_rsample(self):
        return self.base.has_rsample

    @property
    def has_enumerate_support(self):
        return self.base.has_enumerate_support

    def _insert(self, value: torch.Tensor) -> torch.Tensor:
        """``[..., batch, event]`` -> ``[..., base batch, event]``."""
        e = len(self.event_shape)
        nb = len(self.base.batch_shape)
        lead = value.dim() - e - len(self.batch_shape)
        if lead < 0:  # right-aligned broadcasting value: pad it first
            value = value.reshape([1] * -lead + list(value.shape))
            lead = 0
        shape = list(value.shape[:lead])
        it = iter(value.shape[lead:value.dim() - e])
        for i in range(nb):
            shape.append(1 if i - nb in self.drop else next(it))
        return value.reshape(shape + list(value.shape[value.dim() - e:]))

    def _remove(self, t: torch.Tensor, event_dims: int) -> torch.Tensor:
        """``[..., base batch, *event_dims]`` -> ``[..., batch, *event_dims]``."""
        nb = len(self.base.batch_shape)
        lead = t.dim() - event_dims - nb
        keep = [i for i in range(nb) if i - nb not in self.drop]
        shape = list(t.shape[:lead]) + [t.shape[lead + i] for i in keep] + list(t.shape[t.dim() - event_dims:])
        return t.reshape(shape)

    def log_prob(self, value):
        return self._remove(self.base.log_prob(self._insert(value)), 0)

    def rsample(self, sample_shape=torch.Size()):
        return self._remove(self.base.rsample(sample_shape), len(self.event_shape))

    def sample(self, sample_shape=torch.Size()):
        return self._remove(self.base.sample(sample_shape), len(self.event_shape))

    def enumerate_support(self, expand=True):
        return self._remove(self.base.enumerate_support(expand), len(self.event_shape))

    def expand(self, batch_shape, _instance=None):
        batch_shape = list(batch_shape)
        extra = len(batch_shape) - len(self.batch_shape)
        nb = len(self.base.batch_shape)
        it = iter(batch_shape[extra:])
        full = batch_shape[:extra] + [1 if i - nb in self.drop else next(it) for i in range(nb)]
        return Relaid(self.base.expand(torch.Size(full)), self.drop)

    @property
    def mean(self):
        return self._remove(self.base.mean, len(self.event_shape))

    @property
    def variance(self):
        return self._remove(self.base.variance, len(self.event_shape))

    def entropy(self):
        return self._remove(self.base.entropy(), 0)

    def __repr__(self):
        return f"Relaid({self.base!r}, drop={self.drop})"


@register_sampler(Relaid)
def _sample_relaid(d: Relaid, sample_shape, generator):
    return d._remove(draw_sample(d.base, sample_shape, generator), len(d.event_shape))
