"""Markov plates: time-shifted views of the particles, and drawing latents along a chain.

A variable in a Markov plate ``p`` of length ``T`` may take ``<u>_prev`` parents, the
value of ``u`` at the previous element. Everything is evaluated on *views* of the
particles narrowed along ``p`` (:func:`markov_view`): the view of elements
``[start, stop)`` holds every variable's values there and, under the name
``<u>_prev``, the values of ``u`` at ``[start - 1, stop - 1)``. Its sample dim is
``_prev_<dim>`` (:func:`prev_dim`) when ``u``'s dim is local to ``p`` (one index per
element: at element ``t`` the previous particle index is ``k_{t-1}``, which the
contraction ties to ``u``'s dim by a Markov pair of :class:`tmcgraph.ops.FactorGraph`),
or ``u``'s own dim otherwise (a dim shared along ``p``, e.g. IWAE's joint samples:
particle ``k`` is a whole trajectory). So one call of the user's callable covers all
elements ``t = 1 .. T-1``; ``init`` covers ``t = 0``.

Drawing (:func:`draw_markov`). A proposal without its own previous value draws all
elements in two calls (``init``, then ``t >= 1`` with earlier latents' previous values
as parents). With ``<name>_prev`` it draws element by element: at ``t`` each particle
extends a previous particle chosen by the latent's coupling (paired: ``k_{t-1} = k``;
mixture / permutation: uniform / permuted), and its density is the coupling's density
given the previous particles, e.g. ``(1/K) sum_j Q(z_t^k | z_{t-1}^j)`` for the mixture.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from ..errors import TMCGraphError
from ..particles import Deferred, Samples

__all__ = ["prev_dim", "markov_view", "prev_pairs", "draw_markov", "markov_log_density", "per_element_counts",
           "check_counts"]


def prev_dim(dim: str) -> str:
    """Name of the sample dim holding the previous element's index of ``dim``."""
    return f"_prev_{dim}"


def _narrow(t, axis: int, start: int, stop: int):
    if isinstance(t, Deferred):
        t = t()
    return t.narrow(axis, start, stop - start)


def markov_view(s: Samples, plate: str, start: int, stop: int, prev: dict = None, extra: dict = None) -> Samples:
    """The particles at elements ``[start, stop)`` of Markov plate ``plate``, with previous values.

    Args:
        s: The particles (and data).
        plate: The Markov plate.
        start: First element (``>= 1`` when ``prev`` is given).
        stop: One past the last element.
        prev: ``<u>_prev`` name -> ``u``: add ``u``'s values at ``[start - 1, stop - 1)``.
        extra: ``<u>_prev`` name -> ``(values, u, dim, ordinal)``: previous values given
            directly (``values`` already at the view's elements), for a latent being
            drawn (its sample dim and that dim's ordinal).

    Returns:
        A :class:`~tmcgraph.particles.Samples` whose plate ``plate`` has size
        ``stop - start``.
    """
    prev = prev or {}
    extra = extra or {}
    if (prev or extra) and start < 1:
        raise TMCGraphError(f"Markov plate {plate!r}: element {start} has no previous element")
    values, data, log_q = {}, {}, {}
    for n, v in s.values.items():
        pl = s.plates[n]
        values[n] = _narrow(v, 1 + pl.index(plate), start, stop) if plate in pl else v
    for n, v in s.log_q.items():
        pl = s.plates[n]
        log_q[n] = _narrow(v, 1 + pl.index(plate), start, stop) if plate in pl else v
    for n, v in s.data.items():
        pl = s.plates[n]
        data[n] = _narrow(v, pl.index(plate), start, stop) if plate in pl else v
    dims, sizes, ordinals = dict(s.dims), dict(s.sizes), dict(s.ordinals)
    plates = dict(s.plates)

    def add_prev(name, u, vals, d=None, ordinal=None):
        plates[name] = s.plates[u]
        if d is None and u in s.dims:
            d, ordinal = s.dims[u], s.ordinals[s.dims[u]]
        if d is None:
            data[name] = vals
            return
        if plate in ordinal:
            pd = prev_dim(d)
            dims[name], sizes[pd], ordinals[pd] = pd, int(vals.shape[0]), tuple(ordinal)
        else:
            dims[name] = d
        values[name] = vals

    for name, u in prev.items():
        if name in extra:
            continue
        pl = s.plates[u]
        if u in s.values:
            add_prev(name, u, _narrow(s.values[u], 1 + pl.index(plate), start - 1, stop - 1))
        elif u in s.data:
            add_prev(name, u, _narrow(s.data[u], pl.index(plate), start - 1, stop - 1))
        else:
            raise TMCGraphError(f"previous value {name!r}: {u!r} is not drawn yet")
    for name, (vals, u, d, ordinal) in extra.items():
        add_prev(name, u, vals, d, ordinal)
    sizes_p = dict(s.plate_sizes, **{plate: stop - start})
    return dataclasses.replace(s, values=values, data=data, log_q=log_q, dims=dims, sizes=sizes,
                               ordinals=ordinals, plates=plates, plate_sizes=sizes_p)


def prev_pairs(model, s: Samples) -> dict:
    """Markov plate -> ``((prev_dim, dim), ...)`` the model's factors use at particles ``s``."""
    out = {}
    for v in model.variables.values():
        if v.markov is not None and s.plate_sizes[v.markov] < 2:
            continue  # one element: no previous values
        for u in v.prev.values():
            d = s.dims.get(u)
            if d is not None and v.markov in s.ordinals[d]:
                pair = (prev_dim(d), d)
                if pair not in out.setdefault(v.markov, []):
                    out[v.markov].append(pair)
    return {p: tuple(pairs) for p, pairs in out.items()}


def _init_var(q):
    return dataclasses.replace(q, fn=q.init.fn, parents=q.init.parents, by_keyword=q.init.by_keyword, init=None,
                               prev={}, markov=None)


def _site(Site, name, var, proposal, view, K, plates, ctx, dim, detach):
    return Site(name, var, proposal, view, K, plates, [view.plate_sizes[p] for p in plates], ctx, dim, detach, False)


def draw_markov(Site, name, q, proposal, s: Samples, coupling, K: int, dim: str, ordinal: tuple, ctx,
                detach: bool = False):
    """Draw latent ``name`` whose proposal ``q`` takes previous values along its Markov plate.

    Returns:
        ``(z [K, *plates, *event], log_q [K, *plates])``.
    """
    plate = q.markov
    T = s.plate_sizes[plate]
    plates = q.plates
    ax = 1 + plates.index(plate)
    own = f"{name}_prev" if name in q.prev.values() else None
    v0 = markov_view(s, plate, 0, 1)
    z0, lq0 = coupling.sample(_site(Site, name, _init_var(q), proposal, v0, K, plates, ctx, dim, detach))
    if T == 1:
        return z0, lq0
    others = {p: u for p, u in q.prev.items() if u != name}
    if own is None:
        view = markov_view(s, plate, 1, T, others)
        z1, lq1 = coupling.sample(_site(Site, name, q, proposal, view, K, plates, ctx, dim, detach))
        return torch.cat([z0, z1], ax), torch.cat([lq0, lq1], ax)
    zs, lqs = [z0], [lq0]
    steps = q.K_steps
    for t in range(1, T):
        prev = zs[-1] if steps is None else zs[-1].narrow(0, 0, steps[t - 1])  # only weighted particles
        view = markov_view(s, plate, t, t + 1, others, {own: (prev, name, dim, ordinal)})
        z, lq = coupling.sample(_site(Site, name, q, proposal, view, K, plates, ctx, dim, detach))
        zs.append(z)
        lqs.append(lq)
    return torch.cat(zs, ax), torch.cat(lqs, ax)


def markov_log_density(Site, name, q, proposal, s: Samples, coupling, z: torch.Tensor, dim: str, ordinal: tuple,
                       ctx, detach: bool = False) -> torch.Tensor:
    """Re-evaluate the density the Markov latent's particles ``z`` were drawn from, for all elements at once."""
    plate = q.markov
    T = s.plate_sizes[plate]
    plates = q.plates
    ax = 1 + plates.index(plate)
    K = int(z.shape[0])
    v0 = markov_view(s, plate, 0, 1)
    lq0 = coupling.log_density(_site(Site, name, _init_var(q), proposal, v0, K, plates, ctx, dim, detach),
                               z.narrow(ax, 0, 1))
    if T == 1:
        return lq0
    others = {p: u for p, u in q.prev.items() if u != name}
    if q.K_steps is not None and name in q.prev.values():  # each element's parents: the weighted ones
        lqs = [lq0]
        for t in range(1, T):
            prev = z.narrow(ax, t - 1, 1).narrow(0, 0, q.K_steps[t - 1])
            view = markov_view(s, plate, t, t + 1, others, {f"{name}_prev": (prev, name, dim, ordinal)})
            site = _site(Site, name, q, proposal, view, K, plates, ctx, dim, detach)
            lqs.append(coupling.log_density(site, z.narrow(ax, t, 1)))
        return torch.cat(lqs, ax)
    extra = {f"{name}_prev": (z.narrow(ax, 0, T - 1), name, dim, ordinal)} if name in q.prev.values() else {}
    view = markov_view(s, plate, 1, T, others, extra)
    site = _site(Site, name, q, proposal, view, K, plates, ctx, dim, detach)
    lq1 = coupling.log_density(site, z.narrow(ax, 1, T - 1))
    return torch.cat([lq0, lq1], ax)


def check_counts(q, plates_info, plate_sizes) -> str:
    """The Markov plate of a latent with a K per element; raises unless there is one count per element."""
    plate = next(p for p in q.plates if plates_info[p].markov)
    T = plate_sizes[plate]
    if len(q.K_steps) != T:
        raise TMCGraphError(f"proposal for {q.name!r}: K has {len(q.K_steps)} per-element counts but Markov plate "
                            f"{plate!r} has {T} elements")
    return plate


def per_element_counts(q, plates_info, log_q, plate_sizes) -> torch.Tensor:
    """``log_q`` of a latent with a K per element (``K=[k_0, ...]``) along its Markov plate.

    ``max(K)`` particles were drawn at every element; at element ``t`` those with index
    ``>= k_t`` get ``log q = +inf`` (their factor is ``-inf``: no weight) and the others
    ``log q + log(k_t / max K)``, so that with the factor's ``-log max K`` the estimator
    averages over the ``k_t`` weighted particles: ``-log k_t``.

    Args:
        q: The proposal declaration (``q.K_steps`` set).
        plates_info: Plate name -> :class:`~tmcgraph.model.Plate` (to find the Markov one).
        log_q: ``[max K, *plate sizes]`` densities.
        plate_sizes: Plate name -> size.
    """
    if isinstance(log_q, Deferred):
        log_q = log_q()
    plate = check_counts(q, plates_info, plate_sizes)
    T = plate_sizes[plate]
    K = log_q.shape[0]
    ax = 1 + q.plates.index(plate)
    shape = [1] * log_q.dim()
    shape[ax] = T
    ks = torch.tensor(q.K_steps, dtype=log_q.dtype, device=log_q.device).reshape(shape)
    shape = [1] * log_q.dim()
    shape[0] = K
    j = torch.arange(K, device=log_q.device).reshape(shape)
    adj = torch.where(j < ks, torch.log(ks / K), torch.full_like(ks, math.inf))
    return log_q + adj
