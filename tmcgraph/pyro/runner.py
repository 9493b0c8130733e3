"""Re-running a Pyro program up to one site with given values: the distribution of that site.

tmcgraph evaluates a variable's callable with its parents' particles laid out
``[sample dims..., plates..., event]``. A :class:`SiteFn` moves them to Pyro's layout
(:func:`tmcgraph.pyro.layout.to_pyro`), and :class:`Program` runs the Pyro program under
:class:`Prefix`, a handler that

* substitutes the given values at the parent sites (``poutine.condition``'s job) and the
  traced value of the call at every other earlier site (whose value the target's
  distribution does not depend on: the parents come from provenance tracking),
* checks that the sites arrive in the traced order (a program whose control flow depends
  on the values is refused, naming the site), and
* stops the program at the target site (``poutine.escape``'s job), returning the
  distribution it was about to sample from, broadcast by its plates.

The distribution is then laid out for tmcgraph (:func:`tmcgraph.pyro.layout.relayout`).
Parameters (``pyro.param``, ``PyroModule``, ``nn.Module``) are looked up by the program
itself on every run, so gradients reach them unchanged.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Optional

from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample

from ..errors import TMCGraphError
from .layout import relayout, to_pyro

__all__ = ["Binding", "Program", "Prefix", "SiteFn"]


@dataclass
class Binding:
    """What one call runs the programs with: their arguments and the other sites' values.

    Attributes:
        args: Positional arguments of the model and guide.
        kwargs: Keyword arguments.
        values: Site name -> traced value (used at sites the target does not depend on).
    """

    args: tuple
    kwargs: dict
    values: dict


class _Reached(BaseException):
    """Raised at the target site; carries its message (a BaseException: ``except Exception`` lets it pass)."""

    def __init__(self, msg):
        super().__init__(msg["name"])
        self.msg = msg


class Prefix(Messenger):
    """Run a program up to ``target``, substituting ``values`` (and ``fallback`` elsewhere).

    Args:
        role: ``"model"`` or ``"guide"`` (for messages).
        order: The traced order of the program's sample sites.
        target: The site to stop at.
        values: Site name -> value at the parents (observed parents included).
        fallback: Site name -> value at every other latent site.
    """

    def __init__(self, role: str, order: list, target: str, values: dict, fallback: dict):
        super().__init__()
        self.role, self.order, self.target = role, order, target
        self.values, self.fallback = values, fallback
        self.i = 0

    @property
    def last(self) -> Optional[str]:
        """The last site the run passed."""
        return self.order[self.i - 1] if self.i else None

    def _pyro_sample(self, msg):
        if site_is_subsample(msg):
            return
        name = msg["name"]
        if self.i >= len(self.order) or self.order[self.i] != name:
            want = self.order[self.i] if self.i < len(self.order) else "the end of the program"
            after = f"after site {self.last!r}" if self.last else "first"
            raise TMCGraphError(
                f"the {self.role} reached site {name!r} where its trace had {want!r} ({after}): its control flow "
                "depends on sampled values, which a static factor graph cannot express")
        self.i += 1
        if name == self.target:
            raise _Reached(msg)
        if name in self.values:
            msg["value"] = self.values[name]
            msg["done"] = True
        elif not msg["is_observed"]:
            msg["value"] = self.fallback[name]
            msg["done"] = True


class Program:
    """A Pyro program (the model or the guide) and how to get one site's distribution from it.

    Args:
        fn: The Pyro callable.
        role: ``"model"`` or ``"guide"``.
        order: Its traced site order.
        local: The thread-local holding the current :class:`Binding`.
    """

    def __init__(self, fn, role: str, order: list, local: threading.local):
        self.fn, self.role, self.order, self.local = fn, role, list(order), local

    def binding(self) -> Binding:
        b = getattr(self.local, "binding", None)
        if b is None:
            raise TMCGraphError(f"the {self.role}'s arguments are not bound: evaluate the translation inside "
                                "`with translation.bound(*args, **kwargs):` (tmcgraph.pyro.TMC does this)")
        return b

    def distribution(self, target: str, values: dict):
        """The distribution of ``target`` (as Pyro broadcasts it) with ``values`` at its parents."""
        b = self.binding()
        h = Prefix(self.role, self.order, target, values, b.values)
        try:
            with h:
                self.fn(*b.args, **b.kwargs)
        except _Reached as r:
            return r.msg["fn"]
        except TMCGraphError:
            raise
        except Exception as e:
            shapes = ", ".join(f"{k}: {tuple(v.shape)}" for k, v in values.items())
            where = f"after site {h.last!r}" if h.last else "before its first site"
            raise TMCGraphError(
                f"running the {self.role} up to site {target!r} with particles at its parents ({shapes}) failed "
                f"{where}: {type(e).__name__}: {e}. The program must broadcast over dims to the left of its plates "
                "(as Pyro's parallel enumeration needs) and its control flow must not depend on sampled values"
            ) from e
        raise TMCGraphError(f"the {self.role} returned without reaching site {target!r}: its control flow depends "
                            "on sampled values, which a static factor graph cannot express")


class SiteFn:
    """The callable tmcgraph evaluates for one site: parents' particles in, the site's distribution out.

    Args:
        program: The :class:`Program` the site belongs to.
        name: The site.
        parents: Its parent sites, in the order tmcgraph passes them.
        event_dims: Event dims of each parent.
        positions: Pyro dims of the site's plates (ascending).
        m: ``max_plate_nesting``.
        dtype: Floating dtype for the distribution's parameters (``None``: as built).
        device: Device for them (``None``: as built).
    """

    def __init__(self, program: Program, name: str, parents: tuple, event_dims: tuple, positions: tuple, m: int,
                 dtype=None, device=None):
        self.program, self.name, self.parents = program, name, tuple(parents)
        self.event_dims, self.positions, self.m = tuple(event_dims), tuple(positions), m
        self.dtype, self.device = dtype, device

    def __call__(self, *values):
        inputs = {p: to_pyro(v, self.positions, self.m, e) for p, v, e in zip(self.parents, values, self.event_dims)}
        d = self.program.distribution(self.name, inputs)
        return relayout(d, self.name, self.positions, self.m, self.dtype, self.device)

    def __repr__(self):
        return f"SiteFn({self.program.role}:{self.name!r}, parents={list(self.parents)})"
