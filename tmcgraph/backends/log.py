"""Log-space sum-product backend for opt_einsum.

A tensor ``A`` holds ``log a``. ``einsum``/``tensordot`` here compute the log of the
ordinary (sum-product) einsum of ``exp(A)``, ``exp(B)``:

    log sum_j exp(A_ij + B_jk)

This module is an opt_einsum backend: pass ``backend="tmcgraph.backends.log"`` to an
``opt_einsum.contract_expression`` and each pairwise step lands here.

Numerics. Pairwise contractions run as a batched matrix product in exp space with
per-operand shifts (the paper's ``logmmexp``, section 7.4): rows of ``A`` are shifted
by their maximum over the contracted index, columns of ``B`` likewise. When the two
maxima sit at different ``j`` the shifted product can underflow even though the true
value is finite (factors spanning ~100 nats in float32 suffice). Every output entry
whose shifted sum falls below a dtype-dependent threshold is therefore recomputed
exactly with a broadcast logsumexp over ``j`` (only for those entries), so no finite
value comes back as ``-inf`` and precision is that of the shifted sum elsewhere.
Entries whose true value is ``-inf`` stay ``-inf`` and get zero (never NaN) gradients.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "einsum",
    "tensordot",
    "transpose",
    "logsumexp",
    "logmatmul",
    "safe_log",
    "fallback_count",
]

# Counts output entries recomputed by the exact fallback (diagnostics / benchmarks).
_FALLBACK = {"entries": 0, "calls": 0}
# Upper bound on elements materialised at once by the exact fallback.
_FALLBACK_CHUNK = 1 << 24


def fallback_count(reset: bool = False) -> dict:
    """Number of calls and entries that took the exact underflow fallback."""
    out = dict(_FALLBACK)
    if reset:
        _FALLBACK["entries"] = 0
        _FALLBACK["calls"] = 0
    return out


def _finite_shift(m: torch.Tensor) -> torch.Tensor:
    """Replace non-finite shifts (rows that are all ``-inf``) by zero."""
    return torch.where(torch.isfinite(m), m, torch.zeros_like(m))


def safe_log(s: torch.Tensor, threshold: float = 0.0) -> torch.Tensor:
    """``log(s)`` that returns ``-inf`` (with zero gradient) where ``s <= threshold``."""
    ok = s > threshold
    return torch.where(ok, torch.log(torch.where(ok, s, torch.ones_like(s))), torch.full_like(s, -math.inf))


def logsumexp(x: torch.Tensor, dims) -> torch.Tensor:
    """Stable ``log(sum(exp(x)))`` over ``dims``; all ``-inf`` gives ``-inf`` and zero gradient."""
    if isinstance(dims, int):
        dims = (dims,)
    dims = tuple(dims)
    if not dims:
        return x
    m = _finite_shift(x.detach().amax(dim=dims, keepdim=True))
    s = torch.exp(x - m).sum(dim=dims, keepdim=True)
    return (safe_log(s) + m).squeeze(dims) if x.dim() else safe_log(s) + m


def _threshold(dtype: torch.dtype, n_terms: int) -> float:
    """Below this the shifted sum of ``n_terms`` products may have lost relative precision."""
    info = torch.finfo(dtype)
    return 4.0 * max(n_terms, 1) * info.tiny / info.eps


def logmatmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``log(exp(a) @ exp(b))`` for ``a: [..., I, J]``, ``b: [..., J, K]``, exact to rounding."""
    am = _finite_shift(a.detach().amax(dim=-1, keepdim=True))
    bm = _finite_shift(b.detach().amax(dim=-2, keepdim=True))
    r = torch.matmul(torch.exp(a - am), torch.exp(b - bm))
    thr = _threshold(r.dtype, a.shape[-1])
    out = safe_log(r, thr) + am + bm
    bad = r.detach() <= thr
    if bool(bad.any()):
        out = _fallback(out, bad, a, b)
    return out


def _fallback(out, bad, a, b):
    """Recompute entries flagged in ``bad`` as an exact broadcast logsumexp."""
    batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    a = a.expand(*batch, *a.shape[-2:])
    b = b.expand(*batch, *b.shape[-2:])
    out = out.expand(*batch, *out.shape[-2:])
    bad = bad.expand(*batch, *bad.shape[-2:])
    idx = bad.nonzero(as_tuple=False)
    _FALLBACK["calls"] += 1
    _FALLBACK["entries"] += idx.shape[0]
    J = max(a.shape[-1], 1)
    chunk = max(1, _FALLBACK_CHUNK // J)
    flat_a = a.reshape(-1, *a.shape[-2:])
    flat_b = b.reshape(-1, *b.shape[-2:])
    nb = len(batch)
    if nb:
        bflat = torch.zeros(idx.shape[0], dtype=torch.long, device=idx.device)
        for d in range(nb):
            bflat = bflat * batch[d] + idx[:, d]
    else:
        bflat = torch.zeros(idx.shape[0], dtype=torch.long, device=idx.device)
    ii, kk = idx[:, nb], idx[:, nb + 1]
    vals = []
    for s in range(0, idx.shape[0], chunk):
        sl = slice(s, s + chunk)
        terms = flat_a[bflat[sl], ii[sl], :] + flat_b[bflat[sl], :, kk[sl]]
        vals.append(logsumexp(terms, -1))
    vals = torch.cat(vals) if vals else out.new_zeros(0)
    flat_out = out.reshape(-1, *out.shape[-2:]).index_put((bflat, ii, kk), vals)
    return flat_out.reshape(*batch, *out.shape[-2:])


def _parse(equation: str):
    if "->" not in equation:
        raise ValueError(f"log backend needs an explicit output in einsum equation {equation!r}")
    lhs, out = equation.split("->")
    ins = lhs.split(",")
    for term in ins + [out]:
        if len(set(term)) != len(term):
            raise ValueError(f"repeated index in einsum term {term!r} of {equation!r} is not supported")
    return ins, out


def _reduce_single(x: torch.Tensor, term: str, out: str) -> torch.Tensor:
    drop = [i for i, c in enumerate(term) if c not in out]
    x = logsumexp(x, drop) if drop else x
    kept = "".join(c for c in term if c in out)
    if kept != out:
        missing = [c for c in out if c not in kept]
        if missing:
            raise ValueError(f"output index {missing} not in operand {term!r}")
        x = x.permute([kept.index(c) for c in out])
    return x


def _pair(x: torch.Tensor, tx: str, y: torch.Tensor, ty: str, out: str) -> torch.Tensor:
    # Sum out indices that appear in one operand only and not in the output.
    keep_x = "".join(c for c in tx if c in out or c in ty)
    keep_y = "".join(c for c in ty if c in out or c in tx)
    x = _reduce_single(x, tx, keep_x)
    y = _reduce_single(y, ty, keep_y)
    tx, ty = keep_x, keep_y
    batch = [c for c in tx if c in ty and c in out]
    contract = [c for c in tx if c in ty and c not in out]
    left = [c for c in tx if c not in ty]
    right = [c for c in ty if c not in tx]
    size = {c: n for c, n in zip(tx, x.shape)}
    for c, n in zip(ty, y.shape):
        size[c] = max(size.get(c, 1), n)
    # Broadcast shared indices to their full size.
    x = x.expand([size[c] if c in ty else -1 for c in tx])
    y = y.expand([size[c] if c in tx else -1 for c in ty])
    nb = len(batch)
    full = batch + left + right
    if not contract:
        # Outer (or Hadamard) product: an exact broadcast addition.
        xs = x.permute([tx.index(c) for c in batch + left])
        xs = xs.reshape(xs.shape + (1,) * len(right))
        ys = y.permute([ty.index(c) for c in batch + right])
        ys = ys.reshape(ys.shape[:nb] + (1,) * len(left) + ys.shape[nb:])
        return (xs + ys).permute([full.index(c) for c in out])
    bshape = [size[c] for c in batch]
    lshape = [size[c] for c in left]
    rshape = [size[c] for c in right]
    C = math.prod(size[c] for c in contract)
    xb = x.permute([tx.index(c) for c in batch + left + contract]).reshape(*bshape, math.prod(lshape), C)
    yb = y.permute([ty.index(c) for c in batch + contract + right]).reshape(*bshape, C, math.prod(rshape))
    res = logmatmul(xb, yb).reshape(bshape + lshape + rshape)
    return res.permute([full.index(c) for c in out])


def einsum(equation: str, *operands: torch.Tensor, out=None, **kwargs) -> torch.Tensor:
    """Log-space ``einsum`` with an explicit output (``"ab,bc->ac"``)."""
    ins, o = _parse(equation)
    if len(ins) != len(operands):
        raise ValueError(f"einsum {equation!r} got {len(operands)} operands")
    if len(operands) == 1:
        res = _reduce_single(operands[0], ins[0], o)
    else:
        x, tx = operands[0], ins[0]
        for k in range(1, len(operands)):
            y, ty = operands[k], ins[k]
            rest = set("".join(ins[k + 1:])) | set(o)
            step_out = "".join(dict.fromkeys(c for c in tx + ty if c in rest))
            x, tx = _pair(x, tx, y, ty, step_out), step_out
        res = _reduce_single(x, tx, o)
    if out is not None:
        out.copy_(res)
        return out
    return res


_SYMBOLS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def tensordot(x: torch.Tensor, y: torch.Tensor, axes=2) -> torch.Tensor:
    """Log-space ``tensordot`` with numpy's ``axes`` convention."""
    if isinstance(axes, int):
        ax_x = list(range(x.dim() - axes, x.dim()))
        ax_y = list(range(axes))
    else:
        ax_x, ax_y = (list(a) for a in axes)
    if x.dim() + y.dim() - len(ax_x) > len(_SYMBOLS):
        raise ValueError("tensordot: too many dimensions for the log backend")
    tx = list(_SYMBOLS[: x.dim()])
    ty = list(_SYMBOLS[x.dim(): x.dim() + y.dim()])
    for i, j in zip(ax_x, ax_y):
        ty[j] = tx[i]
    tx, ty = "".join(tx), "".join(ty)
    o = "".join(c for c in tx if c not in ty) + "".join(c for c in ty if c not in tx)
    return _pair(x, tx, y, ty, o)


def transpose(x: torch.Tensor, axes) -> torch.Tensor:
    """Permute dimensions (same in every semiring)."""
    return x.permute(tuple(axes))
