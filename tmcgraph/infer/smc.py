"""Sequential Monte Carlo (a particle filter) estimate of log p(x): the baseline TMC is compared with.

SMC moves ``K`` joint particles through the latents one step at a time. A step samples
some latents from the proposal Q given each particle's own earlier values, multiplies
each particle's weight by the model factors that have just become computable, and
optionally resamples. With steps t = 1..T, normalised weights W_{t-1}^k (uniform after
a resampling) and incremental weights

    alpha_t^k = prod_{f at step t} P_f(. | pa)^k / prod_{z sampled at step t} Q(z^k | pa_Q^k),

the estimate (Doucet & Johansen 2009, "A tutorial on particle filtering and smoothing",
Eq. 36; Del Moral 2004 for unbiasedness) is

    Z_SMC = prod_t sum_k W_{t-1}^k alpha_t^k,    E[Z_SMC] = p(x),

so ``log Z_SMC`` is, in expectation, a lower bound on ``log p(x)``. Unbiasedness holds
for multinomial and systematic resampling (every particle's expected number of copies
is K W^k) and for resampling decided from the current weights (effective sample size,
ESS = 1 / sum_k (W^k)^2, below ``ess_threshold * K``).

Steps. With ``seq_plate=None`` every latent is one step, in the proposal's topological
order (a chain z_1 -> z_2 -> ... is filtered along the chain). With
``seq_plate="data"`` that plate is unrolled: latents outside it are sampled first (one
step each), then each element i of the plate is one step that samples element i of
every latent inside the plate (in the proposal's order), as in the paper's comparison
(Aitchison, "Tensor Monte Carlo", section 3.1, Fig. 3). A model factor (latent:
log P(z | pa); observed: log P(x | pa)) joins the weights at the first step after which
its variable and all its latent parents have been sampled; factors inside the unrolled
plate join at their element's step, so observed data are reached one element at a time.
Factors with no latent at all are constants added once.

Markov plates (``model.plate(..., markov=True)``) are the natural sequence: with
``seq_plate=None`` a model with one is filtered along it (a particle filter along time),
each element's step drawing ``z_t`` from Q given the particle's own ``z_{t-1}`` (``init``
at ``t = 0``) and weighting by the transition and emission factors.

Differences from TMC. Each particle carries its own trajectory, so a proposal with latent
parents is always evaluated at the particle's own parent values (the proposal's
``coupling`` and per-latent ``K`` are TMC settings and are not used here; SMC uses one
particle count ``K``). Enumerated latents are not supported. Resampling is a discrete,
non-differentiable operation: the estimate is computed under ``torch.no_grad`` and
carries no gradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ..errors import TMCGraphError
from ..model import Model, Proposal, check_inference_inputs
from ..particles import check_batch_shape, place
from ..sampling.context import Context, resolve_device
from ..sampling.data import bind_data
from ..sampling.densities import log_prob
from .subsample import plate_scales

__all__ = ["SMC", "SMCResult", "RESAMPLING", "resample_indices", "effective_sample_size"]

#: Resampling schemes.
RESAMPLING = ("systematic", "multinomial")

_K = "_particles"


def effective_sample_size(log_weights: torch.Tensor) -> torch.Tensor:
    """ESS = (sum_k w_k)^2 / sum_k w_k^2 of (unnormalised) log-weights along the last dim."""
    return torch.exp(2 * torch.logsumexp(log_weights, -1) - torch.logsumexp(2 * log_weights, -1))


def resample_indices(log_weights: torch.Tensor, n: int, scheme: str = "systematic",
                     generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Ancestor indices ``a_1..a_n`` drawn in proportion to ``exp(log_weights)`` (a vector).

    ``multinomial``: n independent draws (inverse CDF of sorted-free uniforms).
    ``systematic`` (Kitagawa 1996): one uniform U, points (U + j) / n for j = 0..n-1;
    particle k then gets floor or ceil of ``n W^k`` copies. In both, the expected number
    of copies of particle k is ``n W^k``.

    Args:
        log_weights: ``[K]`` log-weights, at least one finite.
        n: Number of indices to draw.
        scheme: ``"systematic"`` or ``"multinomial"``.
        generator: Generator for the uniforms (``None``: torch's global one).

    Returns:
        ``[n]`` long tensor of indices into ``log_weights``.
    """
    if scheme not in RESAMPLING:
        raise TMCGraphError(f"resampling scheme must be one of {RESAMPLING}, got {scheme!r}")
    if log_weights.dim() != 1:
        raise TMCGraphError(f"log_weights must be a vector, got shape {tuple(log_weights.shape)}")
    w = torch.softmax(log_weights.to(torch.float64), 0)
    c = torch.cumsum(w, 0)
    c = c / c[-1]
    if scheme == "systematic":
        u = (torch.rand((), dtype=torch.float64, device=c.device, generator=generator)
             + torch.arange(n, device=c.device)) / n
    else:
        u = torch.rand(n, dtype=torch.float64, device=c.device, generator=generator)
    return torch.searchsorted(c, u, right=True).clamp_(max=log_weights.shape[0] - 1)


@dataclass
class SMCResult:
    """One SMC run.

    Attributes:
        log_evidence: ``log Z_SMC`` (scalar, no gradient).
        ess: ``[steps]`` effective sample size after each step's weighting (before any
            resampling of that step); the run stops early, with ``log_evidence = -inf``,
            if every weight vanishes.
        resampled: ``[steps]`` whether the particles were resampled after that step.
        steps: Description of each step: ``(latents sampled, plate element or None)``.
    """

    log_evidence: torch.Tensor
    ess: torch.Tensor
    resampled: torch.Tensor
    steps: list


@dataclass(frozen=True)
class _Schedule:
    """Which latents each step samples and which factors it adds.

    ``outer``: one entry per latent outside the unrolled plate:
    ``(latent, factors, drop)``; ``inner``: latents and factors of one plate element;
    ``constant``: factors with no latent.
    """

    outer: tuple
    inner_latents: tuple
    inner_factors: tuple
    constant: tuple


class SMC:
    """Sequential Monte Carlo estimator of log p(x) for a model and a proposal.

    Args:
        model: The generative model P.
        proposal: The proposal Q for every latent of ``model`` (declared with the same API
            as for TMC; couplings and per-latent ``K`` are not used, see the module doc).
        K: Number of particles.
        seq_plate: A plate to unroll as the sequence (one step per element), or ``None``
            for one step per latent in the proposal's topological order.
        resampling: ``"systematic"`` (default) or ``"multinomial"``.
        ess_threshold: Resample after a step when ESS < ``ess_threshold * K``. ``1``
            resamples after every step (but the last), ``0`` never (sequential importance
            sampling, which equals IWAE).
        device: Device for data and for distributions built from Python numbers.
        dtype: Floating dtype for data and for distributions built from Python numbers.

    Resampling is not differentiable: the estimate carries no gradient, and SMC cannot be
    used as a reparameterised training objective (the paper's section 1).

    Example:
        >>> import torch; from torch.distributions import Normal
        >>> import tmcgraph as tg
        >>> from tmcgraph.infer.smc import SMC
        >>> m = tg.Model(); _ = m.plate("data", size=4)
        >>> m.latent("theta", lambda: Normal(0., 1.))
        >>> m.latent("z", lambda theta: Normal(theta, 1.), plate="data")
        >>> m.observed("x", lambda z: Normal(z, 1.), plate="data")
        >>> q = tg.Proposal(m); q.latent("theta", lambda: Normal(0., 1.))
        >>> q.latent("z", lambda: Normal(0., 2 ** 0.5), plate="data")
        >>> SMC(m, q, K=16, seq_plate="data").log_evidence({"x": torch.zeros(4)}, seed=0).shape
        torch.Size([])
    """

    def __init__(
        self,
        model: Model,
        proposal: Proposal,
        K: int = 16,
        seq_plate: Optional[str] = None,
        resampling: str = "systematic",
        ess_threshold: float = 0.5,
        device=None,
        dtype: Optional[torch.dtype] = None,
    ):
        check_inference_inputs(model, proposal, K)
        if resampling not in RESAMPLING:
            raise TMCGraphError(f"resampling must be one of {RESAMPLING}, got {resampling!r}")
        try:
            thr = float(ess_threshold)
        except (TypeError, ValueError):
            thr = float("nan")
        if not 0.0 <= thr <= 1.0:
            raise TMCGraphError(f"ess_threshold must be a number in [0, 1], got {ess_threshold!r}")
        if seq_plate is not None and seq_plate not in model.plates:
            raise TMCGraphError(f"seq_plate: unknown plate {seq_plate!r}; plates are {list(model.plates)}")
        chains = sorted({v.markov for v in list(model.variables.values()) + list(proposal.variables.values())
                         if v.markov is not None})
        if len(chains) > 1:
            raise TMCGraphError(f"SMC filters along one Markov plate; the model has {chains}")
        if chains and seq_plate is None:
            seq_plate = chains[0]
        elif chains and seq_plate != chains[0]:
            raise TMCGraphError(f"SMC: variables take previous values along Markov plate {chains[0]!r}; "
                                f"seq_plate must be that plate, got {seq_plate!r}")
        if dtype is not None and not dtype.is_floating_point:
            raise TMCGraphError(f"dtype must be a floating dtype, got {dtype}")
        self.model = model
        self.proposal = proposal
        self.K = int(K)
        self.seq_plate = seq_plate
        self.resampling = resampling
        self.ess_threshold = thr
        self.device = resolve_device(device)
        self.dtype = dtype
        self._schedule = self._make_schedule()

    # ------------------------------------------------------------------ schedule
    def _make_schedule(self) -> _Schedule:
        m, q, sp = self.model, self.proposal, self.seq_plate
        order = q.validate()
        enum = [n for n in order if q[n].enumerate]
        if enum:
            raise TMCGraphError(
                f"SMC does not support enumerated latent(s) {enum}; declare q.latent(...) or q.prior(...) for them"
            )
        inside = lambda n: sp is not None and sp in m[n].plates  # noqa: E731
        if sp is not None and not any(inside(n) for n in m.variables):
            raise TMCGraphError(f"seq_plate {sp!r} contains no variable")
        outer = [n for n in order if not inside(n)]
        inner = tuple(n for n in order if inside(n))
        step_of = {n: i for i, n in enumerate(outer)}
        outer_factors = [[] for _ in outer]
        inner_factors, constant = [], []
        last_use = {n: i for i, n in enumerate(outer)}
        forever = len(outer)  # needed by every element step
        for n in m.validate():
            v = m[n]
            pars = [v.prev.get(p, p) for p in v.parents] + list(v.init.parents if v.init is not None else ())
            need = ([n] if v.kind == "latent" else []) + [p for p in dict.fromkeys(pars) if m[p].kind == "latent"]
            if not need:
                constant.append(n)
            elif inside(n):
                inner_factors.append(n)
                for p in need:
                    if p in step_of:
                        last_use[p] = forever
            else:
                t = max(step_of[p] for p in need)
                outer_factors[t].append(n)
                for p in need:
                    last_use[p] = max(last_use[p], t)
        for i, n in enumerate(outer + list(inner)):
            for p in q[n].parents:
                if p in step_of:
                    last_use[p] = max(last_use[p], forever if n in inner else i)
        steps = tuple(
            (n, tuple(outer_factors[i]), tuple(p for p, t in last_use.items() if t == i))
            for i, n in enumerate(outer)
        )
        return _Schedule(steps, inner, tuple(inner_factors), tuple(constant))

    # ------------------------------------------------------------------ public
    def run(self, data: dict, seed: Optional[int] = None) -> SMCResult:
        """Run the particle filter on ``data``; see :class:`SMCResult`.

        Args:
            data: Observed name -> tensor ``[*plate sizes, *event]``.
            seed: An int or a ``torch.Generator`` for reproducible sampling and resampling
                (private to the call: torch's global RNG is neither used nor changed).
        """
        return _Run(self, Context(self.device, self.dtype, seed), data).filter()

    def log_evidence(self, data: dict, seed: Optional[int] = None) -> torch.Tensor:
        """The SMC estimate ``log Z_SMC`` of log p(x) (no gradient). See :meth:`run`."""
        return self.run(data, seed).log_evidence

    __call__ = log_evidence

    def __repr__(self):
        return (
            f"SMC(K={self.K}, seq_plate={self.seq_plate!r}, resampling={self.resampling!r}, "
            f"ess_threshold={self.ess_threshold})"
        )


class _Run:
    """One SMC run: the estimator's settings plus the call's context and bound data."""

    def __init__(self, smc: SMC, ctx: Context, data: dict):
        self.model, self.proposal, self.K = smc.model, smc.proposal, smc.K
        self.seq_plate, self.resampling, self.ess_threshold = smc.seq_plate, smc.resampling, smc.ess_threshold
        self._schedule = smc._schedule
        self._ctx = ctx
        self._bound, self._sizes = bind_data(self.model, data, ctx)
        scaled = plate_scales(self.model, self._sizes)
        if scaled:
            raise TMCGraphError(f"SMC does not support subsampled plates: {sorted(scaled)}")
        self._checked = set()

    def _layout(self, n: str, element) -> tuple:
        """Plates of ``n`` and their sizes at this step (the unrolled plate has size 1)."""
        plates = self.model[n].plates
        sizes = [1 if (element is not None and p == self.seq_plate) else self._sizes[p] for p in plates]
        return plates, sizes

    def _data(self, n: str, element):
        x = self._bound[n]
        if element is not None and self.seq_plate in self.model[n].plates:
            x = x.narrow(self.model[n].plates.index(self.seq_plate), element, 1)
        return x

    def _inputs(self, var, values: dict, element) -> dict:
        """Parents of ``var`` in the layout ``[K (or 1), *var's plates, *event]``.

        A ``<u>_prev`` parent is ``u`` at the previous element (kept by :meth:`filter`).
        """
        plates = self.model[var.name].plates
        out = {}
        for p in var.parents:
            u = var.prev.get(p, p)
            pp = self.model[u].plates
            if p in values:
                out[p] = place(values[p], (_K,), pp, (_K,), plates)
            elif p in var.prev and self.model[u].kind == "latent":
                raise TMCGraphError(f"SMC: previous value {p!r} of {var.name!r} is not available at element "
                                    f"{element} of {self.seq_plate!r}")
            else:
                out[p] = place(self._data(u, element if p == u else element - 1), (), pp, (_K,), plates)
        return out

    @staticmethod
    def _at(var, element):
        """The declaration used at ``element``: ``init`` at a Markov plate's first element."""
        return var.init if (var.prev and element == 0) else var

    def _check(self, name, role, d, target, plates):
        """Check a batch shape once per run (element steps all have the first one's shapes)."""
        if (name, role) in self._checked:
            return
        check_batch_shape(name, role, d, target, [f"K={self.K}"] + list(plates))
        self._checked.add((name, role))

    def _sample(self, n: str, values: dict, element) -> torch.Tensor:
        """Sample latent ``n`` into ``values``; return ``log Q`` summed over its plates, ``[K]``."""
        qv = self._at(self.proposal[n], element)
        plates, sizes = self._layout(n, element)
        target = torch.Size([self.K] + sizes)
        d = self._ctx.dist(qv.dist(self._inputs(qv, values, element)))
        self._check(n, "proposal", d, list(target), plates)
        d = d.expand(target)
        z = self._ctx.sample(d, ())
        values[n] = z
        lq = log_prob(d, z)
        return lq.reshape(self.K, -1).sum(-1)

    def _factor(self, n: str, values: dict, element) -> torch.Tensor:
        """``log P(n | pa)`` summed over ``n``'s plates, ``[K]`` (or ``[1]`` for a constant)."""
        v = self._at(self.model[n], element)
        plates, sizes = self._layout(n, element)
        target = [self.K] + sizes
        d = self._ctx.dist(v.dist(self._inputs(v, values, element)))
        role = "model" if v.kind == "latent" else "likelihood"
        self._check(n, role, d, target, plates)
        x = values[n] if n in values else place(self._data(n, element), (), plates, (_K,), plates)
        try:
            lp = log_prob(d, x)
            if lp.dim() != len(target) or list(lp.shape[1:]) != sizes:
                lp = lp.expand(torch.broadcast_shapes(lp.shape, torch.Size([1] + sizes)))
        except Exception as e:
            raise TMCGraphError(
                f"{role} log_prob of {n!r} failed or has the wrong shape: value shape {tuple(x.shape)}, "
                f"distribution batch {tuple(d.batch_shape)} + event {tuple(d.event_shape)}, expected batch "
                f"[K, {', '.join(plates)}]={target} (vector variables need Independent): {e}"
            ) from e
        if lp.dim() != len(target):
            raise TMCGraphError(
                f"{role} log_prob of {n!r} has shape {tuple(lp.shape)}, expected [K, {', '.join(plates)}]={target} "
                "(vector variables need Independent)"
            )
        return lp.reshape(lp.shape[0], -1).sum(-1)

    @torch.no_grad()
    def filter(self) -> SMCResult:
        """The particle filter proper."""
        sch = self._schedule
        K = self.K
        values: dict = {}
        log_z = 0.0  # accumulated in float64 (a Python float)
        for n in sch.constant:
            log_z += float(self._factor(n, values, None).sum())
        steps = [((n,), None, fs, drop) for n, fs, drop in sch.outer]
        if self.seq_plate is not None and (sch.inner_latents or sch.inner_factors):
            inner = [(sch.inner_latents, i, sch.inner_factors, sch.inner_latents) for i in
                     range(self._sizes[self.seq_plate])]
            steps = steps + inner
        dtype = self._ctx.dtype or torch.get_default_dtype()
        log_w = torch.full((K,), -math.log(K), dtype=dtype)
        ess, resampled = [], []
        for t, (latents, element, factors, drop) in enumerate(steps):
            lw = log_w
            for n in latents:
                lw = lw - self._sample(n, values, element)
            for n in factors:
                lw = lw + self._factor(n, values, element)
            inc = torch.logsumexp(lw, 0)
            inc_f = float(inc)
            log_z += inc_f
            if not math.isfinite(inc_f):
                # Every particle has zero weight (or a weight is NaN): Z_SMC = 0 or undefined.
                ess.append(0.0)
                resampled.append(False)
                break
            log_w = lw - inc
            e = 1.0 / float(torch.exp(torch.logsumexp(2 * log_w, 0)))
            ess.append(e)
            for n in drop:
                z = values.pop(n, None)
                if element is not None and z is not None:
                    values[n + "_prev"] = z  # the previous element's value, for Markov plates
            do = t < len(steps) - 1 and (self.ess_threshold >= 1.0 or e < self.ess_threshold * K)
            resampled.append(do)
            if do:
                idx = resample_indices(log_w, K, self.resampling, self._ctx.generator(log_w.device))
                for n in values:
                    values[n] = values[n].index_select(0, idx)
                log_w = torch.full((K,), -math.log(K), dtype=dtype)
        desc = [(s[0], s[1]) for s in steps]
        return SMCResult(
            torch.tensor(log_z, dtype=dtype),
            torch.tensor(ess, dtype=torch.float64),
            torch.tensor(resampled, dtype=torch.bool),
            desc,
        )

