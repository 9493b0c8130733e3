"""examples/mnist_chain.py and benchmarks/mnist_tmc_vs_iwae.py: checkpoints that are safe to read, clear errors,
Fashion-MNIST by name, and the pictures (samples from the generative model and reconstructions)."""

import gzip
import hashlib
import importlib.util
import json
import math
import os
import pickle
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT

from tmcgraph.contrib import checkpoint
from tmcgraph.data import mnist as mnist_data
from tmcgraph.models import mnist_vae

NAMES = list(mnist_data.FILES.values())


def load(path, name):
    spec = importlib.util.spec_from_file_location(name, ROOT / path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def example():
    return load("examples/mnist_chain.py", "mnist_chain_safety")


def write_idx_set(d, n_train=96, n_test=40, seed=0):
    """Four tiny IDX files of stroke images; returns ``(content digests, .gz digests)``."""
    rng = np.random.default_rng(seed)

    def images(n):
        a = np.zeros((n, 28, 28))
        for i in range(n):
            r = rng.integers(4, 24)
            a[i, r - 2 : r + 2, 4:24] = 1.0
        return (a * 255).astype(np.uint8)

    arrays = {NAMES[0]: images(n_train), NAMES[1]: rng.integers(0, 10, n_train).astype(np.uint8),
              NAMES[2]: images(n_test), NAMES[3]: rng.integers(0, 10, n_test).astype(np.uint8)}
    d.mkdir(parents=True)
    content, gz = {}, {}
    for name, a in arrays.items():
        raw = bytes([0, 0, 8, a.ndim]) + struct.pack(f">{a.ndim}I", *a.shape) + a.tobytes()
        (d / name).write_bytes(gzip.compress(raw))
        content[name] = mnist_data.Digest(len(raw), hashlib.md5(raw).hexdigest())
        gz[name] = mnist_data.Digest(len(raw), None, hashlib.md5((d / name).read_bytes()).hexdigest())
    return content, gz


@pytest.fixture
def data(tmp_path, monkeypatch):
    d = tmp_path / "mnist"
    content, _ = write_idx_set(d)
    monkeypatch.setattr(mnist_data, "CHECKSUMS", content)
    return d


def args(d, out, *extra):
    return ["--data", str(d), "--out", str(out), "--limit-test", "20", "--K", "2", "--batch-size", "32",
            "--no-progress", "--no-download", "--threads", "1", "--no-plots", *extra]


@pytest.fixture
def trained(data, tmp_path, example):
    """One epoch written to ``tmp_path/run``."""
    out = tmp_path / "run"
    example.main(args(data, out, "--epochs", "1"))
    return data, out


class Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def bad_checkpoints(tmp_path, good: bytes, config: dict):
    """Name -> bytes of checkpoints that must be refused."""
    marker = tmp_path / "MARKER"
    zipped = tmp_path / "zipped.pt"
    torch.save({"format": checkpoint.FORMAT, "version": checkpoint.VERSION, "kind": "examples/mnist_chain",
                "config": config, "state": {"model": Payload(marker)}}, zipped)
    other_model = tmp_path / "other.pt"  # right kind and configuration, weights of another recognition model
    m, q = mnist_vae.build("large")
    checkpoint.save(other_model, {"model": m.state_dict(), "proposal": q.state_dict(), "optimizer": {},
                                  "shuffle_rng": torch.Generator().get_state(), "metrics": [], "epoch": 1},
                    "examples/mnist_chain", config)
    plain = tmp_path / "plain.pt"
    torch.save({"model": m.state_dict()}, plain)
    other_kind = tmp_path / "kind.pt"
    checkpoint.save(other_kind, {}, "benchmarks/something_else", config)
    return marker, {
        "truncated": (good[: len(good) // 2], "truncated"),
        "truncated at the end": (good[:-10], "truncated"),
        "empty": (b"", "empty"),
        "raw pickle": (pickle.dumps({"config": config, "state": Payload(marker)}), "not a zip archive"),
        "zip pickle": (zipped.read_bytes(), "objects other than tensors and plain data"),
        "other model": (other_model.read_bytes(), "does not fit this model"),
        "plain torch file": (plain.read_bytes(), "no format marker"),
        "other program": (other_kind.read_bytes(), "written by 'benchmarks/something_else'"),
    }


def test_bad_checkpoints_are_one_error_line_exit_2_and_never_run_or_overwritten(trained, tmp_path, example, capsys):
    d, out = trained
    ckpt = out / "checkpoint.pt"
    good = ckpt.read_bytes()
    config = checkpoint.load(ckpt, example.KIND)["config"]
    marker, bad = bad_checkpoints(tmp_path, good, config)
    for name, (blob, expected) in bad.items():
        ckpt.write_bytes(blob)
        capsys.readouterr()
        assert example.cli(args(d, out, "--epochs", "2", "--resume")) == 2, name
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("mnist_chain.py: error: checkpoint "), (name, err)
        assert str(ckpt) in err and expected in err, (name, err)
        assert "Traceback" not in err
        assert ckpt.read_bytes() == blob, name  # the bad file is left as it was
        assert not marker.exists(), name
        assert [json.loads(r)["epoch"] for r in (out / "metrics.jsonl").read_text().splitlines()] == [1]
    ckpt.write_bytes(good)  # the good checkpoint still resumes
    summary = example.main(args(d, out, "--epochs", "2", "--resume"))
    assert [r["epoch"] for r in summary["metrics"]] == [1, 2]


def test_script_entry_point_exits_2_without_traceback(tmp_path):
    """The real command line: a foreign checkpoint is refused before the data is even read."""
    out = tmp_path / "run"
    out.mkdir()
    marker = tmp_path / "MARKER"
    torch.save({"x": Payload(marker)}, out / "checkpoint.pt")
    blob = (out / "checkpoint.pt").read_bytes()
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "mnist_chain.py"), "--out", str(out), "--resume",
                        "--data", str(tmp_path / "nowhere"), "--no-download", "--no-progress"],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("mnist_chain.py: error: checkpoint") and "Traceback" not in r.stderr
    assert not marker.exists()
    assert (out / "checkpoint.pt").read_bytes() == blob


@pytest.mark.parametrize("change,setting,old,new", [
    (["--limit-test", "10"], "--limit-test", "20", "10"),
    (["--eval-K", "5"], "--eval-K", "2", "5"),
    (["--eval-batch-size", "7"], "--eval-batch-size", "500", "7"),
    (["--shards", "2"], "--shards", "1", "2"),
    (["--limit-train", "50"], "--limit-train", "None", "50"),
    (["--dataset", "fashion-mnist"], "--dataset", "'mnist'", "'fashion-mnist'"),
])
def test_resume_refuses_changed_settings_naming_both_values(trained, example, capsys, change, setting, old, new):
    d, out = trained
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert example.cli(args(d, out, "--epochs", "2", "--resume", *change)) == 2
    err = capsys.readouterr().err
    assert f"different configuration ({setting}: checkpoint {old} vs requested {new})" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_checkpoint_holds_plain_data_and_is_written_atomically(trained, example, monkeypatch):
    d, out = trained
    ckpt = checkpoint.load(out / "checkpoint.pt", example.KIND)  # weights_only=True inside
    assert ckpt["config"] == checkpoint.plain(ckpt["config"])  # plain data round-trips unchanged
    assert ckpt["config"]["eval_K"] == 2 and ckpt["config"]["limit_test"] == 20
    before = (out / "checkpoint.pt").read_bytes()
    real = torch.save

    def dies(obj, f, *a, **k):  # the process dies while writing the epoch-2 checkpoint
        real(obj, f, *a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies)
    with pytest.raises(KeyboardInterrupt):
        example.main(args(d, out, "--epochs", "2", "--resume"))
    monkeypatch.undo()
    assert (out / "checkpoint.pt").read_bytes() == before
    assert sorted(p.name for p in out.iterdir() if ".tmp" in p.name) == []


def test_main_leaves_torch_global_rng_alone(data, tmp_path, example):
    state = torch.get_rng_state()
    example.main(args(data, tmp_path / "r", "--epochs", "1"))
    assert torch.equal(torch.get_rng_state(), state)


def test_fashion_mnist_by_name(tmp_path, monkeypatch, example):
    root = tmp_path / "data"
    _, gz = write_idx_set(root / "fashion-mnist", seed=3)
    monkeypatch.setattr(mnist_data, "FASHION_MNIST_CHECKSUMS", gz)
    s = example.main(args(root, tmp_path / "f", "--epochs", "1", "--dataset", "fashion-mnist"))
    assert s["config"]["dataset"] == "fashion-mnist" and math.isfinite(s["metrics"][0]["test_tmc"])
    a = example.parse_args(["--dataset", "fashion-mnist"])
    assert a.out == "runs/fashion-mnist_tmc_reparam_small"
    assert example.cli(args(tmp_path / "empty", tmp_path / "g", "--dataset", "fashion-mnist")) == 2


def test_samples_are_ancestral_draws_through_the_decoder(example):
    torch.manual_seed(1)
    m, _ = mnist_vae.build("small")
    x = example.sample_images(m, 6, seed=3)
    # the same draws by hand: z5 from the learned top prior, each layer's N(mean, std), Bernoulli means of x
    g = torch.Generator().manual_seed(3)
    top = m["z5"].fn
    z = top.mean + mnist_vae.std_nonlin(top.pre_std) * torch.randn(6, 4, generator=g)
    for name in ("z4", "z3", "z2", "z1"):
        layer = m[name].fn
        h = layer.mlp(z)
        mean, std = layer.mean(h), mnist_vae.std_nonlin(layer.pre_std(h))
        z = mean + std * torch.randn(mean.shape, generator=g)
    dec = m["x"].fn
    expected = torch.sigmoid(dec.logits(dec.mlp(z)))
    assert x.shape == (6, 784) and torch.allclose(x, expected, atol=1e-6)
    assert torch.equal(example.sample_images(m, 6, seed=3), x)  # fixed seed: the same images every time
    assert not torch.allclose(example.sample_images(m, 6, seed=4), x)
    t = torch.arange(50.0).reshape(50, 1)
    assert torch.equal(example.picture_images(t), example.picture_images(t))  # the same test images each epoch


def test_pictures_at_the_chosen_epochs(data, tmp_path, example):
    pytest.importorskip("matplotlib")
    out = tmp_path / "pics"
    argv = [a for a in args(data, out, "--epochs", "3", "--picture-epochs", "1,3") if a != "--no-plots"]
    example.main(argv)
    assert sorted(p.name for p in (out / "pictures").iterdir()) == [
        "reconstructions_epoch0001.png", "reconstructions_epoch0003.png", "samples_epoch0001.png",
        "samples_epoch0003.png"]
    for name in ("samples.png", "reconstructions.png", "learning_curves.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit):
        example.parse_args(["--picture-epochs", "1,x"])


def test_benchmark_refuses_a_foreign_checkpoint_in_its_runs(data, tmp_path, capsys):
    bench = load("benchmarks/mnist_tmc_vs_iwae.py", "mnist_tmc_vs_iwae_safety")
    runs = tmp_path / "runs"
    (runs / "iwae").mkdir(parents=True)
    marker = tmp_path / "MARKER"
    torch.save({"x": Payload(marker)}, runs / "iwae" / "checkpoint.pt")
    argv = ["--quick", "--data", str(data), "--out", str(tmp_path / "o"), "--limit-train", "64", "--limit-test", "20",
            "--runs", str(runs)]
    assert bench.cli(argv) == 2
    err = capsys.readouterr().err
    assert "mnist_tmc_vs_iwae.py: error: checkpoint" in err and "Traceback" not in err and not marker.exists()
