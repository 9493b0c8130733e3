"""Programs: factor construction and contraction for one structure, compiled by ``torch.compile``.

Evaluating a factor graph eagerly runs one unfused kernel per distribution operation
and materialises every K x K (x plate) log-factor grid before the contraction sums it.
A :class:`Program` is the part of the pipeline after sampling, for one *structure*
(model declaration, particle layouts, shapes, dtypes, plan): a function from the
particles, their densities and the data to the value. It is made once per structure
(from the first, eager, evaluation, which also validates shapes) and kept in the
estimator's bounded cache. When compiled, ``torch.compile`` traces it whole, through
the user's distributions, the factor assembly and the contraction's pairwise
programs, so inductor fuses each density grid with the log-space reduction that
consumes it and the Python bookkeeping runs once, at trace time.

Compilation policy (the estimators' ``compile=`` option):

* ``False``: never compile.
* ``True``: compile on the program's first call after the eager one.
* ``"auto"`` (default): the ski-rental rule. A program runs eagerly until the CPU time
  its eager calls have taken reaches the estimated cost of compiling it
  (:data:`COMPILE_SECONDS` + :data:`COMPILE_SECONDS_PER_FACTOR` per factor, measured on
  this engine: about 3 s for the Gaussian toy, 29 s for a 50-latent chain, 100 s for 200
  latents; each element of a Markov plate counts as a factor), then compiles. Whatever
  the speed-up, the total time is then at most about twice that of the better of
  "always eager" and "compile at once"; a program called a handful of times, or cheap
  per call (as in most tests), never pays for a compile.

If compilation or the compiled call fails (e.g. no working C++ compiler for inductor),
the program warns once (:class:`CompileWarning`), falls back to eager execution for
good, and the call is rerun eagerly. Compiled and eager programs compute the same
function; values agree to floating point rounding, not bit for bit.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
import types
import warnings
from collections import OrderedDict
from typing import Optional

import torch

from ..errors import TMCGraphError
from ..ops.contract import prepare
from ..ops.factor import Lazy
from ..particles import Deferred, Samples
from .factors import factor_builders

__all__ = ["Program", "ProgramCache", "CompileWarning", "COMPILE_MODES", "COMPILE_SECONDS",
           "COMPILE_SECONDS_PER_FACTOR", "structure_key", "split_deferred"]

#: Accepted values of ``compile=``.
COMPILE_MODES = (False, True, "auto")
#: Estimated fixed cost (s) of compiling a program, for ``compile="auto"``.
COMPILE_SECONDS = 2.0
#: Estimated cost (s) of compiling per factor of the program, for ``compile="auto"``.
COMPILE_SECONDS_PER_FACTOR = 0.5

_NAMES = itertools.count()


class CompileWarning(UserWarning):
    """``torch.compile`` could not compile a program; it runs eagerly instead."""


def structure_key(samples: Samples) -> tuple:
    """Everything about particles that a program's trace depends on (not their values)."""

    def meta(t):
        if isinstance(t, Deferred):
            return "deferred", t.fn, t.recipe, tuple(meta(x) for x in t.tensors)
        return tuple(t.shape), t.dtype, t.device, t.requires_grad

    return (
        tuple(samples.order),
        tuple(sorted(samples.dims.items())),
        tuple(sorted((d, tuple(o)) for d, o in samples.ordinals.items())),
        tuple(sorted(samples.plate_sizes.items())),
        tuple((n, meta(v)) for n, v in samples.values.items()),
        tuple((n, meta(v)) for n, v in samples.log_q.items()),
        tuple((n, meta(v)) for n, v in samples.data.items()),
    )


def split_deferred(samples: Samples) -> tuple:
    """``(static, tensors, inputs)`` of the deferred densities: name -> (fn, recipe), name -> tensors, rest."""
    static, tensors, rest = {}, {}, {}
    for n, v in samples.log_q.items():
        if isinstance(v, Deferred):
            static[n] = (v.fn, v.recipe)
            tensors[n] = v.tensors
        else:
            rest[n] = v
    return static, tensors, rest


def _cast(build, dtype):
    """``build`` with its result in ``dtype`` (the graph's one floating dtype)."""
    if dtype is None:
        return build

    def cast(narrowed=()):
        t = build(narrowed)
        return t if t.dtype == dtype else t.to(dtype)

    return cast


def _chain_elements(plan) -> int:
    """Elements of the Markov plates a plan multiplies out as chains.

    A Markov program's compile time grows with its plate's length as an unrolled chain's
    does (about 100 s at T = 200 on this engine, though it has only a few factors), so
    each element counts as a factor in the compile-cost estimate.
    """
    sizes = {}
    for dims, plates, shape in plan.structure:
        sizes.update(zip(tuple(dims) + tuple(plates), shape))
    return sum(int(sizes.get(s.markov[0], 0)) for s in plan.steps if s.markov)


def _fresh(fn, name: str):
    """``fn`` with its own code object, so torch.compile keeps a separate cache for it."""
    code = fn.__code__.replace(co_name=name)
    return types.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)


class Program:
    """Factor construction + contraction of one structure, eager or compiled.

    A call computes the deferred densities of the particles (see
    :class:`~tmcgraph.particles.Deferred`), builds the factors and contracts them, and
    returns the value and the computed densities. Factors are
    :class:`~tmcgraph.ops.factor.Lazy`: each is computed inside the plan step that
    consumes it and released after, and a step sliced to meet ``memory_limit`` computes
    its factors slice by slice, so no factor is ever held whole unless a step needs it.

    Args:
        model: The model.
        skeleton: Particles of the structure (their bookkeeping is reused, their
            tensors replaced on every call), taken before their densities are computed.
        plan: The contraction plan of the structure's factor graph.
        ctx: Execution context (dtype/device of distribution parameters).
        mode: ``False``, ``True`` or ``"auto"`` (see the module docstring).
        dtype: The floating dtype of the structure's factors (``None``: as built).
        split: ``(plate, chunk)`` or ``None`` (see :func:`tmcgraph.ops.contract`).
    """

    def __init__(self, model, skeleton: Samples, plan, ctx, mode, dtype=None, split=None):
        self.plan = plan
        self.mode = mode
        self.calls = 0
        #: CPU seconds spent in eager calls (the first, pipeline-run one included by the caller).
        self.eager_seconds = 0.0
        self.compiled = None
        self.failed = None
        prepared = prepare(plan, split)
        dims, sizes, ordinals = dict(skeleton.dims), dict(skeleton.sizes), dict(skeleton.ordinals)
        plate_sizes, plates, order = dict(skeleton.plate_sizes), dict(skeleton.plates), list(skeleton.order)
        couplings = dict(skeleton.couplings)
        deferred = split_deferred(skeleton)[0]

        # The structure's first call (eager, through the pipeline) checked every shape.
        check = False

        def body(values, log_q, deferred_tensors, data):
            computed = {n: fn(recipe, *deferred_tensors[n]) for n, (fn, recipe) in deferred.items()}
            s = Samples(values, dims, sizes, ordinals, {**log_q, **computed}, data, plate_sizes, plates, order,
                        couplings)
            lazy = [Lazy(_cast(build, dtype)) for *_, build in factor_builders(model, s, ctx, check=check)]
            return prepared(lazy), computed

        self.eager = _fresh(body, f"tmcgraph_program_{next(_NAMES)}")

    @property
    def compile_seconds(self) -> float:
        """The estimated cost of compiling this program (``compile="auto"``)."""
        return COMPILE_SECONDS + COMPILE_SECONDS_PER_FACTOR * (self.plan.n_inputs + _chain_elements(self.plan))

    @property
    def wants_compile(self) -> bool:
        """Whether the next call should run compiled (by the policy and the calls so far)."""
        if self.failed is not None or self.mode is False:
            return False
        if self.mode is True or self.compiled is not None:
            return True
        return self.eager_seconds >= self.compile_seconds

    def __call__(self, samples: Samples, eager: bool = False) -> torch.Tensor:
        """The value at ``samples``; their deferred densities are computed and stored in ``samples``.

        ``eager=True`` runs this call eagerly whatever the policy (a structure's first call).
        """
        _, tensors, rest = split_deferred(samples)
        args = (dict(samples.values), rest, tensors, dict(samples.data))
        self.calls += 1
        value, computed = self.eager(*args) if eager else self._run(args)
        samples.log_q.update(computed)
        return value

    def _run(self, args):
        if not self.wants_compile:
            if self.mode is False or self.failed is not None:  # never compiles: no clock read (a system call)
                with _validation_off():
                    return self.eager(*args)
            t = time.process_time()
            with _validation_off():
                out = self.eager(*args)
            self.eager_seconds += time.process_time() - t
            return out
        try:
            with _validation_off():
                if self.compiled is None:
                    self.compiled = torch.compile(self.eager, dynamic=False)
                return self.compiled(*args)
        except TMCGraphError:
            raise
        except Exception as e:  # noqa: BLE001 - any compiler failure falls back to eager
            self.failed = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            warnings.warn(f"torch.compile failed ({self.failed}); this program runs eagerly", CompileWarning,
                          stacklevel=4)
            return self.eager(*args)


@contextlib.contextmanager
def _validation_off():
    """Distribution argument validation off during a program's call, the caller's setting restored after.

    The structure's arguments and values were validated by its first call, which runs
    through the pipeline with the caller's setting; later calls skip ``torch.distributions``'
    per-call checks (up to a fifth of a small model's call). Dynamo's one-time set-up
    turns validation off for the whole process; restoring the setting keeps a compiled
    call from changing global state.
    """
    prev = torch.distributions.Distribution._validate_args
    torch.distributions.Distribution.set_default_validate_args(False)
    try:
        yield
    finally:
        torch.distributions.Distribution.set_default_validate_args(prev)


class ProgramCache:
    """A bounded, thread-safe LRU cache of :class:`Program` s by key.

    Args:
        maxsize: Programs kept; the least recently used is dropped beyond it.
    """

    def __init__(self, maxsize: int = 32):
        self.maxsize = maxsize
        self._items: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key) -> Optional[Program]:
        with self._lock:
            prog = self._items.get(key)
            if prog is not None:
                self._items.move_to_end(key)
            return prog

    def put(self, key, prog: Program) -> Program:
        with self._lock:
            prog = self._items.setdefault(key, prog)
            self._items.move_to_end(key)
            while len(self._items) > self.maxsize:
                self._items.popitem(last=False)
            return prog

    def __len__(self):
        return len(self._items)

    def info(self) -> dict:
        """Programs cached, how many are compiled, and which fell back to eager (with why)."""
        with self._lock:
            progs = list(self._items.values())
        return {"programs": len(progs), "compiled": sum(p.compiled is not None and p.failed is None for p in progs),
                "failed": [p.failed for p in progs if p.failed]}
