"""Posterior queries (tmcgraph.queries) against independent truths.

* Marginals and samples: brute-force enumeration of every index combination of the
  *same* particles (plates unrolled), written here without the planner.
* Linear-Gaussian toy: closed-form Gaussian conditioning (numpy), with a stated RMSE
  tolerance per K.
* Discrete HMM with enumerated states: forward-backward written here.
* Predictive log-likelihood: exact p(x_all) / p(x_rest) of the Gaussian toy, and the
  brute-force ratio on the same particles.
"""

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import stats
from torch.distributions import Categorical, Independent, Normal

import tmcgraph as tg
from tmcgraph.infer.posterior import expectation, posterior, predictive_log_likelihood
from tmcgraph.models.toys import gaussian_toy
from tmcgraph.ops import DRAWS, Factor, dim_marginals, sample_indices
from tmcgraph.ops.oracle import enumerate_log_weights

# ----------------------------------------------------------------------------------------
# Brute-force oracle over the same particles.


def enumerate_posterior(factors, levels):
    """All index combinations and their normalised weights, plates unrolled.

    Returns ``(variables, combos, probs)``: ``variables`` is a list of (dim, element
    dict) index variables, ``combos`` a LongTensor [n, len(variables)], ``probs`` [n].
    """
    f64 = [Factor(f.name, f.tensor.detach().to(torch.float64), f.sample_dims, f.plates) for f in factors]
    variables, combos, logw = enumerate_log_weights(f64, levels)
    return variables, combos, torch.softmax(logw, 0)


def brute_marginals(factors, levels):
    """dim -> [K, *level sizes] marginal probabilities by enumeration."""
    variables, combos, probs = enumerate_posterior(factors, levels)
    sizes = {}
    for f in factors:
        sizes.update(zip(tuple(f.sample_dims) + tuple(f.plates), f.tensor.shape))
    out = {}
    for col, (d, elem) in enumerate(variables):
        m = out.setdefault(d, torch.zeros([sizes[d]] + [sizes[p] for p in levels[d]], dtype=torch.float64))
        for k in range(sizes[d]):
            m[(k,) + tuple(elem[p] for p in levels[d])] = probs[combos[:, col] == k].sum()
    return out


# ----------------------------------------------------------------------------------------
# Tiny models.


def _toy(K=3, N=2, method="tmc"):
    m, q = gaussian_toy()
    cls = {"tmc": tg.TMC, "iwae": tg.IWAE}[method]
    return cls(m, q, K=K), {"x": torch.tensor([1.3, -0.4, 0.8][:N])}


def _nonfactorised(K=3):
    """Global a, plated b | a (mixture), plated c | b (paired), observed x | b, c."""
    m = tg.Model()
    m.plate("data", size=2)
    m.latent("a", lambda: Normal(0.0, 1.0))
    m.latent("b", lambda a: Normal(a, 1.0), plate="data")
    m.latent("c", lambda b: Normal(0.5 * b, 1.0), plate="data")
    m.observed("x", lambda b, c: Normal(b + c, 1.0), plate="data")
    q = tg.Proposal(m)
    q.latent("a", lambda: Normal(0.3, 1.5))
    q.latent("b", lambda a: Normal(a, 1.2), plate="data", coupling="mixture")
    q.latent("c", lambda b, x: Normal(0.3 * b + 0.2 * x, 1.2), plate="data", coupling="paired")
    return tg.TMC(m, q, K=K), {"x": torch.tensor([0.7, -1.1])}


def _nested(K=2):
    """Nested plates: global mu, group means g[groups], observations in groups x obs."""
    m = tg.Model()
    m.plate("groups", size=2)
    m.plate("obs", size=2)
    m.latent("mu", lambda: Normal(0.0, 1.0))
    m.latent("g", lambda mu: Normal(mu, 1.0), plate="groups")
    m.latent("h", lambda g: Normal(g, 1.0), plate=("groups", "obs"))
    m.observed("x", lambda h: Normal(h, 1.0), plate=("groups", "obs"))
    q = tg.Proposal(m)
    q.latent("mu", lambda: Normal(0.0, 1.5))
    q.prior("g")
    q.latent("h", lambda x: Normal(0.5 * x, 1.2), plate=("groups", "obs"))
    return tg.TMC(m, q, K=K), {"x": torch.tensor([[0.5, 1.0], [-0.3, 0.2]])}


def _with_enumerated(K=3):
    """Sampled global theta, enumerated discrete c per element, observed x | theta, c."""
    m = tg.Model()
    m.plate("data", size=2)
    m.latent("theta", lambda: Normal(0.0, 1.0))
    m.latent("c", lambda theta: Categorical(logits=torch.stack([theta, -theta], -1)), plate="data")
    m.observed("x", lambda theta, c: Normal(theta * (2.0 * c - 1.0), 1.0), plate="data")
    q = tg.Proposal(m)
    q.latent("theta", lambda: Normal(0.0, 1.5))
    q.enumerate("c")
    return tg.TMC(m, q, K=K), {"x": torch.tensor([0.9, -0.2])}


def _vector(K=3):
    """A 2-vector global latent and a plated 2-vector latent (event dims carried along)."""
    m = tg.Model()
    m.plate("data", size=2)
    m.latent("w", lambda: Independent(Normal(torch.zeros(2), 1.0), 1))
    m.latent("v", lambda w: Independent(Normal(w, 1.0), 1), plate="data")
    m.observed("x", lambda v: Normal(v.sum(-1), 1.0), plate="data")
    q = tg.Proposal(m)
    q.latent("w", lambda: Independent(Normal(torch.zeros(2), 1.3), 1))
    q.latent("v", lambda w: Independent(Normal(w, 1.2), 1), plate="data")
    return tg.TMC(m, q, K=K), {"x": torch.tensor([0.4, 1.9])}


TINY = {
    "toy_tmc": lambda: _toy(),
    "toy_iwae": lambda: _toy(K=5, method="iwae"),
    "nonfactorised": _nonfactorised,
    "nested": _nested,
    "enumerated": _with_enumerated,
    "vector": _vector,
}


@pytest.mark.parametrize("name", list(TINY))
def test_marginals_equal_brute_force(f64, name):
    est, data = TINY[name]()
    post = posterior(est, data, seed=1)
    truth = brute_marginals(post.graph.factors, post.samples.ordinals)
    assert set(truth) == set(post.dim_marginals)
    for d, m in truth.items():
        torch.testing.assert_close(post.dim_marginals[d], m, rtol=1e-9, atol=1e-12)
    # Per latent: [K, *plates], sums to one over K.
    for name in post.samples.values:
        mk = post.marginal(name)
        assert mk.shape == post.samples.log_q[name].shape
        torch.testing.assert_close(mk.sum(0), torch.ones_like(mk.sum(0)))


@pytest.mark.parametrize("name", list(TINY))
def test_moments_equal_brute_force(f64, name):
    est, data = TINY[name]()
    post = posterior(est, data, seed=2)
    s = post.samples
    variables, combos, probs = enumerate_posterior(post.graph.factors, s.ordinals)
    for lat, v in s.values.items():
        d = s.dims[lat]
        plates = s.plates[lat]
        vals = v.to(torch.float64)
        mean = torch.zeros(vals.shape[1:], dtype=torch.float64)
        second = torch.zeros_like(mean)
        for e in itertools.product(*[range(s.plate_sizes[p]) for p in plates]):
            elem = dict(zip(plates, e))
            want = {p: elem[p] for p in s.ordinals[d]}
            col = next(i for i, (dd, ee) in enumerate(variables) if dd == d and ee == want)
            z = vals[(combos[:, col],) + tuple(e)]
            p = probs.reshape(-1, *([1] * (z.dim() - 1)))
            mean[e] = (p * z).sum(0)
            second[e] = (p * z**2).sum(0)
        torch.testing.assert_close(post.mean(lat), mean)
        torch.testing.assert_close(post.var(lat), second - mean**2, rtol=1e-7, atol=1e-10)
        torch.testing.assert_close(post.moment(lat, lambda z: torch.cos(z)),
                                   expectation(vals, post.marginal(lat), torch.cos))


def tv_bound(n, S, delta=1e-4):
    """Total variation a correct sampler exceeds with probability < ``delta``.

    E[TV] <= 0.5 sum_i sqrt(p_i / S) <= 0.5 sqrt(n / S) (n cells, Cauchy-Schwarz), and
    TV changes by at most 1/S per draw, so P(TV > E[TV] + t) <= exp(-2 S t^2) (McDiarmid).
    """
    return 0.5 * math.sqrt(n / S) + math.sqrt(math.log(1 / delta) / (2 * S))


def _chi_square_and_tv(observed_codes, probs):
    n = len(probs)
    counts = np.bincount(observed_codes, minlength=n).astype(float)
    p = probs.numpy()
    S = counts.sum()
    assert counts[p == 0].sum() == 0, "a combination of zero posterior weight was drawn"
    tv = 0.5 * np.abs(counts / S - p).sum()
    exp = S * p
    big = exp >= 5
    obs_c = np.append(counts[big], counts[~big].sum())
    exp_c = np.append(exp[big], exp[~big].sum())
    if exp_c[-1] == 0:
        obs_c, exp_c = obs_c[:-1], exp_c[:-1]
    return stats.chisquare(obs_c, exp_c).pvalue, tv


@pytest.mark.parametrize("name", list(TINY))
def test_samples_match_brute_force_joint(f64, name):
    est, data = TINY[name]()
    post = posterior(est, data, seed=3)
    s = post.samples
    variables, combos, probs = enumerate_posterior(post.graph.factors, s.ordinals)
    S = 20000
    draws = post.sample(S, seed=0, batch_size=7000)
    # Encode each draw's indices as the row of `combos` it equals.
    cols = []
    for d, elem in variables:
        cols.append(draws.indices[d][(slice(None),) + tuple(elem[p] for p in s.ordinals[d])])
    cols = torch.stack(cols, 1)
    radix = torch.tensor([s.sizes[d] for d, _ in variables])
    weights = torch.flip(torch.cumprod(torch.flip(torch.cat([radix[1:], torch.ones(1, dtype=torch.long)]), [0]),
                                       0), [0])
    codes = (cols * weights).sum(1)
    assert torch.equal((combos * weights).sum(1), torch.arange(combos.shape[0]))
    pval, tv = _chi_square_and_tv(codes.numpy(), probs)
    # Deterministic seeds; for a correct sampler the p-value is ~U(0, 1).
    assert pval > 1e-3, (pval, tv)
    assert tv < tv_bound(len(probs), S), tv
    # Values are the particles at the drawn indices, plate dims intact.
    for lat, v in s.values.items():
        got = draws[lat]
        assert got.shape == (S, *v.shape[1:])
        d = s.dims[lat]
        for e in itertools.product(*[range(s.plate_sizes[p]) for p in s.plates[lat]]):
            elem = dict(zip(s.plates[lat], e))
            k = draws.indices[d][(slice(None),) + tuple(elem[p] for p in s.ordinals[d])]
            torch.testing.assert_close(got[(slice(None),) + e], v[(k,) + e])


def test_sample_seed_reproducible_and_global_rng_untouched(f64):
    est, data = _toy()
    post = posterior(est, data, seed=0)
    state = torch.random.get_rng_state()
    a = post.sample(50, seed=11)
    assert torch.equal(torch.random.get_rng_state(), state)
    b = post.sample(50, seed=11)
    for d in a.indices:
        assert torch.equal(a.indices[d], b.indices[d])
    c = post.sample(50, seed=11, batch_size=13)
    assert {d: t.shape for d, t in c.indices.items()} == {d: t.shape for d, t in a.indices.items()}


# ----------------------------------------------------------------------------------------
# Property: marginals of random log-factors on random plated structures equal enumeration.

STRUCTURES = [
    # (factors as (dims, plates), levels)
    ([(("a",), ()), (("b", "a"), ("p",)), (("b",), ("p",))], {"a": (), "b": ("p",)}),
    ([(("a",), ()), (("b", "a"), ()), (("c", "b", "a"), ()), (("c",), ())], {"a": (), "b": (), "c": ()}),
    ([(("a",), ()), (("b", "a"), ("p",)), (("c", "b"), ("p", "r")), (("c",), ("p", "r"))],
     {"a": (), "b": ("p",), "c": ("p", "r")}),
    ([(("a", "b"), ()), (("b", "c"), ()), (("c", "a"), ())], {"a": (), "b": (), "c": ()}),  # loopy
]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    which=st.integers(0, len(STRUCTURES) - 1),
    K=st.integers(1, 3),
    P=st.integers(1, 2),
    spread=st.floats(0.1, 30.0),
    seed=st.integers(0, 10_000),
)
def test_marginals_random_factors(f64, which, K, P, spread, seed):
    spec, levels = STRUCTURES[which]
    g = torch.Generator().manual_seed(seed)
    factors = []
    for i, (dims, plates) in enumerate(spec):
        shape = [K] * len(dims) + [P] * len(plates)
        factors.append(tg.Factor(f"f{i}", spread * torch.randn(shape, generator=g), dims, plates))
    log_z, marg = dim_marginals(tg.FactorGraph(factors, levels))
    truth = brute_marginals(factors, levels)
    for d in truth:
        torch.testing.assert_close(marg[d], truth[d], rtol=1e-7, atol=1e-10)
    torch.testing.assert_close(log_z, tg.brute_force(tg.FactorGraph(factors, levels)))


# ----------------------------------------------------------------------------------------
# Linear-Gaussian toy: convergence to the exact posterior.


def gaussian_toy_posterior(x):
    """Exact posterior mean and variance of (theta, z_1..z_N) given x (numpy)."""
    x = np.asarray(x, dtype=float)
    N = len(x)
    # theta = e0; z_i = theta + e_i; x_i = z_i + e'_i with iid standard normals e.
    L = np.zeros((1 + 2 * N, 1 + 2 * N))
    L[0, 0] = 1.0
    for i in range(N):
        L[1 + i, [0, 1 + i]] = 1.0
        L[1 + N + i, [0, 1 + i, 1 + N + i]] = 1.0
    C = L @ L.T
    h, o = list(range(1 + N)), list(range(1 + N, 1 + 2 * N))
    A = C[np.ix_(h, o)] @ np.linalg.inv(C[np.ix_(o, o)])
    return A @ x, np.diag(C[np.ix_(h, h)] - A @ C[np.ix_(o, h)])


#: RMSE over replicates of posterior means and variances (each of theta, z_1..z_3)
#: must be below TOL_MEAN / sqrt(K) and TOL_VAR / sqrt(K). The posterior sds are
#: 0.63-0.77; the observed RMSE is about 0.8 / sqrt(K) (means) and 0.6 / sqrt(K)
#: (variances) for K >= 30, larger at K = 16 where the O(1/K) self-normalisation bias
#: still shows.
TOL_MEAN = 2.5
TOL_VAR = 2.5
KS = (16, 128, 1024)


def test_linear_gaussian_posterior_converges(f64):
    x = [1.3, -0.4, 2.1]
    mu, var = gaussian_toy_posterior(x)
    m, q = gaussian_toy()
    data = {"x": torch.tensor(x)}
    rmse = {}
    for K in KS:
        em, ev = [], []
        for rep in range(12):
            post = posterior(tg.TMC(m, q, K=K), data, seed=100 * K + rep)
            means = torch.cat([post.mean("theta")[None], post.mean("z")]).numpy()
            vars_ = torch.cat([post.var("theta")[None], post.var("z")]).numpy()
            torch.testing.assert_close(post.std("z") ** 2, post.var("z"))
            em.append(means - mu)
            ev.append(vars_ - var)
        rm = np.sqrt((np.array(em) ** 2).mean(0))
        rv = np.sqrt((np.array(ev) ** 2).mean(0))
        rmse[K] = (rm.max(), rv.max())
        assert rm.max() < TOL_MEAN / math.sqrt(K), (K, rm)
        assert rv.max() < TOL_VAR / math.sqrt(K), (K, rv)
    assert rmse[KS[-1]][0] < rmse[KS[0]][0] / 4
    assert rmse[KS[-1]][1] < rmse[KS[0]][1] / 4


def test_linear_gaussian_samples_moments(f64):
    """Posterior draws have the weighted moments of the particles (large S)."""
    m, q = gaussian_toy()
    post = posterior(tg.TMC(m, q, K=64), {"x": torch.tensor([1.3, -0.4, 2.1])}, seed=5)
    draws = post.sample(4000, seed=1)
    for lat in ("theta", "z"):
        mean, sd = post.mean(lat), post.std(lat)
        se = sd / math.sqrt(4000)
        assert torch.all((draws[lat].mean(0) - mean).abs() < 4 * se)


# ----------------------------------------------------------------------------------------
# Discrete HMM with enumerated states: forward-backward.


def _hmm(T=5, n_seq=2, method="tmc"):
    g = torch.Generator().manual_seed(7)
    S_ = 3
    A = torch.softmax(2 * torch.randn(S_, S_, generator=g), -1)
    pi0 = torch.softmax(torch.randn(S_, generator=g), -1)
    mus = torch.tensor([-1.5, 0.0, 1.5])
    m = tg.Model()
    m.plate("seq", size=n_seq)
    m.latent("z1", lambda: Categorical(probs=pi0), plate="seq")
    for t in range(2, T + 1):
        m.latent(f"z{t}", lambda prev: Categorical(probs=A[prev]), plate="seq", parents=[f"z{t - 1}"])
    for t in range(1, T + 1):
        m.observed(f"x{t}", lambda z: Normal(mus[z], 1.0), plate="seq", parents=[f"z{t}"])
    q = tg.Proposal(m)
    for t in range(1, T + 1):
        q.enumerate(f"z{t}")
    x = torch.randn(T, n_seq, generator=g) * 1.5
    data = {f"x{t}": x[t - 1] for t in range(1, T + 1)}
    cls = {"tmc": tg.TMC, "iwae": tg.IWAE}[method]
    return cls(m, q, K=4), data, (A, pi0, mus, x)


def forward_backward(A, pi0, mus, x):
    """Single-state and pairwise posteriors of one sequence (numpy, scaled recursions)."""
    A, pi0, mus, x = (np.asarray(v, dtype=float) for v in (A, pi0, mus, x))
    T, S = len(x), len(pi0)
    lik = np.exp(-0.5 * (x[:, None] - mus[None]) ** 2) / math.sqrt(2 * math.pi)
    alpha = np.zeros((T, S))
    c = np.zeros(T)
    a = pi0 * lik[0]
    c[0] = a.sum()
    alpha[0] = a / c[0]
    for t in range(1, T):
        a = (alpha[t - 1] @ A) * lik[t]
        c[t] = a.sum()
        alpha[t] = a / c[t]
    beta = np.ones((T, S))
    for t in range(T - 2, -1, -1):
        beta[t] = A @ (lik[t + 1] * beta[t + 1]) / c[t + 1]
    gamma = alpha * beta
    xi = np.zeros((T - 1, S, S))
    for t in range(T - 1):
        xi[t] = alpha[t][:, None] * A * (lik[t + 1] * beta[t + 1])[None] / c[t + 1]
    return gamma, xi, np.log(c).sum()


@pytest.mark.parametrize("method", ["tmc", "iwae"])
def test_hmm_marginals_equal_forward_backward(f64, method):
    T = 5
    est, data, (A, pi0, mus, x) = _hmm(T=T, method=method)
    post = posterior(est, data)
    log_ev = 0.0
    for s in range(x.shape[1]):
        gamma, _, ll = forward_backward(A, pi0, mus, x[:, s])
        log_ev += ll
        for t in range(1, T + 1):
            np.testing.assert_allclose(post.marginal(f"z{t}")[:, s].numpy(), gamma[t - 1], rtol=1e-9, atol=1e-12)
            np.testing.assert_allclose(post.mean(f"z{t}")[s].item(), gamma[t - 1] @ np.arange(3), rtol=1e-9)
    np.testing.assert_allclose(post.log_evidence.item(), log_ev, rtol=1e-10)


def test_hmm_samples_pairwise_equal_forward_backward(f64):
    """Exact joint sampling: adjacent-pair frequencies match forward-backward (chi-square)."""
    T = 4
    est, data, (A, pi0, mus, x) = _hmm(T=T)
    post = posterior(est, data)
    S = 6000
    draws = post.sample(S, seed=4)
    pvals = []
    for s in range(x.shape[1]):
        _, xi, _ = forward_backward(A, pi0, mus, x[:, s])
        for t in range(1, T):
            a, b = draws[f"z{t}"][:, s], draws[f"z{t + 1}"][:, s]
            pval, tv = _chi_square_and_tv((3 * a + b).numpy(), torch.tensor(xi[t - 1].reshape(-1)))
            assert tv < tv_bound(9, S), tv
            pvals.append(pval)
    # 6 chi-square tests (2 sequences x 3 adjacent pairs): a Bonferroni floor.
    assert min(pvals) > 1e-3 / len(pvals), pvals


# ----------------------------------------------------------------------------------------
# Predictive log-likelihood.


def _mvn_logpdf(x, cov):
    x = np.asarray(x, dtype=float)
    _, logdet = np.linalg.slogdet(cov)
    return -0.5 * (x @ np.linalg.solve(cov, x) + logdet + len(x) * math.log(2 * math.pi))


@pytest.mark.parametrize("warm", [0, 2], ids=["first-call", "program"])
def test_predictive_equals_brute_force_ratio(f64, warm):
    """``warm`` earlier calls: the checked one then finds the structure's cached program."""
    est, data = _toy(K=3, N=3)
    for w in range(warm):
        predictive_log_likelihood(est, data, {"x": torch.tensor([False, False, True])}, seed=10 + w)
    s = est.sample(data, seed=0)
    got = predictive_log_likelihood(est, data, {"x": torch.tensor([False, False, True])}, samples=s)
    fs = est.factor_graph(s).factors
    rest = [tg.Factor(f.name, f.tensor.clone(), f.sample_dims, f.plates) for f in fs]
    for f in rest:
        if f.name == "x":
            f.tensor[..., 2] = 0.0
    expect = tg.brute_force(tg.FactorGraph(fs, s.ordinals)) - tg.brute_force(tg.FactorGraph(rest, s.ordinals))
    torch.testing.assert_close(got, expect)
    # Same thing as sum_k pi_rest(k) p(x_h | z^k) over the brute-force posterior given x_rest.
    variables, combos, probs = enumerate_posterior(rest, s.ordinals)
    col = next(i for i, (d, e) in enumerate(variables) if d == "z" and e == {"data": 2})
    lik = Normal(s.values["z"][combos[:, col], 2], 1.0).log_prob(data["x"][2]).exp()
    torch.testing.assert_close(got, torch.log((probs * lik).sum()))


def test_predictive_converges_to_exact(f64):
    x = torch.tensor([1.3, -0.4, 2.1, 0.6])
    held = torch.tensor([False, True, False, True])
    N = len(x)
    cov = 2.0 * np.eye(N) + np.ones((N, N))
    r = ~held.numpy()
    exact = _mvn_logpdf(x.numpy(), cov) - _mvn_logpdf(x.numpy()[r], cov[np.ix_(r, r)])
    m, q = gaussian_toy()
    errs = {}
    for K in (8, 512):
        vals = [predictive_log_likelihood(tg.TMC(m, q, K=K), {"x": x}, {"x": held}, seed=rep).item()
                for rep in range(8)]
        errs[K] = np.sqrt(np.mean((np.array(vals) - exact) ** 2))
    assert errs[512] < 0.05, errs
    assert errs[512] < errs[8] / 3, errs
    # Whole variable held out: the name, a list, or an all-True mask mean the same.
    est = tg.TMC(m, q, K=4)
    a = predictive_log_likelihood(est, {"x": x}, "x", seed=0)
    torch.testing.assert_close(a, predictive_log_likelihood(est, {"x": x}, ["x"], seed=0))
    torch.testing.assert_close(a, predictive_log_likelihood(est, {"x": x}, {"x": torch.ones(N, dtype=bool)}, seed=0))


# ----------------------------------------------------------------------------------------
# Errors.


def test_bad_input_errors(f64):
    est, data = _toy()
    post = posterior(est, data, seed=0)
    with pytest.raises(tg.TMCGraphError, match="unknown latent 'w'"):
        post.mean("w")
    with pytest.raises(tg.TMCGraphError, match="S"):
        post.sample(0)
    with pytest.raises(tg.TMCGraphError, match="batch_size"):
        post.sample(3, batch_size=0)
    with pytest.raises(tg.TMCGraphError, match="moment function returned shape"):
        post.moment("z", lambda z: z.sum(0))
    with pytest.raises(tg.TMCGraphError, match="'y' is not an observed variable"):
        predictive_log_likelihood(est, data, "y", seed=0)
    with pytest.raises(tg.TMCGraphError, match="heldout mask for 'x'"):
        predictive_log_likelihood(est, data, {"x": torch.ones(5, dtype=torch.bool)}, seed=0)
    with pytest.raises(tg.TMCGraphError, match="unknown sample dim"):
        dim_marginals(post.graph, dims=["nope"])
    with pytest.raises(tg.TMCGraphError, match="no ordinal"):
        dim_marginals(tg.FactorGraph(post.graph.factors, {}))
    bad = [tg.Factor("f", torch.zeros(2, 3), ("a",), (DRAWS,))]
    with pytest.raises(tg.TMCGraphError, match="reserved plate"):
        sample_indices(tg.FactorGraph(bad, {"a": (DRAWS,)}), 2)
    zero = [tg.Factor("f", torch.full((2,), -math.inf), ("a",), ())]
    with pytest.raises(tg.TMCGraphError, match="no particle combination carries weight"):
        dim_marginals(tg.FactorGraph(zero, {"a": ()}))


@pytest.mark.parametrize("which", range(len(STRUCTURES)))
def test_samples_random_factors_chi_square(f64, which):
    """Backward sampling on nested, chained and loopy structures of random factors."""
    spec, levels = STRUCTURES[which]
    g = torch.Generator().manual_seed(which)
    factors = [tg.Factor(f"f{i}", 1.5 * torch.randn([2] * len(dims) + [2] * len(plates), generator=g), dims, plates)
               for i, (dims, plates) in enumerate(spec)]
    variables, combos, probs = enumerate_posterior(factors, levels)
    S = 20000
    idx = sample_indices(tg.FactorGraph(factors, levels), S, generator=torch.Generator().manual_seed(which))
    cols = torch.stack([idx[d][(slice(None),) + tuple(e[p] for p in levels[d])] for d, e in variables], 1)
    codes = (cols * (2 ** torch.arange(len(variables) - 1, -1, -1))).sum(1)
    pval, tv = _chi_square_and_tv(codes.numpy(), probs)
    assert pval > 1e-3, (pval, tv)
    assert tv < tv_bound(len(probs), S), tv


def test_docs_posterior_code_blocks_run():
    """The code in docs/posterior.md runs and its stated shapes and identities hold."""
    import re

    from conftest import ROOT

    text = (ROOT / "docs" / "posterior.md").read_text()
    ns = {}
    for code in re.findall(r"```python\n(.*?)```", text, flags=re.S):
        exec(compile(code, "posterior.md", "exec"), ns)
    post, tg_, m, q, x = ns["post"], ns["tg"], ns["m"], ns["q"], ns["x"]
    assert post.marginal("z").shape == (256, 3)
    assert ns["draws"]["z"].shape == (1000, 3) and ns["draws"].indices["z"].shape == (1000, 3)
    est = tg_.TMC(m, q, K=256)
    torch.testing.assert_close(post.log_evidence, est.log_evidence({"x": x}, seed=0).detach())
    assert torch.isfinite(ns["lp"]) and ns["r"].marginals["theta"].shape == (16,)


def test_memory_limit_gives_same_marginals_and_draws(f64):
    """A sliced plan gives the same marginals; draws are then batched to fit the limit."""
    m, q = gaussian_toy()
    data = {"x": torch.tensor([1.0, 2.0, 0.5, 0.3])}
    a = posterior(tg.TMC(m, q, K=16), data, seed=0)
    b = posterior(tg.TMC(m, q, K=16, memory_limit=70), data, seed=0)
    torch.testing.assert_close(a.log_evidence, b.log_evidence)
    for d in a.dim_marginals:
        torch.testing.assert_close(a.dim_marginals[d], b.dim_marginals[d])
    da, db = a.sample(30, seed=0, batch_size=1), b.sample(30, seed=0)  # the limit allows one draw per batch
    for d in da.indices:
        assert torch.equal(da.indices[d], db.indices[d])
