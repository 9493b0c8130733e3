r"""Markov chains of log-matrices: products by a parallel (associative) scan, and marginals.

A Markov plate of length ``T`` contributes, per step ``t = 1 .. T-1``, a transition
log-matrix ``M_t[i, j] = log w_t(z_{t-1} = i, z_t = j)`` of shape ``K_{t-1} x K_t``
(the state count may change with ``t``), possibly batched over leading dims. Its value
is the log of the product ``exp(M_1) exp(M_2) ... exp(M_{T-1})`` in the log semiring
``(logsumexp, +)``:

.. math::

    P[i, k] = \log \sum_{z_1, \dots, z_{T-2}} \exp\Big(M_1[i, z_1] + \sum_{t=2}^{T-2}
    M_t[z_{t-1}, z_t] + M_{T-1}[z_{T-2}, k]\Big).

Algorithms (``n = T - 1`` matrices of size ``K x K``, batch size ``B``):

* :func:`log_chain` multiplies adjacent pairs in one batched :func:`~tmcgraph.ops.backends.log.logmatmul`
  per level, halving the chain each level (an odd last matrix is carried to the next
  level unchanged). The log semiring's matrix product is associative, so this is the
  up-sweep of a parallel scan (Blelloch 1990): ``ceil(log2 n)`` levels, ``n - 1``
  products in all, ``O(B n K^3)`` work and ``O(log n)`` depth (sequential batched calls).
  With per-step state counts the products of a level are grouped by shape, one call per
  distinct pair of shapes (a chain alternating between two sizes still takes one or two
  calls per level; ``n`` distinct sizes take up to ``n / 2`` calls in the first level),
  plus a copy of each level's operands into the group's stacked batch.
* :func:`log_chain_vector` contracts an initial log-vector (and optionally a final one)
  with the chain, either by the scan (``O(B n K^3)`` work, ``O(log n)`` depth) or by the
  forward recursion ``v_t = \log \sum_i \exp(v_{t-1}[i] + M_t[i, :])`` (``O(B n K^2)``
  work, ``O(n)`` depth). The scan does ``K`` times more arithmetic but issues
  ``O(log n)`` instead of ``n`` kernel calls: it wins where per-call overhead dominates,
  the recursion where arithmetic does. Measured on one CPU thread
  (``benchmarks/perf_scan.py``) both are bound by elementwise passes over ``K x K``
  tiles (shifts, ``exp``) rather than by the scan's ``K^3`` matrix products, and the
  recursion pays about 20-30 us per step: the crossover sits near ``B K^2 = 2000``
  (``K = 10``: between ``B = 16`` and ``32``; ``B = 1``: near ``K = 45``), see
  :data:`AUTO_SCAN_ELEMENTS`.
* :func:`log_chain_marginals` gives every step's state marginal under
  ``pi(z) \propto \exp(init[z_0] + \sum_t M_t[z_{t-1}, z_t])`` by differentiating
  ``\log Z`` w.r.t. zero log-weights ``u_t[z_t]`` added at each step (as
  :mod:`tmcgraph.ops.adjoint` does for plans): ``\partial \log Z / \partial u_t[k] =
  pi(z_t = k)``. The backward pass through the scan is the semiring's suffix sweep, so
  this is forward-backward (Särkkä & García-Fernández 2021 use the same associative
  structure for parallel smoothing); cost is about twice the forward contraction.
* :func:`naive_log_chain` is the definition: the sequential loop with ``torch.logsumexp``
  over a broadcast ``K x K x K`` (or ``K x K``) tensor per step. It is the oracle the
  fast paths are tested against, with brute-force enumeration of every index path.

Numerics. Every product is a :func:`~tmcgraph.ops.backends.log.logmatmul` (or its exact
``lse_add`` route for vectors), which never turns a finite value into ``-inf`` or NaN, in
float32 or float64, with factors spanning +-1000 nats; a chain inherits this product by
product. Entries whose true value is ``-inf`` stay ``-inf`` with zero (never NaN)
gradients. All functions are differentiable with autograd (not twice).

References:
    G. E. Blelloch, "Prefix sums and their applications", Technical Report
    CMU-CS-90-190, Carnegie Mellon University, 1990.

    S. Särkkä and Á. F. García-Fernández, "Temporal parallelization of Bayesian
    smoothers", IEEE Transactions on Automatic Control 66(1):299-306, 2021.

Example:
    >>> import torch
    >>> from tmcgraph.ops.scan import log_chain, log_chain_vector, naive_log_chain
    >>> M = torch.log(torch.tensor([[0.5, 0.5], [0.25, 0.75]])).expand(5, 2, 2)
    >>> torch.allclose(log_chain(M), naive_log_chain(M))
    True
    >>> round(log_chain_vector(torch.zeros(2), M, torch.zeros(2)).exp().item(), 4)  # rows sum to 1
    2.0
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch

from ..errors import TMCGraphError
from .backends.log import logmatmul, logsumexp, lse_add

__all__ = [
    "AUTO_SCAN_ELEMENTS",
    "log_chain",
    "log_chain_vector",
    "log_chain_marginals",
    "sample_log_chain",
    "naive_log_chain",
    "choose_method",
]

#: ``method="auto"`` takes the scan when ``B * K^2`` (batch size times the square of the
#: largest state count: the entries of one step's transition tiles) is at most this, else
#: the sequential recursion. Calibrated on one CPU thread by ``benchmarks/perf_scan.py``
#: (scan 4-10x faster at ``B K^2 = 100``, 2-12x slower at ``B K^2 >= 6400``).
AUTO_SCAN_ELEMENTS = 2**11

Mats = Union[torch.Tensor, Sequence[torch.Tensor]]
_METHODS = ("scan", "sequential", "auto")


# --------------------------------------------------------------------------- validation


def _as_chain(mats: Mats, name: str = "mats"):
    """``("stacked", tensor [..., n, K, K'])`` or ``("list", [tensors [..., K_{t-1}, K_t]])``, checked."""
    if isinstance(mats, torch.Tensor):
        if mats.dim() < 3:
            raise TMCGraphError(f"{name}: a stacked chain needs shape [..., T, K, K], got {tuple(mats.shape)}")
        if not mats.is_floating_point():
            raise TMCGraphError(f"{name}: log-matrices must be floating point, got {mats.dtype}")
        if mats.shape[-3] > 1 and mats.shape[-1] != mats.shape[-2]:
            raise TMCGraphError(f"{name}: a stacked chain of {mats.shape[-3]} matrices needs square matrices "
                                f"[..., T, K, K], got {tuple(mats.shape)}; pass a list for per-step sizes")
        return "stacked", mats
    try:
        mats = list(mats)
    except TypeError:
        raise TMCGraphError(f"{name}: expected a tensor [..., T, K, K] or a list of tensors [..., K_prev, K_next], "
                            f"got {type(mats).__name__}") from None
    if not mats:
        raise TMCGraphError(f"{name}: an empty list has no state count; pass a stacked tensor [..., 0, K, K] "
                            "for a chain without transitions")
    for t, m in enumerate(mats):
        if not isinstance(m, torch.Tensor) or m.dim() < 2:
            shape = tuple(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__
            raise TMCGraphError(f"{name}[{t}]: expected a tensor [..., K_prev, K_next], got {shape}")
        if not m.is_floating_point():
            raise TMCGraphError(f"{name}[{t}]: log-matrices must be floating point, got {m.dtype}")
        if m.dtype != mats[0].dtype or m.device != mats[0].device:
            raise TMCGraphError(f"{name}[{t}]: dtype/device {m.dtype}/{m.device} differs from {name}[0]'s "
                                f"{mats[0].dtype}/{mats[0].device}")
        if t and m.shape[-2] != mats[t - 1].shape[-1]:
            raise TMCGraphError(f"{name}[{t}] has {m.shape[-2]} rows but {name}[{t - 1}] has "
                                f"{mats[t - 1].shape[-1]} columns (shapes {tuple(mats[t - 1].shape)} and "
                                f"{tuple(m.shape)}): the state counts of consecutive steps must agree")
    _batch_shape([m.shape[:-2] for m in mats], name)
    return "list", mats


def _batch_shape(shapes, name) -> torch.Size:
    try:
        return torch.broadcast_shapes(*shapes)
    except RuntimeError:
        raise TMCGraphError(f"{name}: batch shapes {[tuple(s) for s in shapes]} do not broadcast") from None


def _chain_info(kind, mats):
    """``(batch shape, K_first, K_last, number of matrices, largest K)``."""
    if kind == "stacked":
        return mats.shape[:-3], mats.shape[-2], mats.shape[-1], mats.shape[-3], max(mats.shape[-2:])
    ks = [mats[0].shape[-2]] + [m.shape[-1] for m in mats]
    return _batch_shape([m.shape[:-2] for m in mats], "mats"), ks[0], ks[-1], len(mats), max(ks)


def _check_vector(v, name, k, what):
    if not isinstance(v, torch.Tensor) or v.dim() < 1:
        raise TMCGraphError(f"{name}: expected a log-vector tensor [..., K], got "
                            f"{tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__}")
    if not v.is_floating_point():
        raise TMCGraphError(f"{name}: a log-vector must be floating point, got {v.dtype}")
    if v.shape[-1] != k:
        raise TMCGraphError(f"{name} has {v.shape[-1]} states (shape {tuple(v.shape)}) but {what} has {k}")


# --------------------------------------------------------------------------- the scan


def _log_eye(k, batch, like):
    eye = torch.full((k, k), -math.inf, dtype=like.dtype, device=like.device)
    eye.fill_diagonal_(0.0)
    return eye.expand(*batch, k, k)


def _scan_stacked(x: torch.Tensor) -> torch.Tensor:
    """Product of ``x [..., n, K, K]`` (``n >= 1``) by pairwise levels."""
    while x.shape[-3] > 1:
        n = x.shape[-3]
        m = n // 2
        y = logmatmul(x[..., 0:2 * m:2, :, :], x[..., 1:2 * m:2, :, :])
        x = torch.cat([y, x[..., n - 1:, :, :]], dim=-3) if n % 2 else y
    return x[..., 0, :, :]


def _scan_list(mats: list, batch) -> torch.Tensor:
    """Product of matrices with per-step sizes: each level's pairs grouped by shape, one call per group."""
    mats = [m.expand(*batch, *m.shape[-2:]) for m in mats]
    nb = len(batch)
    while len(mats) > 1:
        pairs = [(mats[i], mats[i + 1]) for i in range(0, len(mats) - 1, 2)]
        groups = {}
        for j, (a, b) in enumerate(pairs):
            groups.setdefault((tuple(a.shape[-2:]), b.shape[-1]), []).append(j)
        out = [None] * len(pairs)
        for idx in groups.values():
            if len(idx) == 1:
                out[idx[0]] = logmatmul(*pairs[idx[0]])
                continue
            a = torch.stack([pairs[j][0] for j in idx], nb)
            b = torch.stack([pairs[j][1] for j in idx], nb)
            for j, r in zip(idx, logmatmul(a, b).unbind(nb)):
                out[j] = r
        if len(mats) % 2:
            out.append(mats[-1])
        mats = out
    return mats[0]


def log_chain(mats: Mats) -> torch.Tensor:
    r"""Log-space product of a chain of log-matrices by a parallel scan.

    Computes ``P = log(exp(M_1) exp(M_2) ... exp(M_n))``, i.e.
    ``P[i, k] = log sum over paths i = z_0, z_1, ..., z_n = k of exp(sum_t M_t[z_{t-1}, z_t])``,
    combining adjacent pairs level by level: ``ceil(log2 n)`` levels of one batched
    :func:`~tmcgraph.ops.backends.log.logmatmul` each (odd lengths carry their last
    matrix), ``n - 1`` products, ``O(B n K^3)`` work, ``O(log n)`` depth and
    ``O(B n K^2)`` memory (each level's results; kept for the backward pass).

    Args:
        mats: A stacked tensor ``[..., n, K, K]`` (``n = 0`` gives the log identity:
            ``0`` on the diagonal, ``-inf`` elsewhere; ``n = 1`` may be rectangular), or a
            list of ``n >= 1`` tensors ``[..., K_{t-1}, K_t]`` with per-step sizes and
            broadcastable batch shapes. A list is grouped by shape per level: one batched
            call per distinct ``(K_{t-1}, K_t, K_{t+1})`` of the pairs of a level, after
            copying the group's operands into one stacked batch; a list of equal shapes
            is stacked once and takes the stacked path.

    Returns:
        ``[..., K_first, K_last]`` (batch dims broadcast).

    Raises:
        TMCGraphError: not a tensor or list of tensors, non-floating dtype, consecutive
            state counts that disagree, or batch shapes that do not broadcast.
    """
    kind, mats = _as_chain(mats)
    if kind == "list":
        if all(m.shape == mats[0].shape for m in mats):
            return _scan_stacked(torch.stack(mats, -3))
        return _scan_list(mats, _chain_info(kind, mats)[0])
    if mats.shape[-3] == 0:
        return _log_eye(mats.shape[-1], mats.shape[:-3], mats)
    return _scan_stacked(mats)


# --------------------------------------------------------------------------- vector chains


def choose_method(batch_size: int, max_states: int, n_mats: int) -> str:
    """What ``method="auto"`` picks: ``"scan"`` if ``B * K^2 <= AUTO_SCAN_ELEMENTS`` (or ``n <= 1``), else sequential.

    Args:
        batch_size: Number of chains ``B`` (product of the batch dims).
        max_states: Largest state count ``K`` along the chain.
        n_mats: Number of matrices ``n``.
    """
    if n_mats <= 1:
        return "scan"
    return "scan" if batch_size * max_states**2 <= AUTO_SCAN_ELEMENTS else "sequential"


def _chain_inputs(init, mats, final, method):
    """Checked ``(kind, mats, batch shape, K_first, K_last, n, largest K)`` of a chain with end vectors."""
    if method not in _METHODS:
        raise TMCGraphError(f"method must be one of {_METHODS}, got {method!r}")
    kind, mats = _as_chain(mats)
    batch, k0, kl, n, kmax = _chain_info(kind, mats)
    _check_vector(init, "init", k0, "the first matrix's rows")
    if final is not None:
        _check_vector(final, "final", kl, "the last matrix's columns")
    shapes = [batch, init.shape[:-1]] + ([] if final is None else [final.shape[:-1]])
    return kind, mats, _batch_shape(shapes, "init, mats and final"), k0, kl, n, kmax


def _vecmat(v: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``log(exp(v) @ exp(m))`` for ``v [..., I]``, ``m [..., I, J]``: the exact broadcast logsumexp.

    This is :func:`~tmcgraph.ops.backends.log.logmatmul`'s route for a one-row operand,
    called directly with ``m`` expanded (a view) to the common batch shape, since
    :func:`~tmcgraph.ops.backends.log.lse_add` counts the reduced dim from its first
    operand's rank.
    """
    batch = torch.broadcast_shapes(v.shape[:-1], m.shape[:-2])
    if m.shape[:-2] != batch:
        m = m.expand(*batch, *m.shape[-2:])
    return lse_add(m, v.unsqueeze(-1), -2).squeeze(-2)


def _dot(v: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``log sum_i exp(v_i + w_i)`` over the last dim, broadcast."""
    return logsumexp(v + w, -1)


def log_chain_vector(init: torch.Tensor, mats: Mats, final: Optional[torch.Tensor] = None,
                     method: str = "auto") -> torch.Tensor:
    r"""Log of ``init^T M_1 ... M_n`` (times ``final``) in the log semiring.

    ``v[k] = log sum_{z_0, ..., z_{n-1}} exp(init[z_0] + sum_t M_t[z_{t-1}, z_t])`` with
    ``z_n = k``; with ``final``, the scalar ``log sum_k exp(v[k] + final[k])``. For a
    Markov chain with ``init = log p(z_0)`` and ``M_t = log p(z_t | z_{t-1}) + log p(x_t | z_t)``
    (emissions folded in) this is the forward algorithm's ``log p(x_{1:n}, z_n)``.

    Args:
        init: Initial log-vector ``[..., K_first]``.
        mats: The chain, as for :func:`log_chain` (a stacked tensor, possibly with
            ``n = 0``, or a list with per-step sizes).
        final: Optional final log-vector ``[..., K_last]`` (``zeros`` sums over the last
            state).
        method: ``"scan"``: :func:`log_chain` then one vector-matrix product,
            ``O(B n K^3)`` work in ``O(log n)`` depth; ``"sequential"``: the forward
            recursion ``v_t = log sum_i exp(v_{t-1}[i] + M_t[i, :])``, ``O(B n K^2)``
            work in ``O(n)`` depth; ``"auto"``: :func:`choose_method` (the scan iff
            ``B * K^2 <= AUTO_SCAN_ELEMENTS``, with ``B`` the broadcast batch size and
            ``K`` the largest state count).

    Returns:
        ``[..., K_last]`` without ``final``, ``[...]`` with it (batch dims broadcast).

    Raises:
        TMCGraphError: bad chain (see :func:`log_chain`), vectors whose state counts
            do not match the chain's ends, or an unknown ``method``.
    """
    kind, mats, batch, _, _, n, kmax = _chain_inputs(init, mats, final, method)
    if method == "auto":
        method = choose_method(math.prod(batch), kmax, n)
    if n == 0:
        v = init
    elif method == "scan":
        v = _vecmat(init, log_chain(mats))
    else:
        steps = mats.unbind(-3) if kind == "stacked" else mats
        v = init
        for m in steps:
            v = _vecmat(v, m)
    return v if final is None else _dot(v, final)


def log_chain_marginals(init: torch.Tensor, mats: Mats, final: Optional[torch.Tensor] = None,
                        method: str = "auto", return_log_z: bool = False):
    r"""Per-step state marginals of the chain's distribution, by differentiating ``log Z``.

    The chain defines ``pi(z_0, ..., z_n) ∝ exp(init[z_0] + sum_t M_t[z_{t-1}, z_t] +
    final[z_n])``. With a zero log-weight ``u_t[k]`` added to the weights of ``z_t = k``
    (to ``init`` for ``t = 0``, to column ``k`` of ``M_t`` otherwise),
    ``d log Z / d u_t[k] = pi(z_t = k)``: one contraction
    (:func:`log_chain_vector`) and one backward pass give every marginal. The backward
    pass of the sequential recursion is the classical backward (beta) sweep, that of the
    scan its parallel down-sweep; either costs about as much as the forward.

    Args:
        init: Initial log-vector ``[..., K_0]``.
        mats: The chain ``[..., n, K, K]`` or a list with per-step sizes (as for
            :func:`log_chain`).
        final: Optional final log-vector ``[..., K_n]`` (default zeros).
        method: As for :func:`log_chain_vector`.
        return_log_z: Also return ``log Z`` (``[...]``, detached).

    Returns:
        ``[..., T, K]`` with ``T = n + 1`` steps (a list of ``T`` tensors ``[..., K_t]``
        if the state counts differ), each summing to one over ``K``, detached; with
        ``return_log_z``, ``(marginals, log_z)``.

    Raises:
        TMCGraphError: bad input (see :func:`log_chain_vector`), or a chain whose total
            weight is zero or not finite (``log Z`` not finite) for some batch element,
            so that its distribution is undefined.
    """
    kind, mats, batch, k0, kl, n, _ = _chain_inputs(init, mats, final, method)
    init = init.detach()
    final = None if final is None else final.detach()
    opts = dict(dtype=init.dtype, device=init.device)
    with torch.enable_grad():
        if kind == "stacked":
            K = mats.shape[-1] if n else k0
            u = torch.zeros(*batch, n + 1, K, **opts, requires_grad=True)
            leaves = [u]
            chain = mats.detach() + u[..., 1:, None, :]
            start = init + u[..., 0, :]
        else:
            ks = [k0] + [m.shape[-1] for m in mats]
            leaves = [torch.zeros(*batch, k, **opts, requires_grad=True) for k in ks]
            chain = [m.detach() + w.unsqueeze(-2) for m, w in zip(mats, leaves[1:])]
            start = init + leaves[0]
        last = torch.zeros(kl, **opts) if final is None else final
        log_z = log_chain_vector(start, chain, last, method=method)
        bad = ~torch.isfinite(log_z.detach())
        if bool(bad.any()):
            where = bad.nonzero()[0].tolist()
            raise TMCGraphError(
                f"the chain's total weight is zero or not finite (log Z = {float(log_z.detach()[bad][0])} at batch "
                f"index {where}): no path carries weight, so its marginals are undefined")
        grads = torch.autograd.grad(log_z.sum(), leaves)
    if kind == "stacked":
        marg = grads[0].clamp_min(0.0)
    elif len({g.shape for g in grads}) == 1:
        marg = torch.stack(grads, -2).clamp_min(0.0)
    else:
        marg = [g.clamp_min(0.0) for g in grads]
    return (marg, log_z.detach()) if return_log_z else marg


def sample_log_chain(mats: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    r"""Exact draws of index paths of a stacked chain with a free first index: forward filtering, backward sampling.

    The chain ``mats`` ``[..., n, K, K]`` defines ``pi(z_0, ..., z_n) ∝ exp(sum_{t=1}^n
    M_t[z_{t-1}, z_t])`` (``z_0`` free, uniform before weighting: the Markov plates'
    extra first index of :class:`tmcgraph.ops.factor.FactorGraph`). Forward filtering
    computes ``alpha_t[j] = log sum_i exp(alpha_{t-1}[i] + M_t[i, j])`` with
    ``alpha_0 = 0``; then ``z_n ~ softmax(alpha_n)`` and, backwards,
    ``z_{t-1} ~ softmax(alpha_{t-1} + M_t[:, z_t])``. By the chain rule the path is an
    exact draw from ``pi``. ``O(n)`` sequential batched steps.

    Args:
        mats: ``[..., n, K, K]`` log-matrices (``n >= 1``), detached here.
        generator: Random generator (``None``: torch's global one).

    Returns:
        LongTensor ``[..., n + 1]``: ``z_0, ..., z_n`` per batch element.

    Raises:
        TMCGraphError: a chain with zero or non-finite total weight somewhere.
    """
    mats = mats.detach()
    if mats.dim() < 3 or mats.shape[-3] < 1 or mats.shape[-1] != mats.shape[-2]:
        raise TMCGraphError(f"sample_log_chain needs [..., n >= 1, K, K], got {tuple(mats.shape)}")
    n, K = mats.shape[-3], mats.shape[-1]
    batch = mats.shape[:-3]
    alphas = [mats.new_zeros(*batch, K)]
    for t in range(n):
        alphas.append(_vecmat(alphas[-1], mats[..., t, :, :]))
    last = alphas[-1]
    total = torch.logsumexp(last, -1)
    if not bool(torch.isfinite(total).all()):
        raise TMCGraphError("the chain's total weight is zero or not finite for some batch element: "
                            "no path carries weight, so it cannot be sampled")

    def draw(logits):
        probs = torch.softmax(logits.reshape(-1, K), -1)
        return torch.multinomial(probs, 1, generator=generator).reshape(batch)

    z = [draw(last)]
    for t in range(n - 1, -1, -1):
        col = mats[..., t, :, :].gather(-1, z[-1][..., None, None].expand(*batch, K, 1)).squeeze(-1)
        z.append(draw(alphas[t] + col))
    return torch.stack(z[::-1], -1)


# --------------------------------------------------------------------------- oracle


def naive_log_chain(mats: Mats, init: Optional[torch.Tensor] = None,
                    final: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The definition: the sequential loop of ``torch.logsumexp`` over broadcast sums.

    ``P_1 = M_1``, ``P_t[i, k] = torch.logsumexp(P_{t-1}[i, :, None] + M_t[None, :, :], 1)``
    (with ``init``, the vector recursion instead; with ``final``, one more logsumexp).
    ``O(B n K^3)`` work and memory per step, no shifts beyond torch's own, no batching
    across steps; an oracle for tests (its gradients are NaN where a ``torch.logsumexp``
    has only ``-inf`` terms).

    Args:
        mats: As for :func:`log_chain`.
        init: Optional initial log-vector ``[..., K_first]``.
        final: Optional final log-vector ``[..., K_last]``.

    Returns:
        ``[..., K_first, K_last]``, ``[..., K_last]`` with ``init``, ``[..., K_first]``
        with ``final`` only, ``[...]`` with both.
    """
    kind, mats = _as_chain(mats)
    steps = list(mats.unbind(-3)) if kind == "stacked" else list(mats)
    if init is None:
        if not steps:
            return _log_eye(mats.shape[-1], mats.shape[:-3], mats)
        p = steps[0]
        for m in steps[1:]:
            p = torch.logsumexp(p.unsqueeze(-1) + m.unsqueeze(-3), dim=-2)
        return p if final is None else torch.logsumexp(p + final.unsqueeze(-2), dim=-1)
    v = init
    for m in steps:
        v = torch.logsumexp(v.unsqueeze(-1) + m, dim=-2)
    return v if final is None else torch.logsumexp(v + final, dim=-1)
