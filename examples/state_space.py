"""A linear-Gaussian state-space model: TMC, IWAE and SMC against the Kalman filter.

Model (a noisy AR(1) process; ``time`` is a Markov plate of length T, t = 0..T-1)::

    z_0 ~ N(0, S0^2)
    z_t | z_{t-1} ~ N(A z_{t-1}, Q^2)      t = 1..T-1
    x_t | z_t ~ N(z_t, R^2)                t = 0..T-1

with A = 0.9, Q = 0.5, R = 0.7, S0 = 1. The data are simulated from the model with a
seeded ``torch.Generator``. Everything is linear-Gaussian, so log p(x) is exact by a
Kalman filter and E[z_t | x_{0:T-1}] and sd[z_t | x_{0:T-1}] by the Rauch-Tung-Striebel
smoother (both below, in float64).

Proposals:

* the prior, ``Q(z_t | z_{t-1}) = P(z_t | z_{t-1})``;
* the locally optimal proposal ``Q(z_t | z_{t-1}, x_t) = P(z_t | z_{t-1}, x_t)``, in closed
  form here: ``N(V (A z_{t-1} / Q^2 + x_t / R^2), V)`` with ``V = 1 / (1/Q^2 + 1/R^2)``,
  and at t = 0 ``N(V0 x_0 / R^2, V0)`` with ``V0 = 1 / (1/S0^2 + 1/R^2)``. It has no
  learned parameters. TMC pairs its K particles of ``z_t`` with those of ``z_{t-1}`` by
  the ``"permutation"`` coupling.

Reported: the exact log p(x); the mean and standard deviation over ``--seeds`` seeds of
the TMC estimate with each proposal, of IWAE and of SMC (a particle filter with
systematic resampling) with the locally optimal proposal, and each method's gap to the
exact value in nats; then the smoothed means of the TMC posterior (locally optimal
proposal) against the RTS smoother: the largest and the RMS absolute error over t, with
the RMS of the smoother's standard deviation for scale.

    python examples/state_space.py                    # T=200, K=100, 5 seeds
    python examples/state_space.py --quick            # T=20, K=10, 2 seeds
    python examples/state_space.py --T 500 --K 30 --dtype float32 --json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time

import torch
from torch.distributions import Normal

import tmcgraph as tg
from tmcgraph.contrib.threads import torch_threads
from tmcgraph.infer.smc import SMC
from tmcgraph.sampling.context import resolve_device

A = 0.9  #: AR(1) coefficient
Q = 0.5  #: transition noise sd
R = 0.7  #: observation noise sd
S0 = 1.0  #: sd of z_0

#: Defaults of a full run and of ``--quick``: (T, K, seeds).
DEFAULTS = (200, 100, 5)
QUICK = (20, 10, 2)

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _positive(s: str) -> int:
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s}")
    return v


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", type=_positive, default=None,
                   help=f"time steps (default {DEFAULTS[0]}; quick: {QUICK[0]})")
    p.add_argument("--K", type=_positive, default=None,
                   help=f"particles per latent (TMC) or samples (IWAE, SMC) (default {DEFAULTS[1]}; quick: {QUICK[1]})")
    p.add_argument("--seeds", type=_positive, default=None,
                   help=f"independent estimates per method (default {DEFAULTS[2]}; quick: {QUICK[2]})")
    p.add_argument("--quick", action="store_true",
                   help=f"T={QUICK[0]}, K={QUICK[1]}, {QUICK[2]} seeds unless given (seconds; used by the tests)")
    p.add_argument("--seed", type=int, default=0, help="seed for the data and the estimates (default 0)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float64",
                   help="dtype of the estimators (default float64; the exact answers are always float64)")
    p.add_argument("--threads", type=_positive, default=1, help="torch threads (default 1)")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    a = p.parse_args(argv)
    base = QUICK if a.quick else DEFAULTS
    a.T = base[0] if a.T is None else a.T
    a.K = base[1] if a.K is None else a.K
    a.seeds = base[2] if a.seeds is None else a.seeds
    try:
        resolve_device(a.device, "--device")
    except tg.TMCGraphError as e:
        p.error(str(e))
    return a


# ----------------------------------------------------------------------------------------
# Data and exact answers (float64).


def simulate(T: int, seed: int):
    """Latent path z [T] and observations x [T] (float64, CPU) drawn from the model."""
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(T, generator=g, dtype=torch.float64)
    n = torch.randn(T, generator=g, dtype=torch.float64)
    z = torch.empty(T, dtype=torch.float64)
    z[0] = S0 * e[0]
    for t in range(1, T):
        z[t] = A * z[t - 1] + Q * e[t]
    return z, z + R * n


def kalman_filter(x, a: float = A, q: float = Q, r: float = R, s0: float = S0) -> dict:
    """Kalman filter of the scalar model above, in float64.

    Args:
        x: Observations ``[T]``.
        a, q, r, s0: AR coefficient, transition sd, observation sd, sd of ``z_0``.

    Returns:
        ``{"log_evidence": float, "pred_mean", "pred_var", "filt_mean", "filt_var"}``;
        the last four are float64 tensors ``[T]``: the moments of ``z_t`` given
        ``x_{0:t-1}`` (predicted) and given ``x_{0:t}`` (filtered).
    """
    x = torch.as_tensor(x).detach().to("cpu", torch.float64)
    T = x.shape[0]
    pm, pv, fm, fv = (torch.empty(T, dtype=torch.float64) for _ in range(4))
    m, P, ll = 0.0, s0 * s0, 0.0
    for t in range(T):
        if t:
            m, P = a * m, a * a * P + q * q
        pm[t], pv[t] = m, P
        S = P + r * r  # predictive variance of x_t
        innov = float(x[t]) - m
        ll += -0.5 * (math.log(2 * math.pi * S) + innov * innov / S)
        k = P / S
        m, P = m + k * innov, (1 - k) * P
        fm[t], fv[t] = m, P
    return {"log_evidence": ll, "pred_mean": pm, "pred_var": pv, "filt_mean": fm, "filt_var": fv}


def rts_smoother(x, a: float = A, q: float = Q, r: float = R, s0: float = S0):
    """Rauch-Tung-Striebel smoother: ``(E[z_t | x], Var[z_t | x])``, float64 tensors ``[T]``."""
    kf = kalman_filter(x, a, q, r, s0)
    pm, pv, fm, fv = kf["pred_mean"], kf["pred_var"], kf["filt_mean"], kf["filt_var"]
    T = fm.shape[0]
    sm, sv = fm.clone(), fv.clone()
    for t in range(T - 2, -1, -1):
        G = float(fv[t]) * a / float(pv[t + 1])
        sm[t] = fm[t] + G * (sm[t + 1] - pm[t + 1])
        sv[t] = fv[t] + G * G * (sv[t + 1] - pv[t + 1])
    return sm, sv


# ----------------------------------------------------------------------------------------
# Model and proposals.


def build(T: int):
    """The model and its two proposals, ``{"prior": ..., "optimal": ...}``."""
    m = tg.Model()
    m.plate("time", size=T, markov=True)
    m.latent("z", lambda z_prev: Normal(A * z_prev, Q), plate="time", init=lambda: Normal(0.0, S0))
    m.observed("x", lambda z: Normal(z, R), plate="time")

    prior = tg.Proposal(m)
    prior.prior("z")

    v = 1.0 / (1.0 / Q**2 + 1.0 / R**2)
    v0 = 1.0 / (1.0 / S0**2 + 1.0 / R**2)
    optimal = tg.Proposal(m)
    optimal.latent("z", lambda z_prev, x: Normal(v * (A * z_prev / Q**2 + x / R**2), math.sqrt(v)),
                   init=lambda x: Normal(v0 * x / R**2, math.sqrt(v0)), coupling="permutation")
    return m, {"prior": prior, "optimal": optimal}


def estimators(model, proposals: dict, K: int, device, dtype) -> dict:
    """Label -> estimator, for the methods reported.

    TMC and IWAE run eagerly (``compile=False``): a handful of calls does not repay
    compiling a T-step program.
    """
    opts = {"K": K, "device": device, "dtype": dtype}
    return {
        "TMC, prior proposal": tg.TMC(model, proposals["prior"], compile=False, **opts),
        "TMC, optimal proposal": tg.TMC(model, proposals["optimal"], compile=False, **opts),
        "IWAE, optimal proposal": tg.IWAE(model, proposals["optimal"], compile=False, **opts),
        "SMC, optimal proposal": SMC(model, proposals["optimal"], **opts),
    }


def run(est, data: dict, seeds: int, seed: int, exact: float) -> dict:
    """``seeds`` estimates of log p(x) (seeds ``seed + 1 ..``) with their summary and timing."""
    with torch.no_grad():
        est.log_evidence(data, seed=seed)  # warm-up: the plan is made once and cached
    values, times = [], []
    for r in range(seeds):
        t0 = time.perf_counter()
        with torch.no_grad():
            v = est.log_evidence(data, seed=seed + 1 + r)
        times.append(time.perf_counter() - t0)
        values.append(float(v))
    mean = statistics.fmean(values)
    return {
        "mean": mean,
        "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
        "gap": exact - mean,
        "values": values,
        "median_time_s": statistics.median(times),
    }


def main(argv=None) -> dict:
    a = parse_args(argv)
    with torch_threads(a.threads):  # --threads for the run, the caller's count afterwards
        return _run(a)


def _run(a) -> dict:
    dtype = DTYPES[a.dtype]
    z, x = simulate(a.T, a.seed)
    exact = kalman_filter(x)["log_evidence"]
    sm, sv = rts_smoother(x)
    model, proposals = build(a.T)
    data = {"x": x.to(device=a.device, dtype=dtype)}
    out = {"T": a.T, "K": a.K, "seeds": a.seeds, "seed": a.seed, "dtype": a.dtype, "device": a.device,
           "exact": exact, "estimates": {}}
    print(f"Linear-Gaussian state space: T={a.T}, K={a.K}, {a.seeds} seeds, {a.dtype}, "
          f"torch threads={torch.get_num_threads()}")
    print(f"  z_0 ~ N(0, {S0:g}^2), z_t = {A:g} z_t-1 + N(0, {Q:g}^2), x_t = z_t + N(0, {R:g}^2); data seed {a.seed}")
    print(f"  exact log p(x) (Kalman filter) = {exact:.3f}")
    print(f"  {'method':24s} {'mean':>10s} {'sd':>7s} {'exact - mean':>14s} {'median time':>12s}")
    for label, est in estimators(model, proposals, a.K, a.device, dtype).items():
        res = run(est, data, a.seeds, a.seed, exact)
        out["estimates"][label] = res
        print(f"  {label:24s} {res['mean']:10.3f} {res['sd']:7.3f} {res['gap']:9.3f} nats "
              f"{1e3 * res['median_time_s']:9.1f} ms")

    est = tg.TMC(model, proposals["optimal"], K=a.K, device=a.device, dtype=dtype, compile=False)
    post = tg.posterior(est, data, seed=a.seed + 1)
    mean = post.mean("z").detach().to("cpu", torch.float64)
    err = (mean - sm).abs()
    smoother = {
        "max_abs_err": float(err.max()),
        "rms_err": float(err.pow(2).mean().sqrt()),
        "rms_sd": float(sv.mean().sqrt()),
        "posterior_seed": a.seed + 1,
    }
    out["smoother"] = smoother
    print(f"  smoothed means E[z_t | x] of the TMC posterior (optimal proposal, K={a.K}, seed {a.seed + 1}) "
          f"vs the RTS smoother:")
    print(f"    max |error| {smoother['max_abs_err']:.4f}, RMS error {smoother['rms_err']:.4f}; "
          f"RMS smoother sd {smoother['rms_sd']:.4f}")
    if a.json:
        print(json.dumps(out))
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
