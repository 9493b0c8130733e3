"""MP-VI, MP-RWS and QEM, massively parallel and global, on the radon and bus-breakdown models.

For each model (``tmcgraph.models.hierarchical``: radon, bus breakdown split 0), method,
K and learning rate, and seed, the proposal (mean-field Normal, N(0, 1) at the start) is
trained for ``--iterations`` steps with ``tmcgraph.infer.fit.fit``:

* ``mpvi``, ``mprws``, ``qem``: the massively parallel methods on ``tg.TMC`` with the
  models' groups (``tmcgraph.sampling.group.Group``);
* ``global-mpvi``, ``global-mprws``, ``global-qem``: the same updates on ``tg.IWAE``
  (one joint sample dim: global importance sampling).

Recorded per run: the final objective (log P of the estimator at that K, mean over the
last ``--last`` iterations), the predictive log-likelihood of the held-out elements
(radon: zips 150..299 of every state; bus: the test records) with the trained proposal —
``tmcgraph.infer.posterior.predictive_log_likelihood`` on the data of all elements with
the same estimator type and K, the mean of ``--pred-reps`` independent estimates — the
median wall and CPU time per iteration, and the objective trace (binned to at most 200
points, with the run's cumulative wall time for the plot against time).
Summary rows take, per model, method and K, the learning rate with the best mean final
objective. Estimators run eagerly (``compile=False``), one torch thread.

Results go to ``benchmarks/results/hierarchical.json`` (quick:
``hierarchical_quick.json``; compact, traces rounded to 1e-3 nats and 1e-5 s),
``hierarchical[_quick].md`` (the summary table) and ``hierarchical[_quick]_<model>.png``
(objective vs iteration and vs CPU time, best learning rate per method). The JSON caches
every finished run: a run already in it is skipped, so an interrupted benchmark resumes
where it stopped. Parts of the grid can run in parallel processes with their own ``--out``
(e.g. ``--models radon``, ``--models bus --K 3,10``, ``--models bus --K 30``); an
invocation of the whole grid with ``--merge A/hierarchical.json B/hierarchical.json ...``
takes their runs into its cache and runs only what is missing.

    python benchmarks/hierarchical.py --data ../shared/data/hierarchical            # full grid
    python benchmarks/hierarchical.py --data ../shared/data/hierarchical --quick    # seconds
"""

from __future__ import annotations

import itertools
import json
import math
import os
import pathlib
import statistics
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    base_parser,
    command_line,
    keeps_process_state,
    machine_info,
    parse_list,
    pyplot,
    save_figure,
    set_threads,
)

import tmcgraph as tg  # noqa: E402
from tmcgraph.data.hierarchical import load_bus_breakdown, load_radon  # noqa: E402
from tmcgraph.infer.fit import MPRWS, MPVI, fit  # noqa: E402
from tmcgraph.infer.posterior import predictive_log_likelihood  # noqa: E402
from tmcgraph.infer.qem import QEM  # noqa: E402
from tmcgraph.models import hierarchical as H  # noqa: E402

NAME = "hierarchical"
MODELS = ("radon", "bus")
METHODS = {
    "mpvi": ("MP-VI", MPVI, tg.TMC),
    "mprws": ("MP-RWS", MPRWS, tg.TMC),
    "qem": ("QEM", QEM, tg.TMC),
    "global-mpvi": ("global MP-VI", MPVI, tg.IWAE),
    "global-mprws": ("global MP-RWS", MPRWS, tg.IWAE),
    "global-qem": ("global QEM", QEM, tg.IWAE),
}
COLORS = {"mpvi": "tab:blue", "mprws": "tab:orange", "qem": "tab:red", "global-mpvi": "tab:cyan",
          "global-mprws": "tab:olive", "global-qem": "tab:pink"}
DEFAULTS = {"K": [3, 10, 30], "lrs": [0.001, 0.01, 0.03, 0.1], "qem_lrs": [0.01, 0.03, 0.1, 0.3],
            "iterations": 1000, "seeds": 5, "last": 100, "pred_reps": 10}
QUICK = {"K": [3], "lrs": [0.03], "qem_lrs": [0.1], "iterations": 6, "seeds": 1, "last": 3, "pred_reps": 2}
MAX_JSON_BYTES = 256 << 20
PRED_SEED = 10**6
TRACE_POINTS = 200


def parser():
    p = base_parser(__doc__, seeds=DEFAULTS["seeds"])
    p.add_argument("--data", type=pathlib.Path, default=None,
                   help="directory with radon.npz and bus_breakdown.npz (default: $TMCGRAPH_DATA)")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {MODELS}")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {tuple(METHODS)}")
    p.add_argument("--K", default=None, help=f"comma-separated K values (default {DEFAULTS['K']})")
    p.add_argument("--lrs", default=None, help=f"Adam learning rates of MP-VI/MP-RWS (default {DEFAULTS['lrs']})")
    p.add_argument("--qem-lrs", default=None, help=f"QEM EMA rates (default {DEFAULTS['qem_lrs']})")
    p.add_argument("--iterations", type=int, default=None, help=f"steps per run (default {DEFAULTS['iterations']})")
    p.add_argument("--last", type=int, default=None,
                   help=f"final objective: mean over the last LAST iterations (default {DEFAULTS['last']})")
    p.add_argument("--pred-reps", type=int, default=None,
                   help=f"independent predictive estimates per run (default {DEFAULTS['pred_reps']})")
    p.add_argument("--split", type=int, default=0, help="bus-breakdown train/test split (default 0)")
    p.add_argument("--progress", action="store_true", help="a progress bar per run (tqdm)")
    p.add_argument("--merge", type=pathlib.Path, nargs="+", default=[], metavar="JSON",
                   help="result files of other invocations (e.g. parts of the grid run in parallel with their own "
                        "--out); their finished runs join the cache")
    return p


def settings(args, p) -> dict:
    base = QUICK if args.quick else DEFAULTS
    s = {
        "models": [m for m in args.models.split(",") if m],
        "methods": [m for m in args.methods.split(",") if m],
        "K": parse_list(args.K) or base["K"],
        "lrs": parse_list(args.lrs, float) or base["lrs"],
        "qem_lrs": parse_list(args.qem_lrs, float) or base["qem_lrs"],
        "iterations": base["iterations"] if args.iterations is None else args.iterations,
        "seeds": args.seeds or base["seeds"],
        "last": base["last"] if args.last is None else args.last,
        "pred_reps": base["pred_reps"] if args.pred_reps is None else args.pred_reps,
        "split": args.split,
    }
    for key, allowed in (("models", MODELS), ("methods", tuple(METHODS))):
        bad = [v for v in s[key] if v not in allowed]
        if bad or not s[key]:
            p.error(f"--{key}: unknown {bad or 'empty list'}; choose from {allowed}")
    if any(k < 1 for k in s["K"]):
        p.error(f"--K: values must be positive, got {s['K']}")
    if any(not (0 < lr) for lr in s["lrs"]) or any(not (0 < lr <= 1) for lr in s["qem_lrs"]):
        p.error("--lrs must be positive and --qem-lrs in (0, 1]")
    for key in ("iterations", "last", "pred_reps"):
        if s[key] < 1:
            p.error(f"--{key.replace('_', '-')} must be positive, got {s[key]}")
    return s


def load(args, p, s) -> dict:
    root = args.data or os.environ.get("TMCGRAPH_DATA")
    if root is None:
        p.error("--data: give the directory holding radon.npz and bus_breakdown.npz (or set TMCGRAPH_DATA)")
    out = {}
    try:
        if "radon" in s["models"]:
            r = load_radon(root)
            out["radon"] = {"build": H.radon, "train": r.train, "all": r.all, "heldout": {"log_radon": r.heldout}}
        if "bus" in s["models"]:
            b = load_bus_breakdown(root, s["split"])
            out["bus"] = {"build": H.bus, "train": b.train, "all": b.all, "heldout": {"delay": b.heldout}}
    except tg.TMCGraphError as e:
        p.error(f"--data: {e}")
    return out


def read_runs(path: pathlib.Path, p) -> dict:
    """The cached runs of a result file of this benchmark (bounded read; a foreign file is an error)."""
    if not path.is_file():
        p.error(f"--merge: no result file at {path}")
    if path.stat().st_size > MAX_JSON_BYTES:
        p.error(f"{path} is larger than {MAX_JSON_BYTES} bytes; not a result of this benchmark")
    try:
        payload = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        p.error(f"{path} is not a JSON result file ({e})")
    if not isinstance(payload, dict) or payload.get("benchmark") != NAME or not isinstance(payload.get("runs"), dict):
        p.error(f"{path} is not a result file of benchmarks/{NAME}.py")
    return payload["runs"]


def _rounded(trace: dict) -> dict:
    """A trace with objectives to 1e-3 nats and times to 1e-5 s (keeps the JSON small)."""
    return {k: (v if k == "iteration" else [round(x, 3 if k == "objective" else 5) for x in v])
            for k, v in trace.items()}


def write_results(path: pathlib.Path, payload: dict) -> None:
    """The results JSON, compact (one line; traces rounded); non-finite numbers raise ``ValueError``."""
    runs = {k: ({**r, "trace": _rounded(r["trace"])} if "trace" in r else r) for k, r in payload["runs"].items()}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({**payload, "runs": runs}, allow_nan=False, separators=(",", ":")) + "\n")
    os.replace(tmp, path)


def run_key(model, method, K, lr, seed, s) -> str:
    """The cache key of one run: everything its result depends on."""
    name = f"bus(split={s['split']})" if model == "bus" else model
    return (f"{name}|{method}|K={K}|lr={lr:g}|seed={seed}|iterations={s['iterations']}|last={s['last']}"
            f"|pred_reps={s['pred_reps']}")


def binned(values: list, times: list, cpu: list, points: int = TRACE_POINTS) -> dict:
    """Means of the objective over at most ``points`` equal bins of iterations, with the bins' end times.

    ``times`` and ``cpu`` are cumulative wall and CPU seconds per iteration.
    """
    n = len(values)
    size = max(1, math.ceil(n / points))
    it, obj, t, c = [], [], [], []
    for i in range(0, n, size):
        chunk = values[i:i + size]
        end = i + len(chunk) - 1
        it.append(end + 1)
        obj.append(sum(chunk) / len(chunk))
        t.append(times[end])
        c.append(cpu[end])
    return {"iteration": it, "objective": obj, "elapsed_s": t, "cpu_s": c}


def one_run(data: dict, method_id: str, K: int, lr: float, seed: int, s: dict, progress: bool) -> dict:
    label, cls, est_cls = METHODS[method_id]
    m, q, obs = data["build"](data["train"])
    est = est_cls(m, q, K=K, compile=False)
    t0 = time.process_time()
    try:
        res = fit(est, obs, cls(lr), iterations=s["iterations"], seed=seed, progress=progress)
    except tg.TMCGraphError as e:
        return {"diverged": str(e).splitlines()[0][:300], "cpu_s": time.process_time() - t0}
    cpu = time.process_time() - t0
    m_all, q_all, obs_all = data["build"](data["all"])
    H.predictive_proposal(q, q_all)
    est_all = est_cls(m_all, q_all, K=K, compile=False)
    preds = []
    with torch.no_grad():
        for r in range(s["pred_reps"]):
            try:
                preds.append(float(predictive_log_likelihood(est_all, obs_all, data["heldout"], seed=PRED_SEED + r)))
            except tg.TMCGraphError:  # no particle combination carries weight: counted as missing
                pass
    preds = [v for v in preds if math.isfinite(v)]
    obj = res.objectives
    return {
        "final_objective": res.final_objective(s["last"]),
        "predictive_ll": statistics.fmean(preds) if preds else None,
        "predictive_ll_sd": statistics.stdev(preds) if len(preds) > 1 else 0.0,
        "predictive_reps": len(preds),
        "time_per_iteration_s": statistics.median(h["seconds"] for h in res.history),
        "cpu_per_iteration_s": statistics.median(h["cpu_seconds"] for h in res.history),
        "cpu_s": cpu,
        "trace": binned(obj, [h["elapsed"] for h in res.history],
                        list(itertools.accumulate(h["cpu_seconds"] for h in res.history))),
    }


def _mean_sd(values: list) -> tuple:
    """``(mean, sd)`` over seeds (``(None, 0)`` when empty, sd 0 for one value)."""
    if not values:
        return None, 0.0
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(runs: dict, s: dict) -> list:
    """Per model, method and K: the lr with the best mean final objective, and its statistics over seeds."""
    rows = []
    for model in s["models"]:
        for method in s["methods"]:
            lrs = s["qem_lrs"] if METHODS[method][1] is QEM else s["lrs"]
            for K in s["K"]:
                per_lr = {}
                for lr in lrs:
                    rs = [runs.get(run_key(model, method, K, lr, seed, s)) for seed in range(s["seeds"])]
                    rs = [r for r in rs if r is not None]
                    ok = [r for r in rs if "final_objective" in r]
                    if not rs:
                        continue
                    fo = _mean_sd([r["final_objective"] for r in ok])
                    pl = _mean_sd([r["predictive_ll"] for r in ok if r["predictive_ll"] is not None])
                    per_lr[lr] = {
                        "runs": len(rs),
                        "diverged": len(rs) - len(ok),
                        "final_objective": fo[0],
                        "final_objective_sd": fo[1],
                        "predictive_ll": pl[0],
                        "predictive_ll_sd": pl[1],
                        "time_per_iteration_s": (statistics.median([r["time_per_iteration_s"] for r in ok])
                                                 if ok else None),
                        "cpu_per_iteration_s": (statistics.median([r["cpu_per_iteration_s"] for r in ok])
                                                if ok else None),
                    }
                good = {lr: v for lr, v in per_lr.items() if v["final_objective"] is not None and not v["diverged"]}
                best = max(good, key=lambda lr: good[lr]["final_objective"]) if good else None
                rows.append({"model": model, "method": method, "label": METHODS[method][0], "K": K,
                             "best_lr": best, **(good[best] if best is not None else {}),
                             "by_lr": {f"{lr:g}": v for lr, v in per_lr.items()}})
    return rows


def plot(runs: dict, rows: list, s: dict, path_of) -> list:
    plt = pyplot()
    from matplotlib.ticker import NullFormatter
    paths = []
    for model in s["models"]:
        Ks = s["K"]
        fig, axes = plt.subplots(2, len(Ks), figsize=(4.2 * len(Ks), 7), squeeze=False)
        for j, K in enumerate(Ks):
            lows = []
            for row in rows:
                if row["model"] != model or row["K"] != K or row["best_lr"] is None:
                    continue
                traces = [runs[run_key(model, row["method"], K, row["best_lr"], seed, s)]["trace"]
                          for seed in range(s["seeds"])
                          if "trace" in runs.get(run_key(model, row["method"], K, row["best_lr"], seed, s), {})]
                if not traces:
                    continue
                n = min(len(t["objective"]) for t in traces)
                it = traces[0]["iteration"][:n]
                obj = [statistics.fmean(t["objective"][i] for t in traces) for i in range(n)]
                el = [statistics.fmean(t["cpu_s"][i] for t in traces) for i in range(n)]
                kw = {"color": COLORS[row["method"]], "ls": "--" if row["method"].startswith("global") else "-",
                      "label": f"{row['label']} (lr {row['best_lr']:g})"}
                axes[0][j].plot(it, obj, **kw)
                axes[1][j].plot(el, obj, **kw)
                lows.append(obj[min(n - 1, max(1, n // 10))])
            for i in range(2):
                ax = axes[i][j]
                ax.set_title(f"{model}, K = {K}", fontsize=9)
                ax.set_xlabel("iteration" if i == 0 else "CPU time (s, one thread)")
                ax.set_ylabel("log P (binned mean over seeds)")
                if lows:
                    lo, hi = ax.get_ylim()
                    ax.set_ylim(max(lo, min(lows)), hi)
                if i == 1:
                    ax.set_xscale("log")
                    ax.xaxis.set_minor_formatter(NullFormatter())
            axes[0][j].legend(fontsize=6)
        fig.suptitle(f"{model}: objective vs iteration and vs CPU time\n(best learning rate per method; "
                     f"{s['seeds']} seed(s), {s['iterations']} iterations)", fontsize=10)
        fig.tight_layout()
        path = path_of(model)
        save_figure(fig, path)
        paths.append(path.name)
    return paths


def markdown(rows: list, s: dict) -> str:
    """The summary rows as a markdown table (mean +- sd over seeds at the best learning rate)."""
    lines = [f"{s['seeds']} seed(s), {s['iterations']} iterations, final objective = mean of the last {s['last']}; "
             f"predictive log-likelihood = mean of {s['pred_reps']} estimates; mean +- sd over seeds at the best "
             "learning rate", "",
             "| model | method | K | best lr | final log P | predictive log-lik. | CPU ms / it | wall ms / it |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if r["best_lr"] is None:
            lines.append(f"| {r['model']} | {r['label']} | {r['K']} | - | no finished run | | | |")
            continue
        pl = "-" if r["predictive_ll"] is None else f"{r['predictive_ll']:.2f} ± {r['predictive_ll_sd']:.2f}"
        lines.append(f"| {r['model']} | {r['label']} | {r['K']} | {r['best_lr']:g} | "
                     f"{r['final_objective']:.2f} ± {r['final_objective_sd']:.2f} | {pl} | "
                     f"{1e3 * r['cpu_per_iteration_s']:.1f} | {1e3 * r['time_per_iteration_s']:.1f} |")
    return "\n".join(lines) + "\n"


@keeps_process_state
def main(argv=None) -> dict:
    p = parser()
    args = p.parse_args(argv)
    s = settings(args, p)
    threads = set_threads(args.threads, args.allocator)
    data = load(args, p, s)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"{NAME}_quick" if args.quick else NAME
    jpath = args.out / f"{stem}.json"
    runs = {}
    for path in ([jpath] if jpath.exists() else []) + list(args.merge):
        runs.update(read_runs(path, p))
    command = command_line(argv)
    cpu0 = time.process_time()
    ran = skipped = 0

    def payload(complete: bool) -> dict:
        return {"benchmark": NAME, "command": command, "complete": complete, "quick": args.quick,
                "settings": s, "threads": threads, "machine": machine_info(),
                "this_invocation_cpu_s": time.process_time() - cpu0, "runs_this_invocation": ran,
                "runs_skipped_cached": skipped,
                "total_run_cpu_s": sum(r.get("cpu_s", 0.0) for r in runs.values()), "runs": runs}

    # Interleaved: for each model, seed and K every method and learning rate runs in turn.
    for model in s["models"]:
        for seed in range(s["seeds"]):
            for K in s["K"]:
                for method in s["methods"]:
                    for lr in (s["qem_lrs"] if METHODS[method][1] is QEM else s["lrs"]):
                        key = run_key(model, method, K, lr, seed, s)
                        if key in runs:
                            skipped += 1
                            continue
                        runs[key] = r = one_run(data[model], method, K, lr, seed, s, args.progress)
                        ran += 1
                        done = (f"final {r['final_objective']:.2f}  pred {r['predictive_ll']:.2f}  "
                                f"{1e3 * r['time_per_iteration_s']:.2f} ms/it" if "final_objective" in r
                                else f"diverged: {r['diverged'][:80]}")
                        print(f"{key}: {done}", flush=True)
                        write_results(jpath, payload(False))
    rows = summarize(runs, s)
    out = payload(True)
    out["rows"] = rows
    out["figures"] = plot(runs, rows, s, lambda model: args.out / f"{stem}_{model}.png")
    write_results(jpath, out)
    mpath = jpath.with_suffix(".md")
    table = markdown(rows, s)
    mpath.write_text(table)
    print(table)
    print(f"ran {ran} run(s), {skipped} cached; wrote {jpath}, {mpath.name} and {', '.join(out['figures'])} "
          f"in {args.out}")
    return out


if __name__ == "__main__":
    main()
