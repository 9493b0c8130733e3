"""Couplings of non-factorised proposals: the permutation coupling against independent truths.

The truths: parent indices recovered from the particles themselves (a proposal so narrow
that each child particle sits on the parent particle it was drawn from) and their
distribution against the exact law of blocks of uniform permutations (chi-square); closed
forms of linear-Gaussian evidence (the estimator is unbiased: E[exp(log P_hat - log p(x))]
= 1); hand-written mixture densities and TMC sums (numpy/scipy); exact expectations by
enumerating every particle configuration of a discrete model.

Unbiasedness tests declare an outer plate ``rep`` of R independent copies of the model
(``elementwise="rep"`` gives R independent estimates in one call), as in
``tests/infer/test_gaussian_exact.py``; the library's own toy (no plate) is run over
seeds ``0..R-1``.
"""

import dataclasses
import itertools
import math
from collections import Counter

import numpy as np
import pytest
import torch
from scipy import special, stats
from torch.distributions import Bernoulli, Categorical, Normal
from unbiased import assert_unbiased, z_score

import tmcgraph as tg
from tmcgraph.models import toys
from tmcgraph.sampling.draw import proposal_log_q

F64 = torch.float64
R = 3000  # replicates of every unbiasedness test


def block_law(K_parent: int, K_child: int) -> dict:
    """Exact law of the permutation coupling's index vector of one plate element.

    ``ceil(K_child / K_parent)`` independent uniform permutations of ``range(K_parent)``,
    concatenated and cut to ``K_child``: index tuple -> probability.
    """
    blocks = math.ceil(K_child / K_parent)
    combos = list(itertools.product(itertools.permutations(range(K_parent)), repeat=blocks))
    law = Counter(tuple(i for p in ps for i in p)[:K_child] for ps in combos)
    return {k: v / len(combos) for k, v in law.items()}


# ------------------------------------------------------- 1. the indices are permutations
TIGHT = 1e-9  # scale of Q(b | a): each b particle sits on its parent particle


def tight_model(N: int, K_a: int, K_b: int, coupling="permutation", a_plated=False):
    """a -> b with Q(b | a) = N(a, 1e-9): particle b^k identifies the a particle it was drawn from."""
    m = tg.Model()
    m.plate("data", size=N)
    a_plate = "data" if a_plated else None
    m.latent("a", lambda: Normal(0.0, 1.0), plate=a_plate)
    m.latent("b", lambda a: Normal(a, 1.0), plate="data")
    m.observed("x", lambda b: Normal(b, 1.0), plate="data")
    q = tg.Proposal(m)
    q.latent("a", lambda: Normal(0.0, 1.0), plate=a_plate, K=K_a)
    q.latent("b", lambda a: Normal(a, TIGHT), plate="data", coupling=coupling, K=K_b)
    return tg.TMC(m, q, K=K_a, dtype=F64), {"x": torch.zeros(N, dtype=F64)}


def parent_indices(est, data, seed) -> np.ndarray:
    """``[K_b, N]``: index of the a particle each b particle was drawn from, recovered from the values."""
    s = est.sample(data, seed=seed)
    a, b = s.values["a"], s.values["b"]
    if a.dim() == 1:  # global a: the same K_a particles for every plate element
        a = a[:, None].expand(a.shape[0], b.shape[1])
    gaps = (a[:, None] - a[None, :]).abs() + torch.eye(a.shape[0], dtype=a.dtype)[:, :, None]
    assert gaps.min() > 1e-6, "parent particles too close to tell apart"
    dist = (b[:, None] - a[None, :]).abs()  # [K_b, K_a, N]
    best = dist.min(1)
    assert best.values.max() < 1e-7, "a child particle sits on no parent particle"
    return best.indices.numpy()


@pytest.mark.parametrize("a_plated", [False, True])
def test_equal_K_uses_every_parent_particle_once_per_element(a_plated):
    est, data = tight_model(N=5, K_a=4, K_b=4, a_plated=a_plated)
    distinct_perms = []
    for seed in range(20):
        idx = parent_indices(est, data, seed)
        for e in range(idx.shape[1]):
            assert sorted(idx[:, e]) == [0, 1, 2, 3], f"seed {seed}, element {e}: {idx[:, e]}"
        distinct_perms.append(len({tuple(idx[:, e]) for e in range(idx.shape[1])}))
    # Independent per element: all 5 equal has probability 24^-4 per seed.
    assert min(distinct_perms) >= 2, distinct_perms


def test_child_with_twice_the_particles_uses_each_parent_exactly_twice():
    est, data = tight_model(N=5, K_a=3, K_b=6)
    for seed in range(20):
        idx = parent_indices(est, data, seed)
        for e in range(idx.shape[1]):
            assert sorted(idx[:, e]) == [0, 0, 1, 1, 2, 2], f"seed {seed}, element {e}: {idx[:, e]}"


def test_child_with_fewer_particles_uses_distinct_parents():
    est, data = tight_model(N=5, K_a=5, K_b=3)
    for seed in range(20):
        idx = parent_indices(est, data, seed)
        for e in range(idx.shape[1]):
            assert len(set(idx[:, e])) == 3, f"seed {seed}, element {e}: {idx[:, e]}"


@pytest.mark.parametrize("K_a,K_b", [(3, 3), (3, 2), (3, 6), (2, 5)])
def test_index_vectors_follow_the_law_of_uniform_permutation_blocks(K_a, K_b):
    """Chi-square of the per-element index vectors (3000 elements) against the exact block law."""
    N = 3000
    est, data = tight_model(N=N, K_a=K_a, K_b=K_b)
    idx = parent_indices(est, data, seed=0)
    law = block_law(K_a, K_b)
    seen = Counter(tuple(idx[:, e]) for e in range(N))
    assert set(seen) <= set(law), f"impossible index vectors: {set(seen) - set(law)}"
    keys = sorted(law)
    p = stats.chisquare([seen[k] for k in keys], [N * law[k] for k in keys]).pvalue
    assert p > 1e-4, f"index vectors not distributed as blocks of uniform permutations (p = {p:.2g})"
    # Independent between elements: the pair (element 2i, element 2i+1) has the product law.
    pairs = Counter((tuple(idx[:, 2 * i]), tuple(idx[:, 2 * i + 1])) for i in range(N // 2))
    cells = list(itertools.product(keys, keys))
    expected = [N // 2 * law[u] * law[v] for u, v in cells]
    if min(expected) >= 5:
        p = stats.chisquare([pairs[c] for c in cells], expected).pvalue
        assert p > 1e-4, f"neighbouring elements' permutations are dependent (p = {p:.2g})"


def test_two_parents_get_independent_permutations():
    """Q(b | a, c) = N(a + 1000 c, 1e-9): b^k identifies both of its parents' particles."""
    N, K = 3000, 3
    m = tg.Model()
    m.plate("data", size=N)
    m.latent("a", lambda: Normal(0.0, 1.0))
    m.latent("c", lambda: Normal(0.0, 1.0))
    m.latent("b", lambda a, c: Normal(a + c, 1.0), plate="data")
    m.observed("x", lambda b: Normal(b, 1.0), plate="data")
    q = tg.Proposal(m)
    q.latent("a", lambda: Normal(0.0, 1.0))
    q.latent("c", lambda: Normal(0.0, 1.0))
    q.latent("b", lambda a, c: Normal(a + 1000.0 * c, TIGHT), plate="data", coupling="permutation")
    s = tg.TMC(m, q, K=K, dtype=F64).sample({"x": torch.zeros(N, dtype=F64)}, seed=0)
    grid = (s.values["a"][:, None] + 1000.0 * s.values["c"][None, :]).reshape(-1)  # candidate (j, l) -> j*K + l
    gaps = (grid[:, None] - grid[None, :]).abs() + torch.eye(K * K, dtype=F64)
    assert gaps.min() > 1e-6
    best = (s.values["b"][:, None, :] - grid[None, :, None]).abs().min(1)  # [K, N]
    assert best.values.max() < 1e-6
    ja, jc = (best.indices // K).numpy(), (best.indices % K).numpy()
    for e in range(N):
        assert sorted(ja[:, e]) == [0, 1, 2] and sorted(jc[:, e]) == [0, 1, 2], (ja[:, e], jc[:, e])
    # the permutations of the two parents are independent: product law over 6 x 6 cells
    perms = sorted(block_law(K, K))
    pairs = Counter((tuple(ja[:, e]), tuple(jc[:, e])) for e in range(N))
    cells = list(itertools.product(perms, perms))
    p = stats.chisquare([pairs[c] for c in cells], [N / len(cells)] * len(cells)).pvalue
    assert p > 1e-4, f"the two parents' permutations are dependent (p = {p:.2g})"


def test_mixture_indices_are_not_permutations():
    """Power of the recovery: under the mixture coupling only 3!/3^3 = 2/9 of index vectors are permutations."""
    est, data = tight_model(N=3000, K_a=3, K_b=3, coupling="mixture")
    idx = parent_indices(est, data, seed=0)
    frac = np.mean([sorted(idx[:, e]) == [0, 1, 2] for e in range(idx.shape[1])])
    assert abs(frac - 2 / 9) < 0.05, frac


# ------------------------------------------------------- 2. unbiasedness by closed forms
CHAIN_SD = (0.4, 0.9, 2.0)  # z1 ~ N(0, s1), z_i | z_{i-1} ~ N(z_{i-1}, s_i)
CHAIN_OBS_SD = 1.0
CHAIN_X = 1.5


def chain_exact(sd=CHAIN_SD) -> float:
    """x ~ N(0, s1^2 + s2^2 + s3^2 + s_obs^2)."""
    var = sum(s * s for s in sd) + CHAIN_OBS_SD**2
    return float(stats.norm(0.0, math.sqrt(var)).logpdf(CHAIN_X))


def chain_model(coupling, Ks=(3, 3, 3), reps=R, sd=CHAIN_SD):
    """The 3-latent chain z1 -> z2 -> z3 -> x, every latent proposed by its prior."""
    s1, s2, s3 = sd
    m = tg.Model()
    m.plate("rep", size=reps)
    m.latent("z1", lambda: Normal(0.0, s1), plate="rep")
    m.latent("z2", lambda z1: Normal(z1, s2), plate="rep")
    m.latent("z3", lambda z2: Normal(z2, s3), plate="rep")
    m.observed("x", lambda z3: Normal(z3, CHAIN_OBS_SD), plate="rep")
    q = tg.Proposal(m)
    for name, K in zip(("z1", "z2", "z3"), Ks):
        q.prior(name, coupling=coupling, K=K)
    return m, q


def chain_data(reps=R):
    return {"x": torch.full((reps,), CHAIN_X, dtype=F64)}


@pytest.mark.parametrize(
    "coupling,Ks",
    [("permutation", (3, 3, 3)), ("permutation", (3, 2, 4)), ("mixture", (3, 3, 3)), ("mixture", (3, 2, 4)),
     ("paired", (3, 3, 3)), (tg.Permutation(), (2, 3, 3))],
    ids=["permutation", "permutation-unequal-K", "mixture", "mixture-unequal-K", "paired", "Permutation-object"],
)
def test_three_latent_chain_unbiased(coupling, Ks):
    m, q = chain_model(coupling, Ks)
    est = tg.TMC(m, q, K=3, dtype=F64).log_evidence(chain_data(), seed=11, elementwise="rep")
    assert est.shape == (R,) and est.dtype == F64
    assert_unbiased(est, chain_exact())


@pytest.mark.slow  # 3 x 3000 calls: about 4 s each on one free core
@pytest.mark.parametrize("coupling", ["permutation", "mixture", "paired"])
def test_library_gaussian_chain_unbiased_over_seeds(coupling):
    m, q = toys.gaussian_chain(n=4, proposal="prior", coupling=coupling)
    est = tg.TMC(m, q, K=3, dtype=F64)
    x = 1.0
    exact = float(stats.norm(0.0, math.sqrt(2.0)).logpdf(x))  # sum of 4 steps of variance 1/4, plus 1
    assert float(toys.gaussian_chain_log_evidence(x)) == pytest.approx(exact, abs=1e-12)
    data = {"x": torch.tensor(x, dtype=F64)}
    with torch.no_grad():
        log_est = torch.stack([est.log_evidence(data, seed=s) for s in range(R)])
    # Paired: inconsistent index paths weigh P(z_i | z_{i-1}^j) / Q(z_i | z_{i-1}^k), a heavier tail.
    assert_unbiased(log_est, exact, max_se=0.2 if coupling == "paired" else 0.1)


NESTED_X = [0.5, 1.4, -0.3]
TH_SD, Z_SD, X_SD = 1.0, 0.8, 0.6


def nested_exact() -> float:
    """x ~ N(0, th^2 1 1^T + (z^2 + x^2) I): theta shared by the elements."""
    n = len(NESTED_X)
    cov = TH_SD**2 * np.ones((n, n)) + (Z_SD**2 + X_SD**2) * np.eye(n)
    return float(stats.multivariate_normal(np.zeros(n), cov).logpdf(NESTED_X))


@pytest.mark.parametrize(
    "coupling,K_theta,K_z",
    [("permutation", 3, 3), ("permutation", 2, 3), ("permutation", 4, 2), ("mixture", 3, 3), ("paired", 3, 3)],
)
def test_plated_model_with_shared_global_latent_unbiased(coupling, K_theta, K_z):
    m = tg.Model()
    m.plate("rep", size=R)
    m.plate("data", size=len(NESTED_X))
    m.latent("theta", lambda: Normal(0.0, TH_SD), plate="rep")
    m.latent("z", lambda theta: Normal(theta, Z_SD), plate=("rep", "data"))
    m.observed("x", lambda z: Normal(z, X_SD), plate=("rep", "data"))
    q = tg.Proposal(m)
    q.latent("theta", lambda: Normal(0.0, 1.2), plate="rep", K=K_theta)
    q.latent("z", lambda theta, x: Normal(0.3 * theta + 0.6 * x, 0.7), plate=("rep", "data"),
             coupling=coupling, K=K_z)
    data = {"x": torch.tensor(NESTED_X, dtype=F64).expand(R, len(NESTED_X))}
    est = tg.TMC(m, q, K=3, dtype=F64).log_evidence(data, seed=12, elementwise="rep")
    assert_unbiased(est, nested_exact())


# ------------------------------------------------------- 3. the density is the mixture density
SMALL_X = [0.4, -1.0, 1.7, 0.2]


@pytest.mark.parametrize("K_b", [3, 5, 2])
@pytest.mark.parametrize("coupling", ["permutation", "mixture"])
def test_log_q_and_estimate_match_hand_computation(coupling, K_b):
    m = tg.Model()
    m.plate("data", size=len(SMALL_X))
    m.latent("a", lambda: Normal(0.0, 1.0))
    m.latent("b", lambda a: Normal(a, 0.8), plate="data")
    m.observed("x", lambda b: Normal(b, 0.6), plate="data")
    q = tg.Proposal(m)
    # float64 constants: Normal(0.2, 1.1) would build float32 tensors, rounded before any dtype= cast
    loc, scale = torch.tensor(0.2, dtype=F64), torch.tensor(1.1, dtype=F64)
    q.latent("a", lambda: Normal(loc, scale))
    q.latent("b", lambda a, x: Normal(0.5 * a + 0.3 * x, 0.7), plate="data", coupling=coupling, K=K_b)
    est = tg.TMC(m, q, K=3, dtype=F64)
    x = np.array(SMALL_X)
    for seed in range(3):
        ev = est.run({"x": torch.tensor(SMALL_X, dtype=F64)}, seed=seed)
        a = ev.samples.values["a"].numpy()  # [3]
        b = ev.samples.values["b"].numpy()  # [K_b, N]
        # log q_b[k, e] = log (1/K_a) sum_j N(b[k, e]; 0.5 a_j + 0.3 x_e, 0.7)
        comp = stats.norm.logpdf(b[:, None, :], 0.5 * a[None, :, None] + 0.3 * x, 0.7)  # [K_b, K_a, N]
        lq_b = special.logsumexp(comp, axis=1) - math.log(len(a))
        lq_a = stats.norm.logpdf(a, 0.2, 1.1)
        np.testing.assert_allclose(ev.samples.log_q["b"].numpy(), lq_b, rtol=0, atol=1e-10)
        np.testing.assert_allclose(ev.samples.log_q["a"].numpy(), lq_a, rtol=0, atol=1e-10)
        # P_hat = 1/K_a sum_j [p(a_j)/q(a_j)] prod_e 1/K_b sum_k p(b_ek | a_j) p(x_e | b_ek) / q_b(b_ek)
        inner = (stats.norm.logpdf(b[:, None, :], a[None, :, None], 0.8) + stats.norm.logpdf(x, b, 0.6)[:, None]
                 - lq_b[:, None])  # [K_b, K_a, N]
        per_j = (stats.norm.logpdf(a, 0.0, 1.0) - lq_a
                 + (special.logsumexp(inner, axis=0) - math.log(K_b)).sum(-1))  # [K_a]
        hand = special.logsumexp(per_j) - math.log(len(a))
        assert ev.log_evidence.dtype == F64
        assert float(ev.log_evidence) == pytest.approx(hand, abs=1e-10)
        assert float(tg.brute_force(ev.graph)) == pytest.approx(float(ev.log_evidence), abs=1e-10)


# ------------------------------------------------------- 4. which denominators are unbiased
# A discrete a -> b -> x (a in {0, 1}, b in {0, 1, 2}, x binary): every configuration of
# particles and parent indices is enumerated, so E[P_hat] is computed exactly.
PA, QA = [0.3, 0.7], [0.6, 0.4]
PB = [[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]]
QB = [[0.5, 0.3, 0.2], [0.2, 0.2, 0.6]]
PX = [0.9, 0.5, 0.1]  # P(x = 1 | b)


def discrete_truth() -> float:
    return sum(PA[a] * PB[a][b] * PX[b] for a in range(2) for b in range(3))


def discrete_configs(K_a, K_b):
    """Every ``(a particles, parent indices, b particles, probability)`` of the permutation coupling."""
    out = []
    for A in itertools.product(range(2), repeat=K_a):
        pA = np.prod([QA[v] for v in A])
        for idx, p_idx in block_law(K_a, K_b).items():
            for B in itertools.product(range(3), repeat=K_b):
                pB = np.prod([QB[A[idx[k]]][B[k]] for k in range(K_b)])
                out.append((A, idx, B, pA * p_idx * pB))
    return out


@pytest.mark.parametrize("K_a,K_b", [(2, 2), (2, 3), (3, 2)])
def test_exact_expectation_over_every_configuration(K_a, K_b):
    """E[P_hat] = p(x) exactly with the coupling's mixture density (and with the density given the
    drawn indices, Q(b^k | a^{sigma(k)})); the density of another parent, Q(b^k | a^k), is biased."""
    configs = discrete_configs(K_a, K_b)
    C = len(configs)
    m = tg.Model()
    m.plate("rep", size=C)
    pa, pb, px = torch.tensor(PA, dtype=F64), torch.tensor(PB, dtype=F64), torch.tensor(PX, dtype=F64)
    qa, qb = torch.tensor(QA, dtype=F64), torch.tensor(QB, dtype=F64)
    m.latent("a", lambda: Categorical(pa), plate="rep")
    m.latent("b", lambda a: Categorical(pb[a]), plate="rep")
    m.observed("x", lambda b: Bernoulli(px[b]), plate="rep")
    q = tg.Proposal(m)
    q.latent("a", lambda: Categorical(qa), plate="rep", K=K_a)
    q.latent("b", lambda a: Categorical(qb[a]), plate="rep", coupling="permutation", K=K_b)
    est = tg.TMC(m, q, K=K_a, dtype=F64)
    data = {"x": torch.ones(C, dtype=F64)}
    template = est.sample(data, seed=0)
    A = torch.tensor([c[0] for c in configs]).T  # [K_a, C]
    idx = torch.tensor([c[1] for c in configs]).T  # [K_b, C]
    B = torch.tensor([c[2] for c in configs]).T  # [K_b, C]
    prob = torch.tensor([c[3] for c in configs], dtype=F64)
    assert float(prob.sum()) == pytest.approx(1.0, abs=1e-12)
    log_qa = qa.log()[A]
    s = dataclasses.replace(template, values={"a": A, "b": B}, log_q={"a": log_qa, "b": template.log_q["b"]})
    lq_mix = proposal_log_q(q, s, "b", ctx=est.context())  # the library's density at these particles
    # by hand: log (1/K_a) sum_j QB[A_j][B_k] for every configuration
    hand = torch.stack([torch.log(qb[A[:, c]][:, B[:, c]]).logsumexp(0) for c in range(C)], 1) - math.log(K_a)
    torch.testing.assert_close(lq_mix, hand, rtol=0, atol=1e-12)

    def expectation(log_q_b):
        ss = dataclasses.replace(s, log_q={"a": log_qa, "b": log_q_b})
        est_c = est.run(samples=ss, elementwise="rep").log_evidence  # [C]
        return float((prob * est_c.exp()).sum()) / discrete_truth()

    assert expectation(lq_mix) == pytest.approx(1.0, abs=1e-10)
    given_sigma = qb[A.gather(0, idx), B].log()  # Q(b^k | a^{sigma(k)})
    assert expectation(given_sigma) == pytest.approx(1.0, abs=1e-10)
    if K_a == K_b:
        other_parent = qb[A, B].log()  # Q(b^k | a^k): the paired coupling's formula, ignoring sigma
        assert abs(expectation(other_parent) - 1.0) > 0.01


POWER_R = 20000


def power_model(coupling="permutation"):
    """a -> b -> x with Q(b | a) = N(0.3 a, 0.8): finite-variance weights, so z-tests are valid."""
    m = tg.Model()
    m.plate("rep", size=POWER_R)
    m.latent("a", lambda: Normal(0.0, 1.0), plate="rep")
    m.latent("b", lambda a: Normal(a, 0.5), plate="rep")
    m.observed("x", lambda b: Normal(b, 0.5), plate="rep")
    q = tg.Proposal(m)
    q.latent("a", lambda: Normal(0.0, 1.0), plate="rep")
    q.latent("b", lambda a: Normal(0.3 * a, 0.8), plate="rep", coupling=coupling)
    return tg.TMC(m, q, K=3, dtype=F64), {"x": torch.ones(POWER_R, dtype=F64)}


POWER_EXACT = float(stats.norm(0.0, math.sqrt(1.0 + 0.25 + 0.25)).logpdf(1.0))


def test_density_of_another_parent_is_detectably_biased():
    """Power check: Q(b^k | a^k) (paired formula) in the denominator of permutation-drawn particles."""
    est, data = power_model()
    ev = est.run(data, seed=13, elementwise="rep")
    assert_unbiased(ev.log_evidence, POWER_EXACT, max_se=0.02)
    s = ev.samples
    wrong = Normal(0.3 * s.values["a"], 0.8).log_prob(s.values["b"])
    biased = est.run(samples=dataclasses.replace(s, log_q={**s.log_q, "b": wrong}), elementwise="rep")
    z, se = z_score(biased.log_evidence, POWER_EXACT)
    assert abs(z) > 5, f"Q(b^k | a^k) should be detectably biased, z = {z:.2f} (se {se:.3g})"


def test_density_given_the_drawn_permutation_is_unbiased_too():
    """Q(b^k | a^{sigma(k)}), the density given the drawn indices, is also unbiased (exactly, see the
    enumeration above; here statistically on the library's own draws, with sigma recorded)."""
    recorded = []

    class Recording(tg.Permutation):
        def indices(self, site, K_parent, device):
            idx = super().indices(site, K_parent, device)
            recorded.append(idx)
            return idx

    est, data = power_model(Recording())
    ev = est.run(data, seed=14, elementwise="rep")
    (sigma,) = recorded
    s = ev.samples
    given_sigma = Normal(0.3 * s.values["a"].gather(0, sigma), 0.8).log_prob(s.values["b"])
    alt = est.run(samples=dataclasses.replace(s, log_q={**s.log_q, "b": given_sigma}), elementwise="rep")
    assert_unbiased(ev.log_evidence, POWER_EXACT, max_se=0.02)
    assert_unbiased(alt.log_evidence, POWER_EXACT, max_se=0.02)


# ------------------------------------------------------- 5. tightness
@pytest.mark.parametrize("sd", [CHAIN_SD, (1.0, 1.0, 1.0)], ids=["widening-steps", "unit-steps"])
def test_permutation_bound_at_least_as_tight_as_mixture(sd):
    """Mean of log P_hat over 2000 replicates (K = 3): permutation >= mixture - 3 se; both <= log p(x) + 3 se."""
    reps = 2000
    exact = chain_exact(sd)
    stats_ = {}
    for seed, coupling in enumerate(["permutation", "mixture"]):
        m, q = chain_model(coupling, (3, 3, 3), reps, sd)
        le = tg.TMC(m, q, K=3, dtype=F64).log_evidence(chain_data(reps), seed=20 + seed, elementwise="rep")
        stats_[coupling] = (float(le.mean()), float(le.std()) / math.sqrt(reps))
    (mp, sp), (mm, sm) = stats_["permutation"], stats_["mixture"]
    assert mp >= mm - 3 * math.hypot(sp, sm), stats_
    for mean, se in stats_.values():  # Jensen: E[log P_hat] <= log p(x)
        assert mean < exact + 3 * se, (stats_, exact)


# ------------------------------------------------------- 6. errors
def _ab(coupling, K_b=None):
    m = tg.Model()
    m.latent("a", lambda: Normal(0.0, 1.0))
    m.latent("b", lambda a: Normal(a, 1.0))
    m.observed("x", lambda b: Normal(b, 1.0))
    q = tg.Proposal(m)
    q.latent("a", lambda: Normal(0.0, 1.0))
    q.latent("b", lambda a: Normal(a, 1.0), coupling=coupling, K=K_b)
    return m, q


def test_unknown_coupling_name_raises_when_the_estimator_is_built():
    m, q = _ab("permutations")
    with pytest.raises(tg.TMCGraphError, match=r"proposal for 'b': unknown coupling 'permutations'"):
        tg.TMC(m, q, K=3)


def test_paired_coupling_with_unequal_K_raises_at_sampling_naming_the_edge():
    m, q = _ab("paired", K_b=5)
    est = tg.TMC(m, q, K=3)  # building is fine: K is only known per latent when sampling
    with pytest.raises(tg.TMCGraphError, match=r"edge 'a' -> 'b' needs equal K.*K\[a\]=3, K\[b\]=5"):
        est.log_evidence({"x": torch.tensor(0.0)}, seed=0)
    m, q = _ab(tg.Paired(), K_b=2)
    with pytest.raises(tg.TMCGraphError, match=r"edge 'a' -> 'b'"):
        tg.TMC(m, q, K=3).sample({"x": torch.tensor(0.0)}, seed=0)
