"""The five-layer MNIST model, the training example and both MNIST benchmarks, end to end.

The example and benchmarks run on a tiny synthetic MNIST written by the test (so they
run without the real files), with checksums patched to match.
"""

import gzip
import hashlib
import importlib.util
import json
import math
import os

import numpy as np
import pytest
import torch
from conftest import ROOT
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributions import Independent, Normal

import tmcgraph as tg
from tmcgraph.data import mnist as mnist_data
from tmcgraph.infer.objectives import bound
from tmcgraph.models import mnist_vae


def load(path, name):
    spec = importlib.util.spec_from_file_location(name, ROOT / path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _idx(a):
    import struct

    return bytes([0, 0, 8, a.ndim]) + struct.pack(f">{a.ndim}I", *a.shape) + a.tobytes()


@pytest.fixture
def tiny_mnist(tmp_path, monkeypatch):
    """300 training and 100 test images (blurred strokes, grey levels), checksums patched."""
    rng = np.random.default_rng(0)
    d = tmp_path / "mnist"
    d.mkdir()
    sums = {}

    def images(n):
        a = np.zeros((n, 28, 28))
        for i in range(n):
            r = rng.integers(4, 24)
            a[i, r - 2 : r + 2, 4:24] = 1.0
            a[i, 4:24, rng.integers(4, 24)] = rng.uniform(0.3, 1.0)
        return (a * 255).astype(np.uint8)

    arrays = {"train-images-idx3-ubyte.gz": images(300), "train-labels-idx1-ubyte.gz": rng.integers(0, 10, 300),
              "t10k-images-idx3-ubyte.gz": images(100), "t10k-labels-idx1-ubyte.gz": rng.integers(0, 10, 100)}
    for name, a in arrays.items():
        raw = _idx(a.astype(np.uint8))
        with gzip.open(d / name, "wb") as f:
            f.write(raw)
        sums[name] = (hashlib.md5(raw).hexdigest(), len(raw))
    monkeypatch.setattr(mnist_data, "CHECKSUMS", sums)
    return d


# ---------------------------------------------------------------------------------------- the model


@settings(max_examples=30, deadline=None)
@given(
    kv=st.integers(1, 4), kp=st.integers(1, 4), b=st.integers(1, 3), f=st.integers(1, 6),
    seed=st.integers(0, 1000), spread=st.floats(0.05, 3.0),
)
def test_diag_normal_grid_log_density_equals_independent_normal(kv, kp, b, f, seed, spread):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(kv, 1, b, f, generator=g, dtype=torch.float64) * 2
    loc = torch.randn(1, kp, b, f, generator=g, dtype=torch.float64) * 2
    scale = torch.rand(1, kp, b, f, generator=g, dtype=torch.float64) * spread + 0.01
    got = mnist_vae.DiagNormal(loc, scale).log_prob(v)
    want = Independent(Normal(loc, scale), 1).log_prob(v)
    assert got.shape == want.shape
    assert torch.allclose(got, want, rtol=1e-9, atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(
    pattern=st.lists(st.sampled_from(["both", "value", "loc", "none"]), min_size=1, max_size=4),
    sizes=st.lists(st.integers(2, 4), min_size=4, max_size=4), f=st.integers(1, 5),
    extra=st.integers(0, 1), seed=st.integers(0, 1000),
)
def test_diag_normal_grid_any_broadcast_pattern_values_and_gradients(pattern, sizes, f, extra, seed):
    """Every mix of shared, value-only, parameter-only and trivial batch dims (and a value
    with fewer dims) matches ``Independent(Normal)`` in value and in all three gradients."""
    g = torch.Generator().manual_seed(seed)
    vs = [sizes[i] if p in ("both", "value") else 1 for i, p in enumerate(pattern)]
    ls = [sizes[i] if p in ("both", "loc") else 1 for i, p in enumerate(pattern)]
    ls = [2] * extra + ls  # loc may have extra leading dims the value lacks
    v = (torch.randn(*vs, f, generator=g, dtype=torch.float64) * 2).requires_grad_()
    loc = (torch.randn(*ls, f, generator=g, dtype=torch.float64) * 2).requires_grad_()
    scale = (torch.rand(*ls, f, generator=g, dtype=torch.float64) + 0.05).requires_grad_()
    w = torch.randn(torch.broadcast_shapes(v.shape[:-1], loc.shape[:-1]), generator=g, dtype=torch.float64)
    got = mnist_vae.DiagNormal(loc, scale).log_prob(v)
    want = Independent(Normal(loc, scale), 1).log_prob(v)
    assert got.shape == want.shape
    assert torch.allclose(got, want, rtol=1e-9, atol=1e-8)
    g1 = torch.autograd.grad((got * w).sum(), (v, loc, scale))
    g2 = torch.autograd.grad((want * w).sum(), (v, loc, scale))
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-8)


def test_diag_normal_samples_and_expand():
    d = mnist_vae.DiagNormal(torch.zeros(3, 2), torch.full((3, 2), 2.0))
    assert d.batch_shape == (3,) and d.event_shape == (2,)
    z = d.expand((5, 3)).rsample()
    assert z.shape == (5, 3, 2)
    big = mnist_vae.DiagNormal(torch.tensor([1.0]), torch.tensor([2.0])).rsample((20000,))
    assert abs(float(big.mean()) - 1.0) < 4 * 2 / math.sqrt(20000)
    assert abs(float(big.std()) - 2.0) < 0.05


def test_architecture_matches_the_paper():
    m, q = mnist_vae.build("small")
    assert m.latents == ["z5", "z4", "z3", "z2", "z1"]
    assert [m[n].parents for n in ("z4", "z3", "z2", "z1", "x")] == [("z5",), ("z4",), ("z3",), ("z2",), ("z1",)]
    # generative MLP widths: twice the parent layer (8, 16, 32, 64, 128)
    widths = [m.fns[n].mlp[0].v.shape for n in ("z4", "z3", "z2", "z1", "x")]
    assert widths == [(8, 4), (16, 8), (32, 16), (64, 32), (128, 64)]
    assert m.fns["x"].logits.v.shape == (784, 128)
    assert [q[n].parents for n in ("z1", "z2", "z3", "z4", "z5")] == [("x",), ("z1",), ("z2",), ("z3",), ("z4",)]
    assert all(q[n].coupling is None for n in q.variables)  # the engine default (permutation)
    assert [q.fns[n].mlp[0].v.shape[0] for n in ("z1", "z2", "z3", "z4", "z5")] == [128, 64, 32, 16, 8]
    _, ql = mnist_vae.build("large", coupling="paired")
    assert [ql.fns[n].mlp[0].v.shape[0] for n in ("z1", "z2", "z3", "z4", "z5")] == [512, 256, 128, 64, 32]
    assert all(ql[n].coupling == "paired" for n in ql.variables)
    _, qf = mnist_vae.build("factorised")
    assert all(qf[n].parents == ("x",) for n in qf.variables)
    with pytest.raises(tg.TMCGraphError, match="recognition must be one of"):
        mnist_vae.build("medium")


def test_weight_norm_and_std_floor():
    lin = mnist_vae.WNLinear(5, 3)
    with torch.no_grad():
        lin.g.mul_(2.0)
    w = lin.v * (lin.g / lin.v.norm(dim=1))[:, None]
    assert torch.allclose(w.norm(dim=1), lin.g)
    x = torch.randn(4, 5)
    assert torch.allclose(lin(x), x @ w.T + lin.bias)
    assert float(mnist_vae.std_nonlin(torch.tensor(-50.0))) == pytest.approx(0.01)


def test_bernoulli_grey_level_targets():
    m, _ = mnist_vae.build("small")
    z1 = torch.randn(2, 64)
    x = torch.rand(2, 784)
    d = m["x"].dist({"z1": z1})
    p = torch.sigmoid(d.base_dist.logits)
    want = (x * p.log() + (1 - x) * (1 - p).log()).sum(-1)
    assert torch.allclose(d.log_prob(x), want, atol=1e-3)


@pytest.mark.parametrize("recognition,coupling", [("small", "mixture"), ("small", "paired"), ("factorised", "mixture")])
def test_deep_model_tmc_and_iwae_equal_enumeration(f64, recognition, coupling):
    """TMC over all K^5 combinations and IWAE over K joint samples, per image, by enumeration."""
    torch.manual_seed(0)
    m, q = mnist_vae.build(recognition, coupling)
    m.double()
    q.double()
    x = torch.rand(2, 784, dtype=torch.float64)
    est = tg.TMC(m, q, K=2)
    s = est.sample({"x": x}, seed=1)
    oracle = tg.brute_force(est.factor_graph(s).with_keep("data"))
    assert torch.allclose(bound(est, {"x": x}, seed=1), oracle, rtol=1e-9)
    iw = tg.IWAE(m, q, K=3)
    s = iw.sample({"x": x}, seed=2)
    logw = 0
    for n in ["z5", "z4", "z3", "z2", "z1"]:  # log P(z | parent) - log Q(z | its parent), joint samples
        pa = {p: (s.values[p] if p in s.values else x) for p in m[n].parents}
        qa = {p: (s.values[p] if p in s.values else x) for p in q[n].parents}
        logw = logw + m[n].dist(pa).log_prob(s.values[n]) - q[n].dist(qa).log_prob(s.values[n])
    logw = logw + m["x"].dist({"z1": s.values["z1"]}).log_prob(x)
    assert torch.allclose(bound(iw, {"x": x}, seed=2), torch.logsumexp(logw, 0) - math.log(3), rtol=1e-9)


# -------------------------------------------------------------------------------------- the example


@pytest.fixture(scope="module")
def example():
    return load("examples/mnist_chain.py", "mnist_chain_example")


def args(d, out, *extra):
    return ["--data", str(d), "--out", str(out), "--limit-train", "200", "--limit-test", "50", "--K", "3",
            "--batch-size", "64", "--no-progress", "--no-download", "--threads", "1", *extra]


@pytest.mark.parametrize("objective,grad,recognition", [("tmc", "reparam", "small"), ("iwae", "dregs", "factorised"),
                                                        ("tmc", "stl", "large")])
def test_example_trains_and_writes_everything(tiny_mnist, tmp_path, example, objective, grad, recognition):
    out = tmp_path / "run"
    extra = ["--objective", objective, "--grad", grad, "--recognition", recognition, "--epochs", "1"]
    if objective == "tmc":
        extra += ["--final-k", "10", "--final-images", "5", "--binarize"]
    summary = example.main(args(tiny_mnist, out, *extra))
    names = {p.name for p in out.iterdir()}
    assert {"metrics.jsonl", "metrics.csv", "checkpoint.pt", "config.json", "learning_curves.png",
            "reconstructions.png"} <= names
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows == summary["metrics"]
    r = rows[0]
    assert all(math.isfinite(r[k]) for k in ("train_objective", "test_iwae", "test_tmc"))
    assert r["test_tmc"] < 0 and r["steps"] == 4
    if objective == "tmc":
        assert summary["final"]["images"] == 5 and math.isfinite(summary["final"]["iwae_log_px"])


def test_resume_continues_exactly(tiny_mnist, tmp_path, example):
    straight = example.main(args(tiny_mnist, tmp_path / "a", "--epochs", "2", "--no-plots"))
    example.main(args(tiny_mnist, tmp_path / "b", "--epochs", "1", "--no-plots"))
    resumed = example.main(args(tiny_mnist, tmp_path / "b", "--epochs", "2", "--no-plots", "--resume"))
    for ra, rb in zip(straight["metrics"], resumed["metrics"], strict=True):
        assert {k: v for k, v in ra.items() if k != "train_seconds"} == \
               {k: v for k, v in rb.items() if k != "train_seconds"}
    ca = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)["state"]
    cb = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["state"]
    for k in ca["model"]:
        assert torch.equal(ca["model"][k], cb["model"][k])
    for k in ca["proposal"]:
        assert torch.equal(ca["proposal"][k], cb["proposal"][k])


def test_bad_input_is_a_clear_error_and_overwrites_nothing(tiny_mnist, tmp_path, example):
    out = tmp_path / "run"
    example.main(args(tiny_mnist, out, "--epochs", "1", "--no-plots"))
    ckpt = out / "checkpoint.pt"
    before = (ckpt.read_bytes(), (out / "metrics.jsonl").read_text(), (out / "config.json").read_text())
    with pytest.raises(tg.TMCGraphError, match="exists; pass --resume"):
        example.main(args(tiny_mnist, out, "--epochs", "2"))
    with pytest.raises(tg.TMCGraphError, match="different configuration.*objective: checkpoint 'tmc' vs requested"):
        example.main(args(tiny_mnist, out, "--epochs", "2", "--resume", "--objective", "iwae"))
    with pytest.raises(tg.TMCGraphError, match="K: checkpoint 3 vs requested 4"):
        example.main(args(tiny_mnist, out, "--epochs", "2", "--resume", "--K", "4"))
    assert before == (ckpt.read_bytes(), (out / "metrics.jsonl").read_text(), (out / "config.json").read_text())
    with pytest.raises(tg.TMCGraphError, match="no checkpoint"):
        example.main(args(tiny_mnist, tmp_path / "fresh", "--resume"))
    with pytest.raises(tg.TMCGraphError) as e:
        example.main(args(tmp_path / "no_such_dir", tmp_path / "x"))
    assert "no_such_dir" in str(e.value) and "train-images-idx3-ubyte.gz" in str(e.value)
    assert not (tmp_path / "x").exists()
    with pytest.raises(tg.TMCGraphError, match="--K must be a positive integer"):
        example.main(args(tiny_mnist, tmp_path / "y", "--K", "0"))
    with pytest.raises(SystemExit) as e:
        example.main(args(tiny_mnist, tmp_path / "y", "--grad", "dreg"))
    assert e.value.code == 2
    # a corrupt data file: checksum error naming the file; nothing replaced
    victim = tiny_mnist / "t10k-labels-idx1-ubyte.gz"
    victim.write_bytes(gzip.compress(b"\0\0\x08\x01\0\0\0\x01\x05"))
    data = victim.read_bytes()
    assert example.cli(args(tiny_mnist, tmp_path / "z")) == 2
    assert victim.read_bytes() == data
    with pytest.raises(tg.TMCGraphError, match="t10k-labels-idx1-ubyte.gz.*corrupt"):
        example.main(args(tiny_mnist, tmp_path / "z"))


# ------------------------------------------------------------------------------------- benchmarks


def test_epoch_time_benchmark_quick(tiny_mnist, tmp_path):
    bench = load("benchmarks/mnist_epoch_time.py", "mnist_epoch_time_bench")
    payload = bench.main(["--quick", "--data", str(tiny_mnist), "--out", str(tmp_path)])
    assert (tmp_path / "mnist_epoch_time_quick.json").exists() and (tmp_path / "mnist_epoch_time_quick.png").exists()
    rows = payload["contenders"]
    assert set(rows) == {f"small/{o}-{g}" for o in ("iwae", "tmc") for g in ("reparam", "stl", "dregs")} | {
        "small/tmc-reparam-paired"}
    assert all(r["step_seconds"]["median"] > 0 and math.isfinite(r["last_objective"]) for r in rows.values())
    assert payload["threads"]["torch_threads"] == 1
    two = bench.main(["--quick", "--data", str(tiny_mnist), "--out", str(tmp_path), "--recognition",
                      "factorised,large", "--repeats", "1"])
    rows = two["contenders"]
    assert "factorised/tmc-reparam-paired" not in rows and "large/tmc-reparam-paired" in rows
    f6 = two["fig6"]["epoch_seconds_mean_over_recognition_models"]
    assert f6["tmc/stl"] == pytest.approx((rows["factorised/tmc-stl"]["epoch_seconds_extrapolated"]
                                           + rows["large/tmc-stl"]["epoch_seconds_extrapolated"]) / 2)
    assert set(two["tmc_over_iwae_step_ratio"]) == {f"{r}/{g}" for r in ("factorised", "large")
                                                   for g in ("reparam", "stl", "dregs")}
    with pytest.raises(tg.TMCGraphError, match="--recognition.*medium"):
        bench.main(["--quick", "--data", str(tiny_mnist), "--out", str(tmp_path), "--recognition", "small,medium"])


def test_tmc_vs_iwae_benchmark_quick(tiny_mnist, tmp_path):
    bench = load("benchmarks/mnist_tmc_vs_iwae.py", "mnist_tmc_vs_iwae_bench")
    payload = bench.main(["--quick", "--data", str(tiny_mnist), "--out", str(tmp_path), "--limit-train", "128",
                          "--limit-test", "50", "--runs", str(tmp_path / "runs")])
    saved = json.loads((tmp_path / "mnist_tmc_vs_iwae_quick.json").read_text())
    assert saved["budget"]["epochs"] == 1 and saved["budget"]["train_images"] == 128
    f = saved["final"]
    assert all(math.isfinite(f[m][b]) for m in ("iwae_trained", "tmc_trained") for b in ("iwae_bound", "tmc_bound"))
    assert (tmp_path / "mnist_tmc_vs_iwae_quick.png").exists()
    assert payload["per_epoch"][0]["epoch"] == 1
    assert os.path.exists(tmp_path / "runs" / "tmc" / "checkpoint.pt")


def test_couplings_benchmark_quick(tiny_mnist, tmp_path):
    bench = load("benchmarks/couplings_mnist.py", "couplings_mnist_bench")
    payload = bench.main(["--quick", "--data", str(tiny_mnist), "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "couplings_mnist_quick.json").read_text())
    assert set(saved["budget"]["couplings"]) == set(saved["step_time"]) == {"mixture", "permutation", "paired"}
    assert saved["verdict"]["best_at_equal_steps"] in {"mixture", "permutation", "paired"}
    assert (tmp_path / "couplings_mnist_quick.png").exists()
    assert payload is not None
