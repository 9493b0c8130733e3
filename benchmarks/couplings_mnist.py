"""Couplings on MNIST: mixture vs permutation vs paired for the paper's non-factorised VAE.

Trains the five-layer VAE of ``tmcgraph.models.mnist_vae`` (``build("small", coupling)``,
the TMC paper's small non-factorised recognition model) once per coupling in
{mixture, permutation, paired}: K = 20 particles per latent, batch 128, Adam 1e-3,
reparameterised TMC objective, ``--steps`` optimiser steps. The runs are interleaved step
by step (A B C A B C ...) in one process, start from the same initial weights and see the
same minibatches (a seeded shuffle of the full training set, epoch after epoch).

Every ``--eval-every`` steps (and at step 0 and at the last step) each model is evaluated
on the first ``--limit-test`` test images under *each* coupling: the TMC bound
``bound(est, data)`` (log P_TMC per image, nats) with the model's weights and the
recognition layers drawn with the evaluation coupling (the same evaluation seeds for
every pair), so the same weights are compared under all three draws/densities.
Differences between evaluation couplings are reported per image with their standard
error (same images, so image-to-image variation cancels).

Step time is the CPU time (``time.process_time``, single thread) of one optimiser step
(objective, backward, Adam), median per coupling; wall-clock is recorded too.

Report: which coupling gives the best bound (trained and evaluated with the same
coupling) at equal steps, and at equal training CPU time (each curve linearly
interpolated at the shortest run's total training time).

    python benchmarks/couplings_mnist.py                      # 300 steps, K=20, 1000 test images
    python benchmarks/couplings_mnist.py --steps 600 --eval-every 100
    python benchmarks/couplings_mnist.py --quick              # seconds; writes *_quick.*
    python benchmarks/couplings_mnist.py --replot benchmarks/results/couplings_mnist.json
"""

from __future__ import annotations

import json
import math
import pathlib
import statistics
import sys
import time

import torch

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(ROOT))  # this checkout's tmcgraph, even if another copy is installed

from _common import base_parser, keeps_process_state, pyplot, save_figure, save_results, set_threads, summary  # noqa: E402

import tmcgraph as tg  # noqa: E402
from tmcgraph.data import mnist as mnist_data  # noqa: E402
from tmcgraph.infer.objectives import bound, objective  # noqa: E402
from tmcgraph.models import mnist_vae  # noqa: E402

NAME = "couplings_mnist"
COUPLINGS = ("mixture", "permutation", "paired")
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "mnist"
COLORS = {"mixture": "tab:red", "permutation": "tab:green", "paired": "tab:orange"}


def parse(argv=None):
    p = base_parser(__doc__, seeds=1)
    p.add_argument("--steps", type=int, default=None, help="optimiser steps per coupling (default 300; quick: 4)")
    p.add_argument("--eval-every", type=int, default=None, help="evaluate every N steps (default 50; quick: 2)")
    p.add_argument("--K", type=int, default=None, help="particles per latent (default 20; quick: 3)")
    p.add_argument("--batch-size", type=int, default=None, help="training minibatch (default 128; quick: 8)")
    p.add_argument("--limit-test", type=int, default=None, help="test images evaluated (default 1000; quick: 16)")
    p.add_argument("--eval-batch-size", type=int, default=500, help="test images per bound call (default 500)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    p.add_argument("--recognition", default="small", choices=mnist_vae.RECOGNITION)
    p.add_argument("--couplings", default=",".join(COUPLINGS),
                   help=f"comma-separated couplings to train and evaluate (default {','.join(COUPLINGS)})")
    p.add_argument("--seed", type=int, default=0, help="initial weights, minibatch order and particle seeds")
    p.add_argument("--replot", type=pathlib.Path, default=None,
                   help="redraw the PNG from an existing JSON result (no training)")
    p.add_argument("--data", type=pathlib.Path, default=DEFAULT_DATA,
                   help=f"directory of the four MNIST IDX .gz files (default {DEFAULT_DATA}); never downloads")
    a = p.parse_args(argv)
    q = a.quick
    a.steps = a.steps or (4 if q else 300)
    a.eval_every = a.eval_every or (2 if q else 50)
    a.K = a.K or (3 if q else 20)
    a.batch_size = a.batch_size or (8 if q else 128)
    a.limit_test = a.limit_test or (16 if q else 1000)
    a.couplings = tuple(c.strip() for c in a.couplings.split(",") if c.strip())
    bad = [c for c in a.couplings if c not in COUPLINGS]
    if bad or not a.couplings:
        p.error(f"--couplings: choose from {COUPLINGS}, got {a.couplings}")
    for name in ("steps", "eval_every", "K", "batch_size", "limit_test", "eval_batch_size"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(a, name)}")
    return a


def minibatches(n: int, batch_size: int, generator: torch.Generator):
    """Index tensors of a seeded shuffle of ``range(n)``, epoch after epoch, forever."""
    while True:
        yield from mnist_data.batches(n, batch_size, shuffle=True, generator=generator)


def evaluate(est, x: torch.Tensor, batch_size: int, seed: int) -> torch.Tensor:
    """Per-image TMC bound (nats), ``[len(x)]``, seeded per chunk."""
    return torch.cat([bound(est, {"x": xb}, seed=seed + i) for i, xb in enumerate(x.split(batch_size))]).double()


def _se(v: torch.Tensor) -> float:
    return float(v.std() / math.sqrt(len(v))) if len(v) > 1 else 0.0


def _interp(xs: list, ys: list, x: float) -> float:
    """Piecewise-linear interpolation of ``ys(xs)`` at ``x`` (clamped to the ends)."""
    if x <= xs[0]:
        return ys[0]
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0) if x1 > x0 else y1
    return ys[-1]


@keeps_process_state
def main(argv=None) -> dict:
    a = parse(argv)
    if a.replot is not None:
        payload = json.loads(a.replot.read_text())
        png = a.replot.with_suffix(".png")
        plot(payload["rows"], png, payload)
        print(f"wrote {png}")
        return payload
    threads = set_threads(a.threads, a.allocator)
    data = mnist_data.load_mnist(a.data, download=False)  # the error names the directory if files are missing
    train_x, test_x = data.train_x, data.test_x[: a.limit_test]
    cs = a.couplings

    # The same initial weights for every coupling: build once, copy the state into every run.
    torch.manual_seed(a.seed)
    m0, q0 = mnist_vae.build(a.recognition, cs[0])
    init = (m0.state_dict(), q0.state_dict())
    runs = {}
    for c in cs:
        m, q = mnist_vae.build(a.recognition, c)
        m.load_state_dict(init[0])
        q.load_state_dict(init[1])
        params = list(m.parameters()) + list(q.parameters())
        runs[c] = {"model": m, "proposal": q, "est": tg.TMC(m, q, K=a.K),
                   "opt": torch.optim.Adam(params, lr=a.lr), "cpu": [], "wall": [], "objective": []}
    # Evaluation copies: one (model, proposal) per evaluation coupling, loaded with a run's weights.
    evals = {}
    for c in cs:
        m, q = mnist_vae.build(a.recognition, c)
        evals[c] = (m, q, tg.TMC(m, q, K=a.K))

    def eval_point(step: int) -> list:
        out = []
        seed = 1_000_000 + 1000 * step
        for ct in cs:
            per = {}
            for ce in cs:
                m, q, est = evals[ce]
                m.load_state_dict(runs[ct]["model"].state_dict())
                q.load_state_dict(runs[ct]["proposal"].state_dict())
                per[ce] = evaluate(est, test_x, a.eval_batch_size, seed)
            ref = per["mixture"] if "mixture" in per else per[cs[0]]
            for ce in cs:
                v = per[ce]
                if not torch.isfinite(v).all():
                    raise tg.TMCGraphError(f"non-finite test bound at step {step} (trained {ct}, evaluated {ce})")
                d = v - ref
                out.append({
                    "step": step, "train_coupling": ct, "eval_coupling": ce,
                    "bound": float(v.mean()), "bound_se_images": _se(v),
                    "minus_mixture": float(d.mean()), "minus_mixture_se": _se(d),
                    "train_cpu_s": sum(runs[ct]["cpu"]), "train_wall_s": sum(runs[ct]["wall"]),
                })
        diag = "  ".join(f"{r['train_coupling']} {r['bound']:.2f}" for r in out
                         if r["train_coupling"] == r["eval_coupling"])
        print(f"step {step:5d}: test TMC bound (trained = evaluated coupling) {diag}", flush=True)
        return out

    t_start = time.perf_counter()
    shuffle = torch.Generator().manual_seed(a.seed + 1)
    batches = minibatches(len(train_x), a.batch_size, shuffle)
    rows = eval_point(0)
    t_eval = time.perf_counter() - t_start
    for step in range(1, a.steps + 1):
        xb = train_x[next(batches)]
        for c in cs:  # interleaved: A B C A B C ...
            r = runs[c]
            w0, c0 = time.perf_counter(), time.process_time()
            o = objective(r["est"], {"x": xb}, "reparam", seed=a.seed * 10_000_019 + step)
            if not torch.isfinite(o.loss):
                raise tg.TMCGraphError(f"non-finite training objective at step {step} ({c})")
            r["opt"].zero_grad(set_to_none=True)
            o.backward()
            r["opt"].step()
            r["cpu"].append(time.process_time() - c0)
            r["wall"].append(time.perf_counter() - w0)
            r["objective"].append(o.mean)
        if step % a.eval_every == 0 or step == a.steps:
            t0 = time.perf_counter()
            rows += eval_point(step)
            t_eval += time.perf_counter() - t0
        if step % 10 == 0 and not a.quick:
            s = "  ".join(f"{c} {statistics.fmean(runs[c]['objective'][-10:]):.1f} "
                          f"({statistics.median(runs[c]['cpu'][-10:]) * 1e3:.0f} ms)" for c in cs)
            print(f"  step {step}: train objective (last 10) {s}", flush=True)
    wall = time.perf_counter() - t_start

    step_time = {c: {"cpu_s": summary(runs[c]["cpu"]), "wall_s": summary(runs[c]["wall"])} for c in cs}
    last = a.steps
    final = {(r["train_coupling"], r["eval_coupling"]): r for r in rows if r["step"] == last}
    diag = {c: final[(c, c)]["bound"] for c in cs}
    best_steps = max(cs, key=lambda c: diag[c])
    # Equal CPU time: each run's diagonal curve against its cumulative training CPU time.
    t_budget = min(sum(runs[c]["cpu"]) for c in cs)
    at_time = {}
    for c in cs:
        rs = sorted((r for r in rows if r["train_coupling"] == c and r["eval_coupling"] == c), key=lambda r: r["step"])
        at_time[c] = _interp([r["train_cpu_s"] for r in rs], [r["bound"] for r in rs], t_budget)
    best_time = max(cs, key=lambda c: at_time[c])
    # Same weights, each evaluation coupling: which draw gives the tightest bound?
    best_eval = {ct: max(cs, key=lambda ce: final[(ct, ce)]["bound"]) for ct in cs}
    verdict = {
        "final_step": last,
        "trained_and_evaluated_same_coupling": diag,
        "best_at_equal_steps": best_steps,
        "equal_time_budget_cpu_s": t_budget,
        "bound_at_equal_cpu_time": at_time,
        "best_at_equal_time": best_time,
        "best_eval_coupling_for_each_trained_model": best_eval,
        "final_matrix": {f"trained {ct}": {f"evaluated {ce}": final[(ct, ce)]["bound"] for ce in cs} for ct in cs},
    }
    budget = {"steps": a.steps, "eval_every": a.eval_every, "K": a.K, "batch_size": a.batch_size, "lr": a.lr,
                "recognition": a.recognition, "grad": "reparam", "objective": "tmc", "couplings": list(cs),
                "seed": a.seed, "train_images": len(train_x), "test_images": len(test_x),
                "eval_batch_size": a.eval_batch_size, "wall_s": wall, "eval_wall_s": t_eval}
    train_objective = {c: runs[c]["objective"] for c in cs}
    meta = {"budget": budget, "step_time": step_time, "train_objective": train_objective,
            "threads": threads}
    payload = save_results(
        a, NAME, argv, {"threads": threads}, lambda rs, path: plot(rs, path, meta),
        quick=a.quick,
        budget=budget,
        step_time=step_time,
        train_objective=train_objective,
        timing="CPU seconds (time.process_time) per optimiser step (objective + backward + Adam); "
               "steps of the couplings interleaved; wall-clock also recorded",
        verdict=verdict,
        rows=rows,
    )
    print(f"after {last} steps (trained = evaluated): "
          + ", ".join(f"{c} {diag[c]:.2f}" for c in cs) + f" nats/image; best: {best_steps}")
    print(f"at equal training CPU time ({t_budget:.1f} s): "
          + ", ".join(f"{c} {at_time[c]:.2f}" for c in cs) + f"; best: {best_time}")
    print("median CPU time per step: " + ", ".join(f"{c} {step_time[c]['cpu_s']['median'] * 1e3:.1f} ms" for c in cs))
    for ct in cs:
        print(f"  trained {ct:11s}: " + "  ".join(
            f"eval {ce} {final[(ct, ce)]['bound']:.2f} ({final[(ct, ce)]['minus_mixture']:+.3f}"
            f" +- {final[(ct, ce)]['minus_mixture_se']:.3f})" for ce in cs))
    return payload


def _zoom(ax, values: list) -> None:
    """y-limits around the later values (the untrained start is far below)."""
    vs = sorted(values)
    if len(vs) > 3:
        lo, hi = vs[len(vs) // 4], vs[-1]
        pad = 0.05 * (hi - lo) + 0.1
        ax.set_ylim(lo - pad, hi + pad)


def plot(rows: list, path: pathlib.Path, meta: dict) -> None:
    """Four panels from the JSON fields: bound vs step, bound vs CPU time, the final-step
    evaluation matrix (differences to the mixture evaluation) and the training objective."""
    plt = pyplot()
    b, step_time = meta["budget"], meta["step_time"]
    cs = b["couplings"]
    fig, ax = plt.subplots(1, 4, figsize=(20, 4.4))
    diag_vals = []
    for c in cs:
        rs = sorted((r for r in rows if r["train_coupling"] == c and r["eval_coupling"] == c), key=lambda r: r["step"])
        diag_vals += [r["bound"] for r in rs]
        ax[0].plot([r["step"] for r in rs], [r["bound"] for r in rs], "o-", color=COLORS[c], ms=3, label=c)
        ax[1].plot([r["train_cpu_s"] for r in rs], [r["bound"] for r in rs], "o-", color=COLORS[c], ms=3, label=c)
        obj = meta["train_objective"][c]
        w = max(1, min(50, len(obj) // 5))
        sm = [statistics.fmean(obj[max(0, i - w + 1): i + 1]) for i in range(len(obj))]
        ax[3].plot(range(1, len(obj) + 1), sm, color=COLORS[c], lw=1,
                   label=f"{c} ({step_time[c]['cpu_s']['median'] * 1e3:.0f} ms/step)")
        ax[3].set_title(f"training objective (running mean of {w} steps)", fontsize=10)
    for a_, xl in ((ax[0], "step"), (ax[1], "training CPU seconds")):
        a_.set(xlabel=xl, ylabel="test TMC bound (nats/image)")
        a_.set_title("trained and evaluated with the same coupling", fontsize=10)
        _zoom(a_, diag_vals)
    _zoom(ax[3], [v for c in cs for v in meta["train_objective"][c]])
    last = max(r["step"] for r in rows)
    fin = [r for r in rows if r["step"] == last]
    width = 0.8 / len(cs)
    for j, ce in enumerate(cs):
        xs = [i + (j - (len(cs) - 1) / 2) * width for i in range(len(cs))]
        vals = [next(r for r in fin if r["train_coupling"] == ct and r["eval_coupling"] == ce) for ct in cs]
        ax[2].bar(xs, [v["minus_mixture"] for v in vals], width, yerr=[v["minus_mixture_se"] for v in vals],
                  color=COLORS[ce], capsize=2, label=f"evaluated {ce}")
    ax[2].axhline(0, color="k", lw=0.8)
    ax[2].set_xticks(range(len(cs)), [f"trained\n{c}" for c in cs])
    ax[2].set(ylabel="minus the mixture-evaluated bound (nats/image)")
    ax[2].set_title(f"same weights under each coupling, step {last} (+- SE over images)", fontsize=10)
    ax[3].set(xlabel="step", ylabel="training objective (nats/image)")
    for a_ in ax:
        a_.grid(alpha=0.3)
        a_.legend(fontsize=8)
    fig.suptitle(f"MNIST {b['recognition']} recognition, K={b['K']}, batch {b['batch_size']}, Adam {b['lr']}, "
                 f"{b['steps']} steps, {b['test_images']} test images, "
                 f"{meta['threads']['torch_threads']} thread(s)", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


def cli(argv=None) -> int:
    try:
        main(argv)
    except tg.TMCGraphError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli())
