"""A plated hierarchical model: evidence, posterior moments and samples against exact values.

Model (G groups of N observations, covariate t fixed)::

    mu    ~ N(0, 1)                      global mean
    beta  ~ N(0, 1)                      global slope
    theta_g | mu ~ N(mu, tau^2)          g = 1..G        (plate "groups")
    x_gn | theta_g, beta ~ N(theta_g + beta t_gn, sigma^2)   (plates "groups", "obs")

Everything is linear-Gaussian, so log p(x), the posterior of (mu, beta, theta) and the
posterior predictive of held-out observations are exact (Gaussian conditioning).

The proposal is factorised and Gaussian with learnable location and scale; it starts
broad and is adapted by reweighted wake-sleep (the wake-phi update only: the model has
no parameters). Then tmcgraph reports the TMC evidence, the posterior mean and standard
deviation of mu and beta (and theta) from the particle marginals, posterior samples
with their plate dims, and the predictive log-likelihood of one held-out observation
per group. ``--sweep`` prints how the error of the posterior means shrinks with K, for
TMC and for IWAE on the same proposal.

    python examples/hierarchical.py
    python examples/hierarchical.py --sweep 4,16,64,256 --reps 20
    python examples/hierarchical.py --json        # last line: one JSON object
"""

from __future__ import annotations

import argparse
import json
import math
import statistics

import numpy as np
import torch
from torch import nn
from torch.distributions import Normal

import tmcgraph as tg
from tmcgraph.contrib.threads import torch_threads
from tmcgraph.infer.posterior import posterior, predictive_log_likelihood
from tmcgraph.infer.rws import RWS

TAU = 1.0
SIGMA = 0.5


def _positive(s: str) -> int:
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s}")
    return v


def _k_list(s: str) -> list:
    try:
        ks = [int(v) for v in s.split(",") if v]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from e
    if not ks or min(ks) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {s!r}")
    return ks


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--G", type=_positive, default=8, help="groups (default 8)")
    p.add_argument("--N", type=_positive, default=6, help="observations per group (default 6)")
    p.add_argument("--K", type=_positive, default=64, help="particles per latent (default 64)")
    p.add_argument("--steps", type=int, default=300, help="RWS proposal-adaptation steps (default 300)")
    p.add_argument("--lr", type=float, default=0.05, help="Adam learning rate for RWS (default 0.05)")
    p.add_argument("--reps", type=_positive, default=10, help="independent estimates reported (default 10)")
    p.add_argument("--S", type=_positive, default=2000, help="posterior samples drawn (default 2000)")
    p.add_argument("--sweep", type=_k_list, default=None, help="comma-separated K values for the error sweep")
    p.add_argument("--seed", type=int, default=0, help="seed for data, training and estimates (default 0)")
    p.add_argument("--threads", type=_positive, default=1, help="torch threads (default 1)")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------
# Data and exact answers.


def make_data(G: int, N: int, seed: int):
    """Covariate t [G, N] and observations x [G, N] drawn from the model."""
    g = torch.Generator().manual_seed(seed)
    t = torch.linspace(-1.0, 1.0, N, dtype=torch.float64).repeat(G, 1) + 0.1 * torch.randn(G, N, generator=g,
                                                                                          dtype=torch.float64)
    mu = torch.randn((), generator=g, dtype=torch.float64)
    beta = torch.randn((), generator=g, dtype=torch.float64)
    theta = mu + TAU * torch.randn(G, generator=g, dtype=torch.float64)
    x = theta[:, None] + beta * t + SIGMA * torch.randn(G, N, generator=g, dtype=torch.float64)
    return t, x


def joint_gaussian(t: np.ndarray):
    """Mean (zero) and covariance of y = (mu, beta, theta_1..G, x_11..x_GN).

    Each coordinate is a linear map of iid standard normals e = (e_mu, e_beta, e_theta,
    e_x): y = L e, so Cov(y) = L L^T.
    """
    G, N = t.shape
    n = 2 + G + G * N
    L = np.zeros((n, n))
    L[0, 0] = 1.0
    L[1, 1] = 1.0
    for g in range(G):
        L[2 + g, 0] = 1.0
        L[2 + g, 2 + g] = TAU
        for j in range(N):
            r = 2 + G + g * N + j
            L[r] = L[2 + g] + t[g, j] * L[1]
            L[r, r] = SIGMA
    return L @ L.T


def exact_answers(t: torch.Tensor, x: torch.Tensor, heldout: np.ndarray) -> dict:
    """Exact log p(x), posterior mean/sd of (mu, beta, theta), and log p(x_held | x_rest)."""
    t, x = t.numpy(), x.numpy()
    G, N = t.shape
    C = joint_gaussian(t)
    h = list(range(2 + G))
    o = list(range(2 + G, 2 + G + G * N))
    xf = x.reshape(-1)

    def logpdf(idx, v):
        S = C[np.ix_(idx, idx)]
        _, logdet = np.linalg.slogdet(S)
        return float(-0.5 * (v @ np.linalg.solve(S, v) + logdet + len(v) * math.log(2 * math.pi)))

    A = C[np.ix_(h, o)] @ np.linalg.inv(C[np.ix_(o, o)])
    mean = A @ xf
    cov = C[np.ix_(h, h)] - A @ C[np.ix_(o, h)]
    sd = np.sqrt(np.diag(cov))
    rest = [i for i, held in zip(o, heldout.reshape(-1)) if not held]
    xr = xf[~heldout.reshape(-1)]
    return {
        "log_evidence": logpdf(o, xf),
        "mu": (float(mean[0]), float(sd[0])),
        "beta": (float(mean[1]), float(sd[1])),
        "theta_mean": mean[2:].tolist(),
        "theta_sd": sd[2:].tolist(),
        "corr_mu_beta": float(cov[0, 1] / (sd[0] * sd[1])),
        "log_predictive": logpdf(o, xf) - logpdf(rest, xr),
    }


# ----------------------------------------------------------------------------------------
# Model and a learnable factorised proposal.


class GaussianProposal(nn.Module):
    """q = N(loc, exp(log_scale)) with parameters of a given shape (plates)."""

    def __init__(self, shape=(), loc=0.0, scale=2.0):
        super().__init__()
        self.loc = nn.Parameter(torch.full(shape, float(loc), dtype=torch.float64))
        self.log_scale = nn.Parameter(torch.full(shape, math.log(scale), dtype=torch.float64))

    def forward(self):
        return Normal(self.loc, self.log_scale.exp())


def build(t: torch.Tensor, G: int):
    """Model and proposal (the proposal's parameters start broad)."""
    m = tg.Model()
    m.plate("groups", size=G)
    m.plate("obs")
    m.latent("mu", lambda: Normal(torch.tensor(0.0, dtype=torch.float64), 1.0))
    m.latent("beta", lambda: Normal(torch.tensor(0.0, dtype=torch.float64), 1.0))
    m.latent("theta", lambda mu: Normal(mu, TAU), plate="groups")
    m.observed("x", lambda theta, beta: Normal(theta + beta * t, SIGMA), plate=("groups", "obs"))
    q = tg.Proposal(m)
    q.latent("mu", GaussianProposal())
    q.latent("beta", GaussianProposal())
    q.latent("theta", GaussianProposal((G,), scale=3.0), plate="groups")
    return m, q


def adapt(model, proposal, x, K: int, steps: int, lr: float, seed: int) -> list:
    """RWS wake-phi steps on the proposal; returns the log P_TMC trace."""
    rws = RWS(tg.TMC(model, proposal, K=K))
    opt = torch.optim.Adam(proposal.parameters(), lr=lr)
    trace = []
    for step in range(steps):
        opt.zero_grad()
        r = rws({"x": x}, seed=seed + step)
        r.loss.backward()
        opt.step()
        trace.append(float(r.log_evidence))
    return trace


def _mean_sd(vals):
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def report(model, proposal, x, K, reps, S, seed, exact, heldout) -> dict:
    """Evidence, posterior moments, samples and predictive over ``reps`` independent draws."""
    est = tg.TMC(model, proposal, K=K)
    data = {"x": x}
    ev, mus, mu_sds, betas, beta_sds, thetas, preds = [], [], [], [], [], [], []
    for r in range(reps):
        post = posterior(est, data, seed=seed + r)
        ev.append(float(post.log_evidence))
        mus.append(float(post.mean("mu")))
        mu_sds.append(float(post.std("mu")))
        betas.append(float(post.mean("beta")))
        beta_sds.append(float(post.std("beta")))
        thetas.append(post.mean("theta"))
        with torch.no_grad():
            preds.append(float(predictive_log_likelihood(est, data, {"x": heldout}, seed=seed + r)))
    theta_err = (torch.stack(thetas).mean(0) - torch.tensor(exact["theta_mean"])).abs().max().item()
    out = {
        "log_evidence": _mean_sd(ev),
        "mu_mean": _mean_sd(mus),
        "mu_sd": _mean_sd(mu_sds),
        "beta_mean": _mean_sd(betas),
        "beta_sd": _mean_sd(beta_sds),
        "theta_mean_max_abs_err": theta_err,
        "log_predictive": _mean_sd(preds),
    }
    if S:
        draws = posterior(est, data, seed=seed).sample(S, seed=seed)
        out.update({
            "sample_shapes": {k: list(v.shape) for k, v in draws.values.items()},
            "sample_mu": (float(draws["mu"].mean()), float(draws["mu"].std(correction=0))),
            "sample_beta": (float(draws["beta"].mean()), float(draws["beta"].std(correction=0))),
            "sample_corr_mu_beta": _corr(draws["mu"], draws["beta"]),
        })
    return out


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Sample correlation (0 if either sample is constant)."""
    a, b = a - a.mean(), b - b.mean()
    den = float((a * a).sum().sqrt() * (b * b).sum().sqrt())
    return float((a * b).sum()) / den if den > 0 else 0.0


def sweep(model, proposal, x, ks, reps, seed, exact) -> dict:
    """RMSE of the posterior means of mu and beta over ``reps`` draws, per K, TMC vs IWAE."""
    out = {}
    for K in ks:
        row = {}
        for name, cls in (("tmc", tg.TMC), ("iwae", tg.IWAE)):
            est = cls(model, proposal, K=K)
            err_mu, err_beta = [], []
            for r in range(reps):
                post = posterior(est, {"x": x}, seed=seed + 1000 * K + r)
                err_mu.append(float(post.mean("mu")) - exact["mu"][0])
                err_beta.append(float(post.mean("beta")) - exact["beta"][0])
            row[name] = {
                "rmse_mu": math.sqrt(statistics.fmean(e * e for e in err_mu)),
                "bias_mu": statistics.fmean(err_mu),
                "rmse_beta": math.sqrt(statistics.fmean(e * e for e in err_beta)),
            }
        out[K] = row
    return out


def main(argv=None) -> dict:
    a = parse_args(argv)
    with torch_threads(a.threads):  # --threads for the run, the caller's count afterwards
        return _run(a)


def _run(a) -> dict:
    t, x = make_data(a.G, a.N, a.seed)
    heldout = np.zeros((a.G, a.N), dtype=bool)
    heldout[:, -1] = True  # the last observation of every group
    exact = exact_answers(t, x, heldout)
    model, proposal = build(t, a.G)
    held = torch.as_tensor(heldout)
    print(f"Hierarchical model: G={a.G} groups x N={a.N} observations, K={a.K}, "
          f"torch threads={torch.get_num_threads()}")
    before = report(model, proposal, x, a.K, a.reps, 0, a.seed + 10_000, exact, held)
    trace = adapt(model, proposal, x, a.K, a.steps, a.lr, a.seed + 20_000)
    after = report(model, proposal, x, a.K, a.reps, a.S, a.seed + 30_000, exact, held)
    out = {"args": vars(a), "exact": exact, "before": before, "after": after,
           "rws_trace_first_last": [trace[0], trace[-1]] if trace else []}

    def row(label, ex, est):
        return f"  {label:28s} {ex:9.4f}   {est[0]:9.4f} +- {est[1]:.4f}"

    if a.steps:
        print(f"  RWS adaptation: {a.steps} steps; mean log P_TMC {before['log_evidence'][0]:.3f} (broad proposal) "
              f"-> {after['log_evidence'][0]:.3f}")
    else:
        print("  no RWS adaptation: the broad initial proposal is used")
    print(f"  {'quantity':28s} {'exact':>9s}   {'TMC (mean +- sd over ' + str(a.reps) + ' draws)'}")
    print(row("log p(x)", exact["log_evidence"], after["log_evidence"]))
    print(row("E[mu | x]", exact["mu"][0], after["mu_mean"]))
    print(row("sd[mu | x]", exact["mu"][1], after["mu_sd"]))
    print(row("E[beta | x]", exact["beta"][0], after["beta_mean"]))
    print(row("sd[beta | x]", exact["beta"][1], after["beta_sd"]))
    print(row("log p(x_held | x_rest)", exact["log_predictive"], after["log_predictive"]))
    print(f"  max_g |E[theta_g | x] error| (mean over draws): {after['theta_mean_max_abs_err']:.4f}")
    shapes = ", ".join(f"{k} {v}" for k, v in after["sample_shapes"].items())
    print(f"  {a.S} posterior samples: {shapes}")
    print(f"    mu   sample mean {after['sample_mu'][0]:.4f} sd {after['sample_mu'][1]:.4f} "
          f"(exact {exact['mu'][0]:.4f}, {exact['mu'][1]:.4f})")
    print(f"    beta sample mean {after['sample_beta'][0]:.4f} sd {after['sample_beta'][1]:.4f} "
          f"(exact {exact['beta'][0]:.4f}, {exact['beta'][1]:.4f})")
    print(f"    corr(mu, beta) {after['sample_corr_mu_beta']:.3f} (exact {exact['corr_mu_beta']:.3f})")
    if a.sweep:
        out["sweep"] = sweep(model, proposal, x, a.sweep, a.reps, a.seed + 40_000, exact)
        which = f"proposal after {a.steps} RWS steps" if a.steps else "broad proposal"
        print(f"  error of posterior means over {a.reps} draws ({which}):")
        print(f"  {'K':>6s} {'TMC rmse mu':>12s} {'TMC bias mu':>12s} {'TMC rmse beta':>14s} "
              f"{'IWAE rmse mu':>13s} {'IWAE rmse beta':>15s}")
        for K, r in out["sweep"].items():
            print(f"  {K:6d} {r['tmc']['rmse_mu']:12.4f} {r['tmc']['bias_mu']:12.4f} {r['tmc']['rmse_beta']:14.4f} "
                  f"{r['iwae']['rmse_mu']:13.4f} {r['iwae']['rmse_beta']:15.4f}")
    if a.json:
        print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
