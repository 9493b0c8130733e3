"""``TraceTMC_ELBO``: a drop-in for Pyro's loss of the same name, computed by tmcgraph.

The loss is ``-log P_TMC``, where P_TMC is tmcgraph's TMC estimate for the model and
guide (:class:`tmcgraph.pyro.TMC`): an unbiased estimate of p(x), whatever the guide's
dependency structure, because each particle's denominator is the density it was drawn
from. Pyro's own ``TraceTMC_ELBO`` divides by the guide's density over the whole grid
of parent particles instead, which is biased for non-factorised guides (see
``docs/pyro.md``). The interface is Pyro's ``ELBO``'s (``loss``, ``differentiable_loss``,
``loss_and_grads``), so it plugs into ``pyro.infer.SVI``; parameters are whatever the
programs look up (``pyro.param``, ``PyroModule``), captured by SVI as usual.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Optional

import torch
from pyro.infer.elbo import ELBO

from ..errors import TMCGraphError
from .bridge import TMC

__all__ = ["TraceTMC_ELBO"]


class TraceTMC_ELBO(ELBO):
    """Minus the TMC estimate of log p(x), for ``pyro.infer.SVI``.

    Args:
        max_plate_nesting: Plate positions of Pyro's layout (``None`` or ``inf``: the
            deepest plate dim found in the traces).
        K: Particles of latents without ``infer={"num_samples": n}`` (``None``: one).
        coupling: ``None`` (per-site ``tmc`` settings, else tmcgraph's default
            ``"permutation"``), a coupling name or object, or a dict site -> coupling.
        num_particles: Independent estimates averaged (in log space, as Pyro's).
        seed: ``None`` (particles from torch's global generator, so ``pyro.set_rng_seed``
            reproduces a run), an int (a private generator created once and advanced by
            every call) or a ``torch.Generator``.
        strategy: Contraction path strategy.
        memory_limit: Largest tensor of the contraction (elements).
        device: Device of data and parameters.
        dtype: Floating dtype of data and parameters.
        check: Check each new structure for value-dependent control flow.

    Example:
        >>> import torch, pyro, pyro.distributions as dist
        >>> from pyro.infer import SVI
        >>> from pyro.optim import Adam
        >>> def model(x):
        ...     z = pyro.sample("z", dist.Normal(0., 1.))
        ...     pyro.sample("x", dist.Normal(z, 1.), obs=x)
        >>> def guide(x):
        ...     loc = pyro.param("loc_doctest", torch.tensor(0.))
        ...     pyro.sample("z", dist.Normal(loc, 1.), infer={"num_samples": 4})
        >>> svi = SVI(model, guide, Adam({"lr": 0.1}), loss=TraceTMC_ELBO(max_plate_nesting=0, seed=0))
        >>> isinstance(svi.step(torch.tensor(1.0)), float)
        True
        >>> pyro.clear_param_store()
    """

    def __init__(self, max_plate_nesting=None, K: Optional[int] = None, coupling=None, num_particles: int = 1,
                 seed=None, strategy="auto", memory_limit=None, device=None, dtype=None, check: bool = True):
        if max_plate_nesting is None or max_plate_nesting == float("inf"):
            mpn = float("inf")
        else:
            mpn = max_plate_nesting
        super().__init__(num_particles=num_particles, max_plate_nesting=mpn, vectorize_particles=False,
                         strict_enumeration_warning=False)
        if isinstance(seed, torch.Generator) or seed is None:
            self.generator = seed
        else:
            try:
                ok = not isinstance(seed, bool) and int(seed) == seed
            except (TypeError, ValueError):
                ok = False
            if not ok:
                raise TMCGraphError(f"seed must be None, an int or a torch.Generator, got {seed!r}")
            self.generator = torch.Generator().manual_seed(int(seed))
        self.K, self.coupling = K, coupling
        self.options = {"strategy": strategy, "memory_limit": memory_limit, "device": device, "dtype": dtype,
                        "check": check}
        self._bridges: OrderedDict = OrderedDict()

    def bridge(self, model, guide) -> TMC:
        """The :class:`tmcgraph.pyro.TMC` estimator of ``model`` and ``guide`` (kept for the pair)."""
        key = (id(model), id(guide))
        entry = self._bridges.get(key)
        if entry is None or entry[0] is not model or entry[1] is not guide:
            mpn = None if self.max_plate_nesting == float("inf") else int(self.max_plate_nesting)
            entry = (model, guide, TMC(model, guide, max_plate_nesting=mpn, K=self.K, coupling=self.coupling,
                                       **self.options))
            self._bridges[key] = entry
            while len(self._bridges) > 8:
                self._bridges.popitem(last=False)
        else:
            self._bridges.move_to_end(key)
        return entry[2]

    def _get_trace(self, model, guide, args, kwargs):
        raise TMCGraphError("tmcgraph.pyro.TraceTMC_ELBO does not produce Pyro traces; use loss, "
                            "differentiable_loss or loss_and_grads")

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        """``-log P_TMC`` (averaged over ``num_particles`` estimates), differentiable."""
        est = self.bridge(model, guide)
        total = 0.0
        for _ in range(self.num_particles):
            total = total + est.log_evidence(*args, seed=self.generator, **kwargs)
        return -total / self.num_particles

    def loss(self, model, guide, *args, **kwargs) -> float:
        """``-log P_TMC`` as a float (no gradients)."""
        with torch.no_grad():
            return float(self.differentiable_loss(model, guide, *args, **kwargs))

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        """``-log P_TMC`` as a float, with its gradients accumulated in the parameters."""
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        if torch.is_tensor(loss) and loss.requires_grad:
            loss.backward(retain_graph=self.retain_graph)
        return float(loss.detach()) if torch.is_tensor(loss) else float(loss)
