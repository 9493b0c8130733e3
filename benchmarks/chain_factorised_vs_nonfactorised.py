"""The paper's Fig. 4: factorised vs non-factorised proposals on a tightly coupled chain.

Model (``tmcgraph.toys.gaussian_chain``): z_0 = 0, z_i | z_{i-1} ~ N(z_{i-1}, 1/N) for
i = 1..N, x | z_N ~ N(z_N, 1), with N = 100 and x = 1. Exactly, x ~ N(0, 2), so
log p(x) = log N(1; 0, 2) whatever N.

Contenders (TMC unless marked, all estimates side by side, interleaved by seed):
    factorised        Q(z_i) = N(0, i/N) (variance i/N, the prior marginal).
    prior, paired     Q(z_i | z_{i-1}) = the prior transition; particle k uses parent particle k.
    prior, mixture    the prior transition; each particle picks its parent particle uniformly
                      (independently), density (1/K) sum_j Q(z_i^k | z_{i-1}^j).
    prior, permutation
                      the prior transition; particle k uses parent particle sigma(k) for a
                      uniformly random permutation sigma (each parent particle used exactly
                      once); the same mixture density.
    SMC, prior        reference: a particle filter along the chain with the prior transition
                      (systematic resampling when the ESS falls below K/2).

K in {1, 3, 10, 30, 100, 300, 1000}, 20 seeds per point (the same seeds for every contender).
Each row records the mean, sd and standard error (``se`` = sd / sqrt(seeds)) of log P_hat.
Non-finite estimates raise.

    python benchmarks/chain_factorised_vs_nonfactorised.py           # full (a few minutes, 1 thread)
    python benchmarks/chain_factorised_vs_nonfactorised.py --quick   # seconds; writes *_quick.*
"""

from __future__ import annotations

import json
import math
import pathlib
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    base_parser,
    command_line,
    keeps_process_state,
    machine_info,
    output_paths,
    pyplot,
    repeat,
    save_figure,
    set_threads,
    summary,
    write_json,
)

import tmcgraph as tg  # noqa: E402
from tmcgraph.infer.smc import SMC  # noqa: E402
from tmcgraph.models.toys import gaussian_chain, gaussian_chain_log_evidence  # noqa: E402

NAME = "chain_factorised_vs_nonfactorised"
X = 1.0
CONTENDERS = {
    # label: (proposal, coupling, method)
    "factorised": ("factorised", "mixture", "TMC"),
    "prior, paired": ("prior", "paired", "TMC"),
    "prior, mixture": ("prior", "mixture", "TMC"),
    "prior, permutation": ("prior", "permutation", "TMC"),
    "SMC, prior": ("prior", "mixture", "SMC"),
}
GRIDS = {
    "full": {"n": 100, "K": [1, 3, 10, 30, 100, 300, 1000]},
    "quick": {"n": 20, "K": [1, 3, 10]},
}


def estimator(label: str, n: int, K: int):
    proposal, coupling, method = CONTENDERS[label]
    m, q = gaussian_chain(n, proposal=proposal, coupling=coupling)
    if method == "SMC":
        return SMC(m, q, K=K, resampling="systematic", ess_threshold=0.5)
    return tg.TMC(m, q, K=K)


def measure_point(n: int, K: int, seeds: list, log=print) -> list:
    """Every contender at K, one warm-up each, then interleaved by seed."""
    data = {"x": torch.tensor(X)}
    exact = float(gaussian_chain_log_evidence(X))
    fns = {}
    for label in CONTENDERS:
        est = estimator(label, n, K)
        fns[label] = lambda s, e=est: e.log_evidence(data, seed=s)
    vals = {c: [] for c in CONTENDERS}
    times = {c: [] for c in CONTENDERS}
    with torch.no_grad():
        for c in CONTENDERS:
            repeat(fns[c], [], warmup=1)
        for s in seeds:
            for c in CONTENDERS:
                v, t = repeat(fns[c], [s], warmup=0)
                vals[c] += v
                times[c] += t
    rows = []
    for c in CONTENDERS:
        est = summary(vals[c])  # raises on a non-finite estimate
        proposal, coupling, method = CONTENDERS[c]
        row = {
            "contender": c, "method": method, "proposal": proposal,
            "coupling": coupling if proposal == "prior" and method == "TMC" else None,
            "n": n, "K": K, "exact": exact, "estimate": est, "se": est["std"] / math.sqrt(est["n"]),
            "gap": exact - est["mean"],
            "time_s": summary(times[c]),
        }
        rows.append(row)
        log(f"{c:18s} n={n} K={K:5d}  est {est['mean']:10.3f} +- {row['se']:7.3f} (SE; sd {est['std']:8.3f})"
            f"  exact {exact:.3f}"
            f"  gap {row['gap']:9.3f}  time {row['time_s']['median'] * 1e3:8.2f} ms")
    return rows


def targets(rows: list) -> dict:
    """Non-factorised (TMC) vs factorised at the smallest K values."""
    Ks = sorted({r["K"] for r in rows})
    small = [k for k in Ks if k <= 10]
    by = {(r["contender"], r["K"]): r["estimate"]["mean"] for r in rows}
    out = {}
    for c in ("prior, mixture", "prior, permutation", "prior, paired"):
        wins = {k: by[(c, k)] > by[("factorised", k)] for k in Ks}
        out[f"{c} beats factorised"] = {
            "K_where_better": [k for k in Ks if wins[k]],
            "target": f"better than factorised at small K ({small})",
            "met": all(wins[k] for k in small),
        }
    perm = {k: by[("prior, permutation", k)] > by[("prior, mixture", k)] for k in Ks}
    out["prior, permutation beats prior, mixture"] = {
        "K_where_better": [k for k in Ks if perm[k]],
        "target": "higher mean estimate than the mixture coupling (comparison, not a requirement)",
        "met": all(perm[k] for k in Ks if k > 1),
    }
    return out


def plot(rows: list, path: pathlib.Path, title: str) -> None:
    plt = pyplot()
    styles = {
        "factorised": dict(color="tab:blue", marker="o"),
        "prior, paired": dict(color="tab:orange", marker="s"),
        "prior, mixture": dict(color="tab:red", marker="^"),
        "prior, permutation": dict(color="tab:green", marker="v", ls="--"),
        "SMC, prior": dict(color="tab:gray", marker="x", ls=":"),
    }
    fig, ax = plt.subplots(1, 3, figsize=(15, 4.5))
    for c in [c for c in CONTENDERS if any(r["contender"] == c for r in rows)]:  # replot: older JSONs lack some
        rs = sorted((r for r in rows if r["contender"] == c), key=lambda r: r["K"])
        K = [r["K"] for r in rs]
        m = [r["estimate"]["mean"] for r in rs]
        sd = [r["estimate"]["std"] for r in rs]
        label = c if CONTENDERS[c][2] == "SMC" else f"TMC, {c}"
        for a in ax[:2]:
            a.errorbar(K, m, yerr=sd, capsize=2, ms=4, label=label, **styles[c])
        ax[2].plot(K, [r["time_s"]["median"] for r in rs], ms=4, label=label, **styles[c])
    exact = rows[0]["exact"]
    for a in ax[:2]:
        a.axhline(exact, color="k", ls="--", label="GT")
        a.set(xscale="log", xlabel="K", ylabel="log p(x) estimate")
    ax[0].set(yscale="symlog", title="all contenders (symlog y)")
    ax[0].set_ylim(top=0)
    ax[1].set(ylim=(exact - 6, exact + 1), title="close-up near the ground truth")
    ax[2].set(xscale="log", yscale="log", xlabel="K", ylabel="seconds per estimate (median)", title="time")
    for a in ax:
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


def _title(payload: dict) -> str:
    return (f"{payload['command']}  |  n={payload['grid']['n']}, x={payload['x']}, "
            f"{payload['threads']['torch_threads']} thread(s), {payload['seeds_per_point']} seeds")


@keeps_process_state
def main(argv=None) -> dict:
    parser = base_parser(__doc__)
    parser.add_argument("--replot", type=pathlib.Path, default=None,
                        help="redraw the PNG from an existing JSON result (no measurements)")
    args = parser.parse_args(argv)
    if args.replot is not None:
        payload = json.loads(args.replot.read_text())
        png = args.replot.with_suffix(".png")
        plot(payload["rows"], png, _title(payload))
        print(f"wrote {png}")
        return payload
    grid = GRIDS["quick" if args.quick else "full"]
    n_seeds = args.seeds or (3 if args.quick else args.default_seeds)
    seeds = list(range(n_seeds))
    threads = set_threads(args.threads, args.allocator)
    json_path, png_path = output_paths(args.out, NAME, args.quick)
    t0 = time.perf_counter()
    rows = []
    for K in grid["K"]:
        rows += measure_point(grid["n"], K, seeds)
    tg_ = targets(rows)
    payload = {
        "benchmark": NAME,
        "command": command_line(argv),
        "quick": args.quick,
        "seeds_per_point": n_seeds,
        "threads": threads,
        "machine": machine_info(),
        "grid": grid,
        "x": X,
        "contenders": {c: dict(zip(("proposal", "coupling", "method"), v)) for c, v in CONTENDERS.items()},
        "timing": "wall-clock seconds per estimate, one warm-up call per estimator, torch.no_grad",
        "wall_time_s": time.perf_counter() - t0,
        "targets": tg_,
        "rows": rows,
    }
    write_json(json_path, payload)
    plot(rows, png_path, _title(payload))
    for k, v in tg_.items():
        print(f"target {k}: {'met' if v['met'] else 'NOT met'}: K where better {v['K_where_better']}")
    print(f"wrote {json_path} and {png_path} in {payload['wall_time_s']:.1f} s")
    return payload


if __name__ == "__main__":
    main()
