"""From a Pyro model and guide to a tmcgraph model, proposal and estimator.

:class:`Translation` declares one :class:`tmcgraph.Model` and one
:class:`tmcgraph.Proposal` for a traced structure: a plate per Pyro plate (in the order
of their dims), a variable per sample site, with the parents found by provenance
tracking, and per-site settings read from ``infer``:

=================================================  =========================================
Pyro                                               tmcgraph
=================================================  =========================================
guide site, ``num_samples=n``                      ``q.latent(..., K=n)``
guide site without ``num_samples``                 ``K=`` of the bridge (one particle if unset)
``tmc="diagonal"`` / ``tmc="mixture"``              ``coupling="paired"`` / ``"mixture"``
neither (or the bridge's ``coupling=``)            tmcgraph's default (``"permutation"``) /
                                                   the bridge's coupling
``enumerate="parallel"`` without ``num_samples``   ``q.enumerate``: exact marginalisation
model latent the guide lacks                       ``q.prior``: drawn from the prior (its
                                                   density stays in the denominator)
observed site, ``pyro.factor``                     ``m.observed`` with the value as data
``pyro.deterministic``                             not a variable (recomputed on each run)
=================================================  =========================================

Every variable's callable is a :class:`~tmcgraph.pyro.runner.SiteFn`, which re-runs the
Pyro program up to that site with its parents' particles substituted, so the one tmcgraph
pipeline (draw with couplings, factors, plan, contract, adjoint) runs on Pyro programs
unchanged.

:class:`TMC` is the estimator for a model and guide: it traces the programs on each call
(cheaply, with seeded values), keeps one translation per structure, checks new structures
(:func:`check_structure`) and evaluates the estimate, its gradients and posterior queries.
"""

from __future__ import annotations

import contextlib
import re
import threading
from collections import OrderedDict
from typing import Optional

import torch

from ..errors import TMCGraphError
from ..infer.estimators import TMC as _TMC
from ..infer.pipeline import Evaluation
from ..infer.posterior import posterior as _posterior
from ..model import Model, Proposal
from .layout import from_pyro
from .posterior import SitePosterior
from .runner import Binding, Prefix, Program, SiteFn
from .trace import ProgramTrace, trace_pair

__all__ = ["Translation", "TMC", "check_structure", "identifier"]

_TMC_COUPLINGS = {"diagonal": "paired", "mixture": "mixture"}


def identifier(name: str, taken: set) -> str:
    """A tmcgraph identifier for a Pyro name (non-word characters become ``_``), unique within ``taken``."""
    base = re.sub(r"\W", "_", str(name))
    if not base or not base[0].isalpha():
        base = "s" + base
    out, i = base, 1
    while out in taken:
        i += 1
        out = f"{base}_{i}"
    taken.add(out)
    return out


class Translation:
    """The tmcgraph model, proposal and estimator of one traced structure of a Pyro model and guide.

    Args:
        model: The Pyro model.
        guide: The Pyro guide.
        guide_trace: The guide's :class:`~tmcgraph.pyro.trace.ProgramTrace` (with parents).
        model_trace: The model's trace, run against the guide's values (with parents).
        max_plate_nesting: Number of plate positions in Pyro's layout.
        K: Particles of latents without ``num_samples`` (``None``: one).
        coupling: ``None`` (per-site ``tmc`` settings, else tmcgraph's default), a coupling
            name or object for every sampled latent, or a dict site name -> coupling.
        **options: ``strategy``, ``memory_limit``, ``device``, ``dtype`` of the estimator.

    Attributes:
        model: The :class:`tmcgraph.Model`.
        proposal: The :class:`tmcgraph.Proposal`.
        estimator: A :class:`tmcgraph.TMC` on them.
        names: Site name -> tmcgraph variable name.
        plate_names: Pyro plate name -> tmcgraph plate name.
        plates: Pyro plate name -> ``(size, dim)``.
    """

    def __init__(self, model, guide, guide_trace: ProgramTrace, model_trace: ProgramTrace, max_plate_nesting: int,
                 K: Optional[int] = None, coupling=None, **options):
        self.m = int(max_plate_nesting)
        self.K = 1 if K is None else int(K)
        self.coupling = coupling
        self.dtype = options.get("dtype")
        self.device = None if options.get("device") is None else torch.device(options["device"])
        self._local = threading.local()
        gt, mt = guide_trace, model_trace
        self.guide_trace, self.model_trace = gt, mt
        for t in (gt, mt):
            for name, s in t.sites.items():
                _check_batch(t.role, s, self.m)
        self.plates = dict(mt.plates)
        for p, sd in gt.plates.items():
            if self.plates.setdefault(p, sd) != sd:
                raise TMCGraphError(f"plate {p!r} has size/dim {self.plates[p]} in the model but {sd} in the guide")
        taken: set = set()
        order = sorted(self.plates, key=lambda p: (self.plates[p][1], list(self.plates).index(p)))
        self.plate_names = {p: identifier(p, taken) for p in order}
        taken = set()
        self.names = {n: identifier(n, taken) for n in mt.sites}
        self._programs = {"model": Program(model, "model", mt.order, self._local),
                          "guide": Program(guide, "guide", gt.order, self._local)}
        self.model = self._declare_model(mt)
        self.proposal = self._declare_proposal(mt, gt)
        self.estimator = _TMC(self.model, self.proposal, K=self.K, strategy=options.get("strategy", "auto"),
                              memory_limit=options.get("memory_limit"), device=self.device, dtype=self.dtype,
                              compile=False)

    # ------------------------------------------------------------------ declaration

    def _site_fn(self, role: str, trace: ProgramTrace, name: str) -> SiteFn:
        s = trace.sites[name]
        for p in s.parents:
            outside = [pl for pl in trace.sites[p].plates if pl not in s.plates]
            if outside:
                raise TMCGraphError(
                    f"{role} site {name!r} depends on site {p!r} inside plate {outside[0]!r}, which {name!r} is not "
                    "in; a TMC factor graph needs every site to lie in all plates of the sites it depends on")
        return SiteFn(self._programs[role], name, s.parents, tuple(trace.sites[p].event_dim for p in s.parents),
                      tuple(s.dims[p] for p in s.plates), self.m, self.dtype, self.device)

    def _tg_plates(self, s) -> tuple:
        return tuple(self.plate_names[p] for p in s.plates)

    def _declare_model(self, mt: ProgramTrace) -> Model:
        m = Model()
        for p, tg in self.plate_names.items():
            m.plate(tg, size=self.plates[p][0])
        for name, s in mt.sites.items():
            fn = self._site_fn("model", mt, name)
            parents = [self.names[p] for p in s.parents]
            declare = m.observed if s.observed else m.latent
            declare(self.names[name], fn, plate=self._tg_plates(s), parents=parents)
        return m

    def _coupling(self, name: str, infer: dict):
        c = self.coupling
        if isinstance(c, dict):
            if name in c:
                return c[name]
            c = None
        if c is not None:
            return c
        tmc = infer.get("tmc")
        if tmc is None:
            return None
        if tmc not in _TMC_COUPLINGS:
            raise TMCGraphError(f"site {name!r}: unknown tmc={tmc!r}; Pyro's strategies are 'diagonal' and 'mixture'")
        return _TMC_COUPLINGS[tmc]

    def _K(self, infer: dict) -> int:
        n = infer.get("num_samples")
        return self.K if n is None else int(n)

    @staticmethod
    def _exact(infer: dict) -> bool:
        return infer.get("enumerate") == "parallel" and infer.get("num_samples") is None

    def _declare_proposal(self, mt: ProgramTrace, gt: ProgramTrace) -> Proposal:
        q = Proposal(self.model)
        for name in mt.latents:
            tg = self.names[name]
            if name in gt.sites:
                inf = gt.sites[name].infer
                if self._exact(inf):
                    q.enumerate(tg)
                    continue
                fn = self._site_fn("guide", gt, name)
                q.latent(tg, fn, plate=self._tg_plates(gt.sites[name]),
                         parents=[self.names[p] for p in gt.sites[name].parents],
                         coupling=self._coupling(name, inf), K=self._K(inf))
            else:
                inf = mt.sites[name].infer
                if self._exact(inf):
                    q.enumerate(tg)
                else:
                    q.prior(tg, coupling=self._coupling(name, inf), K=self._K(inf))
        return q

    # ------------------------------------------------------------------ evaluation

    def data(self, model_trace: ProgramTrace) -> dict:
        """The observed sites' values of a model trace, keyed by tmcgraph name, laid out ``[plates..., event]``."""
        out = {}
        for name, s in model_trace.sites.items():
            if s.observed:
                out[self.names[name]] = from_pyro(s.value, name, s.plates, tuple(s.dims[p] for p in s.plates),
                                                  tuple(self.plates[p][0] for p in s.plates), self.m, s.event_dim)
        return out

    @contextlib.contextmanager
    def bound(self, args: tuple = (), kwargs: Optional[dict] = None, values: Optional[dict] = None):
        """Evaluate the translation's callables with the programs run on ``args``/``kwargs``.

        ``values`` (site -> value) fill the sites a callable does not depend on; default:
        the values of the translation's own trace.
        """
        if values is None:
            values = {n: s.value for n, s in self.model_trace.sites.items() if not s.observed}
        prev = getattr(self._local, "binding", None)
        self._local.binding = Binding(tuple(args), dict(kwargs or {}), values)
        try:
            yield self
        finally:
            self._local.binding = prev

    def plate(self, elementwise):
        """The tmcgraph form of an ``elementwise=`` option (Pyro plate names are mapped)."""
        if isinstance(elementwise, str):
            if elementwise not in self.plate_names:
                raise TMCGraphError(f"elementwise: unknown plate {elementwise!r}; the plates are {list(self.plates)}")
            return self.plate_names[elementwise]
        return elementwise


def _check_batch(role: str, s, m: int) -> None:
    """Raise unless the site's batch dims are its plates' (at their dims) and singletons."""
    bs = tuple(s.fn.batch_shape)
    if len(bs) > m:
        raise TMCGraphError(f"{role} site {s.name!r} has batch shape {bs}: {len(bs)} batch dim(s) but "
                            f"max_plate_nesting={m}; declare batch dims with pyro.plate or move them to the event "
                            "with .to_event()")
    for i, size in enumerate(bs):
        pos = i - len(bs)
        owner = [p for p in s.plates if s.dims[p] == pos]
        if size != 1 and not owner:
            raise TMCGraphError(f"{role} site {s.name!r} has batch shape {bs}, with size {size} at dim {pos}, which "
                                "is not a plate dim of the site; use pyro.plate or .to_event()")


def _first_difference(a: ProgramTrace, b: ProgramTrace) -> str:
    """The first site at which two traces of one program differ (by order, then by signature)."""
    for x, y in zip(a.order, b.order):
        if x != y:
            return x
    if len(a.order) != len(b.order):
        longer = a.order if len(a.order) > len(b.order) else b.order
        return longer[min(len(a.order), len(b.order))]
    for n in a.sites:
        if n not in b.sites or a.sites[n].signature() != b.sites[n].signature():
            return n
    return next(iter(b.sites), "?")


def _stacked(s, m: int, other) -> torch.Tensor:
    """Two values of a site stacked along a new sample dim, in Pyro's layout ``[2, m positions, event]``."""
    vals = []
    for v in (s.value, other.value):
        nb = v.dim() - s.event_dim
        vals.append(v.reshape([1] * max(0, m - nb) + list(v.shape)))
    return torch.stack(vals)


def check_structure(model, guide, args: tuple, kwargs: dict, traces: list, m: int) -> None:
    """Refuse programs whose structure depends on sampled values.

    ``traces`` are several ``(guide, model)`` trace pairs drawn with different seeds. Their
    structures (sites, order, shapes, plates, settings) must agree; then each program is
    run once with every latent site given two values at once (along a sample dim left of
    the plates): a program that branches on, or converts to Python numbers, a sampled
    value fails there.

    Raises:
        TMCGraphError: naming the site where the structure changes.
    """
    (g0, m0), rest = traces[0], traces[1:]
    for g, mt in rest:
        for role, a, b in (("guide", g0, g), ("model", m0, mt)):
            if a.signature() != b.signature():
                site = _first_difference(a, b)
                raise TMCGraphError(
                    f"the {role}'s structure changes with the sampled values at site {site!r} (traced with "
                    "different draws, its sites, order, shapes or plates differ): control flow that depends on "
                    "sampled values cannot be expressed as a static factor graph")
    if not rest:
        return
    g1, m1 = rest[0]
    with torch.no_grad():
        for role, fn, a, b in (("guide", guide, g0, g1), ("model", model, m0, m1)):
            values = {n: _stacked(s, m, b.sites[n]) for n, s in a.sites.items() if not s.observed}
            h = Prefix(role, a.order, None, values, {})
            try:
                with h:
                    fn(*args, **kwargs)
            except TMCGraphError:
                raise
            except Exception as e:
                nxt = a.order[h.i] if h.i < len(a.order) else None
                where = (f"after site {h.last!r}" if h.last else "before its first site") + (
                    f" (before site {nxt!r})" if nxt else "")
                raise TMCGraphError(
                    f"the {role} failed {where} when its sampled sites carry several values at once: "
                    f"{type(e).__name__}: {e}. Its control flow must not depend on sampled values, and it must "
                    "broadcast over dims to the left of its plates (as for Pyro's parallel enumeration)") from e


class TMC:
    """The TMC estimator of log p(x) for a Pyro model and guide, computed by tmcgraph.

    Args:
        model: A Pyro model (a callable).
        guide: A Pyro guide for it (same arguments).
        max_plate_nesting: Plate positions of Pyro's layout; ``None``: the deepest plate
            dim found in the traces.
        K: Particles of latents without ``infer={"num_samples": n}`` (``None``: one, as
            Pyro).
        coupling: ``None`` (the sites' ``tmc`` settings: ``"diagonal"`` -> paired,
            ``"mixture"`` -> mixture; sites without one get tmcgraph's default,
            ``"permutation"``), a coupling name or object for every sampled latent, or a
            dict site -> coupling.
        strategy: Contraction path strategy (see :class:`tmcgraph.TMC`).
        memory_limit: Largest tensor of the contraction (elements).
        device: Device of the data and distribution parameters.
        dtype: Floating dtype of the data and distribution parameters.
        check: Check each new structure for value-dependent control flow
            (:func:`check_structure`).
        retraces: Extra traces (different seeds) compared by that check.
        cache_size: Translations (structures) kept.

    Example:
        >>> import torch, pyro, pyro.distributions as dist
        >>> def model(x):
        ...     z = pyro.sample("z", dist.Normal(0., 1.))
        ...     pyro.sample("x", dist.Normal(z, 1.), obs=x)
        >>> def guide(x):
        ...     pyro.sample("z", dist.Normal(x / 2, 0.8), infer={"num_samples": 8})
        >>> est = TMC(model, guide, max_plate_nesting=0)
        >>> est.log_evidence(torch.tensor(1.0), seed=0).shape
        torch.Size([])
    """

    def __init__(self, model, guide, max_plate_nesting: Optional[int] = None, K: Optional[int] = None,
                 coupling=None, strategy="auto", memory_limit=None, device=None, dtype=None, check: bool = True,
                 retraces: int = 3, cache_size: int = 8):
        if not callable(model) or not callable(guide):
            raise TMCGraphError("model and guide must be callables (Pyro programs)")
        if max_plate_nesting is not None and (int(max_plate_nesting) != max_plate_nesting or max_plate_nesting < 0):
            raise TMCGraphError(f"max_plate_nesting must be a non-negative integer, got {max_plate_nesting!r}")
        if K is not None and (isinstance(K, bool) or int(K) != K or K < 1):
            raise TMCGraphError(f"K must be a positive integer or None, got {K!r}")
        self.model, self.guide = model, guide
        self.max_plate_nesting = None if max_plate_nesting is None else int(max_plate_nesting)
        self.K, self.coupling = K, coupling
        self.options = {"strategy": strategy, "memory_limit": memory_limit, "device": device, "dtype": dtype}
        self.check, self.retraces = bool(check), int(retraces)
        self._cache: OrderedDict = OrderedDict()
        self._cache_size = int(cache_size)
        self._lock = threading.Lock()

    def _m(self, g: ProgramTrace, mt: ProgramTrace) -> int:
        if self.max_plate_nesting is not None:
            return self.max_plate_nesting
        dims = [-d for _, d in list(g.plates.values()) + list(mt.plates.values())]
        return max(dims, default=0)

    def _traces(self, args, kwargs, seed=0, provenance=False):
        gen = torch.Generator().manual_seed(seed)
        return trace_pair(self.model, self.guide, args, kwargs, gen, provenance=provenance,
                          m=self.max_plate_nesting)

    def translate(self, *args, **kwargs) -> Translation:
        """The :class:`Translation` of the programs' structure on these arguments (cached per structure)."""
        return self._translate(args, kwargs)[0]

    def _translate(self, args, kwargs):
        g, mt = self._traces(args, kwargs)
        key = (g.signature(), mt.signature())
        with self._lock:
            tr = self._cache.get(key)
            if tr is not None:
                self._cache.move_to_end(key)
                return tr, mt
        m = self._m(g, mt)
        pg, pm = self._traces(args, kwargs, provenance=True)
        if self.check:
            traces = [(g, mt)] + [self._traces(args, kwargs, seed=s) for s in range(1, 1 + self.retraces)]
            check_structure(self.model, self.guide, args, kwargs, traces, m)
        tr = Translation(self.model, self.guide, pg, pm, m, self.K, self.coupling, **self.options)
        with self._lock:
            self._cache[key] = tr
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return tr, mt

    @staticmethod
    def _values(mt: ProgramTrace) -> dict:
        return {n: s.value for n, s in mt.sites.items() if not s.observed}

    def run(self, *args, seed=None, elementwise=False, **kwargs) -> Evaluation:
        """One pass of tmcgraph's pipeline on the programs: the :class:`tmcgraph.Evaluation`.

        ``seed`` is an int or a ``torch.Generator`` for the particles (``None``: torch's
        global generator, as Pyro); ``elementwise`` keeps a plate (a Pyro plate name, or
        ``True`` for the first in dim order). Other arguments go to the model and guide.
        The evaluation's particles are keyed by tmcgraph names (:meth:`translate`'s
        ``names``).
        """
        tr, mt = self._translate(args, kwargs)
        with tr.bound(args, kwargs, self._values(mt)):
            return tr.estimator.run(tr.data(mt), seed=seed, elementwise=tr.plate(elementwise))

    def log_evidence(self, *args, seed=None, elementwise=False, **kwargs) -> torch.Tensor:
        """The TMC estimate of log p(x) (differentiable): an unbiased estimate of p(x) in exp space."""
        return self.run(*args, seed=seed, elementwise=elementwise, **kwargs).log_evidence

    __call__ = log_evidence

    def posterior(self, *args, seed=None, **kwargs) -> SitePosterior:
        """The TMC-reweighted posterior over the particles of one draw, queried by site name."""
        tr, mt = self._translate(args, kwargs)
        with tr.bound(args, kwargs, self._values(mt)):
            post = _posterior(tr.estimator, tr.data(mt), seed=seed)
        return SitePosterior(post, tr.names)

    def __repr__(self):
        return (f"tmcgraph.pyro.TMC(K={self.K}, coupling={self.coupling!r}, "
                f"max_plate_nesting={self.max_plate_nesting})")
