"""Executing a :class:`~tmcgraph.ops.plan.Plan` on log-factor tensors in log space.

Each step runs its compiled pairwise program (see :func:`tmcgraph.ops.backends.log.compile_pair`)
on the step's inputs; a sliced step (memory limit) runs once per value of its sliced
indices on views of the inputs and sums the results in log space, checkpointing each
slice under autograd so that saved activations stay within the limit too.

Inputs may be :class:`~tmcgraph.ops.factor.Lazy` factors: each is built by the pairwise
operation that first reads it and released after its last use (in a sliced step, built
per slice at the slice's size), so factors are never all alive at once.
"""

from __future__ import annotations

import functools
import itertools

import torch
from torch.utils.checkpoint import checkpoint

from ..errors import TMCGraphError
from .backends.log import compile_pair, logsumexp
from .factor import Lazy
from .plan import Plan
from .scan import log_chain_vector

__all__ = ["contract", "run_step", "prepare", "Prepared"]


class _Reduce:
    """Sum out indices of one operand and permute to ``out``."""

    def __init__(self, term, out):
        self.drop = [i for i, c in enumerate(term) if c not in out]
        kept = [c for c in term if c in out]
        self.perm = None if "".join(kept) == out else [kept.index(c) for c in out]

    def __call__(self, x):
        if self.drop:
            x = logsumexp(x, self.drop)
        return x if self.perm is None else x.permute(self.perm)


@functools.lru_cache(maxsize=1024)
def _ops(program):
    """``(a, b, op, free)`` per operation of a plan step's program (ops compiled once)."""
    return tuple((a, b, _Reduce(ta, to) if b is None else compile_pair(ta, tb, to), free)
                 for a, b, ta, tb, to, free in program)


class Prepared:
    """A plan with every step's pairwise operations compiled: what execution needs, nothing to look up.

    Running a ``Prepared`` does no cache lookups, so it can be traced as a whole (e.g. by
    ``torch.compile``).

    Args:
        plan: The plan.
        split: ``(plate, chunk)`` or ``None``: evaluate everything inside ``plate`` in
            chunks of ``chunk`` of its elements (see :func:`contract`).
    """

    def __init__(self, plan: Plan, split=None):
        self.plan = plan
        self.steps = tuple((step, _ops(step.program)) for step in plan.steps)
        self.split = None if split is None else _split_spec(plan, *split)

    def __call__(self, tensors) -> torch.Tensor:
        slots = list(tensors)
        if len(slots) != self.plan.n_inputs:
            raise ValueError(f"plan expects {self.plan.n_inputs} tensors, got {len(slots)}")
        done = {}
        if self.split is not None:
            done = _run_split(self.split, self.steps, slots)
        for i, (step, ops) in enumerate(self.steps):
            if i in done:
                slots.append(done[i])
            elif self.split is not None and i in self.split[3]:
                slots.append(None)  # computed chunk by chunk, used only inside the split region
            else:
                slots.append(_step(step, ops, [slots[j] for j in step.inputs]))
        return slots[-1] if self.plan.keep_scale == 1.0 else slots[-1] * self.plan.keep_scale


def _split_spec(plan: Plan, plate: str, chunk: int) -> tuple:
    """``(plate, chunk, size, region, exported, axes)`` of a split plate (checked)."""
    sizes = {}
    axes = []
    for dims, plates, shape in plan.structure:
        for name, n in zip(tuple(dims) + tuple(plates), shape):
            sizes[name] = n
        axes.append(len(dims) + plates.index(plate) if plate in plates else None)
    if plate not in sizes:
        raise TMCGraphError(f"split: no factor lies in plate {plate!r}")
    if plate == plan.keep:
        raise TMCGraphError(f"split: plate {plate!r} is kept per element; split another plate")
    region = tuple(i for i, s in enumerate(plan.steps) if plate in s.ordinal)
    for i in region:
        if plan.steps[i].markov and plan.steps[i].markov[0] == plate:
            raise TMCGraphError(f"split: Markov plate {plate!r} is a chain, not independent elements")
    exported = tuple(i for i in region if plate not in plan.steps[i].out_plates)
    return plate, int(chunk), sizes[plate], region, exported, tuple(axes)


def _run_split(spec, steps, factors) -> dict:
    """The split region's exported step results, accumulated over chunks (checkpointed under autograd)."""
    plate, chunk, size, region, exported, axes = spec
    n_in = len(factors)
    grad = torch.is_grad_enabled()

    def run(start, length, *tensors):
        slots = [t if ax is None else t.narrow(ax, start, length) for t, ax in zip(tensors, axes)]
        slots = slots + [None] * len(steps)
        for i in region:
            step, ops = steps[i]
            slots[n_in + i] = _step(step, ops, [slots[j] for j in step.inputs])
        return tuple(slots[n_in + i] for i in exported)

    acc = None
    for start in range(0, size, chunk):
        length = min(chunk, size - start)
        if grad:
            part = checkpoint(run, start, length, *factors, use_reentrant=False)
        else:
            part = run(start, length, *factors)
        acc = list(part) if acc is None else [a + b for a, b in zip(acc, part)]
    return dict(zip(exported, acc))


@functools.lru_cache(maxsize=256)
def prepare(plan: Plan, split=None) -> Prepared:
    """The (cached) :class:`Prepared` form of ``plan`` (``split``: see :class:`Prepared`)."""
    return Prepared(plan, split)


def _read(x):
    return x() if isinstance(x, Lazy) else x


def _run(ops, args):
    slots = list(args)
    del args
    for a, b, op, free in ops:
        r = op(_read(slots[a])) if b is None else op(_read(slots[a]), _read(slots[b]))
        for i in free:
            slots[i] = None
        slots.append(r)
    return slots[-1]


def _run_sliced(step, ops, args):
    grad = torch.is_grad_enabled() and any(isinstance(t, Lazy) or t.requires_grad for t in args)
    acc = None
    for values in itertools.product(*(range(n) for _, n, _ in step.sliced)):
        part = list(args)
        for (_, _, axes), v in zip(step.sliced, values):
            for i, ax in enumerate(axes):
                if ax is not None:
                    part[i] = part[i].narrow(ax, v, 1)
        if grad:
            r = checkpoint(_run, ops, part, use_reentrant=False)
        else:
            r = _run(ops, part)
        del part
        acc = r if acc is None else logsumexp(torch.stack([acc, r]), 0)
    return acc


def _chain(r: torch.Tensor, spec) -> torch.Tensor:
    """Multiply out a Markov plate: ``r`` ``[*out, *prev states, *states, *plates]`` -> ``[*out, *other plates]``."""
    _, n_out, state_sizes, time_axis = spec
    n_s = len(state_sizes)
    K = 1
    for k in state_sizes:
        K *= k
    x = r.movedim(time_axis, -1)  # [*out, *prev, *cur, *rest, T]
    nd = x.dim()
    rest = list(range(n_out + 2 * n_s, nd - 1))
    x = x.permute(list(range(n_out)) + rest + [nd - 1] + list(range(n_out, n_out + 2 * n_s)))
    batch = x.shape[:n_out + len(rest)]
    x = x.reshape(*batch, x.shape[len(batch)], K, K)
    zero = x.new_zeros(K)
    return _eager_chain(zero, x, zero)


# The chain runs eagerly inside compiled programs: tracing it would unroll one call per
# element (the recursion) or per level (the scan), so compile time would grow with T,
# while each call is already one batched kernel.
_eager_chain = torch.compiler.disable(log_chain_vector)


def _step(step, ops, args) -> torch.Tensor:
    r = _run_sliced(step, ops, args) if step.sliced else _run(ops, args)
    if step.markov:
        r = _chain(r, step.markov)
    if not step.reduce_axes:
        return r
    r = r.sum(dim=step.reduce_axes)
    return r if step.scale == 1.0 else r * step.scale


def run_step(step, args) -> torch.Tensor:
    """One plan step on its input tensors: its contraction (sliced if planned so), then its plate products.

    A step that multiplies out a Markov plate does it as a chain of log-matrix products
    over the flattened states (:mod:`tmcgraph.ops.scan`), then multiplies out its other
    plates.
    """
    return _step(step, _ops(step.program), args)


def contract(plan: Plan, tensors, split=None) -> torch.Tensor:
    """Run ``plan`` on log-factor tensors (in the order of the factor graph it was made for).

    Args:
        plan: A plan (:func:`tmcgraph.ops.plan.plan_for`).
        tensors: Log-factor tensors (or :class:`~tmcgraph.ops.factor.Lazy` factors), one
            per factor.
        split: ``(plate, chunk)`` or ``None``. Every step inside ``plate`` (the steps
            whose ordinal contains it) runs once per chunk of ``chunk`` consecutive
            elements, on the inputs narrowed to the chunk (a ``Lazy`` factor is built at
            the chunk's size), and the messages leaving the plate are summed over chunks:
            the product over a plate's elements is a sum of their log-messages, so the
            result is the unsplit one up to float rounding. Under autograd each chunk is
            checkpointed (recomputed in the backward pass), so memory is that of one
            chunk. ``plate`` must not be kept or Markov.

    Returns:
        The log of the plated sum-product: a scalar, or a vector over the plan's
        ``keep`` plate.
    """
    return prepare(plan, None if split is None else (split[0], int(split[1])))(tensors)
