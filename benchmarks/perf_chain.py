"""Speed of one TMC estimate on the paper's Gaussian chain: tmcgraph vs hand-written torch vs Pyro.

Model z_0 = 0, z_i | z_{i-1} ~ N(z_{i-1}, 1/n), x | z_n ~ N(z_n, 1) (one observation at
the end), factorised proposal q(z_i) = N(0, i/n) (:func:`tmcgraph.toys.gaussian_chain`).
Contenders (same process, alternating, same seed per repetition, so all draw the same
particles; the values are checked to agree):

* ``tmcgraph``: ``TMC(model, proposal, K).log_evidence``;
* ``hand``: the shortest correct torch code: a forward pass of vector-matrix
  ``logsumexp`` products along the chain;
* ``pyro``: ``pyro.infer.TraceTMC_ELBO`` with ``num_samples=K, expand=False`` (skipped
  when not installed; sizes it cannot run are reported with its error).

    python benchmarks/perf_chain.py            # n in {10, 20, 100}, K in {10, 100, 1000}
    python benchmarks/perf_chain.py --quick
"""

from __future__ import annotations

import math
import sys

import torch
from _common import (
    base_parser,
    pyplot,
    save_figure,
    save_results,
    set_threads,
)
from perf_toy import compare, pyro_or_none, pyro_tmc_loss, ratio
from torch.distributions import Normal

import tmcgraph as tg
from tmcgraph.models.toys import gaussian_chain, gaussian_chain_log_evidence
from tmcgraph.ops.backends.log import fallback_count

__all__ = ["main"]


def tmc_chain(n: int, K: int):
    m, q = gaussian_chain(n, "factorised")
    est = tg.TMC(m, q, K=K)
    return lambda x: est.log_evidence({"x": x})


def hand_chain(n: int, K: int):
    sd = math.sqrt(1.0 / n)

    def f(x):
        lk = math.log(K)
        qs = [Normal(0.0, math.sqrt(i / n)) for i in range(1, n + 1)]
        zs = [qd.rsample((K,)) for qd in qs]
        v = Normal(0.0, sd).log_prob(zs[0]) - qs[0].log_prob(zs[0]) - lk
        for i in range(1, n):
            f_i = Normal(zs[i - 1], sd).log_prob(zs[i][:, None]) - (qs[i].log_prob(zs[i]) + lk)[:, None]
            v = torch.logsumexp(f_i + v, 1)
        return torch.logsumexp(v + Normal(zs[-1], 1.0).log_prob(x), 0)

    return f


def pyro_chain(n: int, K: int, pyro_mods):
    pyro, pdist = pyro_mods[:2]
    sd = math.sqrt(1.0 / n)

    def model(x):
        z = torch.zeros(())
        for i in range(1, n + 1):
            z = pyro.sample(f"z{i}", pdist.Normal(z, sd))
        pyro.sample("x", pdist.Normal(z, 1.0), obs=x)

    def guide(x):
        for i in range(1, n + 1):
            pyro.sample(f"z{i}", pdist.Normal(0.0, math.sqrt(i / n)))

    return pyro_tmc_loss(pyro_mods, model, guide, K, max_plate_nesting=0)


def main(argv=None) -> dict:
    ap = base_parser(__doc__, seeds=7)
    ap.add_argument("--no-pyro", action="store_true", help="skip the Pyro column")
    args = ap.parse_args(argv)
    threads = set_threads(args.threads, args.allocator)
    reps = args.seeds or (3 if args.quick else args.default_seeds)
    grid = [(n, K) for n in (3, 5) for K in (4, 8)] if args.quick else [
        (n, K) for n in (10, 20, 100) for K in (10, 100, 1000)]
    pm = None if args.no_pyro else pyro_or_none()
    x = torch.tensor(0.5)
    rows = []
    for n, K in grid:
        fns = {"tmcgraph": tmc_chain(n, K), "hand": hand_chain(n, K)}
        if pm is not None:
            fns["pyro"] = pyro_chain(n, K, pm)
        fallback_count(reset=True)
        res = compare({k: (lambda f=f: f(x)) for k, f in fns.items()}, reps)
        fb = fallback_count(reset=True)
        vals = {k: r["values"] for k, r in res.items() if "values" in r}
        agree = max(abs(a - b) for v in vals.values() for a, b in zip(v, vals["tmcgraph"]))
        row = {"n": n, "K": K, "results": res, "tmcgraph_over_hand": ratio(res, "tmcgraph", "hand"),
               "pyro_over_tmcgraph": ratio(res, "pyro", "tmcgraph"), "max_abs_value_difference": agree,
               "exact_log_evidence": float(gaussian_chain_log_evidence(0.5)), "underflow_recomputations": fb}
        rows.append(row)
        print(f"n={n:4d} K={K:5d} " + "  ".join(
            f"{k}={r['median_s'] * 1e3:.1f}ms" if "median_s" in r else f"{k}: {r['error'][:60]}"
            for k, r in res.items())
            + f"  tmcgraph/hand={row['tmcgraph_over_hand']:.2f}"
            + (f"  pyro/tmcgraph={row['pyro_over_tmcgraph']:.2f}" if row["pyro_over_tmcgraph"] else "")
            + f"  |value diff|={agree:.2g}  recomputations={fb['calls'] + fb['f64_calls']}")
        if agree > 1e-3:
            raise RuntimeError(f"contenders disagree on the same particles: {vals}")
    return save_results(args, "perf_chain", argv, threads, _plot, repetitions=reps, pyro=pm is not None, rows=rows)


def _plot(rows, path):
    plt = pyplot()
    ns = sorted({r["n"] for r in rows})
    fig, axes = plt.subplots(1, len(ns), figsize=(4 * len(ns), 3.3), sharey=True, squeeze=False)
    for ax, n in zip(axes[0], ns):
        sub = [r for r in rows if r["n"] == n]
        for name, style in (("tmcgraph", "o-"), ("hand", "s--"), ("pyro", "^:")):
            pts = [(r["K"], r["results"][name]["median_s"]) for r in sub
                   if name in r["results"] and "median_s" in r["results"][name]]
            if pts:
                ax.plot(*zip(*pts), style, label=name)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("K")
        ax.set_title(f"chain n={n}")
    axes[0][0].set_ylabel("median s per estimate")
    axes[0][0].legend()
    save_figure(fig, path)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
