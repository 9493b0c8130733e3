"""Speed of the exact log-likelihood of an HMM with enumerated states: tmcgraph (eager, compiled) vs a
hand-written forward algorithm (eager, compiled) vs Pyro (TraceEnum_ELBO, TraceTMC_ELBO).

Model: S hidden states, T steps, z_1 ~ Cat(softmax(b)), z_t | z_{t-1} ~ Cat(softmax(A[z_{t-1}])),
x_t | z_t ~ N(mu[z_t], sigma^2), with learnable initial logits b, transition logits A (S x S) and
emission means mu (they require gradients, so "forward+backward" differentiates log p(x);
"forward" builds the same graph without back-propagating). Data: one draw of T steps from
the model with fixed parameters (seeded). Declared in tmcgraph as T latents ``z1..zT`` (each
with its predecessor as parent) and T observations ``x1..xT``; every state is enumerated
(``q.enumerate``), so every contender computes log p(x) exactly:

* ``tmcgraph``: ``TMC(model, proposal, compile=False).log_evidence`` (K is irrelevant: the
  particles of an enumerated latent are its support);
* ``tmcgraph-compiled``: the same with ``compile=True`` (skipped with the reason if absent);
* ``hand``: the log-space forward algorithm, alpha_t = logsumexp_j(alpha_{t-1}[j] +
  log A_jk) + log N(x_t; mu_k, sigma) (one S x S ``logsumexp`` per step);
* ``hand-compiled``: ``torch.compile(hand, dynamic=False)`` (the T-step loop is unrolled);
* ``pyro-enum``: ``TraceEnum_ELBO`` with ``config_enumerate`` (parallel) on the states,
  ``pyro.markov`` over time and an empty guide;
* ``pyro-tmc``: ``TraceTMC_ELBO`` with the states drawn by an enumerated uniform guide
  (exact, like tmcgraph's enumeration). Pyro's TMC does not recycle dimensions under
  ``pyro.markov`` (it returns a wrong value with it), so it is run without, and needs one
  tensor dimension per state: at T = 100 it exceeds torch's 64 and is reported as failed.

Every value is checked against the exact forward algorithm in float64.

Timing (``_common.compare``): CPU time per call, wall time too (CUDA: synchronised wall),
interleaved, same seed, two warm-ups; medians and medians of paired ratios.

The limit (``_common.measure_limits``, same run): counting rule, one ``exp`` per entry of
each step's S x S transition grid, (T - 1) S^2 in all (the forward algorithm in log space;
the T S emission terms need none); the same count for forward+backward.
ideal = (T - 1) S^2 / (exp/s). At S = 10 this is microseconds: the HMM measures per-step
overhead, not arithmetic.

    python benchmarks/perf_hmm.py            # S = 10, T = 100
    python benchmarks/perf_hmm.py --quick    # S = 3, T = 5
"""

from __future__ import annotations

import sys

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
from torch.distributions import Categorical, Normal

import tmcgraph as tg

__all__ = ["main", "hmm_params", "hmm_data", "tmc_hmm", "hand_forward", "pyro_hmm_enum", "pyro_hmm_tmc",
           "hmm_exps", "exact_log_likelihood"]

SIGMA = 0.5
EXP_RULE = "(T-1)*S*S: one exp per entry of each step's S x S transition grid (both modes)"


def hmm_exps(S: int, T: int) -> int:
    """Inherent exps of the forward algorithm: one per S x S entry per transition."""
    return (T - 1) * S * S


def hmm_params(S: int, device="cpu") -> dict:
    """Initial logits ``b``, transition logits ``A`` (sticky: +2 on the diagonal) and emission means ``mu``."""
    g = torch.Generator().manual_seed(0)
    A = torch.randn(S, S, generator=g) + 2.0 * torch.eye(S)
    return {
        "b": torch.zeros(S).to(device).requires_grad_(),
        "A": A.to(device).requires_grad_(),
        "mu": torch.linspace(-2.0, 2.0, S).to(device).requires_grad_(),
    }


@torch.no_grad()
def hmm_data(p: dict, T: int, seed: int = 1) -> torch.Tensor:
    """One draw ``x [T]`` from the HMM (seeded generator, on the parameters' device)."""
    g = torch.Generator().manual_seed(seed)
    b, A, mu = (p[k].detach().cpu() for k in ("b", "A", "mu"))
    z = int(torch.multinomial(torch.softmax(b, -1), 1, generator=g))
    xs = []
    for _ in range(T):
        xs.append(float(mu[z] + SIGMA * torch.randn((), generator=g)))
        z = int(torch.multinomial(torch.softmax(A[z], -1), 1, generator=g))
    return torch.tensor(xs, device=p["mu"].device)


def tmc_hmm(p: dict, T: int, device="cpu", compiled: bool = False):
    """tmcgraph's exact log p(x): ``f(x)`` with ``f.est`` the estimator."""
    m = tg.Model()
    m.latent("z1", lambda: Categorical(logits=p["b"]))
    for t in range(2, T + 1):
        m.latent(f"z{t}", lambda prev: Categorical(logits=p["A"][prev]), parents=[f"z{t - 1}"])
    for t in range(1, T + 1):
        m.observed(f"x{t}", lambda z: Normal(p["mu"][z], SIGMA), parents=[f"z{t}"])
    q = tg.Proposal(m)
    for t in range(1, T + 1):
        q.enumerate(f"z{t}")
    S = p["b"].shape[0]
    est = tmcgraph_estimator(tg.TMC, m, q, S, device=device, compiled=compiled)
    f = lambda x: est.log_evidence({f"x{t + 1}": x[t] for t in range(T)})  # noqa: E731
    f.est = est
    return f


def hand_forward(p: dict):
    """The log-space forward algorithm ``f(x)``: one ``logsumexp`` over an S x S grid per step."""

    def f(x):
        lA = torch.log_softmax(p["A"], -1)
        em = Normal(p["mu"], SIGMA)
        a = torch.log_softmax(p["b"], -1) + em.log_prob(x[0])
        for t in range(1, x.shape[0]):
            a = torch.logsumexp(a[:, None] + lA, 0) + em.log_prob(x[t])
        return torch.logsumexp(a, 0)

    return f


def exact_log_likelihood(p: dict, x: torch.Tensor) -> float:
    """The forward algorithm in float64 on the CPU (the reference every contender is checked against)."""
    q = {k: v.detach().cpu().double() for k, v in p.items()}
    with torch.no_grad():
        return float(hand_forward(q)(x.detach().cpu().double()))


def pyro_hmm_enum(p: dict, pyro_mods):
    """Pyro's exact log p(x): ``-TraceEnum_ELBO.differentiable_loss`` with enumerated states, ``pyro.markov``."""
    pyro, pdist = pyro_mods[:2]
    from pyro.infer import TraceEnum_ELBO, config_enumerate

    def model(x):
        z = pyro.sample("z1", pdist.Categorical(logits=p["b"]))
        pyro.sample("x1", pdist.Normal(p["mu"][z], SIGMA), obs=x[0])
        for t in pyro.markov(range(1, x.shape[0])):
            z = pyro.sample(f"z{t + 1}", pdist.Categorical(logits=p["A"][z]))
            pyro.sample(f"x{t + 1}", pdist.Normal(p["mu"][z], SIGMA), obs=x[t])

    mm = config_enumerate(model, "parallel")
    elbo = TraceEnum_ELBO(max_plate_nesting=0)

    def f(x):
        if torch.is_grad_enabled():
            return -elbo.differentiable_loss(mm, lambda x: None, x)
        # Under no_grad differentiable_loss refuses (nothing requires grad); loss is the same value.
        return -torch.as_tensor(elbo.loss(mm, lambda x: None, x))

    return f


def pyro_hmm_tmc(p: dict, pyro_mods):
    """Pyro's TraceTMC_ELBO with an enumerated uniform guide for the states (exact; no ``pyro.markov``)."""
    pyro, pdist, TraceTMC_ELBO, config_enumerate = pyro_mods
    S = p["b"].shape[0]

    def model(x):
        z = pyro.sample("z1", pdist.Categorical(logits=p["b"]))
        pyro.sample("x1", pdist.Normal(p["mu"][z], SIGMA), obs=x[0])
        for t in range(1, x.shape[0]):
            z = pyro.sample(f"z{t + 1}", pdist.Categorical(logits=p["A"][z]))
            pyro.sample(f"x{t + 1}", pdist.Normal(p["mu"][z], SIGMA), obs=x[t])

    def guide(x):
        uniform = torch.zeros(S, device=x.device)
        for t in range(x.shape[0]):
            pyro.sample(f"z{t + 1}", pdist.Categorical(logits=uniform))

    mm = config_enumerate(model, "parallel", expand=False)
    gg = config_enumerate(guide, "parallel", expand=False)
    elbo = TraceTMC_ELBO(max_plate_nesting=0)
    return lambda x: -elbo.differentiable_loss(mm, gg, x)


@keeps_process_state
def main(argv=None) -> dict:
    from perf_toy import pyro_or_none

    ap = base_parser(__doc__, seeds=11)
    add_device_arg(ap)
    add_compile_arg(ap)
    ap.add_argument("--no-pyro", action="store_true", help="skip the Pyro contenders")
    ap.add_argument("--S", type=int, default=None, help="hidden states (default 10; quick 3)")
    ap.add_argument("--T", type=int, default=None, help="time steps (default 100; quick 5)")
    args = ap.parse_args(argv)
    dev = resolve_device(args.device)
    threads = {**set_threads(args.threads, args.allocator), **no_distribution_validation()}
    reps = args.seeds or (3 if args.quick else args.default_seeds)
    S = args.S or (3 if args.quick else 10)
    T = args.T or (5 if args.quick else 100)
    backend = compile_backend(args)
    pm = None if args.no_pyro else pyro_or_none()
    limits0 = measure_limits(dev, args.quick)
    p = hmm_params(S, dev)
    x = hmm_data(p, T)
    exact = exact_log_likelihood(p, x)
    skip_tg = tmcgraph_compiled_skip(args)
    fns = {"tmcgraph": tmc_hmm(p, T, dev)}
    skipped = {}
    if skip_tg:
        skipped["tmcgraph-compiled"] = skip_tg
    else:
        fns["tmcgraph-compiled"] = tmc_hmm(p, T, dev, compiled=True)
    fns["hand"] = hand_forward(p)
    if args.no_compile:
        skipped["hand-compiled"] = "--no-compile"
    else:
        fns["hand-compiled"] = compile_hand(hand_forward(p), backend)
    if pm is not None:
        fns["pyro-enum"] = pyro_hmm_enum(p, pm)
        fns["pyro-tmc"] = pyro_hmm_tmc(p, pm)
    else:
        skipped["pyro-enum"] = skipped["pyro-tmc"] = "--no-pyro" if args.no_pyro else "pyro-ppl not importable"
    rows = []
    for mode in ("forward", "forward+backward"):
        res = compare({k: (lambda f=f: f(x)) for k, f in fns.items()}, reps, mode != "forward", list(p.values()),
                      device=dev, skipped=skipped)
        checks = check_values(res, exact=exact, near_exact=[k for k in res if "values" in res[k]],
                              exact_tol=1e-4 * max(1.0, abs(exact)))
        checks["max_abs_value_difference"] = max(
            (c["median_abs_error"] for c in checks["value_checks"].values()), default=0.0)
        rs = ratios(res, RATIO_PAIRS + (("pyro-enum", "tmcgraph"), ("pyro-tmc", "tmcgraph"),
                                        ("pyro-enum", "hand-compiled")))
        row = {"workload": "hmm", "S": S, "T": T, "mode": mode, "results": res, "ratios": rs,
               "tmcgraph_over_hand": rs.get("tmcgraph/hand"),
               "tmcgraph_over_hand_compiled": rs.get("tmcgraph/hand-compiled"),
               "pyro_over_tmcgraph": rs.get("pyro-enum/tmcgraph"), **checks, "exact_log_likelihood": exact,
               "limit": limit_fields(res, limits0, exps=hmm_exps(S, T)),
               "tmcgraph_compiled_programs": compile_info(fns["tmcgraph-compiled"].est)
               if "tmcgraph-compiled" in fns else None}
        rows.append(row)
        print_row(f"S={S} T={T} {mode}", row)
        save_partial(args, "perf_hmm", argv, threads, repetitions=reps, device=str(dev), limits=limits0, rows=rows)
    limits = best_limits(limits0, measure_limits(dev, args.quick))
    for row in rows:
        row["limit"] = limit_fields(row["results"], limits, exps=row["limit"]["exp_count"])
    return save_results(args, "perf_hmm", argv, threads, _plot, repetitions=reps, device=str(dev),
                        compile_backend=backend, pyro=pm is not None, limits=limits, exp_counting_rule=EXP_RULE,
                        rows=rows)


def _plot(rows, path):
    plot_contenders(rows, path, lambda r: f"S={r['S']} T={r['T']}\n{r['mode']}",
                    "HMM, enumerated states: exact log p(x) (median; limit: (T-1) S^2 exps at measured exp/s)")


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
