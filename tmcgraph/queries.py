"""Posterior queries answered by the TMC contraction itself.

The TMC estimate is a sum over every combination of particle indices
``k = (k_1, ..., k_n)`` (one index per sample dim and per element of the plates the
dim is local to)::

    P_TMC = sum_k  w(k),    w(k) = prod_f exp(f[k])

where the log-factors ``f`` (:mod:`tmcgraph.factors`) hold ``log P - log q - log K``.
Normalising the weights gives the *TMC-reweighted posterior* over index combinations,
``pi(k) = w(k) / P_TMC``, and through the particles a discrete approximation of
p(z | x) on all ``prod K`` combinations of the particles. Every query here is exact for
``pi`` (the Monte Carlo error is only in the particles):

* **Marginals** (:func:`dim_marginals`). Add a zero log-weight ``u_d[k, e]`` per sample
  dim ``d`` (and plate element ``e``) as an extra factor. Then
  ``d log P_TMC / d u_d[k, e] = pi(k_{d,e} = k)``: one contraction and one backward
  pass (an adjoint pass along the plan) give every single-dim marginal.
* **Moments** (:meth:`Posterior.moment`): ``E_pi[f(z_j)] = sum_k pi(k_j = k) f(z_j^k)``.
* **Samples** (:func:`sample_indices`): exact draws of ``k ~ pi`` by backward sampling
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

Cost. Marginals cost one contraction and its backward pass. Sampling ``S`` draws costs
one contraction plus, for each plan step with ``d`` own sample dims, ``d`` contractions
(and backward passes) of that step's inputs batched over ``S``: ``O(C + S * sum_j d_j
C_j)`` time and ``O(S * M_j)`` memory, with ``C_j``/``M_j`` the cost/largest tensor of
step ``j`` alone. ``batch_size`` bounds the memory. Clamped dims leave the factors, so
later contractions are cheaper.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from .contract import contract
from .errors import TMCGraphError
from .factors import Factor
from .plan import plan_for
from .sampling import Samples

__all__ = [
    "DRAWS",
    "Posterior",
    "PosteriorSamples",
    "posterior",
    "dim_marginals",
    "sample_indices",
    "gather_particles",
    "latent_marginal",
    "expectation",
    "predictive_log_likelihood",
]

#: Name of the batch plate that holds the S posterior draws while sampling.
DRAWS = "_draws"


def _sizes(factors) -> dict:
    """Size of every sample dim and plate named by the factors."""
    sizes = {}
    for f in factors:
        for name, n in zip(tuple(f.dims) + tuple(f.plates), f.tensor.shape):
            if sizes.setdefault(name, int(n)) != int(n):
                raise TMCGraphError(f"dim or plate {name!r} has inconsistent sizes {sizes[name]} and {int(n)}")
    return sizes


def _used_dims(factors) -> list:
    return list(dict.fromkeys(d for f in factors for d in f.dims))


def _check_levels(factors, levels: dict) -> None:
    missing = [d for d in _used_dims(factors) if d not in levels]
    if missing:
        raise TMCGraphError(f"levels has no entry for sample dim(s) {missing}")


def dim_marginals(
    factors,
    levels: dict,
    dims=None,
    keep: Optional[str] = None,
    strategy: str = "auto",
    memory_limit=None,
):
    """Posterior marginal of every particle index, by differentiating the contraction.

    For each sample dim ``d`` a zero log-weight ``u_d`` (dims ``(d,)``, plates
    ``levels[d]``) joins the factors; ``d log P / d u_d[k, e]`` is the probability
    that dim ``d`` takes index ``k`` at plate element ``e`` under
    ``pi(k) ∝ prod_f exp(f[k])``.

    Args:
        factors: Log-factors (objects with ``tensor``, ``dims``, ``plates``); their
            tensors are detached here.
        levels: Sample dim -> plates it is local to.
        dims: Sample dims to report (default: every dim the factors use).
        keep: A plate every factor and dim lies in, kept per element (independent
            batches, e.g. :data:`DRAWS`); marginals are then per element of it.
        strategy: opt_einsum path strategy.
        memory_limit: Largest intermediate (elements) for the planner.

    Returns:
        ``(log_Z, marginals)``: the (detached) log of the sum-product, and a dict dim ->
        tensor ``[K_d, *sizes of levels[d]]`` whose entries sum to one over the first
        axis.

    Raises:
        TMCGraphError: unknown dims, missing levels, or a sum-product that is zero
            (no combination carries weight, so the posterior is undefined).
    """
    factors = list(factors)
    if not factors:
        raise TMCGraphError("dim_marginals needs at least one factor")
    _check_levels(factors, levels)
    used = _used_dims(factors)
    dims = used if dims is None else list(dims)
    unknown = [d for d in dims if d not in used]
    if unknown:
        raise TMCGraphError(f"unknown sample dim(s) {unknown}; the factors use {used}")
    sizes = _sizes(factors)
    ref = factors[0].tensor
    with torch.enable_grad():
        weights = {}
        for d in dims:
            shape = [sizes[d]] + [sizes[p] for p in levels[d]]
            weights[d] = torch.zeros(shape, dtype=ref.dtype, device=ref.device, requires_grad=True)
        fs = [Factor(f.name, f.tensor.detach(), tuple(f.dims), tuple(f.plates)) for f in factors]
        fs += [Factor(f"_marginal_{d}", weights[d], (d,), tuple(levels[d])) for d in dims]
        plan = plan_for(fs, levels, keep, strategy, memory_limit)
        log_z = contract(plan, [f.tensor for f in fs])
        if not bool(torch.isfinite(log_z.detach()).all()):
            raise TMCGraphError(
                "the contraction is zero or not finite (log value "
                f"{log_z.detach().flatten()[:4].tolist()}): no particle combination carries weight, "
                "so the posterior over particles is undefined"
            )
        grads = torch.autograd.grad(log_z.sum(), [weights[d] for d in dims]) if dims else []
    return log_z.detach(), {d: g.clamp_min(0.0) for d, g in zip(dims, grads)}


def _place_index(k: torch.Tensor, k_plates: tuple, plates: tuple, sizes: dict, lead: int = 0) -> torch.Tensor:
    """Index ``k`` (``[S, *k_plates]``) in the layout ``[1]*lead + [S, *plates]``, expanded over ``plates``."""
    order = [p for p in plates if p in k_plates]
    if len(order) != len(k_plates):
        extra = [p for p in k_plates if p not in plates]
        raise TMCGraphError(f"index over plates {k_plates} cannot be placed in plates {plates} (extra {extra})")
    if tuple(order) != tuple(k_plates):
        k = k.permute([0] + [1 + k_plates.index(p) for p in order])
    shape = [k.shape[0]] + [sizes[p] if p in k_plates else 1 for p in plates]
    full = [k.shape[0]] + [sizes[p] for p in plates]
    return k.reshape([1] * lead + shape).expand([1] * lead + full)


def _clamp(f: Factor, d: str, k: torch.Tensor, k_plates: tuple, sizes: dict) -> Factor:
    """Select index ``k[s, e]`` of dim ``d`` in a factor laid out ``[*dims, DRAWS, *plates]``."""
    if d not in f.dims:
        return f
    i = f.dims.index(d)
    t = f.tensor
    plates = tuple(f.plates[1:])  # f.plates[0] is DRAWS
    shape = list(t.shape)
    shape[i] = 1
    ix = _place_index(k, k_plates, plates, sizes, lead=len(f.dims)).expand(shape)
    out = torch.gather(t, i, ix).squeeze(i)
    return Factor(f.name, out, f.dims[:i] + f.dims[i + 1:], f.plates)


def sample_indices(
    factors,
    levels: dict,
    S: int,
    seed: Optional[int] = None,
    batch_size: Optional[int] = None,
    strategy: str = "auto",
    memory_limit=None,
) -> dict:
    """Exact draws of particle indices from ``pi(k) ∝ prod_f exp(f[k])``.

    Backward sampling along the plan. One plain contraction records every step's
    result: the message from an ordinal (a set of plates) to its parent, a function of
    the parent's dims summed over everything below. The steps are then visited root
    first. At a step, every dim from an enclosing ordinal is already drawn, so the
    step's inputs (its factors and its children's messages) with those dims clamped
    (index-selected per draw) are proportional to the conditional of the step's own
    dims, independently per plate element. The own dims are drawn one at a time, each
    from its conditional marginal (:func:`dim_marginals` with the draws as a kept batch
    plate :data:`DRAWS`). By the chain rule the joint draw is exact.

    Cost: one contraction, then per step ``d`` batched contractions (and backward
    passes) of that step's inputs for its ``d`` own dims, with ``S`` draws: the large
    factors of leaf plates without latents of their own are never batched.

    Args:
        factors: Log-factors (detached here).
        levels: Sample dim -> plates it is local to.
        S: Number of joint draws.
        seed: Seed of a private generator (the global RNG is untouched); ``None``
            draws from the global RNG. Draws depend on ``batch_size``.
        batch_size: Draws per batched contraction (bounds memory); default all ``S``,
            or with a ``memory_limit`` as many as keep every batched step input under it
            (at least one).
        strategy: opt_einsum path strategy.
        memory_limit: Largest intermediate for the planner of the one unbatched
            contraction; the batched ones are bounded through ``batch_size``.

    Returns:
        Dict dim -> LongTensor ``[S, *sizes of levels[dim]]``.
    """
    if int(S) != S or S < 1:
        raise TMCGraphError(f"S (number of posterior draws) must be a positive integer, got {S!r}")
    S = int(S)
    if batch_size is not None and (int(batch_size) != batch_size or batch_size < 1):
        raise TMCGraphError(f"batch_size must be a positive integer or None, got {batch_size!r}")
    factors = [Factor(f.name, f.tensor.detach(), tuple(f.dims), tuple(f.plates)) for f in factors]
    if not factors:
        raise TMCGraphError("sample_indices needs at least one factor")
    _check_levels(factors, levels)
    for f in factors:
        if DRAWS in f.plates:
            raise TMCGraphError(f"factor {f.name!r} already uses the reserved plate {DRAWS!r}")
    gen = None
    if seed is not None:
        gen = torch.Generator(device=factors[0].tensor.device).manual_seed(int(seed))
    groups = _step_inputs(factors, levels, strategy, memory_limit)
    sizes = _sizes(factors)
    if batch_size is None and memory_limit is not None:
        per_draw = max(f.tensor.numel() for inputs in groups for f in inputs)
        batch_size = max(1, int(memory_limit) // max(per_draw, 1))
    B = S if batch_size is None else min(int(batch_size), S)
    chunks = []
    for start in range(0, S, B):
        n = min(B, S - start)
        drawn = {}
        for inputs in groups:
            drawn.update(_sample_step(inputs, levels, drawn, sizes, n, gen, strategy))
        chunks.append(drawn)
    return {d: torch.cat([c[d] for c in chunks], 0) for d in chunks[0]}


def _step_inputs(factors, levels, strategy, memory_limit) -> list:
    """Per plan step, root first: its inputs as factors (messages from child steps included)."""
    plan = plan_for(factors, levels, None, strategy, memory_limit)
    slots = list(factors)
    groups = []
    for i, step in enumerate(plan.steps):
        inputs = [slots[j] for j in step.inputs]
        groups.append(inputs)
        if i + 1 < len(plan.steps):
            one = dataclasses.replace(
                plan,
                steps=(dataclasses.replace(step, inputs=tuple(range(len(inputs)))),),
                n_inputs=len(inputs),
            )
            msg = contract(one, [f.tensor for f in inputs])
            slots.append(Factor(f"_message_{i}", msg, tuple(step.out_dims), tuple(step.out_plates)))
    return groups[::-1]


def _sample_step(inputs, levels, drawn, sizes, S, gen, strategy) -> dict:
    """Draw the not-yet-drawn dims of one step's inputs given the drawn ones."""
    sizes = dict(sizes, **{DRAWS: S})
    work = []
    for f in inputs:
        t = f.tensor
        nd = len(f.dims)
        t = t.unsqueeze(nd).expand(*t.shape[:nd], S, *t.shape[nd:])
        g = Factor(f.name, t, tuple(f.dims), (DRAWS,) + tuple(f.plates))
        for d in f.dims:
            if d in drawn:
                g = _clamp(g, d, drawn[d], tuple(levels[d]), sizes)
        work.append(g)
    own = _used_dims(work)
    lv = {d: (DRAWS,) + tuple(levels[d]) for d in own}
    out = {}
    for d in own:
        _, marg = dim_marginals(work, lv, [d], keep=DRAWS, strategy=strategy)
        m = marg[d]  # [K_d, S, *levels[d]]
        K = m.shape[0]
        probs = m.movedim(0, -1).reshape(-1, K)
        k = torch.multinomial(probs, 1, generator=gen).reshape(m.shape[1:])
        out[d] = k
        work = [_clamp(f, d, k, tuple(levels[d]), sizes) for f in work]
    return out


def gather_particles(values: torch.Tensor, index: torch.Tensor, index_plates: tuple, plates: tuple) -> torch.Tensor:
    """Particles at drawn indices: ``out[s, e, ...] = values[index[s, e|index_plates], e, ...]``.

    Args:
        values: Particles ``[K, *plate sizes, *event]``.
        index: LongTensor ``[S, *sizes of index_plates]``.
        index_plates: Plates of the index (a subset of ``plates``).
        plates: Plates of ``values``.

    Returns:
        ``[S, *plate sizes, *event]``.
    """
    sizes = dict(zip(plates, values.shape[1:1 + len(plates)]))
    ix = _place_index(index, tuple(index_plates), tuple(plates), sizes)
    ev = values.dim() - 1 - len(plates)
    ix = ix.reshape(*ix.shape, *([1] * ev)).expand(ix.shape[0], *values.shape[1:])
    return torch.gather(values, 0, ix)


def latent_marginal(samples: Samples, marginals: dict, name: str) -> torch.Tensor:
    """The marginal of latent ``name`` laid out like its particles: ``[K, *plate sizes]``.

    Its sample dim's marginal (``[K, *sizes of the dim's plates]``) is broadcast over
    the latent's other plates (IWAE: one index shared by every plate element).
    """
    s = samples
    d = s.dims[name]
    m = marginals[d]
    plates = tuple(s.plates[name])
    lv = tuple(s.levels[d])
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
        factors: The log-factors (detached).
        dim_marginals: Sample dim -> ``[K, *sizes of its plates]``.
        strategy: opt_einsum path strategy used for contractions.
        memory_limit: Planner memory limit.
    """

    log_evidence: torch.Tensor
    samples: Samples
    factors: list
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
            seed: Seed of a private generator (``None``: global RNG).
            batch_size: Draws per batched contraction (bounds memory).

        Returns:
            :class:`PosteriorSamples` with values ``[S, *plate sizes, *event]`` per latent.
        """
        s = self.samples
        idx = sample_indices(self.factors, s.levels, S, seed=seed, batch_size=batch_size,
                             strategy=self.strategy, memory_limit=self.memory_limit)
        values = {}
        for name, v in s.values.items():
            d = s.dims[name]
            values[name] = gather_particles(v.detach(), idx[d], tuple(s.levels[d]), tuple(s.plates[name]))
        return PosteriorSamples(values, idx)


def posterior(estimator, data: dict, seed: Optional[int] = None, samples: Optional[Samples] = None) -> Posterior:
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
        >>> from tmcgraph.toys import gaussian_toy
        >>> from tmcgraph.queries import posterior
        >>> m, q = gaussian_toy()
        >>> post = posterior(tg.TMC(m, q, K=64), {"x": torch.tensor([1., 2., 0.5])}, seed=0)
        >>> post.mean("theta").shape, post.std("z").shape, post.sample(10)["z"].shape
        (torch.Size([]), torch.Size([3]), torch.Size([10, 3]))
    """
    with torch.no_grad():
        if samples is None:
            samples = estimator.sample(data, seed)
        fs = estimator.factors(samples)
    log_z, marg = dim_marginals(fs, samples.levels, strategy=estimator.strategy, memory_limit=estimator.memory_limit)
    fs = [Factor(f.name, f.tensor.detach(), f.dims, f.plates) for f in fs]
    return Posterior(log_z, samples, fs, marg, estimator.strategy, estimator.memory_limit)


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
    data: dict,
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
    if samples is None:
        samples = estimator.sample(data, seed)
    masks = _heldout_masks(estimator.model, samples, heldout)
    fs = estimator.factors(samples)
    plan = estimator.plan(fs, samples.levels)
    full = [f.tensor for f in fs]
    rest = []
    for f in fs:
        t = f.tensor
        if f.name in masks and f.name in samples.data:
            mk = masks[f.name].reshape([1] * len(f.dims) + list(masks[f.name].shape))
            t = t.masked_fill(mk, 0.0)
        rest.append(t)
    log_all = contract(plan, full)
    log_rest = contract(plan, rest)
    if not bool(torch.isfinite(log_rest.detach())):
        raise TMCGraphError(
            f"log P_TMC of the non-held-out data is {float(log_rest.detach())}: no particle combination carries weight"
        )
    return log_all - log_rest
