"""Speed of one TMC estimate on the paper's Gaussian chain with the mixture proposal: tmcgraph (eager,
compiled) vs hand-written torch (eager, compiled) vs Pyro.

Model z_1 ~ N(0, 1/n), z_i | z_{i-1} ~ N(z_{i-1}, 1/n), x | z_n ~ N(z_n, 1) (one observation
at the end); proposal: the prior transition with the mixture coupling
(``gaussian_chain(n, proposal="prior", coupling="mixture")``): particle k of z_i picks a
parent particle j_k uniformly and draws z_i^k ~ N(z_{i-1}^{j_k}, 1/n); its density is the
mixture (1/K) sum_j N(z_i^k; z_{i-1}^j, 1/n). Contenders (one process, interleaved, same seed
per repetition, two warm-up repetitions):

* ``tmcgraph``: ``TMC(model, proposal, K, compile=False).log_evidence``;
* ``tmcgraph-compiled``: the same with ``compile=True`` (skipped, with the reason, when the
  estimator has no such option);
* ``hand``: the shortest correct torch code (:func:`hand_chain_mixture`): per link, the
  K x K grid of transition log-densities, its row ``logsumexp`` (the mixture density) and a
  vector-matrix ``logsumexp`` product along the chain;
* ``hand-compiled``: ``torch.compile(hand, dynamic=False)`` (the n-link loop is unrolled,
  so compilation takes minutes at n = 200; ``--max-compile-n`` skips it above a length);
* ``pyro``: ``pyro.infer.TraceTMC_ELBO`` (``num_samples=K, expand=False``), whose guide is
  the same prior with Pyro's own mixture sampling (``tmc="mixture"``).

``tmcgraph``, its compiled form and the hand-written code draw the same particles (same
calls on torch's global stream), so their values are checked to agree on every repetition;
Pyro samples differently (K x K candidates, then ancestors), so its median estimate is
checked against the exact log p(x) = log N(x; 0, 2) instead.

Timing (``_common.compare``): CPU time per call (wall time recorded too; on CUDA,
synchronised wall time), medians and medians of per-repetition paired ratios. The chain
has no parameters, so the timed call is the forward estimate; ``--backward`` adds
"forward+backward", the gradient with respect to the observation x.

The limit (``_common.measure_limits``, same run): counting rule, one ``exp`` per entry of
each link's K x K grid, (n - 1) K^2 in all: the mixture density's row sums and the
message's vector-matrix product can share one exponentiated grid (exp(g - c) times a
vector of ones and times exp(msg)), and nothing less than one exp per entry can sum it;
the O(n K) rest is not counted. ideal = (n - 1) K^2 / (exp/s).

    python benchmarks/perf_chain.py            # n in {50, 200} x K in {100, 1000}
    python benchmarks/perf_chain.py --quick    # n = 5, K = 10
"""

from __future__ import annotations

import math
import sys

import torch
from _common import (
    add_compile_arg,
    add_device_arg,
    base_parser,
    best_limits,
    check_values,
    compare,
    compile_backend,
    compile_hand,
    compile_info,
    keeps_process_state,
    limit_fields,
    measure_limits,
    no_distribution_validation,
    parse_list,
    plot_contenders,
    print_row,
    ratios,
    resolve_device,
    save_partial,
    save_results,
    set_threads,
    tmcgraph_compiled_skip,
    tmcgraph_estimator,
)
from perf_toy import pyro_or_none, pyro_tmc_loss, ratio_pairs
from torch.distributions import Normal

import tmcgraph as tg
from tmcgraph.models.toys import gaussian_chain, gaussian_chain_log_evidence
from tmcgraph.ops.backends.log import fallback_count

__all__ = ["main", "tmc_chain", "hand_chain", "hand_chain_mixture", "hand_chain_streaming", "pyro_chain",
           "chain_exps"]

EXP_RULE = "(n-1)*K*K: one exp per entry of each link's K x K grid (mixture density and message share it)"


def chain_exps(n: int, K: int) -> int:
    """Inherent exps of one chain estimate: one per entry of each of the n - 1 link grids."""
    return (n - 1) * K * K


def tmc_chain(n: int, K: int, device="cpu", compiled: bool = False, proposal: str = "factorised"):
    """tmcgraph's estimate ``f(x)`` (``f.est`` is the estimator); ``proposal="prior"`` is the mixture chain."""
    m, q = gaussian_chain(n, proposal, "mixture")
    est = tmcgraph_estimator(tg.TMC, m, q, K, device=device, compiled=compiled)
    f = lambda x: est.log_evidence({"x": x})  # noqa: E731
    f.est = est
    return f


def hand_chain(n: int, K: int, device="cpu"):
    """Hand-written TMC for the chain with the *factorised* proposal q(z_i) = N(0, i/n) (``perf_allocator``)."""
    sd = math.sqrt(1.0 / n)
    zero = torch.zeros((), device=device)

    def f(x):
        lk = math.log(K)
        qs = [Normal(zero, math.sqrt(i / n)) for i in range(1, n + 1)]
        zs = [qd.rsample((K,)) for qd in qs]
        v = Normal(zero, sd).log_prob(zs[0]) - qs[0].log_prob(zs[0]) - lk
        for i in range(1, n):
            f_i = Normal(zs[i - 1], sd).log_prob(zs[i][:, None]) - (qs[i].log_prob(zs[i]) + lk)[:, None]
            v = torch.logsumexp(f_i + v, 1)
        return torch.logsumexp(v + Normal(zs[-1], 1.0).log_prob(x), 0)

    return f


def hand_chain_mixture(n: int, K: int, device="cpu"):
    """Hand-written TMC for the chain with the prior proposal and the mixture coupling.

    Draws exactly as tmcgraph does (z_1: K draws from the prior; z_i: ``randint`` parent
    indices, then one draw per particle from the gathered transition), so with the same
    seed it returns tmcgraph's value. z_1's weight P/Q is 1 (its proposal is its prior).
    """
    sd = math.sqrt(1.0 / n)
    zero = torch.zeros((), device=device)

    def f(x):
        lk = math.log(K)
        z = Normal(zero, sd).rsample((K,))
        v = torch.full((K,), -lk, device=z.device)
        for _ in range(1, n):
            j = torch.randint(K, (K,), device=z.device)
            znew = Normal(z[j], sd).rsample()
            g = Normal(z, sd).log_prob(znew[:, None])  # [K_child, K_parent]
            lq = torch.logsumexp(g, 1) - lk  # mixture density of each child particle
            v = torch.logsumexp(g + v, 1) - lq - lk
            z = znew
        return torch.logsumexp(v + Normal(z, 1.0).log_prob(x), 0)

    return f


def hand_chain_streaming(n: int, K: int, device="cpu"):
    """The memory reference: :func:`hand_chain_mixture` under ``no_grad``, one K x K grid alive at a time.

    Same draws and value; the grid is updated in place and freed before the next link.
    """
    sd = math.sqrt(1.0 / n)
    zero = torch.zeros((), device=device)

    @torch.no_grad()
    def f(x):
        lk = math.log(K)
        z = Normal(zero, sd).rsample((K,))
        v = torch.full((K,), -lk, device=z.device)
        for _ in range(1, n):
            j = torch.randint(K, (K,), device=z.device)
            znew = Normal(z[j], sd).rsample()
            g = Normal(z, sd).log_prob(znew[:, None])
            lq = torch.logsumexp(g, 1)
            g += v
            v = torch.logsumexp(g, 1) - lq
            del g
            z = znew
        return torch.logsumexp(v + Normal(z, 1.0).log_prob(x), 0)

    return f


def pyro_chain(n: int, K: int, pyro_mods, device="cpu", proposal: str = "factorised"):
    """Pyro's TraceTMC_ELBO estimate; ``proposal="prior"``: the guide is the prior (Pyro's mixture sampling)."""
    pyro, pdist = pyro_mods[:2]
    sd = math.sqrt(1.0 / n)
    zero = torch.zeros((), device=device)

    def model(x):
        z = zero
        for i in range(1, n + 1):
            z = pyro.sample(f"z{i}", pdist.Normal(z, sd))
        pyro.sample("x", pdist.Normal(z, 1.0), obs=x)

    def guide(x):
        z = zero
        for i in range(1, n + 1):
            if proposal == "prior":
                z = pyro.sample(f"z{i}", pdist.Normal(z, sd))
            else:
                pyro.sample(f"z{i}", pdist.Normal(zero, math.sqrt(i / n)))

    return pyro_tmc_loss(pyro_mods, model, guide, K, max_plate_nesting=0)


@keeps_process_state
def main(argv=None) -> dict:
    ap = base_parser(__doc__, seeds=7)
    add_device_arg(ap)
    add_compile_arg(ap)
    ap.add_argument("--no-pyro", action="store_true", help="skip the Pyro column")
    ap.add_argument("--pyro-reps", type=int, default=None,
                    help="Pyro takes part in the first N measured repetitions only (default: all; it is slow)")
    ap.add_argument("--n", default=None, help="comma-separated chain lengths (default 50,200; quick 5)")
    ap.add_argument("--K", default=None, help="comma-separated particle counts (default 100,1000; quick 10)")
    ap.add_argument("--max-compile-n", type=int, default=None,
                    help="skip hand-compiled for chains longer than this (the loop is unrolled: compile time)")
    ap.add_argument("--backward", action="store_true", help="also time forward+backward (gradient w.r.t. x)")
    args = ap.parse_args(argv)
    dev = resolve_device(args.device)
    threads = {**set_threads(args.threads, args.allocator), **no_distribution_validation()}
    reps = args.seeds or (3 if args.quick else args.default_seeds)
    ns = parse_list(args.n) or ([5] if args.quick else [50, 200])
    Ks = parse_list(args.K) or ([10] if args.quick else [100, 1000])
    backend = compile_backend(args)
    pm = None if args.no_pyro else pyro_or_none()
    limits0 = measure_limits(dev, args.quick)
    skip_tg = tmcgraph_compiled_skip(args)
    exact = float(gaussian_chain_log_evidence(0.5))
    rows = []
    for n in ns:
        for K in Ks:
            fns = {"tmcgraph": tmc_chain(n, K, dev, proposal="prior")}
            skipped = {}
            if skip_tg:
                skipped["tmcgraph-compiled"] = skip_tg
            else:
                fns["tmcgraph-compiled"] = tmc_chain(n, K, dev, compiled=True, proposal="prior")
            fns["hand"] = hand_chain_mixture(n, K, dev)
            if args.no_compile:
                skipped["hand-compiled"] = "--no-compile"
            elif args.max_compile_n is not None and n > args.max_compile_n:
                skipped["hand-compiled"] = f"n = {n} > --max-compile-n {args.max_compile_n} (compile time)"
            else:
                fns["hand-compiled"] = compile_hand(hand_chain_mixture(n, K, dev), backend)
            if pm is not None:
                fns["pyro"] = pyro_chain(n, K, pm, dev, proposal="prior")
            else:
                skipped["pyro"] = "--no-pyro" if args.no_pyro else "pyro-ppl not importable"
            for mode in ("forward", "forward+backward") if args.backward else ("forward",):
                backward = mode != "forward"
                x = torch.tensor(0.5, device=dev, requires_grad=backward)
                fallback_count(reset=True)
                res = compare({k: (lambda f=f: f(x)) for k, f in fns.items()}, reps, backward, [x], device=dev,
                              skipped=skipped, max_reps={"pyro": args.pyro_reps} if args.pyro_reps else None)
                fb = fallback_count(reset=True)
                checks = check_values(res, same=[k for k in ("tmcgraph-compiled", "hand", "hand-compiled") if k in res],
                                      exact=exact, near_exact=["pyro"], exact_tol=0.5)
                rs = ratios(res, ratio_pairs())
                row = {"workload": "chain", "n": n, "K": K, "mode": mode, "proposal": "prior, mixture coupling",
                       "results": res, "ratios": rs, "tmcgraph_over_hand": rs.get("tmcgraph/hand"),
                       "tmcgraph_over_hand_compiled": rs.get("tmcgraph/hand-compiled"),
                       "pyro_over_tmcgraph": rs.get("pyro/tmcgraph"), **checks, "exact_log_evidence": exact,
                       "underflow_recomputations": fb, "limit": limit_fields(res, limits0, exps=chain_exps(n, K)),
                       "tmcgraph_compiled_programs": compile_info(fns["tmcgraph-compiled"].est)
                       if "tmcgraph-compiled" in fns else None}
                rows.append(row)
                print_row(f"n={n:4d} K={K:5d} {mode}", row)
                save_partial(args, "perf_chain", argv, threads, repetitions=reps, device=str(dev), limits=limits0,
                             rows=rows)
    limits = best_limits(limits0, measure_limits(dev, args.quick))
    for row in rows:
        row["limit"] = limit_fields(row["results"], limits, exps=row["limit"]["exp_count"])
    return save_results(args, "perf_chain", argv, threads, _plot, repetitions=reps, device=str(dev),
                        compile_backend=backend, pyro=pm is not None, limits=limits, exp_counting_rule=EXP_RULE,
                        rows=rows)


def _plot(rows, path):
    plot_contenders(rows, path, lambda r: f"n={r['n']} K={r['K']}" + ("" if r["mode"] == "forward" else "\nfwd+bwd"),
                    "Gaussian chain, mixture proposal: one TMC estimate "
                    "(median; limit: (n-1) K^2 exps at measured exp/s)")


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
