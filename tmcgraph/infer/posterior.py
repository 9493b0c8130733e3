"""Posterior queries answered by the TMC contraction itself.

The TMC estimate is a sum over every combination of particle indices
``k = (k_1, ..., k_n)`` (one index per sample dim and per element of the plates the
dim is local to)::

    P_TMC = sum_k  w(k),    w(k) = prod_f exp(f[k])

where the log-factors ``f`` (:mod:`tmcgraph.infer.factors`) hold ``log P - log q - log K``.
Normalising the weights gives the *TMC-reweighted posterior* over index combinations,
``pi(k) = w(k) / P_TMC``, and through the particles a discrete approximation of
p(z | x) on all ``prod K`` combinations of the particles. Every query here is exact for
``pi`` (the Monte Carlo error is only in the particles):

* **Marginals** (:func:`tmcgraph.ops.dim_marginals`). Add a zero log-weight ``u_d[k, e]`` per sample
  dim ``d`` (and plate element ``e``) as an extra factor. Then
  ``d log P_TMC / d u_d[k, e] = pi(k_{d,e} = k)``: one contraction and one backward
  pass (an adjoint pass along the plan) give every single-dim marginal.
* **Moments** (:meth:`Posterior.moment`): ``E_pi[f(z_j)] = sum_k pi(k_j = k) f(z_j^k)``.
* **Samples** (:func:`tmcgraph.ops.sample_indices`): exact draws of ``k ~ pi`` by backward sampling
  along the plan: one contraction records the message each plate-level step sends to
  its parent; then, root first, each step's own dims are drawn one at a time from
  their marginals given the indices already drawn (factors and messages clamped by
  index selection). The ``S`` draws are a batch plate kept per element.
* **Predictive** (:func:`predictive_log_likelihood`): the ratio of two contractions of
  the same particles, with and without the held-out likelihood factors.

The estimates of posterior expectations are self-normalised importance estimates: a
ratio of two unbiased estimators, so biased at small K (the bias is O(1/K) and the
standard deviation O(1/sqrt(K)) per latent; see ``docs/posterior.md``) and consistent as
every K grows.

Costs are those of the adjoint passes (:mod:`tmcgraph.ops.adjoint`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from ..errors import TMCGraphError
from ..ops.adjoint import gather_particles, sample_indices
from ..ops.factor import FactorGraph
from ..particles import Samples

__all__ = [
    "Posterior",
    "PosteriorSamples",
    "posterior",
    "latent_marginal",
    "expectation",
    "predictive_log_likelihood",
]


def latent_marginal(samples: Samples, marginals: dict, name: str) -> torch.Tensor:
    """The marginal of latent ``name`` laid out like its particles: ``[K, *plate sizes]``.

    Its sample dim's marginal (``[K, *sizes of the dim's plates]``) is broadcast over
    the latent's other plates (IWAE: one index shared by every plate element).
    """
    s = samples
    d = s.dims[name]
    m = marginals[d]
    plates = tuple(s.plates[name])
    lv = tuple(s.ordinals[d])
    m = m.permute([0] + [1 + lv.index(p) for p in plates if p in lv])
    shape = [m.shape[0]] + [s.plate_sizes[p] if p in lv else 1 for p in plates]
    return m.reshape(shape).expand(m.shape[0], *[s.plate_sizes[p] for p in plates])


def expectation(values: torch.Tensor, marginal: torch.Tensor, f: Optional[Callable] = None) -> torch.Tensor:
    """``E[f(z)] = sum_k marginal[k, e] f(z^k)[e]`` per plate element ``e``.

    Args:
        values: Particles ``[K, *plates, *event]``.
        marginal: Posterior probabilities ``[K, *plates]``.
        f: Function of the particles returning ``[K, *plates, *anything]`` (elementwise
            along the leading ``1 + len(plates)`` axes); default: the identity.

    Returns:
        ``[*plates, *anything]``.
    """
    fv = values if f is None else f(values)
    if not torch.is_tensor(fv):
        raise TMCGraphError(f"moment function returned {type(fv).__name__}, expected a tensor")
    lead = marginal.dim()
    if fv.dim() < lead or tuple(fv.shape[:lead]) != tuple(marginal.shape):
        raise TMCGraphError(
            f"moment function returned shape {tuple(fv.shape)}; expected leading dims "
            f"[K, *plates] = {list(marginal.shape)} (particles keep their positions)"
        )
    if not fv.is_floating_point():
        fv = fv.to(marginal.dtype)
    m = marginal.reshape(*marginal.shape, *([1] * (fv.dim() - lead)))
    return (m * fv).sum(0)


@dataclass
class PosteriorSamples:
    """Joint draws from the TMC-reweighted posterior.

    Attributes:
        values: Latent name -> ``[S, *plate sizes, *event]`` (detached).
        indices: Sample dim -> LongTensor ``[S, *sizes of the dim's plates]``: the
            particle index each draw took.
    """

    values: dict
    indices: dict

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.values[name]


@dataclass
class Posterior:
    """The TMC-reweighted posterior over the particles of one draw.

    Build with :func:`posterior`. Marginals are computed once; moments are weighted
    sums of particles; :meth:`sample` draws joint samples exactly.

    Attributes:
        log_evidence: The estimate log P_TMC (detached).
        samples: The particles.
        graph: The factor graph (detached).
        dim_marginals: Sample dim -> ``[K, *sizes of its ordinal]``.
        strategy: opt_einsum path strategy used for contractions.
        memory_limit: Planner memory limit.
    """

    log_evidence: torch.Tensor
    samples: Samples
    graph: FactorGraph
    dim_marginals: dict
    strategy: str = "auto"
    memory_limit: object = None
    _cache: dict = field(default_factory=dict, repr=False)

    def _check(self, name: str) -> None:
        if name not in self.samples.values:
            raise TMCGraphError(f"unknown latent {name!r}; the latents are {list(self.samples.values)}")

    def marginal(self, name: str) -> torch.Tensor:
        """Probability of each particle of latent ``name``: ``[K, *plate sizes]``, summing to one over K."""
        self._check(name)
        return latent_marginal(self.samples, self.dim_marginals, name)

    def moment(self, name: str, f: Optional[Callable] = None) -> torch.Tensor:
        """``E[f(z)]`` for latent ``name`` per plate element: ``[*plate sizes, *f's event]``.

        ``f`` maps particles ``[K, *plates, *event]`` to ``[K, *plates, *anything]``.
        """
        self._check(name)
        return expectation(self.samples.values[name].detach(), self.marginal(name), f)

    def mean(self, name: str) -> torch.Tensor:
        """Posterior mean of latent ``name``: ``[*plate sizes, *event]``."""
        return self.moment(name)

    def var(self, name: str) -> torch.Tensor:
        """Posterior variance (elementwise) of latent ``name``: ``[*plate sizes, *event]``."""
        mu = self.mean(name)
        return self.moment(name, lambda z: (z.to(mu.dtype) - mu) ** 2)

    def std(self, name: str) -> torch.Tensor:
        """Posterior standard deviation (elementwise) of latent ``name``."""
        return self.var(name).sqrt()

    def sample(self, S: int, seed: Optional[int] = None, batch_size: Optional[int] = None) -> PosteriorSamples:
        """Draw ``S`` joint samples from the TMC-reweighted posterior (see :func:`sample_indices`).

        Args:
            S: Number of draws.
            seed: An int (a private generator) or a ``torch.Generator`` (``None``: global RNG).
            batch_size: Draws per batched contraction (bounds memory).

        Returns:
            :class:`PosteriorSamples` with values ``[S, *plate sizes, *event]`` per latent.
        """
        s = self.samples
        gen = None
        if seed is not None:
            device = self.graph.factors[0].tensor.device
            gen = seed if isinstance(seed, torch.Generator) else torch.Generator(device=device).manual_seed(int(seed))
        idx = sample_indices(self.graph, S, generator=gen, batch_size=batch_size,
                             strategy=self.strategy, memory_limit=self.memory_limit)
        values = {}
        for name, v in s.values.items():
            d = s.dims[name]
            values[name] = gather_particles(v.detach(), idx[d], tuple(s.ordinals[d]), tuple(s.plates[name]))
        return PosteriorSamples(values, idx)


def posterior(estimator, data: Optional[dict] = None, seed=None, samples: Optional[Samples] = None) -> Posterior:
    """Draw particles with ``estimator`` (TMC or IWAE) and compute the posterior marginals.

    Args:
        estimator: A :class:`tmcgraph.TMC` (or ``IWAE``/``VAE``) estimator.
        data: Observed name -> tensor.
        seed: Seed for drawing the particles.
        samples: Reuse these particles instead of drawing.

    Returns:
        The :class:`Posterior` (no gradients flow out of it).

    Example:
        >>> import torch, tmcgraph as tg
        >>> from tmcgraph.models.toys import gaussian_toy
        >>> m, q = gaussian_toy()
        >>> post = tg.posterior(tg.TMC(m, q, K=64), {"x": torch.tensor([1., 2., 0.5])}, seed=0)
        >>> post.mean("theta").shape, post.std("z").shape, post.sample(10)["z"].shape
        (torch.Size([]), torch.Size([3]), torch.Size([10, 3]))
    """
    with torch.no_grad():
        ev = estimator.run(data, seed, samples=samples, marginals=True)
    return Posterior(ev.log_evidence, ev.samples, ev.graph.detach(), ev.marginals, estimator.strategy,
                     estimator.memory_limit)


def _heldout_masks(model, samples: Samples, heldout) -> dict:
    """Normalise ``heldout`` to observed name -> bool mask ``[*plate sizes]``."""
    if isinstance(heldout, str):
        heldout = [heldout]
    if not isinstance(heldout, dict):
        heldout = {n: True for n in heldout}
    if not heldout:
        raise TMCGraphError("heldout is empty: name at least one observed variable")
    out = {}
    for n, mask in heldout.items():
        if n not in samples.data:
            raise TMCGraphError(f"heldout: {n!r} is not an observed variable; observed are {list(samples.data)}")
        sizes = [samples.plate_sizes[p] for p in samples.plates[n]]
        mask = torch.as_tensor(mask, dtype=torch.bool, device=samples.data[n].device)
        try:
            mask = mask.expand(sizes)
        except RuntimeError as e:
            raise TMCGraphError(
                f"heldout mask for {n!r} has shape {tuple(mask.shape)}, expected one broadcastable to its plates "
                f"{list(samples.plates[n])}={sizes}"
            ) from e
        out[n] = mask
    return out


def predictive_log_likelihood(
    estimator,
    data: Optional[dict],
    heldout,
    seed: Optional[int] = None,
    samples: Optional[Samples] = None,
) -> torch.Tensor:
    """Estimate log p(x_held-out | x_rest) on one set of particles.

    ``data`` holds all observations; ``heldout`` names the held-out part. With the
    particles drawn once (local latents of held-out elements included)::

        log p(x_h | x_r) ~= log P_TMC(x_r, x_h) - log P_TMC(x_r)
                         = log sum_k pi_r(k) p(x_h | z^k)

    where ``P_TMC(x_r)`` is the same contraction with the held-out likelihood factors
    set to zero (log 1) and ``pi_r`` is the TMC-reweighted posterior given ``x_r``
    alone. This is a self-normalised importance estimate of the posterior predictive
    ``E_{p(z | x_r)}[p(x_h | z)]``: consistent as K grows, biased (downwards in
    expectation of the log, by Jensen, and by the self-normalisation) at small K. The
    latents of held-out elements are integrated by their proposal like any other
    latent; the proposal may look at the held-out data without making the estimate
    inconsistent.

    Args:
        estimator: A :class:`tmcgraph.TMC` or ``IWAE`` estimator.
        data: Observed name -> tensor (training and held-out observations).
        heldout: An observed name, a list of them (entirely held out), or a dict name ->
            bool mask broadcastable to that variable's plate sizes (True = held out).
        seed: Seed for drawing the particles.
        samples: Reuse these particles.

    Returns:
        The scalar estimate (differentiable w.r.t. model and proposal parameters).
    """
    ev = estimator.run(data, seed, samples=samples, with_graph=True)
    masks = _heldout_masks(estimator.model, ev.samples, heldout)
    rest = []
    for f in ev.graph.factors:
        t = f.tensor
        if f.name in masks and f.name in ev.samples.data:
            mk = masks[f.name].reshape([1] * len(f.sample_dims) + list(masks[f.name].shape))
            t = t.masked_fill(mk, 0.0)
        rest.append(t)
    log_all = ev.log_evidence
    log_rest = ev.contract(rest)
    if not bool(torch.isfinite(log_rest.detach())):
        raise TMCGraphError(
            f"log P_TMC of the non-held-out data is {float(log_rest.detach())}: no particle combination carries weight"
        )
    return log_all - log_rest
