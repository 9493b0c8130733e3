"""Drawing from ``torch.distributions`` with an explicit :class:`torch.Generator`.

Why this module exists. ``Distribution.rsample()`` and ``Distribution.sample()`` always
draw from torch's *global* RNG. A library that must be reproducible from a ``seed=``
argument would then have to call ``torch.manual_seed`` (or ``fork_rng``), which changes
process-global state behind the user's back and races with other threads that sample at
the same time. :func:`draw_sample` instead draws every random number from the generator
it is given: two calls with identically seeded generators return bit-identical tensors,
the global RNG state is left untouched, and threads that each own a generator never
interfere (a single generator must still not be shared by threads concurrently).

For reparameterisable families the result carries the same pathwise gradient as
``d.rsample()``: every sampler follows torch's own ``rsample``/``sample`` formula and
draw order (``loc + scale * eps`` for :class:`~torch.distributions.Normal`,
``torch._standard_gamma`` with its implicit-reparameterisation gradient for
:class:`~torch.distributions.Gamma`, ...), only with ``generator=`` passed to the
primitive. A CPU generator seeded with ``s`` therefore reproduces what
``torch.manual_seed(s); d.rsample()`` would give. Families without ``rsample`` are drawn
under :func:`torch.no_grad`, like ``d.sample()``.

Dispatch. Samplers live in a registry keyed by distribution class. ``draw_sample(d, ...,
generator=g)`` walks ``type(d).__mro__`` and uses the most specific registered class, so
:class:`~torch.distributions.Chi2` uses the :class:`~torch.distributions.Gamma` sampler
and every :class:`~torch.distributions.TransformedDistribution` subclass (LogNormal,
Gumbel, Weibull, ...) uses the generic "sample the base, apply the transforms" sampler.
Lookups are cached per type in a bounded LRU cache that registration invalidates. A type with
no registered sampler falls back to ``d.rsample``/``d.sample`` on the global RNG and
emits a :class:`GlobalRNGWarning` once per type. With ``generator=None`` the registry is
bypassed and torch's own method is called, exactly as plain torch code would.

Registering your own distribution::

    from tmcgraph.sampling.samplers import register_sampler

    @register_sampler(MyDist)
    def _sample_my_dist(d, sample_shape, generator):
        shape = sample_shape + d.batch_shape + d.event_shape
        eps = torch.randn(shape, dtype=d.loc.dtype, device=d.loc.device, generator=generator)
        return d.loc + d.scale * eps

The function receives the distribution, a :class:`torch.Size` and the generator, must
draw only from ``generator`` (directly or through :func:`draw_sample` on component
distributions), and returns a tensor of shape ``sample_shape + batch_shape + event_shape``.

Deliberately unregistered (they fall back with the warning): ``Wishart``, whose torch
``rsample`` re-draws through a data-dependent correction loop (which in 2.13 flags valid
samples as singular and re-draws them), and
``LKJCholesky``, whose torch ``sample`` (2.13) draws the onion method's Beta radii with
first concentration ``k - 1/2`` instead of ``k/2`` for row ``k >= 2``; following it would
copy that bias.
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
import warnings
import weakref
from typing import Callable, Optional

import torch
import torch.distributions as dist
from torch.autograd.function import once_differentiable
from torch.distributions import Distribution
from torch.distributions.relaxed_bernoulli import LogitRelaxedBernoulli
from torch.distributions.relaxed_categorical import ExpRelaxedCategorical

from ..errors import TMCGraphError

__all__ = ["GlobalRNGWarning", "draw_sample", "has_sampler", "register_sampler"]

Sampler = Callable[[Distribution, torch.Size, torch.Generator], torch.Tensor]

_REGISTRY: dict[type, Sampler] = {}
_LOCK = threading.Lock()
_WARNED: "weakref.WeakSet[type]" = weakref.WeakSet()
_MAX_NESTING = 16
_version = 0  # bumped by every registration; part of the lookup-cache key


class GlobalRNGWarning(UserWarning):
    """A distribution without a registered sampler was drawn from torch's global RNG.

    Such draws ignore the explicit generator, so a ``seed=`` argument does not
    reproduce them. Register a sampler with :func:`register_sampler` to fix it.
    """


# --------------------------------------------------------------------------- registry


def register_sampler(cls: type) -> Callable[[Sampler], Sampler]:
    """Register a generator-driven sampler for a distribution class (decorator factory).

    Used like :func:`torch.distributions.kl.register_kl`::

        @register_sampler(Normal)
        def _(d, sample_shape, generator): ...

    The sampler also serves every subclass of ``cls`` that has no more specific one.
    Registering the same class again replaces its sampler.

    Args:
        cls: A subclass of :class:`torch.distributions.Distribution`.

    Returns:
        A decorator that registers its function and returns it unchanged.

    Raises:
        TMCGraphError: If ``cls`` is not a Distribution subclass, or the decorated
            object is not callable.
    """
    if not (isinstance(cls, type) and issubclass(cls, Distribution)):
        raise TMCGraphError(f"register_sampler expects a torch.distributions.Distribution subclass, got {cls!r}")

    def decorator(fn: Sampler) -> Sampler:
        if not callable(fn):
            raise TMCGraphError(f"register_sampler({cls.__name__}) must decorate a callable, got {fn!r}")
        global _version
        with _LOCK:
            _REGISTRY[cls] = fn
            _version += 1
            _cached_lookup.cache_clear()
        return fn

    return decorator


def _lookup(cls: type) -> Optional[Sampler]:
    """The sampler of the most specific registered class in ``cls.__mro__``, or None."""
    return _cached_lookup(cls, _version)


@functools.lru_cache(maxsize=256)
def _cached_lookup(cls: type, version: int) -> Optional[Sampler]:
    """MRO walk behind :func:`_lookup`; ``version`` keeps entries from before a registration unused."""
    del version
    for klass in cls.__mro__:
        fn = _REGISTRY.get(klass)
        if fn is not None:
            return fn
    return None


def has_sampler(d_or_cls) -> bool:
    """Whether a registered sampler serves this distribution or class (MRO lookup).

    Args:
        d_or_cls: A distribution instance or a class.

    Returns:
        True if :func:`draw_sample` with a generator will not fall back to the global RNG
        for the outermost type (nested component distributions may still fall back).
    """
    cls = d_or_cls if isinstance(d_or_cls, type) else type(d_or_cls)
    return _lookup(cls) is not None


# --------------------------------------------------------------------------- entry point


def draw_sample(
    d: Distribution,
    sample_shape=torch.Size(),
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Draw ``sample_shape`` samples from ``d`` using only ``generator``.

    Args:
        d: The distribution to sample.
        sample_shape: Leading sample dimensions (anything ``torch.Size`` accepts).
        generator: The random-number generator to draw from. ``None`` calls
            ``d.rsample`` (or ``d.sample``) on torch's global RNG, as plain torch does.

    Returns:
        A tensor of shape ``sample_shape + d.batch_shape + d.event_shape`` with the dtype
        and device of the distribution's parameters. It is reparameterised (gradients
        reach the parameters as through ``d.rsample``) iff ``d.has_rsample``.

    Raises:
        TMCGraphError: If ``d`` is not a distribution, ``sample_shape`` is not a shape,
            ``generator`` is not a :class:`torch.Generator`, or the generator lives on a
            different device type than the parameters.

    Warns:
        GlobalRNGWarning: Once per distribution type that has no registered sampler;
            such types are drawn from the global RNG.
    """
    if not isinstance(d, Distribution):
        raise TMCGraphError(f"draw_sample expects a torch.distributions.Distribution, got {type(d).__name__}")
    sample_shape = _as_size(sample_shape)
    if generator is None:
        return _torch_draw(d, sample_shape)
    if not isinstance(generator, torch.Generator):
        raise TMCGraphError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    _check_device(d, generator)
    grad_mode = contextlib.nullcontext() if d.has_rsample else torch.no_grad()
    with grad_mode:
        return _draw(d, sample_shape, generator)


def _as_size(sample_shape) -> torch.Size:
    """``sample_shape`` as a :class:`torch.Size`, or a TMCGraphError naming it."""
    try:
        return torch.Size(sample_shape)
    except TypeError as err:
        raise TMCGraphError(f"sample_shape must be a sequence of ints, got {sample_shape!r}") from err


def _torch_draw(d: Distribution, sample_shape: torch.Size) -> torch.Tensor:
    """Torch's own draw on the global RNG: ``rsample`` if available, else ``sample``."""
    return d.rsample(sample_shape) if d.has_rsample else d.sample(sample_shape)


def _draw(d: Distribution, sample_shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
    """Dispatch to the registered sampler of ``type(d)``, or warn and fall back."""
    fn = _lookup(type(d))
    if fn is None:
        _warn_fallback(type(d))
        return _torch_draw(d, sample_shape)
    return fn(d, sample_shape, generator)


def _warn_fallback(cls: type) -> None:
    """Emit the GlobalRNGWarning for ``cls`` unless it was already emitted."""
    with _LOCK:
        if cls in _WARNED:
            return
        _WARNED.add(cls)
    warnings.warn(
        f"No sampler is registered for {cls.__module__}.{cls.__qualname__}: its samples come from torch's "
        f"global RNG, so seed=/generator= does not reproduce them. Fix it by registering one with "
        f"@tmcgraph.sampling.samplers.register_sampler({cls.__name__}).",
        GlobalRNGWarning,
        stacklevel=4,
    )


def _param_device(obj, depth: int = 0) -> Optional[torch.device]:
    """Device of the first tensor attribute of ``obj``, searching nested distributions."""
    attrs = list(getattr(obj, "__dict__", {}).values())
    for value in attrs:
        if isinstance(value, torch.Tensor):
            return value.device
    if depth < _MAX_NESTING:
        for value in attrs:
            if isinstance(value, Distribution):
                device = _param_device(value, depth + 1)
                if device is not None:
                    return device
    return None


def _check_device(d: Distribution, generator: torch.Generator) -> None:
    """Raise if the generator's device type differs from the parameters' device type."""
    device = _param_device(d)
    if device is not None and device.type != generator.device.type:
        raise TMCGraphError(
            f"cannot sample {type(d).__name__} with parameters on device '{device}' from a generator on "
            f"device '{generator.device}'; create the generator with torch.Generator(device='{device.type}')"
        )


# --------------------------------------------------------------------------- primitives


def _shape(d: Distribution, sample_shape: torch.Size) -> torch.Size:
    """``sample_shape + batch_shape + event_shape``."""
    return sample_shape + d.batch_shape + d.event_shape


def _empty_like_param(shape: torch.Size, param: torch.Tensor) -> torch.Tensor:
    """Uninitialised tensor of ``shape`` with ``param``'s dtype and device."""
    return torch.empty(shape, dtype=param.dtype, device=param.device)


def _standard_normal(shape: torch.Size, param: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """N(0, 1) draws, produced by ``normal_`` exactly as torch's ``rsample`` does."""
    return _empty_like_param(shape, param).normal_(generator=generator)


def _uniform01(shape: torch.Size, param: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """U[0, 1) draws via ``torch.rand``."""
    return torch.rand(shape, dtype=param.dtype, device=param.device, generator=generator)


def _clamp_open_unit(x: torch.Tensor) -> torch.Tensor:
    """Clamp into ``[eps, 1 - eps]`` of the dtype, as ``torch.distributions.utils.clamp_probs``."""
    eps = torch.finfo(x.dtype).eps
    return x.clamp(min=eps, max=1 - eps)


def _standard_gamma_over_rate(
    concentration: torch.Tensor, rate: torch.Tensor, shape: torch.Size, generator: torch.Generator
) -> torch.Tensor:
    """Gamma(concentration, rate) draws with torch's implicit-reparameterisation gradient."""
    value = torch._standard_gamma(concentration.expand(shape), generator=generator) / rate.expand(shape)
    value.detach().clamp_(min=torch.finfo(value.dtype).tiny)  # as torch: not recorded in autograd
    return value


class _DirichletSample(torch.autograd.Function):
    """``torch._sample_dirichlet`` with a generator and the implicit-reparameterisation backward."""

    @staticmethod
    def forward(ctx, concentration, generator):
        x = torch._sample_dirichlet(concentration, generator=generator)
        ctx.save_for_backward(x, concentration)
        return x

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        x, concentration = ctx.saved_tensors
        total = concentration.sum(-1, keepdim=True).expand_as(concentration)
        dx_dconc = torch._dirichlet_grad(x, concentration, total)
        projected = grad_output - (x * grad_output).sum(-1, keepdim=True)
        return dx_dconc * projected, None


def _dirichlet_draw(concentration: torch.Tensor, shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
    """Reparameterised Dirichlet draws of ``shape`` (last dim is the simplex)."""
    return _DirichletSample.apply(concentration.expand(shape), generator)


def _categorical_indices(
    probs: torch.Tensor, sample_shape: torch.Size, generator: torch.Generator
) -> torch.Tensor:
    """Category indices of shape ``sample_shape + probs.shape[:-1]`` (torch's multinomial layout)."""
    probs_2d = probs.reshape(-1, probs.shape[-1])
    draws_2d = torch.multinomial(probs_2d, sample_shape.numel(), True, generator=generator).T
    return draws_2d.reshape(sample_shape + probs.shape[:-1])


# --------------------------------------------------------------------------- structural


@register_sampler(dist.Independent)
def _sample_independent(d, sample_shape, generator):
    return _draw(d.base_dist, sample_shape, generator)


@register_sampler(dist.TransformedDistribution)
def _sample_transformed(d, sample_shape, generator):
    x = _draw(d.base_dist, sample_shape, generator)
    for transform in d.transforms:
        x = transform(x)
    return x


@register_sampler(dist.MixtureSameFamily)
def _sample_mixture_same_family(d, sample_shape, generator):
    gather_dim = len(sample_shape) + len(d.batch_shape)
    event_shape = d.event_shape
    index = _draw(d.mixture_distribution, sample_shape, generator)
    components = _draw(d.component_distribution, sample_shape, generator)
    index = index.reshape(index.shape + torch.Size([1] * (len(event_shape) + 1)))
    index = index.expand(index.shape[: gather_dim + 1] + event_shape)
    return torch.gather(components, gather_dim, index).squeeze(gather_dim)


# --------------------------------------------------------------------------- continuous


@register_sampler(dist.Normal)
def _sample_normal(d, sample_shape, generator):
    eps = _standard_normal(_shape(d, sample_shape), d.loc, generator)
    return d.loc + eps * d.scale


@register_sampler(dist.Uniform)
def _sample_uniform(d, sample_shape, generator):
    u = _uniform01(_shape(d, sample_shape), d.low, generator)
    return d.low + u * (d.high - d.low)


@register_sampler(dist.Exponential)
def _sample_exponential(d, sample_shape, generator):
    return _empty_like_param(_shape(d, sample_shape), d.rate).exponential_(generator=generator) / d.rate


@register_sampler(dist.Laplace)
def _sample_laplace(d, sample_shape, generator):
    eps = torch.finfo(d.loc.dtype).eps
    u = _empty_like_param(_shape(d, sample_shape), d.loc).uniform_(eps - 1, 1, generator=generator)
    return d.loc - d.scale * u.sign() * torch.log1p(-u.abs())


@register_sampler(dist.Cauchy)
def _sample_cauchy(d, sample_shape, generator):
    eps = _empty_like_param(_shape(d, sample_shape), d.loc).cauchy_(generator=generator)
    return d.loc + eps * d.scale


@register_sampler(dist.Gamma)
def _sample_gamma(d, sample_shape, generator):
    return _standard_gamma_over_rate(d.concentration, d.rate, _shape(d, sample_shape), generator)


@register_sampler(dist.Dirichlet)
def _sample_dirichlet(d, sample_shape, generator):
    return _dirichlet_draw(d.concentration, _shape(d, sample_shape), generator)


@register_sampler(dist.Beta)
def _sample_beta(d, sample_shape, generator):
    concentration = torch.stack([d.concentration1, d.concentration0], -1)
    return _dirichlet_draw(concentration, _shape(d, sample_shape) + (2,), generator).select(-1, 0)


@register_sampler(dist.StudentT)
def _sample_student_t(d, sample_shape, generator):
    shape = _shape(d, sample_shape)
    x = _standard_normal(shape, d.df, generator)
    chi2 = _standard_gamma_over_rate(0.5 * d.df, torch.full_like(d.df, 0.5), shape, generator)
    return d.loc + d.scale * (x * torch.rsqrt(chi2 / d.df))


@register_sampler(dist.MultivariateNormal)
def _sample_multivariate_normal(d, sample_shape, generator):
    eps = _standard_normal(_shape(d, sample_shape), d.loc, generator)
    return d.loc + (d.scale_tril @ eps.unsqueeze(-1)).squeeze(-1)


@register_sampler(dist.LowRankMultivariateNormal)
def _sample_low_rank_multivariate_normal(d, sample_shape, generator):
    shape = _shape(d, sample_shape)
    eps_w = _standard_normal(shape[:-1] + d.cov_factor.shape[-1:], d.loc, generator)
    eps_d = _standard_normal(shape, d.loc, generator)
    return d.loc + (d.cov_factor @ eps_w.unsqueeze(-1)).squeeze(-1) + d.cov_diag.sqrt() * eps_d


@register_sampler(dist.ContinuousBernoulli)
def _sample_continuous_bernoulli(d, sample_shape, generator):
    return d.icdf(_uniform01(_shape(d, sample_shape), d.probs, generator))


@register_sampler(dist.GeneralizedPareto)
def _sample_generalized_pareto(d, sample_shape, generator):
    return d.icdf(_uniform01(_shape(d, sample_shape), d.loc, generator))


@register_sampler(dist.FisherSnedecor)
def _sample_fisher_snedecor(d, sample_shape, generator):
    shape = _shape(d, sample_shape)
    tiny = torch.finfo(d.df1.dtype).tiny
    x1 = _standard_gamma_over_rate(0.5 * d.df1, d.df1, shape, generator)
    x2 = _standard_gamma_over_rate(0.5 * d.df2, d.df2, shape, generator).clamp(min=tiny)
    return (x1 / x2).clamp(min=tiny)


def _von_mises_proposal_r(kappa: torch.Tensor) -> torch.Tensor:
    """Best & Fisher's envelope parameter r, with torch's small-kappa Taylor branch."""
    tau = 1 + (1 + 4 * kappa**2).sqrt()
    rho = (tau - (2 * tau).sqrt()) / (2 * kappa)
    return torch.where(kappa < 1e-5, 1 / kappa + kappa, (1 + rho**2) / (2 * rho))


@register_sampler(dist.VonMises)
def _sample_von_mises(d, sample_shape, generator):
    # Best & Fisher (1979) rejection sampling in double precision, following torch's loop.
    shape = _shape(d, sample_shape)
    loc, kappa = d.loc.double(), d.concentration.double()
    r = _von_mises_proposal_r(kappa)
    x = torch.empty(shape, dtype=torch.double, device=loc.device)
    done = torch.zeros(shape, dtype=torch.bool, device=loc.device)
    while not done.all():
        u1, u2, u3 = _uniform01((3,) + shape, loc, generator).unbind()
        z = torch.cos(math.pi * u1)
        f = (1 + r * z) / (r + z)
        c = kappa * (r - f)
        accept = ((c * (2 - c) - u2) > 0) | ((c / u2).log() + 1 - c >= 0)
        x = torch.where(accept, (u3 - 0.5).sign() * f.acos(), x)
        done = done | accept
    return ((x + math.pi + loc) % (2 * math.pi) - math.pi).to(d.loc.dtype)


@register_sampler(LogitRelaxedBernoulli)
def _sample_logit_relaxed_bernoulli(d, sample_shape, generator):
    shape = _shape(d, sample_shape)
    probs = _clamp_open_unit(d.probs.expand(shape))
    u = _clamp_open_unit(_uniform01(shape, probs, generator))
    return (u.log() - (-u).log1p() + probs.log() - (-probs).log1p()) / d.temperature


@register_sampler(ExpRelaxedCategorical)
def _sample_exp_relaxed_categorical(d, sample_shape, generator):
    u = _clamp_open_unit(_uniform01(_shape(d, sample_shape), d.logits, generator))
    scores = (d.logits - (-u.log()).log()) / d.temperature
    return scores - scores.logsumexp(dim=-1, keepdim=True)


# --------------------------------------------------------------------------- discrete


@register_sampler(dist.Bernoulli)
def _sample_bernoulli(d, sample_shape, generator):
    return torch.bernoulli(d.probs.expand(_shape(d, sample_shape)), generator=generator)


@register_sampler(dist.Categorical)
def _sample_categorical(d, sample_shape, generator):
    return _categorical_indices(d.probs, sample_shape, generator)


@register_sampler(dist.OneHotCategorical)
def _sample_one_hot_categorical(d, sample_shape, generator):
    probs = d.probs
    indices = _categorical_indices(probs, sample_shape, generator)
    return torch.nn.functional.one_hot(indices, probs.shape[-1]).to(probs)


@register_sampler(dist.OneHotCategoricalStraightThrough)
def _sample_one_hot_straight_through(d, sample_shape, generator):
    probs = d.probs
    return _sample_one_hot_categorical(d, sample_shape, generator) + (probs - probs.detach())


@register_sampler(dist.Binomial)
def _sample_binomial(d, sample_shape, generator):
    shape = _shape(d, sample_shape)
    return torch.binomial(d.total_count.expand(shape), d.probs.expand(shape), generator=generator)


@register_sampler(dist.Poisson)
def _sample_poisson(d, sample_shape, generator):
    return torch.poisson(d.rate.expand(_shape(d, sample_shape)), generator=generator)


@register_sampler(dist.Geometric)
def _sample_geometric(d, sample_shape, generator):
    tiny = torch.finfo(d.probs.dtype).tiny
    u = _empty_like_param(_shape(d, sample_shape), d.probs).uniform_(tiny, 1, generator=generator)
    return (u.log() / (-d.probs).log1p()).floor()


@register_sampler(dist.NegativeBinomial)
def _sample_negative_binomial(d, sample_shape, generator):
    rate = _standard_gamma_over_rate(d.total_count, torch.exp(-d.logits), _shape(d, sample_shape), generator)
    return torch.poisson(rate, generator=generator)


@register_sampler(dist.Multinomial)
def _sample_multinomial(d, sample_shape, generator):
    probs = d.probs
    indices = _categorical_indices(probs, torch.Size((d.total_count,)) + sample_shape, generator)
    indices = indices.movedim(0, -1)
    counts = torch.zeros(_shape(d, sample_shape), dtype=indices.dtype, device=indices.device)
    counts.scatter_add_(-1, indices, torch.ones_like(indices))
    return counts.to(probs.dtype)
