"""MNIST training steps on the five-layer chain: TMC vs IWAE, tmcgraph (eager, compiled) vs hand-written
torch (eager, compiled), for the three recognition models; and the share of a TMC step spent outside
the networks.

**Step comparison** (``rows``): for each recognition model of :mod:`tmcgraph.models.mnist_vae`
(``"factorised"``, ``"small"``, ``"large"``; the engine's default coupling,
``tmcgraph.sampling.couplings.DEFAULT``, recorded per row), K = 20,
batch 128, MNIST training images, the reparameterised objective
``tmcgraph.infer.objectives.objective(est, data, "reparam").loss`` (minus the mean per-image
estimate), "forward" (the loss with its autograd graph) and "forward+backward" (plus
``loss.backward()``; no optimizer step, so every repetition sees the same parameters and
every contender can be checked on every repetition). Contenders, interleaved in one
process with the same seed per repetition, two warm-up repetitions:

* ``tmcgraph`` / ``tmcgraph-iwae``: ``TMC`` / ``IWAE`` with ``compile=False``;
* ``tmcgraph-compiled`` / ``tmcgraph-iwae-compiled``: the same with ``compile=True`` (skipped with
  the reason when the estimators have no such option);
* ``hand`` / ``hand-iwae``: the shortest torch code for TMC (:func:`hand_tmc`, or
  :func:`hand_tmc_factorised`) and IWAE (:func:`hand_iwae`) on this model: same networks,
  same distributions, same sampling order, so with the same seed they return tmcgraph's values
  (checked on every repetition);
* ``hand-compiled`` / ``hand-iwae-compiled``: those functions under ``torch.compile(dynamic=False)``.

Reported: median CPU time per contender, medians of paired ratios (tmcgraph / hand,
tmcgraph / hand-compiled, and the TMC / IWAE step ratio, ``tmcgraph/tmcgraph-iwae``, per
recognition model). The limit: ``torch.exp`` and float32 ``matmul`` throughput measured in the
same run; counting rule: exps = one per entry of every K x K x batch density grid (TMC: the four
model grids P(z_i | z_{i+1}); non-factorised recognition models add the four mixture-density
grids Q(z_{i+1} | z_i); IWAE has none) + one per Bernoulli pixel term per particle (K x batch x
784, the softplus of the logits) + one per standard deviation a network outputs (softplus);
flops = 2 x rows x in x out of every dense layer call (counted by hooks during one call), x 3
for forward+backward (input and weight gradients); the exps count once for both modes.
ideal = exps / (exp/s) + flops / (matmul flop/s).

**Outside share** (``result``; CPU only): one training step of the ``"small"`` model (TMC,
reparameterised gradients, Adam), K = 20, batch 128: sample, build factors, plan (cached),
contract, backward, optimizer step.

The networks' part is measured by *replaying* them: forward hooks on every network the
model and proposal declare record the exact inputs of each call during a step; the
replay calls the same networks on those inputs (made to require gradients, as in the
step) and back-propagates the sum of the distribution parameters they return. So the
replay times every network forward and backward, and nothing else. Outside share =
(step - networks - optimizer step) / step: log-densities, sampling bookkeeping, factor
assembly, planning and contraction (forward and backward). The forward pass is split
further by timing every network call and every ``log_prob`` of the distributions they
return (TMC's K x K grids of densities and the pixel likelihood); the rest of the
forward pass is the engine proper. Times there are CPU seconds (``time.process_time``).

The practical limit is measured too: :func:`hand_tmc` trains a copy of the model with the
same seeds. ``tmcgraph / hand`` is the engine's cost over it, and the hand-written step's
own outside share shows how much of the 'outside' is inherent to TMC's K x K density grids
rather than to the engine. Steps, hand-written steps and replays alternate in one
process; medians are reported.

    python benchmarks/perf_mnist.py
    python benchmarks/perf_mnist.py --quick      # K = 3, batch 8, "small" only
"""

from __future__ import annotations

import copy
import math
import pathlib
import statistics
import sys
import time

import torch
from _common import (
    RATIO_PAIRS,
    add_compile_arg,
    add_device_arg,
    base_parser,
    best_limits,
    check_values,
    compare,
    compile_backend,
    compile_hand,
    compile_info,
    keeps_process_state,
    limit_fields,
    measure_limits,
    no_distribution_validation,
    plot_contenders,
    print_row,
    ratios,
    resolve_device,
    save_partial,
    save_results,
    set_threads,
    tmcgraph_compiled_skip,
    tmcgraph_estimator,
)

import tmcgraph as tg

__all__ = ["main", "hand_tmc", "hand_tmc_factorised", "hand_iwae", "step_losses", "count_work"]

#: CPU seconds for the outside-share analysis.
_now = time.process_time


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


def hand_tmc(model, proposal, x: torch.Tensor, K: int, coupling: str = "mixture") -> torch.Tensor:
    """Hand-written TMC for the five-layer chain with a non-factorised proposal: ``log P_TMC`` per image ``[B]``.

    The shortest torch code for this one model: the same networks and distributions as
    the engine, each non-factorised layer sampled from a parent particle chosen by the
    coupling (``"mixture"``: uniformly; ``"permutation"``: a random permutation of the
    parents; :func:`parent_indices`) with one network pass over the K parent particles and
    the parameters gathered, its density the mixture (1/K) sum_j Q(z^k | z_pa^j) over a
    K x K grid (both couplings have it), the model's K x K grids, and the chain summed
    bottom-up with ``logsumexp``.
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
        j = parent_indices(K, B, coupling, x.device)
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


def parent_indices(K: int, B: int, coupling: str, device) -> torch.Tensor:
    """Parent particle of every particle and image, ``[K, B]``, drawn as tmcgraph draws them.

    ``"mixture"``: uniform integers; ``"permutation"``: a uniformly random permutation of the
    K parent particles per image (argsort of float64 uniforms along the particle axis).
    """
    if coupling == "mixture":
        return torch.randint(K, (K, B), device=device)
    if coupling == "permutation":
        return torch.rand((1, K, B), dtype=torch.float64, device=device).argsort(dim=1).reshape(K, B)
    raise ValueError(f"hand-written TMC supports the mixture and permutation couplings, not {coupling!r}")


def hand_tmc_factorised(model, proposal, x: torch.Tensor, K: int) -> torch.Tensor:
    """Hand-written TMC for the five-layer chain with the factorised recognition model: ``[B]``.

    Every layer is drawn independently from Q(z_i | x) (in tmcgraph's order, z5 first), so
    the proposal terms are vectors; the model's four K x K grids are contracted bottom-up.
    """
    names = [f"z{i + 1}" for i in range(5)]
    lk = math.log(K)
    zs, lq = {}, {}
    for n in reversed(names):
        qd = proposal.fns[n](x)
        zs[n] = qd.rsample((K,))
        lq[n] = qd.log_prob(zs[n])
    msg = model.fns["x"](zs["z1"]).log_prob(x)
    for i in range(4):
        pd = model.fns[names[i]](zs[names[i + 1]])
        f = pd.log_prob(zs[names[i]][:, None]) - (lq[names[i]] + lk)[:, None]
        msg = torch.logsumexp(f + msg[:, None], 0)
    top = model.fns["z5"]().log_prob(zs["z5"]) - lq["z5"] - lk
    return torch.logsumexp(top + msg, 0)


def hand_iwae(model, proposal, x: torch.Tensor, K: int, factorised: bool) -> torch.Tensor:
    """Hand-written IWAE for the five-layer chain: K joint samples per image, ``[B]``.

    Non-factorised recognition models draw z_{i+1}^k from Q(z_{i+1} | z_i^k) (particle k
    follows particle k); the factorised one draws every layer from Q(z_i | x), z5 first.
    """
    names = [f"z{i + 1}" for i in range(5)]
    order = list(reversed(names)) if factorised else names
    zs, lw = {}, 0.0
    for i, n in enumerate(order):
        if factorised or i == 0:
            qd = proposal.fns[n](x)
            z = qd.rsample((K,))
        else:
            qd = proposal.fns[n](zs[order[i - 1]])
            z = qd.rsample()
        zs[n] = z
        lw = lw - qd.log_prob(z)
    lw = lw + model.fns["x"](zs["z1"]).log_prob(x) + model.fns["z5"]().log_prob(zs["z5"])
    for i in range(4):
        lw = lw + model.fns[names[i]](zs[names[i + 1]]).log_prob(zs[names[i]])
    return torch.logsumexp(lw, 0) - math.log(K)


def step_losses(model, proposal, x, K: int, recognition: str, device, backend: str, compiled_tg: bool,
                compiled_hand: bool, coupling: str = "mixture") -> tuple:
    """The contenders of one recognition model: ``({name: loss function}, {name: estimator})``."""
    from tmcgraph.infer.objectives import objective

    data = {"x": x}
    fact = recognition == "factorised"
    fns, ests = {}, {}
    for est_cls, suffix in ((tg.TMC, ""), (tg.IWAE, "-iwae")):
        for comp in (False, True):
            if comp and not compiled_tg:
                continue
            name = f"tmcgraph{suffix}" + ("-compiled" if comp else "")
            est = tmcgraph_estimator(est_cls, model, proposal, K, device=device, compiled=comp)
            ests[name] = est
            fns[name] = lambda est=est: objective(est, data, "reparam").loss
    if fact:
        h_tmc = lambda: -hand_tmc_factorised(model, proposal, x, K).mean()  # noqa: E731
    else:
        h_tmc = lambda: -hand_tmc(model, proposal, x, K, coupling).mean()  # noqa: E731
    h_iwae = lambda: -hand_iwae(model, proposal, x, K, fact).mean()  # noqa: E731
    fns["hand"], fns["hand-iwae"] = h_tmc, h_iwae
    if compiled_hand:
        fns["hand-compiled"] = compile_hand(h_tmc, backend)
        fns["hand-iwae-compiled"] = compile_hand(h_iwae, backend)
    return fns, ests


def count_work(model, proposal, x, K: int, recognition: str, estimator: str, coupling: str = "mixture") -> dict:
    """Inherent exps and dense-layer flops of one forward pass (counting rule in the module docstring).

    Runs the hand-written estimate once under ``no_grad`` with hooks on every dense layer
    (flops) and on every network the model and proposal declare (the softplus of each
    standard deviation, the Bernoulli pixel terms); adds the K x K x batch density grids.
    """
    from tmcgraph.models.mnist_vae import DiagNormal, WNLinear

    counts = {"flops": 0, "network_exps": 0}

    def lin_hook(mod, inputs, out):
        inp = inputs[0]
        counts["flops"] += 2 * (inp.numel() // mod.v.shape[1]) * mod.v.shape[1] * mod.v.shape[0]

    def net_hook(mod, inputs, out):
        if isinstance(out, DiagNormal):
            counts["network_exps"] += out.scale.numel()
        elif hasattr(out, "base_dist") and hasattr(out.base_dist, "logits"):
            counts["network_exps"] += out.base_dist.logits.numel()

    mods = [m for decl in (model, proposal) for m in decl.fns.values()]
    handles = [m.register_forward_hook(net_hook) for m in mods]
    handles += [m.register_forward_hook(lin_hook) for d in (model, proposal) for m in d.modules()
                if isinstance(m, WNLinear)]
    try:
        with torch.no_grad():
            torch.manual_seed(0)
            fact = recognition == "factorised"
            if estimator == "iwae":
                hand_iwae(model, proposal, x, K, fact)
            elif fact:
                hand_tmc_factorised(model, proposal, x, K)
            else:
                hand_tmc(model, proposal, x, K, coupling)
    finally:
        for h in handles:
            h.remove()
    B = x.shape[0]
    grids = 0 if estimator == "iwae" else (4 if recognition == "factorised" else 8)
    return {"grids": grids, "grid_exps": grids * K * K * B, "network_exps": counts["network_exps"],
            "exps": grids * K * K * B + counts["network_exps"], "forward_flops": counts["flops"]}


def step_comparison(args, dev, K: int, B: int, reps: int, argv=None, threads=None) -> tuple:
    """The step comparison rows (see the module docstring) and the limits."""
    from tmcgraph.models import mnist_vae

    recognitions = [r for r in (args.recognition or ("small" if args.quick else "factorised,small,large")).split(",")
                    if r]
    compile_recs = args.compile_recognition.split(",") if args.compile_recognition else recognitions
    backend = compile_backend(args)
    limits0 = measure_limits(dev, args.quick)
    x, source = _images(B)
    x = x.to(dev)
    skip_tg_all = tmcgraph_compiled_skip(args, tg.TMC, tg.IWAE)
    coupling = default_coupling()
    rows = []
    for rec in recognitions:
        torch.manual_seed(0)
        model, proposal = mnist_vae.build(rec)
        model.to(dev)
        proposal.to(dev)
        params = list(model.parameters()) + list(proposal.parameters())
        not_listed = None if rec in compile_recs else f"not in --compile-recognition {args.compile_recognition}"
        skip_tg = skip_tg_all or not_listed
        skip_hand = "--no-compile" if args.no_compile else not_listed
        fns, ests = step_losses(model, proposal, x, K, rec, dev, backend, skip_tg is None, skip_hand is None, coupling)
        skipped = {}
        if skip_tg:
            skipped["tmcgraph-compiled"] = skipped["tmcgraph-iwae-compiled"] = skip_tg
        if skip_hand:
            skipped["hand-compiled"] = skipped["hand-iwae-compiled"] = skip_hand
        work = {e: count_work(model, proposal, x, K, rec, e, coupling) for e in ("tmc", "iwae")}
        for mode in ("forward", "forward+backward"):
            res = compare(fns, reps, mode != "forward", params, device=dev, skipped=skipped)
            c1 = check_values(res, same=[k for k in ("tmcgraph-compiled", "hand", "hand-compiled") if k in res],
                              reference="tmcgraph")
            c2 = check_values(res, same=[k for k in ("tmcgraph-iwae-compiled", "hand-iwae", "hand-iwae-compiled")
                                         if k in res], reference="tmcgraph-iwae", soft_same=())
            pairs = RATIO_PAIRS + tuple((a.replace("tmcgraph", "tmcgraph-iwae").replace("hand", "hand-iwae"),
                                         b.replace("tmcgraph", "tmcgraph-iwae").replace("hand", "hand-iwae"))
                                        for a, b in RATIO_PAIRS) + (
                ("tmcgraph", "tmcgraph-iwae"), ("tmcgraph-compiled", "tmcgraph-iwae-compiled"), ("hand", "hand-iwae"),
                ("hand-compiled", "hand-iwae-compiled"))
            rs = ratios(res, pairs)
            fmul = 1 if mode == "forward" else 3
            lim_t = limit_fields({k: v for k, v in res.items() if "iwae" not in k}, limits0,
                                 exps=work["tmc"]["exps"], flops=fmul * work["tmc"]["forward_flops"])
            lim_i = limit_fields({k: v for k, v in res.items() if "iwae" in k}, limits0,
                                 exps=work["iwae"]["exps"], flops=fmul * work["iwae"]["forward_flops"])
            row = {
                "workload": "mnist", "recognition": rec, "coupling": None if rec == "factorised" else coupling,
                "K": K, "batch": B, "mode": mode,
                "images": source, "results": res, "ratios": rs,
                "tmcgraph_over_hand": rs.get("tmcgraph/hand"),
                "tmcgraph_over_hand_compiled": rs.get("tmcgraph/hand-compiled"),
                "tmc_over_iwae": rs.get("tmcgraph/tmcgraph-iwae"),
                "max_abs_value_difference": max(c1["max_abs_value_difference"], c2["max_abs_value_difference"]),
                "value_checks": {**c1["value_checks"], **c2["value_checks"]},
                "work": work,
                "limit": _merge_limits(lim_t, lim_i),
                "tmcgraph_compiled_programs": {k: compile_info(e) for k, e in ests.items() if "compiled" in k},
            }
            rows.append(row)
            print_row(f"{rec:10s} K={K} batch={B} {mode}", row)
            save_partial(args, "perf_mnist", argv, threads or {}, repetitions=reps, device=str(dev),
                         limits=limits0, rows=rows)
    limits = best_limits(limits0, measure_limits(dev, args.quick))
    for row in rows:
        fmul = 1 if row["mode"] == "forward" else 3
        w, res = row["work"], row["results"]
        row["limit"] = _merge_limits(
            limit_fields({k: v for k, v in res.items() if "iwae" not in k}, limits, exps=w["tmc"]["exps"],
                         flops=fmul * w["tmc"]["forward_flops"]),
            limit_fields({k: v for k, v in res.items() if "iwae" in k}, limits, exps=w["iwae"]["exps"],
                         flops=fmul * w["iwae"]["forward_flops"]))
    return rows, limits, backend


def default_coupling() -> str:
    """The coupling ``mnist_vae.build`` uses when none is named (the engine's default)."""
    from tmcgraph.sampling import couplings

    d = getattr(couplings, "DEFAULT", "mixture")
    return d if isinstance(d, str) else getattr(d, "name", str(d))


def _merge_limits(tmc: dict, iwae: dict) -> dict:
    """One ``limit`` entry for a row with TMC and IWAE contenders (each against its own ideal)."""
    fr = ("fraction_of_limit", "fraction_of_fused_limit")
    out = {"tmc": {k: v for k, v in tmc.items() if k not in fr},
           "iwae": {k: v for k, v in iwae.items() if k not in fr}}
    for k in fr:
        if k in tmc:
            out[k] = {**tmc[k], **iwae[k]}
    return out


@keeps_process_state
def main(argv=None) -> dict:
    ap = base_parser(__doc__, seeds=15)
    add_device_arg(ap)
    add_compile_arg(ap)
    ap.add_argument("--K", type=int, default=None, help="particles per latent (default 20; quick 3)")
    ap.add_argument("--batch", type=int, default=None, help="batch size (default 128; quick 8)")
    ap.add_argument("--recognition", default=None,
                    help="comma-separated recognition models (default factorised,small,large; quick small)")
    ap.add_argument("--compile-recognition", default=None,
                    help="run the compiled contenders only for these recognition models (default: all)")
    ap.add_argument("--no-outside-share", action="store_true", help="skip the outside-the-networks analysis")
    args = ap.parse_args(argv)
    dev = resolve_device(args.device)
    threads = {**set_threads(args.threads, args.allocator), **no_distribution_validation()}
    try:
        from tmcgraph.infer.objectives import objective  # noqa: F401
        from tmcgraph.models import mnist_vae  # noqa: F401
    except ImportError as e:
        print(f"tmcgraph.models.mnist_vae not available ({e}); skipping the MNIST benchmark")
        return {"skipped": str(e)}
    K = args.K or (3 if args.quick else 20)
    B = args.batch or (8 if args.quick else 128)
    reps = args.seeds or (3 if args.quick else args.default_seeds)
    rows, limits, backend = step_comparison(args, dev, K, B, reps, argv, threads)
    if args.no_outside_share:
        res = {"skipped": "--no-outside-share"}
    elif dev.type != "cpu":
        res = {"skipped": f"the outside-share analysis times host-side intervals; CPU only (device {dev})"}
    else:
        res = outside_share(K, B, reps)
    return save_results(args, "perf_mnist", argv, threads, lambda rows, path: _plot(rows, res, path),
                        repetitions=reps, device=str(dev), compile_backend=backend, limits=limits,
                        exp_counting_rule=EXP_RULE, rows=rows, result=res)


EXP_RULE = ("exps = grids*K*K*batch (TMC: 4 model grids, +4 mixture-density grids for non-factorised "
            "recognition; IWAE: 0) + K*batch*784 pixel terms + network standard deviations (softplus); "
            "flops = 2*rows*in*out per dense layer call (x3 for forward+backward)")


def outside_share(K: int, B: int, reps: int) -> dict:
    """The outside-the-networks analysis of one ``"small"`` TMC training step (CPU seconds)."""
    from tmcgraph.infer.objectives import objective
    from tmcgraph.models import mnist_vae

    torch.manual_seed(0)
    model, proposal = mnist_vae.build("small")
    params = list(model.parameters()) + list(proposal.parameters())
    opt = torch.optim.Adam(params, lr=1e-3)
    est = tmcgraph_estimator(tg.TMC, model, proposal, K)  # eager: the hooks time every network call
    coupling = default_coupling()
    x, source = _images(B)
    data = {"x": x}
    # The hand-written contender trains its own copy (same initial parameters, same seeds).
    h_model, h_proposal = copy.deepcopy(model), copy.deepcopy(proposal)
    h_opt = torch.optim.Adam(list(h_model.parameters()) + list(h_proposal.parameters()), lr=1e-3)
    with torch.no_grad():
        v_tmc = est.log_evidence(data, seed=123, elementwise=True)
        torch.manual_seed(123)
        v_hand = hand_tmc(h_model, h_proposal, x, K, coupling)
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
            t0 = _now()
            out = lp(v)
            timers["dens"] += _now() - t0
            return out

        d.log_prob = log_prob
        d.expand = lambda *a, **k: timed_log_prob(ex(*a, **k))
        return d

    def pre_hook(mod, inputs):
        timers["t0"] = _now()

    def hook(mod, inputs, output):
        if recording[0]:
            timers["net"] += _now() - timers["t0"]
            calls.append((mod, tuple((i.detach(), i.requires_grad) for i in inputs)))
            return timed_log_prob(output)

    mods = [m for decl in (model, proposal) for m in decl.fns.values()]
    handles = [m.register_forward_hook(hook) for m in mods] + [m.register_forward_pre_hook(pre_hook) for m in mods]

    def step(seed):
        torch.manual_seed(seed)
        timers["net"] = timers["dens"] = 0.0
        t0 = _now()
        o = objective(est, data, "reparam")
        fwd = _now() - t0
        split.append((fwd, timers["net"], timers["dens"]))
        opt.zero_grad(set_to_none=True)
        o.backward()
        t1 = _now()
        opt.step()
        t2 = _now()
        return t1 - t0, t2 - t1, float(o.loss.detach()) if hasattr(o, "loss") else float("nan")

    def hand_step(seed):
        torch.manual_seed(seed)
        t0 = _now()
        loss = -hand_tmc(h_model, h_proposal, x, K, coupling).mean()
        h_opt.zero_grad(set_to_none=True)
        loss.backward()
        t1 = _now()
        h_opt.step()
        return t1 - t0, _now() - t1, float(loss.detach())

    def replay(recorded):
        """The networks on the recorded inputs, forward + backward."""
        opt.zero_grad(set_to_none=True)
        t0 = _now()
        outs = []
        for mod, inputs in recorded:
            d = mod(*[i.clone().requires_grad_(g) for i, g in inputs])
            outs.extend(_tensors(d, []))
        sum(t.sum() for t in outs).backward()
        return _now() - t0

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
        "K": K, "batch": B, "recognition": "small", "coupling": coupling, "timing": "CPU seconds (process_time)",
        "images": source, "network_calls_per_step": len(recorded),
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
    return res


def _plot(rows, res, path):
    """The step comparison (time and fraction of the limit) and, if run, the outside-share bar."""

    def extra(ax):
        med = res
        step_ms, net, optm = med["step_s"] * 1e3, med["networks_s"] * 1e3, med["optimizer_s"] * 1e3
        rest = max(step_ms - net - optm, 0.0)
        fs = res["forward_split_median"]
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
        ax.set_xlabel("CPU ms per training step (median)")
        ax.set_title(f"small, K={res['K']}, batch {res['batch']}: outside the networks "
                     f"{100 * res['outside_share_median']:.1f}%", fontsize=9)
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))

    plot_contenders(rows, path, lambda r: f"{r['recognition']}\n{r['mode']}",
                    f"MNIST chain, K={rows[0]['K']}, batch {rows[0]['batch']}: loss (fwd) / loss + backward, "
                    "TMC and IWAE (median; limit: exps and dense flops at measured rates)",
                    extra=extra if "step_s" in res else None)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
