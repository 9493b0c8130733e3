"""The fused Bernoulli log-likelihood (``tmcgraph.sampling.densities``) against torch's own.

Two contenders, alternated in one process on the same inputs and seeds (A B B A ...):
``fused`` (the pipeline's default: ``sum_d x_d l_d - softplus(l_d)`` with a broadcasting
einsum) and ``torch`` (the kernel unregistered, so every factor calls
``Independent(Bernoulli(logits), 1).log_prob``, i.e. ``-binary_cross_entropy_with_logits``).

Workloads:

* ``op-mnist``: the log-likelihood alone, forward and backward, logits ``[20, 128, 784]``
  against data ``[128, 784]`` (one MNIST training step's pixel likelihood, K = 20);
* ``op-burda``: forward only, logits ``[214, 100, 784]`` (one chunk of ``L_5000``);
* ``mnist-iwae``, ``mnist-tmc``: a training step (sampling, objective, backward) of the
  five-layer MNIST model, small recognition model, K = 20, batch 128;
* ``burda-L5000``: ``burda.evaluate_bounds`` of the one-layer Burda model on 20 images at
  K = 5000.

Reported: the median over repetitions of the paired ratio of CPU times (torch / fused;
wall times on an accelerator, ``--device cuda``), and each contender's median time.
Inputs are random images (the speed does not depend on the pixel values). Both contenders' values are checked to agree.
"""

from __future__ import annotations

import contextlib
import pathlib
import statistics
import sys

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))  # this checkout's tmcgraph, even if another copy is installed

import torch  # noqa: E402
from _common import (  # noqa: E402
    add_device_arg,
    base_parser,
    clock,
    keeps_process_state,
    resolve_device,
    run_cli,
    save_results,
    set_threads,
    summary,
)
from torch.distributions import Independent  # noqa: E402

import tmcgraph as tg  # noqa: E402
from tmcgraph.infer.objectives import objective  # noqa: E402
from tmcgraph.models import burda, mnist_vae  # noqa: E402
from tmcgraph.sampling import densities  # noqa: E402

NAME = "perf_densities"
WORKLOADS = ("op-mnist", "op-burda", "mnist-iwae", "mnist-tmc", "burda-L5000")


@contextlib.contextmanager
def contender(name: str):
    """``fused``: as the pipeline runs; ``torch``: the Independent kernel unregistered for the block."""
    saved = densities._REGISTRY.get(Independent)
    if name == "torch":
        densities._REGISTRY.pop(Independent, None)
    try:
        yield
    finally:
        if saved is not None:
            densities._REGISTRY[Independent] = saved


def workload(name: str, quick: bool, device=torch.device("cpu")):
    """``fn(seed) -> float``: one timed call of the workload, on ``device``."""
    g = torch.Generator().manual_seed(0)
    if name.startswith("op-"):
        shape = {"op-mnist": (20, 128, 784), "op-burda": (214, 100, 784)}[name]
        if quick:
            shape = (4, 8, 784)
        logits = torch.randn(shape, generator=g).to(device).requires_grad_(name == "op-mnist")
        x = (torch.rand(shape[1:], generator=g) < 0.3).float().to(device)

        def fn(seed):
            lp = densities.log_prob(Independent(torch.distributions.Bernoulli(logits=logits), 1), x)
            if logits.requires_grad:
                (grad,) = torch.autograd.grad(lp.sum(), logits)
                return float(lp.detach().sum()) + float(grad.sum())
            return float(lp.detach().sum())

        return fn
    if name.startswith("mnist-"):
        B = 16 if quick else 128
        x = torch.rand(B, 784, generator=g).to(device)
        m, q = mnist_vae.build("small", coupling="mixture")
        m.to(device)
        q.to(device)
        est = (tg.TMC if name == "mnist-tmc" else tg.IWAE)(m, q, K=4 if quick else 20, compile=False, device=device)

        def fn(seed):
            o = objective(est, {"x": x}, "reparam", seed=seed)
            o.backward()
            return float(o.mean)

        return fn
    m, q = burda.build(1)
    m.to(device)
    q.to(device)
    x = (torch.rand(4 if quick else 20, 784, generator=g) < 0.3).float().to(device)

    def fn(seed):
        return float(burda.evaluate_bounds(m, q, x, K=50 if quick else 5000, seed=seed)["bound"].sum())

    return fn


def plot(rows, path):
    from _common import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    names = [r["workload"] for r in rows]
    ax.barh(names, [r["torch_over_fused"] for r in rows], color="tab:red")
    ax.axvline(1.0, color="k", lw=0.8)
    for i, r in enumerate(rows):
        ax.text(r["torch_over_fused"], i, f" {r['torch_over_fused']:.2f}x", va="center", fontsize=8)
    ax.set_xlabel("CPU time, torch's Bernoulli log_prob / fused (median of paired ratios)")
    ax.invert_yaxis()
    save_figure(fig, path)


@keeps_process_state
def main(argv=None) -> dict:
    p = base_parser(__doc__, seeds=1)
    p.add_argument("--reps", type=int, default=None, help="paired repetitions per workload (default 15; quick: 2)")
    p.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma list of {', '.join(WORKLOADS)}")
    add_device_arg(p)
    a = p.parse_args(argv)
    device = resolve_device(a.device)
    wall = device.type != "cpu"
    names = [w for w in a.workloads.split(",") if w]
    bad = [w for w in names if w not in WORKLOADS]
    if bad:
        raise tg.TMCGraphError(f"--workloads: unknown {bad}; choose from {list(WORKLOADS)}")
    threads = set_threads(a.threads, a.allocator)
    reps = a.reps or (2 if a.quick else 15)
    rows = []
    for name in names:
        fn = workload(name, a.quick, device)
        times = {"fused": [], "torch": []}
        values = {"fused": [], "torch": []}
        for c in ("fused", "torch"):  # warm-up
            with contender(c):
                fn(10**6)
        for i in range(reps):
            order = ("fused", "torch") if i % 2 == 0 else ("torch", "fused")
            for c in order:
                with contender(c):
                    v, cpu_s, wall_s = clock(lambda: fn(i), device)
                    times[c].append(wall_s if wall else cpu_s)
                    values[c].append(v)
        agree = max(abs(u - v) / (1 + abs(v)) for u, v in zip(values["fused"], values["torch"]))
        if agree > 1e-4:
            raise tg.TMCGraphError(f"{name}: fused and torch values differ (relative {agree:.2e})")
        ratio = statistics.median(t / f for t, f in zip(times["torch"], times["fused"]))
        row = {"workload": name, "torch_over_fused": ratio, "fused_cpu_s": summary(times["fused"]),
               "torch_cpu_s": summary(times["torch"]), "max_relative_difference": agree, "reps": reps,
               "time_basis": "wall" if wall else "cpu"}
        rows.append(row)
        print(f"{name:12s} fused {row['fused_cpu_s']['median'] * 1e3:9.1f} ms  torch "
              f"{row['torch_cpu_s']['median'] * 1e3:9.1f} ms  torch/fused {ratio:.2f}x", flush=True)
    return save_results(a, NAME, argv, threads, plot, quick=a.quick, device=str(device), rows=rows)


def cli(argv=None) -> int:
    return run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
