"""Pyro's TraceTMC_ELBO vs the tmcgraph bridge vs native tmcgraph, on the same Pyro programs.

Workloads (the same programs written once in Pyro, run by Pyro's ``TraceTMC_ELBO`` and by
``tmcgraph.pyro``, and declared once natively with ``tg.Model``/``tg.Proposal``):

* ``toy``: the TMC paper's Gaussian toy, N = 128, K = 128: theta ~ N(0, 1),
  z_n ~ N(theta, 1), x_n ~ N(z_n, 1); factorised guide theta ~ N(loc, 1), z_n ~ N(0, 2).
  Exact log p(x) = log MVN(x; 0, 2I + 11^T).
* ``chain``: the paper's chain, n = 50, K = 100: z_i ~ N(z_{i-1}, 1/n), x = 1 ~ N(z_n, 1),
  with the non-factorised guide z_i ~ N(z_{i-1} + drift, 1/n) (drift = x / 2n, a
  ``pyro.param``). Exact log p(x) = log N(1; 0, 2). Couplings: Pyro's ``tmc="mixture"`` and
  ``"diagonal"`` against the bridge's (and native) mixture and paired couplings, and the
  permutation coupling (bridge's ``coupling=``, native).
* ``bias``: z1 ~ N(0, 1), z2 ~ N(z1, 1), x = 2 ~ N(z2, 1); guide z1 ~ N(0.5, 1),
  z2 ~ N(0.8 z1 + 0.3, 0.8); exact log p(x) = log N(2; 0, 3) = -2.135. For K in {3, 10}
  and each strategy: the mean of exp(log P_hat - log p(x)) over replicates (1 if the
  estimator of p(x) is unbiased) and its z-score; Pyro's loss is called once per
  replicate, the bridge's replicates are the elements of a plate.

Each step is the estimate and its backward pass (``loss_and_grads`` for Pyro), timed in
CPU seconds with ``torch.set_num_threads(1)``, the contenders interleaved per repetition
(``_common.compare``: the same ``torch.manual_seed(r)`` before each, so the bridge and the
native declaration draw the same particles, which is checked); medians over repetitions.
Validation of distribution arguments is off for every contender. The native and bridge
estimators run eagerly (``compile=False``).

    python benchmarks/pyro_bridge.py            # full (a few minutes)
    python benchmarks/pyro_bridge.py --quick    # seconds; writes pyro_bridge_quick.*
"""

from __future__ import annotations

import math
import pathlib
import statistics
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    base_parser,
    command_line,
    compare,
    keeps_process_state,
    machine_info,
    no_distribution_validation,
    output_paths,
    paired_ratio,
    pyplot,
    save_figure,
    set_threads,
    write_json,
)

NAME = "pyro_bridge"
GRIDS = {
    "full": {"toy": {"N": 128, "K": 128, "reps": 15}, "chain": {"n": 50, "K": 100, "reps": 10},
             "bias": {"K": [3, 10], "reps_pyro": 1000, "reps_bridge": 3000}},
    "quick": {"toy": {"N": 8, "K": 8, "reps": 2}, "chain": {"n": 4, "K": 5, "reps": 2},
              "bias": {"K": [3], "reps_pyro": 30, "reps_bridge": 200}},
}
CHAIN_X = 1.0
BIAS_X = 2.0
BIAS_EXACT = -0.5 * math.log(2 * math.pi * 3.0) - BIAS_X**2 / 6.0


def _imports():
    import pyro
    import pyro.distributions as dist
    from pyro.infer import TraceTMC_ELBO

    import tmcgraph as tg
    import tmcgraph.pyro as tgp

    return pyro, dist, TraceTMC_ELBO, tg, tgp


# ---------------------------------------------------------------------------------- programs


def toy_programs(pyro, dist):
    def model(x, K):
        theta = pyro.sample("theta", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(theta, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(x, K):
        loc = pyro.param("toy_loc", torch.tensor(0.0))
        pyro.sample("theta", dist.Normal(loc, 1.0), infer={"enumerate": "parallel", "num_samples": K})
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(0.0, math.sqrt(2.0)), infer={"enumerate": "parallel", "num_samples": K})

    return model, guide


def toy_native(tg, N, loc):
    from torch.distributions import Normal

    m = tg.Model()
    m.plate("data", size=N)
    m.latent("theta", lambda: Normal(0.0, 1.0))
    m.latent("z", lambda theta: Normal(theta, 1.0), plate="data")
    m.observed("x", lambda z: Normal(z, 1.0), plate="data")
    q = tg.Proposal(m)
    q.latent("theta", lambda: Normal(loc, 1.0))
    q.latent("z", lambda: Normal(0.0, math.sqrt(2.0)), plate="data")
    return m, q


def chain_programs(pyro, dist):
    def model(x, n, K, tmc):
        sd = math.sqrt(1.0 / n)
        z = pyro.sample("z1", dist.Normal(0.0, sd))
        for i in range(2, n + 1):
            z = pyro.sample(f"z{i}", dist.Normal(z, sd))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(x, n, K, tmc):
        sd = math.sqrt(1.0 / n)
        drift = pyro.param("drift", torch.tensor(CHAIN_X / (2 * n)))
        infer = {"enumerate": "parallel", "num_samples": K, "tmc": tmc}
        z = pyro.sample("z1", dist.Normal(drift, sd), infer=infer)
        for i in range(2, n + 1):
            z = pyro.sample(f"z{i}", dist.Normal(z + drift, sd), infer=infer)

    return model, guide


def chain_native(tg, n, coupling, drift):
    from torch.distributions import Normal

    sd = math.sqrt(1.0 / n)
    m = tg.Model()
    m.latent("z1", lambda: Normal(0.0, sd))
    for i in range(2, n + 1):
        m.latent(f"z{i}", lambda p: Normal(p, sd), parents=[f"z{i - 1}"])
    m.observed("x", lambda p: Normal(p, 1.0), parents=[f"z{n}"])
    q = tg.Proposal(m)
    q.latent("z1", lambda: Normal(drift, sd))
    for i in range(2, n + 1):
        q.latent(f"z{i}", lambda p: Normal(p + drift, sd), parents=[f"z{i - 1}"], coupling=coupling)
    return m, q


def bias_programs(pyro, dist):
    def model(R, K, tmc):
        with pyro.plate("rep", R):
            z1 = pyro.sample("z1", dist.Normal(0.0, 1.0))
            z2 = pyro.sample("z2", dist.Normal(z1, 1.0))
            pyro.sample("x", dist.Normal(z2, 1.0), obs=torch.full((R,), BIAS_X))

    def guide(R, K, tmc):
        infer = {"enumerate": "parallel", "num_samples": K}
        if tmc:
            infer["tmc"] = tmc
        with pyro.plate("rep", R):
            z1 = pyro.sample("z1", dist.Normal(0.5, 1.0), infer=infer)
            pyro.sample("z2", dist.Normal(0.8 * z1 + 0.3, 0.8), infer=infer)

    return model, guide


# ---------------------------------------------------------------------------------- measurements


def _summary(values, exact):
    vs = [float(v) for v in values]
    return {"median": statistics.median(vs), "mean": statistics.fmean(vs),
            "std": statistics.stdev(vs) if len(vs) > 1 else 0.0, "median_minus_exact": statistics.median(vs) - exact,
            "n": len(vs)}


def _row(name, params, exact, res, same_pairs, ratio_pairs):
    checks = {}
    for a, b in same_pairs:
        if "values" in res.get(a, {}) and "values" in res.get(b, {}):
            d = max(abs(x - y) for x, y in zip(res[a]["values"], res[b]["values"]))
            tol = 1e-3 * max(1.0, max(abs(v) for v in res[b]["values"]))
            checks[f"{a} == {b}"] = d
            if d > tol:
                raise RuntimeError(f"{name}: {a} and {b} disagree on the same particles by {d:.3g}")
    values = {k: _summary(r["values"], exact) for k, r in res.items() if "values" in r}
    ratios = {f"{a}/{b}": paired_ratio(res, a, b) for a, b in ratio_pairs}
    return {"workload": name, **params, "exact": exact, "results": res, "values": values,
            "same_particles_max_abs_difference": checks, "ratios": {k: v for k, v in ratios.items() if v}}


def measure_toy(mods, cfg):
    pyro, dist, TraceTMC_ELBO, tg, tgp = mods
    from tmcgraph.models.toys import gaussian_toy_data, gaussian_toy_log_evidence

    N, K = cfg["N"], cfg["K"]
    x = gaussian_toy_data(N, seed=0)
    exact = float(gaussian_toy_log_evidence(x))
    model, guide = toy_programs(pyro, dist)
    pyro.clear_param_store()
    guide(x, K)  # create the parameter
    ploc = pyro.param("toy_loc").unconstrained()
    loc = torch.tensor(0.0, requires_grad=True)
    m, q = toy_native(tg, N, loc)
    native = tg.TMC(m, q, K=K, compile=False)
    bridge = tgp.TMC(model, guide, max_plate_nesting=1)
    pyro_elbo = TraceTMC_ELBO(max_plate_nesting=1)
    fns = {
        "pyro": lambda: -pyro_elbo.differentiable_loss(model, guide, x, K),
        "bridge": lambda: bridge.log_evidence(x, K),
        "native": lambda: native.log_evidence({"x": x}),
    }
    res = compare(fns, cfg["reps"], backward=True, params=(ploc, loc))
    return _row("toy", {"N": N, "K": K}, exact, res, [("bridge", "native")],
                [("pyro", "bridge"), ("bridge", "native"), ("pyro", "native")])


def measure_chain(mods, cfg):
    pyro, dist, TraceTMC_ELBO, tg, tgp = mods
    n, K = cfg["n"], cfg["K"]
    x = torch.tensor(CHAIN_X)
    f64 = torch.float64
    exact = float(torch.distributions.Normal(torch.tensor(0.0, dtype=f64), math.sqrt(2.0)).log_prob(
        torch.tensor(CHAIN_X, dtype=f64)))
    model, guide = chain_programs(pyro, dist)
    pyro.clear_param_store()
    guide(x, n, 1, "mixture")
    pdrift = pyro.param("drift").unconstrained()
    drift = torch.tensor(CHAIN_X / (2 * n), requires_grad=True)
    pyro_elbo = TraceTMC_ELBO(max_plate_nesting=0)
    fns = {}
    for tmc, coupling in (("mixture", "mixture"), ("diagonal", "paired")):
        fns[f"pyro-{tmc}"] = lambda tmc=tmc: -pyro_elbo.differentiable_loss(model, guide, x, n, K, tmc)
        bridge = tgp.TMC(model, guide, max_plate_nesting=0)
        fns[f"bridge-{coupling}"] = lambda b=bridge, tmc=tmc: b.log_evidence(x, n, K, tmc)
        nat = tg.TMC(*chain_native(tg, n, coupling, drift), K=K, compile=False)
        fns[f"native-{coupling}"] = lambda e=nat: e.log_evidence({"x": x})
    perm = tgp.TMC(model, guide, max_plate_nesting=0, coupling="permutation")
    fns["bridge-permutation"] = lambda: perm.log_evidence(x, n, K, "mixture")
    natp = tg.TMC(*chain_native(tg, n, "permutation", drift), K=K, compile=False)
    fns["native-permutation"] = lambda: natp.log_evidence({"x": x})
    res = compare(fns, cfg["reps"], backward=True, params=(pdrift, drift))
    cs = ("mixture", "paired", "permutation")
    return _row("chain", {"n": n, "K": K}, exact, res, [(f"bridge-{c}", f"native-{c}") for c in cs],
                [("pyro-mixture", "bridge-mixture"), ("pyro-diagonal", "bridge-paired")]
                + [(f"bridge-{c}", f"native-{c}") for c in cs])


def _zstat(values, exact):
    w = torch.exp(torch.as_tensor(values, dtype=torch.float64) - exact)
    se = float(w.std()) / math.sqrt(w.numel())
    return {"mean_ratio": float(w.mean()), "se": se, "z": (float(w.mean()) - 1) / se, "n": int(w.numel())}


def measure_bias(mods, cfg):
    pyro, dist, TraceTMC_ELBO, tg, tgp = mods
    model, guide = bias_programs(pyro, dist)
    rows = []
    for K in cfg["K"]:
        for tmc, coupling in (("diagonal", "paired"), ("mixture", "mixture"), (None, "permutation")):
            row = {"K": K, "tmc": tmc, "coupling": coupling}
            if tmc is not None:
                elbo = TraceTMC_ELBO(max_plate_nesting=1)
                torch.manual_seed(K)
                t0 = time.process_time()
                vals = [-elbo.loss(model, guide, 1, K, tmc) for _ in range(cfg["reps_pyro"])]
                row["pyro"] = {**_zstat(vals, BIAS_EXACT), "cpu_s": time.process_time() - t0}
            bridge = tgp.TMC(model, guide, max_plate_nesting=1, dtype=torch.float64,
                             coupling=None if tmc else coupling)
            t0 = time.process_time()
            with torch.no_grad():
                v = bridge.log_evidence(cfg["reps_bridge"], K, tmc, seed=K, elementwise="rep")
            row["bridge"] = {**_zstat(v, BIAS_EXACT), "cpu_s": time.process_time() - t0}
            rows.append(row)
            p = row.get("pyro")
            print(f"bias K={K} {coupling:12s} bridge mean exp(v - exact) = {row['bridge']['mean_ratio']:.3f} "
                  f"(z {row['bridge']['z']:+.2f})" + (f"   pyro tmc={tmc}: {p['mean_ratio']:.3f} (z {p['z']:+.2f})"
                                                      if p else ""), flush=True)
    return rows


# ---------------------------------------------------------------------------------- output


def plot(payload, path):
    plt = pyplot()
    rows, bias = payload["rows"], payload["bias"]
    fig, axes = plt.subplots(3, 1, figsize=(10, 11))
    colors = {"pyro": "tab:green", "bridge": "tab:red", "native": "tab:blue"}
    labels, times, errs, cols = [], [], [], []
    for r in rows:
        for k, v in r["results"].items():
            if "median_s" in v:
                labels.append(f"{r['workload']}\n{k}")
                times.append(v["median_s"] * 1e3)
                errs.append(r["values"][k]["median_minus_exact"])
                cols.append(colors[k.split("-")[0]])
    xs = range(len(labels))
    axes[0].bar(xs, times, color=cols)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("median CPU ms per step\n(estimate + backward, 1 thread)")
    axes[0].set_xticks(list(xs))
    axes[0].set_xticklabels(labels, fontsize=6)
    axes[0].set_title("Pyro TraceTMC_ELBO (green) vs tmcgraph bridge (red) vs native tmcgraph (blue)", fontsize=9)
    axes[1].bar(xs, errs, color=cols)
    axes[1].axhline(0.0, color="k", lw=0.8)
    axes[1].set_ylabel("median log P_hat - exact log p(x)\n(nats)")
    axes[1].set_xticks(list(xs))
    axes[1].set_xticklabels(labels, fontsize=6)
    bl, bm, be, bc = [], [], [], []
    for b in bias:
        for who in ("pyro", "bridge"):
            if who in b:
                bl.append(f"K={b['K']}\n{who}\n{b['tmc'] if who == 'pyro' else b['coupling']}")
                bm.append(b[who]["mean_ratio"])
                be.append(4 * b[who]["se"])
                bc.append(colors[who])
    axes[2].bar(range(len(bl)), bm, yerr=be, color=bc, capsize=3)
    axes[2].axhline(1.0, color="k", lw=0.8, ls="--")
    axes[2].set_ylabel("mean of exp(log P_hat - log p(x))\n(1 = unbiased; bars: 4 s.e.)")
    axes[2].set_xticks(range(len(bl)))
    axes[2].set_xticklabels(bl, fontsize=6)
    axes[2].set_title("bias case: z1 ~ N(0,1), z2 ~ N(z1,1), x = 2 ~ N(z2,1), non-factorised guide", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


@keeps_process_state
def main(argv=None) -> dict:
    parser = base_parser(__doc__, seeds=15)
    args = parser.parse_args(argv)
    try:
        mods = _imports()
    except ImportError as e:
        raise SystemExit(f"error: this benchmark needs Pyro ({e}); pip install 'tmcgraph[pyro]'") from e
    grid = {k: dict(v) for k, v in GRIDS["quick" if args.quick else "full"].items()}
    if args.seeds:  # repetitions of the timed workloads
        grid["toy"]["reps"] = grid["chain"]["reps"] = args.seeds
    threads = set_threads(args.threads, args.allocator)
    validation = no_distribution_validation()
    json_path, png_path = output_paths(args.out, NAME, args.quick)
    t0 = time.perf_counter()
    rows = []
    for fn, key in ((measure_toy, "toy"), (measure_chain, "chain")):
        row = fn(mods, grid[key])
        rows.append(row)
        parts = [f"{k}={r['median_s'] * 1e3:.1f}ms ({row['values'][k]['median_minus_exact']:+.2f} nats)"
                 for k, r in row["results"].items() if "median_s" in r]
        print(f"{key}: " + "  ".join(parts) + "\n    ratios: "
              + "  ".join(f"{k}={v:.2f}" for k, v in row["ratios"].items()), flush=True)
    bias = measure_bias(mods, grid["bias"])
    mods[0].clear_param_store()
    payload = {
        "benchmark": NAME, "command": command_line(argv), "quick": args.quick, "threads": threads,
        "machine": machine_info(), **validation, "grid": grid, "pyro": mods[0].__version__,
        "timing": "CPU seconds per step (estimate + backward), contenders interleaved, medians",
        "wall_time_s": time.perf_counter() - t0, "rows": rows, "bias": bias, "bias_exact": BIAS_EXACT,
    }
    write_json(json_path, payload)
    plot(payload, png_path)
    print(f"wrote {json_path} and {png_path} in {payload['wall_time_s']:.1f} s")
    return payload


if __name__ == "__main__":
    main()
