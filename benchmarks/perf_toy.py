"""Speed of one TMC estimate on the paper's Gaussian toy: tmcgraph vs hand-written torch vs Pyro.

Model theta ~ N(0, 1), z_i | theta ~ N(theta, 1), x_i | z_i ~ N(z_i, 1), i = 1..N, with
a factorised Gaussian proposal whose four parameters (means and log-scales of q(theta)
and q(z_i)) require gradients, so "forward + backward" differentiates the estimate.
Contenders, run in one process, alternating, after a warm-up, with the same seed per
repetition (all three draw the same particles and return the same value, which is
checked):

* ``tmcgraph``: ``TMC(model, proposal, K).log_evidence``;
* ``hand``: the shortest correct torch code for this model (broadcast log-probs,
  ``logsumexp`` over z's particles, sum over the plate, ``logsumexp`` over theta's);
* ``pyro``: ``pyro.infer.TraceTMC_ELBO`` with ``num_samples=K, expand=False`` (skipped
  with a message when ``pyro-ppl`` is not installed).

Reports median seconds and ratios (tmcgraph / hand, pyro / tmcgraph).

    python benchmarks/perf_toy.py            # N = 128, 1024; K = 128
    python benchmarks/perf_toy.py --quick    # tiny, for the tests
"""

from __future__ import annotations

import math
import statistics
import sys
import time

import torch
from _common import (
    base_parser,
    pyplot,
    save_figure,
    save_results,
    set_threads,
)
from torch.distributions import Normal

import tmcgraph as tg
from tmcgraph.models.toys import gaussian_toy_data, gaussian_toy_log_evidence

__all__ = ["main", "compare", "pyro_or_none", "ratio"]


def pyro_or_none():
    """``(pyro, pyro.distributions, TraceTMC_ELBO, config_enumerate)`` or ``None`` with a printed message."""
    try:
        import pyro
        import pyro.distributions as pdist
        from pyro.infer import TraceTMC_ELBO, config_enumerate
    except ImportError as e:
        print(f"pyro-ppl not importable ({e}); skipping the Pyro column (pip install pyro-ppl)")
        return None
    return pyro, pdist, TraceTMC_ELBO, config_enumerate


def pyro_tmc_loss(pyro_mods, model, guide, K: int, max_plate_nesting: int):
    """Negative TraceTMC_ELBO loss of a Pyro model/guide with ``num_samples=K, expand=False``."""
    _, _, TraceTMC_ELBO, config_enumerate = pyro_mods
    g = config_enumerate(guide, default="parallel", expand=False, num_samples=K)
    mm = config_enumerate(model, default="parallel", expand=False, num_samples=K)
    elbo = TraceTMC_ELBO(max_plate_nesting=max_plate_nesting)
    return lambda x: -elbo.differentiable_loss(mm, g, x)


def compare(fns: dict, reps: int, backward: bool = False, params=(), warmup: int = 1) -> dict:
    """Time contenders alternately: per repetition every contender runs once with the same seed.

    Returns:
        ``{name: {"median_s", "times_s", "values"}}``; a contender that raises is
        reported with ``"error"`` instead (and dropped from later repetitions).
    """
    times = {k: [] for k in fns}
    values = {k: [] for k in fns}
    errors = {}
    for r in range(warmup + reps):
        for k, f in fns.items():
            if k in errors:
                continue
            torch.manual_seed(r)
            try:
                t0 = time.perf_counter()
                v = f()
                if backward:
                    v.backward()
                dt = time.perf_counter() - t0
            except Exception as e:  # a contender that cannot run this size is reported, not fatal
                errors[k] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                continue
            for p in params:
                p.grad = None
            if r >= warmup:
                times[k].append(dt)
                values[k].append(float(v.detach()))
    out = {}
    for k in fns:
        if k in errors:
            out[k] = {"error": errors[k]}
        else:
            out[k] = {"median_s": statistics.median(times[k]), "times_s": times[k], "values": values[k]}
    return out


def ratio(res: dict, a: str, b: str):
    """Median time of ``a`` over median time of ``b`` (``None`` if either is missing)."""
    if a in res and b in res and "median_s" in res[a] and "median_s" in res[b]:
        return res[a]["median_s"] / res[b]["median_s"]
    return None


def _params():
    return {
        "m_theta": torch.zeros((), requires_grad=True),
        "s_theta": torch.zeros((), requires_grad=True),
        "m_z": torch.zeros((), requires_grad=True),
        "s_z": torch.full((), 0.5 * math.log(2.0), requires_grad=True),
    }


def tmc_toy(N: int, K: int, p: dict):
    m = tg.Model()
    m.plate("data", size=N)
    m.latent("theta", lambda: Normal(0.0, 1.0))
    m.latent("z", lambda theta: Normal(theta, 1.0), plate="data")
    m.observed("x", lambda z: Normal(z, 1.0), plate="data")
    q = tg.Proposal(m)
    q.latent("theta", lambda: Normal(p["m_theta"], p["s_theta"].exp()))
    q.latent("z", lambda: Normal(p["m_z"], p["s_z"].exp()), plate="data")
    est = tg.TMC(m, q, K=K)
    return lambda x: est.log_evidence({"x": x})


def hand_toy(K: int, p: dict):
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


def pyro_toy(K: int, p: dict, pyro_mods):
    pyro, pdist = pyro_mods[:2]

    def model(x):
        th = pyro.sample("theta", pdist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", pdist.Normal(th, 1.0))
            pyro.sample("x", pdist.Normal(z, 1.0), obs=x)

    def guide(x):
        pyro.sample("theta", pdist.Normal(p["m_theta"], p["s_theta"].exp()))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", pdist.Normal(p["m_z"], p["s_z"].exp()))

    return pyro_tmc_loss(pyro_mods, model, guide, K, max_plate_nesting=1)


def main(argv=None) -> dict:
    ap = base_parser(__doc__, seeds=11)
    ap.add_argument("--no-pyro", action="store_true", help="skip the Pyro column")
    args = ap.parse_args(argv)
    threads = set_threads(args.threads, args.allocator)
    reps = args.seeds or (3 if args.quick else args.default_seeds)
    grid = [(16, 8)] if args.quick else [(128, 128), (1024, 128)]
    pm = None if args.no_pyro else pyro_or_none()
    rows = []
    for N, K in grid:
        x = gaussian_toy_data(N, seed=1)
        p = _params()
        fns = {"tmcgraph": tmc_toy(N, K, p), "hand": hand_toy(K, p)}
        if pm is not None:
            fns["pyro"] = pyro_toy(K, p, pm)
        for mode in ("forward", "forward+backward"):
            res = compare({k: (lambda f=f: f(x)) for k, f in fns.items()}, reps, mode != "forward", list(p.values()))
            vals = {k: r["values"] for k, r in res.items() if "values" in r}
            agree = max(abs(a - b) for v in vals.values() for a, b in zip(v, vals["tmcgraph"]))
            row = {
                "N": N, "K": K, "mode": mode, "results": res,
                "tmcgraph_over_hand": ratio(res, "tmcgraph", "hand"),
                "pyro_over_tmcgraph": ratio(res, "pyro", "tmcgraph"),
                "max_abs_value_difference": agree,
                "exact_log_evidence": float(gaussian_toy_log_evidence(x)),
            }
            rows.append(row)
            print(f"N={N:5d} K={K:4d} {mode:17s} " + "  ".join(
                f"{k}={r['median_s'] * 1e3:.1f}ms" if "median_s" in r else f"{k}: {r['error']}" for k, r in res.items())
                + f"  tmcgraph/hand={row['tmcgraph_over_hand']:.2f}"
                + (f"  pyro/tmcgraph={row['pyro_over_tmcgraph']:.2f}" if row["pyro_over_tmcgraph"] else "")
                + f"  |value diff|={agree:.2g}")
            if agree > 1e-3 * max(1.0, abs(vals["tmcgraph"][0])):
                raise RuntimeError(f"contenders disagree on the same particles: {vals}")
    return save_results(args, "perf_toy", argv, threads, _plot, repetitions=reps, pyro=pm is not None, rows=rows)


def _plot(rows, path):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    labels, series = [], {}
    for r in rows:
        labels.append(f"N={r['N']}\n{r['mode']}")
        for k, v in r["results"].items():
            series.setdefault(k, []).append(v.get("median_s", float("nan")) * 1e3)
    width = 0.8 / max(1, len(series))
    for i, (k, v) in enumerate(series.items()):
        ax.bar([j + i * width for j in range(len(labels))], v, width, label=k)
    ax.set_xticks([j + width * (len(series) - 1) / 2 for j in range(len(labels))], labels, fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("median ms per estimate")
    ax.set_title(f"Gaussian toy, K={rows[0]['K']}")
    ax.legend()
    save_figure(fig, path)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
