"""Speed of one TMC estimate on the paper's Gaussian toy: tmcgraph (eager, compiled) vs hand-written torch
(eager, compiled) vs Pyro.

Model theta ~ N(0, 1), z_i | theta ~ N(theta, 1), x_i | z_i ~ N(z_i, 1), i = 1..N, with
a factorised Gaussian proposal whose four parameters (means and log-scales of q(theta)
and q(z_i)) require gradients, so "forward + backward" differentiates the estimate
("forward" builds the same autograd graph and does not back-propagate). Contenders, run
in one process, interleaved, after a warm-up, with the same seed per repetition (they
all draw the same particles and return the same value, which is checked):

* ``tmcgraph``: ``TMC(model, proposal, K, device=..., compile=False).log_evidence`` (eager);
* ``tmcgraph-compiled``: the same with ``compile=True`` (tmcgraph compiles factor
  construction + contraction on a program's second call, so there are two warm-up
  repetitions; what it compiled, ``est.programs.info()``, is recorded), when ``tg.TMC``
  has that option (otherwise recorded as skipped with the reason);
* ``hand``: the shortest correct torch code for this model (broadcast log-probs,
  ``logsumexp`` over z's particles, sum over the plate, ``logsumexp`` over theta's);
* ``hand-compiled``: ``torch.compile(hand, dynamic=False)`` (random ops fall back to the
  eager stream, so it draws the same particles); compilation happens in the warm-up,
  whose time is reported as ``compile_s``;
* ``pyro``: ``pyro.infer.TraceTMC_ELBO`` with ``num_samples=K, expand=False`` (skipped
  with a message when ``pyro-ppl`` is not installed).

Timing (``_common.compare``): CPU time (``time.process_time``) per call, wall time
recorded too (on CUDA: synchronised wall time); medians, and medians of per-repetition
paired ratios (tmcgraph / hand, tmcgraph / hand-compiled, pyro / tmcgraph, ...).

The limit: ``torch.exp`` throughput measured in the same run (``_common.measure_limits``,
start and end of the run, the better one). Counting rule: the estimator inherently needs
one ``exp`` per entry of the ``[K_theta, K_z, N]`` grid of z's log-weights (the
``logsumexp`` over z's particles for every theta particle and data point), i.e. K * K * N
exps; the K exps of the outer ``logsumexp`` and the O(K N) proposal terms are lower order
and not counted. The same count is used for forward + backward (the backward can reuse
the forward's exponentials). ideal = K^2 N / (exp/s); fraction of the limit = ideal /
median time.

``--fig3``: instead, the timing panels of the paper's Fig. 3 (``toy_tmc_smc_iwae.py``: B, time
vs K at N = 128; D, time vs N at K = 128; TMC, SMC and IWAE interleaved by seed) with the
estimators on ``--device`` (synchronised), eager unless ``--fig3-compile`` says otherwise,
written as ``perf_toy_fig3.json``/``.png``. It reuses ``toy_tmc_smc_iwae.measure_point`` (the
estimators it builds are swapped for device-placed ones), so that script is not changed.

    python benchmarks/perf_toy.py                 # N in {128, 1024} x K in {128, 512}
    python benchmarks/perf_toy.py --quick         # tiny, for the tests
    python benchmarks/perf_toy.py --fig3 --device cuda
"""

from __future__ import annotations

import math
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
    command_line,
    compare,
    compile_backend,
    compile_hand,
    compile_info,
    keeps_process_state,
    limit_fields,
    machine_info,
    measure_limits,
    no_distribution_validation,
    output_paths,
    paired_ratio,
    parse_list,
    plot_contenders,
    print_row,
    pyplot,
    ratios,
    resolve_device,
    save_figure,
    save_partial,
    save_results,
    set_threads,
    synchronize,
    tmcgraph_compile_skip,
    tmcgraph_compiled_skip,
    tmcgraph_estimator,
    write_json,
)
from torch.distributions import Normal

import tmcgraph as tg
from tmcgraph.models.toys import gaussian_toy_data, gaussian_toy_log_evidence

__all__ = ["main", "compare", "pyro_or_none", "ratio", "tmc_toy", "hand_toy", "pyro_toy", "toy_exps"]

#: The timing helper and the paired ratio live in ``_common`` (one implementation for every
#: benchmark); they are re-exported here for the scripts that import them from this module.
ratio = paired_ratio


def pyro_or_none():
    """``(pyro, pyro.distributions, TraceTMC_ELBO, config_enumerate)`` or ``None`` with a printed message."""
    try:
        import pyro
        import pyro.distributions as pdist
        from pyro.infer import TraceTMC_ELBO, config_enumerate
    except ImportError as e:
        print(f"pyro-ppl not importable ({e}); skipping the Pyro column (pip install pyro-ppl)")
        return None
    pyro.enable_validation(False)  # as every contender: see _common.no_distribution_validation
    return pyro, pdist, TraceTMC_ELBO, config_enumerate


def pyro_tmc_loss(pyro_mods, model, guide, K: int, max_plate_nesting: int):
    """Negative TraceTMC_ELBO loss of a Pyro model/guide with ``num_samples=K, expand=False``."""
    _, _, TraceTMC_ELBO, config_enumerate = pyro_mods
    g = config_enumerate(guide, default="parallel", expand=False, num_samples=K)
    mm = config_enumerate(model, default="parallel", expand=False, num_samples=K)
    elbo = TraceTMC_ELBO(max_plate_nesting=max_plate_nesting)
    return lambda x: -elbo.differentiable_loss(mm, g, x)


def toy_exps(N: int, K: int) -> int:
    """Inherent exps of one toy estimate: one per entry of the ``[K, K, N]`` grid."""
    return K * K * N


def _params(device="cpu"):
    return {
        "m_theta": torch.zeros((), device=device, requires_grad=True),
        "s_theta": torch.zeros((), device=device, requires_grad=True),
        "m_z": torch.zeros((), device=device, requires_grad=True),
        "s_z": torch.full((), 0.5 * math.log(2.0), device=device, requires_grad=True),
    }


def tmc_toy(N: int, K: int, p: dict, device="cpu", compiled: bool = False):
    m = tg.Model()
    m.plate("data", size=N)
    m.latent("theta", lambda: Normal(0.0, 1.0))
    m.latent("z", lambda theta: Normal(theta, 1.0), plate="data")
    m.observed("x", lambda z: Normal(z, 1.0), plate="data")
    q = tg.Proposal(m)
    q.latent("theta", lambda: Normal(p["m_theta"], p["s_theta"].exp()))
    q.latent("z", lambda: Normal(p["m_z"], p["s_z"].exp()), plate="data")
    est = tmcgraph_estimator(tg.TMC, m, q, K, device=device, compiled=compiled)
    f = lambda x: est.log_evidence({"x": x})  # noqa: E731
    f.est = est
    return f


def hand_toy(K: int, p: dict):
    """The hand-written estimate; runs on the device of ``p`` and ``x``."""

    def f(x):
        N = x.shape[0]
        qt = Normal(p["m_theta"], p["s_theta"].exp())
        qz = Normal(p["m_z"], p["s_z"].exp())
        th = qt.rsample((K,))
        z = qz.rsample((K, N))
        lw_theta = Normal(0.0, 1.0).log_prob(th) - qt.log_prob(th)
        lw_z = Normal(th[:, None], 1.0).log_prob(z[:, None, :]) + (Normal(z, 1.0).log_prob(x) - qz.log_prob(z))[:, None]
        inner = torch.logsumexp(lw_z, 0) - math.log(K)
        return torch.logsumexp(lw_theta + inner.sum(-1), 0) - math.log(K)

    return f


def pyro_toy(K: int, p: dict, pyro_mods, device="cpu"):
    pyro, pdist = pyro_mods[:2]
    zero, one = torch.zeros((), device=device), torch.ones((), device=device)

    def model(x):
        th = pyro.sample("theta", pdist.Normal(zero, one))
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", pdist.Normal(th, 1.0))
            pyro.sample("x", pdist.Normal(z, 1.0), obs=x)

    def guide(x):
        pyro.sample("theta", pdist.Normal(p["m_theta"], p["s_theta"].exp()))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", pdist.Normal(p["m_z"], p["s_z"].exp()))

    return pyro_tmc_loss(pyro_mods, model, guide, K, max_plate_nesting=1)


@keeps_process_state
def main(argv=None) -> dict:
    ap = base_parser(__doc__, seeds=11)
    add_device_arg(ap)
    add_compile_arg(ap)
    ap.add_argument("--no-pyro", action="store_true", help="skip the Pyro column")
    ap.add_argument("--pyro-reps", type=int, default=None,
                    help="Pyro takes part in the first N measured repetitions only (default: all; it is slow)")
    ap.add_argument("--N", default=None, help="comma-separated data sizes (default 128,1024; quick 16)")
    ap.add_argument("--K", default=None, help="comma-separated particle counts (default 128,512; quick 8)")
    ap.add_argument("--fig3", action="store_true",
                    help="time Fig. 3's panels B and D (TMC, SMC, IWAE) on --device instead (perf_toy_fig3.*)")
    ap.add_argument("--fig3-N", default=None,
                    help="panel D's data sizes (default 8,32,128,512,1024,2048,4096; quick 8,32)")
    ap.add_argument("--fig3-compile", choices=("off", "on", "auto"), default="off",
                    help="compile= of Fig. 3's TMC and IWAE estimators (default off: eager, as in the paper; "
                         "auto: the library's default, which compiles large programs only)")
    ap.add_argument("--fig3-K", default=None, help="panel B's particle counts (default 1,4,16,64,256,1024; quick 2,8)")
    args = ap.parse_args(argv)
    dev = resolve_device(args.device)
    threads = {**set_threads(args.threads, args.allocator), **no_distribution_validation()}
    reps = args.seeds or (3 if args.quick else args.default_seeds)
    if args.fig3:
        return fig3(args, argv, dev, threads, reps)
    Ns = parse_list(args.N) or ([16] if args.quick else [128, 1024])
    Ks = parse_list(args.K) or ([8] if args.quick else [128, 512])
    backend = compile_backend(args)
    pm = None if args.no_pyro else pyro_or_none()
    limits0 = measure_limits(dev, args.quick)
    skip_tg = tmcgraph_compiled_skip(args)
    rows = []
    for N in Ns:
        for K in Ks:
            x = gaussian_toy_data(N, seed=1).to(dev)
            p = _params(dev)
            fns = {"tmcgraph": tmc_toy(N, K, p, dev)}
            skipped = {}
            if skip_tg:
                skipped["tmcgraph-compiled"] = skip_tg
            else:
                fns["tmcgraph-compiled"] = tmc_toy(N, K, p, dev, compiled=True)
            fns["hand"] = hand_toy(K, p)
            if args.no_compile:
                skipped["hand-compiled"] = "--no-compile"
            else:
                fns["hand-compiled"] = compile_hand(hand_toy(K, p), backend)
            if pm is not None:
                fns["pyro"] = pyro_toy(K, p, pm, dev)
            else:
                skipped["pyro"] = "pyro-ppl not importable" if not args.no_pyro else "--no-pyro"
            for mode in ("forward", "forward+backward"):
                res = compare({k: (lambda f=f: f(x)) for k, f in fns.items()}, reps, mode != "forward",
                              list(p.values()), device=dev, skipped=skipped,
                              max_reps={"pyro": args.pyro_reps} if args.pyro_reps else None)
                same = [k for k in ("tmcgraph-compiled", "hand", "hand-compiled", "pyro") if k in res]
                exact = float(gaussian_toy_log_evidence(x.cpu()))
                checks = check_values(res, same=same, exact=exact, exact_tol=max(5.0, 0.05 * abs(exact)))
                rs = ratios(res, ratio_pairs())
                row = {
                    "workload": "toy", "N": N, "K": K, "mode": mode, "results": res, "ratios": rs,
                    "tmcgraph_over_hand": rs.get("tmcgraph/hand"),
                    "tmcgraph_over_hand_compiled": rs.get("tmcgraph/hand-compiled"),
                    "pyro_over_tmcgraph": rs.get("pyro/tmcgraph"),
                    **checks,
                    "exact_log_evidence": exact,
                    "limit": limit_fields(res, limits0, exps=toy_exps(N, K)),
                    "tmcgraph_compiled_programs": compile_info(fns["tmcgraph-compiled"].est)
                    if "tmcgraph-compiled" in fns else None,
                }
                rows.append(row)
                print_row(f"N={N:5d} K={K:4d} {mode:17s}", row)
                save_partial(args, "perf_toy", argv, threads, repetitions=reps, device=str(dev), limits=limits0,
                             rows=rows)
    limits = best_limits(limits0, measure_limits(dev, args.quick))
    for row in rows:  # fractions against the better of the two limit measurements
        row["limit"] = limit_fields(row["results"], limits, exps=row["limit"]["exp_count"])
    return save_results(args, "perf_toy", argv, threads, _plot, repetitions=reps, device=str(dev),
                        compile_backend=backend, pyro=pm is not None, limits=limits, exp_counting_rule=EXP_RULE,
                        rows=rows)


EXP_RULE = "K*K*N: one exp per entry of the [K_theta, K_z, N] grid of z's log-weights (both modes)"


def ratio_pairs():
    """The paired ratios of the toy and the chain (``_common.RATIO_PAIRS`` plus Pyro over tmcgraph)."""
    return RATIO_PAIRS + (("pyro", "tmcgraph"), ("pyro", "hand-compiled"))


def _plot(rows, path):
    plot_contenders(rows, path, lambda r: f"N={r['N']} K={r['K']}\n{r['mode']}",
                    "Gaussian toy: one TMC estimate (median CPU time; limit: K^2 N exps at measured exp/s)")


# --------------------------------------------------------------------------------------
# Fig. 3's timing panels on a device.
# --------------------------------------------------------------------------------------


class _Synchronised:
    """An estimator whose ``log_evidence`` waits for the device (so wall-clock timing is right).

    Its first call runs the estimator twice: ``measure_point``'s one warm-up call then also
    covers tmcgraph's compilation, which happens on a program's second call.
    """

    def __init__(self, est, device):
        self.est, self.device, self.calls = est, device, 0

    def log_evidence(self, data, seed=None, **kw):
        self.calls += 1
        if self.calls == 1:
            self.est.log_evidence(data, seed=seed, **kw)
        v = self.est.log_evidence(data, seed=seed, **kw)
        synchronize(self.device)
        return v


def fig3(args, argv, dev, threads, reps) -> dict:
    """Panels B (time vs K at N = 128) and D (time vs N at K = 128) of ``toy_tmc_smc_iwae.py`` on ``dev``."""
    import toy_tmc_smc_iwae as f3

    from tmcgraph.infer.smc import SMC

    compile_opt = {"off": False, "on": True, "auto": "auto"}[args.fig3_compile]

    def estimator(method, model, proposal, K):
        if method == "SMC":
            e = SMC(model, proposal, K=K, device=dev, **f3.SMC_SETTINGS)
        else:
            cls = tg.TMC if method == "TMC" else tg.IWAE
            kw = {} if tmcgraph_compile_skip(cls) else {"compile": compile_opt}
            e = cls(model, proposal, K=K, device=dev, **kw)
        return _Synchronised(e, dev)

    N_B, K_D = (16, 8) if args.quick else (128, 128)
    Ks = parse_list(args.fig3_K) or ([2, 8] if args.quick else [4**i for i in range(6)])
    Ns = parse_list(args.fig3_N) or ([8, 32] if args.quick else [8, 32, 128, 512, 1024, 2048, 4096])
    seeds = list(range(reps))
    t0 = time.perf_counter()
    orig = f3.estimator
    f3.estimator = estimator  # measure_point builds its estimators through this module-level name
    try:
        rows = []
        for K in Ks:
            rows += f3.measure_point("B", N_B, K, list(f3.METHODS), seeds)
        for N in Ns:
            rows += f3.measure_point("D", N, K_D, list(f3.METHODS), seeds)
    finally:
        f3.estimator = orig
    jpath, ppath = output_paths(args.out, "perf_toy_fig3", args.quick)
    payload = {
        "benchmark": "perf_toy_fig3", "command": command_line(argv), "machine": machine_info(dev), **threads,
        "device": str(dev), "seeds_per_point": reps, "N_panel_B": N_B, "K_panel_D": K_D,
        "tmcgraph_compile": args.fig3_compile,
        "timing": "wall-clock seconds per estimate (toy_tmc_smc_iwae.measure_point: one warm-up per estimator "
                  "(two calls), interleaved by seed, torch.no_grad), device synchronised after every estimate",
        "wall_time_s": time.perf_counter() - t0, "rows": rows,
    }
    write_json(jpath, payload)
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, panel, x in ((axes[0], "B", "K"), (axes[1], "D", "N")):
        for m in f3.METHODS:
            rs = sorted((r for r in rows if r["panel"] == panel and r["method"] == m), key=lambda r: r[x])
            ax.plot([r[x] for r in rs], [r["time_s"]["median"] for r in rs], "o-", label=m)
        ax.set(xscale="log", yscale="log", xlabel=x, ylabel="median s per estimate")
        ax.set_title(f"{panel}: time vs {x} ({'N' if panel == 'B' else 'K'}={N_B if panel == 'B' else K_D}, {dev})",
                     fontsize=9)
        ax.legend(fontsize=8)
    save_figure(fig, ppath)
    print(f"wrote {jpath} and {ppath} in {payload['wall_time_s']:.1f} s")
    return payload


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
