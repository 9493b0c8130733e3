"""Binding data and drawing K particles per latent from the proposal.

Layout. A latent's particles are a tensor ``[K, *plate sizes, *event]``: one leading
sample dim, then the variable's plates in the model's plate order. When a callable is
evaluated, every input is *placed* into a local layout ``[sample dims..., plates...,
event]`` in which each parent keeps its own sample dim (size K) and every other
position is a singleton. Networks therefore see each parent sample once (cost linear
in K, the paper's section 2.4) and broadcasting builds the K x K grid only in the
log-density.

Couplings for a latent whose proposal has latent parents (the paper's appendix 7.2;
the density in the denominator is the one the sample was drawn from):

* ``paired``: sample k is drawn from Q(. | z_pa^k); log q = log Q(z^k | z_pa^k).
* ``mixture``: sample k draws a parent index j ~ U{1..K} per parent (and per plate
  element), then z^k ~ Q(. | z_pa^j); log q = log (1/K) sum_j Q(z^k | z_pa^j).
  The callable is evaluated once, on every parent particle (grid layout): the same
  distribution gives the density grid and, with its parameters gathered at the drawn
  j, the distribution z^k is drawn from (see :func:`_gather_dist` for the supported
  families; others, and ``detach_proposal``, evaluate a second time).
* enumeration: the particles are the support, log q = -log |support|.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from .errors import TMCGraphError
from .graph import Model, Proposal

__all__ = [
    "Samples",
    "bind_data",
    "place",
    "draw",
    "proposal_log_q",
    "check_batch_shape",
    "execution_context",
    "SHARED_DIM",
]

#: Name of the single sample dim shared by all sampled latents in IWAE mode.
SHARED_DIM = "_shared"


@dataclass
class Samples:
    """Particles drawn from a proposal, with their bookkeeping.

    Attributes:
        values: Latent name -> particles ``[K, *plate sizes, *event]``.
        dims: Latent name -> name of its sample dim.
        sizes: Sample dim name -> number of particles.
        levels: Sample dim name -> plates it is local to (one index set per element).
        log_q: Latent name -> ``[K, *plate sizes]`` log density each particle was drawn from.
        data: Observed name -> data tensor ``[*plate sizes, *event]``.
        plate_sizes: Plate name -> size.
        plates: Variable name -> its plates.
        order: Sampling order.
    """

    values: dict
    dims: dict
    sizes: dict
    levels: dict
    log_q: dict
    data: dict
    plate_sizes: dict
    plates: dict = field(default_factory=dict)
    order: list = field(default_factory=list)

    def dims_of(self, name: str) -> tuple:
        """Sample dims carried by variable ``name`` itself (empty for observed)."""
        return (self.dims[name],) if name in self.dims else ()

    def value(self, name: str) -> torch.Tensor:
        """Particles of a latent or the data of an observed variable."""
        return self.values[name] if name in self.values else self.data[name]


@contextlib.contextmanager
def execution_context(device=None, dtype=None, seed=None):
    """Run user callables on ``device`` with default ``dtype``, seeded without touching global RNG state.

    Args:
        device: A ``torch.device`` (factory functions and Python numbers land there), or ``None``.
        dtype: Default floating dtype while inside, or ``None``.
        seed: An int or a ``torch.Generator`` (a seed is drawn from it); the global RNG
            state is restored on exit. ``None``: use the global RNG.
    """
    prev = torch.get_default_dtype()
    with contextlib.ExitStack() as stack:
        if isinstance(seed, torch.Generator):
            seed = int(torch.randint(0, 2**62, (), generator=seed))
        if seed is not None:
            devices = [device] if device is not None and device.type == "cuda" else []
            stack.enter_context(torch.random.fork_rng(devices=devices))
            torch.manual_seed(seed)
        if device is not None:
            stack.enter_context(device)
        if dtype is not None:
            torch.set_default_dtype(dtype)
        try:
            yield
        finally:
            torch.set_default_dtype(prev)


def bind_data(model: Model, data: dict, device=None, dtype=None):
    """Validate observed data and infer plate sizes.

    Args:
        model: The model.
        data: Observed name -> tensor ``[*plate sizes, *event]``.
        device: Optional device to move data to.
        dtype: Optional floating dtype for floating data.

    Returns:
        ``(data, plate_sizes)`` with tensors converted and sizes of every plate.

    Raises:
        TMCGraphError: missing or extra data, non-finite values, plate size mismatch.
    """
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
        if device is not None:
            x = x.to(device)
        if dtype is not None and x.is_floating_point():
            x = x.to(dtype)
        if x.is_floating_point() or x.is_complex():
            if not bool(torch.isfinite(x).all()):
                bad = (~torch.isfinite(x)).nonzero()[0].tolist()
                raise TMCGraphError(f"data for {n!r} has non-finite values (first at index {bad})")
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


def place(t: torch.Tensor, t_dims: tuple, t_plates: tuple, dims: tuple, plates: tuple) -> torch.Tensor:
    """Reshape ``t`` (``[*t_dims, *t_plates, *event]``) into the layout ``[*dims, *plates, *event]``.

    Positions ``t`` lacks become singletons. ``t_dims`` (at most one dim) must be in
    ``dims``. Plates of ``t`` missing from ``plates`` become trailing dims in front of
    the event dims (in ``t``'s plate order).
    """
    lead = len(t_dims) + len(t_plates)
    extra = [p for p in t_plates if p not in plates]
    if extra:
        # Plates of ``t`` outside the target (observed data in deeper plates seen by a
        # proposal) move behind the target plates and travel with the event dims.
        nd = len(t_dims)
        inner = [nd + i for i, p in enumerate(t_plates) if p in plates]
        outer = [nd + i for i, p in enumerate(t_plates) if p not in plates]
        t = t.permute(list(range(nd)) + inner + outer + list(range(lead, t.dim())))
        t_plates = tuple(p for p in t_plates if p in plates)
        lead = nd + len(t_plates)
    shape = []
    for d in dims:
        shape.append(t.shape[t_dims.index(d)] if d in t_dims else 1)
    for p in plates:
        shape.append(t.shape[len(t_dims) + t_plates.index(p)] if p in t_plates else 1)
    return t.reshape(shape + list(t.shape[lead:]))


def check_batch_shape(name: str, role: str, d, target: list, labels: list) -> None:
    """Raise unless ``d.batch_shape`` broadcasts (right-aligned) to ``target``."""
    bs = tuple(d.batch_shape)
    ok = len(bs) <= len(target) and all(
        b in (1, t) for b, t in zip(bs[::-1], target[::-1])
    )
    if not ok:
        want = ", ".join(f"{lab}={t}" for lab, t in zip(labels, target))
        raise TMCGraphError(
            f"{role} distribution of {name!r} has batch shape {bs} (event shape {tuple(d.event_shape)}); "
            f"expected a shape broadcastable to [{want}] (sample dims, then plates)"
        )


def _inputs(var, samples: Samples, dims: tuple, plates: tuple, rename: Optional[dict] = None) -> dict:
    """Parent values of ``var`` placed into the layout ``[*dims, *plates, ...]``.

    ``rename`` maps a parent to a tensor and dim that replace its particles (paired
    and gathered mixture parents).
    """
    vals = {}
    for p in var.parents:
        if rename and p in rename:
            t, tdim = rename[p]
            vals[p] = place(t, (tdim,), plates, dims, plates)
        elif p in samples.values:
            vals[p] = place(samples.values[p], samples.dims_of(p), samples.plates[p], dims, plates)
        else:
            vals[p] = place(samples.data[p], (), samples.plates[p], dims, plates)
    return vals


def _draw_one(d, shape: torch.Size):
    bs = tuple(d.batch_shape)
    n = len(shape) - len(bs)
    if n >= 0 and tuple(shape[n:]) == bs:  # leading sample dims only: no expanded copy of d
        return d.rsample(shape[:n]) if d.has_rsample else d.sample(shape[:n])
    d = d.expand(shape)
    return d.rsample() if d.has_rsample else d.sample()


def _log_prob_at(d, z: torch.Tensor, shape: list) -> torch.Tensor:
    """``d.log_prob(z)`` with batch shape ``shape``, ``d``'s batch shape broadcasting to it."""
    lp = d.log_prob(z)
    return lp if list(lp.shape) == list(shape) else lp.expand(shape)


def draw(
    model: Model,
    proposal: Proposal,
    data: dict,
    K: int,
    shared: bool = False,
    device=None,
    dtype=None,
    detach_proposal: bool = False,
) -> Samples:
    """Draw particles for every latent in the proposal's topological order.

    Args:
        model: The model P.
        proposal: The proposal Q.
        data: Observed name -> tensor.
        K: Default number of particles per latent.
        shared: IWAE mode: all sampled latents share one sample dim of size ``K``
            (joint samples, so every non-factorised proposal is paired), local to the
            plates every sampled latent lies in (per data point when no latent is global).
        device: Optional device for data.
        dtype: Optional floating dtype for data.
        detach_proposal: Evaluate ``log_q`` with the proposal's parameters detached
            (sticking-the-landing, Roeder et al. 2017): gradients reach the proposal
            only through the reparameterised particles. Parameters must be registered
            on the proposal (``nn.Module`` callables).

    Returns:
        The :class:`Samples`.
    """
    if int(K) != K or K < 1:
        raise TMCGraphError(f"K must be a positive integer, got {K!r}")
    order = proposal.validate()
    data, plate_sizes = bind_data(model, data, device, dtype)
    s = Samples({}, {}, {}, {}, {}, data, plate_sizes)
    s.plates = {n: v.plates for n, v in model.variables.items()}
    s.order = order
    # IWAE: one joint sample index per element of the plates every sampled latent shares.
    sampled = [proposal[n].plates for n in order if not proposal[n].enumerate]
    shared_level = tuple(p for p in model.plates if all(p in pl for pl in sampled)) if sampled else ()
    for name in order:
        q = proposal[name]
        plates = q.plates
        pshape = [plate_sizes[p] for p in plates]
        if q.enumerate:
            _enumerate(name, model[name], s, plates, pshape)
            continue
        Kc = int(K) if shared else int(q.K or K)
        dim = SHARED_DIM if shared else name
        if shared and q.K is not None and q.K != K:
            raise TMCGraphError(f"IWAE shares one sample dim of size K={K}; proposal for {name!r} sets K={q.K}")
        latent_parents = [p for p in q.parents if p in s.values]
        coupling = "paired" if (shared or not latent_parents) else q.coupling
        rename = {}
        if coupling == "paired":
            for p in latent_parents:
                Kp = s.values[p].shape[0]
                if s.dims[p] != dim and Kp != Kc:
                    raise TMCGraphError(
                        f"paired coupling on edge {p!r} -> {name!r} needs equal K, got K[{p}]={Kp}, K[{name}]={Kc}; "
                        "use coupling='mixture' or equal K"
                    )
                if s.dims[p] != dim:
                    rename[p] = (_expand_plates(s, p, plates, pshape), dim)
        else:
            idxs = []
            for p in latent_parents:
                Kp = s.values[p].shape[0]
                idx = torch.randint(Kp, (Kc, *pshape), device=s.values[p].device)
                idxs.append(idx)
                rename[p] = (_GatheredParent(s, p, plates, pshape, idx), dim)
        dims = (dim,)
        grid = None
        d = None
        if coupling == "mixture" and not detach_proposal:
            # One network pass: the grid-layout distribution (every parent particle at
            # its own position) gives both the sampling distribution (its parameters
            # gathered at the drawn parent indices) and the mixture density.
            grid = _mixture_grid(q, s, name, dim, latent_parents)
            if len(grid[1]) == len(latent_parents):
                d = _gather_dist(grid[0], idxs, [Kc] + pshape, [s.values[p].shape[0] for p in latent_parents])
        if d is None:
            if rename:
                rename = {p: (r.value() if isinstance(r, _GatheredParent) else r, dd) for p, (r, dd) in rename.items()}
            d = q.dist(_inputs(q, s, dims, plates, rename))
        check_batch_shape(name, "proposal", d, [Kc] + pshape, [f"K[{dim}]"] + list(plates))
        z = _draw_one(d, torch.Size([Kc] + pshape))
        if coupling == "paired" and not detach_proposal:
            log_q = _log_prob_at(d, z, [Kc] + pshape)  # reuse the sampling distribution
        elif grid is not None:
            log_q = _mixture_log_q(grid, z, dim, plates, pshape, s)
        else:
            log_q = _log_q(proposal, s, name, z, dim, coupling, detach_proposal)
        s.values[name] = z
        s.dims[name] = dim
        s.sizes[dim] = Kc
        s.levels[dim] = shared_level if shared else plates
        s.log_q[name] = log_q
    return s


def _log_q(proposal: Proposal, s: Samples, name: str, z: torch.Tensor, dim: str, coupling: str, detach: bool):
    """Log density of particles ``z`` of ``name`` under the coupling they were drawn with."""
    q = proposal[name]
    plates = q.plates
    pshape = [s.plate_sizes[p] for p in plates]
    latent_parents = [p for p in q.parents if p in s.values and p != name]
    K = z.shape[0]
    if coupling == "paired":
        rename = {p: (_expand_plates(s, p, plates, pshape), dim) for p in latent_parents if s.dims[p] != dim}
        inputs = _inputs(q, s, (dim,), plates, rename)
        return _with_params(proposal, detach, lambda: _log_prob_at(q.dist(inputs), z, [K] + pshape))
    # Mixture: average the density over every particle of every latent parent.
    pdims = tuple(dict.fromkeys(s.dims[p] for p in latent_parents))
    gdims = (dim,) + pdims
    zg = place(z, (dim,), plates, gdims, plates)
    lg = _with_params(proposal, detach, lambda: q.dist(_inputs(q, s, gdims, plates)).log_prob(zg))
    return _mixture_reduce(lg, K, pdims, pshape, s)


def _mixture_reduce(lg: torch.Tensor, K: int, pdims: tuple, pshape: list, s: Samples) -> torch.Tensor:
    """``log (1/prod K_pa) sum_j exp(lg)`` over the parent positions of a ``[K, *K_pa, *plates]`` grid."""
    lg = lg.expand([K] + [s.sizes[pd] for pd in pdims] + pshape)  # Q may ignore a parent
    red = list(range(1, 1 + len(pdims)))
    return torch.logsumexp(lg, dim=red) - sum(math.log(s.sizes[pd]) for pd in pdims)


class _GatheredParent:
    """Particles of a mixture parent gathered at the drawn indices, computed only if needed."""

    def __init__(self, s: Samples, p: str, plates: tuple, pshape: list, idx: torch.Tensor):
        self.args = (s, p, plates, pshape, idx)

    def value(self) -> torch.Tensor:
        s, p, plates, pshape, idx = self.args
        return _gather(_expand_plates(s, p, plates, pshape), idx)


def _mixture_grid(q, s: Samples, name: str, dim: str, latent_parents: list):
    """Evaluate the proposal of ``name`` once on all parent particles (grid layout).

    Returns ``(dist, pdims)``: the distribution with batch shape broadcastable to
    ``[1, *K_pa, *plates]`` (child position, one position per latent parent, plates)
    and the parents' sample dims.
    """
    pdims = tuple(dict.fromkeys(s.dims[p] for p in latent_parents))
    gdims = (dim,) + pdims
    return q.dist(_inputs(q, s, gdims, q.plates)), pdims


def _mixture_log_q(grid, z: torch.Tensor, dim: str, plates: tuple, pshape: list, s: Samples) -> torch.Tensor:
    """Mixture ``log q`` of particles ``z`` from the grid-layout distribution of :func:`_mixture_grid`."""
    d, pdims = grid
    zg = place(z, (dim,), plates, (dim,) + pdims, plates)
    return _mixture_reduce(d.log_prob(zg), z.shape[0], pdims, pshape, s)


def _gather_dist(d, idxs: list, target: list, Kps: list):
    """The distribution of sample k with parents at the drawn indices, from the grid-layout ``d``.

    ``d`` has batch shape broadcastable to ``[1, *K_pa, *plates]``; the result has batch
    shape ``[K_c, *plates]`` (or singletons) with parameters at ``(k, e)`` equal to those
    of ``d`` at ``(0, j_1[k, e], ..., j_n[k, e], e)``, ``idxs = [j_1, ..., j_n]`` each
    ``[K_c, *plates]`` with values below ``Kps = [K_1, ..., K_n]``. Parameters are
    gathered by indexing, so gradients reach them (and reparameterised samples carry them).

    Supported: ``Independent`` (recursively), and any distribution whose ``arg_constraints``
    parameters (one of ``probs``/``logits``, whichever was given) are tensor attributes
    and whose constructor takes exactly those (plus ``validate_args``): ``Normal``,
    ``Bernoulli``, ``Categorical``, ``deep.DiagNormal``, ... Returns ``None`` otherwise
    (the caller then evaluates the proposal on gathered parent particles).
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
        return _rebuild(d, len(bs), lambda t: _gather_param(t, len(bs), lead, full, idxs, target))
    except _Unsupported:
        return None


class _Unsupported(Exception):
    """A distribution whose parameters cannot be gathered."""


def _gather_param(t, nb: int, lead: int, full: list, idxs: list, target: list) -> torch.Tensor:
    """Gather one parameter ``[*batch (nb dims), *rest]`` (batch right-aligned to ``full``) at the drawn indices."""
    if not torch.is_tensor(t) or t.dim() < nb:
        raise _Unsupported
    rest = tuple(t.shape[nb:])
    t = t.reshape([1] * lead + list(t.shape))
    if any(b not in (1, f) for b, f in zip(t.shape[: len(full)], full)):
        raise _Unsupported
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


def _rebuild(d, nb: int, gather):
    """Rebuild ``d`` with every parameter replaced by ``gather(parameter)``."""
    from torch.distributions import Independent

    if type(d) is Independent:
        return Independent(_rebuild(d.base_dist, nb, gather), d.reinterpreted_batch_ndims, validate_args=False)
    names = list(getattr(type(d), "arg_constraints", {}) or {})
    if not names:
        raise _Unsupported
    if "probs" in names and "logits" in names:
        given = "logits" if "logits" in d.__dict__ else "probs"
        names = [k for k in names if k not in ("probs", "logits")] + [given]
    if not all(k in d.__dict__ and torch.is_tensor(d.__dict__[k]) for k in names):
        raise _Unsupported
    try:
        sig = inspect.signature(type(d).__init__)
    except (TypeError, ValueError):
        raise _Unsupported from None
    accepts = [k for k in sig.parameters if k != "self"]
    kinds = {k: sig.parameters[k].kind for k in accepts}
    if any(v in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD) for v in kinds.values()):
        raise _Unsupported
    optional = {"validate_args", "probs", "logits"}
    if any(k not in names and k not in optional for k in accepts) or any(k not in accepts for k in names):
        raise _Unsupported
    params = {k: gather(d.__dict__[k]) for k in names}
    if "validate_args" in accepts:
        params["validate_args"] = False
    return type(d)(**params)


def proposal_log_q(proposal: Proposal, samples: Samples, name: str, shared: bool = False,
                   detach_params: bool = False) -> torch.Tensor:
    """Re-evaluate ``log q`` of the particles of latent ``name`` (as recorded by :func:`draw`).

    The density is the one the particles were drawn from: Q(z^k | z_pa^k) for paired
    coupling (and proposals without latent parents), (1/prod K_pa) sum_j Q(z^k | z_pa^j)
    for the mixture coupling, -log |support| for enumerated latents. Gradients flow to
    the proposal's parameters (unless ``detach_params``) and to whatever the particles
    in ``samples`` carry; detach them first for score-function objectives.

    Args:
        proposal: The proposal that drew ``samples``.
        samples: The particles.
        name: A latent.
        shared: Whether the samples were drawn in IWAE mode (joint, paired).
        detach_params: Evaluate with the proposal's parameters detached.

    Returns:
        ``[K, *plate sizes]`` log densities.
    """
    if name not in samples.values:
        raise TMCGraphError(f"unknown latent {name!r}; the latents are {list(samples.values)}")
    q = proposal[name]
    if q.enumerate:
        return samples.log_q[name]
    latent_parents = [p for p in q.parents if p in samples.values]
    coupling = "paired" if (shared or not latent_parents) else q.coupling
    return _log_q(proposal, samples, name, samples.values[name], samples.dims[name], coupling, detach_params)


def _with_params(proposal: Proposal, detach: bool, fn):
    """Run ``fn()``, with the proposal's parameters and buffers detached if ``detach``."""
    if not detach:
        return fn()
    state = {k: v.detach() for k, v in list(proposal.named_parameters()) + list(proposal.named_buffers())}
    return torch.func.functional_call(proposal, state, (fn,))


def _expand_plates(s: Samples, p: str, plates: tuple, pshape: list) -> torch.Tensor:
    """Particles of ``p`` broadcast to the child's plates: ``[K_p, *pshape, *event]``."""
    v = s.values[p]
    t = place(v, (s.dims[p],), s.plates[p], (s.dims[p],), plates)
    return t.expand(v.shape[0], *pshape, *t.shape[1 + len(plates):])


def _gather(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``out[k, e...] = t[idx[k, e], e...]`` along dim 0 (event dims carried along)."""
    ev = t.dim() - idx.dim()
    full = idx.reshape(*idx.shape, *([1] * ev)).expand(idx.shape[0], *t.shape[1:])
    return torch.gather(t, 0, full)


def _enumerate(name, mvar, s: Samples, plates, pshape):
    """Particles of an enumerated latent: its support, shared by every plate element."""
    pdims = tuple(dict.fromkeys(s.dims[p] for p in mvar.parents if p in s.dims))
    d = mvar.dist(_inputs(mvar, s, pdims, plates))
    if not d.has_enumerate_support:
        raise TMCGraphError(
            f"latent {name!r} is marked for enumeration but {type(d).__name__} has no enumerable support"
        )
    sup = d.enumerate_support(expand=False)
    n = sup.shape[0]
    ev = tuple(d.event_shape)
    sup = sup.reshape(n, *ev)
    z = sup.reshape(n, *([1] * len(plates)), *ev).expand(n, *pshape, *ev)
    s.values[name] = z
    s.dims[name] = name
    s.sizes[name] = n
    s.levels[name] = plates
    s.log_q[name] = torch.full((n, *pshape), -math.log(n), dtype=torch.get_default_dtype(), device=sup.device)
