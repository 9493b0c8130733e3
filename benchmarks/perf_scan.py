"""Speed of Markov-chain contractions: the parallel scan vs the sequential recursion vs a hand-written
forward algorithm (tmcgraph.ops.scan).

Workload: B independent HMM-like chains of T steps with K states, as one stacked tensor of
transition log-matrices ``M [B, T-1, K, K]`` (``M_t[i, j] = log A[i, j] + e_t[j]``: sticky
log-transition matrix plus random emission terms, float32) and an initial log-vector
``init [B, K]``. Every contender computes ``sum_b log(init_b^T exp(M_1) ... exp(M_{T-1}) 1)``:

* ``scan``: ``log_chain_vector(init, M, zeros, method="scan")``: ``ceil(log2(T-1))`` levels of
  one batched log-space matrix product each, ``O(B T K^3)`` work;
* ``sequential``: ``method="sequential"``: the forward recursion through
  ``logmatmul``'s exact vector route, ``T-1`` calls of ``O(B K^2)`` work;
* ``hand``: the textbook log-space forward algorithm,
  ``alpha = torch.logsumexp(alpha[:, :, None] + M[:, t], 1)`` per step.

``forward`` runs under ``torch.no_grad()``; ``forward+backward`` builds the graph and
back-propagates to ``M`` and ``init`` (the gradient of log Z: the edge marginals).
Every value is checked against the float64 sequential oracle
(:func:`tmcgraph.ops.scan.naive_log_chain`). Each row also records what
``method="auto"`` picks (:func:`tmcgraph.ops.scan.choose_method`) and which of scan and
sequential was faster.

Timing (``_common.compare``): one thread, contenders interleaved, CPU-time medians over
repetitions after two warm-ups; ratios are medians of paired per-repetition ratios.
Limit (``_common.measure_limits``): ``(T-1) B K^2`` exps (one per transition entry, as in
``perf_hmm``) at the measured ``torch.exp`` rate. Points with ``B T K^2`` above
``--max-elements`` are skipped (memory: the inputs, their gradients and the scan's saved
levels each hold about that many floats).

    python benchmarks/perf_scan.py            # K in {10, 100}, T in {100, 1000}, B in {1, 64}
    python benchmarks/perf_scan.py --quick    # K = 3, T in {5, 9}, B in {1, 2}
"""

from __future__ import annotations

import sys

import torch
from _common import (
    base_parser,
    best_limits,
    compare,
    keeps_process_state,
    limit_fields,
    measure_limits,
    parse_list,
    plot_contenders,
    print_row,
    ratios,
    save_partial,
    save_results,
    set_threads,
)

from tmcgraph.ops.scan import AUTO_SCAN_ELEMENTS, choose_method, log_chain_vector, naive_log_chain

__all__ = ["main", "chain_inputs", "hand_forward", "contenders"]

PAIRS = (("scan", "sequential"), ("scan", "hand"), ("sequential", "hand"))
EXP_RULE = "(T-1)*B*K*K: one exp per transition entry (both modes)"


def chain_inputs(B: int, T: int, K: int, seed: int = 0) -> tuple:
    """``(init [B, K], M [B, T-1, K, K])`` float32: sticky log-transitions plus random emissions."""
    g = torch.Generator().manual_seed(seed)
    log_a = torch.log_softmax(torch.randn(K, K, generator=g) + 2.0 * torch.eye(K), -1)
    em = torch.randn(B, T, K, generator=g) * 2.0
    init = torch.log_softmax(torch.zeros(K), -1) + em[:, 0]
    mats = log_a + em[:, 1:, None, :]
    return init.contiguous(), mats.contiguous()


def hand_forward(init: torch.Tensor, mats: torch.Tensor) -> torch.Tensor:
    """The log-space forward algorithm: one ``torch.logsumexp`` over a ``B x K x K`` grid per step.

    The steps are taken with ``unbind`` (one backward node for all of them): indexing
    ``mats[:, t]`` per step would make the backward pass write a full-size zero gradient
    per step, ``O(T^2 B K^2)``.
    """
    alpha = init
    for m in mats.unbind(1):
        alpha = torch.logsumexp(alpha[:, :, None] + m, 1)
    return torch.logsumexp(alpha, -1).sum()


def contenders(init: torch.Tensor, mats: torch.Tensor) -> dict:
    """Name -> ``f(init, mats)`` returning the summed log Z (a scalar tensor)."""
    zeros = torch.zeros(mats.shape[-1], dtype=mats.dtype)
    return {
        "scan": lambda i, m: log_chain_vector(i, m, zeros, method="scan").sum(),
        "sequential": lambda i, m: log_chain_vector(i, m, zeros, method="sequential").sum(),
        "hand": hand_forward,
    }


def _row(K, T, B, mode, reps, limits, max_elements):
    base = {"K": K, "T": T, "B": B, "mode": mode, "auto_choice": choose_method(B, K, T - 1)}
    if B * T * K * K > max_elements:
        why = f"B*T*K^2 = {B * T * K * K:.3g} > --max-elements {max_elements:.3g} (memory)"
        return {**base, "results": {k: {"skipped": why} for k in ("scan", "sequential", "hand")}, "ratios": {}}
    init, mats = chain_inputs(B, T, K)
    with torch.no_grad():
        exact = float(naive_log_chain(mats.double(), init.double(), torch.zeros(K, dtype=torch.float64)).sum())
    backward = mode != "forward"
    if backward:
        init.requires_grad_()
        mats.requires_grad_()
    fns = {}
    for name, f in contenders(init, mats).items():
        if backward:
            fns[name] = lambda f=f: f(init, mats)
        else:
            def fwd(f=f):
                with torch.no_grad():
                    return f(init, mats)
            fns[name] = fwd
    res = compare(fns, reps, backward, [init, mats] if backward else [])
    tol = 1e-4 * max(1.0, abs(exact)) + 1e-3
    worst = 0.0
    for name, r in res.items():
        for v in r.get("values", []):
            err = abs(v - exact)
            worst = max(worst, err)
            if err > tol:
                raise RuntimeError(f"{name} at K={K} T={T} B={B} {mode}: value {v:.8g} is {err:.3g} from the "
                                   f"float64 oracle {exact:.8g} (tolerance {tol:.3g})")
    timed = {k: r["median_s"] for k, r in res.items() if k in ("scan", "sequential") and "median_s" in r}
    return {**base, "results": res, "ratios": ratios(res, PAIRS), "exact_log_z": exact,
            "max_abs_value_difference": worst, "faster_of_scan_and_sequential": min(timed, key=timed.get),
            "limit": limit_fields(res, limits, exps=(T - 1) * B * K * K)}


@keeps_process_state
def main(argv=None) -> dict:
    ap = base_parser(__doc__, seeds=7)
    ap.add_argument("--K", default=None, help="state counts, comma-separated (default 10,100; quick 3)")
    ap.add_argument("--T", default=None, help="chain lengths (default 100,1000; quick 5,9)")
    ap.add_argument("--B", default=None, help="batch sizes (default 1,64; quick 1,2)")
    ap.add_argument("--max-elements", type=float, default=2.0**28,
                    help="skip points with B*T*K^2 above this (default 2^28: about 1 GiB per float32 copy)")
    args = ap.parse_args(argv)
    for flag in ("K", "T", "B"):
        vals = parse_list(getattr(args, flag))
        if vals is not None and (not vals or min(vals) < 1 or (flag == "T" and min(vals) < 2)):
            low = 2 if flag == "T" else 1
            ap.error(f"--{flag}: expected integers >= {low}, got {getattr(args, flag)!r}")
    threads = set_threads(args.threads, args.allocator)
    reps = args.seeds or (3 if args.quick else args.default_seeds)
    Ks = parse_list(args.K) or ([3] if args.quick else [10, 100])
    Ts = parse_list(args.T) or ([5, 9] if args.quick else [100, 1000])
    Bs = parse_list(args.B) or ([1, 2] if args.quick else [1, 64])
    limits0 = measure_limits("cpu", args.quick)
    rows = []
    for K in Ks:
        for T in Ts:
            for B in Bs:
                for mode in ("forward", "forward+backward"):
                    row = _row(K, T, B, mode, reps, limits0, args.max_elements)
                    rows.append(row)
                    print_row(f"K={K} T={T} B={B} {mode} (auto: {row['auto_choice']})", row)
                    save_partial(args, "perf_scan", argv, threads, repetitions=reps, limits=limits0, rows=rows)
    limits = best_limits(limits0, measure_limits("cpu", args.quick))
    for row in rows:
        if "limit" in row:
            row["limit"] = limit_fields(row["results"], limits, exps=row["limit"]["exp_count"])
    ran = [r for r in rows if "faster_of_scan_and_sequential" in r]
    agree = sum(r["auto_choice"] == r["faster_of_scan_and_sequential"] for r in ran)
    return save_results(args, "perf_scan", argv, threads, _plot, quick=args.quick, repetitions=reps, limits=limits,
                        exp_counting_rule=EXP_RULE, auto_scan_elements=AUTO_SCAN_ELEMENTS,
                        auto_rule="scan iff B*K^2 <= auto_scan_elements", auto_matches_faster=f"{agree}/{len(ran)}",
                        max_elements=args.max_elements, rows=rows)


def _plot(rows, path):
    def label(r):
        return f"K={r['K']} T={r['T']}\nB={r['B']} {'fwd' if r['mode'] == 'forward' else 'f+b'}"

    plot_contenders(rows, path, label,
                    "Markov chain log Z: parallel scan vs sequential recursion vs hand-written forward "
                    "(CPU, 1 thread, median)")


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
