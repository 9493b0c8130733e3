"""The paper's Gaussian toy: TMC vs IWAE against the exact log-evidence.

Model: theta ~ N(0, 1), z_i | theta ~ N(theta, 1), x_i | z_i ~ N(z_i, 1), i = 1..N.
Proposals: Q(theta) = N(0, 1), Q(z_i) = N(0, 2). Exactly, x ~ N(0, 2 I + 1 1^T).

    python examples/gaussian_toy.py --N 128 --K 128 --reps 10
    python examples/gaussian_toy.py --json        # last line: one JSON object
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

import tmcgraph as tg
from tmcgraph.contrib.threads import torch_threads
from tmcgraph.models.toys import gaussian_toy, gaussian_toy_data, gaussian_toy_log_evidence
from tmcgraph.sampling.context import resolve_device


def _positive(s: str) -> int:
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s}")
    return v


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--N", type=_positive, default=128, help="number of data points (default 128)")
    p.add_argument("--K", type=_positive, default=128, help="particles per latent (default 128)")
    p.add_argument("--reps", type=_positive, default=10, help="independent estimates per method (default 10)")
    p.add_argument("--seed", type=int, default=0, help="seed for the data and the estimates (default 0)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--threads", type=_positive, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    a = p.parse_args(argv)
    try:
        resolve_device(a.device, "--device")
    except tg.TMCGraphError as e:
        p.error(str(e))
    return a


def run(method, model, proposal, x, K, reps, seed, device):
    """``reps`` estimates with their wall-clock times."""
    est = method(model, proposal, K=K, device=device)
    data = {"x": x}
    est.log_evidence(data, seed=seed)  # warm-up: plan compiled once and cached
    values, times = [], []
    for r in range(reps):
        t0 = time.perf_counter()
        with torch.no_grad():
            v = est.log_evidence(data, seed=seed + 1 + r)
        times.append(time.perf_counter() - t0)
        values.append(float(v))
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "values": values,
        "median_time_s": statistics.median(times),
    }


def main(argv=None) -> dict:
    a = parse_args(argv)
    with torch_threads(a.threads):  # --threads for the run, the caller's count afterwards
        return _run(a)


def _run(a) -> dict:
    x = gaussian_toy_data(a.N, seed=a.seed).to(a.device)
    exact = float(gaussian_toy_log_evidence(x.cpu()))
    model, proposal = gaussian_toy(a.N)
    out = {"N": a.N, "K": a.K, "reps": a.reps, "seed": a.seed, "exact": exact}
    print(f"Gaussian toy, N={a.N}, K={a.K}, {a.reps} reps, torch threads={torch.get_num_threads()}")
    print(f"  exact log p(x) = {exact:.3f}")
    for name, method in (("tmc", tg.TMC), ("iwae", tg.IWAE)):
        res = run(method, model, proposal, x, a.K, a.reps, a.seed, a.device)
        out[name] = res
        print(
            f"  {name.upper():5s} {res['mean']:.3f} +- {res['std']:.3f}  "
            f"(exact - mean = {exact - res['mean']:.3f} nats; median {1e3 * res['median_time_s']:.2f} ms)"
        )
    if a.json:
        print(json.dumps(out))
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
