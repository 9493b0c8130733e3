"""Subsampled plates: minibatches of B of a plate's N elements, each contribution scaled by N / B.

A plate declared ``model.plate("data", size=N, subsample=True)`` may be given B of its N
elements per call: the data along it are those elements, and ``data["data_index"]`` (the
plate's index variable, which callables may take as a parent) holds their indices in
``[0, N)`` (:func:`subsample` slices full data and adds them). As in Pyro's
``pyro.plate(..., subsample_size=B)``, every element's log-contribution is multiplied by
s = N / B. In the plated contraction (the paper's Fig. 2) the scale belongs to the
message an element passes up to its enclosing plate, not to individual factors: with
global latents g and, per element e, local latents z_e,

    log P_TMC^sub = log sum_{k_g} prod_g w_g[k_g] * prod_{e in batch} ( sum_{k_{z_e}} w_e[k_g, k_{z_e}] )^s

i.e. the log of each element's sum over its local particles is scaled by s before the
global particles are summed out. Scaling the factors instead would raise every summand
of the local sum to the power s, a different (tempered) quantity. When the plate holds
no local sample dims the two coincide and the factors themselves are scaled.

What is and is not unbiased, for fixed global particles k_g and a minibatch drawn
uniformly (with or without replacement):

* the scaled sum s * sum_{e in batch} log m_e(k_g), where m_e is element e's local
  sum (for elements without local latents, the likelihood p(x_e | g)), is unbiased for
  the full-data sum sum_{n=1}^N log m_n(k_g);
* its exponential, and hence exp(log P_TMC^sub), is *not* unbiased for p(x) (nor for
  P_TMC on the full data): exp is convex, so by Jensen E_batch[exp(...)] >= exp(E[...]);
* with one global particle (K = 1, the VAE case) log P_TMC^sub is linear in the scaled
  sums, so its expectation over minibatches, and that of its gradient, equal those of
  the full-data estimate on the same particles exactly; the latter is a lower bound on
  log p(x) in expectation over the particles;
* with K > 1 global particles, log P_TMC^sub is a logsumexp over k_g of terms linear in
  the scaled sums, a convex function of them, so (Jensen) its average over minibatches
  lies *above* the full-data log P_TMC on the same particles. Under minibatching the
  estimate is thus not a lower bound on log p(x) in expectation: it is the full-data
  bound plus a non-negative minibatch term that vanishes as B -> N.

Elements with local latents are summed exactly as without subsampling (their own K
particles, their own densities); only their message is scaled.

How it is computed. The factor graph carries the scales
(:attr:`tmcgraph.ops.factor.FactorGraph.scales`, from :func:`plate_scales`); every plan
step that multiplies out a scaled plate multiplies the sum of its elements'
log-messages by s, so eager and compiled programs, ``memory_limit`` slicing, posterior
marginals and backward samples (which divide the scale back out of the marginals of
local dims) and masked predictive likelihoods all see the same scaled contraction.

Per-element values over a subsampled plate (``elementwise=``) are the elements' scaled
contributions s * log m_e; they sum to the scaled estimate.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..errors import TMCGraphError
from ..model import Model

__all__ = ["subsample", "plate_scales", "is_subsampled"]


def _indices(plate: str, idx, N: int) -> torch.Tensor:
    idx = torch.as_tensor(idx)
    if idx.is_floating_point() or idx.is_complex() or idx.dtype == torch.bool:
        raise TMCGraphError(f"subsample indices of plate {plate!r} must be integers, got {idx.dtype}")
    if idx.dim() != 1 or idx.shape[0] < 1:
        raise TMCGraphError(f"subsample indices of plate {plate!r} must be a non-empty vector [B], got shape "
                            f"{tuple(idx.shape)}")
    bad = (idx < 0) | (idx >= N)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise TMCGraphError(f"subsample index {int(idx[i])} (at position {i}) is out of range for plate {plate!r} "
                            f"of full size {N}: indices must lie in [0, {N})")
    return idx.long()


def subsample(model: Model, data: dict, indices: dict, sliced: bool = False) -> dict:
    """The data of a minibatch: every observed variable restricted to the given plate elements.

    Args:
        model: The model.
        data: Observed name -> tensor: full data (``[N, ...]`` along each subsampled
            plate), or, with ``sliced=True``, data that already hold the B elements.
        indices: Plate name -> element indices (a vector of B integers in ``[0, N)``).
        sliced: Whether ``data`` are already restricted to the elements.

    Returns:
        A new dict: the (sliced) data plus ``"<plate>_index"`` for every plate in ``indices``.

    Raises:
        TMCGraphError: an unknown plate, a plate not declared subsample-able, indices of
            the wrong type, shape or range, or data whose size along the plate is not N
            (or B, with ``sliced=True``).

    Example:
        >>> import torch, tmcgraph as tg
        >>> from torch.distributions import Normal
        >>> m = tg.Model(); m.plate("data", size=5, subsample=True)
        >>> m.latent("mu", lambda: Normal(0., 1.))
        >>> m.observed("x", lambda mu: Normal(mu, 1.), plate="data")
        >>> batch = subsample(m, {"x": torch.arange(5.)}, {"data": torch.tensor([4, 1])})
        >>> batch["x"], batch["data_index"]
        (tensor([4., 1.]), tensor([4, 1]))
    """
    if not isinstance(indices, dict):
        raise TMCGraphError(f"subsample indices must be a dict plate -> indices, got {type(indices).__name__}")
    out = dict(data)
    for plate, idx in indices.items():
        if plate not in model.plates:
            raise TMCGraphError(f"subsample: unknown plate {plate!r}; plates are {list(model.plates)}")
        p = model.plates[plate]
        if not p.subsample:
            raise TMCGraphError(f"subsample: plate {plate!r} is not declared subsample-able; declare it with "
                                f"model.plate({plate!r}, size=N, subsample=True)")
        idx = _indices(plate, idx, p.size)
        want = idx.shape[0] if sliced else p.size
        for n in model.observed_names:
            v = model[n]
            if plate not in v.plates or v.index_of is not None or n not in out:
                continue
            x = torch.as_tensor(out[n])
            ax = v.plates.index(plate)
            if x.dim() <= ax or x.shape[ax] != want:
                got = tuple(x.shape)
                raise TMCGraphError(f"subsample: data for {n!r} (shape {got}) should have size {want} along plate "
                                    f"{plate!r} (dim {ax}): the " + ("minibatch" if sliced else "full plate"))
            out[n] = x if sliced else x.index_select(ax, idx.to(x.device))
        out[p.index] = idx
    return out


def plate_scales(model: Model, plate_sizes: dict) -> dict:
    """Plate -> N / B for every subsampled plate given B != N of its elements (empty: no scaling)."""
    return {p.name: p.size / plate_sizes[p.name] for p in model.plates.values()
            if p.subsample and plate_sizes.get(p.name, p.size) != p.size}


def is_subsampled(model: Model, data: Optional[dict]) -> bool:
    """Whether ``data`` give some subsampled plate fewer (or more) indices than its full size."""
    if not data:
        return False
    for p in model.plates.values():
        if p.subsample and p.index in data:
            idx = data[p.index]
            n = int(idx.shape[0]) if torch.is_tensor(idx) and idx.dim() >= 1 else len(idx)
            if n != p.size:
                return True
    return False
