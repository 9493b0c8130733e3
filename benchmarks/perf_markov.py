"""Speed of Markov (time-series) plates: an HMM with enumerated states and a sampled linear-Gaussian
state space model, each declared once with ``m.plate("time", size=T, markov=True)``, against
hand-written recursions, the same HMM declared as T separate latents, Pyro and the Kalman filter.

The chain along the plate is contracted by :mod:`tmcgraph.ops.scan` (parallel scan or
sequential forward recursion; ``method="auto"`` picks by :func:`tmcgraph.ops.scan.choose_method`,
recorded in every row as ``chain_method``).

Workload 1, HMM (the model of ``perf_hmm``: S states, T steps, learnable initial logits ``b``,
transition logits ``A`` and emission means ``mu``; data: one seeded draw). Every state is
enumerated, so every contender computes log p(x) exactly:

* ``tmcgraph-markov``: one latent ``z`` in the Markov plate, ``q.enumerate("z")``,
  ``TMC(compile=False).log_evidence``;
* ``tmcgraph-markov-compiled``: the same with ``compile=True`` (skipped with the reason when
  the estimator has no ``compile=``, with ``--no-compile``, with ``--quick`` unless
  ``--compile-backend inductor``, and for T above ``--compiled-max-T``, default 100: inductor
  compiles the whole T-step program, minutes at T = 1000, see ``compile_note`` in the JSON);
* ``tmcgraph-unrolled``: ``perf_hmm.tmc_hmm``, T separate latents ``z1..zT`` (only for T up
  to ``--unrolled-max-T``: setting up and planning T latents grows too slow beyond);
* ``hand``: ``perf_hmm.hand_forward``, the log-space forward algorithm;
* ``hand-compiled``: ``torch.compile`` of it (the T-step loop unrolled; skipped for T above
  ``--hand-compiled-max-T``, default 100: at T = 1000 inductor takes far longer than the run);
* ``pyro-enum``: ``perf_hmm.pyro_hmm_enum`` (TraceEnum_ELBO, ``pyro.markov``; skipped with
  ``--no-pyro`` or without pyro-ppl).

Every value is checked against the float64 forward algorithm (``perf_hmm.exact_log_likelihood``),
and once per T the gradient of ``tmcgraph-markov`` w.r.t. ``(b, A, mu)`` against the float64
forward algorithm's (autograd). Key figure: ``tmcgraph-markov / hand`` at the largest T
(target at most 2).

Workload 2, linear-Gaussian state space model: ``z_0 ~ N(0, 1)``, ``z_t = a z_{t-1} + N(0, 0.5^2)``,
``x_t = z_t + N(0, 0.7^2)``, a = 0.9 learnable (a leaf tensor used in the model's callable, so
forward+backward differentiates w.r.t. it), T = 1000, K = 100; data: one seeded draw.

* ``tmcgraph-markov``: ``q.prior("z")`` with the default coupling
  (:data:`tmcgraph.sampling.couplings.DEFAULT`, recorded as ``coupling``);
* ``hand-tmc``: the same estimator written by hand: ``z_0^k ~ N(0, 1)``; per step a
  uniformly random permutation ``sigma_t`` (the argsort of float64 uniforms, as the
  permutation coupling draws it) and ``z_t^k ~ N(a z_{t-1}^{sigma_t(k)}, 0.5^2)``; the K x K
  grid ``G_t[k, j] = log N(z_t^k; a z_{t-1}^j, 0.5^2)`` gives
  ``log q_t^k = logsumexp_j G_t[k, j] - log K``, and the log-weight matrix
  ``G_t[k, j] - log q_t^k - log K + log N(x_t; z_t^k, 0.7^2)`` enters the log-space forward
  recursion ``alpha_t[k] = logsumexp_j (alpha_{t-1}[j] + W_t[k, j])`` (terms constant in j
  are added after the ``logsumexp``; grids are laid out so it reduces the contiguous dim),
  ``alpha_0[k] = log N(x_0; z_0^k, 0.7^2) - log K``. It consumes torch's global stream in
  tmcgraph's order, so under the same seed it draws the same particles, and its value must
  equal ``tmcgraph-markov``'s (if it does not, e.g. after a change of the default coupling or
  of the draw order, this is noted and it is checked against Kalman only);
* ``kalman``: the Kalman filter's exact log p(x) (float32, differentiable in a), a timing
  reference; its float64 value is the truth.

The TMC estimates are stochastic lower bounds in expectation: each row records their mean and
median minus the Kalman value over the repetitions (``gap_to_kalman``) and checks that every value
is finite and the mean within ``--ssm-tol`` nats of Kalman (default 40: with the prior proposal
at T = 1000, K = 100 single estimates fall 5 to 32 nats below Kalman, their mean about 20; the
estimator's unbiasedness for p(x) is tested in ``tests/infer/test_markov.py``). Once per run the gradient
w.r.t. a of ``tmcgraph-markov`` and ``hand-tmc`` on the same particles is compared.

Timing (``_common.compare``): one thread, contenders interleaved with the same seed per
repetition, two warm-ups (where compilation happens), CPU-time medians and medians of
paired per-repetition ratios.

Limit (``_common.measure_limits``, same run): HMM, ``(T-1) S^2`` exps (``perf_hmm``'s rule);
SSM, ``2 (T-1) K^2`` exps (each step's K x K grid is exponentiated twice: in the mixture
density ``log q_t`` and in the forward recursion), both modes. The Kalman filter has no
such count and is left out of the fractions.

    python benchmarks/perf_markov.py            # HMM S = 10, T in {100, 1000}; SSM T = 1000, K = 100
    python benchmarks/perf_markov.py --quick    # HMM S = 3, T = 5; SSM T = 5, K = 4
"""

from __future__ import annotations

import math
import statistics
import sys

import torch
from _common import (
    COLORS,
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
    parse_list,
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
from perf_hmm import SIGMA, exact_log_likelihood, hand_forward, hmm_data, hmm_exps, hmm_params, pyro_hmm_enum, tmc_hmm
from torch.distributions import Categorical, Normal

import tmcgraph as tg
from tmcgraph.ops.scan import choose_method
from tmcgraph.sampling.couplings import DEFAULT as DEFAULT_COUPLING

__all__ = ["main", "tmc_markov_hmm", "ssm_data", "tmc_markov_ssm", "hand_tmc_ssm", "kalman_log_evidence",
           "ssm_exps", "SSM_A", "SSM_Q", "SSM_R", "SSM_S0"]

#: The state space model: transition coefficient, transition and emission noise scales, initial scale.
SSM_A, SSM_Q, SSM_R, SSM_S0 = 0.9, 0.5, 0.7, 1.0

HMM_PAIRS = (
    ("tmcgraph-markov", "hand"),
    ("tmcgraph-markov", "hand-compiled"),
    ("tmcgraph-markov-compiled", "hand-compiled"),
    ("tmcgraph-markov-compiled", "tmcgraph-markov"),
    ("tmcgraph-unrolled", "tmcgraph-markov"),
    ("hand-compiled", "hand"),
    ("pyro-enum", "tmcgraph-markov"),
)
SSM_PAIRS = (("tmcgraph-markov", "hand-tmc"), ("tmcgraph-markov", "kalman"), ("hand-tmc", "kalman"))
EXP_RULE = {"hmm": "(T-1)*S*S: one exp per entry of each step's S x S transition grid (both modes)",
            "ssm": "2*(T-1)*K*K: each step's K x K grid is exponentiated in log q_t and in the forward "
                   "recursion (both modes; kalman excluded)"}
#: Why ``--compiled-max-T`` and ``--hand-compiled-max-T`` default to 100: cold compile times (empty
#: inductor cache) measured on this benchmark's 2-core CPU while it was shared with other jobs (load
#: average 5 to 7), S = 10. A row's ``compile_s`` is that run's, shorter when inductor's on-disk
#: cache already holds the programs.
COMPILED_NOTE = ("cold compile times, 2-core CPU shared with other jobs (load average 5-7), S=10: "
                 "tmcgraph-markov-compiled (compile=True) T=100: 331 s for the forward program and 121 s more for "
                 "forward+backward; T=1000: 272 s + 168 s, after which a forward call took about 0.1 s (eager: "
                 "0.03-0.05 s). hand-compiled (inductor, T-step loop unrolled) T=100: 184 s + 81 s; T=1000: not "
                 "finished after 23 minutes. So both run only up to T=100 by default (--compiled-max-T, "
                 "--hand-compiled-max-T); compile_s in a row is that run's, shorter when inductor's on-disk cache "
                 "holds the programs.")
KEY_RATIO = "tmcgraph-markov/hand"
KEY_TARGET = 2.0


# ------------------------------------------------------------------------------------------ HMM


def tmc_markov_hmm(p: dict, T: int, device="cpu", compiled: bool = False):
    """tmcgraph's exact log p(x) of ``perf_hmm``'s HMM declared with a Markov plate: ``f(x)``, ``f.est``."""
    m = tg.Model()
    m.plate("time", size=T, markov=True)
    m.latent("z", lambda z_prev: Categorical(logits=p["A"][z_prev]), plate="time",
             init=lambda: Categorical(logits=p["b"]))
    m.observed("x", lambda z: Normal(p["mu"][z], SIGMA), plate="time")
    q = tg.Proposal(m)
    q.enumerate("z")
    est = tmcgraph_estimator(tg.TMC, m, q, p["b"].shape[0], device=device, compiled=compiled)
    f = lambda x: est.log_evidence({"x": x})  # noqa: E731
    f.est = est
    return f


def _hmm_gradient_check(p: dict, x: torch.Tensor, f, rtol: float = 1e-3) -> dict:
    """Gradient of ``f(x)`` w.r.t. ``(b, A, mu)`` against the float64 forward algorithm's; raises on a mismatch."""
    names = ("b", "A", "mu")
    got = torch.autograd.grad(f(x), [p[k] for k in names])
    q = {k: v.detach().cpu().double().requires_grad_() for k, v in p.items()}
    want = torch.autograd.grad(hand_forward(q)(x.detach().cpu().double()), [q[k] for k in names])
    scale = max(1.0, max(float(w.abs().max()) for w in want))
    err = max(float((g.detach().cpu().double() - w).abs().max()) for g, w in zip(got, want))
    if err > rtol * scale:
        raise RuntimeError(f"tmcgraph-markov: gradient w.r.t. (b, A, mu) is {err:.3g} from the float64 forward "
                           f"algorithm's (tolerance {rtol * scale:.3g})")
    return {"check": "d log p(x) / d(b, A, mu) against the float64 forward algorithm", "max_abs_error": err,
            "max_abs_gradient": scale, "tolerance": rtol * scale}


def _hmm_rows(args, S: int, T: int, dev, reps: int, backend: str, pm, limits: dict) -> list:
    p = hmm_params(S, dev)
    x = hmm_data(p, T)
    exact = exact_log_likelihood(p, x)
    fns, skipped, notes = {"tmcgraph-markov": tmc_markov_hmm(p, T, dev)}, {}, {}
    skip_tg = tmcgraph_compiled_skip(args)
    if skip_tg is None and T > args.compiled_max_T:
        skip_tg = (f"T={T} > --compiled-max-T {args.compiled_max_T}: inductor compiles the whole {T}-step program "
                   "(see compile_note)")
    if skip_tg:
        skipped["tmcgraph-markov-compiled"] = skip_tg
    else:
        fns["tmcgraph-markov-compiled"] = tmc_markov_hmm(p, T, dev, compiled=True)
    if T <= args.unrolled_max_T:
        fns["tmcgraph-unrolled"] = tmc_hmm(p, T, dev)
    else:
        skipped["tmcgraph-unrolled"] = (f"T={T} > --unrolled-max-T {args.unrolled_max_T}: {T} separate latents are "
                                        "too slow to set up and plan")
    fns["hand"] = hand_forward(p)
    if args.no_compile:
        skipped["hand-compiled"] = "--no-compile"
    elif T > args.hand_compiled_max_T:
        skipped["hand-compiled"] = (f"T={T} > --hand-compiled-max-T {args.hand_compiled_max_T}: the unrolled "
                                    f"{T}-step loop takes too long to compile (see compile_note)")
    else:
        fns["hand-compiled"] = compile_hand(hand_forward(p), backend)
    if pm is not None:
        fns["pyro-enum"] = pyro_hmm_enum(p, pm)
    else:
        skipped["pyro-enum"] = "--no-pyro" if args.no_pyro else "pyro-ppl not importable"
    notes["gradient_check"] = _hmm_gradient_check(p, x, fns["tmcgraph-markov"])
    rows = []
    for mode in ("forward", "forward+backward"):
        res = compare({k: (lambda f=f: f(x)) for k, f in fns.items()}, reps, mode != "forward", list(p.values()),
                      device=dev, skipped=skipped)
        checks = check_values(res, exact=exact, near_exact=[k for k in res if "values" in res[k]],
                              exact_tol=1e-4 * max(1.0, abs(exact)))
        checks["max_abs_value_difference"] = max(
            (c["median_abs_error"] for c in checks["value_checks"].values()), default=0.0)
        rs = ratios(res, HMM_PAIRS)
        row = {"workload": "hmm", "S": S, "T": T, "mode": mode, "chain_method": choose_method(1, S, T - 1),
               "results": res, "ratios": rs, "markov_over_hand": rs.get(KEY_RATIO),
               "markov_over_hand_compiled": rs.get("tmcgraph-markov/hand-compiled"),
               "unrolled_over_markov": rs.get("tmcgraph-unrolled/tmcgraph-markov"),
               "pyro_over_markov": rs.get("pyro-enum/tmcgraph-markov"), **checks, "exact_log_likelihood": exact,
               **notes, "limit": limit_fields(res, limits, exps=hmm_exps(S, T)),
               "tmcgraph_markov_compiled_programs": compile_info(fns["tmcgraph-markov-compiled"].est)
               if "tmcgraph-markov-compiled" in fns else None}
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------ SSM


def ssm_exps(T: int, K: int) -> int:
    """Inherent exps of the TMC estimate: two per entry of each step's K x K grid."""
    return 2 * (T - 1) * K * K


@torch.no_grad()
def ssm_data(T: int, seed: int = 2, device="cpu") -> torch.Tensor:
    """One draw ``x [T]`` of the state space model with ``a = SSM_A`` (seeded generator)."""
    g = torch.Generator().manual_seed(seed)
    z, xs = SSM_S0 * float(torch.randn((), generator=g)), []
    for t in range(T):
        if t:
            z = SSM_A * z + SSM_Q * float(torch.randn((), generator=g))
        xs.append(z + SSM_R * float(torch.randn((), generator=g)))
    return torch.tensor(xs, device=device)


def kalman_log_evidence(a, x: torch.Tensor) -> torch.Tensor:
    """Exact log p(x) of the state space model by the Kalman filter (differentiable in ``a``)."""
    m, P = x.new_zeros(()), x.new_full((), SSM_S0 ** 2)
    ll = x.new_zeros(())
    log2pi = math.log(2 * math.pi)
    for t in range(x.shape[0]):
        if t:
            m, P = a * m, a * a * P + SSM_Q ** 2
        S = P + SSM_R ** 2
        r = x[t] - m
        ll = ll - 0.5 * (log2pi + torch.log(S) + r * r / S)
        k = P / S
        m, P = m + k * r, (1 - k) * P
    return ll


def tmc_markov_ssm(a: torch.Tensor, T: int, K: int, device="cpu"):
    """tmcgraph's TMC estimate of log p(x) with the prior proposal and the default coupling: ``f(x)``."""
    m = tg.Model()
    m.plate("time", size=T, markov=True)
    m.latent("z", lambda z_prev: Normal(a * z_prev, SSM_Q), plate="time", init=lambda: Normal(0.0, SSM_S0))
    m.observed("x", lambda z: Normal(z, SSM_R), plate="time")
    q = tg.Proposal(m)
    q.prior("z")
    est = tmcgraph_estimator(tg.TMC, m, q, K, device=device)
    f = lambda x: est.log_evidence({"x": x})  # noqa: E731
    f.est = est
    return f


def hand_tmc_ssm(a: torch.Tensor, K: int):
    """The TMC estimate with permutation-coupled prior particles, by hand: ``f(x)`` (see the module doc)."""
    logK = math.log(K)

    def f(x):
        T, dev = x.shape[0], x.device
        z = Normal(torch.zeros(K, 1, device=dev), SSM_S0).rsample()
        zs = [z]
        for _ in range(1, T):
            sigma = torch.rand((1, K, 1), dtype=torch.float64, device=dev).argsort(dim=1).reshape(K)
            z = Normal(a * z[sigma], SSM_Q).rsample()
            zs.append(z)
        Z = torch.cat(zs, 1).T  # [T, K]
        G = Normal(a * Z[:-1, None, :], SSM_Q).log_prob(Z[1:, :, None])  # [T-1, k, j]
        em = Normal(Z, SSM_R).log_prob(x[:, None])  # [T, K]
        log_q = torch.logsumexp(G, -1) - logK  # [T-1, K]
        after = em[1:] - log_q - logK  # the terms of W_t[k, j] constant in j
        alpha = em[0] - logK
        for g, c in zip(G.unbind(0), after.unbind(0)):
            alpha = torch.logsumexp(alpha + g, -1) + c
        return torch.logsumexp(alpha, 0)

    return f


def _ssm_gradient_check(a: torch.Tensor, x: torch.Tensor, fns: dict, rtol: float = 1e-2) -> dict:
    """d/da of tmcgraph-markov and hand-tmc on the same particles (seed 0)."""
    grads, values = {}, {}
    for k in ("tmcgraph-markov", "hand-tmc"):
        torch.manual_seed(0)
        v = fns[k](x)
        values[k] = float(v.detach())
        grads[k] = float(torch.autograd.grad(v, a)[0])
    same = abs(values["tmcgraph-markov"] - values["hand-tmc"]) <= 1e-4 * max(1.0, abs(values["hand-tmc"]))
    err = abs(grads["tmcgraph-markov"] - grads["hand-tmc"])
    tol = rtol * max(1.0, abs(grads["hand-tmc"]))
    out = {"check": "d log Z / da of tmcgraph-markov and hand-tmc on the same particles (seed 0)",
           "gradients": grads, "abs_difference": err, "tolerance": tol, "same_particles": same}
    if not same:
        out["note"] = "hand-tmc does not reproduce tmcgraph's particles: gradients not compared"
    elif err > tol:
        raise RuntimeError(f"SSM: d/da of tmcgraph-markov {grads['tmcgraph-markov']:.6g} and hand-tmc "
                           f"{grads['hand-tmc']:.6g} differ by {err:.3g} on the same particles (tolerance {tol:.3g})")
    return out


def _gaps(res: dict, exact: float, tol: float) -> dict:
    """Mean and median of each TMC contender's values minus the Kalman value; raises past ``tol`` nats."""
    out = {}
    for k in ("tmcgraph-markov", "hand-tmc"):
        vals = res.get(k, {}).get("values")
        if not vals:
            continue
        if not all(math.isfinite(v) for v in vals):
            raise RuntimeError(f"SSM {k}: non-finite estimates {vals}")
        mean = statistics.fmean(vals) - exact
        out[k] = {"mean": mean, "median": statistics.median(vals) - exact, "min": min(vals) - exact,
                  "max": max(vals) - exact, "n": len(vals)}
        if abs(mean) > tol:
            raise RuntimeError(f"SSM {k}: mean estimate is {mean:.3g} nats from the Kalman log p(x) {exact:.6g} "
                               f"(tolerance --ssm-tol {tol:g}); values {vals}")
    return out


def _ssm_rows(args, T: int, K: int, dev, reps: int, limits: dict) -> list:
    a = torch.tensor(SSM_A, device=dev, requires_grad=True)
    x = ssm_data(T, device=dev)
    exact = float(kalman_log_evidence(torch.tensor(SSM_A, dtype=torch.float64), x.detach().cpu().double()))
    fns = {"tmcgraph-markov": tmc_markov_ssm(a, T, K, dev), "hand-tmc": hand_tmc_ssm(a, K),
           "kalman": lambda x: kalman_log_evidence(a, x)}
    grad_check = _ssm_gradient_check(a, x, fns)
    rows = []
    for mode in ("forward", "forward+backward"):
        res = compare({k: (lambda f=f: f(x)) for k, f in fns.items()}, reps, mode != "forward", [a], device=dev)
        same = check_values(res, same=["hand-tmc"], reference="tmcgraph-markov", rtol=1e-4, exact=exact,
                            exact_tol=args.ssm_tol, soft_same=("hand-tmc",))
        truth = check_values(res, exact=exact, near_exact=["kalman"], exact_tol=1e-4 * max(1.0, abs(exact)))
        gaps = _gaps(res, exact, args.ssm_tol)
        rs = ratios(res, SSM_PAIRS)
        timed = {k: v for k, v in res.items() if k != "kalman"}
        row = {"workload": "ssm", "T": T, "K": K, "mode": mode, "coupling": str(DEFAULT_COUPLING),
               "chain_method": choose_method(1, K, T - 1), "results": res, "ratios": rs,
               "markov_over_hand_tmc": rs.get("tmcgraph-markov/hand-tmc"),
               "max_abs_value_difference": same["max_abs_value_difference"],
               "value_checks": {**same["value_checks"], **truth["value_checks"]},
               "kalman_log_evidence": exact, "gap_to_kalman": gaps, "ssm_tol": args.ssm_tol,
               "gradient_check": grad_check, "limit": limit_fields(timed, limits, exps=ssm_exps(T, K))}
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------ main


def _label(r: dict) -> str:
    if r["workload"] == "hmm":
        return f"HMM S={r['S']} T={r['T']}\n{r['mode']}"
    return f"SSM T={r['T']} K={r['K']}\n{r['mode']}"


def _key_ratio(rows: list) -> dict:
    hmm = [r for r in rows if r["workload"] == "hmm"]
    if not hmm:
        return {}
    T = max(r["T"] for r in hmm)
    out = {"ratio": KEY_RATIO, "S": hmm[0]["S"], "T": T, "target_at_most": KEY_TARGET}
    for r in hmm:
        if r["T"] == T:
            out[r["mode"]] = r["markov_over_hand"]
    vals = [out.get(m) for m in ("forward", "forward+backward")]
    out["met"] = all(v is not None and v <= KEY_TARGET for v in vals)
    return out


@keeps_process_state
def main(argv=None) -> dict:
    from perf_toy import pyro_or_none

    ap = base_parser(__doc__, seeds=7)
    add_device_arg(ap)
    add_compile_arg(ap)
    ap.add_argument("--no-pyro", action="store_true", help="skip the Pyro contender")
    ap.add_argument("--workloads", default="hmm,ssm", help="comma-separated subset of hmm,ssm (default both)")
    ap.add_argument("--S", type=int, default=None, help="HMM states (default 10; quick 3)")
    ap.add_argument("--T", default=None, help="HMM lengths, comma-separated (default 100,1000; quick 5)")
    ap.add_argument("--ssm-T", type=int, default=None, help="SSM length (default 1000; quick 5)")
    ap.add_argument("--ssm-K", type=int, default=None, help="SSM particles per step (default 100; quick 4)")
    ap.add_argument("--ssm-tol", type=float, default=40.0,
                    help="largest |mean TMC estimate - Kalman log p(x)| in nats accepted (default 40)")
    ap.add_argument("--unrolled-max-T", type=int, default=100,
                    help="largest T for tmcgraph-unrolled, T separate latents (default 100)")
    ap.add_argument("--compiled-max-T", type=int, default=100,
                    help="largest T for tmcgraph-markov-compiled (default 100)")
    ap.add_argument("--hand-compiled-max-T", type=int, default=100,
                    help="largest T for hand-compiled (default 100)")
    args = ap.parse_args(argv)
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    if not workloads or any(w not in ("hmm", "ssm") for w in workloads):
        ap.error(f"--workloads: expected a comma-separated subset of hmm,ssm, got {args.workloads!r}")
    Ts = parse_list(args.T) or ([5] if args.quick else [100, 1000])
    S = args.S or (3 if args.quick else 10)
    ssm_T = args.ssm_T or (5 if args.quick else 1000)
    ssm_K = args.ssm_K or (4 if args.quick else 100)
    if min(Ts) < 2 or ssm_T < 2:
        ap.error(f"--T and --ssm-T: chains need at least 2 steps, got --T {Ts} and --ssm-T {ssm_T}")
    if S < 2 or ssm_K < 1 or not args.ssm_tol > 0:
        ap.error(f"--S must be >= 2, --ssm-K >= 1 and --ssm-tol > 0; got {S}, {ssm_K}, {args.ssm_tol}")
    dev = resolve_device(args.device)
    threads = {**set_threads(args.threads, args.allocator), **no_distribution_validation()}
    reps = args.seeds or (3 if args.quick else args.default_seeds)
    backend = compile_backend(args)
    pm = None if args.no_pyro or "hmm" not in workloads else pyro_or_none()
    limits0 = measure_limits(dev, args.quick)
    fields = {"quick": args.quick, "repetitions": reps, "device": str(dev), "compile_backend": backend,
              "pyro": pm is not None, "exp_counting_rule": EXP_RULE, "coupling": str(DEFAULT_COUPLING),
              "compiled_max_T": args.compiled_max_T, "compile_note": COMPILED_NOTE,
              "unrolled_max_T": args.unrolled_max_T, "hand_compiled_max_T": args.hand_compiled_max_T}
    rows = []

    def done(new):
        rows.extend(new)
        for r in new:
            print_row(_label(r).replace("\n", " "), r)
        save_partial(args, "perf_markov", argv, threads, **fields, limits=limits0, rows=rows)

    if "hmm" in workloads:
        for T in Ts:
            done(_hmm_rows(args, S, T, dev, reps, backend, pm, limits0))
    if "ssm" in workloads:
        done(_ssm_rows(args, ssm_T, ssm_K, dev, reps, limits0))
    limits = best_limits(limits0, measure_limits(dev, args.quick))
    for row in rows:
        res = row["results"] if row["workload"] == "hmm" else {k: v for k, v in row["results"].items()
                                                                if k != "kalman"}
        row["limit"] = limit_fields(res, limits, exps=row["limit"]["exp_count"])
    key = _key_ratio(rows)
    if key:
        print(f"key ratio {KEY_RATIO} at S={key['S']} T={key['T']}: forward {key.get('forward')}, "
              f"forward+backward {key.get('forward+backward')} (target <= {KEY_TARGET})")
    return save_results(args, "perf_markov", argv, threads, _plot, **fields, limits=limits, key_ratio=key,
                        rows=rows)


#: Plot colours of this benchmark's contenders (the others are in ``_common.COLORS``).
MARKOV_COLORS = {"tmcgraph-markov": "tab:red", "tmcgraph-markov-compiled": "tab:orange",
                 "tmcgraph-unrolled": "tab:purple", "hand-tmc": "tab:brown", "kalman": "tab:gray"}


def _plot(rows, path):
    ssm = [r for r in rows if r["workload"] == "ssm"]
    for k, c in MARKOV_COLORS.items():
        COLORS.setdefault(k, c)

    def extra(ax):
        names = ("tmcgraph-markov", "hand-tmc")
        for i, r in enumerate(ssm):
            for j, k in enumerate(names):
                vals = r["results"].get(k, {}).get("values") or []
                xs = [i + (j - 0.5) * 0.3] * len(vals)
                ax.plot(xs, [v - r["kalman_log_evidence"] for v in vals], "o", ms=3,
                        color=MARKOV_COLORS[k], label=k if i == 0 else None)
        ax.axhline(0.0, color="k", lw=0.8, ls="--")
        ax.set_xticks(range(len(ssm)))
        ax.set_xticklabels([_label(r).replace("\n", " ") for r in ssm], fontsize=7)
        ax.set_ylabel("SSM estimate minus\nKalman log p(x) (nats)", fontsize=8)
        if ssm:
            ax.legend(fontsize=7)

    plot_contenders(rows, path, _label,
                    "Markov plates: HMM (enumerated, exact) and linear-Gaussian SSM (TMC, prior proposal); "
                    "median CPU time, 1 thread", extra=extra if ssm else None)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
