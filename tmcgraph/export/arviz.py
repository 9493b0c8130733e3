"""Export TMC posteriors to ArviZ (``pip install "tmcgraph[arviz]"``).

:func:`to_inference_data` turns one :class:`~tmcgraph.infer.posterior.Posterior` (one
chain) or several (one chain each) into an ``arviz.InferenceData`` with the groups

* ``posterior``: joint draws from the TMC-reweighted posterior ``pi`` (backward
  sampling, :meth:`~tmcgraph.infer.posterior.Posterior.sample`), each latent laid out
  ``(chain, draw, *plates, *event)``; plate dims are named after the plates, with
  coordinates ``0..size-1`` (or the labels given in ``coords``), event dims
  ``<name>_dim_<i>``;
* ``log_likelihood``: ``log p(x_e | z)`` per observed variable and plate element
  (event dims summed), evaluated with the model at every draw: ``(chain, draw, *plates)``;
* ``sample_stats`` (``(chain, draw)``): ``lp = log P(x, z)`` at the draw;
  ``log_weight``, the log TMC weight ``sum_f f[k]`` of the drawn index combination
  ``k`` (so ``log pi(k) = log_weight - log_evidence``); and, constant within a chain,
  ``log_evidence`` (``log P_TMC`` of the chain's particles), ``weight_ess`` (the global
  weight ESS) and ``log_weight_ess_all`` (see :mod:`tmcgraph.infer.diagnostics`);
* ``observed_data``: the data, ``(*plates, *event)``;
* ``tmc_diagnostics`` (:data:`DIAGNOSTICS`, a group of ArviZ's "custom" kind, without a
  draw dim): per chain ``log_evidence``, ``weight_ess``, ``log_weight_ess_all`` and,
  per latent, the marginal ESS per plate element ``marginal_ess_<name>``
  (``(chain, *plates)``).

:func:`from_estimator` draws ``chains`` independent sets of particles (one posterior
per chain), so that between-chain diagnostics (``arviz.rhat``, ``arviz.ess``) see the
Monte Carlo error of the particles. The draws of one chain are independent exact draws
from that chain's ``pi``; with a single chain ArviZ's ESS counts draws, not particles
(with few effective particles the draws repeat a few values): read the particle ESS in
``sample_stats``.

ArviZ is imported when a function is called, never by ``import tmcgraph``. With
arviz < 1.0 the result is an ``arviz.InferenceData``; with arviz >= 1.0 (whose
containers are ``xarray.DataTree``) an ``xarray.DataTree`` with the same groups
(``container=`` chooses explicitly).
"""

from __future__ import annotations

import importlib
import importlib.metadata
from typing import Optional, Sequence, Union

import numpy as np
import torch

from ..errors import TMCGraphError
from ..infer.diagnostics import marginal_ess, weight_ess
from ..infer.posterior import Posterior, posterior
from ..particles import Samples, parent_inputs, place

__all__ = ["to_inference_data", "from_estimator", "draws_log_prob", "CONTAINERS", "DIAGNOSTICS"]

#: ``container=`` values: the ArviZ version decides, or one explicitly.
CONTAINERS = ("auto", "inference_data", "datatree")

#: Name of the group of per-chain particle diagnostics (dims ``(chain, *plates)``, no draw dim).
DIAGNOSTICS = "tmc_diagnostics"

#: Name of the shared sample dim of the draws when the model is evaluated at them.
_DRAWS = "_draw"

_INSTALL = 'pip install "tmcgraph[arviz]" (or pip install arviz)'


def _require(module: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"tmcgraph.export.arviz needs {module}, which is not installed: {_INSTALL}") from e


def _version() -> str:
    try:
        return importlib.metadata.version("tmcgraph")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _arviz_major(az) -> int:
    try:
        return int(str(az.__version__).split(".")[0])
    except ValueError:
        return 0


def draws_log_prob(estimator, values: dict, data: dict, plates: dict, plate_sizes: dict) -> dict:
    """``log P(v | parents)`` of every model variable at joint draws, per plate element.

    The draws play the role of particles on one shared sample dim (as in IWAE): each
    callable sees parents laid out ``[S, *plates, *event]``.

    Args:
        estimator: Supplies the model and its execution context (dtype, device).
        values: Latent name -> draws ``[S, *plate sizes, *event]``.
        data: Observed name -> data ``[*plate sizes, *event]``.
        plates: Variable name -> its plates.
        plate_sizes: Plate name -> size.

    Returns:
        Variable name -> ``[S, *sizes of its plates]``.
    """
    model, ctx = estimator.model, estimator.context()
    S = int(next(iter(values.values())).shape[0]) if values else 1
    s = Samples(values=values, dims={n: _DRAWS for n in values}, sizes={_DRAWS: S}, ordinals={_DRAWS: ()},
                log_q={}, data=data, plate_sizes=plate_sizes, plates=plates, order=list(values))
    out = {}
    for name in model.validate():
        v = model[name]
        target = [S] + [plate_sizes[p] for p in v.plates]
        d = ctx.dist(v.dist(parent_inputs(v.parents, s, (_DRAWS,), v.plates)))
        value = place(s.value(name), s.dims_of(name), v.plates, (_DRAWS,), v.plates)
        try:
            lp = d.log_prob(value)
            lp = lp.expand(target)
        except (RuntimeError, ValueError) as e:
            raise TMCGraphError(
                f"log_prob of {name!r} at the posterior draws failed: value shape {tuple(value.shape)}, "
                f"distribution batch shape {tuple(d.batch_shape)}, event shape {tuple(d.event_shape)}, expected "
                f"[draws, {', '.join(v.plates)}]={target}: {e}"
            ) from e
        out[name] = lp
    return out


def _place(idx: torch.Tensor, idx_plates: tuple, plates: tuple, sizes: dict) -> torch.Tensor:
    """``idx`` (``[S, *idx_plates]``) laid out ``[S, *plates]`` (broadcast over the others)."""
    idx = idx.permute([0] + [1 + idx_plates.index(p) for p in plates if p in idx_plates])
    idx = idx.reshape([idx.shape[0]] + [sizes[p] if p in idx_plates else 1 for p in plates])
    return idx.expand([idx.shape[0]] + [sizes[p] for p in plates])


def _log_weight(post: Posterior, indices: dict) -> torch.Tensor:
    """``sum_f f[k_s]`` (summed over plate elements) at each drawn index combination ``k_s``."""
    graph = post.graph
    sizes = graph.sizes
    S = int(next(iter(indices.values())).shape[0])
    total = None
    for f in graph.factors:
        plates = tuple(f.plates)
        ix = [_place(indices[d], tuple(graph.ordinals[d]), plates, sizes) for d in f.sample_dims]
        ar = [torch.arange(sizes[p], device=f.tensor.device).reshape([1] + [sizes[q] if q == p else 1 for q in plates])
              for p in plates]
        if ix:
            val = f.tensor[tuple(ix) + tuple(ar)]
        else:
            val = f.tensor.expand([S] + [sizes[p] for p in plates]) if plates else f.tensor.expand(S)
        val = val.reshape(S, -1).sum(1)
        total = val if total is None else total + val
    return total


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def _plate_coords(sizes: dict, coords: Optional[dict]) -> dict:
    out = {p: np.arange(n) for p, n in sizes.items()}
    for p, labels in (coords or {}).items():
        if p not in sizes:
            raise TMCGraphError(f"coords: unknown plate {p!r}; the plates are {list(sizes)}")
        labels = np.asarray(labels)
        if labels.shape != (sizes[p],):
            raise TMCGraphError(f"coords for plate {p!r} have shape {labels.shape}, expected ({sizes[p]},)")
        out[p] = labels
    return out


def _chain_group(est, post: Posterior, draws: int, seed, batch_size) -> dict:
    """Everything one chain contributes: name -> (numpy array, dims after chain)."""
    s = post.samples
    drawn = post.sample(draws, seed=seed, batch_size=batch_size)
    logw = []
    logps = {}
    B = draws if batch_size is None else int(batch_size)
    for start in range(0, draws, B):
        sl = slice(start, min(start + B, draws))
        vals = {n: v[sl] for n, v in drawn.values.items()}
        with torch.no_grad():
            lps = draws_log_prob(est, vals, s.data, s.plates, s.plate_sizes)
        for n, lp in lps.items():
            logps.setdefault(n, []).append(lp.detach())
        logw.append(_log_weight(post, {d: i[sl] for d, i in drawn.indices.items()}))
    logps = {n: torch.cat(v, 0) for n, v in logps.items()}
    out = {"posterior": {}, "log_likelihood": {}, "sample_stats": {}, DIAGNOSTICS: {}}
    for n, v in drawn.values.items():
        ev = [f"{n}_dim_{i}" for i in range(v.dim() - 1 - len(s.plates[n]))]
        out["posterior"][n] = (_numpy(v), ["draw", *s.plates[n], *ev])
    for n in s.data:
        out["log_likelihood"][n] = (_numpy(logps[n]), ["draw", *s.plates[n]])
    lp = sum(t.reshape(draws, -1).sum(1) for t in logps.values())
    per_chain = {"log_evidence": post.log_evidence, "weight_ess": weight_ess(post, "global").ess,
                 "log_weight_ess_all": weight_ess(post, "all").log_ess}
    ss, diag = out["sample_stats"], out[DIAGNOSTICS]
    ss["lp"] = (_numpy(lp), ["draw"])
    ss["log_weight"] = (_numpy(torch.cat(logw)), ["draw"])
    for n, v in per_chain.items():  # constant within a chain; (chain, draw) keeps ArviZ's sample_stats layout
        ss[n] = (np.full(draws, _numpy(v)), ["draw"])
        diag[n] = (_numpy(v), [])
    for n, e in marginal_ess(post).items():
        diag[f"marginal_ess_{n}"] = (_numpy(e), list(s.plates[n]))
    return out


def _seed(seed: int, *path: int) -> int:
    """A 63-bit seed derived from ``seed`` and a path (independent streams per chain and use)."""
    return int(np.random.SeedSequence([int(seed), *path]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def to_inference_data(
    posteriors: Union[Posterior, Sequence[Posterior]],
    estimator,
    draws: int = 1000,
    seed: int = 0,
    coords: Optional[dict] = None,
    batch_size: Optional[int] = None,
    container: str = "auto",
):
    """An ArviZ container of posterior draws, log-likelihoods, ESS and data (see the module docstring).

    Args:
        posteriors: One :class:`~tmcgraph.infer.posterior.Posterior` (one chain) or a
            sequence of them with the same latents and shapes (one chain each, e.g. from
            independent particle seeds: see :func:`from_estimator`).
        estimator: The estimator the posteriors came from (its model is evaluated at
            the draws for ``log_likelihood`` and ``lp``).
        draws: Draws per chain.
        seed: Seed of the draws (chain ``c`` uses a stream derived from ``(seed, c)``).
        coords: Plate name -> labels of its elements (default ``0..size-1``).
        batch_size: Draws per batched backward-sampling pass and model evaluation.
        container: ``"auto"`` (``arviz.InferenceData`` with arviz < 1.0, an
            ``xarray.DataTree`` with arviz >= 1.0), ``"inference_data"`` or ``"datatree"``.

    Returns:
        The ``arviz.InferenceData`` (or ``xarray.DataTree``).

    Raises:
        ImportError: arviz (or xarray) is not installed.
        TMCGraphError: bad arguments, or chains that disagree in latents or shapes.
    """
    if container not in CONTAINERS:
        raise TMCGraphError(f"container must be one of {CONTAINERS}, got {container!r}")
    if isinstance(draws, bool) or int(draws) != draws or draws < 1:
        raise TMCGraphError(f"draws must be a positive integer, got {draws!r}")
    draws = int(draws)
    posts = [posteriors] if isinstance(posteriors, Posterior) else list(posteriors)
    if not posts or not all(isinstance(p, Posterior) for p in posts):
        raise TMCGraphError("to_inference_data needs a Posterior or a non-empty sequence of Posteriors")
    xr = _require("xarray")
    az = None if container == "datatree" else _require("arviz")
    if container == "auto":
        container = "datatree" if _arviz_major(az) >= 1 else "inference_data"
    ref = posts[0].samples
    taken = [p for p in ref.plate_sizes if p in ("chain", "draw")]
    if taken:
        raise TMCGraphError(f"plate name(s) {taken} collide with ArviZ's (chain, draw) dims; rename the plate(s)")
    for c, p in enumerate(posts[1:], 1):
        got = {n: tuple(v.shape[1:]) for n, v in p.samples.values.items()}
        want = {n: tuple(v.shape[1:]) for n, v in ref.values.items()}
        if got != want or p.samples.plate_sizes != ref.plate_sizes:
            raise TMCGraphError(f"chain {c} has latents/shapes {got} (plates {p.samples.plate_sizes}); chain 0 has "
                                f"{want} (plates {ref.plate_sizes})")
    chains = [_chain_group(estimator, p, draws, _seed(seed, c, 1), batch_size) for c, p in enumerate(posts)]
    pc = _plate_coords(ref.plate_sizes, coords)
    base = {"chain": np.arange(len(posts)), "draw": np.arange(draws)}
    datasets = {}
    for group in ("posterior", "log_likelihood", "sample_stats", DIAGNOSTICS):
        variables = {}
        for n, (_, dims) in chains[0][group].items():
            arr = np.stack([ch[group][n][0] for ch in chains], 0)
            variables[n] = (["chain", *dims], arr)
        used = {d for _, (dims, _) in variables.items() for d in dims}
        cs = {**{k: v for k, v in base.items() if k in used}, **{p: pc[p] for p in pc if p in used}}
        for n, (dims, arr) in variables.items():  # event dims: integer coords
            for d, size in zip(dims, arr.shape):
                if d not in cs:
                    cs[d] = np.arange(size)
        datasets[group] = xr.Dataset({n: (dims, arr) for n, (dims, arr) in variables.items()}, coords=cs)
    obs = {}
    for n, x in ref.data.items():
        arr = _numpy(x)
        plates = list(ref.plates[n])
        dims = plates + [f"{n}_dim_{i}" for i in range(arr.ndim - len(plates))]
        obs[n] = (dims, arr)
    ocs = {}
    for dims, arr in obs.values():
        for d, size in zip(dims, arr.shape):
            ocs.setdefault(d, pc[d] if d in pc else np.arange(size))
    datasets["observed_data"] = xr.Dataset(obs, coords=ocs)
    attrs = {"inference_library": "tmcgraph", "inference_library_version": _version(),
             "estimator": repr(estimator), "tmc_chains": "one particle set (Posterior) per chain"}
    for ds in datasets.values():
        ds.attrs.update(attrs)
    if container == "datatree":
        return xr.DataTree.from_dict({f"/{g}": ds for g, ds in datasets.items()})
    return az.InferenceData(**datasets)


def from_estimator(
    estimator,
    data: dict,
    chains: int = 4,
    draws: int = 1000,
    seed: int = 0,
    coords: Optional[dict] = None,
    batch_size: Optional[int] = None,
    container: str = "auto",
):
    """Export ``chains`` independent TMC posteriors (fresh particles per chain) of ``estimator`` at ``data``.

    Chain ``c`` draws its particles with a seed derived from ``(seed, c)``, then
    ``draws`` joint posterior draws from its own ``pi``. Because the chains' particles
    are independent, ArviZ's between-chain diagnostics (R-hat, bulk/tail ESS) measure
    how much the particle sets disagree.

    Args:
        estimator: A :class:`tmcgraph.TMC` (or ``IWAE``) estimator.
        data: Observed name -> tensor.
        chains: Number of independent particle sets.
        draws, seed, coords, batch_size, container: As for :func:`to_inference_data`.

    Returns:
        The ``arviz.InferenceData`` (or ``xarray.DataTree``).
    """
    if isinstance(chains, bool) or int(chains) != chains or chains < 1:
        raise TMCGraphError(f"chains must be a positive integer, got {chains!r}")
    posts = [posterior(estimator, data, seed=_seed(seed, c, 0)) for c in range(int(chains))]
    return to_inference_data(posts, estimator, draws, seed, coords, batch_size, container)

