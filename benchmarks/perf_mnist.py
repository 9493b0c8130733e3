"""Share of a TMC training step on the five-layer MNIST chain spent outside the neural networks.

One training step of :mod:`tmcgraph.deep`'s model with the ``"small"`` recognition model
(TMC objective, reparameterised gradients, Adam), K = 20, batch 128: sample, build
factors, plan (cached), contract, backward, optimizer step.

The networks' part is measured by *replaying* them: forward hooks on every network the
model and proposal declare record the exact inputs of each call during a step; the
replay calls the same networks on those inputs (made to require gradients, as in the
step) and back-propagates the sum of the distribution parameters they return. So the
replay times every network forward and backward, and nothing else. Outside share =
(step - networks - optimizer step) / step: log-densities, sampling bookkeeping, factor
assembly, planning and contraction (forward and backward). The forward pass is split
further by timing every network call and every ``log_prob`` of the distributions they
return (TMC's K x K grids of densities and the pixel likelihood); the rest of the
forward pass is the engine proper. Steps and replays alternate in one process; medians
are reported.

    python benchmarks/perf_mnist.py
    python benchmarks/perf_mnist.py --quick
"""

from __future__ import annotations

import statistics
import sys
import time

import torch
from _common import base_parser, command_line, machine_info, output_paths, pyplot, save_figure, set_threads, write_json

import tmcgraph as tg

__all__ = ["main"]


def _images(batch: int):
    """``(images [batch, 784] in [0, 1], source)``: MNIST training images, or uniform noise if absent."""
    from tmcgraph import datasets

    for root in (None, "/work/shared/data/mnist"):
        try:
            mn = datasets.load_mnist(root, download=False)
            return mn.train_images[:batch].reshape(batch, -1).float() / 255.0, str(mn.root)
        except Exception:
            continue
    return torch.rand(batch, 784), "uniform noise (MNIST not found)"


def _tensors(d, out):
    """Floating tensors requiring grad reachable from a distribution's attributes."""
    for v in vars(d).values():
        if torch.is_tensor(v) and v.requires_grad:
            out.append(v)
        elif isinstance(v, torch.distributions.Distribution):
            _tensors(v, out)
    return out


def main(argv=None) -> dict:
    ap = base_parser(__doc__, seeds=15)
    ap.add_argument("--K", type=int, default=None, help="particles per latent (default 20; quick 3)")
    ap.add_argument("--batch", type=int, default=None, help="batch size (default 128; quick 8)")
    args = ap.parse_args(argv)
    threads = set_threads(args.threads)
    try:
        from tmcgraph import deep
        from tmcgraph.objectives import objective
    except ImportError as e:
        print(f"tmcgraph.deep / tmcgraph.objectives not available ({e}); skipping the MNIST benchmark")
        return {"skipped": str(e)}
    K = args.K or (3 if args.quick else 20)
    B = args.batch or (8 if args.quick else 128)
    reps = args.seeds or (3 if args.quick else args.default_seeds)
    torch.manual_seed(0)
    model, proposal = deep.build("small")
    params = list(model.parameters()) + list(proposal.parameters())
    opt = torch.optim.Adam(params, lr=1e-3)
    est = tg.TMC(model, proposal, K=K)
    x, source = _images(B)
    data = {"x": x}

    calls = []
    recording = [False]

    timers = {"net": 0.0, "dens": 0.0, "t0": 0.0}

    def timed_log_prob(d):
        """Accumulate the time of every ``log_prob`` on ``d`` (and on its expansions)."""
        lp, ex = d.log_prob, d.expand

        def log_prob(v):
            t0 = time.perf_counter()
            out = lp(v)
            timers["dens"] += time.perf_counter() - t0
            return out

        d.log_prob = log_prob
        d.expand = lambda *a, **k: timed_log_prob(ex(*a, **k))
        return d

    def pre_hook(mod, inputs):
        timers["t0"] = time.perf_counter()

    def hook(mod, inputs, output):
        if recording[0]:
            timers["net"] += time.perf_counter() - timers["t0"]
            calls.append((mod, tuple((i.detach(), i.requires_grad) for i in inputs)))
            return timed_log_prob(output)

    mods = [m for decl in (model, proposal) for m in decl.fns.values()]
    handles = [m.register_forward_hook(hook) for m in mods] + [m.register_forward_pre_hook(pre_hook) for m in mods]

    def step(seed):
        torch.manual_seed(seed)
        timers["net"] = timers["dens"] = 0.0
        t0 = time.perf_counter()
        o = objective(est, data, "reparam")
        fwd = time.perf_counter() - t0
        split.append((fwd, timers["net"], timers["dens"]))
        opt.zero_grad(set_to_none=True)
        o.backward()
        t1 = time.perf_counter()
        opt.step()
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1, float(o.loss.detach()) if hasattr(o, "loss") else float("nan")

    def replay(recorded):
        """The networks on the recorded inputs, forward + backward."""
        opt.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        outs = []
        for mod, inputs in recorded:
            d = mod(*[i.clone().requires_grad_(g) for i, g in inputs])
            outs.extend(_tensors(d, []))
        sum(t.sum() for t in outs).backward()
        return time.perf_counter() - t0

    t_step, t_opt, t_net, losses, split = [], [], [], [], []
    recording[0] = True
    step(10**6)  # warm-up (plan search, allocator)
    recording[0] = False
    split.clear()
    for r in range(reps):
        calls.clear()
        recording[0] = True
        a, b, loss = step(r)
        recording[0] = False
        recorded = list(calls)
        t_net.append(replay(recorded))
        t_step.append(a + b)
        t_opt.append(b)
        losses.append(loss)
    for h in handles:
        h.remove()
    med = {k: statistics.median(v) for k, v in (("step_s", t_step), ("networks_s", t_net), ("optimizer_s", t_opt))}
    outside = [(s - n - o) / s for s, n, o in zip(t_step, t_net, t_opt)]
    fwd_engine = [(f - n - d) / f for f, n, d in split]
    fwd_dens = [d / f for f, n, d in split]
    fwd_net = [n / f for f, n, d in split]
    res = {
        "K": K, "batch": B, "recognition": "small", "images": source, "network_calls_per_step": len(recorded),
        **med, "outside_share_median": statistics.median(outside), "outside_share_per_rep": outside,
        "forward_split_median": {"networks": statistics.median(fwd_net), "log_densities": statistics.median(fwd_dens),
                                 "engine": statistics.median(fwd_engine)},
        "forward_split_per_rep": [list(x) for x in split],
        "step_times_s": t_step, "network_times_s": t_net, "optimizer_times_s": t_opt, "losses": losses,
    }
    fs = res["forward_split_median"]
    print(f"K={K} batch={B}: step {med['step_s'] * 1e3:.1f} ms, networks (fwd+bwd replay) "
          f"{med['networks_s'] * 1e3:.1f} ms, optimizer {med['optimizer_s'] * 1e3:.1f} ms: outside the networks "
          f"{100 * res['outside_share_median']:.1f}% of the step ({len(recorded)} network calls per step)")
    print(f"  forward pass split: networks {100 * fs['networks']:.1f}%, log_prob of their distributions "
          f"{100 * fs['log_densities']:.1f}%, engine (bookkeeping, factor assembly, planning, contraction) "
          f"{100 * fs['engine']:.1f}%")
    jpath, ppath = output_paths(args.out, "perf_mnist", args.quick)
    payload = {"benchmark": "perf_mnist", "command": command_line(argv), "machine": machine_info(), **threads,
               "repetitions": reps, "result": res}
    write_json(jpath, payload)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 2.2))
    step_ms, net, optm = med["step_s"] * 1e3, med["networks_s"] * 1e3, med["optimizer_s"] * 1e3
    rest = max(step_ms - net - optm, 0.0)
    # The outside part split in the forward pass's proportions of log-densities vs engine.
    fd, fe = fs["log_densities"], fs["engine"]
    dens = rest * fd / max(fd + fe, 1e-12)
    left = 0.0
    for w, lab in ((net, "networks"), (optm, "optimizer"), (dens, "log-densities (fwd share)"),
                   (rest - dens, "engine (fwd share)")):
        ax.barh([0], [w], left=left, label=lab)
        left += w
    ax.set_yticks([])
    ax.set_xlabel("ms per training step (median)")
    ax.set_title(f"MNIST chain, K={K}, batch {B}: outside share {100 * res['outside_share_median']:.1f}%")
    ax.legend(fontsize=7, loc="lower right")
    save_figure(fig, ppath)
    print(f"wrote {jpath} and {ppath}")
    return payload


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
