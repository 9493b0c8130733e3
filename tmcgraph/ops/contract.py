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

from .backends.log import compile_pair, logsumexp
from .factor import Lazy
from .plan import Plan

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
    """

    def __init__(self, plan: Plan):
        self.plan = plan
        self.steps = tuple((step, _ops(step.program)) for step in plan.steps)

    def __call__(self, tensors) -> torch.Tensor:
        slots = list(tensors)
        if len(slots) != self.plan.n_inputs:
            raise ValueError(f"plan expects {self.plan.n_inputs} tensors, got {len(slots)}")
        for step, ops in self.steps:
            slots.append(_step(step, ops, [slots[i] for i in step.inputs]))
        return slots[-1] if self.plan.keep_scale == 1.0 else slots[-1] * self.plan.keep_scale


@functools.lru_cache(maxsize=256)
def prepare(plan: Plan) -> Prepared:
    """The (cached) :class:`Prepared` form of ``plan``."""
    return Prepared(plan)


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


def _step(step, ops, args) -> torch.Tensor:
    r = _run_sliced(step, ops, args) if step.sliced else _run(ops, args)
    if not step.reduce_axes:
        return r
    r = r.sum(dim=step.reduce_axes)
    return r if step.scale == 1.0 else r * step.scale


def run_step(step, args) -> torch.Tensor:
    """One plan step on its input tensors: its contraction (sliced if planned so), then its plate products."""
    return _step(step, _ops(step.program), args)


def contract(plan: Plan, tensors) -> torch.Tensor:
    """Run ``plan`` on log-factor tensors (in the order of the factor graph it was made for).

    Args:
        plan: A plan (:func:`tmcgraph.ops.plan.plan_for`).
        tensors: Log-factor tensors, one per factor.

    Returns:
        The log of the plated sum-product: a scalar, or a vector over the plan's
        ``keep`` plate.
    """
    return prepare(plan)(tensors)
