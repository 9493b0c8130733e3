"""Time per training step (and extrapolated per epoch) for IWAE and TMC on MNIST (the TMC paper's Fig. 6).

For each recognition model of ``--recognition`` (default: the paper's three, factorised,
small and large) six contenders: objective IWAE or TMC, each with the reparameterised,
STL and DReGs gradient estimators; the five-layer model, K = 20, batch 128, Adam 1e-3,
the mixture coupling. For the non-factorised models a seventh times TMC with the paired
coupling (a factorised proposal has no latent parents, so its coupling changes nothing).
Each contender trains its own copy of its model (the same initial weights for every
contender of a recognition model) on the same minibatches.

A training step is sampling, the objective, backward and the Adam update. All
contenders, of every recognition model, are timed round-robin in one process, in blocks
of ``--steps`` steps, repeated ``--repeats`` times; the reported figure is the median CPU
time of a step (``time.process_time``, steadier than wall time on a shared machine; wall
times are in the JSON beside it), and the per-epoch time is that median times the steps
per epoch (469 = 60000 images / 128) - an extrapolation, not a measured epoch. Fig. 6's
bars (``fig6``) average each method's epoch time over the recognition models, as the
paper does; ``tmc_over_iwae_step_ratio`` gives TMC / IWAE per model and estimator.

Target: TMC within 1.15x of IWAE per step (the paper reports similar times; a
reproduction measured 14 s vs 11 s per epoch on a GPU).
"""

from __future__ import annotations

import math
import pathlib
import statistics
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))  # this checkout's tmcgraph, even if another copy is installed

import torch  # noqa: E402
from _common import (  # noqa: E402
    base_parser,
    command_line,
    keeps_process_state,
    machine_info,
    output_paths,
    pyplot,
    save_figure,
    set_threads,
    summary,
    write_json,
)

import tmcgraph as tg  # noqa: E402
from tmcgraph.data import mnist as mnist_data  # noqa: E402
from tmcgraph.infer.objectives import GRADS, objective  # noqa: E402
from tmcgraph.models import mnist_vae  # noqa: E402

NAME = "mnist_epoch_time"


def parse(argv=None):
    p = base_parser(__doc__, seeds=1)
    p.add_argument("--steps", type=int, default=None, help="timed steps per block (default 10; quick: 1)")
    p.add_argument("--repeats", type=int, default=None, help="blocks per contender (default 7; quick: 2)")
    p.add_argument("--K", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=None, help="default 128; quick: 16")
    p.add_argument("--recognition", default=None,
                   help="comma list of recognition models (default: the paper's three; quick: small)")
    p.add_argument("--data", default=None, help="MNIST directory (default: $TMCGRAPH_DATA or the user cache)")
    return p.parse_args(argv)


class Contender:
    """One (objective, grad, coupling) training loop with its own model copy."""

    def __init__(self, objective_name: str, grad: str, coupling: str, recognition: str, K: int, init: dict):
        self.name = f"{recognition}/{objective_name}-{grad}" + ("" if coupling == "mixture" else f"-{coupling}")
        self.objective, self.grad, self.coupling, self.recognition = objective_name, grad, coupling, recognition
        m, q = mnist_vae.build(recognition, coupling)
        m.load_state_dict(init["model"])
        q.load_state_dict(init["proposal"])
        cls = tg.TMC if objective_name == "tmc" else tg.IWAE
        self.est = cls(m, q, K=K)
        self.opt = torch.optim.Adam(list(m.parameters()) + list(q.parameters()), lr=1e-3)
        self.times = []  # CPU seconds per step (time.process_time)
        self.wall = []  # wall seconds per step
        self.values = []

    def step(self, xb: torch.Tensor) -> float:
        o = objective(self.est, {"x": xb}, self.grad)
        self.opt.zero_grad(set_to_none=True)
        o.backward()
        self.opt.step()
        return o.mean


@keeps_process_state
def main(argv=None) -> dict:
    a = parse(argv)
    threads = set_threads(a.threads, a.allocator)
    steps = a.steps or (1 if a.quick else 10)
    a.batch_size = a.batch_size or (16 if a.quick else 128)
    steps_per_epoch = math.ceil(60000 / a.batch_size)
    repeats = a.repeats or (2 if a.quick else 7)
    data = mnist_data.load_mnist(a.data, download=False)
    x = data.train_x[: (4 if a.quick else 40) * a.batch_size]
    batches = x.split(a.batch_size)
    spec = a.recognition or ("small" if a.quick else ",".join(mnist_vae.RECOGNITION))
    recognitions = [r.strip() for r in spec.split(",") if r.strip()]
    unknown = [r for r in recognitions if r not in mnist_vae.RECOGNITION]
    if unknown or not recognitions:
        raise tg.TMCGraphError(f"--recognition: unknown model(s) {unknown}; choose from {list(mnist_vae.RECOGNITION)}")
    contenders = []
    for rec in recognitions:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            m0, q0 = mnist_vae.build(rec)
        init = {"model": m0.state_dict(), "proposal": q0.state_dict()}
        contenders += [Contender(o, g, "mixture", rec, a.K, init) for o in ("iwae", "tmc") for g in GRADS]
        if rec != "factorised":
            contenders.append(Contender("tmc", "reparam", "paired", rec, a.K, init))
    for c in contenders:  # warm-up (plans, allocator)
        c.step(batches[0])
    b = 0
    for _ in range(repeats):
        for c in contenders:
            for _ in range(steps):
                xb = batches[b % len(batches)]
                b += 1
                t0, w0 = time.process_time(), time.perf_counter()
                v = c.step(xb)
                c.times.append(time.process_time() - t0)
                c.wall.append(time.perf_counter() - w0)
                c.values.append(v)
    rows = {}
    for c in contenders:
        s = summary(c.times)
        rows[c.name] = {"recognition": c.recognition, "objective": c.objective, "grad": c.grad,
                        "coupling": c.coupling, "step_seconds": s, "wall_step_seconds": summary(c.wall),
                        "epoch_seconds_extrapolated": s["median"] * steps_per_epoch,
                        "last_objective": c.values[-1]}
    ratios = {f"{rec}/{g}": rows[f"{rec}/tmc-{g}"]["step_seconds"]["median"]
              / rows[f"{rec}/iwae-{g}"]["step_seconds"]["median"] for rec in recognitions for g in GRADS}
    paired = {rec: rows[f"{rec}/tmc-reparam-paired"]["step_seconds"]["median"]
              / rows[f"{rec}/iwae-reparam"]["step_seconds"]["median"]
              for rec in recognitions if f"{rec}/tmc-reparam-paired" in rows}
    fig6 = {f"{o}/{g}": statistics.fmean(rows[f"{rec}/{o}-{g}"]["epoch_seconds_extrapolated"] for rec in recognitions)
            for o in ("tmc", "iwae") for g in GRADS}
    payload = {
        "benchmark": NAME,
        "command": command_line(argv),
        "quick": a.quick,
        "setup": {"K": a.K, "batch_size": a.batch_size, "recognition": recognitions, "steps_per_block": steps,
                  "repeats": repeats, "steps_per_epoch": steps_per_epoch,
                  "time_basis": "CPU seconds of the process per step (time.process_time); wall seconds beside",
                  "epoch_time": "extrapolated: median CPU step time x steps per epoch"},
        "threads": threads,
        "machine": machine_info(),
        "contenders": rows,
        "tmc_over_iwae_step_ratio": ratios,
        "tmc_paired_over_iwae_step_ratio": paired,
        "fig6": {"epoch_seconds_mean_over_recognition_models": fig6,
                 "tmc_over_iwae": {g: fig6[f"tmc/{g}"] / fig6[f"iwae/{g}"] for g in GRADS}},
        "target": "TMC within 1.15x of IWAE per step",
        "target_met": {g: r <= 1.15 for g, r in ratios.items()},
    }
    json_path, png_path = output_paths(a.out, NAME, a.quick)
    write_json(json_path, payload)
    plot(payload, png_path)
    for n, r in rows.items():
        print(f"{n:>29}: {1000 * r['step_seconds']['median']:7.1f} CPU ms/step (median of {r['step_seconds']['n']}), "
              f"{r['epoch_seconds_extrapolated']:6.1f} s/epoch extrapolated")
    print("TMC / IWAE per step: " + ", ".join(f"{g} {r:.2f}x" for g, r in ratios.items()))
    print("TMC paired / IWAE per step: " + ", ".join(f"{g} {r:.2f}x" for g, r in paired.items()))
    print("Fig. 6 (mean over recognition models), TMC / IWAE per epoch: "
          + ", ".join(f"{g} {r:.2f}x" for g, r in payload["fig6"]["tmc_over_iwae"].items()))
    print(f"wrote {json_path} and {png_path}")
    return payload


def plot(payload: dict, path) -> None:
    plt = pyplot()
    rows = payload["contenders"]
    spe = payload["setup"]["steps_per_epoch"]
    recs = payload["setup"]["recognition"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    ax = axes[0]
    width = 0.8 / (2 * len(recs))
    for i, g in enumerate(GRADS):
        for j, (o, color) in enumerate((("iwae", "tab:blue"), ("tmc", "tab:red"))):
            for k, rec in enumerate(recs):
                r = rows[f"{rec}/{o}-{g}"]
                st = r["step_seconds"]
                x = i - 0.4 + width * (j * len(recs) + k + 0.5)
                ax.bar(x, r["epoch_seconds_extrapolated"], width, color=color, alpha=0.45 + 0.55 * (k + 1) / len(recs),
                       yerr=[[(st["median"] - st["q25"]) * spe], [(st["q75"] - st["median"]) * spe]],
                       label=f"{o.upper()}, {rec}" if i == 0 else None)
    ax.set_xticks(range(len(GRADS)))
    ax.set_xticklabels(["none (reparam)", "STL", "DReGs"])
    ax.set_ylabel("CPU s per epoch (extrapolated)")
    ax.legend(fontsize=6, ncol=2)
    f6 = payload["fig6"]["tmc_over_iwae"]
    ax.set_title("per recognition model (light to dark: " + ", ".join(recs) + ")\nmean over them, TMC / IWAE: "
                 + ", ".join(f"{g} {r:.2f}x" for g, r in f6.items()), fontsize=8)
    ax = axes[1]
    ratios = payload["tmc_over_iwae_step_ratio"]
    keys = list(ratios) + [f"{rec}/paired" for rec in payload["tmc_paired_over_iwae_step_ratio"]]
    vals = list(ratios.values()) + list(payload["tmc_paired_over_iwae_step_ratio"].values())
    ax.bar(range(len(keys)), vals, color=["tab:purple"] * len(ratios) + ["tab:gray"] * (len(keys) - len(ratios)))
    for k, v in enumerate(vals):
        ax.text(k, v, f"{v:.2f}", ha="center", va="bottom", fontsize=7)
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.axhline(1.15, color="tab:green", lw=0.8, ls=":", label="target 1.15")
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels([k.replace("factorised", "fact.").replace("/", "\n") for k in keys], fontsize=7)
    ax.set_ylabel("TMC / IWAE CPU time per step")
    ax.legend(fontsize=7)
    su = payload["setup"]
    fig.suptitle(f"MNIST Fig. 6: K={su['K']}, batch {su['batch_size']}, {payload['threads']['torch_threads']} "
                 "thread(s); bars: median step x steps per epoch, whiskers: quartiles", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


if __name__ == "__main__":
    main()
