"""Burda et al.'s models, objectives and metrics against independent computations.

Log-weights and every bound are recomputed by explicit loops over samples and data
points from the drawn particles, with ``torch.distributions.Normal``/``Bernoulli`` on
the networks' outputs; TMC on the two-layer model is checked against a loop over all
K^2 particle combinations, and its (and IWAE's) unbiasedness against p(x) from
Gauss-Hermite quadrature on a model with one-dimensional layers.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributions import Bernoulli, Normal
from unbiased import assert_unbiased

import tmcgraph as tg
from tmcgraph.models import burda

TINY1 = {"latents": (2,), "hidden": (3,), "n_pixels": 5}
TINY2 = {"latents": (3, 2), "hidden": (4, 3), "n_pixels": 5}


def _data(B=3, n=5, seed=0):
    return torch.bernoulli(torch.full((B, n), 0.4), generator=torch.Generator().manual_seed(seed))


def _gauss(layer, parent):
    h = layer.trunk(parent)
    return layer.mean(h), layer.log_std(h).exp()


def _logp_x(dec, h1, x):
    logits = dec.logits(dec.trunk(h1))
    return Bernoulli(logits=logits).log_prob(x).sum(-1)


def _loop_log_weights(m, q, x, h):
    """log w[k, b] from joint samples ``h[name][k, b]`` by explicit loops (IWAE: paired proposals)."""
    names = burda.latent_names(len(h))
    K, B = h[names[0]].shape[:2]
    out = torch.zeros(K, B, dtype=torch.float64)
    for k in range(K):
        for b in range(B):
            hs = [h[n][k, b] for n in names]
            lw = _logp_x(m["x"].fn, hs[0], x[b])
            top = hs[-1]
            lw = lw + Normal(0.0, 1.0).log_prob(top).sum()
            for i in range(len(names) - 1):
                mu, sd = _gauss(m[names[i]].fn, hs[i + 1])
                lw = lw + Normal(mu, sd).log_prob(hs[i]).sum()
            mu, sd = _gauss(q[names[0]].fn, x[b])
            lw = lw - Normal(mu, sd).log_prob(hs[0]).sum()
            for i in range(1, len(names)):
                mu, sd = _gauss(q[names[i]].fn, hs[i - 1])
                lw = lw - Normal(mu, sd).log_prob(hs[i]).sum()
            out[k, b] = lw
    return out


def _lme(values):
    a = max(values)
    return a + math.log(sum(math.exp(v - a) for v in values) / len(values))


def _draws(m, q, x, K, seed):
    s = tg.IWAE(m, q, K=K).sample({"x": x}, seed=seed)
    return {n: s.values[n] for n in q.variables}


# ------------------------------------------------------------------------------------ models


def test_architectures_match_the_paper():
    m, q = burda.build(1)
    shapes = {n: tuple(p.shape) for n, p in q.named_parameters() if n.endswith("weight")}
    assert sorted(shapes.values()) == sorted([(200, 784), (200, 200), (50, 200), (50, 200)])
    dec = {n: tuple(p.shape) for n, p in m.named_parameters() if n.endswith("weight")}
    assert sorted(dec.values()) == sorted([(200, 50), (200, 200), (784, 200)])
    m2, q2 = burda.build(2)
    enc = sorted(tuple(p.shape) for n, p in q2.named_parameters() if n.endswith("weight"))
    assert enc == sorted([(200, 784), (200, 200), (100, 200), (100, 200), (100, 100), (100, 100), (50, 100),
                          (50, 100)])
    gen = sorted(tuple(p.shape) for n, p in m2.named_parameters() if n.endswith("weight"))
    assert gen == sorted([(100, 50), (100, 100), (100, 100), (100, 100), (200, 100), (200, 200), (784, 200)])
    assert isinstance(m2["h1"].fn.trunk[1], torch.nn.Tanh)
    assert q2["h2"].parents == ("h1",) and m2["h1"].parents == ("h2",)


def test_output_bias_is_the_logit_of_the_pixel_means_and_init_is_private():
    means = torch.linspace(0.0, 1.0, 784)
    state = torch.get_rng_state()
    m, _ = burda.build(1, pixel_means=means, seed=3)
    assert torch.equal(torch.get_rng_state(), state)  # the global generator is neither read nor advanced
    p = means.clamp(1e-3, 1 - 1e-3)
    torch.testing.assert_close(m["x"].fn.logits.bias.detach(), torch.log(p / (1 - p)))
    m2, _ = burda.build(1, pixel_means=means, seed=3)
    for a, b in zip(m.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    w = m["x"].fn.trunk[0].weight
    bound = math.sqrt(6 / (50 + 200))  # Glorot uniform
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    with pytest.raises(tg.TMCGraphError, match="pixel_means"):
        burda.build(1, pixel_means=torch.zeros(10))
    with pytest.raises(tg.TMCGraphError, match="layers"):
        burda.build(3)


# ------------------------------------------------------------------------------------ objectives


@pytest.mark.parametrize("arch", [TINY1, TINY2], ids=["1-layer", "2-layer"])
def test_log_weights_equal_explicit_loops_and_tg_iwae(arch):
    m, q = burda.build(seed=1, **arch)
    x = _data()
    lw = burda.log_weights(m, q, {"x": x}, 4, seed=7)
    ref = _loop_log_weights(m, q, x, _draws(m, q, x, 4, 7))
    torch.testing.assert_close(lw.double(), ref, rtol=1e-5, atol=1e-4)
    iwae = tg.IWAE(m, q, K=4).log_evidence({"x": x}, seed=7, elementwise=True)
    torch.testing.assert_close(burda.log_mean_exp(lw), iwae, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("spec", ["vae:1", "vae:6", "iwae:1", "iwae:6", "ciwae:6:0.3", "miwae:2:3", "miwae:3:2",
                                  "piwae:2:3"])
@pytest.mark.parametrize("arch", [TINY1, TINY2], ids=["1-layer", "2-layer"])
def test_bounds_equal_explicit_loops(spec, arch):
    m, q = burda.build(seed=2, **arch)
    x = _data(B=2)
    obj = burda.parse_objective(spec)
    value = obj(m, q, {"x": x}, seed=11).value.detach()
    with torch.no_grad():
        lw = _loop_log_weights(m, q, x, _draws(m, q, x, obj.k, 11))
    for b in range(len(x)):
        col = [float(v) for v in lw[:, b]]
        if obj.name == "vae":
            want = sum(col) / len(col)
        elif obj.name in ("iwae", "piwae"):
            want = _lme(col)
        elif obj.name == "ciwae":
            want = obj.beta * sum(col) / len(col) + (1 - obj.beta) * _lme(col)
        else:  # miwae: M groups of K consecutive samples
            K = obj.k // obj.M
            want = sum(_lme(col[j * K:(j + 1) * K]) for j in range(obj.M)) / obj.M
        assert float(value[b]) == pytest.approx(want, rel=1e-5, abs=1e-4)


def _reparam_loop_log_weights(m, q, x, h):
    """As :func:`_loop_log_weights` with each sample rebuilt as mu + sd * eps (gradients reach the proposal)."""
    names = burda.latent_names(len(h))
    K, B = h[names[0]].shape[:2]
    rows = []
    for k in range(K):
        row = []
        for b in range(B):
            parent = x[b]
            hs = []
            for i, n in enumerate(names):
                mu, sd = _gauss(q[n].fn, parent)
                eps = ((h[n][k, b] - mu) / sd).detach()
                parent = mu + sd * eps
                hs.append(parent)
            row.append(hs)
        rows.append(row)
    out = []
    for k in range(K):
        col = []
        for b in range(B):
            hs = rows[k][b]
            lw = _logp_x(m["x"].fn, hs[0], x[b]) + Normal(0.0, 1.0).log_prob(hs[-1]).sum()
            for i in range(len(names) - 1):
                mu, sd = _gauss(m[names[i]].fn, hs[i + 1])
                lw = lw + Normal(mu, sd).log_prob(hs[i]).sum()
            mu, sd = _gauss(q[names[0]].fn, x[b])
            lw = lw - Normal(mu, sd).log_prob(hs[0]).sum()
            for i in range(1, len(names)):
                mu, sd = _gauss(q[names[i]].fn, hs[i - 1])
                lw = lw - Normal(mu, sd).log_prob(hs[i]).sum()
            col.append(lw)
        out.append(torch.stack(col))
    return torch.stack(out)


def _grads(loss, params):
    return torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)


@pytest.mark.parametrize("arch", [TINY1, TINY2], ids=["1-layer", "2-layer"])
def test_piwae_sends_iwae_gradients_to_the_model_and_miwae_gradients_to_the_proposal(arch):
    m, q = burda.build(seed=4, **arch)
    x = _data(B=2)
    M, K = 2, 3
    loss = burda.parse_objective(f"piwae:{M}:{K}")(m, q, {"x": x}, seed=5)
    mp, pp = list(m.parameters()), list(q.parameters())
    for p in mp + pp:
        p.grad = None
    loss.backward()
    got_m = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in mp]
    got_p = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in pp]
    lw = _reparam_loop_log_weights(m, q, x, _draws(m, q, x, M * K, 5))
    iwae = (torch.logsumexp(lw, 0) - math.log(M * K)).mean()
    miwae = (torch.logsumexp(lw.reshape(M, K, -1), 1) - math.log(K)).mean()
    for p, g, want in zip(mp, got_m, _grads(-iwae, mp)):
        torch.testing.assert_close(g, torch.zeros_like(p) if want is None else want, rtol=1e-4, atol=1e-5)
    for p, g, want in zip(pp, got_p, _grads(-miwae, pp)):
        torch.testing.assert_close(g, torch.zeros_like(p) if want is None else want, rtol=1e-4, atol=1e-5)


def test_iwae_gradient_equals_the_gradient_of_the_loop():
    m, q = burda.build(seed=6, **TINY2)
    x = _data(B=2)
    loss = burda.parse_objective("iwae:3")(m, q, {"x": x}, seed=8)
    params = list(m.parameters()) + list(q.parameters())
    got = torch.autograd.grad(loss.loss, params, allow_unused=True)
    lw = _reparam_loop_log_weights(m, q, x, _draws(m, q, x, 3, 8))
    want = torch.autograd.grad(-(torch.logsumexp(lw, 0) - math.log(3)).mean(), params, allow_unused=True)
    for g, w in zip(got, want):
        if w is None:
            assert g is None or torch.count_nonzero(g) == 0
        else:
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("coupling", ["mixture", "permutation"])
def test_tmc_on_the_two_layer_model_equals_the_loop_over_all_combinations(coupling):
    m, q = burda.build(seed=3, coupling=coupling, **TINY2)
    x = _data(B=2)
    K = 3
    est = tg.TMC(m, q, K=K)
    s = est.sample({"x": x}, seed=9)
    value = est.log_evidence(samples=s, elementwise=True)
    torch.testing.assert_close(value, burda.parse_objective(f"tmc:{K}")(m, q, {"x": x}, seed=9).value)
    h1, h2 = s.values["h1"], s.values["h2"]
    for b in range(len(x)):
        terms = []
        for k1 in range(K):
            mu, sd = _gauss(q["h1"].fn, x[b])
            lq1 = Normal(mu, sd).log_prob(h1[k1, b]).sum()
            for k2 in range(K):
                # h2's particles were drawn with a coupling: density (1/K) sum_j q(h2 | h1^j)
                lq2 = _lme([float(Normal(*_gauss(q["h2"].fn, h1[j, b])).log_prob(h2[k2, b]).sum().detach())
                            for j in range(K)])
                lp = (_logp_x(m["x"].fn, h1[k1, b], x[b]) + Normal(*_gauss(m["h1"].fn, h2[k2, b])).log_prob(
                    h1[k1, b]).sum() + Normal(0.0, 1.0).log_prob(h2[k2, b]).sum())
                terms.append(float((lp - lq1).detach()) - lq2)
        assert float(value[b].detach()) == pytest.approx(_lme(terms), rel=1e-5, abs=1e-4)
    brute = tg.brute_force(est.factor_graph(s).with_keep("data"))
    torch.testing.assert_close(brute.to(value.dtype), value, rtol=1e-5, atol=1e-4)


def _trapezoid(n, lim):
    g = torch.linspace(-lim, lim, n, dtype=torch.float64)
    lw = torch.full((n,), math.log(float(g[1] - g[0])), dtype=torch.float64)
    lw[0] -= math.log(2)
    lw[-1] -= math.log(2)
    return g, lw


def _quadrature_log_px(m, x, n2=2001, n1=4001, lim=12.0):
    """log p(x) of a model with 1-d h1, h2: trapezoid rule on dense grids (h2 in [-12, 12], h1 in [-36, 36])."""
    h2, lw2 = _trapezoid(n2, lim)
    h1, lw1 = _trapezoid(n1, 3 * lim)
    lpx = _logp_x(m["x"].fn, h1[:, None], x)  # p(x | h1) on the h1 grid
    inner = []
    for c in h2.split(500):
        mu, sd = _gauss(m["h1"].fn, c[:, None])
        inner.append(torch.logsumexp(Normal(mu, sd).log_prob(h1[None, :]) + lpx + lw1, 1))
    return float(torch.logsumexp(torch.cat(inner) + lw2 + Normal(0.0, 1.0).log_prob(h2), 0))


@pytest.mark.parametrize("method", ["tmc", "iwae"])
def test_tmc_and_iwae_on_the_two_layer_model_are_unbiased(method):
    m, q = burda.build(seed=5, latents=(1, 1), hidden=(3, 3), n_pixels=3)
    m.double()
    q.double()
    with torch.no_grad():  # proposals wider than the posterior: weights of finite variance, so the test has power
        for name, scale in (("h1", 4.0), ("h2", 2.0)):
            q[name].fn.log_std.weight.zero_()
            q[name].fn.log_std.bias.fill_(math.log(scale))
    x = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)
    with torch.no_grad():
        exact = _quadrature_log_px(m, x)
        assert exact == pytest.approx(_quadrature_log_px(m, x, 1001, 2001), abs=1e-7)  # converged
        R = 4000  # replicates: the same image repeated along the data plate
        cls = tg.TMC if method == "tmc" else tg.IWAE
        est = cls(m, q, K=3, dtype=torch.float64).log_evidence({"x": x.expand(R, 3)}, seed=0, elementwise=True)
    assert_unbiased(est, exact)


def test_parse_objective_errors():
    for bad in ["elbo:5", "iwae", "iwae:x", "miwae:4", "ciwae:5:2", "iwae:0"]:
        with pytest.raises(tg.TMCGraphError):
            burda.parse_objective(bad)
    assert burda.parse_objective("miwae:5:10").k == 50
    assert burda.parse_objective("piwae:8:8").M == 8


def test_objectives_leave_the_global_generator_alone():
    m, q = burda.build(seed=1, **TINY2)
    state = torch.get_rng_state()
    for spec in ("vae:2", "iwae:3", "tmc:2", "piwae:2:2"):
        burda.parse_objective(spec)(m, q, {"x": _data()}, seed=0).backward()
    assert torch.equal(torch.get_rng_state(), state)


# ------------------------------------------------------------------------------------ schedule


def test_learning_rate_schedule_values():
    s = burda.schedule()
    assert [n for n, _ in s] == [1, 3, 9, 27, 81, 243, 729, 2187]
    assert sum(n for n, _ in s) == 3280
    for i, (_, lr) in enumerate(s):
        assert lr == pytest.approx(1e-3 * 10 ** (-i / 7), rel=1e-12)
    lr = burda.learning_rate
    assert lr(0) == pytest.approx(1e-3)
    assert lr(1) == lr(3) == pytest.approx(1e-3 * 10 ** (-1 / 7))
    assert lr(4) == lr(12) == pytest.approx(1e-3 * 10 ** (-2 / 7))
    assert lr(13) == pytest.approx(1e-3 * 10 ** (-3 / 7))
    assert lr(3279) == pytest.approx(1e-4)
    assert lr(5000) == pytest.approx(1e-4)
    assert lr(4, stages=2) == pytest.approx(1e-3 * 10 ** (-1 / 7))  # truncated: the last stage's rate
    assert burda.schedule(3, lr=2e-3)[2] == (9, pytest.approx(2e-3 * 10 ** (-2 / 7)))
    with pytest.raises(tg.TMCGraphError):
        burda.schedule(0)
    with pytest.raises(tg.TMCGraphError):
        lr(-1)


# ------------------------------------------------------------------------------------ metrics


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(1, 7), min_size=1, max_size=5), st.integers(1, 3), st.integers(0, 10_000),
       st.floats(0.1, 300.0))
def test_chunked_statistics_equal_unchunked(sizes, B, seed, spread):
    g = torch.Generator().manual_seed(seed)
    lw = torch.randn(sum(sizes), B, generator=g, dtype=torch.float64) * spread - 100
    st_ = burda.chunked_stats(lw.split(sizes))
    n = lw.shape[0]
    torch.testing.assert_close(st_.bound, torch.logsumexp(lw, 0) - math.log(n))
    torch.testing.assert_close(st_.elbo, lw.mean(0))
    w = torch.exp(lw - lw.max(0).values)
    torch.testing.assert_close(st_.ess, w.sum(0) ** 2 / (w**2).sum(0))
    torch.testing.assert_close(burda.ess(lw), st_.ess)
    assert st_.n == n


def test_l_k_is_exact_when_the_proposal_is_the_posterior_for_any_chunking():
    """Decoder ignoring h and q = prior: every weight is p(x), so L_K = ELBO = log p(x), KL = 0, ESS = K."""
    m, q = burda.build(seed=0, **TINY2)
    bias = torch.tensor([0.3, -1.0, 2.0, 0.0, -0.5])
    with torch.no_grad():
        for p in list(m.parameters()) + list(q.parameters()):
            p.zero_()
        m["x"].fn.logits.bias.copy_(bias)
    # h1 | h2 in the model and both proposal layers are N(0, 1): posterior = prior = proposal
    x = _data(B=7)
    exact = Bernoulli(logits=bias).log_prob(x).sum(-1)
    for max_elements in (10**9, 5 * 3 * 13):  # one chunk; chunks of 13 samples (the last one 9)
        r = burda.evaluate_bounds(m, q, x, K=100, seed=1, max_elements=max_elements, batch_size=3)
        torch.testing.assert_close(r["bound"], exact, rtol=0, atol=1e-4)
        torch.testing.assert_close(r["elbo"], exact, rtol=0, atol=1e-4)
        torch.testing.assert_close(r["kl"], torch.zeros(7), rtol=0, atol=1e-4)
        torch.testing.assert_close(r["ess"], torch.full((7,), 100.0), rtol=1e-4, atol=0)


def test_l_k_chunked_agrees_with_unchunked_in_distribution():
    """Different chunkings draw different samples; both estimate the same L_K (means within noise)."""
    m, q = burda.build(seed=2, **TINY1)
    x = _data(B=1).expand(300, 5)
    a = burda.evaluate_bounds(m, q, x, K=60, seed=1, max_elements=10**9, batch_size=300)["bound"]
    b = burda.evaluate_bounds(m, q, x, K=60, seed=2, max_elements=5 * 300 * 7, batch_size=300)["bound"]  # chunks of 7
    se = math.sqrt(a.var() / len(a) + b.var() / len(b))
    assert abs(float(a.mean() - b.mean())) < 4 * se


def test_active_units_on_a_constructed_case():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(5000, 1, generator=g, dtype=torch.float64)
    stds = torch.tensor([1.0, 0.5, 0.2, 0.05, 0.0])  # variances 1, 0.25, 0.04, 0.0025, 0
    means = z * stds
    assert burda.active_units(means) == 3
    assert burda.active_units(means, threshold=0.03) == 3
    assert burda.active_units(means, threshold=0.1) == 2
    with pytest.raises(tg.TMCGraphError):
        burda.active_units(torch.zeros(1, 3))


def test_posterior_means_and_active_units_of_a_constructed_model():
    """q(h1 | x): only unit 0 depends on x; q(h2 | h1): constant means. Exactly 1 + 0 active units."""
    m, q = burda.build(seed=0, **TINY2)
    with torch.no_grad():
        enc1, enc2 = q["h1"].fn, q["h2"].fn
        enc1.mean.weight.zero_()
        enc1.mean.bias.copy_(torch.tensor([0.0, 1.0, -2.0]))
        enc1.mean.weight[0].fill_(3.0)
        enc2.mean.weight.zero_()
        enc2.mean.bias.copy_(torch.tensor([0.5, -0.5]))
    x = torch.bernoulli(torch.full((500, 5), 0.5), generator=torch.Generator().manual_seed(1))
    pm = burda.posterior_means(q, x, samples=20, seed=3)
    torch.testing.assert_close(pm["h1"], enc1(x).mean)
    torch.testing.assert_close(pm["h2"], torch.tensor([0.5, -0.5]).expand(500, 2))
    assert pm["h1"][:, 0].var() > 0.1
    assert burda.active_units(pm["h1"]) == 1 and burda.active_units(pm["h2"]) == 0


def test_posterior_means_of_a_higher_layer_average_over_lower_layer_draws():
    m, q = burda.build(seed=1, **TINY2)
    x = _data(B=4)
    pm = burda.posterior_means(q, x, samples=4000, seed=0)
    d1 = q["h1"].fn(x)
    g = torch.Generator().manual_seed(5)
    h1 = d1.loc + d1.scale * torch.randn((4000,) + tuple(d1.loc.shape), generator=g)
    want = q["h2"].fn(h1).mean.mean(0)
    torch.testing.assert_close(pm["h2"], want, rtol=0, atol=0.05)


def test_vae_with_one_sample_is_tg_vae():
    m, q = burda.build(seed=3, **TINY2)
    x = _data()
    got = burda.parse_objective("vae:1")(m, q, {"x": x}, seed=4).value
    torch.testing.assert_close(got, tg.VAE(m, q).log_evidence({"x": x}, seed=4, elementwise=True))
