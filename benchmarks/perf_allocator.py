"""How much glibc's allocator costs TMC on CPU: default malloc vs ``tmcgraph.tune_allocator()``.

TMC's K x K log-factor grids are large short-lived tensors. With glibc's default
thresholds, blocks of a few MiB are often served by fresh ``mmap`` pages and handed
back on free, so every temporary pays page faults; whether a run does depends on the
history of its allocations, so it differs from process to process. This script
measures it where it matters, each workload in several fresh processes per allocator
setting (alternating), since the effect is per process:

* ``chain``: the Gaussian chain, n = 20, K = 1000, one estimate (tmcgraph, hand-written
  torch and Pyro's TraceTMC_ELBO when installed, alternating as in ``perf_chain.py``);
* ``toy``: the Gaussian toy, N = 1024, K = 128, forward + backward (tmcgraph, hand);
* ``mnist``: one training step of the five-layer MNIST chain, K = 20, batch 128
  (``"small"`` recognition model, TMC, reparameterised gradients, Adam).

Reports each process's median, the median over processes, and default / tuned ratios.

    python benchmarks/perf_allocator.py
    python benchmarks/perf_allocator.py --quick
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import subprocess
import sys

import torch
from _common import (
    base_parser,
    keeps_process_state,
    pyplot,
    save_figure,
    save_results,
    set_threads,
)

__all__ = ["main", "worker"]

HERE = pathlib.Path(__file__).resolve().parent
WORKLOADS = ("chain", "toy", "mnist")


def _sizes(quick: bool) -> dict:
    if quick:
        return {"chain": {"n": 4, "K": 16}, "toy": {"N": 16, "K": 8}, "mnist": {"K": 3, "batch": 8}}
    return {"chain": {"n": 20, "K": 1000}, "toy": {"N": 1024, "K": 128}, "mnist": {"K": 20, "batch": 128}}


def _mnist_step(K: int, batch: int):
    from perf_mnist import _images

    import tmcgraph as tg
    from tmcgraph.infer.objectives import objective
    from tmcgraph.models import mnist_vae

    torch.manual_seed(0)
    model, proposal = mnist_vae.build("small")
    opt = torch.optim.Adam(list(model.parameters()) + list(proposal.parameters()), lr=1e-3)
    est = tg.TMC(model, proposal, K=K)
    x, _ = _images(batch)

    def step():
        o = objective(est, {"x": x}, "reparam")
        opt.zero_grad(set_to_none=True)
        o.backward()
        opt.step()
        return torch.as_tensor(float(o.loss.detach()))

    return step


def worker(workload: str, size: dict, reps: int, no_pyro: bool) -> dict:
    """Time one workload in this process; ``{contender: median seconds}`` plus the raw times."""
    from perf_toy import compare, pyro_or_none

    backward, params = False, ()
    if workload == "chain":
        from perf_chain import hand_chain, pyro_chain, tmc_chain

        x = torch.tensor(0.5)
        fns = {"tmcgraph": tmc_chain(size["n"], size["K"]), "hand": hand_chain(size["n"], size["K"])}
        pm = None if no_pyro else pyro_or_none()
        if pm is not None:
            fns["pyro"] = pyro_chain(size["n"], size["K"], pm)
        fns = {k: (lambda f=f: f(x)) for k, f in fns.items()}
    elif workload == "toy":
        from perf_toy import _params, hand_toy, tmc_toy

        from tmcgraph.models.toys import gaussian_toy_data

        x = gaussian_toy_data(size["N"], seed=1)
        p = _params()
        fns = {k: (lambda f=f: f(x)) for k, f in
               {"tmcgraph": tmc_toy(size["N"], size["K"], p), "hand": hand_toy(size["K"], p)}.items()}
        backward, params = True, list(p.values())
    elif workload == "mnist":
        fns = {"tmcgraph": _mnist_step(size["K"], size["batch"])}
    else:
        raise ValueError(f"unknown workload {workload!r}; choose from {WORKLOADS}")
    res = compare(fns, reps, backward, params, warmup=2)
    return {k: {"median_s": r["median_s"], "times_s": r["times_s"]} if "median_s" in r else r for k, r in res.items()}


def _spawn(workload: str, allocator: str, size: dict, reps: int, threads: int, no_pyro: bool) -> dict:
    cmd = [sys.executable, str(HERE / "perf_allocator.py"), "--worker", workload, "--allocator", allocator,
           "--threads", str(threads), "--seeds", str(reps), "--size", json.dumps(size)]
    if no_pyro:
        cmd.append("--no-pyro")
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE, timeout=3600)
    if out.returncode != 0:
        raise RuntimeError(f"worker {workload}/{allocator} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


@keeps_process_state
def main(argv=None) -> dict:
    ap = base_parser(__doc__, seeds=9)
    ap.add_argument("--processes", type=int, default=None, help="fresh processes per setting (default 3; quick 1)")
    ap.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma-separated subset of {WORKLOADS}")
    ap.add_argument("--no-pyro", action="store_true", help="skip the Pyro contender")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: run one workload here
    ap.add_argument("--size", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    threads = set_threads(args.threads, args.allocator)
    reps = args.seeds or (3 if args.quick else args.default_seeds)
    if args.worker:
        print(json.dumps(worker(args.worker, json.loads(args.size), reps, args.no_pyro)))
        return {"worker": args.worker}
    procs = args.processes or (1 if args.quick else 3)
    sizes = _sizes(args.quick)
    workloads = [w for w in args.workloads.split(",") if w]
    for w in workloads:
        if w not in WORKLOADS:
            ap.error(f"unknown workload {w!r}; choose from {WORKLOADS}")
    rows = []
    for w in workloads:
        runs = {"default": [], "tuned": []}
        for _ in range(procs):
            for alloc in ("default", "tuned"):
                runs[alloc].append(_spawn(w, alloc, sizes[w], reps, args.threads, args.no_pyro))
        contenders = list(runs["default"][0])
        per = {}
        for c in contenders:
            per[c] = {}
            for alloc in runs:
                meds = [r[c]["median_s"] for r in runs[alloc] if "median_s" in r[c]]
                per[c][alloc] = {"process_medians_s": meds, "median_s": statistics.median(meds) if meds else None,
                                 "error": next((r[c]["error"] for r in runs[alloc] if "error" in r[c]), None)}
            d, t = per[c]["default"]["median_s"], per[c]["tuned"]["median_s"]
            per[c]["default_over_tuned"] = d / t if d and t else None
        row = {"workload": w, "size": sizes[w], "processes": procs, "contenders": per}
        for alloc in ("default", "tuned"):
            if "hand" in per and per["hand"][alloc]["median_s"]:
                row[f"tmcgraph_over_hand_{alloc}"] = per["tmcgraph"][alloc]["median_s"] / per["hand"][alloc]["median_s"]
            if "pyro" in per and per["pyro"][alloc]["median_s"]:
                row[f"pyro_over_tmcgraph_{alloc}"] = per["pyro"][alloc]["median_s"] / per["tmcgraph"][alloc]["median_s"]
        rows.append(row)
        for c, r in per.items():
            fmt = lambda v: "  ".join(f"{1e3 * x:.1f}" for x in v)  # noqa: E731
            print(f"{w:6s} {c:9s} default [{fmt(r['default']['process_medians_s'])}] ms  "
                  f"tuned [{fmt(r['tuned']['process_medians_s'])}] ms  default/tuned "
                  + (f"{r['default_over_tuned']:.2f}" if r["default_over_tuned"] else "-"))
    return save_results(args, "perf_allocator", argv, threads, _plot, repetitions_per_process=reps, rows=rows)


def _plot(rows, path):
    plt = pyplot()
    labels, dv, tv = [], [], []
    for r in rows:
        for c, p in r["contenders"].items():
            if p["default"]["median_s"] and p["tuned"]["median_s"]:
                labels.append(f"{r['workload']}\n{c}")
                dv.append(1e3 * p["default"]["median_s"])
                tv.append(1e3 * p["tuned"]["median_s"])
    fig, ax = plt.subplots(figsize=(max(4, 1.1 * len(labels)), 3.2))
    xs = range(len(labels))
    ax.bar([x - 0.2 for x in xs], dv, 0.4, label="default malloc")
    ax.bar([x + 0.2 for x in xs], tv, 0.4, label="tune_allocator()")
    ax.set_xticks(list(xs))
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_ylabel("ms (median over processes)")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    save_figure(fig, path)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
