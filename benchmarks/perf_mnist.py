"""Share of a TMC training step on the five-layer MNIST chain spent outside the neural networks.

One training step of :mod:`tmcgraph.models.mnist_vae`'s model with the ``"small"`` recognition model
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
forward pass is the engine proper.

The practical limit is measured too: :func:`hand_tmc`, the shortest hand-written torch
code for TMC on this one model (same networks, same distributions, same sampling order,
so with the same seed it returns tmcgraph's values, which is checked), trains a copy of
the model with the same seeds. ``tmcgraph / hand`` is the engine's cost over it, and the
hand-written step's own outside share shows how much of the 'outside' is inherent to
TMC's K x K density grids rather than to the engine. Steps, hand-written steps and
replays alternate in one process; medians are reported.

    python benchmarks/perf_mnist.py
    python benchmarks/perf_mnist.py --quick
"""

from __future__ import annotations

import copy
import math
import pathlib
import statistics
import sys
import time

import torch
from _common import base_parser, command_line, machine_info, output_paths, pyplot, save_figure, set_threads, write_json

import tmcgraph as tg

__all__ = ["main"]


def _images(batch: int):
    """``(images [batch, 784] in [0, 1], source)``: MNIST training images, or uniform noise if absent."""
    from tmcgraph.data import mnist as mnist_data

    shared = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
    for root in (None, shared):
        try:
            mn = mnist_data.load_mnist(root, download=False)
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


def hand_tmc(model, proposal, x: torch.Tensor, K: int) -> torch.Tensor:
    """Hand-written TMC for the five-layer chain with the mixture proposal: ``log P_TMC`` per image ``[B]``.

    The shortest torch code for this one model: the same networks and distributions as
    the engine, each non-factorised layer sampled from a uniformly chosen parent particle
    (one network pass over the K parent particles, parameters gathered), its density the
    mixture (1/K) sum_j Q(z^k | z_pa^j) over a K x K grid, the model's K x K grids, and
    the chain summed bottom-up with ``logsumexp``.
    """
    names = [f"z{i + 1}" for i in range(5)]
    lk = math.log(K)
    B = x.shape[0]
    zs, lq = [], []
    q1 = proposal.fns["z1"](x)
    z = q1.rsample((K,))  # [K, B, F]
    zs.append(z)
    lq.append(q1.log_prob(z))
    for n in names[1:]:
        qd = proposal.fns[n](zs[-1])  # loc/scale [K_parent, B, F]
        j = torch.randint(K, (K, B))
        loc = qd.loc.gather(0, j[..., None].expand(K, B, qd.loc.shape[-1]))
        scale = qd.scale.gather(0, j[..., None].expand(K, B, qd.scale.shape[-1]))
        z = loc + scale * torch.randn_like(loc)
        zs.append(z)
        lq.append(torch.logsumexp(qd.log_prob(z[:, None]), 1) - lk)  # grid [K_child, K_parent, B]
    msg = model.fns["x"](zs[0]).log_prob(x)  # [K1, B]
    for i in range(4):  # P(z_i | z_{i+1}) grids, bottom-up
        pd = model.fns[names[i]](zs[i + 1])  # [K_{i+1}, B, F]
        f = pd.log_prob(zs[i][:, None]) - (lq[i] + lk)[:, None]  # [K_i, K_{i+1}, B]
        msg = torch.logsumexp(f + msg[:, None], 0)  # [K_{i+1}, B]
    top = model.fns["z5"]().log_prob(zs[4]) - lq[4] - lk
    return torch.logsumexp(top + msg, 0)


def main(argv=None) -> dict:
    ap = base_parser(__doc__, seeds=15)
    ap.add_argument("--K", type=int, default=None, help="particles per latent (default 20; quick 3)")
    ap.add_argument("--batch", type=int, default=None, help="batch size (default 128; quick 8)")
    args = ap.parse_args(argv)
    threads = set_threads(args.threads, args.allocator)
    try:
        from tmcgraph.infer.objectives import objective
        from tmcgraph.models import mnist_vae
    except ImportError as e:
        print(f"tmcgraph.models.mnist_vae not available ({e}); skipping the MNIST benchmark")
        return {"skipped": str(e)}
    K = args.K or (3 if args.quick else 20)
    B = args.batch or (8 if args.quick else 128)
    reps = args.seeds or (3 if args.quick else args.default_seeds)
    torch.manual_seed(0)
    model, proposal = mnist_vae.build("small", "mixture")  # the hand-written contender draws mixture indices
    params = list(model.parameters()) + list(proposal.parameters())
    opt = torch.optim.Adam(params, lr=1e-3)
    est = tg.TMC(model, proposal, K=K)
    x, source = _images(B)
    data = {"x": x}
    # The hand-written contender trains its own copy (same initial parameters, same seeds).
    h_model, h_proposal = copy.deepcopy(model), copy.deepcopy(proposal)
    h_opt = torch.optim.Adam(list(h_model.parameters()) + list(h_proposal.parameters()), lr=1e-3)
    with torch.no_grad():
        v_tmc = est.log_evidence(data, seed=123, elementwise=True)
        torch.manual_seed(123)
        v_hand = hand_tmc(h_model, h_proposal, x, K)
    agree = float((v_tmc - v_hand).abs().max())
    if agree > 1e-3 * float(v_tmc.abs().max()):
        raise RuntimeError(f"hand-written TMC and tmcgraph disagree on the same particles by {agree}")

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

    def hand_step(seed):
        torch.manual_seed(seed)
        t0 = time.perf_counter()
        loss = -hand_tmc(h_model, h_proposal, x, K).mean()
        h_opt.zero_grad(set_to_none=True)
        loss.backward()
        t1 = time.perf_counter()
        h_opt.step()
        return t1 - t0, time.perf_counter() - t1, float(loss.detach())

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

    t_step, t_opt, t_net, t_hand, losses, hand_losses, split = [], [], [], [], [], [], []
    recording[0] = True
    step(10**6)  # warm-up (plan search, allocator)
    recording[0] = False
    hand_step(10**6)
    split.clear()
    for r in range(reps):
        calls.clear()
        recording[0] = True
        a, b, loss = step(r)
        recording[0] = False
        recorded = list(calls)
        t_net.append(replay(recorded))
        ha, hb, hl = hand_step(r)
        t_hand.append(ha + hb)
        hand_losses.append(hl)
        t_step.append(a + b)
        t_opt.append(b)
        losses.append(loss)
    for h in handles:
        h.remove()
    med = {k: statistics.median(v) for k, v in (("step_s", t_step), ("networks_s", t_net), ("optimizer_s", t_opt),
                                                 ("hand_step_s", t_hand))}
    outside = [(s - n - o) / s for s, n, o in zip(t_step, t_net, t_opt)]
    fwd_engine = [(f - n - d) / f for f, n, d in split]
    fwd_dens = [d / f for f, n, d in split]
    fwd_net = [n / f for f, n, d in split]
    res = {
        "K": K, "batch": B, "recognition": "small", "images": source, "network_calls_per_step": len(recorded),
        **med, "outside_share_median": statistics.median(outside), "outside_share_per_rep": outside,
        "tmcgraph_over_hand": med["step_s"] / med["hand_step_s"],
        "hand_outside_share_median": (med["hand_step_s"] - med["networks_s"] - med["optimizer_s"]) / med["hand_step_s"],
        "hand_value_max_abs_difference": agree, "hand_step_times_s": t_hand, "hand_losses": hand_losses,
        "forward_split_median": {"networks": statistics.median(fwd_net), "log_densities": statistics.median(fwd_dens),
                                 "engine": statistics.median(fwd_engine)},
        "forward_split_per_rep": [list(x) for x in split],
        "step_times_s": t_step, "network_times_s": t_net, "optimizer_times_s": t_opt, "losses": losses,
    }
    fs = res["forward_split_median"]
    print(f"K={K} batch={B}: step {med['step_s'] * 1e3:.1f} ms, networks (fwd+bwd replay) "
          f"{med['networks_s'] * 1e3:.1f} ms, optimizer {med['optimizer_s'] * 1e3:.1f} ms: outside the networks "
          f"{100 * res['outside_share_median']:.1f}% of the step ({len(recorded)} network calls per step)")
    print(f"  hand-written TMC step (same networks and densities) {med['hand_step_s'] * 1e3:.1f} ms: "
          f"tmcgraph / hand = {res['tmcgraph_over_hand']:.2f}; outside the networks there "
          f"{100 * res['hand_outside_share_median']:.1f}% (values agree to {agree:.1e})")
    print(f"  forward pass split: networks {100 * fs['networks']:.1f}%, log_prob of their distributions "
          f"{100 * fs['log_densities']:.1f}%, engine (bookkeeping, factor assembly, planning, contraction) "
          f"{100 * fs['engine']:.1f}%")
    jpath, ppath = output_paths(args.out, "perf_mnist", args.quick)
    payload = {"benchmark": "perf_mnist", "command": command_line(argv), "machine": machine_info(), **threads,
               "repetitions": reps, "result": res}
    write_json(jpath, payload)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 2.6))
    step_ms, net, optm = med["step_s"] * 1e3, med["networks_s"] * 1e3, med["optimizer_s"] * 1e3
    rest = max(step_ms - net - optm, 0.0)
    # The outside part split in the forward pass's proportions of log-densities vs engine.
    fd, fe = fs["log_densities"], fs["engine"]
    dens = rest * fd / max(fd + fe, 1e-12)
    left = 0.0
    for w, lab in ((net, "networks"), (optm, "optimizer"), (dens, "log-densities (fwd share)"),
                   (rest - dens, "engine (fwd share)")):
        ax.barh([1], [w], left=left, label=lab)
        left += w
    ax.barh([0], [med["hand_step_s"] * 1e3], color="grey", label="hand-written TMC step")
    ax.set_yticks([0, 1])
    ax.set_yticklabels(["hand", "tmcgraph"])
    ax.set_xlabel("ms per training step (median)")
    ax.set_title(f"MNIST chain, K={K}, batch {B}: outside share {100 * res['outside_share_median']:.1f}%")
    ax.legend(fontsize=7, loc="lower right")
    save_figure(fig, ppath)
    print(f"wrote {jpath} and {ppath}")
    return payload


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
