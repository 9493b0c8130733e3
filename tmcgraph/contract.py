"""Executing a :class:`~tmcgraph.plan.Plan` on log-factor tensors in log space."""

from __future__ import annotations

import torch

from .plan import Plan

__all__ = ["contract", "BACKEND"]

#: The opt_einsum backend module used for every step (log-space sum-product).
BACKEND = "tmcgraph.backends.log"


def contract(plan: Plan, tensors, backend: str = BACKEND) -> torch.Tensor:
    """Run ``plan`` on factor tensors (in the order the plan was made for).

    Args:
        plan: A compiled plan.
        tensors: Log-factor tensors, one per factor.
        backend: opt_einsum backend module name (a semiring).

    Returns:
        The log of the plated sum-product: a scalar, or a vector over the plan's
        ``keep`` plate.
    """
    slots = list(tensors)
    if len(slots) != plan.n_inputs:
        raise ValueError(f"plan expects {plan.n_inputs} tensors, got {len(slots)}")
    for step in plan.steps:
        r = step.expression(*[slots[i] for i in step.inputs], backend=backend)
        if step.reduce_axes:
            r = r.sum(dim=step.reduce_axes)
        slots.append(r)
    return slots[-1]
