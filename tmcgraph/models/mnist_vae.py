"""The TMC paper's five-layer MNIST VAE and its three recognition models (section 4).

Generative model P (top to bottom)::

    z5 ~ N(mu, (0.01 + softplus(s))^2)                      4 units, learned mu, s
    z4 | z5 ~ N(nu(h), (0.01 + softplus(r(h)))^2), h = MLP(z5)   8 units, hidden 8
    z3 | z4 ...                                             16 units, hidden 16
    z2 | z3 ...                                             32 units, hidden 32
    z1 | z2 ...                                             64 units, hidden 64
    x  | z1 ~ Bernoulli(logits = Linear(MLP(z1)))           784 pixels, hidden 128

Every MLP has two weight-normalised dense layers of twice the width of its input layer,
with LeakyReLU(0.1); means and standard-deviation pre-activations are weight-normalised
linear maps of the MLP output.

Recognition models Q (bottom to top, x -> z1 -> ... -> z5):

* ``"small"`` (non-factorised, Eq. 4): Q(z_{i+1} | z_i) = N(nu, rho^2) with
  nu, rho from a two-layer MLP of the *sampled* z_i; MLP widths 128, 64, 32, 16, 8.
* ``"large"``: the same with widths 512, 256, 128, 64, 32.
* ``"factorised"`` (Eq. 5-6): Q(z_i | x) for every layer, where the features follow a
  deterministic chain h_1 = MLP(x), h_i = MLP(Linear(h_{i-1})) (widths as ``"small"``).
  Each latent's callable recomputes the chain up to its layer (a pure function of x).

Non-factorised layers are declared with a latent parent, so the engine draws them with
the chosen coupling (the engine's default, ``"permutation"``, unless one is named) and
evaluates the matching density.

Grey levels are Bernoulli targets: ``Bernoulli(logits=..., validate_args=False)``,
whose ``log_prob`` is x log p + (1 - x) log(1 - p) for any x in [0, 1] (the paper's
code does the same; it is not a normalised density for non-binary x).

Every network receives its parent in the engine's layout ``[sample dims..., batch,
features]`` and acts on the last axis, so it runs once per parent particle.

The data plate: by default ``"data"`` takes its size from each call (a minibatch of
images, one estimate per image). ``build(..., size=N, subsample=True)`` declares it
as a subsampled plate of the N training images (:mod:`tmcgraph.infer.subsample`): a call
then gives B of them with their indices ``data_index``, and the estimate is the N / B
scaled one for the whole training set. :func:`with_data_plate` gives the same networks
under the other declaration (e.g. per-image evaluation of a model trained subsampled).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Bernoulli, Distribution, Independent, constraints

from ..errors import TMCGraphError
from ..model import Model, Proposal
from ..sampling.samplers import register_sampler

__all__ = [
    "LATENT_SIZES",
    "RECOGNITION",
    "WIDTHS",
    "DiagNormal",
    "WNLinear",
    "MLP",
    "TopPrior",
    "NormalLayer",
    "BernoulliLayer",
    "FactorisedEncoder",
    "FactorisedLayer",
    "generative_model",
    "recognition_model",
    "build",
    "with_data_plate",
    "reconstruct",
    "std_nonlin",
    "n_parameters",
]

#: Stochastic layer sizes, bottom (z1, next to the data) to top (z5).
LATENT_SIZES = (64, 32, 16, 8, 4)
#: Pixels.
N_PIXELS = 784
#: Recognition model names.
RECOGNITION = ("factorised", "small", "large")
#: Hidden widths of the recognition MLPs, bottom to top.
WIDTHS = {"factorised": (128, 64, 32, 16, 8), "small": (128, 64, 32, 16, 8), "large": (512, 256, 128, 64, 32)}


def std_nonlin(x: torch.Tensor) -> torch.Tensor:
    """Standard deviation ``0.01 + softplus(x)``: bounded away from zero."""
    return 0.01 + F.softplus(x)


class WNLinear(nn.Module):
    """Weight-normalised dense layer (Salimans & Kingma 2016): W = g * v / ||v|| row-wise.

    Initialised like ``nn.Linear`` with g = ||v||, so the initial map equals ``nn.Linear``'s.
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        lin = nn.Linear(in_features, out_features)
        self.v = nn.Parameter(lin.weight.detach().clone())
        self.g = nn.Parameter(lin.weight.detach().norm(dim=1).clone())
        self.bias = nn.Parameter(lin.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.v * (self.g / self.v.norm(dim=1)).unsqueeze(1)
        return F.linear(x, w, self.bias)


class MLP(nn.Sequential):
    """Two weight-normalised dense layers of width ``hidden`` with LeakyReLU(0.1)."""

    def __init__(self, in_features: int, hidden: int):
        super().__init__(WNLinear(in_features, hidden), nn.LeakyReLU(0.1), WNLinear(hidden, hidden), nn.LeakyReLU(0.1))


class DiagNormal(Distribution):
    """Diagonal Gaussian over the last axis: ``Independent(Normal(loc, scale), 1)`` with a fast grid log-density.

    When ``value`` and ``loc`` broadcast to a larger grid (TMC evaluates every child
    particle against every parent particle, e.g. value ``[K, 1, B, F]`` against loc
    ``[1, K, B, F]``), the quadratic form is expanded,

        sum_f (v_f - m_f)^2 / s_f^2 = sum_f v_f^2 a_f - 2 sum_f v_f m_f a_f + sum_f m_f^2 a_f,  a = 1 / s^2,

    so the two grid terms are batched matrix products (``torch.einsum``) instead of
    elementwise ops on a ``[K, K, B, F]`` tensor. Both sides are first centred on the
    mean of ``loc`` over its leading (sample) axes and the expansion is evaluated in
    float64, since its terms cancel (they are of size (spread / scale)^2 with scales
    down to 0.01). When no grid is formed the direct formula is used.
    """

    arg_constraints = {"loc": constraints.real, "scale": constraints.positive}
    support = constraints.real_vector
    has_rsample = True

    def __init__(self, loc: torch.Tensor, scale: torch.Tensor):
        self.loc, self.scale = torch.broadcast_tensors(loc, scale)
        super().__init__(self.loc.shape[:-1], self.loc.shape[-1:], validate_args=False)

    @property
    def mean(self) -> torch.Tensor:
        return self.loc

    @property
    def stddev(self) -> torch.Tensor:
        return self.scale

    def expand(self, batch_shape, _instance=None):
        shape = torch.Size(batch_shape) + self.event_shape
        return DiagNormal(self.loc.expand(shape), self.scale.expand(shape))

    def rsample(self, sample_shape=torch.Size()) -> torch.Tensor:
        shape = self._extended_shape(sample_shape)
        eps = torch.randn(shape, dtype=self.loc.dtype, device=self.loc.device)
        return self.loc + eps * self.scale

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        loc, scale = self.loc, self.scale
        n = loc.shape[-1]
        const = scale.log().sum(-1) + 0.5 * n * math.log(2 * math.pi)
        grid = torch.broadcast_shapes(value.shape, loc.shape)
        if grid == value.shape or grid == loc.shape or loc.dim() < 3:
            return -0.5 * (((value - loc) / scale) ** 2).sum(-1) - const
        c = loc.detach().mean(dim=tuple(range(loc.dim() - 2)), keepdim=True)
        v, m = value - c, loc - c
        a = scale.pow(-2)
        if v.dtype != torch.float64:  # the expansion cancels terms of size (spread / scale)^2
            v, m, a = v.double(), m.double(), a.double()
        quad = (
            torch.einsum("...f,...f->...", v * v, a)
            - 2 * torch.einsum("...f,...f->...", v, m * a)
            + (m * m * a).sum(-1)
        )
        return -0.5 * quad.to(loc.dtype) - const


@register_sampler(DiagNormal)
def _sample_diag_normal(d: DiagNormal, sample_shape, generator) -> torch.Tensor:
    """Reparameterised draw from a private generator (as :meth:`DiagNormal.rsample`)."""
    eps = torch.randn(d._extended_shape(sample_shape), dtype=d.loc.dtype, device=d.loc.device, generator=generator)
    return d.loc + eps * d.scale


def _normal(mean: torch.Tensor, pre_std: torch.Tensor):
    return DiagNormal(mean, std_nonlin(pre_std))


class TopPrior(nn.Module):
    """P(z_top) = N(mu, (0.01 + softplus(s))^2) with learned ``mu``, ``s`` (no parents)."""

    def __init__(self, size: int):
        super().__init__()
        self.mean = nn.Parameter(torch.zeros(size))
        self.pre_std = nn.Parameter(torch.zeros(size))

    def forward(self):
        return _normal(self.mean, self.pre_std)


class NormalLayer(nn.Module):
    """N(nu(h), (0.01 + softplus(r(h)))^2) with h = MLP(parent) (Eq. 4)."""

    def __init__(self, in_features: int, out_features: int, hidden: int):
        super().__init__()
        self.mlp = MLP(in_features, hidden)
        self.mean = WNLinear(hidden, out_features)
        self.pre_std = WNLinear(hidden, out_features)

    def forward(self, parent: torch.Tensor):
        h = self.mlp(parent)
        return _normal(self.mean(h), self.pre_std(h))


class BernoulliLayer(nn.Module):
    """Bernoulli pixels with logits Linear(MLP(z1)); grey-level targets allowed."""

    def __init__(self, in_features: int = LATENT_SIZES[0], out_features: int = N_PIXELS, hidden: int = 128):
        super().__init__()
        self.mlp = MLP(in_features, hidden)
        self.logits = WNLinear(hidden, out_features)

    def forward(self, parent: torch.Tensor):
        return Independent(Bernoulli(logits=self.logits(self.mlp(parent)), validate_args=False), 1)


class FactorisedEncoder(nn.Module):
    """Deterministic feature chain of the factorised recognition model (Eq. 6).

    h_1 = MLP(x); h_i = MLP(Linear(h_{i-1})), where the linear map reduces h_{i-1} to the
    size of layer i-1's latent; Q(z_i | x) = N(nu_i(h_i), rho_i(h_i)^2).
    """

    def __init__(self, widths: Sequence[int] = WIDTHS["factorised"], sizes: Sequence[int] = LATENT_SIZES):
        super().__init__()
        ins = [N_PIXELS] + list(sizes[:-1])
        self.mlps = nn.ModuleList(MLP(i, w) for i, w in zip(ins, widths))
        self.reduce = nn.ModuleList(WNLinear(w, s) for w, s in zip(widths[:-1], sizes[:-1]))
        self.mean = nn.ModuleList(WNLinear(w, s) for w, s in zip(widths, sizes))
        self.pre_std = nn.ModuleList(WNLinear(w, s) for w, s in zip(widths, sizes))

    def features(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        """h_layer (0-based layer index, 0 is z1)."""
        h = self.mlps[0](x)
        for i in range(1, layer + 1):
            h = self.mlps[i](self.reduce[i - 1](h))
        return h

    def dist(self, x: torch.Tensor, layer: int):
        """Q(z_{layer+1} | x)."""
        h = self.features(x, layer)
        return _normal(self.mean[layer](h), self.pre_std[layer](h))


class FactorisedLayer(nn.Module):
    """Q(z_i | x) of the factorised model: a view of one layer of a shared encoder."""

    def __init__(self, encoder: FactorisedEncoder, layer: int):
        super().__init__()
        self.encoder = encoder
        self.layer = layer

    def forward(self, x: torch.Tensor):
        return self.encoder.dist(x, self.layer)


def _names():
    return [f"z{i + 1}" for i in range(len(LATENT_SIZES))]


def _data_plate(m: Model, size: Optional[int], subsample: bool, where: str) -> None:
    """Declare plate ``"data"`` on ``m``: per call (``size=None``), fixed, or subsampled of full size ``size``."""
    if subsample and size is None:
        raise TMCGraphError(f"{where}: subsample=True needs size=N, the full number of images of the 'data' plate")
    m.plate("data", size=size, subsample=subsample)


def generative_model(size: Optional[int] = None, subsample: bool = False) -> Model:
    """The generative model P over ``z5 -> z4 -> z3 -> z2 -> z1 -> x`` in plate ``"data"``.

    Args:
        size: Size of the ``"data"`` plate: ``None`` (default) takes it from each call;
            with ``subsample=True`` it is the full number N of images.
        subsample: Declare ``"data"`` as a subsampled plate of N images: a call gives B
            of them with their indices ``data_index``, and every image's contribution
            is scaled by N / B (:mod:`tmcgraph.infer.subsample`).

    Raises:
        TMCGraphError: ``subsample=True`` without ``size``.
    """
    m = Model()
    _data_plate(m, size, subsample, "generative_model")
    names = _names()
    top = len(LATENT_SIZES) - 1
    m.latent(names[top], TopPrior(LATENT_SIZES[top]), plate="data", parents=[])
    for i in range(top - 1, -1, -1):
        parent = LATENT_SIZES[i + 1]
        m.latent(names[i], NormalLayer(parent, LATENT_SIZES[i], 2 * parent), plate="data", parents=[names[i + 1]])
    m.observed("x", BernoulliLayer(LATENT_SIZES[0], N_PIXELS, 2 * LATENT_SIZES[0]), plate="data", parents=["z1"])
    return m


def recognition_model(model: Model, kind: str = "small", coupling=None) -> Proposal:
    """A recognition model (proposal) for :func:`generative_model`.

    Args:
        model: The generative model.
        kind: ``"factorised"``, ``"small"`` or ``"large"``.
        coupling: Coupling of non-factorised layers (a name, a coupling object, or
            ``None`` for the engine's default).
    """
    if kind not in RECOGNITION:
        raise TMCGraphError(f"recognition must be one of {RECOGNITION}, got {kind!r}")
    q = Proposal(model)
    names = _names()
    if kind == "factorised":
        enc = FactorisedEncoder(WIDTHS[kind], LATENT_SIZES)
        for i, n in enumerate(names):
            q.latent(n, FactorisedLayer(enc, i), plate="data", parents=["x"])
        return q
    ins = [N_PIXELS] + list(LATENT_SIZES[:-1])
    parents = ["x"] + names[:-1]
    for i, n in enumerate(names):
        q.latent(
            n, NormalLayer(ins[i], LATENT_SIZES[i], WIDTHS[kind][i]), plate="data", parents=[parents[i]],
            coupling=coupling,
        )
    return q


def build(recognition: str = "small", coupling=None, size: Optional[int] = None, subsample: bool = False):
    """``(model, proposal)``: the generative model and a recognition model of kind ``recognition``.

    Args:
        recognition: ``"factorised"``, ``"small"`` or ``"large"``.
        coupling: Coupling of the non-factorised recognition layers (``None``: the
            engine's default).
        size: Size of the ``"data"`` plate (``None``: from each call); the full number
            of images with ``subsample=True``.
        subsample: Declare ``"data"`` subsampled (see :func:`generative_model`).
    """
    m = generative_model(size, subsample)
    return m, recognition_model(m, recognition, coupling)


def with_data_plate(model: Model, proposal: Proposal, size: Optional[int] = None, subsample: bool = False):
    """The same networks under another declaration of the ``"data"`` plate.

    Returns a new ``(model, proposal)`` whose variables have the callables, parents and
    couplings of ``model`` and ``proposal`` (the ``nn.Module`` objects themselves, so
    every parameter is shared and the state dicts have the same keys) in a ``"data"``
    plate declared with ``size`` and ``subsample`` as in :func:`generative_model`. A
    subsampled plate's index variable is dropped or declared as the new plate requires.

    Args:
        model: A generative model of this module (:func:`generative_model`).
        proposal: Its recognition model (:func:`recognition_model`).
        size: Size of the new ``"data"`` plate (``None``: from each call).
        subsample: Whether the new plate is subsampled (``size`` is then required).

    Example:
        >>> m, q = build("small", size=60000, subsample=True)   # trained on minibatches
        >>> pm, pq = with_data_plate(m, q)                      # evaluated per image
        >>> pm["x"].fn is m["x"].fn
        True
    """
    m = Model()
    _data_plate(m, size, subsample, "with_data_plate")
    for name, v in model.variables.items():
        if v.index_of is not None:  # the old plate's element indices
            continue
        declare = m.latent if v.kind == "latent" else m.observed
        declare(name, v.fn, plate="data", parents=list(v.parents))
    q = Proposal(m)
    for name, v in proposal.variables.items():
        q.latent(name, v.fn, plate="data", parents=list(v.parents), coupling=v.coupling, K=v.K)
    return m, q


@torch.no_grad()
def reconstruct(model: Model, proposal: Proposal, x: torch.Tensor) -> torch.Tensor:
    """Pixel means of P(x | z1) at the mean of Q(z1 | x), ``[B, 784]``."""
    z1 = proposal["z1"].dist({"x": x}).mean
    return torch.sigmoid(model["x"].dist({"z1": z1}).base_dist.logits)


def n_parameters(module: nn.Module) -> int:
    """Number of scalar parameters."""
    return sum(p.numel() for p in module.parameters())

