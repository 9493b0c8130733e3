"""Markov (time-series) plates against exact truths.

Truths: the forward algorithm and forward-backward for HMMs (exact, enumerated states);
a Kalman filter for the linear-Gaussian state-space model (evidence unbiasedness over
3000 replicates, per coupling, for the prior and a factorised proposal, IWAE and SMC);
the same model declared as T separate latents on the same particles (the engine
without Markov plates); enumeration of every state path of a factorial HMM; the
unrolled graph's brute force (``tmcgraph.ops.oracle.unroll_markov``) for gradients.
"""

import itertools
import math
import sys
from pathlib import Path

import pytest
import torch
from torch.distributions import Categorical, Normal

import tmcgraph as tg
from tmcgraph.errors import TMCGraphError
from tmcgraph.infer.factors import factor_graph
from tmcgraph.infer.smc import SMC
from tmcgraph.ops import brute_force, contract, plan_for
from tmcgraph.particles import Samples

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from unbiased import assert_unbiased  # noqa: E402

D = torch.float64


def hmm_params(S, seed):
    g = torch.Generator().manual_seed(seed)
    A = torch.softmax(torch.randn(S, S, generator=g, dtype=D), -1)
    pi0 = torch.softmax(torch.randn(S, generator=g, dtype=D), -1)
    mu = 2 * torch.randn(S, generator=g, dtype=D)
    return A, pi0, mu


def forward_backward(A, pi0, mu, x):
    """log p(x) and the smoothed marginals [T, S] of a Gaussian-emission HMM (x: [T])."""
    e = Normal(mu[:, None], 1.0).log_prob(x[None, :])  # [S, T]
    T = x.shape[0]
    la = [torch.log(pi0) + e[:, 0]]
    for t in range(1, T):
        la.append(torch.logsumexp(la[-1][:, None] + torch.log(A), 0) + e[:, t])
    lb = [torch.zeros_like(pi0)]
    for t in range(T - 1, 0, -1):
        lb.append(torch.logsumexp(torch.log(A) + (e[:, t] + lb[-1])[None, :], 1))
    lb = lb[::-1]
    marg = torch.stack([torch.softmax(la[t] + lb[t], 0) for t in range(T)])
    return torch.logsumexp(la[-1], 0), marg


def hmm(A, pi0, mu, T, outer=None, inner=None):
    m = tg.Model()
    plates = ("time",)
    if outer:
        m.plate("seq", size=outer)
        plates = ("seq", "time")
    m.plate("time", size=T, markov=True)
    m.latent("z", lambda z_prev: Categorical(probs=A[z_prev]), plate=plates, init=lambda: Categorical(probs=pi0))
    if inner:
        m.plate("obs", size=inner)
        m.observed("x", lambda z: Normal(mu[z], 1.0), plate=plates + ("obs",))
    else:
        m.observed("x", lambda z: Normal(mu[z], 1.0), plate=plates)
    q = tg.Proposal(m)
    q.enumerate("z")
    return m, q


@pytest.mark.parametrize("T", [1, 2, 7, 1000])
@pytest.mark.parametrize("compile", [False, True])
def test_hmm_evidence_equals_forward_algorithm(T, compile):
    if compile is True and T == 1000:
        pytest.skip("compiling a 1000-step chain is slow; the eager path covers T=1000")
    A, pi0, mu = hmm_params(4, T)
    x = torch.randn(T, generator=torch.Generator().manual_seed(1), dtype=D)
    m, q = hmm(A, pi0, mu, T)
    est = tg.TMC(m, q, K=3, dtype=D, compile=compile)
    want, _ = forward_backward(A, pi0, mu, x)
    for _ in range(2):  # the first call and the program's call
        got = est.log_evidence({"x": x})
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-9), (float(got), float(want))


def test_hmm_posterior_marginals_and_samples_equal_forward_backward():
    T = 6
    A, pi0, mu = hmm_params(3, 5)
    x = torch.randn(T, generator=torch.Generator().manual_seed(2), dtype=D)
    m, q = hmm(A, pi0, mu, T)
    est = tg.TMC(m, q, K=3, dtype=D)
    _, fb = forward_backward(A, pi0, mu, x)
    post = tg.posterior(est, {"x": x}, seed=0)
    assert torch.allclose(post.marginal("z").T, fb, atol=1e-12)
    # backward sampling: pairwise frequencies of (z_t, z_{t+1}) against the exact pairwise marginals
    N = 20000
    z = post.sample(N, seed=1)["z"]
    e = Normal(mu[:, None], 1.0).log_prob(x[None, :])
    paths = torch.tensor(list(itertools.product(range(3), repeat=T)))
    logw = torch.log(pi0)[paths[:, 0]] + e[paths[:, 0], 0]
    for t in range(1, T):
        logw = logw + torch.log(A)[paths[:, t - 1], paths[:, t]] + e[paths[:, t], t]
    w = torch.softmax(logw, 0)
    for t in range(T - 1):
        for i, j in itertools.product(range(3), repeat=2):
            p = float(w[(paths[:, t] == i) & (paths[:, t + 1] == j)].sum())
            f = float(((z[:, t] == i) & (z[:, t + 1] == j)).double().mean())
            assert abs(f - p) <= 4.5 * math.sqrt(max(p * (1 - p), 1e-6) / N) + 1e-4, (t, i, j, f, p)


def test_many_sequences_and_several_observations_per_step():
    S, T, B, J = 3, 5, 4, 2
    A, pi0, mu = hmm_params(S, 9)
    x = torch.randn(B, T, J, generator=torch.Generator().manual_seed(3), dtype=D)
    m, q = hmm(A, pi0, mu, T, outer=B, inner=J)
    got = tg.TMC(m, q, K=3, dtype=D).log_evidence({"x": x})
    # J observations per step: emission log-likelihood summed over them
    want = 0.0
    for b in range(B):
        e = Normal(mu[:, None, None], 1.0).log_prob(x[b][None]).sum(-1)  # [S, T]
        a = torch.log(pi0) + e[:, 0]
        for t in range(1, T):
            a = torch.logsumexp(a[:, None] + torch.log(A), 0) + e[:, t]
        want = want + torch.logsumexp(a, 0)
    assert torch.allclose(got, want, rtol=1e-12)


def test_factorial_hmm_with_cross_chain_dependence_equals_path_enumeration():
    """Two chains; w_t depends on w_{t-1} and z_{t-1}; x_t on both: enumerate all 2^(2T) paths."""
    T = 3
    g = torch.Generator().manual_seed(4)
    Az = torch.softmax(torch.randn(2, 2, generator=g, dtype=D), -1)
    Aw = torch.softmax(torch.randn(2, 2, 2, generator=g, dtype=D), -1)  # [z_prev, w_prev, w]
    mu = torch.randn(2, 2, generator=g, dtype=D)
    x = torch.randn(T, generator=g, dtype=D)
    m = tg.Model()
    m.plate("time", size=T, markov=True)
    m.latent("z", lambda z_prev: Categorical(probs=Az[z_prev]), plate="time", init=lambda: Categorical(probs=Az[0]))
    m.latent("w", lambda z_prev, w_prev: Categorical(probs=Aw[z_prev, w_prev]), plate="time",
             init=lambda: Categorical(probs=Aw[1, 0]))
    m.observed("x", lambda z, w: Normal(mu[z, w], 1.0), plate="time")
    q = tg.Proposal(m)
    q.enumerate("z")
    q.enumerate("w")
    got = tg.TMC(m, q, K=2, dtype=D).log_evidence({"x": x})
    terms = []
    for zs in itertools.product(range(2), repeat=T):
        for ws in itertools.product(range(2), repeat=T):
            lp = torch.log(Az[0, zs[0]]) + torch.log(Aw[1, 0, ws[0]]) + Normal(mu[zs[0], ws[0]], 1.0).log_prob(x[0])
            for t in range(1, T):
                lp = lp + torch.log(Az[zs[t - 1], zs[t]]) + torch.log(Aw[zs[t - 1], ws[t - 1], ws[t]])
                lp = lp + Normal(mu[zs[t], ws[t]], 1.0).log_prob(x[t])
            terms.append(lp)
    assert torch.allclose(got, torch.logsumexp(torch.stack(terms), 0), rtol=1e-12)


# ----------------------------------------------------------------- linear-Gaussian state space

A1, Q1, R1, S0 = 0.8, 0.6, 0.5, 1.0


def kalman_log_evidence(x):
    m, P, ll = 0.0, S0 ** 2, 0.0
    for t in range(len(x)):
        if t:
            m, P = A1 * m, A1 * A1 * P + Q1 ** 2
        S = P + R1 ** 2
        ll += float(Normal(torch.tensor(m, dtype=D), math.sqrt(S)).log_prob(x[t]))
        k = P / S
        m, P = m + k * (float(x[t]) - m), (1 - k) * P
    return ll


def ssm(T, reps=None):
    m = tg.Model()
    plates = ("time",)
    if reps:
        m.plate("rep", size=reps)
        plates = ("rep", "time")
    m.plate("time", size=T, markov=True)
    m.latent("z", lambda z_prev: Normal(A1 * z_prev, Q1), plate=plates, init=lambda: Normal(0.0, S0))
    m.observed("x", lambda z: Normal(z, R1), plate=plates)
    return m


def ssm_proposal(m, kind):
    q = tg.Proposal(m)
    if kind == "prior":
        q.prior("z")
    elif kind == "factorised":
        q.latent("z", lambda x: Normal(0.6 * x, 0.8))
    else:
        q.latent("z", lambda z_prev, x: Normal(0.5 * z_prev + 0.4 * x, 0.7), init=lambda x: Normal(0.6 * x, 0.8),
                 coupling=None if kind == "iwae" else kind)
    return q


@pytest.mark.parametrize("kind", ["prior", "factorised", "paired", "mixture", "permutation", "iwae"])
def test_state_space_evidence_is_unbiased_against_kalman(kind):
    T, R = 6, 3000
    x = 1.5 * torch.randn(T, generator=torch.Generator().manual_seed(3), dtype=D)
    m = ssm(T, reps=R)
    q = ssm_proposal(m, kind)
    est = (tg.IWAE if kind == "iwae" else tg.TMC)(m, q, K=5, dtype=D)
    v = est.log_evidence({"x": x.expand(R, T)}, seed=11, elementwise=True)
    assert v.shape == (R,)
    assert_unbiased(v, kalman_log_evidence(x))


def test_smc_filters_along_the_markov_plate_and_is_unbiased():
    T = 6
    x = 1.5 * torch.randn(T, generator=torch.Generator().manual_seed(3), dtype=D)
    m = ssm(T)
    q = ssm_proposal(m, "paired")
    smc = SMC(m, q, K=5, dtype=D)
    assert smc.seq_plate == "time"
    v = torch.stack([smc.log_evidence({"x": x}, seed=i) for i in range(2000)])
    assert_unbiased(v, kalman_log_evidence(x))


def unrolled_ssm(T):
    m = tg.Model()
    for t in range(T):
        if t == 0:
            m.latent("z0", lambda: Normal(0.0, S0))
        else:
            m.latent(f"z{t}", lambda p: Normal(A1 * p, Q1), parents=[f"z{t - 1}"])
        m.observed(f"x{t}", lambda z: Normal(z, R1), parents=[f"z{t}"])
    return m


@pytest.mark.parametrize("kind", ["prior", "paired", "mixture", "factorised"])
def test_equals_the_model_declared_as_separate_latents_on_the_same_particles(kind):
    T, K = 5, 4
    x = torch.randn(T, generator=torch.Generator().manual_seed(6), dtype=D)
    m = ssm(T)
    est = tg.TMC(m, ssm_proposal(m, kind), K=K, dtype=D)
    ev = est.run({"x": x}, seed=2)
    s = ev.samples
    got = ev.log_evidence
    mu = unrolled_ssm(T)
    qu = tg.Proposal(mu)
    for t in range(T):
        qu.prior(f"z{t}")
    values = {f"z{t}": s.values["z"][:, t] for t in range(T)}
    su = Samples(values, {n: n for n in values}, {n: K for n in values}, {n: () for n in values},
                 {f"z{t}": s.log_q["z"][:, t] for t in range(T)}, {f"x{t}": x[t] for t in range(T)}, {},
                 {n: () for n in mu.variables}, [f"z{t}" for t in range(T)])
    want = tg.TMC(mu, qu, K=K, dtype=D).log_evidence({f"x{t}": x[t] for t in range(T)}, samples=su)
    assert torch.allclose(got, want, rtol=1e-12), (float(got), float(want))


def test_gradients_equal_brute_force_of_the_unrolled_graph():
    T, K = 3, 2
    x = torch.randn(T, generator=torch.Generator().manual_seed(8), dtype=D)
    a = torch.tensor(0.7, dtype=D, requires_grad=True)
    m = tg.Model()
    m.plate("time", size=T, markov=True)
    m.latent("z", lambda z_prev: Normal(a * z_prev, Q1), plate="time", init=lambda: Normal(0.0, S0))
    m.observed("x", lambda z: Normal(z, R1), plate="time")
    q = tg.Proposal(m)
    q.latent("z", lambda z_prev, x: Normal(0.5 * z_prev + 0.4 * x, 0.7), init=lambda x: Normal(0.6 * x, 0.8),
             coupling="mixture")
    s = tg.TMC(m, q, K=K, dtype=D).run({"x": x}, seed=0).samples.detached()
    g = factor_graph(m, s)
    assert g.markov == {"time": (("_prev_z", "z"),)}
    fast = torch.autograd.grad(contract(plan_for(g), g.tensors), a)[0]
    g = factor_graph(m, s)
    slow = torch.autograd.grad(brute_force(g), a)[0]
    assert torch.allclose(fast, slow, rtol=1e-10)


def test_long_state_space_model_runs_and_is_near_kalman():
    T = 1000
    g = torch.Generator().manual_seed(5)
    z, xs = 0.0, []
    for t in range(T):
        z = (A1 * z if t else 0.0) + (Q1 if t else S0) * float(torch.randn(1, generator=g))
        xs.append(z + R1 * float(torch.randn(1, generator=g)))
    x = torch.tensor(xs, dtype=D)
    m = ssm(T)
    q = ssm_proposal(m, "permutation")
    v = float(tg.TMC(m, q, K=30, dtype=D).log_evidence({"x": x}, seed=0))
    exact = kalman_log_evidence(x)
    assert exact - 30 < v < exact + 1, (v, exact)


def test_observed_autoregression_with_a_global_latent():
    T, K = 5, 6
    x = torch.randn(T, generator=torch.Generator().manual_seed(9), dtype=D)
    m = tg.Model()
    m.plate("time", size=T, markov=True)
    m.latent("c", lambda: Normal(0.0, 1.0))
    m.observed("x", lambda c, x_prev: Normal(c + 0.5 * x_prev, 1.0), plate="time", init=lambda c: Normal(c, 1.0))
    q = tg.Proposal(m)
    q.latent("c", lambda: Normal(0.1, 1.2))
    ev = tg.TMC(m, q, K=K, dtype=D).run({"x": x}, seed=0)
    c = ev.samples.values["c"]
    lw = Normal(0.0, 1.0).log_prob(c) - Normal(0.1, 1.2).log_prob(c) + Normal(c, 1.0).log_prob(x[0])
    for t in range(1, T):
        lw = lw + Normal(c + 0.5 * x[t - 1], 1.0).log_prob(x[t])
    assert torch.allclose(ev.log_evidence, torch.logsumexp(lw, 0) - math.log(K), rtol=1e-12)


def test_memory_limit_gives_the_same_value():
    T = 50
    A, pi0, mu = hmm_params(5, 2)
    x = torch.randn(T, generator=torch.Generator().manual_seed(1), dtype=D)
    m, q = hmm(A, pi0, mu, T)
    want, _ = forward_backward(A, pi0, mu, x)
    got = tg.TMC(m, q, K=3, dtype=D, memory_limit=5000).log_evidence({"x": x})
    assert torch.allclose(got, want, rtol=1e-10)


def test_markov_declaration_errors_name_the_variable_and_plate():
    m = tg.Model()
    m.plate("time", size=3, markov=True)
    m.plate("data", size=2)
    with pytest.raises(TMCGraphError, match="needs a Markov plate"):
        m.latent("a", lambda a_prev: Normal(a_prev, 1.0), plate="data", init=lambda: Normal(0.0, 1.0))
    with pytest.raises(TMCGraphError, match="init=callable"):
        m.latent("z", lambda z_prev: Normal(z_prev, 1.0), plate="time")
    with pytest.raises(TMCGraphError, match="first element has none"):
        m.latent("z", lambda z_prev: Normal(z_prev, 1.0), plate="time", init=lambda z_prev: Normal(z_prev, 1.0))
    with pytest.raises(TMCGraphError, match="only for variables that take"):
        m.latent("z", lambda: Normal(0.0, 1.0), plate="time", init=lambda: Normal(0.0, 1.0))
    with pytest.raises(TMCGraphError, match="cannot be subsampled"):
        m.plate("t2", size=3, markov=True, subsample=True)
    m.latent("z", lambda z_prev: Normal(z_prev, 1.0), plate="time", init=lambda: Normal(0.0, 1.0))
    with pytest.raises(TMCGraphError, match="'y_prev' names no declared variable 'y'"):
        m.observed("x", lambda z, y_prev: Normal(z, 1.0), plate="time", init=lambda z: Normal(z, 1.0))
    m.observed("x", lambda z, y_prev: Normal(z, 1.0), plate="time")
    with pytest.raises(TMCGraphError, match="unknown parent 'y_prev'"):
        m.validate()


def test_weight_ess_counts_each_element_index_once():
    """ESS over all particle combinations = (sum w)^2 / sum w^2 by enumerating the unrolled graph."""
    from tmcgraph.ops.oracle import enumerate_log_weights, unroll_markov

    T, K = 3, 3
    x = torch.randn(T, generator=torch.Generator().manual_seed(2), dtype=D)
    m = ssm(T)
    est = tg.TMC(m, ssm_proposal(m, "mixture"), K=K, dtype=D)
    post = tg.posterior(est, {"x": x}, seed=0)
    ess = tg.weight_ess(post, "all")
    variables, _, logw = enumerate_log_weights(*unroll_markov(factor_graph(m, post.samples)))
    # the free first index is summed, not a particle: marginalise it before weighing
    free = [i for i, (d, _) in enumerate(variables) if d.endswith("=-1")]
    assert len(free) == 1
    w = torch.logsumexp(logw.reshape([K] * len(variables)), free[0]).flatten()
    want = float(2 * torch.logsumexp(w, 0) - torch.logsumexp(2 * w, 0))
    assert abs(float(ess.log_ess) - want) < 1e-9
    assert abs(float(ess.log_combinations) - T * math.log(K)) < 1e-12


def test_hmm_predictive_of_held_out_steps_equals_the_forward_algorithm_ratio():
    """log p(x_h | x_r) = log p(x_r, x_h) - log p(x_r), each by the forward algorithm (masked emissions)."""
    from tmcgraph.infer.posterior import predictive_log_likelihood

    T = 8
    A, pi0, mu = hmm_params(3, 4)
    x = torch.randn(T, generator=torch.Generator().manual_seed(5), dtype=D)
    mask = torch.zeros(T, dtype=torch.bool)
    mask[[2, 5, 6]] = True
    m, q = hmm(A, pi0, mu, T)
    got = predictive_log_likelihood(tg.TMC(m, q, K=3, dtype=D), {"x": x}, {"x": mask}, seed=0)

    def forward(keep):
        e = Normal(mu[:, None], 1.0).log_prob(x[None, :]) * keep.to(D)[None, :]
        a = torch.log(pi0) + e[:, 0]
        for t in range(1, T):
            a = torch.logsumexp(a[:, None] + torch.log(A), 0) + e[:, t]
        return torch.logsumexp(a, 0)

    want = forward(torch.ones(T, dtype=torch.bool)) - forward(~mask)
    assert torch.allclose(got, want, rtol=1e-10)


@pytest.mark.parametrize("kind", ["mixture"])  # one compile (~35 s); the eager path covers every coupling
def test_compiled_program_equals_brute_force_on_the_same_particles(kind):
    T, K = 3, 3
    x = torch.randn(T, generator=torch.Generator().manual_seed(1), dtype=D)
    m = ssm(T)
    est = tg.TMC(m, ssm_proposal(m, kind), K=K, dtype=D, compile=True)
    for seed in range(3):  # the first call is eager; later calls run the compiled program
        ev = est.run({"x": x}, seed=seed)
        want = brute_force(factor_graph(m, ev.samples.materialize()))
        assert torch.allclose(ev.log_evidence, want, rtol=1e-10)
    assert est.programs.info()["compiled"] == 1


@pytest.mark.parametrize("kind", ["factorised", "mixture", "permutation", "prior"])
def test_per_element_K_is_unbiased_against_kalman(kind):
    T, R = 6, 3000
    ks = [2, 5, 3, 1, 4, 3]
    x = 1.5 * torch.randn(T, generator=torch.Generator().manual_seed(3), dtype=D)
    m = ssm(T, reps=R)
    q = tg.Proposal(m)
    if kind == "prior":
        q.prior("z", coupling="mixture", K=ks)
    elif kind == "factorised":
        q.latent("z", lambda x: Normal(0.6 * x, 0.8), K=ks)
    else:
        q.latent("z", lambda z_prev, x: Normal(0.5 * z_prev + 0.4 * x, 0.7), init=lambda x: Normal(0.6 * x, 0.8),
                 coupling=kind, K=ks)
    est = tg.TMC(m, q, dtype=D)
    v = est.log_evidence({"x": x.expand(R, T)}, seed=11, elementwise=True)
    assert_unbiased(v, kalman_log_evidence(x))


def test_per_element_K_gives_unweighted_particles_no_posterior_mass():
    T = 4
    ks = [3, 1, 4, 2]
    x = torch.randn(T, generator=torch.Generator().manual_seed(0), dtype=D)
    m = ssm(T)
    q = tg.Proposal(m)
    q.latent("z", lambda z_prev, x: Normal(0.5 * z_prev + 0.4 * x, 0.7), init=lambda x: Normal(0.6 * x, 0.8),
             coupling="mixture", K=ks)
    est = tg.TMC(m, q, dtype=D)
    post = tg.posterior(est, {"x": x}, seed=0)
    marg = post.marginal("z")  # [max K, T]
    assert marg.shape == (4, T)
    for t, k in enumerate(ks):
        assert float(marg[k:, t].sum()) == 0.0 and abs(float(marg[:k, t].sum()) - 1) < 1e-12
    # the estimate equals brute force over the weighted particles only
    s = post.samples
    g = factor_graph(m, s)
    assert torch.allclose(est.log_evidence(samples=s), brute_force(g), rtol=1e-12)
    with pytest.raises(TMCGraphError, match="needs a Markov plate"):
        mm = tg.Model()
        mm.plate("data", size=2)
        mm.latent("a", lambda: Normal(0.0, 1.0), plate="data")
        tg.Proposal(mm).prior("a", K=[1, 2])
    with pytest.raises(TMCGraphError, match="per-element counts"):
        q2 = tg.Proposal(m)
        q2.prior("z", K=[2, 2])
        tg.TMC(m, q2).log_evidence({"x": x})
