"""Declaring a directed model P and a proposal Q as graphs.

A :class:`Model` holds plates, latent and observed variables, each with a callable that
maps parent values to a ``torch.distributions.Distribution``. Parents come from the
callable's parameter names or from an explicit ``parents=[...]`` list. A
:class:`Proposal` gives, for every latent of its model, a callable for Q whose parents
may be other latents (non-factorised proposals) or observed variables (amortised
proposals), a coupling that says how non-factorised samples are drawn, an optional
per-variable number of particles, or marks the latent for exact enumeration.

Both are ``torch.nn.Module``: callables that are modules are registered, so
``.parameters()``, ``.to(device)`` and ``state_dict()`` work. ``.graph`` returns a
``networkx.DiGraph`` to inspect or draw.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import networkx as nx
import torch
from torch import nn

from .errors import TMCGraphError

__all__ = ["Plate", "Variable", "ElementIndex", "Model", "Proposal", "check_inference_inputs", "PREV"]

#: Suffix of a parent name that stands for the previous element's value in a Markov plate.
PREV = "_prev"


@dataclass(frozen=True)
class Plate:
    """A named plate (conditionally independent repetition).

    Attributes:
        name: Plate name, used as ``plate=`` in declarations.
        size: Number of elements, or ``None`` to take it from the data (minibatches).
            For a subsampled plate: the full size N.
        subsample: Whether calls may give a minibatch of B of the N elements (their
            indices as the data of :attr:`index`); each element's log-contribution is
            then scaled by N / B (:mod:`tmcgraph.infer.subsample`).
        index: Subsampled plates: the observed variable holding the element indices
            (``"<name>_index"``), which callables may take as a parent.
        markov: Whether the plate is a Markov (time-series) plate: its variables may
            take ``<name>_prev`` parents, the previous element's value of a variable
            in the plate (see :meth:`Model.plate`).
    """

    name: str
    size: Optional[int] = None
    subsample: bool = False
    index: Optional[str] = None
    markov: bool = False


@dataclass
class Variable:
    """One declared variable of a model or a proposal.

    Attributes:
        name: Variable name.
        fn: Callable from parent values to a ``torch.distributions.Distribution``.
        parents: Parent names, in the order ``fn`` receives them.
        plates: Plate names, in the model's plate order.
        kind: ``"latent"`` or ``"observed"`` (model), ``"proposal"`` (proposal).
        by_keyword: Whether ``fn`` is called with keyword arguments.
        coupling: Proposal only: how its K particles are drawn given its latent parents'
            particles: a coupling name (``"mixture"``, ``"permutation"``, ``"paired"``), a
            coupling object (:mod:`tmcgraph.sampling.couplings`), or ``None`` for the default.
        K: Proposal only: particles for this latent (``None``: the estimator's K).
        enumerate: Proposal only: take the support as particles (exact marginalisation).
        prior: Proposal only: the proposal is the model's prior for this latent.
        index_of: The element indices of this subsampled plate (data, no factor).
        init: Variables with ``<u>_prev`` parents (Markov plates): the declaration used
            at the plate's first element, where there is no previous value.
        prev: ``<u>_prev`` parent -> ``u`` (the variable whose previous value it is).
        markov: The Markov plate of a variable with ``prev`` parents, else ``None``.
        K_steps: Proposal only: particles per element along the latent's Markov plate
            (``K=[k_0, ..., k_{T-1}]``; ``K`` is then their maximum), or ``None``.
    """

    name: str
    fn: Optional[Callable]
    parents: tuple
    plates: tuple
    kind: str
    by_keyword: bool = True
    coupling: object = None
    K: Optional[int] = None
    enumerate: bool = False
    prior: bool = False
    index_of: Optional[str] = None
    init: Optional["Variable"] = None
    prev: dict = field(default_factory=dict)
    markov: Optional[str] = None
    K_steps: Optional[tuple] = None

    def dist(self, values: dict) -> torch.distributions.Distribution:
        """Call ``fn`` with the parent values taken from ``values``."""
        args = [values[p] for p in self.parents]
        try:
            if self.by_keyword:
                d = self.fn(**dict(zip(self.parents, args)))
            else:
                d = self.fn(*args)
        except TMCGraphError:
            raise
        except Exception as e:  # re-raise with the variable and parent shapes
            shapes = ", ".join(f"{p}: {tuple(getattr(v, 'shape', ()))}" for p, v in zip(self.parents, args))
            raise TMCGraphError(
                f"{self.kind} callable of {self.name!r} failed with parents ({shapes}): {type(e).__name__}: {e}"
            ) from e
        if not isinstance(d, torch.distributions.Distribution):
            raise TMCGraphError(
                f"{self.kind} callable of {self.name!r} returned {type(d).__name__}, "
                "expected a torch.distributions.Distribution"
            )
        return d


class ElementIndex(torch.distributions.Distribution):
    """The element indices of a subsampled plate: given data, not modelled (``log_prob`` is 0).

    Args:
        size: The plate's full size N (indices lie in ``[0, N)``).
    """

    arg_constraints: dict = {}
    has_rsample = False

    def __init__(self, size: int):
        self.size = int(size)
        super().__init__(validate_args=False)

    @property
    def support(self):
        return torch.distributions.constraints.integer_interval(0, self.size - 1)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        return torch.zeros(value.shape, dtype=torch.get_default_dtype(), device=value.device)


def _check_acyclic(g: nx.DiGraph, what: str) -> None:
    """Raise naming the cycle if ``g`` has one."""
    try:
        cycle = nx.find_cycle(g)
    except nx.NetworkXNoCycle:
        return
    raise TMCGraphError(f"{what} graph has a cycle: " + " -> ".join([e[0] for e in cycle] + [cycle[0][0]]))


def _parents_of(name: str, fn: Callable, parents: Optional[Sequence[str]]):
    """Parent names and calling convention of a declared callable."""
    if parents is not None:
        if isinstance(parents, str):
            parents = [parents]
        parents = tuple(parents)
        if len(set(parents)) != len(parents):
            raise TMCGraphError(f"variable {name!r} lists a parent twice: {parents}")
        return parents, False
    if not callable(fn):
        raise TMCGraphError(f"variable {name!r}: expected a callable returning a distribution, got {fn!r}")
    target = fn.forward if isinstance(fn, nn.Module) else fn
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError) as e:
        raise TMCGraphError(f"variable {name!r}: cannot read parents from the callable; pass parents=[...]") from e
    names = []
    for p in sig.parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise TMCGraphError(
                f"variable {name!r}: callable takes *args/**kwargs, so its parents are unknown; pass parents=[...]"
            )
        if p.default is not inspect.Parameter.empty:
            continue  # defaulted parameters are configuration, not parents
        names.append(p.name)
    return tuple(names), True


def _markov_parents(decl, name: str, parents: tuple, plates: tuple, init, what: str):
    """``(prev map, Markov plate, init Variable)`` of a declaration; checks the ``<u>_prev`` parents.

    A parent ``<u>_prev`` that is not itself a declared variable is the previous value
    of ``u`` (this variable or an earlier one) along a Markov plate both lie in.
    """
    model = decl if isinstance(decl, Model) else decl.model
    markov = [p for p in plates if model.plates[p].markov]
    prev = {}
    for p in parents:
        if p in model or not p.endswith(PREV):
            continue
        u = p[: -len(PREV)]
        if u != name and u not in model:
            continue  # an unknown parent: validate() reports it
        if not markov:
            raise TMCGraphError(
                f"{what} {name!r}: parent {p!r} (the previous value of {u!r}) needs a Markov plate; "
                f"{name!r} lies in plates {list(plates)}; declare one with model.plate(..., markov=True)")
        uplates = plates if u == name else model[u].plates
        if markov[0] not in uplates:
            raise TMCGraphError(f"{what} {name!r}: parent {p!r}: {u!r} is not in Markov plate {markov[0]!r}")
        prev[p] = u
    if len(markov) > 1 and prev:
        raise TMCGraphError(f"{what} {name!r}: takes previous values but lies in two Markov plates {markov}")
    if prev and init is None:
        raise TMCGraphError(
            f"{what} {name!r} takes previous values {sorted(prev)} along Markov plate {markov[0]!r}: give "
            f"init=callable for its first element (same parents without the '{PREV}' ones)")
    if init is not None and not prev:
        loose = [p for p in parents if p.endswith(PREV) and p not in model]
        if loose:
            raise TMCGraphError(
                f"{what} {name!r}: parent {loose[0]!r} names no declared variable {loose[0][:-len(PREV)]!r} "
                f"(a previous value refers to this variable or one declared before it in the Markov plate)")
        raise TMCGraphError(f"{what} {name!r}: init= is only for variables that take '<name>{PREV}' parents")
    init_var = None
    if init is not None:
        ips, ikw = _parents_of(name, init, None)
        bad = [p for p in ips if p in prev or (p.endswith(PREV) and p not in model)]
        if bad:
            raise TMCGraphError(f"{what} {name!r}: init callable takes previous values {bad}; the first element "
                                "has none")
        init_var = Variable(name, init, ips, plates, "init", ikw)
    return prev, (markov[0] if prev else None), init_var


def _index_fn(size: int) -> Callable:
    """The callable of a subsampled plate's index variable."""

    def index():
        return ElementIndex(size)

    return index


class _Declared(nn.Module):
    """Common store of variables and registered module callables."""

    def __init__(self):
        super().__init__()
        self._vars: dict[str, Variable] = {}
        self.fns = nn.ModuleDict()
        self._version = 0  # bumped by every declaration; keys the validation cache
        self._validated = None

    def _register(self, var: Variable):
        if var.name in self._vars:
            raise TMCGraphError(f"variable {var.name!r} is declared twice")
        if not isinstance(var.name, str) or not var.name.isidentifier() or var.name.startswith("_"):
            raise TMCGraphError(f"variable name {var.name!r} must be an identifier not starting with '_'")
        self._vars[var.name] = var
        self._version += 1
        if isinstance(var.fn, nn.Module):
            self.fns[var.name] = var.fn

    @property
    def variables(self) -> dict:
        """Declared variables by name, in declaration order."""
        return dict(self._vars)

    def __getitem__(self, name: str) -> Variable:
        return self._vars[name]

    def __contains__(self, name: str) -> bool:
        return name in self._vars


class Model(_Declared):
    """A directed generative model P over latent and observed variables.

    Example:
        >>> from torch.distributions import Normal
        >>> m = Model()
        >>> m.plate("data", size=3)
        >>> m.latent("theta", lambda: Normal(0., 1.))
        >>> m.latent("z", lambda theta: Normal(theta, 1.), plate="data")
        >>> m.observed("x", lambda z: Normal(z, 1.), plate="data")
        >>> sorted(m.graph.edges)
        [('theta', 'z'), ('z', 'x')]
    """

    def __init__(self):
        super().__init__()
        self.plates: dict[str, Plate] = {}

    def plate(self, name: str, size: Optional[int] = None, subsample: bool = False, markov: bool = False) -> None:
        """Declare a plate. ``size=None`` takes the size from the data (minibatches).

        ``markov=True`` declares a Markov (time-series) plate of length T: its elements
        form a chain rather than independent repetitions. A variable in it may take a
        parent named ``<u>_prev``: the value of ``u`` (itself or another variable in the
        plate) at the previous element, with an ``init=`` callable for the first
        element. The callable is called once for all elements ``t = 1 .. T-1`` at once
        (parents as time-shifted tensors along the plate's axis), ``init`` once for
        ``t = 0``, and the contraction along the plate is a chain of log-space matrix
        products (:mod:`tmcgraph.ops.scan`)::

            m.plate("time", size=T, markov=True)
            m.latent("z", lambda z_prev: Normal(0.9 * z_prev, 1.), plate="time",
                     init=lambda: Normal(0., 1.))
            m.observed("x", lambda z: Normal(z, 0.5), plate="time")

        ``subsample=True`` (with the full ``size`` N) lets a call give B of the N elements:
        the data along the plate are those elements and the observed variable
        ``"<name>_index"`` (declared here) holds their indices in ``[0, N)``; each
        element's log-contribution is scaled by N / B (:mod:`tmcgraph.infer.subsample`).
        Callables may take ``<name>_index`` as a parent (per-element parameters).
        """
        if name in self.plates:
            raise TMCGraphError(f"plate {name!r} is declared twice")
        if not isinstance(name, str) or not name.isidentifier() or name.startswith("_"):
            raise TMCGraphError(f"plate name {name!r} must be an identifier not starting with '_'")
        if size is not None and (int(size) != size or size < 1):
            raise TMCGraphError(f"plate {name!r}: size must be a positive integer or None, got {size!r}")
        if subsample and size is None:
            raise TMCGraphError(f"plate {name!r}: subsample=True needs the full size, e.g. size=N")
        if subsample and markov:
            raise TMCGraphError(f"plate {name!r}: a Markov plate cannot be subsampled (its elements form a chain)")
        index = f"{name}_index" if subsample else None
        if index in self._vars:
            raise TMCGraphError(f"plate {name!r}: its index variable {index!r} is already declared")
        self.plates[name] = Plate(name, None if size is None else int(size), bool(subsample), index, bool(markov))
        if subsample:
            self._register(Variable(index, _index_fn(int(size)), (), (name,), "observed", index_of=name))

    def _plates(self, name: str, plate) -> tuple:
        if plate is None:
            return ()
        plates = (plate,) if isinstance(plate, str) else tuple(plate)
        for p in plates:
            if p not in self.plates:
                raise TMCGraphError(f"variable {name!r} uses undeclared plate {p!r}; declare it with model.plate()")
        if len(set(plates)) != len(plates):
            raise TMCGraphError(f"variable {name!r} lists plate twice: {plates}")
        order = list(self.plates)
        return tuple(sorted(plates, key=order.index))

    def latent(self, name: str, fn: Callable, plate=None, parents: Optional[Sequence[str]] = None,
               init: Optional[Callable] = None) -> None:
        """Declare a latent variable with conditional distribution ``fn(**parents)``.

        Args:
            name: Variable name.
            fn: Callable returning a ``torch.distributions.Distribution``. Vector latents
                use ``Independent``. Its batch shape broadcasts against
                ``[sample dims..., plate sizes...]``.
            plate: A plate name or a sequence of them (nested plates).
            parents: Explicit parent names; default: ``fn``'s parameter names. In a
                Markov plate, ``<u>_prev`` is the previous element's value of ``u``.
            init: Markov plates: the callable for the first element, for a variable with
                ``<u>_prev`` parents (its parents: the same without those).
        """
        ps, kw = _parents_of(name, fn, parents)
        plates = self._plates(name, plate)
        prev, markov, init_var = _markov_parents(self, name, ps, plates, init, "latent")
        self._register(Variable(name, fn, ps, plates, "latent", kw, init=init_var, prev=prev, markov=markov))

    def observed(self, name: str, fn: Callable, plate=None, parents: Optional[Sequence[str]] = None,
                 init: Optional[Callable] = None) -> None:
        """Declare an observed variable; its value comes from the data at inference time.

        ``init`` as for :meth:`latent` (autoregressive observations in a Markov plate).
        """
        ps, kw = _parents_of(name, fn, parents)
        plates = self._plates(name, plate)
        prev, markov, init_var = _markov_parents(self, name, ps, plates, init, "observed")
        self._register(Variable(name, fn, ps, plates, "observed", kw, init=init_var, prev=prev, markov=markov))

    @property
    def latents(self) -> list:
        """Latent variable names in declaration order."""
        return [n for n, v in self._vars.items() if v.kind == "latent"]

    @property
    def observed_names(self) -> list:
        """Observed variable names in declaration order."""
        return [n for n, v in self._vars.items() if v.kind == "observed"]

    @property
    def graph(self) -> nx.DiGraph:
        """The model as a ``networkx.DiGraph`` (node attributes ``kind`` and ``plates``)."""
        g = nx.DiGraph()
        for n, v in self._vars.items():
            g.add_node(n, kind=v.kind, plates=v.plates)
        for n, v in self._vars.items():
            for p in v.parents:
                if p not in v.prev:  # previous values are not same-element dependencies
                    g.add_edge(p, n)
            if v.init is not None:
                for p in v.init.parents:
                    g.add_edge(p, n)
        return g

    def _state(self):
        return (self._version, len(self.plates))

    def validate(self) -> list:
        """Check the model graph and return its topological order (cached until the next declaration).

        Raises:
            TMCGraphError: unknown parents, cycles, or a variable outside a plate of one
                of its parents.
        """
        if self._validated is not None and self._validated[0] == self._state():
            return list(self._validated[1])
        for n, v in self._vars.items():
            for p in v.parents:
                if p in v.prev:
                    continue
                if p not in self._vars:
                    raise TMCGraphError(f"model variable {n!r} has unknown parent {p!r} (edge {p!r} -> {n!r})")
                if not set(self._vars[p].plates) <= set(v.plates):
                    missing = sorted(set(self._vars[p].plates) - set(v.plates))
                    raise TMCGraphError(
                        f"edge {p!r} -> {n!r}: {n!r} is outside plate(s) {missing} of its parent {p!r}; "
                        "a variable must lie in every plate of its parents"
                    )
            if v.init is not None:
                for p in v.init.parents:
                    if p not in self._vars:
                        raise TMCGraphError(f"init callable of {n!r} has unknown parent {p!r}")
                    if not set(self._vars[p].plates) <= set(v.plates):
                        raise TMCGraphError(f"init of {n!r}: {n!r} is outside the plates of its parent {p!r}")
        g = self.graph
        _check_acyclic(g, "model")
        if not self.latents and not self.observed_names:
            raise TMCGraphError("model declares no variables")
        pos = {n: i for i, n in enumerate(self._vars)}
        order = list(nx.lexicographical_topological_sort(g, key=pos.__getitem__))
        self._validated = (self._state(), order)
        return list(order)


class Proposal(_Declared):
    """A proposal Q for the latents of a :class:`Model`.

    Example:
        >>> from torch.distributions import Normal
        >>> m = Model(); m.latent("a", lambda: Normal(0., 1.))
        >>> m.latent("b", lambda a: Normal(a, 1.)); m.observed("x", lambda b: Normal(b, 1.))
        >>> q = Proposal(m)
        >>> q.latent("a", lambda x: Normal(x / 3, 1.))           # amortised: depends on data
        >>> q.latent("b", lambda a: Normal(a, 1.), coupling="mixture")  # non-factorised
        >>> sorted(q.graph.edges)
        [('a', 'b'), ('x', 'a')]
    """

    def __init__(self, model: Model):
        super().__init__()
        if not isinstance(model, Model):
            raise TMCGraphError(f"Proposal needs a Model, got {type(model).__name__}")
        # Keep the model out of the module tree: its parameters are its own.
        object.__setattr__(self, "model", model)

    def _check_name(self, name: str, plate):
        m = self.model
        if name not in m:
            raise TMCGraphError(f"proposal for unknown variable {name!r}; the model's latents are {m.latents}")
        if m[name].kind != "latent":
            raise TMCGraphError(f"proposal for observed variable {name!r}; only latents get proposals")
        if plate is not None:
            plates = m._plates(name, plate)
            if plates != m[name].plates:
                raise TMCGraphError(
                    f"proposal for {name!r} uses plates {plates} but the model declares {m[name].plates}"
                )
        return m[name].plates

    def forward(self, fn: Callable):
        """Run ``fn()`` (the proposal as a module, e.g. for ``torch.func.functional_call``)."""
        return fn()

    @staticmethod
    def _check_coupling(name, coupling):
        ok = coupling is None or isinstance(coupling, str) or all(
            callable(getattr(coupling, a, None)) for a in ("sample", "log_density"))
        if not ok:
            raise TMCGraphError(
                f"proposal for {name!r}: coupling must be a name or a coupling object "
                f"(tmcgraph.sampling.couplings), got {coupling!r}"
            )

    def _check_K(self, name, K):
        """``(K, K_steps)``: a per-latent K, or per-element counts along the latent's Markov plate."""
        if isinstance(K, (list, tuple)):
            markov = [p for p in self.model[name].plates if self.model.plates[p].markov]
            if not markov:
                raise TMCGraphError(f"proposal for {name!r}: a K per element needs a Markov plate; {name!r} lies "
                                    f"in plates {list(self.model[name].plates)}")
            steps = tuple(K)
            if not steps or any(isinstance(k, bool) or int(k) != k or k < 1 for k in steps):
                raise TMCGraphError(f"proposal for {name!r}: per-element K must be positive integers, got {K!r}")
            return max(int(k) for k in steps), tuple(int(k) for k in steps)
        if K is not None and (isinstance(K, bool) or int(K) != K or K < 1):
            raise TMCGraphError(f"proposal for {name!r}: K must be a positive integer, got {K!r}")
        return K, None

    def latent(
        self,
        name: str,
        fn: Callable,
        plate=None,
        parents: Optional[Sequence[str]] = None,
        coupling=None,
        K: Optional[int] = None,
        init: Optional[Callable] = None,
    ) -> None:
        """Declare Q for latent ``name``.

        Args:
            name: A latent of the model.
            fn: Callable returning the proposal distribution; its parents may be latents
                (sampled before this one) or observed variables.
            plate: Optional, must match the model's plates for ``name``.
            parents: Explicit parent names; default: ``fn``'s parameter names.
            coupling: How K particles are drawn when Q has latent parents: a name or a
                coupling object from :mod:`tmcgraph.sampling.couplings` (``None``: the
                default, :data:`tmcgraph.sampling.couplings.DEFAULT`). ``"mixture"``: each
                particle picks a parent particle uniformly at random; ``"permutation"``:
                each parent particle is used once (a random permutation); both have the
                mixture density (1/K) sum_j Q(z^k | z_pa^j), so every combination of
                particles carries weight. ``"paired"``: particle k uses parent particle k
                (needs equal K); its density is Q(z^k | z_pa^k); cheaper, but in TMC only
                consistent index paths carry weight, so tightly coupled chains lose most
                of the K^n combinations. Names are checked when an estimator is built.
            K: Particles for this latent (default: the estimator's K). In a Markov plate
                it may be a list, one count per element: ``max(K)`` particles are drawn
                at every element and those beyond element t's count carry no weight
                (the estimator averages over ``K_t`` particles there).
            init: Markov plates: Q at the first element when ``fn`` takes previous
                values (``<u>_prev`` parents, as in :meth:`Model.latent`). With its own
                previous value ``<name>_prev`` the latent is drawn element by element
                along the plate (the coupling says which previous particle each
                particle extends); otherwise in one call.
        """
        plates = self._check_name(name, plate)
        self._check_coupling(name, coupling)
        K, steps = self._check_K(name, K)
        ps, kw = _parents_of(name, fn, parents)
        prev, markov, init_var = _markov_parents(self, name, ps, plates, init, "proposal for")
        self._register(Variable(name, fn, ps, plates, "proposal", kw, coupling, K, init=init_var, prev=prev,
                                markov=markov, K_steps=steps))

    def prior(self, name: str, coupling=None, K: Optional[int] = None) -> None:
        """Sample latent ``name`` from its prior P(z | parents) with the given coupling.

        The prior is a proposal like any other: its density (for the coupling used)
        stays in the denominator; it is never cancelled against P.
        """
        v = self.model[name] if name in self.model else None
        self._check_name(name, None)
        self._check_coupling(name, coupling)
        K, steps = self._check_K(name, K)
        self._register(
            Variable(name, v.fn, v.parents, v.plates, "proposal", v.by_keyword, coupling, K, prior=True,
                     init=v.init, prev=dict(v.prev), markov=v.markov, K_steps=steps)
        )

    def enumerate(self, name: str) -> None:
        """Marginalise discrete latent ``name`` exactly (paper section 7.3).

        Its particles are the support of the model's distribution (``enumerate_support``),
        with a uniform proposal, so its factor is just log P(z | parents).
        """
        v = self.model[name] if name in self.model else None
        self._check_name(name, None)
        self._register(
            Variable(name, v.fn, v.parents, v.plates, "proposal", v.by_keyword, None, None, enumerate=True,
                     init=v.init, prev=dict(v.prev), markov=v.markov)
        )

    def joint(self, plate: str = "auto") -> None:
        """Draw the latents of ``plate`` as K joint samples of the whole plate (crossed plates).

        Latents in crossed plates (e.g. ``a_u`` per user and ``b_i`` per item, observed
        ``y_ui`` in both) cannot all have one index per plate element: the sum over
        their combinations does not factorise. With ``q.joint("items")`` every sampled
        latent in plate ``items`` shares one sample dim that is *not* local to
        ``items``: particle ``k`` is a whole vector ``(b_1^k, ..., b_I^k)`` drawn paired
        along that dim (:class:`tmcgraph.sampling.couplings.Across`). The estimator is
        importance sampling (IWAE-like) along ``items`` and TMC everywhere else, and
        stays unbiased for p(x). ``plate="auto"`` picks the smaller of each pair of
        crossed plates (by declared size) when :meth:`validate` finds them.
        """
        if plate != "auto" and plate not in self.model.plates:
            raise TMCGraphError(f"q.joint: unknown plate {plate!r}; plates are {list(self.model.plates)}")
        joints = tuple(getattr(self, "_joints", ()))
        if plate in joints:
            raise TMCGraphError(f"q.joint({plate!r}) is declared twice")
        object.__setattr__(self, "_joints", joints + (plate,))
        self._version += 1

    @property
    def joint_plates(self) -> tuple:
        """The plates whose latents are drawn jointly (``q.joint``; ``"auto"`` resolved by :meth:`validate`)."""
        self.validate()
        return self._validated[2]

    def _resolve_joints(self) -> tuple:
        """``q.joint`` plates with ``"auto"`` resolved; raises on crossed plates nobody resolved."""
        m = self.model
        declared = tuple(getattr(self, "_joints", ()))
        joints = [p for p in declared if p != "auto"]
        while True:
            crossing = _crossing(m, self, joints)
            if crossing is None:
                return tuple(joints)
            (a, va), (b, vb), (S, vs) = crossing
            if "auto" in declared:
                pa = [p for p in a if p not in b]
                pb = [p for p in b if p not in a]
                sizes = {p: m.plates[p].size for p in pa + pb}
                if any(v is None for v in sizes.values()):
                    raise TMCGraphError(
                        f"q.joint('auto') cannot choose between crossed plates {pa} and {pb}: their sizes are "
                        f"not declared; name one, e.g. q.joint({pb[0]!r})")
                joints.append(min(pa + pb, key=lambda p: (sizes[p], (pa + pb).index(p))))
                continue
            raise TMCGraphError(
                f"crossed plates: latent(s) {va} in plates {list(a)} and {vb} in plates {list(b)} meet in "
                f"{vs} (plates {list(S)}); their particle combinations do not factorise over the plate elements. "
                f"Options: q.joint({[p for p in b if p not in a][0]!r}) or "
                f"q.joint({[p for p in a if p not in b][0]!r}) "
                "(K joint samples of that plate's latents: importance sampling along it, TMC elsewhere), "
                "q.joint('auto') (the smaller plate), or nest the plates"
            )

    @property
    def graph(self) -> nx.DiGraph:
        """Sampling graph of Q (enumerated latents depend on their model parents)."""
        g = nx.DiGraph()
        for n in self.model.latents:
            g.add_node(n, kind="latent")
        for n, v in self._vars.items():
            parents = [v.prev.get(p, p) for p in v.parents] + list(v.init.parents if v.init is not None else ())
            for p in parents:
                if p == n:
                    continue  # its own previous value: drawn element by element
                if p not in g:
                    g.add_node(p, kind=self.model[p].kind if p in self.model else "unknown")
                g.add_edge(p, n)
        return g

    def validate(self) -> list:
        """Check the proposal against its model and return the sampling order (cached until a declaration).

        Raises:
            TMCGraphError: a latent without a proposal, unknown parents, plate
                violations, or a cycle.
        """
        m = self.model
        m.validate()
        state = (self._version, m._state())
        if self._validated is not None and self._validated[0] == state:
            return list(self._validated[1])
        missing = [n for n in m.latents if n not in self._vars]
        if missing:
            raise TMCGraphError(
                f"latent(s) {missing} have no proposal; declare q.latent(...), q.prior(...) or q.enumerate(...)"
            )
        for n, v in self._vars.items():
            for p in list(v.parents) + list(v.init.parents if v.init is not None else ()):
                if p in v.prev:
                    continue
                if p not in m:
                    raise TMCGraphError(f"proposal for {n!r} has unknown parent {p!r} (edge {p!r} -> {n!r})")
                if not set(m[p].plates) <= set(v.plates) and m[p].kind != "observed":
                    extra = sorted(set(m[p].plates) - set(v.plates))
                    raise TMCGraphError(
                        f"proposal edge {p!r} -> {n!r}: {n!r} is outside plate(s) {extra} of its latent parent {p!r} "
                        "(only observed parents may lie in extra plates: they arrive as trailing dims)"
                    )
        g = self.graph
        _check_acyclic(g, "proposal")
        pos = {n: i for i, n in enumerate(m._vars)}
        order = [n for n in nx.lexicographical_topological_sort(g, key=pos.__getitem__) if n in self._vars]
        self._validated = (state, order, self._resolve_joints())
        return list(order)


def _crossing(m: "Model", q: "Proposal", joints) -> Optional[tuple]:
    """The first pair of crossed plate sets the factors would live at, or ``None``.

    A latent's sample dim is local to its plates (minus ``joints`` for sampled latents
    in a joint plate); a factor lives at the plates some of its dims are local to.
    Those sets must be nested wherever they meet inside another (the planner's ordinal
    tree, :mod:`tmcgraph.ops.ordinals`). Returns ``((a, vars at a), (b, vars at b),
    (S, vars at S))``.
    """
    local = {}
    for n in m.latents:
        v = m[n]
        enum = n in q and q[n].enumerate
        local[n] = set(v.plates) if enum else set(p for p in v.plates if p not in joints)
    lives = {}
    for n, v in m.variables.items():
        dims = ([n] if v.kind == "latent" else []) + [p for p in v.parents if p in local]
        at = frozenset(p for p in v.plates if any(p in local[d] for d in dims))
        lives.setdefault(at, []).append(n)
    sets = set(lives) | {frozenset()}
    for S in sorted(sets, key=len):
        subs = sorted((T for T in sets if T < S), key=lambda T: (len(T), sorted(T)))
        for i, a in enumerate(subs):
            for b in subs[i + 1:]:
                if not (a <= b or b <= a):
                    def order(T):
                        return tuple(p for p in m.plates if p in T)
                    return ((order(a), lives.get(a, [])), (order(b), lives.get(b, [])), (order(S), lives.get(S, [])))
    return None


def check_inference_inputs(model, proposal, K) -> None:
    """Raise unless ``model`` and ``proposal`` belong together and ``K`` is a positive integer."""
    if not isinstance(model, Model):
        raise TMCGraphError(f"model must be a tmcgraph.Model, got {type(model).__name__}")
    if not isinstance(proposal, Proposal):
        raise TMCGraphError(f"proposal must be a tmcgraph.Proposal, got {type(proposal).__name__}")
    if proposal.model is not model:
        raise TMCGraphError("the proposal was declared for a different model")
    if isinstance(K, bool) or int(K) != K or K < 1:
        raise TMCGraphError(f"K must be a positive integer, got {K!r}")
