"""A loopy model: plan cost against opt_einsum's optimizers, memory, time, and the memory limit.

A directed R x R lattice of scalar Gaussian latents: z[r, c] ~ N((z[r, c-1] + z[r-1, c]) / 2, 1)
(parents are the left and upper neighbours; border latents have fewer), one observation
x[r, c] ~ N(z[r, c], 1) per latent, factorised proposal N(0, 1.5^2). Each latent's factor
is a K x K x K tensor and the contraction has cycles (treewidth ~ R).

For each size and K:

* plan cost (opt_einsum's flop model) of tmcgraph's ``"auto"`` plan against opt_einsum's
  ``greedy``, ``random-greedy`` (32 repeats), ``dp`` and ``optimal`` paths for the same
  equation, each searched in a separate process with a time budget (``--budget``
  seconds; optimizers that do not finish are reported as such);
* the contraction run in a fresh process, without and with a memory limit (``--limit``,
  default K^4 elements): time (median), peak extra resident memory of the process during
  the contraction (``VmHWM`` after minus ``VmRSS`` before), the plan's largest tensor
  and its slices. Without a limit, sizes whose largest intermediate exceeds
  ``--max-unlimited`` elements are not run (they would need several GB);
* a too-small limit must raise ``TMCGraphError`` at planning, before allocating.

    python benchmarks/perf_lattice.py
    python benchmarks/perf_lattice.py --quick
"""

from __future__ import annotations

import json
import multiprocessing as mp
import subprocess
import sys
import time

import torch
from _common import (
    base_parser,
    keeps_process_state,
    pyplot,
    save_figure,
    save_results,
    set_threads,
)
from torch.distributions import Normal

import tmcgraph as tg

__all__ = ["main", "lattice"]


def lattice(R: int, C: int):
    """``(model, proposal, data)`` of the R x C directed lattice."""
    m = tg.Model()
    q = tg.Proposal(m)
    for r in range(R):
        for c in range(C):
            ps = ([f"z{r}_{c - 1}"] if c else []) + ([f"z{r - 1}_{c}"] if r else [])
            fn = (lambda *a: Normal(0.5 * sum(a), 1.0)) if ps else (lambda: Normal(0.0, 1.0))
            m.latent(f"z{r}_{c}", fn, parents=ps)
            m.observed(f"x{r}_{c}", lambda z: Normal(z, 1.0), parents=[f"z{r}_{c}"])
            q.latent(f"z{r}_{c}", lambda: Normal(0.0, 1.5), parents=[])
    data = {f"x{r}_{c}": torch.tensor(0.3 * (r - c)) for r in range(R) for c in range(C)}
    return m, q, data


def _factors(R, K, limit=None):
    m, q, data = lattice(R, R)
    est = tg.TMC(m, q, K=K, memory_limit=limit)
    s = est.sample(data, seed=0)
    return est, s, est.factor_graph(s).factors


def _search(eq, shapes, strategy, queue):
    import opt_einsum as oe
    from opt_einsum.path_random import RandomGreedy

    opt = RandomGreedy(max_repeats=32) if strategy == "random-greedy" else strategy
    t0 = time.perf_counter()
    _, info = oe.contract_path(eq, *shapes, shapes=True, optimize=opt)
    queue.put({"cost": float(info.opt_cost), "largest_intermediate": int(info.largest_intermediate),
               "search_s": time.perf_counter() - t0})


def opt_einsum_path(eq, shapes, strategy, budget):
    """opt_einsum's path for ``strategy`` searched in a child process; ``{"error"}`` if over ``budget`` s."""
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    p = ctx.Process(target=_search, args=(eq, shapes, strategy, queue))
    p.start()
    p.join(budget)
    if p.is_alive():
        p.kill()
        p.join()
        return {"error": f"did not finish within {budget:g} s"}
    if queue.empty():
        return {"error": f"failed (exit code {p.exitcode})"}
    return queue.get()


def _status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def child(R: int, K: int, limit, reps: int) -> dict:
    """Run in a fresh process: contract the lattice and report time and peak memory."""
    torch.set_num_threads(1)
    est, s, fs = _factors(R, K, limit)
    plan = est.plan(tg.FactorGraph(fs, s.ordinals))
    tensors = [f.tensor for f in fs]
    rss0 = _status("VmRSS")
    hwm0 = _status("VmHWM")
    times, value = [], None
    for _ in range(reps):
        t0 = time.perf_counter()
        with torch.no_grad():
            value = float(tg.ops.contract(plan, tensors))
        times.append(time.perf_counter() - t0)
    with torch.no_grad():
        v64 = float(tg.ops.contract(plan, [t.double() for t in tensors])) if R * K <= 64 else None
    return {"seconds": sorted(times)[len(times) // 2], "times_s": times, "value": value, "value_float64": v64,
            "peak_extra_bytes": max(_status("VmHWM"), hwm0) - rss0, "rss_before_bytes": rss0,
            "largest_tensor": plan.largest_tensor, "cost": plan.cost,
            "slices": [[n, k] for st in plan.steps for n, k, _ in st.sliced]}


def run_child(R, K, limit, reps, timeout=1800) -> dict:
    cmd = [sys.executable, __file__, "--child", str(R), str(K), str(limit or 0), str(reps)]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        return {"error": f"exit code {r.returncode}: {r.stderr.strip().splitlines()[-1] if r.stderr else ''}"}
    out = json.loads(r.stdout.strip().splitlines()[-1])
    out["wall_s"] = time.perf_counter() - t0
    return out


@keeps_process_state
def main(argv=None) -> dict:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--child":
        R, K, limit, reps = (int(a) for a in sys.argv[2:6])
        print(json.dumps(child(R, K, limit or None, reps)))
        return {"child": True}
    ap = base_parser(__doc__, seeds=3)
    ap.add_argument("--budget", type=float, default=None, help="seconds per opt_einsum search (default 120; quick 3)")
    ap.add_argument("--limit", type=int, default=None, help="memory limit in elements (default K^4)")
    ap.add_argument("--max-unlimited", type=int, default=1 << 26,
                    help="largest intermediate (elements) run without a limit (default 2^26)")
    args = ap.parse_args(argv)
    threads = set_threads(args.threads, args.allocator)
    reps = args.seeds or (1 if args.quick else args.default_seeds)
    budget = args.budget or (2.0 if args.quick else 120.0)
    grid = [(2, 4)] if args.quick else [(R, K) for R in (3, 4, 5) for K in (16, 32)]
    strategies = ("greedy", "random-greedy", "dp", "optimal")
    rows = []
    for R, K in grid:
        tg.ops.plan_cache_clear()
        est, s, fs = _factors(R, K)
        t0 = time.perf_counter()
        plan = est.plan(tg.FactorGraph(fs, s.ordinals))
        plan_s = time.perf_counter() - t0
        (step,) = plan.steps
        shapes = [tuple(f.tensor.shape) for f in fs]
        others = {}
        for strat in strategies:
            if strat == "optimal" and len(fs) > 12 and not args.quick:
                others[strat] = {"error": f"not attempted: {len(fs)} operands (exhaustive search)"}
                continue
            others[strat] = opt_einsum_path(step.equation, shapes, strat, budget)
        finished = [o["cost"] for o in others.values() if "cost" in o]
        best = min(finished) if finished else None
        limit = args.limit or K ** 4
        runs = {}
        if plan.largest_tensor <= args.max_unlimited:
            runs["no_limit"] = run_child(R, K, None, reps)
        else:
            runs["no_limit"] = {"error": f"not run: largest intermediate {plan.largest_tensor} elements "
                                         f"({plan.largest_tensor * 4 / 2**30:.1f} GiB in float32)"}
        runs["limit"] = run_child(R, K, limit, reps)
        runs["limit"]["memory_limit"] = limit
        try:
            tg.TMC(*lattice(R, R)[:2], K=K, memory_limit=K - 1).plan(tg.FactorGraph(fs, s.ordinals))
            too_small = {"raised": False}
        except tg.TMCGraphError as e:
            too_small = {"raised": True, "memory_limit": K - 1, "message": str(e)}
        row = {"R": R, "K": K, "n_factors": len(fs), "tmcgraph": {"cost": plan.cost,
               "largest_intermediate": plan.largest_tensor, "plan_s": plan_s}, "opt_einsum": others,
               "best_opt_einsum_cost": best, "tmcgraph_over_best": plan.cost / best if best else None,
               "runs": runs, "too_small_limit": too_small}
        lim = runs["limit"]
        row["limit_respected"] = "largest_tensor" in lim and lim["largest_tensor"] <= limit
        rows.append(row)
        print(f"{R}x{R} K={K}: cost tmcgraph {plan.cost:.3g} (plan {plan_s:.2f}s) vs " + ", ".join(
            f"{k} {o['cost']:.3g}" if "cost" in o else f"{k}: {o['error']}" for k, o in others.items())
            + (f"; ratio to best finished {row['tmcgraph_over_best']:.2f}" if best else ""))
        for k, r in runs.items():
            if "error" in r:
                print(f"    {k}: {r['error']}")
            else:
                print(f"    {k}: {r['seconds']:.3f}s, peak extra memory {r['peak_extra_bytes'] / 2**20:.1f} MiB, "
                      f"largest tensor {r['largest_tensor']} elements, slices {r['slices']}, value {r['value']:.4f}"
                      + (f" (float64 {r['value_float64']:.4f})" if r.get("value_float64") is not None else ""))
        print(f"    memory_limit={K - 1}: TMCGraphError raised at planning: {too_small['raised']}")
    return save_results(args, "perf_lattice", argv, threads, _plot, repetitions=reps, budget_s=budget, rows=rows)


def _plot(rows, path):
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    labels = [f"{r['R']}x{r['R']}\nK={r['K']}" for r in rows]
    xs = range(len(rows))
    ax = axes[0]
    ax.plot(xs, [r["tmcgraph"]["cost"] for r in rows], "o-", label="tmcgraph auto")
    for strat, mk in (("greedy", "s"), ("random-greedy", "^"), ("dp", "v"), ("optimal", "x")):
        pts = [(i, r["opt_einsum"][strat]["cost"]) for i, r in enumerate(rows) if "cost" in r["opt_einsum"][strat]]
        if pts:
            ax.plot(*zip(*pts), mk, label=f"opt_einsum {strat}")
    ax.set_yscale("log")
    ax.set_xticks(list(xs), labels, fontsize=7)
    ax.set_ylabel("plan cost (flops)")
    ax.legend(fontsize=7)
    ax = axes[1]
    for key, mk in (("no_limit", "o-"), ("limit", "s--")):
        pts = [(i, r["runs"][key]["peak_extra_bytes"] / 2**20) for i, r in enumerate(rows)
               if "peak_extra_bytes" in r["runs"][key]]
        if pts:
            ax.plot(*zip(*pts), mk, label="no limit" if key == "no_limit" else "memory_limit = K^4")
    pts = [(i, r["runs"]["limit"]["memory_limit"] * 4 / 2**20) for i, r in enumerate(rows)]
    ax.plot(*zip(*pts), "k:", label="limit x 4 bytes")
    ax.set_yscale("log")
    ax.set_xticks(list(xs), labels, fontsize=7)
    ax.set_ylabel("peak extra memory (MiB)")
    ax.legend(fontsize=7)
    save_figure(fig, path)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
