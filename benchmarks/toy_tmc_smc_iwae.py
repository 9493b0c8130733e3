"""The paper's Fig. 3: TMC, SMC and IWAE on the Gaussian toy, against the exact evidence.

Model: theta ~ N(0, 1), z_i | theta ~ N(theta, 1), x_i | z_i ~ N(z_i, 1), i = 1..N; proposals
Q(theta) = N(0, 1), Q(z_i) = N(0, 2) for every method (``tmcgraph.toys.gaussian_toy``).
Exactly, x ~ N(0, 2 I + 1 1^T). One data set per N (``gaussian_toy_data(N, seed=0)``); each
seed is one independent estimate by every method, run side by side (interleaved by seed).

Panels:
    A: log p(x) estimate vs K at N = 128 (TMC, SMC up to K >= 1024; IWAE up to K = 2^18).
    B: time per estimate vs K at N = 128.
    C: estimate per data point, log p(x) / N, vs N at K = 128 (N = 8 .. 4096).
    D: time per estimate vs N at K = 128.

SMC unrolls the data plate (``tmcgraph.smc.SMC(seq_plate="data")``): theta first, then one
step per data point, systematic resampling when the ESS falls below K/2.

    python benchmarks/toy_tmc_smc_iwae.py            # full grid, 20 seeds (about 15 min, 1 thread)
    python benchmarks/toy_tmc_smc_iwae.py --quick    # seconds; writes *_quick.*
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
from tmcgraph.models.toys import gaussian_toy, gaussian_toy_data, gaussian_toy_log_evidence  # noqa: E402

NAME = "toy_tmc_smc_iwae"
METHODS = ("TMC", "SMC", "IWAE")
SMC_SETTINGS = {"seq_plate": "data", "resampling": "systematic", "ess_threshold": 0.5}

GRIDS = {
    "full": {
        "N_A": 128,
        "K": {
            "TMC": [2**i for i in range(0, 11)],  # 1 .. 1024
            "SMC": [2**i for i in range(0, 15)],  # 1 .. 16384
            "IWAE": [4**i for i in range(0, 10)],  # 1 .. 2^18
        },
        "K_C": 128,
        "N_C": [2**i for i in range(3, 13)],  # 8 .. 4096
    },
    "quick": {
        "N_A": 16,
        "K": {"TMC": [2, 8], "SMC": [2, 8, 32], "IWAE": [4, 64]},
        "K_C": 8,
        "N_C": [8, 32],
    },
}


def estimator(method: str, model, proposal, K: int):
    """One estimator of log p(x) for ``method``."""
    if method == "TMC":
        return tg.TMC(model, proposal, K=K)
    if method == "IWAE":
        return tg.IWAE(model, proposal, K=K)
    return SMC(model, proposal, K=K, **SMC_SETTINGS)


def measure_point(panel: str, N: int, K: int, methods: list, seeds: list, log=print) -> list:
    """Estimates and times of every method at (N, K), interleaved by seed after one warm-up each."""
    model, proposal = gaussian_toy()
    x = gaussian_toy_data(N, seed=0)
    data = {"x": x}
    exact = float(gaussian_toy_log_evidence(x))
    ests = {m: estimator(m, model, proposal, K) for m in methods}
    fns = {m: (lambda s, e=e: e.log_evidence(data, seed=s)) for m, e in ests.items()}
    vals = {m: [] for m in methods}
    times = {m: [] for m in methods}
    with torch.no_grad():
        for m in methods:
            repeat(fns[m], [], warmup=1)
        for s in seeds:
            for m in methods:
                v, t = repeat(fns[m], [s], warmup=0)
                vals[m] += v
                times[m] += t
    rows = []
    for m in methods:
        est = summary(vals[m])
        row = {
            "panel": panel,
            "method": m,
            "N": N,
            "K": K,
            "exact": exact,
            "estimate": est,
            "per_point": summary([v / N for v in vals[m]]),
            "exact_per_point": exact / N,
            "gap": exact - est["mean"],
            "time_s": summary(times[m]),
        }
        rows.append(row)
        log(
            f"{panel} {m:4s} N={N:5d} K={K:6d}  est {est['mean']:11.3f} +- {est['std']:8.3f}  exact {exact:11.3f}"
            f"  gap {row['gap']:9.3f}  time {row['time_s']['median'] * 1e3:9.2f} ms"
        )
    return rows


def _find(rows, panel, method, N, K):
    for r in rows:
        if (r["panel"], r["method"], r["N"], r["K"]) == (panel, method, N, K):
            return r
    return None


def targets(rows: list, grid: dict) -> dict:
    """The paper's claims, checked on these numbers."""
    N_A, K_C = grid["N_A"], grid["K_C"]
    out = {}
    tmc = _find(rows, "A", "TMC", N_A, K_C) or _find(rows, "C", "TMC", N_A, K_C)
    smc = _find(rows, "A", "SMC", N_A, K_C) or _find(rows, "C", "SMC", N_A, K_C)
    if tmc and smc:
        out["A_tmc_gap_at_K128"] = {
            "N": N_A, "K": K_C, "exact": tmc["exact"], "tmc_mean": tmc["estimate"]["mean"],
            "tmc_std": tmc["estimate"]["std"], "gap": tmc["gap"], "target": "gap <= 2.5 nats",
            "met": tmc["gap"] <= 2.5,
        }
        out["A_tmc_vs_smc_at_K128"] = {
            "tmc_mean": tmc["estimate"]["mean"], "smc_mean": smc["estimate"]["mean"],
            "smc_gap": smc["gap"], "target": "TMC mean > SMC mean",
            "met": tmc["estimate"]["mean"] > smc["estimate"]["mean"],
        }
    iw = [r for r in rows if r["panel"] == "A" and r["method"] == "IWAE"]
    if iw:
        big = max(iw, key=lambda r: r["K"])
        out["A_iwae_at_largest_K"] = {
            "K": big["K"], "iwae_mean": big["estimate"]["mean"], "gap": big["gap"],
            "target": "far off (gap >> TMC gap at K=128)",
            "met": bool(tmc) and big["gap"] > 10 * max(tmc["gap"], 1.0),
        }
    Ns = sorted({r["N"] for r in rows if r["panel"] == "C"})
    if Ns:
        N_big = 1024 if 1024 in Ns else Ns[-1]
        t_tmc = _find(rows, "C", "TMC", N_big, K_C)["time_s"]["median"]
        t_smc = _find(rows, "C", "SMC", N_big, K_C)["time_s"]["median"]
        out["D_speed_at_N1024"] = {
            "N": N_big, "K": K_C, "tmc_median_s": t_tmc, "smc_median_s": t_smc,
            "smc_over_tmc": t_smc / t_tmc, "target": "SMC/TMC time >= 10", "met": t_smc / t_tmc >= 10,
        }
        growth = {}
        for m in METHODS:
            a = _find(rows, "C", m, Ns[0], K_C)["time_s"]["median"]
            b = _find(rows, "C", m, N_big, K_C)["time_s"]["median"]
            growth[m] = {"N_from": Ns[0], "N_to": N_big, "time_ratio": b / a, "N_ratio": N_big / Ns[0]}
        out["D_time_growth"] = {
            **growth,
            "target": "TMC nearly flat up to N ~ 1000, SMC linear in N",
            "met": growth["TMC"]["time_ratio"] < 3 and growth["SMC"]["time_ratio"] > 0.3 * growth["SMC"]["N_ratio"],
        }
    return out


def _log2_axis(ax):
    from matplotlib import ticker

    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(
        lambda v, _: f"{v:.0f}" if v < 5000 else f"$2^{{{math.log2(v):.0f}}}$"))
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())


def plot(rows: list, grid: dict, path: pathlib.Path, title: str) -> None:
    """Panels A-D as in the paper, plus the gap to the exact value (symlog) for A and C."""
    plt = pyplot()
    colors = {"TMC": "tab:red", "SMC": "tab:green", "IWAE": "tab:blue"}
    fig, ax = plt.subplots(2, 3, figsize=(16, 8.5))
    bar = dict(marker="o", ms=3, capsize=2)
    for m in METHODS:
        for row, panel, x in ((0, "A", "K"), (1, "C", "N")):
            rs = sorted((r for r in rows if r["panel"] == panel and r["method"] == m), key=lambda r: r[x])
            if not rs:
                continue
            xs = [r[x] for r in rs]
            key = "estimate" if panel == "A" else "per_point"
            scale = [1.0 if panel == "A" else 1.0 / r["N"] for r in rs]
            ax[row, 0].errorbar(xs, [r[key]["mean"] for r in rs], yerr=[r[key]["std"] for r in rs],
                                color=colors[m], label=m, **bar)
            ax[row, 1].errorbar(xs, [r["time_s"]["median"] for r in rs],
                                yerr=[[r["time_s"]["median"] - r["time_s"]["q25"] for r in rs],
                                      [r["time_s"]["q75"] - r["time_s"]["median"] for r in rs]],
                                color=colors[m], label=m, **bar)
            se = [r["estimate"]["std"] * f / math.sqrt(r["estimate"]["n"]) for r, f in zip(rs, scale)]
            ax[row, 2].errorbar(xs, [r["gap"] * f for r, f in zip(rs, scale)], yerr=se,
                                color=colors[m], label=m, **bar)
    a_exact = next(r["exact"] for r in rows if r["panel"] == "A")
    ax[0, 0].axhline(a_exact, color="k", ls="--", label="GT")
    c_rows = sorted({(r["N"], r["exact_per_point"]) for r in rows if r["panel"] == "C"})
    ax[1, 0].plot([n for n, _ in c_rows], [e for _, e in c_rows], "k--", label="GT")
    NA, KC = grid["N_A"], grid["K_C"]
    ax[0, 0].set(xlabel="K", ylabel="log p(x) estimate", title=f"A: estimate vs K (N={NA})")
    ax[0, 1].set(yscale="log", xlabel="K", ylabel="seconds per estimate (median, IQR)", title=f"B: time vs K (N={NA})")
    ax[0, 2].set(yscale="symlog", xlabel="K", ylabel="exact - mean estimate (nats)",
                 title=f"A, gap to the exact value (N={NA}; bars: s.e.)")
    ax[1, 0].set(xlabel="N", ylabel="log p(x) / N", title=f"C: per data point vs N (K={KC})")
    ax[1, 1].set(yscale="log", xlabel="N", ylabel="seconds per estimate (median, IQR)", title=f"D: time vs N (K={KC})")
    ax[1, 2].set(yscale="symlog", xlabel="N", ylabel="(exact - mean estimate) / N",
                 title=f"C, gap per data point (K={KC}; bars: s.e.)")
    for a in ax.flat:
        _log2_axis(a)
        a.legend(fontsize=8)
        a.grid(alpha=0.3)
    ax[0, 2].axhline(0, color="k", lw=0.8)
    ax[1, 2].axhline(0, color="k", lw=0.8)
    ax[1, 2].set_yscale("symlog", linthresh=1e-3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


def _title(payload: dict) -> str:
    mach = payload["machine"]
    return (f"{payload['command']}  |  {payload['threads']['torch_threads']} thread(s), "
            f"{payload['seeds_per_point']} seeds, {mach['cpu']} ({mach['cpu_count']} cores)")


@keeps_process_state
def main(argv=None) -> dict:
    parser = base_parser(__doc__)
    parser.add_argument("--replot", type=pathlib.Path, default=None,
                        help="redraw the PNG from an existing JSON result (no measurements)")
    args = parser.parse_args(argv)
    if args.replot is not None:
        payload = json.loads(args.replot.read_text())
        png = args.replot.with_suffix(".png")
        plot(payload["rows"], payload["grid"], png, _title(payload))
        print(f"wrote {png}")
        return payload
    grid = GRIDS["quick" if args.quick else "full"]
    n_seeds = args.seeds or (3 if args.quick else args.default_seeds)
    seeds = list(range(n_seeds))
    threads = set_threads(args.threads, args.allocator)
    json_path, png_path = output_paths(args.out, NAME, args.quick)
    t0 = time.perf_counter()

    rows = []
    N_A = grid["N_A"]
    for K in sorted(set().union(*grid["K"].values())):
        methods = [m for m in METHODS if K in grid["K"][m]]
        rows += measure_point("A", N_A, K, methods, seeds)
    for N in grid["N_C"]:
        rows += measure_point("C", N, grid["K_C"], list(METHODS), seeds)

    tg_ = targets(rows, grid)
    payload = {
        "benchmark": NAME,
        "command": command_line(argv),
        "quick": args.quick,
        "seeds_per_point": n_seeds,
        "threads": threads,
        "machine": machine_info(),
        "grid": grid,
        "smc_settings": SMC_SETTINGS,
        "timing": "wall-clock seconds per estimate (sample + factors + contraction / SMC run), "
                  "one warm-up call per estimator, torch.no_grad; summaries over seeds",
        "wall_time_s": time.perf_counter() - t0,
        "targets": tg_,
        "rows": rows,
    }
    write_json(json_path, payload)
    plot(rows, grid, png_path, _title(payload))
    for k, v in tg_.items():
        print(f"target {k}: {'met' if v['met'] else 'NOT met'}: "
              + ", ".join(f"{a}={b:.4g}" if isinstance(b, float) else f"{a}={b}" for a, b in v.items() if a != "met"))
    print(f"wrote {json_path} and {png_path} in {payload['wall_time_s']:.1f} s")
    return payload


if __name__ == "__main__":
    main()
