"""Subsampled plates: B of N elements per call, each element's message scaled by N / B.

Truths: the plain estimator (B = N, exact equality); for an integer scale r = N / B,
brute-force enumeration of the unscaled factors with the plate replicated r times (an
element's local sum raised to the power r is the product of r independent copies of it);
hand-written formulas for a non-integer scale; and, on a conjugate Gaussian model
without local latents, the closed-form per-noise gradient, averaged over every
minibatch of size B.
"""

import itertools
import math

import pytest
import torch
from torch.distributions import Categorical, Normal

import tmcgraph as tg
from tmcgraph.infer.factors import factor_builders
from tmcgraph.infer.objectives import objective
from tmcgraph.infer.subsample import is_subsampled, plate_scales, subsample


def vae(N, subsampled=True):
    """No global latent: z_n ~ N(0, 1), x_n ~ N(z_n, 1), amortised q(z_n | x_n)."""
    m = tg.Model()
    m.plate("data", size=N, subsample=subsampled)
    m.latent("z", lambda: Normal(0.0, 1.0), plate="data")
    m.observed("x", lambda z: Normal(z, 1.0), plate="data")
    q = tg.Proposal(m)
    q.latent("z", lambda x: Normal(0.5 * x, 0.9), plate="data")
    return m, q


def toy(N, subsampled=True, local=True):
    """theta ~ N(0, 1); z_n ~ N(theta, 1) (if ``local``); x_n ~ N(z_n or theta, 1)."""
    m = tg.Model()
    m.plate("data", size=N, subsample=subsampled)
    m.latent("theta", lambda: Normal(0.0, 1.0))
    q = tg.Proposal(m)
    q.latent("theta", lambda: Normal(0.2, 1.1))
    if local:
        m.latent("z", lambda theta: Normal(theta, 1.0), plate="data")
        m.observed("x", lambda z: Normal(z, 1.0), plate="data")
        q.latent("z", lambda x: Normal(0.5 * x, 1.2), plate="data")
    else:
        m.observed("x", lambda theta: Normal(theta, 1.0), plate="data")
    return m, q


def nested(G, M, subsampled):
    """mu global; a_g in groups; z_gm in (group, member); x_gm observed; ``subsampled`` in {"group", "member"}."""
    m = tg.Model()
    m.plate("group", size=G, subsample=subsampled == "group")
    m.plate("member", size=M, subsample=subsampled == "member")
    m.latent("mu", lambda: Normal(0.0, 1.0))
    m.latent("a", lambda mu: Normal(mu, 1.0), plate="group")
    m.latent("z", lambda a: Normal(a, 0.8), plate=("group", "member"))
    m.observed("x", lambda z: Normal(z, 0.5), plate=("group", "member"))
    q = tg.Proposal(m)
    q.latent("mu", lambda: Normal(0.0, 1.5))
    q.latent("a", lambda mu: Normal(mu, 1.2), plate="group", coupling="mixture")
    q.latent("z", lambda x: Normal(x, 0.7), plate=("group", "member"))
    return m, q


def enumerated(N, subsampled=True):
    """theta global; c_n ~ Cat enumerated; x_n ~ N(theta + c_n, 1)."""
    m = tg.Model()
    m.plate("data", size=N, subsample=subsampled)
    m.latent("theta", lambda: Normal(0.0, 1.0))
    m.latent("c", lambda: Categorical(probs=torch.tensor([0.3, 0.7])), plate="data")
    m.observed("x", lambda theta, c: Normal(theta + c, 1.0), plate="data")
    q = tg.Proposal(m)
    q.latent("theta", lambda: Normal(0.0, 1.3))
    q.enumerate("c")
    return m, q


def unscaled_graph(est, samples):
    """The factors without any scale (the engine's input as if the batch were the whole plate)."""
    fs = [tg.Factor(n, b(), d, p) for n, d, p, b in factor_builders(est.model, samples, est.context())]
    return fs


def tile(factors, plate, r):
    """Every factor repeated r times along ``plate``: each element appears r times, local dims independent."""
    out = []
    for f in factors:
        if plate in f.plates:
            ax = len(f.sample_dims) + f.plates.index(plate)
            out.append(tg.Factor(f.name, torch.cat([f.tensor] * r, ax), f.sample_dims, f.plates))
        else:
            out.append(f)
    return out


CASES = {
    "toy": (lambda N: toy(N), "data", {"x": (0,)}),
    "vae": (lambda N: vae(N), "data", {"x": (0,)}),
    "no-local": (lambda N: toy(N, local=False), "data", {"x": (0,)}),
    "enumerated": (lambda N: enumerated(N), "data", {"x": (0,)}),
    "group": (lambda N: nested(N, 1, "group"), "group", {"x": (0,)}),
    "member": (lambda N: nested(2, N, "member"), "member", {"x": (1,)}),
}


def data_for(case, N, B_other=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    if case in ("group", "member"):
        shape = (N, 1) if case == "group" else (B_other, N)
        return {"x": torch.randn(shape, generator=g, dtype=torch.float64)}
    return {"x": torch.randn(N, generator=g, dtype=torch.float64)}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("r", [2, 3])
@pytest.mark.parametrize("cls", [tg.TMC, tg.IWAE])
def test_scaled_value_equals_brute_force_of_replicated_plate(f64, case, r, cls):
    B = 2
    build, plate, _ = CASES[case]
    N = r * B
    m, q = build(N)
    full = data_for(case, N)
    idx = torch.tensor([N - 1, 1])
    batch = subsample(m, full, {plate: idx})
    est = cls(m, q, K=2)
    s = est.sample(batch, seed=r)
    value = est.log_evidence(samples=s)
    oracle = tg.brute_force(tg.FactorGraph(tile(unscaled_graph(est, s), plate, r), s.ordinals))
    assert float(value) == pytest.approx(float(oracle), abs=1e-9)
    # the same through a fresh draw: the first call (eager) and the next (the structure's program)
    v1, v2 = est.log_evidence(batch, seed=7), est.log_evidence(batch, seed=7)
    assert float(v1) == pytest.approx(float(v2), abs=1e-12)


def test_non_integer_scale_applies_to_the_log_of_each_local_sum(f64):
    N, B = 5, 2
    m, q = toy(N)
    est = tg.TMC(m, q, K=3)
    batch = subsample(m, data_for("toy", N), {"data": torch.tensor([3, 0])})
    s = est.sample(batch, seed=1)
    f = {g.name: g.tensor for g in unscaled_graph(est, s)}
    local = torch.logsumexp(f["z"] + f["x"][:, None, :], 0)  # [K_theta, B]: log of each element's sum
    exact = torch.logsumexp(f["theta"] + (N / B) * local.sum(-1), 0)
    assert float(est.log_evidence(samples=s)) == pytest.approx(float(exact), abs=1e-10)
    tempered = torch.logsumexp(f["theta"] + torch.logsumexp((N / B) * (f["z"] + f["x"][:, None, :]), 0).sum(-1), 0)
    assert abs(float(exact - tempered)) > 1e-3  # scaling the factors instead would be a different number


def plain(case, N):
    """The same model without subsample=True."""
    if case == "toy":
        return toy(N, subsampled=False)
    if case == "vae":
        return vae(N, subsampled=False)
    if case == "no-local":
        return toy(N, subsampled=False, local=False)
    if case == "enumerated":
        return enumerated(N, subsampled=False)
    return nested(N, 1, None) if case == "group" else nested(2, N, None)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("given", [False, True])
def test_all_elements_equal_the_plain_estimator_exactly(f64, case, given):
    N = 4
    build, plate, _ = CASES[case]
    m, q = build(N)
    m0, q0 = plain(case, N)
    full = data_for(case, N)
    data = subsample(m, full, {plate: torch.arange(N)}) if given else full
    for elementwise in (False, True) if case == "vae" else (False,):
        a = tg.TMC(m, q, K=3).log_evidence(data, seed=2, elementwise=elementwise)
        b = tg.TMC(m0, q0, K=3).log_evidence(full, seed=2, elementwise=elementwise)
        assert torch.equal(a, b)
    la = objective(tg.TMC(m, q, K=3), data, "reparam", seed=2)
    lb = objective(tg.TMC(m0, q0, K=3), full, "reparam", seed=2)
    assert torch.equal(la.value, lb.value)
    assert not is_subsampled(m, data) and plate_scales(m, {plate: N}) == {}


def conjugate(N, mu0=0.3, sig=0.7):
    """theta ~ N(mu0, 1), x_n ~ N(theta, sig); q(theta) = N(m, exp(ls)); mu0, m, ls learned."""
    p_mu = torch.tensor(mu0, dtype=torch.float64, requires_grad=True)
    q_m = torch.tensor(-0.2, dtype=torch.float64, requires_grad=True)
    q_ls = torch.tensor(math.log(0.6), dtype=torch.float64, requires_grad=True)
    m = tg.Model()
    m.plate("data", size=N, subsample=True)
    m.latent("theta", lambda: Normal(p_mu, 1.0))
    m.observed("x", lambda theta: Normal(theta, sig), plate="data")
    q = tg.Proposal(m)
    q.latent("theta", lambda: Normal(q_m, q_ls.exp()))
    return m, q, (p_mu, q_m, q_ls), sig


def test_minibatch_gradients_average_to_the_full_data_gradient(f64):
    """No local latents, one particle: E over all C(N, B) minibatches of the gradient is exact."""
    N, B = 5, 2
    m, q, params, sig = conjugate(N)
    x = torch.tensor([0.9, -0.4, 1.7, 0.2, 1.1], dtype=torch.float64)
    est = tg.VAE(m, q)
    grads, thetas = [], []
    for idx in itertools.combinations(range(N), B):
        batch = subsample(m, {"x": x}, {"data": torch.tensor(idx)})
        loss = objective(est, batch, "reparam", seed=11)
        loss.backward()
        grads.append(torch.stack([p.grad.clone() for p in params]))
        for p in params:
            p.grad = None
        thetas.append(float(est.sample(batch, seed=11).values["theta"].detach()))
    assert max(thetas) - min(thetas) == 0.0  # the same noise for every minibatch
    mean = -torch.stack(grads).mean(0)
    p_mu, q_m, q_ls = (float(p.detach()) for p in params)
    th, s = thetas[0], math.exp(q_ls)
    eps = (th - q_m) / s
    d_theta = -(th - p_mu) + float((x - th).sum()) / sig**2  # d/d theta of log p(theta) + sum log p(x | theta)
    closed = torch.tensor([th - p_mu, d_theta, d_theta * s * eps + 1.0], dtype=torch.float64)
    assert torch.allclose(mean, closed, atol=1e-9)
    full = objective(est, {"x": x}, "reparam", seed=11)
    full.backward()
    assert torch.allclose(mean, -torch.stack([p.grad for p in params]), atol=1e-9)


def test_scaled_likelihood_is_unbiased_given_the_globals_and_the_log_sum_is_not(f64):
    N, B, K = 5, 2, 4
    m, q, _, sig = conjugate(N)
    x = torch.tensor([0.9, -0.4, 1.7, 0.2, 1.1], dtype=torch.float64)
    est = tg.TMC(m, q, K=K)
    sums, values = [], []
    for idx in itertools.combinations(range(N), B):
        batch = subsample(m, {"x": x}, {"data": torch.tensor(idx)})
        s = est.sample(batch, seed=4)
        g = est.factor_graph(s)
        assert g.scales == {"data": N / B}
        sums.append(next(f.tensor for f in g.factors if f.name == "x").sum(-1).detach() * g.scales["data"])
        values.append(float(est.log_evidence(samples=s).detach()))
    theta = est.sample({"x": x}, seed=4).values["theta"].detach()
    exact = Normal(theta[:, None], sig).log_prob(x).sum(-1)
    assert torch.allclose(torch.stack(sums).mean(0), exact, atol=1e-10)
    full = float(est.log_evidence({"x": x}, seed=4).detach())
    # logsumexp is convex in the scaled sums: the minibatch average lies above the full-data value
    assert sum(values) / len(values) > full + 1e-6


def test_proposal_and_model_callables_see_the_element_indices(f64):
    N = 6
    loc = torch.linspace(-1.0, 1.0, N, dtype=torch.float64)
    shift = torch.arange(N, dtype=torch.float64) / 10

    def model(indexed):
        m = tg.Model()
        m.plate("data", size=N if indexed else None, subsample=indexed)
        m.latent("theta", lambda: Normal(0.0, 1.0))
        m.latent("z", lambda theta: Normal(theta, 1.0), plate="data")
        if indexed:
            m.observed("x", lambda z, data_index: Normal(z + shift[data_index], 1.0), plate="data")
        else:
            m.observed("x", lambda z: Normal(z + shift[idx], 1.0), plate="data")
        q = tg.Proposal(m)
        q.latent("theta", lambda: Normal(0.0, 1.0))
        if indexed:
            q.latent("z", lambda data_index: Normal(loc[data_index], 0.5), plate="data")
        else:
            q.latent("z", lambda: Normal(loc[idx], 0.5), plate="data")
        return m, q

    idx = torch.tensor([4, 0, 2])
    x = torch.randn(N, dtype=torch.float64)
    m, q = model(True)
    m0, q0 = model(False)
    assert m.plates["data"].index == "data_index" and "data_index" in m.graph
    batch = subsample(m, {"x": x}, {"data": idx})
    est, est0 = tg.TMC(m, q, K=3), tg.TMC(m0, q0, K=3)
    s, s0 = est.sample(batch, seed=5), est0.sample({"x": x[idx]}, seed=5)
    assert torch.equal(s.values["z"], s0.values["z"]) and torch.equal(s.log_q["z"], s0.log_q["z"])
    f0 = {g.name: g.tensor for g in est0.factor_graph(s0).factors}
    exact = torch.logsumexp(f0["theta"] + 2.0 * torch.logsumexp(f0["z"] + f0["x"][:, None, :], 0).sum(-1), 0)
    assert float(est.log_evidence(batch, seed=5)) == pytest.approx(float(exact), abs=1e-10)


def test_memory_limited_first_call_and_objectives_under_subsampling(f64):
    N = 6
    m, q = toy(N)
    batch = subsample(m, data_for("toy", N), {"data": torch.tensor([5, 2])})
    a = tg.TMC(m, q, K=3).log_evidence(batch, seed=3)
    b = tg.TMC(m, q, K=3, memory_limit=10_000).log_evidence(batch, seed=3)
    assert float(a) == pytest.approx(float(b), abs=1e-10)
    for grad in ("reparam", "score"):
        o = objective(tg.TMC(m, q, K=3), batch, grad, seed=3)
        assert o.value.dim() == 0  # the scaled estimate for the full data set
        assert float(o.loss.detach()) == pytest.approx(-float(o.value.detach()), abs=1e-10)
    with pytest.raises(tg.TMCGraphError, match="subsampled"):
        objective(tg.TMC(m, q, K=3), batch, "dregs", seed=3)


def test_errors():
    N = 5
    m, q = toy(N)
    x = torch.randn(N)
    est = tg.TMC(m, q, K=2)
    with pytest.raises(tg.TMCGraphError, match="out of range.*data.*full size 5"):
        est.log_evidence({"x": x[:2], "data_index": torch.tensor([1, 5])})
    with pytest.raises(tg.TMCGraphError, match="out of range"):
        subsample(m, {"x": x}, {"data": torch.tensor([-1, 2])})
    with pytest.raises(tg.TMCGraphError, match="size 2 along plate 'data'.*'data_index' gives size 3"):
        est.log_evidence({"x": x[:2], "data_index": torch.tensor([0, 1, 2])})
    with pytest.raises(tg.TMCGraphError, match="should have size 2 along plate 'data'"):
        subsample(m, {"x": x[:3]}, {"data": torch.tensor([0, 1])}, sliced=True)
    with pytest.raises(tg.TMCGraphError, match="should have size 5"):
        subsample(m, {"x": x[:3]}, {"data": torch.tensor([0, 1])})
    with pytest.raises(tg.TMCGraphError, match=r"give their indices as data\['data_index'\]"):
        est.log_evidence({"x": x[:2]})
    with pytest.raises(tg.TMCGraphError, match="must be integers"):
        est.log_evidence({"x": x[:2], "data_index": torch.tensor([0.0, 1.0])})
    with pytest.raises(tg.TMCGraphError, match="must be integers"):
        subsample(m, {"x": x}, {"data": torch.tensor([0.0, 1.0])})
    with pytest.raises(tg.TMCGraphError, match=r"non-empty vector \[B\]"):
        est.log_evidence({"x": x[:2], "data_index": torch.tensor([[0, 1]])})
    with pytest.raises(tg.TMCGraphError, match="unknown plate 'batch'"):
        subsample(m, {"x": x}, {"batch": torch.tensor([0])})
    m0, _ = toy(N, subsampled=False)
    with pytest.raises(tg.TMCGraphError, match="plate 'data' is not declared subsample-able"):
        subsample(m0, {"x": x}, {"data": torch.tensor([0, 1])})
    q0 = tg.Proposal(m0)
    q0.latent("theta", lambda: Normal(0.0, 1.0))
    q0.latent("z", lambda: Normal(0.0, 1.0), plate="data")
    with pytest.raises(tg.TMCGraphError, match="plate 'data' is not declared subsample-able"):
        tg.TMC(m0, q0, K=2).log_evidence({"x": x[:2], "data_index": torch.tensor([0, 1])})
    with pytest.raises(tg.TMCGraphError, match="subsample=True"):
        tg.TMC(m0, q0, K=2).log_evidence({"x": x[:2]})  # a fixed-size plate given a minibatch
    with pytest.raises(tg.TMCGraphError, match="needs the full size"):
        tg.Model().plate("data", subsample=True)
    m2 = tg.Model()
    m2.observed("data_index", lambda: Normal(0.0, 1.0))
    with pytest.raises(tg.TMCGraphError, match="'data_index' is already declared"):
        m2.plate("data", size=3, subsample=True)


def test_posterior_marginals_of_a_subsampled_plate_equal_the_replicated_graphs(f64):
    """Integer scale r: the scaled graph's marginals (global and local) equal those of the graph with the
    batch repeated r times (local dims independent per copy), computed by brute force."""
    from tmcgraph.ops.oracle import enumerate_log_weights

    N, B, K = 4, 2, 3
    m, q = toy(N)
    x = torch.tensor([0.4, -1.2, 2.0, 0.7], dtype=torch.float64)
    batch = subsample(m, {"x": x}, {"data": torch.tensor([1, 3])})
    est = tg.TMC(m, q, K=K)
    s = est.sample(batch, seed=5)
    post = tg.posterior(est, samples=s)
    fs = tile(unscaled_graph(est, s), "data", N // B)
    variables, combos, logw = enumerate_log_weights(fs, {"theta": (), "z": ("data",)})
    w = torch.softmax(logw, 0)
    assert float(post.log_evidence) == pytest.approx(float(torch.logsumexp(logw, 0)), rel=1e-10)
    th = [i for i, (d, _) in enumerate(variables) if d == "theta"][0]
    exact_theta = torch.zeros(K, dtype=torch.float64).index_add_(0, combos[:, th], w)
    assert torch.allclose(post.marginal("theta"), exact_theta, atol=1e-10)
    # local: element e of the batch is copy 1 of it in the replicated graph
    for e in range(B):
        ze = [i for i, (d, el) in enumerate(variables) if d == "z" and el == {"data": e}][0]
        exact_z = torch.zeros(K, dtype=torch.float64).index_add_(0, combos[:, ze], w)
        assert torch.allclose(post.marginal("z")[:, e], exact_z, atol=1e-10)
