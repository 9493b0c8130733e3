"""Log-densities of distribution objects, with fused kernels for common families.

Every log-factor and proposal density of the pipeline is computed by :func:`log_prob`,
which is ``d.log_prob(value)`` unless a kernel is registered for ``type(d)``
(:func:`register_log_prob`). A registered kernel computes the same density with fewer
passes over memory, and may decline an instance (return ``NotImplemented``), which then
falls back to ``d.log_prob``.

Registered here:

* ``Independent(Bernoulli(...), 1)``, the pixel likelihood of image models. For logits
  ``l`` and a value ``x`` (0/1 or grey levels in [0, 1]),

      log p(x) = sum_d x_d l_d - softplus(l_d),

  which equals torch's ``-binary_cross_entropy_with_logits(l, x)`` summed over the last
  axis. The first sum is a broadcasting ``torch.einsum``, so when the data ``[B, D]``
  meet logits of ``[K, B, D]`` particles no ``[K, B, D]`` product is formed; the second
  is one ``softplus``. Support validation is kept: when the base distribution validates
  its arguments, the value is checked exactly as ``Bernoulli.log_prob`` checks it.

The kernels are tested against ``torch.distributions`` (values and gradients) in
``tests/sampling/test_densities.py``.
"""

from __future__ import annotations

import threading
from typing import Callable

import torch
import torch.nn.functional as F
from torch.distributions import Bernoulli, Distribution, Independent

from ..errors import TMCGraphError

__all__ = ["log_prob", "register_log_prob", "bernoulli_logits_log_prob"]

LogProb = Callable[[Distribution, torch.Tensor], torch.Tensor]

_REGISTRY: dict = {}
_LOCK = threading.Lock()


def register_log_prob(cls: type) -> Callable[[LogProb], LogProb]:
    """Register a fused log-density for exactly the class ``cls`` (decorator factory).

    Used like :func:`tmcgraph.sampling.samplers.register_sampler`::

        @register_log_prob(MyDist)
        def _(d, value): ...

    Unlike samplers, a kernel serves only ``cls`` itself, not its subclasses: a subclass
    may override ``log_prob``. The kernel returns ``NotImplemented`` for instances it does
    not handle. Registering the same class again replaces its kernel.

    Raises:
        TMCGraphError: If ``cls`` is not a Distribution subclass, or the decorated
            object is not callable.
    """
    if not (isinstance(cls, type) and issubclass(cls, Distribution)):
        raise TMCGraphError(f"register_log_prob expects a torch.distributions.Distribution subclass, got {cls!r}")

    def decorator(fn: LogProb) -> LogProb:
        if not callable(fn):
            raise TMCGraphError(f"register_log_prob({cls.__name__}) must decorate a callable, got {fn!r}")
        with _LOCK:
            _REGISTRY[cls] = fn
        return fn

    return decorator


def log_prob(d: Distribution, value: torch.Tensor) -> torch.Tensor:
    """``d.log_prob(value)``, by the kernel registered for ``type(d)`` when it handles ``d``."""
    fn = _REGISTRY.get(type(d))
    if fn is not None:
        out = fn(d, value)
        if out is not NotImplemented:
            return out
    return d.log_prob(value)


def bernoulli_logits_log_prob(logits: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``sum_d value_d * logits_d - softplus(logits_d)`` over the last axis, broadcasting.

    The log-density of independent Bernoulli pixels with logits ``logits`` at ``value``
    (grey levels allowed), of shape ``broadcast(logits, value).shape[:-1]``.
    """
    xl = torch.einsum("...d,...d->...", logits, value)
    sp = F.softplus(logits).sum(-1)
    return xl - sp


@register_log_prob(Independent)
def _independent(d: Independent, value: torch.Tensor):
    base = d.base_dist
    if type(base) is not Bernoulli or d.reinterpreted_batch_ndims != 1 or not torch.is_tensor(value):
        return NotImplemented
    logits = base.logits
    if value.dtype != logits.dtype or value.shape[-1:] != logits.shape[-1:]:
        return NotImplemented  # mixed dtypes or a broadcast event axis: torch's own rules
    if base._validate_args:
        base._validate_sample(value)
    return bernoulli_logits_log_prob(logits, value)
