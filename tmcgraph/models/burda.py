"""Burda, Grosse & Salakhutdinov (2016), "Importance Weighted Autoencoders": models, objectives, metrics.

Models (section 5 of the paper), declared with tmcgraph's :class:`~tmcgraph.Model` /
:class:`~tmcgraph.Proposal` API in plate ``"data"`` (size taken from the minibatch):

* one stochastic layer (:data:`ONE_LAYER`): ``x (784) -> 200 -> 200 -> h1 (50)`` in the
  recognition model, mirrored in the generative model ``h1 -> 200 -> 200 -> x``;
* two stochastic layers (:data:`TWO_LAYER`): ``x -> 200 -> 200 -> h1 (100) -> 100 -> 100
  -> h2 (50)``, mirrored ``h2 -> 100 -> 100 -> h1 -> 200 -> 200 -> x``.

Deterministic layers are dense with tanh; each stochastic layer is a diagonal Gaussian
``N(mu(h), exp(s(h))^2)`` (mean and log standard deviation linear in the last
deterministic layer); the top prior is ``N(0, I)``; pixels are ``Bernoulli(logits)``.
Weights are initialised with Glorot's uniform heuristic from a private generator, biases
at zero, except the decoder's output bias, which starts at ``logit(pixel mean)`` of the
training set (clipped to [0.001, 0.999], as in the paper's code). In the two-layer model
``q(h2 | h1)`` depends on the sampled ``h1``, so TMC (K particles per layer, K^2 index
combinations) runs on it with the coupling given to :func:`build`.

Objectives, from the per-sample log-weights ``log w_i = log p(x, h_i) - log q(h_i | x)``
of k joint samples (:func:`log_weights`, the summed IWAE factors of tmcgraph's pipeline):

* VAE with k samples: ``L^VAE_k = 1/k sum_i log w_i`` (the mean of k ELBO estimates);
* IWAE: ``L_k = log 1/k sum_i w_i`` (Burda et al., Eq. 8);
* CIWAE (Rainforth et al. 2018): ``beta L^VAE_k + (1 - beta) L_k`` on the same samples;
* MIWAE(M, K) (Rainforth et al. 2018): ``1/M sum_m log 1/K sum_k w_{m,k}``, M independent
  K-sample IWAE bounds (M K samples);
* PIWAE(M, K) (Rainforth et al. 2018): on the same M K samples, the generative model
  ascends the IWAE bound ``L_{MK}`` and the recognition model the MIWAE bound;
* TMC (Aitchison): ``tmcgraph.TMC`` on the two-layer model.

Training follows the paper: Adam (beta = 0.9, 0.999, eps = 1e-4), 3^i epochs at learning
rate ``1e-3 * 10^(-i/7)`` for i = 0..7 (3280 epochs; :func:`schedule`, truncatable), data
binarised afresh each epoch.

Metrics (section 5.2 and appendix of the paper): the negative log-likelihood as
``-L_5000`` (:func:`evaluate_bounds`, chunked over samples so memory stays bounded),
the KL divergence ``KL(q(h|x) || p(h|x)) = log p(x) - ELBO ~ L_5000 - L_1`` (the ELBO
averaged over the same 5000 samples), the effective sample size of the importance
weights ``(sum w)^2 / sum w^2`` and the number of active units
``A_u = Cov_x(E_q[u | x]) > 1e-2`` (:func:`posterior_means`, :func:`active_units`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import torch
from torch import nn
from torch.distributions import Bernoulli, Independent

from ..errors import TMCGraphError
from ..infer.estimators import IWAE, TMC
from ..infer.objectives import Loss, objective
from ..model import Model, Proposal
from .mnist_vae import DiagNormal

__all__ = [
    "ONE_LAYER",
    "TWO_LAYER",
    "ARCHITECTURES",
    "PUBLISHED",
    "Dense",
    "GaussianLayer",
    "StandardNormal",
    "BernoulliDecoder",
    "output_bias",
    "build",
    "latent_names",
    "log_weights",
    "log_mean_exp",
    "Objective",
    "VAEk",
    "IWAEk",
    "CIWAE",
    "MIWAE",
    "PIWAE",
    "TMCk",
    "parse_objective",
    "schedule",
    "learning_rate",
    "LogWeightStats",
    "chunked_stats",
    "evaluate_bounds",
    "posterior_means",
    "active_units",
    "ess",
]

#: One stochastic layer: latent sizes (bottom to top) and the width of the two deterministic
#: layers below each stochastic layer.
ONE_LAYER = {"latents": (50,), "hidden": (200,)}
#: Two stochastic layers.
TWO_LAYER = {"latents": (100, 50), "hidden": (200, 100)}
#: Architectures by number of stochastic layers.
ARCHITECTURES = {1: ONE_LAYER, 2: TWO_LAYER}
#: Burda et al. (2016), Table 1, MNIST (dynamically binarised): test NLL (nats) and active units.
PUBLISHED = {
    (1, 1): {"vae": (86.76, "19"), "iwae": (86.76, "19")},
    (1, 5): {"vae": (86.47, "20"), "iwae": (85.54, "22")},
    (1, 50): {"vae": (86.35, "20"), "iwae": (84.78, "25")},
    (2, 1): {"vae": (85.33, "16+5"), "iwae": (85.33, "16+5")},
    (2, 5): {"vae": (85.01, "17+5"), "iwae": (83.89, "21+5")},
    (2, 50): {"vae": (84.78, "17+5"), "iwae": (82.90, "26+7")},
}


class Dense(nn.Module):
    """``x W^T + b`` with Glorot-uniform ``W`` drawn from ``generator`` and ``b = 0``.

    The parameters are created empty and filled from the private generator, so building
    a model neither reads nor advances torch's global random state.
    """

    def __init__(self, in_features: int, out_features: int, generator: Optional[torch.Generator] = None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features))
        with torch.no_grad():
            nn.init.xavier_uniform_(self.weight, generator=generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.weight, self.bias)


def _trunk(in_features: int, hidden: int, g) -> nn.Sequential:
    return nn.Sequential(Dense(in_features, hidden, g), nn.Tanh(), Dense(hidden, hidden, g), nn.Tanh())


class GaussianLayer(nn.Module):
    """``N(mu(h), exp(s(h))^2)``, ``h`` = two tanh layers of width ``hidden`` applied to the parent."""

    def __init__(self, in_features: int, out_features: int, hidden: int, generator=None):
        super().__init__()
        self.trunk = _trunk(in_features, hidden, generator)
        self.mean = Dense(hidden, out_features, generator)
        self.log_std = Dense(hidden, out_features, generator)

    def forward(self, parent: torch.Tensor) -> DiagNormal:
        h = self.trunk(parent)
        return DiagNormal(self.mean(h), self.log_std(h).exp())


class StandardNormal(nn.Module):
    """The top prior ``N(0, I)`` of ``size`` units (no parameters)."""

    def __init__(self, size: int):
        super().__init__()
        self.register_buffer("zeros", torch.zeros(size))

    def forward(self) -> DiagNormal:
        return DiagNormal(self.zeros, torch.ones_like(self.zeros))


class BernoulliDecoder(nn.Module):
    """``Bernoulli(logits = Dense(h))``, ``h`` = two tanh layers of width ``hidden`` of the parent."""

    def __init__(self, in_features: int, n_pixels: int, hidden: int, generator=None, bias=None):
        super().__init__()
        self.trunk = _trunk(in_features, hidden, generator)
        self.logits = Dense(hidden, n_pixels, generator)
        if bias is not None:
            with torch.no_grad():
                self.logits.bias.copy_(bias)

    def forward(self, parent: torch.Tensor):
        return Independent(Bernoulli(logits=self.logits(self.trunk(parent)), validate_args=False), 1)


def output_bias(pixel_means: torch.Tensor, clip: float = 1e-3) -> torch.Tensor:
    """``logit(clip(mean, clip, 1 - clip))``: the decoder's initial output bias (per pixel)."""
    m = torch.as_tensor(pixel_means, dtype=torch.float32).clamp(clip, 1 - clip)
    return torch.log(m) - torch.log1p(-m)


def latent_names(n_layers: int) -> list:
    """``["h1", ..., "hL"]``, bottom (next to the data) to top."""
    return [f"h{i + 1}" for i in range(n_layers)]


def build(layers=1, pixel_means: Optional[torch.Tensor] = None, seed: int = 0, n_pixels: int = 784,
          coupling=None, latents: Optional[Sequence[int]] = None, hidden: Optional[Sequence[int]] = None):
    """``(model, proposal)``: a Burda et al. generative model and its recognition model.

    Args:
        layers: 1 or 2 stochastic layers (:data:`ARCHITECTURES`), unless ``latents`` and
            ``hidden`` are given.
        pixel_means: Training-set pixel means ``[n_pixels]``; the decoder's output bias
            starts at their logit (zero if ``None``).
        seed: Seed of the private generator the weights are drawn from.
        n_pixels: Size of the observation.
        coupling: Coupling of ``q(h_{i+1} | h_i)`` in TMC (``None``: the engine's default).
        latents: Latent sizes bottom to top (overrides ``layers``; small models for tests).
        hidden: Deterministic width below each stochastic layer (same length as ``latents``).

    Raises:
        TMCGraphError: unknown ``layers``, mismatched ``latents``/``hidden`` or ``pixel_means``.
    """
    if latents is None or hidden is None:
        if layers not in ARCHITECTURES:
            raise TMCGraphError(f"layers must be one of {sorted(ARCHITECTURES)}, got {layers!r}")
        latents = latents or ARCHITECTURES[layers]["latents"]
        hidden = hidden or ARCHITECTURES[layers]["hidden"]
    latents, hidden = tuple(int(v) for v in latents), tuple(int(v) for v in hidden)
    if len(latents) != len(hidden) or not latents or min(latents + hidden) < 1:
        raise TMCGraphError(f"latents {latents} and hidden {hidden} must be positive and of equal length")
    bias = None
    if pixel_means is not None:
        pixel_means = torch.as_tensor(pixel_means)
        if tuple(pixel_means.shape) != (n_pixels,):
            raise TMCGraphError(f"pixel_means must have shape ({n_pixels},), got {tuple(pixel_means.shape)}")
        bias = output_bias(pixel_means)
    g = torch.Generator().manual_seed(int(seed))
    names = latent_names(len(latents))
    top = len(latents) - 1
    m = Model()
    m.plate("data", size=None)
    m.latent(names[top], StandardNormal(latents[top]), plate="data", parents=[])
    for i in range(top - 1, -1, -1):
        m.latent(names[i], GaussianLayer(latents[i + 1], latents[i], hidden[i + 1], g), plate="data",
                 parents=[names[i + 1]])
    m.observed("x", BernoulliDecoder(latents[0], n_pixels, hidden[0], g, bias), plate="data", parents=[names[0]])
    q = Proposal(m)
    ins = (n_pixels,) + latents[:-1]
    parents = ["x"] + names[:-1]
    for i, n in enumerate(names):
        q.latent(n, GaussianLayer(ins[i], latents[i], hidden[i], g), plate="data", parents=[parents[i]],
                 coupling=coupling if i > 0 else None)
    return m, q


# ------------------------------------------------------------------------------------ objectives


def log_weights(model: Model, proposal: Proposal, data: dict, K: int, seed=None,
                detach_proposal: bool = False) -> torch.Tensor:
    """Per-sample log importance weights ``log w_k(x_b) = log p(x_b, h^k) - log q(h^k | x_b)``, ``[K, B]``.

    The K joint samples are drawn by tmcgraph's IWAE pipeline (``tg.IWAE(...).sample``) and
    ``log w`` is the sum of the IWAE factor graph's log-factors (plus ``log K``, which the
    graph carries as a constant), so ``logsumexp_k log w_k - log K`` is exactly
    ``tg.IWAE(model, proposal, K).log_evidence(data, seed, elementwise=True)``.

    Args:
        model, proposal: Model and proposal whose variables lie in the outermost plate.
        data: Observed name -> tensor.
        K: Joint samples per data point.
        seed: An int or a ``torch.Generator`` (advanced by the draw).
        detach_proposal: Proposal densities with detached parameters (path derivative only).
    """
    est = IWAE(model, proposal, K=K, compile=False)
    s = est.sample(data, seed=seed, detach_proposal=detach_proposal)
    graph = est.factor_graph(s)
    plates = list(model.plates)
    dims = graph.sample_dims
    if len(dims) != 1 or any(tuple(f.plates) != (plates[0],) for f in graph.factors):
        raise TMCGraphError(
            f"log_weights needs every variable in the one plate {plates[:1]} and one joint sample dim; "
            f"got sample dims {dims} and factor plates {[f.plates for f in graph.factors]}"
        )
    B = graph.sizes[plates[0]]
    total = None
    for f in graph.factors:
        t = f.tensor if f.sample_dims else f.tensor.unsqueeze(0)
        total = t.expand(K, B) if total is None else total + t
    return total + math.log(K)


def log_mean_exp(a: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """``log 1/n sum exp(a)`` along ``dim``."""
    return torch.logsumexp(a, dim) - math.log(a.shape[dim])


@dataclass(frozen=True)
class Objective:
    """A training objective on k joint samples per data point (subclasses define :meth:`bound`).

    Attributes:
        k: Samples per data point.
    """

    k: int

    #: Name used by :func:`parse_objective`.
    name = ""

    def __post_init__(self):
        if int(self.k) < 1:
            raise TMCGraphError(f"{self.name}: k must be a positive integer, got {self.k}")

    def bound(self, lw: torch.Tensor) -> torch.Tensor:
        """Per-data-point objective from log-weights ``[k, B]``."""
        raise NotImplementedError

    def __call__(self, model: Model, proposal: Proposal, data: dict, seed=None) -> Loss:
        """The minibatch :class:`~tmcgraph.infer.objectives.Loss` (reparameterised gradients)."""
        lw = log_weights(model, proposal, data, self.k, seed)
        value = self.bound(lw)
        return Loss(value, -value.mean(), None, self.label, list(model.parameters()), list(proposal.parameters()))

    @property
    def label(self) -> str:
        """Short description, e.g. ``"iwae k=50"``."""
        return f"{self.name} k={self.k}"


@dataclass(frozen=True)
class VAEk(Objective):
    """``1/k sum_i log w_i``: the VAE bound estimated with k samples (mean of k ELBOs)."""

    name = "vae"

    def bound(self, lw):
        return lw.mean(0)


@dataclass(frozen=True)
class IWAEk(Objective):
    """``log 1/k sum_i w_i`` (Burda et al. 2016, Eq. 8)."""

    name = "iwae"

    def bound(self, lw):
        return log_mean_exp(lw, 0)


@dataclass(frozen=True)
class CIWAE(Objective):
    """``beta * L^VAE_k + (1 - beta) * L_k`` on the same k samples (Rainforth et al. 2018)."""

    beta: float = 0.5
    name = "ciwae"

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= float(self.beta) <= 1.0:
            raise TMCGraphError(f"ciwae: beta must lie in [0, 1], got {self.beta}")

    def bound(self, lw):
        return self.beta * lw.mean(0) + (1 - self.beta) * log_mean_exp(lw, 0)

    @property
    def label(self):
        return f"ciwae k={self.k} beta={self.beta:g}"


def _groups(lw: torch.Tensor, M: int) -> torch.Tensor:
    k, B = lw.shape
    return lw.reshape(M, k // M, B)


@dataclass(frozen=True)
class MIWAE(Objective):
    """``1/M sum_m log 1/K sum_k w_{m,k}``: M independent K-sample IWAE bounds (``k = M K``)."""

    M: int = 1
    name = "miwae"

    def __post_init__(self):
        super().__post_init__()
        if int(self.M) < 1 or self.k % self.M:
            raise TMCGraphError(f"{self.name}: M={self.M} must be a positive divisor of k={self.k}")

    def bound(self, lw):
        return log_mean_exp(_groups(lw, self.M), 1).mean(0)

    @property
    def label(self):
        return f"{self.name} M={self.M} K={self.k // self.M}"


@dataclass(frozen=True)
class PIWAE(MIWAE):
    """Rainforth et al. (2018): the model ascends ``L_{MK}`` (IWAE), the proposal MIWAE(M, K), same samples.

    ``Loss.value`` is the IWAE bound; :meth:`Loss.backward` sends the IWAE gradient to the
    model's parameters and the MIWAE gradient to the proposal's.
    """

    name = "piwae"

    def bound(self, lw):
        return log_mean_exp(lw, 0)

    def __call__(self, model, proposal, data, seed=None) -> Loss:
        lw = log_weights(model, proposal, data, self.k, seed)
        value = log_mean_exp(lw, 0)
        proposal_loss = -MIWAE.bound(self, lw).mean()
        return Loss(value, -value.mean(), proposal_loss, self.label, list(model.parameters()),
                    list(proposal.parameters()))


@dataclass(frozen=True)
class TMCk(Objective):
    """The TMC bound with k particles per latent (``tmcgraph.TMC``), reparameterised gradients.

    The coupling of the non-factorised layers is the proposal's (see :func:`build`).
    """

    name = "tmc"

    def bound(self, lw):  # pragma: no cover - TMC does not reduce to one set of joint log-weights
        raise TMCGraphError("the TMC bound is a contraction over every particle combination, not a function of "
                            "joint log-weights")

    def __call__(self, model, proposal, data, seed=None) -> Loss:
        return objective(TMC(model, proposal, K=self.k, compile=False), data, "reparam", seed)


def parse_objective(spec: str) -> Objective:
    """An :class:`Objective` from a spec string.

    Specs: ``vae:K``, ``iwae:K``, ``tmc:K``, ``ciwae:K:beta``, ``miwae:M:K`` and
    ``piwae:M:K`` (the last two use ``M K`` samples per data point).

    Raises:
        TMCGraphError: an unknown name or malformed numbers (the message quotes the spec).
    """
    parts = str(spec).strip().lower().split(":")
    name, args = parts[0], parts[1:]
    try:
        if name in ("vae", "iwae", "tmc") and len(args) == 1:
            return {"vae": VAEk, "iwae": IWAEk, "tmc": TMCk}[name](int(args[0]))
        if name == "ciwae" and len(args) == 2:
            return CIWAE(int(args[0]), float(args[1]))
        if name in ("miwae", "piwae") and len(args) == 2:
            M, K = int(args[0]), int(args[1])
            return (MIWAE if name == "miwae" else PIWAE)(M * K, M)
    except ValueError as e:
        raise TMCGraphError(f"objective {spec!r}: {e}") from e
    raise TMCGraphError(
        f"objective {spec!r}: expected vae:K, iwae:K, tmc:K, ciwae:K:beta, miwae:M:K or piwae:M:K"
    )


# ------------------------------------------------------------------------------------ schedule


def schedule(stages: int = 8, lr: float = 1e-3, decay: float = 10 ** (-1 / 7), growth: int = 3) -> list:
    """Burda et al.'s schedule: stage i (i = 0..stages-1) has ``growth^i`` epochs at ``lr * decay^i``.

    The defaults give 3^i epochs at ``1e-3 * 10^(-i/7)``, 3280 epochs in all.

    Returns:
        ``[(epochs, learning rate), ...]`` per stage.
    """
    if stages < 1 or growth < 1 or not lr > 0:
        raise TMCGraphError(f"schedule needs stages >= 1, growth >= 1, lr > 0; got {stages}, {growth}, {lr}")
    return [(growth**i, lr * decay**i) for i in range(stages)]


def learning_rate(epoch: int, stages: int = 8, lr: float = 1e-3, decay: float = 10 ** (-1 / 7),
                  growth: int = 3) -> float:
    """The learning rate of 0-based ``epoch`` under :func:`schedule` (the last stage's after its end)."""
    if epoch < 0:
        raise TMCGraphError(f"epoch must be >= 0, got {epoch}")
    start = 0
    stages_ = schedule(stages, lr, decay, growth)
    for n, rate in stages_:
        if epoch < start + n:
            return rate
        start += n
    return stages_[-1][1]


# ------------------------------------------------------------------------------------ metrics


@dataclass
class LogWeightStats:
    """Streaming sums over the samples of each data point (all ``[B]``).

    Attributes:
        n: Samples seen.
        log_sum_w: ``log sum_i w_i``.
        log_sum_w2: ``log sum_i w_i^2``.
        sum_log_w: ``sum_i log w_i``.
    """

    n: int
    log_sum_w: torch.Tensor
    log_sum_w2: torch.Tensor
    sum_log_w: torch.Tensor

    @property
    def bound(self) -> torch.Tensor:
        """``L_n = log 1/n sum w``."""
        return self.log_sum_w - math.log(self.n)

    @property
    def elbo(self) -> torch.Tensor:
        """``1/n sum log w``: the ELBO estimated from the same samples."""
        return self.sum_log_w / self.n

    @property
    def ess(self) -> torch.Tensor:
        """``(sum w)^2 / sum w^2``."""
        return torch.exp(2 * self.log_sum_w - self.log_sum_w2)


def chunked_stats(chunks: Iterable[torch.Tensor]) -> LogWeightStats:
    """Combine log-weight chunks ``[c_j, B]`` of the same data points into :class:`LogWeightStats`.

    Only one chunk is held at a time, so ``L_5000`` needs memory for one chunk only; the
    result equals the same statistics of the concatenated chunks.
    """
    n, lsw, lsw2, slw = 0, None, None, None
    for c in chunks:
        a, a2, s = torch.logsumexp(c, 0), torch.logsumexp(2 * c, 0), c.sum(0)
        if lsw is None:
            lsw, lsw2, slw = a, a2, s
        else:
            lsw, lsw2, slw = torch.logaddexp(lsw, a), torch.logaddexp(lsw2, a2), slw + s
        n += c.shape[0]
    if lsw is None:
        raise TMCGraphError("chunked_stats: no chunks")
    return LogWeightStats(n, lsw, lsw2, slw)


@torch.no_grad()
def evaluate_bounds(model: Model, proposal: Proposal, x: torch.Tensor, K: int = 5000, seed: int = 0,
                    max_elements: int = 2**22, batch_size: int = 100) -> dict:
    """``L_K``, the ELBO, ``L_K - ELBO`` and the ESS per data point, chunked over samples and data points.

    Each batch of ``batch_size`` data points draws its K samples in chunks of ``c`` with
    ``c * batch * x.shape[-1] <= max_elements`` (the decoder's logits are the largest
    tensor), all from one private generator seeded with ``seed``. The default, 2^22
    logits (16 MB in float32), keeps a chunk's decoder activations in a CPU's caches:
    1.36-1.39x faster per image than 2^24 on a 2-core AMD EPYC
    (``benchmarks/perf_burda_eval.py``); the chunking changes which samples are drawn,
    not what is estimated.

    Returns:
        ``{"bound", "elbo", "kl", "ess"}`` tensors ``[N]`` (nats per data point;
        ``kl = bound - elbo`` estimates KL(q(h|x) || p(h|x))), and ``"K"``.
    """
    if K < 1 or batch_size < 1 or max_elements < 1:
        raise TMCGraphError(f"evaluate_bounds needs K, batch_size, max_elements >= 1; got {K}, {batch_size}, "
                            f"{max_elements}")
    g = torch.Generator(device=x.device).manual_seed(int(seed))
    out = {"bound": [], "elbo": [], "ess": []}
    for xb in x.split(batch_size):
        c = max(1, min(K, max_elements // (len(xb) * max(1, xb.shape[-1]))))
        sizes = [c] * (K // c) + ([K % c] if K % c else [])
        st = chunked_stats(log_weights(model, proposal, {"x": xb}, n, seed=g) for n in sizes)
        out["bound"].append(st.bound)
        out["elbo"].append(st.elbo)
        out["ess"].append(st.ess)
    res = {k: torch.cat(v) for k, v in out.items()}
    res["kl"] = res["bound"] - res["elbo"]
    res["K"] = K
    return res


def _sample(d: DiagNormal, n: int, g: torch.Generator) -> torch.Tensor:
    eps = torch.randn((n,) + tuple(d.loc.shape), generator=g, dtype=d.loc.dtype, device=d.loc.device)
    return d.loc + eps * d.scale


@torch.no_grad()
def posterior_means(proposal: Proposal, x: torch.Tensor, samples: int = 100, seed: int = 0,
                    batch_size: int = 500) -> dict:
    """``E_q[h_i | x]`` for every layer, ``{name: [N, D_i]}``.

    The first layer's mean is exact (the mean of ``q(h1 | x)``); a higher layer's is
    ``E_{q(h_{i-1} | x)}[mean of q(h_i | h_{i-1})]``, averaged over ``samples`` draws of the
    layers below (private generator seeded with ``seed``).
    """
    g = torch.Generator(device=x.device).manual_seed(int(seed))
    names = [n for n in proposal.validate() if n in proposal.variables]
    out = {n: [] for n in names}
    for xb in x.split(batch_size):
        d = proposal[names[0]].dist({"x": xb})
        out[names[0]].append(d.mean)
        h = _sample(d, samples, g)  # [S, B, D]
        for n in names[1:]:
            d = proposal[n].dist({proposal[n].parents[0]: h})
            out[n].append(d.mean.mean(0))
            h = _sample(d, 1, g)[0]
    return {n: torch.cat(v) for n, v in out.items()}


def active_units(means: torch.Tensor, threshold: float = 1e-2) -> int:
    """Number of units u with ``A_u = Cov_x(E_q[u | x]) > threshold`` (``means``: ``[N, D]``)."""
    if means.dim() != 2 or means.shape[0] < 2:
        raise TMCGraphError(f"active_units needs means of shape [N >= 2, D], got {tuple(means.shape)}")
    return int((means.double().var(0) > threshold).sum())


def ess(lw: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Effective sample size ``(sum w)^2 / sum w^2`` of log-weights along ``dim``."""
    return torch.exp(2 * torch.logsumexp(lw, dim) - torch.logsumexp(2 * lw, dim))
