"""Tracing a Pyro model and guide: their sites, plates, infer settings and dependency structure.

A Pyro program is traced with ``poutine.trace`` under :class:`SeededValues`, a handler
that gives every latent site a value drawn from a private ``torch.Generator`` (through
:func:`tmcgraph.sampling.samplers.draw_sample`, so torch's global RNG is neither used nor
changed) or a value supplied by the caller (the guide's values for the model, as
``poutine.replay`` would). With ``provenance=True`` every sample value is wrapped in a
:class:`pyro.ops.provenance.ProvenanceTensor` tagged with its site, as
:func:`pyro.infer.inspect.get_dependencies` does; the parents of a site are then the
upstream sites in the provenance of ``fn.log_prob(value)`` (the value's own tag removed).

What a static factor graph cannot express is refused here with a
:class:`~tmcgraph.errors.TMCGraphError` that names the site or plate: ``pyro.markov``,
subsampled plates, scaled or masked sites, sequential enumeration, observed sites in the
guide, guide sites the model lacks, and plate dims beyond ``max_plate_nesting``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from pyro import poutine
from pyro.ops.provenance import ProvenanceTensor, detach_provenance, get_provenance
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample

from ..errors import TMCGraphError
from ..sampling.samplers import draw_sample

__all__ = ["SiteInfo", "ProgramTrace", "SeededValues", "trace_program", "trace_pair", "is_deterministic"]


def is_deterministic(msg) -> bool:
    """Whether a sample site is a ``pyro.deterministic`` record (not a random variable)."""
    return bool(msg["infer"].get("_deterministic", False))


@dataclass
class SiteInfo:
    """One sample site of a traced program.

    Attributes:
        name: Site name.
        observed: Whether the value is given (``obs=``), including ``pyro.factor``.
        fn: The site's distribution (as traced).
        value: The traced value (detached, provenance removed).
        plates: Names of the site's vectorised plates, in dim order (most negative first).
        dims: Plate name -> its dim at this site.
        infer: The site's ``infer`` dict.
        parents: Upstream sites of the same program its distribution depends on
            (filled when traced with provenance).
    """

    name: str
    observed: bool
    fn: object
    value: torch.Tensor
    plates: tuple
    dims: dict
    infer: dict
    parents: tuple = ()

    @property
    def event_dim(self) -> int:
        """Number of event dims of the site's distribution."""
        return len(self.fn.event_shape)

    def signature(self) -> tuple:
        """What the translation of the site depends on (not the values)."""
        inf = tuple(sorted((k, str(v)) for k, v in self.infer.items()
                           if k in ("enumerate", "num_samples", "tmc", "is_auxiliary", "expand")))
        return (self.name, self.observed, type(self.fn).__name__, tuple(self.fn.batch_shape),
                tuple(self.fn.event_shape), tuple((p, self.dims[p]) for p in self.plates), inf,
                tuple(self.value.shape), self.value.dtype)


@dataclass
class ProgramTrace:
    """The sample sites of one run of a program.

    Attributes:
        role: ``"model"`` or ``"guide"``.
        sites: Site name -> :class:`SiteInfo` (random and observed sites, in program order).
        order: Every non-subsample sample site in program order (deterministic ones too):
            the sequence a re-run must reproduce.
        plates: Plate name -> ``(size, dim)``.
    """

    role: str
    sites: dict
    order: list
    plates: dict = field(default_factory=dict)

    @property
    def latents(self) -> list:
        """Names of the unobserved sites, in program order."""
        return [n for n, s in self.sites.items() if not s.observed]

    def signature(self) -> tuple:
        """The program's structure: site order, site signatures and plates."""
        return (self.role, tuple(self.order), tuple(s.signature() for s in self.sites.values()),
                tuple(sorted(self.plates.items())))


class SeededValues(Messenger):
    """Give latent sites values: ``values[name]`` if given, else a draw from ``generator``.

    Args:
        generator: A ``torch.Generator`` for the draws.
        values: Site name -> value to use instead of drawing.
        provenance: Wrap every sample value in a ``ProvenanceTensor`` tagged with its site.
    """

    def __init__(self, generator: torch.Generator, values: Optional[dict] = None, provenance: bool = False):
        super().__init__()
        self.generator = generator
        self.values = values or {}
        self.provenance = provenance

    def _pyro_sample(self, msg):
        if site_is_subsample(msg):
            return
        name = msg["name"]
        if msg["is_observed"]:
            if self.provenance and not is_deterministic(msg) and torch.is_tensor(msg["value"]):
                msg["value"] = ProvenanceTensor(detach_provenance(msg["value"]), frozenset({("site", name)}))
            return
        if name in self.values:
            value = self.values[name]
        else:
            value = draw_sample(msg["fn"], torch.Size(), self.generator)
        value = detach_provenance(value).detach()
        if self.provenance:
            value = ProvenanceTensor(value, frozenset({("site", name)}))
        msg["value"] = value
        msg["done"] = True


def _check_site(role: str, node, m: Optional[int]) -> None:
    name = node["name"]
    inf = node["infer"] or {}
    if inf.get("_markov_scope") is not None:
        raise TMCGraphError(f"{role} site {name!r} is inside pyro.markov, which the tmcgraph bridge does not "
                            "support yet; write the chain without pyro.markov")
    scale = node.get("scale", 1.0)
    if not (isinstance(scale, (int, float)) and scale == 1.0):
        raise TMCGraphError(f"{role} site {name!r} has log-probability scale {scale!r} (poutine.scale or a "
                            "subsampled plate); a TMC estimate needs unscaled sites")
    mask = node.get("mask")
    if mask is not None and mask is not True:
        raise TMCGraphError(f"{role} site {name!r} is masked (poutine.mask or obs_mask); the tmcgraph bridge "
                            "does not support masked sites")
    if inf.get("enumerate") not in (None, "parallel"):
        raise TMCGraphError(f"{role} site {name!r} has infer enumerate={inf.get('enumerate')!r}; the tmcgraph "
                            "bridge supports 'parallel' (with num_samples: sampled, without: exact) only")
    for f in node["cond_indep_stack"]:
        if f.vectorized and m is not None and f.dim < -m:
            raise TMCGraphError(f"{role} site {name!r} is in plate {f.name!r} at dim {f.dim}, beyond "
                                f"max_plate_nesting={m}")


def _site_info(role: str, node) -> SiteInfo:
    frames = sorted((f for f in node["cond_indep_stack"] if f.vectorized), key=lambda f: f.dim)
    value = node["value"]
    if not torch.is_tensor(value):
        value = torch.as_tensor(value)
    return SiteInfo(node["name"], bool(node["is_observed"]), node["fn"], detach_provenance(value).detach(),
                    tuple(f.name for f in frames), {f.name: f.dim for f in frames}, dict(node["infer"] or {}))


def trace_program(fn, args: tuple, kwargs: dict, role: str, generator: torch.Generator,
                  values: Optional[dict] = None, provenance: bool = False, m: Optional[int] = None) -> ProgramTrace:
    """Trace ``fn(*args, **kwargs)`` with seeded (or given) latent values and return its :class:`ProgramTrace`.

    Raises:
        TMCGraphError: for what the bridge refuses (see the module docstring).
    """
    with torch.no_grad():
        setter = SeededValues(generator, values, provenance)
        try:
            tr = poutine.trace(setter(fn)).get_trace(*args, **kwargs)
        except TMCGraphError:
            raise
        except Exception as e:
            raise TMCGraphError(f"tracing the {role} failed: {type(e).__name__}: {e}") from e
        return _read(tr, role, provenance, m)


def _read(tr, role: str, provenance: bool, m: Optional[int]) -> ProgramTrace:
    sites, order, plates = {}, [], {}
    for name, node in tr.nodes.items():
        if node["type"] != "sample":
            continue
        if site_is_subsample(node):
            sub = node["fn"]
            if sub.subsample_size is not None and sub.subsample_size < sub.size:
                raise TMCGraphError(f"plate {name!r} is subsampled ({sub.subsample_size} of {sub.size}); the "
                                    "tmcgraph bridge needs whole plates (pass the minibatch as the data instead)")
            continue
        _check_site(role, node, m)
        order.append(name)
        for f in node["cond_indep_stack"]:
            if f.vectorized:
                known = plates.setdefault(f.name, (int(f.size), int(f.dim)))
                if known != (int(f.size), int(f.dim)):
                    raise TMCGraphError(f"plate {f.name!r} has size/dim {known} at one site and "
                                        f"{(int(f.size), int(f.dim))} at {role} site {name!r}")
        if is_deterministic(node):
            continue
        info = _site_info(role, node)
        if provenance:
            lp = node["fn"].log_prob(detach_provenance(node["value"]))
            prov = get_provenance(lp)
            info.parents = tuple(u for u in sites if ("site", u) in prov)
        sites[name] = info
    return ProgramTrace(role, sites, order, plates)


def trace_pair(model, guide, args: tuple, kwargs: dict, generator: torch.Generator, provenance: bool = False,
               m: Optional[int] = None) -> tuple:
    """Trace the guide, then the model with the guide's values (as ``poutine.replay``): ``(guide, model)`` traces.

    Raises:
        TMCGraphError: the guide has observed sites or sites the model lacks, or the two
            disagree on a site's plates or shape.
    """
    g = trace_program(guide, args, kwargs, "guide", generator, provenance=provenance, m=m)
    for name, s in g.sites.items():
        if s.observed:
            raise TMCGraphError(f"guide site {name!r} is observed (obs= or pyro.factor); a guide may only sample")
    values = {n: s.value for n, s in g.sites.items()}
    mt = trace_program(model, args, kwargs, "model", generator, values=values, provenance=provenance, m=m)
    for name, s in g.sites.items():
        if name not in mt.sites:
            raise TMCGraphError(f"guide site {name!r} does not appear in the model (auxiliary guide variables are "
                                "not supported)")
        ms = mt.sites[name]
        if ms.observed:
            raise TMCGraphError(f"site {name!r} is sampled by the guide but observed in the model")
        if ms.plates != s.plates:
            raise TMCGraphError(f"site {name!r} is in plates {list(ms.plates)} in the model but {list(s.plates)} in "
                                "the guide")
        if tuple(ms.fn.event_shape) != tuple(s.fn.event_shape):
            raise TMCGraphError(f"site {name!r} has event shape {tuple(ms.fn.event_shape)} in the model but "
                                f"{tuple(s.fn.event_shape)} in the guide")
    return g, mt
