"""Time per training step (and extrapolated per epoch) for IWAE and TMC on MNIST (the TMC paper's Fig. 6).

Six contenders, side by side in one process: objective IWAE or TMC, each with the
reparameterised, STL and DReGs gradient estimators; the five-layer model with the small
non-factorised recognition model (mixture coupling), K = 20, batch 128, Adam 1e-3. A
seventh row times TMC with the paired coupling. Each contender trains its own copy of
the model (same initial weights) on the same minibatches.

A training step is sampling, the objective, backward and the Adam update. Contenders
are timed round-robin in blocks of ``--steps`` steps, repeated ``--repeats`` times; the
reported figure is the median CPU time of a step (``time.process_time``, steadier than
wall time on a shared machine; wall times are in the JSON beside it), and the per-epoch
time is that median times the steps per epoch (469 = 60000 images / 128) - an
extrapolation, not a measured epoch.

Target: TMC within 1.15x of IWAE per step (the paper reports similar times; a
reproduction measured 14 s vs 11 s per epoch on a GPU).
"""

from __future__ import annotations

import math
import pathlib
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
    p.add_argument("--recognition", default="small")
    p.add_argument("--data", default=None, help="MNIST directory (default: $TMCGRAPH_DATA or the user cache)")
    return p.parse_args(argv)


class Contender:
    """One (objective, grad, coupling) training loop with its own model copy."""

    def __init__(self, objective_name: str, grad: str, coupling: str, recognition: str, K: int, init: dict):
        self.name = f"{objective_name}-{grad}" + ("" if coupling == "mixture" else f"-{coupling}")
        self.objective, self.grad, self.coupling = objective_name, grad, coupling
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
    torch.manual_seed(0)
    m0, q0 = mnist_vae.build(a.recognition)
    init = {"model": m0.state_dict(), "proposal": q0.state_dict()}
    contenders = [Contender(o, g, "mixture", a.recognition, a.K, init) for o in ("iwae", "tmc") for g in GRADS]
    contenders.append(Contender("tmc", "reparam", "paired", a.recognition, a.K, init))
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
        rows[c.name] = {"objective": c.objective, "grad": c.grad, "coupling": c.coupling, "step_seconds": s,
                        "wall_step_seconds": summary(c.wall),
                        "epoch_seconds_extrapolated": s["median"] * steps_per_epoch,
                        "last_objective": c.values[-1]}
    ratios = {g: rows[f"tmc-{g}"]["step_seconds"]["median"] / rows[f"iwae-{g}"]["step_seconds"]["median"]
              for g in GRADS}
    payload = {
        "benchmark": NAME,
        "command": command_line(argv),
        "quick": a.quick,
        "setup": {"K": a.K, "batch_size": a.batch_size, "recognition": a.recognition, "steps_per_block": steps,
                  "repeats": repeats, "steps_per_epoch": steps_per_epoch,
                  "time_basis": "CPU seconds of the process per step (time.process_time); wall seconds beside",
                  "epoch_time": "extrapolated: median CPU step time x steps per epoch"},
        "threads": threads,
        "machine": machine_info(),
        "contenders": rows,
        "tmc_over_iwae_step_ratio": ratios,
        "target": "TMC within 1.15x of IWAE per step",
        "target_met": {g: r <= 1.15 for g, r in ratios.items()},
    }
    json_path, png_path = output_paths(a.out, NAME, a.quick)
    write_json(json_path, payload)
    plot(payload, png_path)
    for n, r in rows.items():
        print(f"{n:>18}: {1000 * r['step_seconds']['median']:7.1f} CPU ms/step (median of {r['step_seconds']['n']}), "
              f"{r['epoch_seconds_extrapolated']:6.1f} s/epoch extrapolated")
    print("TMC / IWAE per step: " + ", ".join(f"{g} {r:.2f}x" for g, r in ratios.items()))
    print(f"wrote {json_path} and {png_path}")
    return payload


def plot(payload: dict, path) -> None:
    plt = pyplot()
    rows = payload["contenders"]
    spe = payload["setup"]["steps_per_epoch"]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    width = 0.38
    for i, g in enumerate(GRADS):
        for j, (o, color) in enumerate((("iwae", "tab:blue"), ("tmc", "tab:red"))):
            r = rows[f"{o}-{g}"]
            s = r["step_seconds"]
            ax.bar(i + (j - 0.5) * width, r["epoch_seconds_extrapolated"], width, color=color,
                   yerr=[[(s["median"] - s["q25"]) * spe], [(s["q75"] - s["median"]) * spe]],
                   label=o.upper() if i == 0 else None)
    ax.set_xticks(range(len(GRADS)))
    ax.set_xticklabels(["none (reparam)", "STL", "DReGs"])
    ax.set_ylabel("CPU s per epoch (extrapolated)")
    st = payload["setup"]
    ax.set_title(f"MNIST, {st['recognition']} recognition, K={st['K']}, batch {st['batch_size']}, "
                 f"{payload['threads']['torch_threads']} thread(s); bars: median, whiskers: quartiles", fontsize=8)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)



if __name__ == "__main__":
    main()
