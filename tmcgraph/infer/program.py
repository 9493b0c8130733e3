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
* ``"auto"`` (default): compile on the second call of a program whose plan costs at
  least :data:`AUTO_MIN_FLOPS` (where a compile of a few seconds pays for itself
  within a few calls); smaller programs stay eager.

If compilation or the compiled call fails (e.g. no working C++ compiler for inductor),
the program warns once (:class:`CompileWarning`), falls back to eager execution for
good, and the call is rerun eagerly. Compiled and eager programs compute the same
function; values agree to floating point rounding, not bit for bit.
"""

from __future__ import annotations

import itertools
import threading
import types
import warnings
from collections import OrderedDict
from typing import Optional

import torch

from ..errors import TMCGraphError
from ..ops.contract import prepare
from ..particles import Samples
from .factors import factor_graph

__all__ = ["Program", "ProgramCache", "CompileWarning", "COMPILE_MODES", "AUTO_MIN_FLOPS", "structure_key"]

#: Accepted values of ``compile=``.
COMPILE_MODES = (False, True, "auto")
#: ``compile="auto"`` compiles programs whose plan costs at least this many flops.
AUTO_MIN_FLOPS = 10**7

_NAMES = itertools.count()


class CompileWarning(UserWarning):
    """``torch.compile`` could not compile a program; it runs eagerly instead."""


def structure_key(samples: Samples) -> tuple:
    """Everything about particles that a program's trace depends on (not their values)."""

    def meta(t):
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


def _fresh(fn, name: str):
    """``fn`` with its own code object, so torch.compile keeps a separate cache for it."""
    code = fn.__code__.replace(co_name=name)
    return types.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)


class Program:
    """Factor construction + contraction of one structure, eager or compiled.

    Args:
        model: The model.
        skeleton: Particles of the structure (their bookkeeping is reused, their
            tensors replaced on every call).
        plan: The contraction plan of the structure's factor graph.
        ctx: Execution context (dtype/device of distribution parameters).
        mode: ``False``, ``True`` or ``"auto"`` (see the module docstring).
    """

    def __init__(self, model, skeleton: Samples, plan, ctx, mode):
        self.plan = plan
        self.mode = mode
        self.calls = 0
        self.compiled = None
        self.failed = None
        prepared = prepare(plan)
        dims, sizes, ordinals = dict(skeleton.dims), dict(skeleton.sizes), dict(skeleton.ordinals)
        plate_sizes, plates, order = dict(skeleton.plate_sizes), dict(skeleton.plates), list(skeleton.order)
        couplings = dict(skeleton.couplings)

        def body(values, log_q, data):
            s = Samples(values, dims, sizes, ordinals, log_q, data, plate_sizes, plates, order, couplings)
            return prepared(factor_graph(model, s, ctx).tensors)

        self.eager = _fresh(body, f"tmcgraph_program_{next(_NAMES)}")

    @property
    def wants_compile(self) -> bool:
        """Whether the next call should run compiled (by the policy and the calls so far)."""
        if self.failed is not None or self.mode is False:
            return False
        if self.mode is True:
            return True
        return self.calls >= 1 and self.plan.cost >= AUTO_MIN_FLOPS

    def __call__(self, samples: Samples) -> torch.Tensor:
        args = (dict(samples.values), dict(samples.log_q), dict(samples.data))
        self.calls += 1
        if not self.wants_compile:
            return self.eager(*args)
        if self.compiled is None:
            self.compiled = torch.compile(self.eager, dynamic=False)
        try:
            return self.compiled(*args)
        except TMCGraphError:
            raise
        except Exception as e:  # noqa: BLE001 - any compiler failure falls back to eager
            self.failed = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            warnings.warn(f"torch.compile failed ({self.failed}); this program runs eagerly", CompileWarning,
                          stacklevel=3)
            return self.eager(*args)


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
