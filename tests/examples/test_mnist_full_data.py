"""The full-data training bound of examples/mnist_chain.py (``--full-data-bound``, a subsampled data plate).

Truths: the per-image model of the same networks (its per-image estimates on the same
particles, summed and scaled by N / B by hand); the identity train_full_data = N *
train_objective when every step has the same batch size (the N / B scaling of a
per-image mean); a plain per-image training loop written from the definition; and the
weights of a run without the flag (training must be unchanged).
"""

import gzip
import hashlib
import importlib.util
import struct

import numpy as np
import pytest
import torch
from conftest import ROOT

import tmcgraph as tg
from tmcgraph.data import mnist as mnist_data
from tmcgraph.infer.objectives import objective
from tmcgraph.infer.subsample import subsample
from tmcgraph.models import mnist_vae

NAMES = list(mnist_data.FILES.values())
SEED, K = 2, 2


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("mnist_chain_full_data", ROOT / "examples" / "mnist_chain.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    """Synthetic IDX files (64 training, 16 test images) with the checksum table patched."""
    rng = np.random.default_rng(1)
    d = tmp_path / "mnist"
    d.mkdir()
    arrays = {NAMES[0]: rng.integers(0, 256, (64, 28, 28)), NAMES[1]: rng.integers(0, 10, 64),
              NAMES[2]: rng.integers(0, 256, (16, 28, 28)), NAMES[3]: rng.integers(0, 10, 16)}
    sums = {}
    for name, a in arrays.items():
        a = a.astype(np.uint8)
        raw = bytes([0, 0, 8, a.ndim]) + struct.pack(f">{a.ndim}I", *a.shape) + a.tobytes()
        (d / name).write_bytes(gzip.compress(raw))
        sums[name] = mnist_data.Digest(len(raw), hashlib.md5(raw).hexdigest())
    monkeypatch.setattr(mnist_data, "CHECKSUMS", sums)
    return d


def argv(d, out, *extra):
    return ["--data", str(d), "--out", str(out), "--K", str(K), "--seed", str(SEED), "--limit-test", "16",
            "--eval-batch-size", "8", "--threads", "1", "--no-progress", "--no-download", "--no-plots",
            "--allocator", "default", *extra]


def weights(out, example):
    from tmcgraph.contrib import checkpoint

    return checkpoint.load(out / "checkpoint.pt", example.KIND)["state"]


# ------------------------------------------------------------------------------------------ the model


def test_build_declares_a_subsampled_data_plate_and_keeps_the_default():
    torch.manual_seed(0)
    plain, _ = mnist_vae.build("small")
    torch.manual_seed(0)
    m, q = mnist_vae.build("small", size=60, subsample=True)
    assert plain.plates["data"] == tg.Plate("data", None)
    assert m.plates["data"] == tg.Plate("data", 60, True, "data_index")
    assert m.observed_names == ["data_index", "x"] and plain.observed_names == ["x"]
    for k, v in plain.state_dict().items():  # same networks, same initial weights, same keys
        assert torch.equal(m.state_dict()[k], v)
    with pytest.raises(tg.TMCGraphError, match="subsample=True needs size=N.*'data' plate"):
        mnist_vae.build("small", subsample=True)
    pm, pq = mnist_vae.with_data_plate(m, q)
    assert pm.plates["data"] == tg.Plate("data", None) and pm.observed_names == ["x"]
    assert pm["x"].fn is m["x"].fn and pq["z3"].fn is q["z3"].fn and pq["z3"].coupling == q["z3"].coupling
    assert [id(p) for p in pm.parameters()] == [id(p) for p in m.parameters()]


@pytest.mark.parametrize("cls", [tg.TMC, tg.IWAE])
def test_subsampled_estimate_is_n_over_b_times_the_per_image_sum(f64, cls):
    torch.manual_seed(0)
    m, q = mnist_vae.build("factorised", size=50, subsample=True)
    pm, pq = mnist_vae.with_data_plate(m, q)
    m.double()
    q.double()
    x = torch.rand(4, 784, dtype=torch.float64)
    idx = torch.tensor([7, 0, 49, 3])
    scaled = objective(cls(m, q, K=3), subsample(m, {"x": x}, {"data": idx}, sliced=True), "reparam", seed=4)
    per_image = objective(cls(pm, pq, K=3), {"x": x}, "reparam", seed=4).value.detach()
    assert scaled.value.dim() == 0 and per_image.shape == (4,)
    assert float(scaled.value.detach()) == pytest.approx(50 / 4 * float(per_image.sum()), rel=1e-12)


# ---------------------------------------------------------------------------------- shards and scaling


def test_shard_figures_add_up_to_the_batch_figure(example):
    """Each shard is scaled by its own N / B_s; weighted by B_s / B, the shards give (N / B) * (batch sum)."""
    N, shards = 40, 3
    torch.manual_seed(0)
    m, q = mnist_vae.build("small", size=N, subsample=True)
    pm, pq = mnist_vae.with_data_plate(m, q)
    xs = torch.rand(N, 784, generator=torch.Generator().manual_seed(1))
    ib = torch.randperm(N, generator=torch.Generator().manual_seed(2))[:10]
    parts = example.shards_of(ib, shards)
    assert [len(p) for p in parts] == [4, 3, 3]
    est = tg.TMC(m, q, K=K)
    step = example.TrainStep(m, q, est, "reparam", N)

    def pieces(mine):
        return [(subsample(m, {"x": xs[parts[s]]}, {"data": parts[s]}, sliced=True), 100 + s, len(parts[s]) / 10)
                for s in mine]

    # the truth: per-image estimates of the per-image model with each shard's particle seed
    plain = tg.TMC(pm, pq, K=K)
    values = [objective(plain, {"x": xs[parts[s]]}, "reparam", seed=100 + s).value for s in range(shards)]
    batch_sum = float(torch.cat(values).detach().sum())
    for s in range(shards):  # every shard alone: its figure uses its own B_s
        _, total, full = step(pieces([s]))
        weight = len(parts[s]) / 10
        assert float(full) / weight == pytest.approx(N / len(parts[s]) * float(values[s].detach().sum()), rel=1e-5)
        assert float(total) == pytest.approx(float(values[s].detach().sum()), rel=1e-5)
    # all shards in one process, and split over two processes as --distributed does (s mod 2 == rank)
    loss, total, full = step(pieces(range(shards)))
    split = [step(pieces([s for s in range(shards) if s % 2 == r])) for r in (0, 1)]
    for t, f in [(float(total), float(full)), (sum(float(o[1]) for o in split), sum(float(o[2]) for o in split))]:
        assert t == pytest.approx(batch_sum, rel=1e-5)
        assert f == pytest.approx(N / 10 * batch_sum, rel=1e-5)
    # the optimised loss is the per-image mean over the batch, with its gradients
    mean_loss = -torch.cat(values).mean()
    assert float(loss.detach()) == pytest.approx(float(mean_loss.detach()), rel=1e-5)
    params = list(m.parameters()) + list(q.parameters())
    for g, h in zip(torch.autograd.grad(loss, params), torch.autograd.grad(mean_loss, params), strict=True):
        torch.testing.assert_close(g, h, atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------------------- the example


def reference(ex, d, batch, epochs, shards):
    """Plain per-image training loop from the definition; per epoch the mean per image and the mean step figure."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model, proposal = mnist_vae.build("small", ex.COUPLING)
    est = tg.TMC(model, proposal, K=K)
    opt = torch.optim.Adam(list(model.parameters()) + list(proposal.parameters()), lr=1e-3)
    shuffle = torch.Generator().manual_seed(SEED + 1)
    xs = mnist_data.load_mnist(d, download=False).train_x
    N, out = len(xs), []
    for epoch in range(1, epochs + 1):
        images, total, figures = 0, 0.0, []
        for step, ib in enumerate(mnist_data.batches(N, batch, shuffle=True, generator=shuffle)):
            values = torch.cat([objective(est, {"x": xs[ib[s::shards]]}, "reparam",
                                          seed=ex.particle_seed(SEED, epoch, step, s)).value for s in range(shards)])
            opt.zero_grad()
            (-values.mean()).backward()
            opt.step()
            images += len(ib)
            total += float(values.detach().sum())
            figures.append(N / len(ib) * float(values.detach().sum()))
        out.append((total / images, sum(figures) / len(figures)))
    return out


@pytest.mark.parametrize("batch,shards", [(16, 1), (16, 3), (24, 2)])
def test_recorded_full_data_bound(tiny, tmp_path, example, capsys, batch, shards):
    s = example.main(argv(tiny, tmp_path / "run", "--batch-size", str(batch), "--shards", str(shards),
                          "--epochs", "2"))
    N = 64
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch ")]
    for r, line in zip(s["metrics"], printed, strict=True):
        assert f"({r['train_full_data']:.1f} nats for all {N} training images)" in line
        if N % batch == 0:  # equal batches: the mean of (N / B) * (batch sum) is N times the mean per image
            assert r["train_full_data"] == pytest.approx(N * r["train_objective"], rel=1e-6)
        else:  # 24, 24, 16: each step scaled by its own batch size, so the identity does not hold
            assert r["train_full_data"] != pytest.approx(N * r["train_objective"], rel=1e-6)
    for r, (per_image, figure) in zip(s["metrics"], reference(example, tiny, batch, 2, shards), strict=True):
        assert r["train_objective"] == pytest.approx(per_image, rel=1e-5)
        assert r["train_full_data"] == pytest.approx(figure, rel=1e-5)
    header = (tmp_path / "run" / "metrics.csv").read_text().splitlines()[0]
    assert header.split(",")[:3] == ["epoch", "train_objective", "train_full_data"]


@pytest.mark.parametrize("grad,shards", [("reparam", 1), ("stl", 2), ("reparam", 4), ("dregs", 2)])
def test_training_is_unchanged_by_the_flag(tiny, tmp_path, example, grad, shards):
    """Same seeds, flag on and off: the same weights after 4 steps.

    N = 64 and the shard sizes 16 / S are powers of two, so the N / B_s scaling and the
    division by N are exact in floating point and the two runs agree to the last bit
    (other sizes round the loss once, about 1e-7 relative; see
    ``test_shard_figures_add_up_to_the_batch_figure`` for their gradients).
    """
    runs = {}
    for flag in ("--full-data-bound", "--no-full-data-bound"):
        out = tmp_path / flag
        runs[flag] = example.main(argv(tiny, out, "--batch-size", "16", "--shards", str(shards), "--grad", grad,
                                       "--epochs", "1", flag))
        runs[flag]["state"] = weights(out, example)
    on, off = runs["--full-data-bound"], runs["--no-full-data-bound"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        init = mnist_vae.build("small")[0].state_dict()
    assert any(not torch.allclose(init[k], v) for k, v in on["state"]["model"].items())  # the weights did move
    for part in ("model", "proposal"):
        for k, v in off["state"][part].items():
            assert torch.equal(on["state"][part][k], v), f"{part}.{k}"  # hence also within 1e-6
    a, b = on["metrics"][0], off["metrics"][0]
    assert "train_full_data" not in b and a["train_full_data"] == pytest.approx(64 * a["train_objective"], rel=1e-6)
    assert a["train_objective"] == pytest.approx(b["train_objective"], rel=1e-6)
    assert a["test_tmc"] == pytest.approx(b["test_tmc"], abs=1e-4)  # evaluation per image in both
