"""Log-space sum-product backend for opt_einsum.

A tensor ``A`` holds ``log a``. ``einsum``/``tensordot`` here compute the log of the
ordinary (sum-product) einsum of ``exp(A)``, ``exp(B)``:

    log sum_j exp(A_ij + B_jk)

This module is an opt_einsum backend: pass ``backend="tmcgraph.ops.backends.log"`` to an
``opt_einsum.contract_expression`` and each pairwise step lands here.
:func:`compile_pair` turns one pairwise contraction into a reusable callable with all
index bookkeeping done once (used by :mod:`tmcgraph.ops.contract`).

Every pairwise contraction ``C[b, i, k] = log sum_j exp(A[b, i, j] + B[b, j, k])`` (``b``
batch, ``i`` left, ``j`` contracted, ``k`` right indices) takes one of three routes:

* no contracted index: an exact broadcast addition;
* one side has no free index (``i`` or ``k`` empty, e.g. the vector-matrix products of
  chains and the per-plate-element sums of plated models): an exact broadcast
  logsumexp, ``log sum_j exp(A + B - M) + M`` with ``M = max_j (A + B)``, done in the
  layout of the larger operand (no transposed copy of it);
* otherwise a batched matrix product in exp space with shifts (the paper's
  ``logmmexp``, section 7.4), see :func:`logmatmul`.

Numerics of :func:`logmatmul`. Any ``g_j`` leaves the result unchanged:
``A_ij + B_jk = (A_ij - g_j) + (B_jk + g_j)``. With ``g_j = max_i A_ij`` (when
``I <= K``; otherwise ``g_j = -max_k B_jk``) the rows of ``A - g`` and columns of
``B + g`` are shifted by their maxima ``alpha_i``, ``beta_k`` so every exponentiated
entry is at most 1 and the shifted sum ``R_ik = sum_j exp(A_ij - g_j - alpha_i)
exp(B_jk + g_j - beta_k)`` cannot overflow. For ``I = 1`` this shift is exact
(``alpha + beta = max_j(A_j + B_jk)``), and in general it is far tighter than shifting
``A`` and ``B`` independently (which loses every entry whose best ``j`` differs for the
two operands). ``R`` can still underflow when the largest term ``exp(max_j(A_ij + B_jk)
- alpha_i - beta_k)`` is tiny. Every entry with ``R_ik <= 4 J tiny / eps`` is flagged:
above that bound the terms lost to underflow or flushed subnormals sum to less than
``eps / 4`` of ``R_ik``, so unflagged entries carry full relative precision. Flagged
entries are recomputed, first (if many, in float32) with the same product in float64,
then any still flagged entry exactly with a broadcast logsumexp over ``j`` (in chunks).
So no finite value comes back as ``-inf``; entries whose true value is ``-inf`` stay
``-inf`` and get zero (never NaN) gradients. :func:`fallback_count` reports how often
each recomputation ran.
"""

from __future__ import annotations

import functools
import math

import torch

__all__ = [
    "einsum",
    "tensordot",
    "transpose",
    "logsumexp",
    "logmatmul",
    "lse_add",
    "compile_pair",
    "safe_log",
    "fallback_count",
]

# Counts of recomputed entries (diagnostics / benchmarks): "calls"/"entries" for the exact
# per-entry fallback, "f64_calls"/"f64_entries" for the float64 retry of a product.
_FALLBACK = {"entries": 0, "calls": 0, "f64_calls": 0, "f64_entries": 0}
# Upper bound on elements materialised at once by the exact per-entry fallback.
_FALLBACK_CHUNK = 1 << 22


def fallback_count(reset: bool = False) -> dict:
    """Number of calls and entries that took the float64 retry or the exact fallback."""
    out = dict(_FALLBACK)
    if reset:
        for k in _FALLBACK:
            _FALLBACK[k] = 0
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


class _LseAdd(torch.autograd.Function):
    """``log sum_{dims} exp(x + y)`` (y broadcast to x), keepdim; one temporary of x's size."""

    @staticmethod
    def forward(ctx, x, y, dims):
        out, e, s = _lse_add_forward(x, y, dims)
        ctx.save_for_backward(e, s)
        ctx.shapes = (x.shape, y.shape)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        e, s = ctx.saved_tensors
        w = (g / s).masked_fill_(s == 0, 0.0)
        ge = e * w
        gx = gy = None
        if ctx.needs_input_grad[0]:
            gx = ge.sum_to_size(ctx.shapes[0])
        if ctx.needs_input_grad[1]:
            gy = ge.sum_to_size(ctx.shapes[1])
        return gx, gy, None


def lse_add(x: torch.Tensor, y: torch.Tensor, dims) -> torch.Tensor:
    """Exact ``log sum_{dims} exp(x + y)`` with broadcasting, keepdim; ``-inf`` rows give ``-inf``.

    The shift ``max_{dims}(x + y)`` is exact, so nothing underflows. ``y`` must
    broadcast to ``x``'s shape (``x`` is the larger operand). Gradients of all
    ``-inf`` outputs are zero. Not twice differentiable.
    """
    dims = tuple(d % x.dim() for d in ((dims,) if isinstance(dims, int) else dims))
    if torch.is_grad_enabled() and (x.requires_grad or y.requires_grad):
        return _LseAdd.apply(x, y, dims)
    return _lse_add_forward(x, y, dims)[0]


def _lse_add_forward(x, y, dims):
    e = x + y
    # All -inf rows get the finite shift finfo.min: exp gives 0, log(0) + shift = -inf.
    m = e.amax(dim=dims, keepdim=True).clamp_min_(torch.finfo(e.dtype).min)
    e.sub_(m).exp_()
    s = e.sum(dim=dims, keepdim=True)
    return s.log().add_(m), e, s


def _threshold(dtype: torch.dtype, n_terms: int) -> float:
    """Below this the shifted sum of ``n_terms`` products may have lost relative precision."""
    info = torch.finfo(dtype)
    return 4.0 * max(n_terms, 1) * info.tiny / info.eps


def _exp_operands(ad: torch.Tensor, bd: torch.Tensor):
    """Gauge-shifted ``exp`` of both operands (no autograd): ``Ea, Eb, alpha, beta``."""
    if ad.shape[-2] <= bd.shape[-1]:
        g = _finite_shift(ad.amax(dim=-2, keepdim=True))  # [..., 1, J]
        ta = ad - g
        tb = bd + g.transpose(-1, -2)
    else:
        g = _finite_shift(bd.amax(dim=-1, keepdim=True))  # [..., J, 1]
        ta = ad + g.transpose(-1, -2)
        tb = bd - g
    alpha = _finite_shift(ta.amax(dim=-1, keepdim=True))
    beta = _finite_shift(tb.amax(dim=-2, keepdim=True))
    return ta.sub_(alpha).exp_(), tb.sub_(beta).exp_(), alpha, beta


class _ShiftedMatmul(torch.autograd.Function):
    """``log(exp(a) @ exp(b))`` in exp space with gauge shifts; ``-inf`` where the sum underflowed.

    Returns the values and the mask of entries at or below the precision threshold
    (those get ``-inf`` and zero gradient here; the caller recomputes them).
    """

    @staticmethod
    def forward(ctx, a, b):
        Ea, Eb, r, bad, out = _shifted_product(a, b)
        ctx.save_for_backward(Ea, Eb, r, bad)
        ctx.shapes = (a.shape, b.shape)
        ctx.mark_non_differentiable(bad)
        return out, bad

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g, _gbad):
        Ea, Eb, r, bad = ctx.saved_tensors
        gr = (g / r.clamp_min(torch.finfo(r.dtype).tiny)).masked_fill_(bad, 0.0)
        ga = gb = None
        if ctx.needs_input_grad[0]:
            ga = (torch.matmul(gr, Eb.transpose(-1, -2)) * Ea).sum_to_size(ctx.shapes[0])
        if ctx.needs_input_grad[1]:
            gb = (torch.matmul(Ea.transpose(-1, -2), gr) * Eb).sum_to_size(ctx.shapes[1])
        return ga, gb


def _shifted_matmul(a, b):
    if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):
        return _ShiftedMatmul.apply(a, b)
    with torch.no_grad():
        _, _, _, bad, out = _shifted_product(a, b)
        return out, bad


def _shifted_product(a, b):
    """``Ea, Eb, R, bad, out``: the gauge-shifted product and its log (``-inf`` where flagged)."""
    Ea, Eb, alpha, beta = _exp_operands(a, b)
    r = torch.matmul(Ea, Eb)
    thr = _threshold(r.dtype, a.shape[-1])
    bad = r <= thr
    out = r.clamp_min(thr).log_().masked_fill_(bad, -math.inf)
    out += alpha
    out += beta
    return Ea, Eb, r, bad, out


def logmatmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``log(exp(a) @ exp(b))`` for ``a: [..., I, J]``, ``b: [..., J, K]``, exact to rounding.

    See the module docstring for the shifts and the underflow recomputation.
    """
    n_i, J, K = a.shape[-2], a.shape[-1], b.shape[-1]
    if J == 1:
        return a + b
    if K == 1:
        return lse_add(a, b.transpose(-1, -2), -1)
    if n_i == 1:
        return lse_add(b, a.transpose(-1, -2), -2)
    out, bad = _shifted_matmul(a, b)
    if not bool(bad.any()):
        return out
    n_bad = int(bad.sum())
    batch = out[..., 0, 0].numel()
    if a.dtype in (torch.float16, torch.bfloat16, torch.float32) and n_bad * J > batch * (n_i + K) * J:
        # Many flagged entries: redo the product in float64 (range ~ 700 nats).
        _FALLBACK["f64_calls"] += 1
        _FALLBACK["f64_entries"] += n_bad
        out64, bad64 = _shifted_matmul(a.double(), b.double())
        out = torch.where(bad, out64.to(out.dtype), out)
        bad = bad & bad64
        if not bool(bad.any()):
            return out
    return _fallback(out, bad, a, b)


def _fallback(out, bad, a, b):
    """Recompute entries flagged in ``bad`` as an exact broadcast logsumexp."""
    batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2], out.shape[:-2])
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
    bflat = torch.zeros(idx.shape[0], dtype=torch.long, device=idx.device)
    for d in range(nb):
        bflat = bflat * batch[d] + idx[:, d]
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


class _PairOp:
    """A compiled pairwise log-space contraction ``x[tx], y[ty] -> out`` (see :func:`compile_pair`)."""

    def __init__(self, tx: str, ty: str, out: str):
        self.tx, self.ty, self.out = tx, ty, out
        # Indices in one operand only and not in the output are summed out first.
        kx = "".join(c for c in tx if c in out or c in ty)
        ky = "".join(c for c in ty if c in out or c in tx)
        self.pre_x = None if kx == tx else (kx, [i for i, c in enumerate(tx) if c not in kx])
        self.pre_y = None if ky == ty else (ky, [i for i, c in enumerate(ty) if c not in ky])
        self.kx, self.ky = kx, ky
        self.batch = [c for c in kx if c in ky and c in out]
        self.contract = [c for c in kx if c in ky and c not in out]
        self.left = [c for c in kx if c not in ky]
        self.right = [c for c in ky if c not in kx]
        if not self.contract:
            self.kind = "add"
        elif not self.right or not self.left:
            self.kind = "lse"
            # The operand whose indices contain the other's is the base layout.
            self.swap = not self.left and bool(self.right)
            big, small = (ky, kx) if self.swap else (kx, ky)
            self.small_perm = [small.index(c) for c in big if c in small]
            self.small_identity = self.small_perm == list(range(len(small)))
            self.small_view = [c in small for c in big]
            self.red = [i for i, c in enumerate(big) if c in self.contract]
            rem = [c for c in big if c not in self.contract]
            self.out_perm = None if "".join(rem) == out else [rem.index(c) for c in out]
        else:
            self.kind = "mm"
            full = self.batch + self.left + self.right
            self.px = [kx.index(c) for c in self.batch + self.left + self.contract]
            self.py = [ky.index(c) for c in self.batch + self.contract + self.right]
            self.out_perm = None if "".join(full) == out else [full.index(c) for c in out]
            self.full = full

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.pre_x is not None:
            x = logsumexp(x, self.pre_x[1])
        if self.pre_y is not None:
            y = logsumexp(y, self.pre_y[1])
        kx, ky = self.kx, self.ky
        size = {c: n for c, n in zip(kx, x.shape)}
        for c, n in zip(ky, y.shape):
            size[c] = max(size.get(c, 1), n)
        if self.kind == "add":
            return _outer(x, kx, y, ky, self.out, self.batch, self.left, self.right, size)
        if self.kind == "lse":
            big, small, bt = (y, x, ky) if self.swap else (x, y, kx)
            big = big.expand([size[c] for c in bt])
            if not self.small_identity:
                small = small.permute(self.small_perm)
            it = iter(small.shape)
            small = small.reshape([next(it) if keep else 1 for keep in self.small_view])
            r = lse_add(big, small, self.red)
            r = r.reshape([size[c] for c in bt if c not in self.contract])
            return r if self.out_perm is None else r.permute(self.out_perm)
        x = x.expand([size[c] for c in kx])
        y = y.expand([size[c] for c in ky])
        bshape = [size[c] for c in self.batch]
        lshape = [size[c] for c in self.left]
        rshape = [size[c] for c in self.right]
        C = math.prod(size[c] for c in self.contract)
        xb = x.permute(self.px).reshape(*bshape, math.prod(lshape), C)
        yb = y.permute(self.py).reshape(*bshape, C, math.prod(rshape))
        res = logmatmul(xb, yb).reshape(bshape + lshape + rshape)
        return res if self.out_perm is None else res.permute(self.out_perm)


def _outer(x, tx, y, ty, out, batch, left, right, size):
    """Outer (or Hadamard) product: an exact broadcast addition."""
    x = x.expand([size[c] if c in ty else -1 for c in tx])
    y = y.expand([size[c] if c in tx else -1 for c in ty])
    nb = len(batch)
    full = batch + left + right
    xs = x.permute([tx.index(c) for c in batch + left])
    xs = xs.reshape(xs.shape + (1,) * len(right))
    ys = y.permute([ty.index(c) for c in batch + right])
    ys = ys.reshape(ys.shape[:nb] + (1,) * len(left) + ys.shape[nb:])
    r = xs + ys
    perm = [full.index(c) for c in out]
    return r if perm == list(range(len(perm))) else r.permute(perm)


@functools.lru_cache(maxsize=4096)
def compile_pair(tx: str, ty: str, out: str) -> _PairOp:
    """A reusable callable ``(x, y) -> log-space contraction of x[tx], y[ty] into out``.

    Index strings use one character per index (no repeats within a term); indices of
    ``out`` must appear in ``tx`` or ``ty``; every other index is summed.
    """
    for term in (tx, ty, out):
        if len(set(term)) != len(term):
            raise ValueError(f"repeated index in einsum term {term!r}")
    missing = [c for c in out if c not in tx and c not in ty]
    if missing:
        raise ValueError(f"output index {missing} not in operands {tx!r}, {ty!r}")
    return _PairOp(tx, ty, out)


def _pair(x: torch.Tensor, tx: str, y: torch.Tensor, ty: str, out: str) -> torch.Tensor:
    return compile_pair(tx, ty, out)(x, y)


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
