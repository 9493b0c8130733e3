"""QEM: fitting an exponential-family proposal by matching the TMC posterior moments.

QEM (Heap, Bowyer & Aitchison, "Massively parallel expectation maximization for
approximate posteriors", AABI 2025, PMLR 289; arXiv:2503.08264) fits the proposal
without gradients. Each proposal factor is an exponential family

    q_j(z) = h(z) exp(eta_j . T(z) - A(eta_j)),   with mean parameters  m_j = E_q[T(z)],

one per latent and plate element. Each iteration t

1. **E-step**: draws K particles per latent from the current proposal and computes the
   posterior moments of the sufficient statistics by the massively parallel
   (TMC-reweighted) estimate, exactly for the drawn particles
   (:func:`tmcgraph.infer.posterior.posterior`, one adjoint pass; Bowyer, Heap &
   Aitchison, "Using autodiff to estimate posterior moments, marginals and samples",
   UAI 2024):

       m_hat_j = sum_k pi(k_j = k) T(z_j^k),

2. **M-step**: moves the mean parameters towards them by an exponential moving average
   with rate ``lr`` and sets the proposal from them (moment matching):

       m_j <- (1 - lr) m_j + lr m_hat_j.

For the mean-field Normal (:class:`MeanFieldNormal`, ``T(z) = (z, z^2)``) the update is

    mu    <- (1 - lr) mu + lr mu_hat
    s^2   <- (1 - lr) s^2 + lr s_hat^2 + lr (1 - lr) (mu - mu_hat)^2,

where ``mu_hat = E_pi[z]`` and ``s_hat^2 = E_pi[(z - mu_hat)^2]``: algebraically the EMA of
``(E z, E z^2)``, written so that no difference of nearly equal second moments is taken
(``s^2`` stays positive). A fixed point matches the posterior's marginal moments as
estimated by the particles; as K grows these estimates are consistent (their bias is
O(1/K)), so the fitted marginals converge to the exact posterior marginals — unlike VI,
whose mean-field fixed point minimises KL(q || p) and underestimates variances. Nothing
is differentiated: the sampler runs under ``torch.no_grad()``.

The "global" version uses the same update with an :class:`tmcgraph.IWAE` estimator: the
moments are then self-normalised importance-sampling estimates over K joint samples.
Massively parallel reweighted wake-sleep (Heap, Leech & Aitchison, UAI 2023) uses the same
posterior weights but takes gradient steps on ``sum_k pi(k) log q(z^k)`` instead.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.distributions import Independent, Normal

from ..errors import TMCGraphError
from .estimators import TMC
from .fit import Method
from .posterior import Posterior, posterior

__all__ = ["ExponentialFamily", "MeanFieldNormal", "QEM", "qem_update", "families"]


class ExponentialFamily(nn.Module):
    """A parent-free proposal factor set by its mean parameters ``E_q[T(z)]``.

    Subclasses implement :meth:`forward` (the distribution, batch shape the latent's plate
    sizes), :meth:`statistics`, :meth:`mean_parameters` and :meth:`set_mean_parameters`;
    :meth:`update` is the EMA of the mean parameters.
    """

    def statistics(self, z: torch.Tensor) -> tuple:
        """Sufficient statistics of particles ``[K, *plates, *event]``, each shaped like ``z``."""
        raise NotImplementedError

    def mean_parameters(self) -> tuple:
        """``E_q[T(z)]`` per plate element, each ``[*plates, *event]``."""
        raise NotImplementedError

    def set_mean_parameters(self, params: tuple) -> None:
        """Set the distribution to the one with these mean parameters."""
        raise NotImplementedError

    @torch.no_grad()
    def update(self, moments: tuple, lr: float) -> None:
        """``m <- (1 - lr) m + lr * moments`` (the M-step)."""
        self.set_mean_parameters(tuple((1 - lr) * m + lr * h for m, h in zip(self.mean_parameters(), moments)))


class MeanFieldNormal(ExponentialFamily):
    """Independent Normals with a learnable loc and log-scale per plate element (and event entry).

    Args:
        shape: ``[*plate sizes, *event]`` of the latent.
        event_dims: How many trailing dims of ``shape`` are event dims (vector latents).
        loc: Initial loc.
        log_scale: Initial log-scale.
        min_scale: Smallest scale :meth:`set_mean_parameters` sets (a variance estimated
            from K particles can be zero).

    Example:
        >>> q = MeanFieldNormal([4, 3], event_dims=1)
        >>> d = q(); d.batch_shape, d.event_shape
        (torch.Size([4]), torch.Size([3]))
    """

    def __init__(self, shape=(), event_dims: int = 0, loc: float = 0.0, log_scale: float = 0.0,
                 min_scale: float = 1e-6):
        super().__init__()
        shape = tuple(int(s) for s in shape)
        if not 0 <= event_dims <= len(shape):
            raise TMCGraphError(f"MeanFieldNormal: event_dims={event_dims} does not fit shape {list(shape)}")
        self.event_dims = int(event_dims)
        self.min_scale = float(min_scale)
        self.loc = nn.Parameter(torch.full(shape, float(loc)))
        self.log_scale = nn.Parameter(torch.full(shape, float(log_scale)))

    def forward(self):
        d = Normal(self.loc, self.log_scale.exp(), validate_args=False)
        return Independent(d, self.event_dims) if self.event_dims else d

    def statistics(self, z: torch.Tensor) -> tuple:
        return z, z * z

    def mean_parameters(self) -> tuple:
        loc = self.loc.detach()
        return loc, loc * loc + (2 * self.log_scale.detach()).exp()

    @torch.no_grad()
    def set_mean_parameters(self, params: tuple) -> None:
        m1, m2 = params
        self._set(m1, m2 - m1 * m1)

    def _set(self, loc: torch.Tensor, var: torch.Tensor) -> None:
        self.loc.copy_(loc)
        self.log_scale.copy_(0.5 * var.clamp_min(self.min_scale ** 2).log())

    @torch.no_grad()
    def update(self, moments: tuple, lr: float) -> None:
        """The EMA of ``(E z, E z^2)`` in the stable form of the module docstring.

        ``moments`` are ``(E_pi[z], E_pi[z^2])`` or, from :meth:`moments_of`,
        ``(E_pi[z], E_pi[z^2], Var_pi[z])`` with the variance computed centred.
        """
        mu_hat, second = moments[0], moments[1]
        var_hat = moments[2] if len(moments) > 2 else (second - mu_hat * mu_hat).clamp_min(0)
        mu, var = self.loc.detach().clone(), (2 * self.log_scale.detach()).exp()
        self._set((1 - lr) * mu + lr * mu_hat,
                  (1 - lr) * var + lr * var_hat + lr * (1 - lr) * (mu - mu_hat) ** 2)

    def moments_of(self, post: Posterior, name: str) -> tuple:
        """``(E[z], E[z^2], Var[z])`` of latent ``name`` under the posterior (variance computed centred)."""
        mu = post.mean(name)
        var = post.var(name)
        return mu, var + mu * mu, var

    def resized(self, shape, loc: Optional[float] = None, log_scale: Optional[float] = None) -> "MeanFieldNormal":
        """A copy for a latent with more (or fewer) plate elements.

        Elements present in both keep this proposal's loc and log-scale (the leading block
        of every plate dim); new elements get ``loc`` and ``log_scale`` (default: the
        initial values 0 and 0, i.e. N(0, 1) — use a broad Normal or the prior's moments
        for latents of elements never seen in training).
        """
        shape = tuple(int(s) for s in shape)
        if len(shape) != self.loc.dim() or (self.event_dims and shape[-self.event_dims:] !=
                                            tuple(self.loc.shape[-self.event_dims:])):
            raise TMCGraphError(f"resized: shape {list(shape)} does not match {list(self.loc.shape)} "
                                f"with {self.event_dims} event dim(s)")
        new = MeanFieldNormal(shape, self.event_dims, 0.0 if loc is None else loc,
                              0.0 if log_scale is None else log_scale, self.min_scale)
        common = tuple(slice(0, min(a, b)) for a, b in zip(shape, self.loc.shape))
        with torch.no_grad():
            new.loc[common] = self.loc[common]
            new.log_scale[common] = self.log_scale[common]
        return new.to(self.loc.device, self.loc.dtype)

    def extra_repr(self) -> str:
        return f"shape={list(self.loc.shape)}, event_dims={self.event_dims}"


def families(estimator: TMC) -> dict:
    """Latent -> its :class:`ExponentialFamily` proposal factor (proposals of other kinds are skipped).

    Raises:
        TMCGraphError: an exponential-family proposal has parents (QEM fits parent-free
            factors only), or no latent has one.
    """
    out = {}
    for name, v in estimator.proposal.variables.items():
        if v.enumerate or v.prior or not isinstance(v.fn, ExponentialFamily):
            continue
        if v.parents:
            raise TMCGraphError(f"QEM: the proposal for {name!r} has parents {list(v.parents)}; QEM fits "
                                "parent-free exponential-family factors")
        out[name] = v.fn
    if not out:
        raise TMCGraphError("QEM: no latent's proposal is an ExponentialFamily (e.g. MeanFieldNormal)")
    return out


@torch.no_grad()
def qem_update(estimator: TMC, data: dict, lr: float, seed=None) -> Posterior:
    """One QEM iteration (E-step on fresh particles, M-step on every exponential-family factor).

    Returns:
        The step's :class:`~tmcgraph.infer.posterior.Posterior` (its ``log_evidence`` is
        the objective log P of the particles the moments came from).
    """
    fams = families(estimator)
    post = posterior(estimator, data, seed=seed)
    for name, fam in fams.items():
        if isinstance(fam, MeanFieldNormal):
            moments = fam.moments_of(post, name)
        else:
            stats = post.moment(name, lambda z, f=fam: torch.stack(f.statistics(z), -1))
            moments = tuple(stats.unbind(-1))
        fam.update(tuple(m.to(_dtype(fam)) for m in moments), lr)
    return post


def _dtype(fam: nn.Module) -> torch.dtype:
    p = next(iter(fam.parameters()), None)
    return p.dtype if p is not None else torch.get_default_dtype()


class QEM(Method):
    """QEM as a :func:`tmcgraph.infer.fit.fit` method: the moment-matching EMA with rate ``lr``.

    Args:
        lr: EMA rate in (0, 1] (1: set the proposal to this step's moment estimates).
    """

    name = "QEM"

    def __init__(self, lr: float = 0.1):
        super().__init__(lr)
        if self.lr > 1:
            raise TMCGraphError(f"QEM: lr is an EMA rate in (0, 1], got {lr!r}")

    def start(self, estimator: TMC) -> None:
        families(estimator)

    def step(self, estimator: TMC, data: dict, seed: int) -> float:
        return float(qem_update(estimator, data, self.lr, seed).log_evidence)
