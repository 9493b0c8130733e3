"""Data-parallel training of examples/mnist_chain.py: 2 gloo processes (torchrun) equal one process.

What makes the runs comparable: every process shuffles with the same seeded generator,
so all agree on each global batch; the batch is split into interleaved shards and the
particles of shard s at step t of epoch e are drawn with the seed derived from
(--seed, e, t, s), wherever that shard is computed; each process weights its shard
losses by shard size / global batch size and DistributedDataParallel averages the
gradients, so the update is the gradient of the mean per-image estimate over the
global batch. The reference below is a plain single-process loop written from that
definition (no DDP, one backward of the global mean). The runs use the default
``--full-data-bound`` (a subsampled data plate, each shard scaled by N / B_s); the
reference uses the per-image model and forms the full-data figure, (N / B) times the
batch's sum of per-image estimates, by hand.

The reference runs on one torch thread, as the runs do (``--threads 1``,
``OMP_NUM_THREADS=1``): a matrix product split over threads sums in another order, and
Adam turns the last-bit differences of near-zero gradients into steps of size lr.
"""

import gzip
import hashlib
import importlib.util
import json
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT

import tmcgraph as tg
from tmcgraph.contrib import checkpoint
from tmcgraph.data import mnist as mnist_data
from tmcgraph.infer.objectives import objective
from tmcgraph.models import mnist_vae

NAMES = list(mnist_data.FILES.values())
SEED, K, BATCH, N_TRAIN = 3, 2, 16, 64

WRAPPER = """
import importlib.util, json, sys
sys.path.insert(0, {root!r})
from tmcgraph.data import mnist as mnist_data
mnist_data.CHECKSUMS = {{k: mnist_data.Digest(*v) for k, v in json.load(open({sums!r})).items()}}
spec = importlib.util.spec_from_file_location("mnist_chain", {example!r})
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
sys.exit(mod.cli(sys.argv[1:]))
"""


def load_example():
    spec = importlib.util.spec_from_file_location("mnist_chain_ddp", ROOT / "examples" / "mnist_chain.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    """Synthetic IDX files, the checksum table patched here and (via a JSON file) in the launched processes."""
    rng = np.random.default_rng(0)
    d = tmp_path / "mnist"
    d.mkdir()
    arrays = {NAMES[0]: rng.integers(0, 256, (N_TRAIN, 28, 28)), NAMES[1]: rng.integers(0, 10, N_TRAIN),
              NAMES[2]: rng.integers(0, 256, (24, 28, 28)), NAMES[3]: rng.integers(0, 10, 24)}
    sums = {}
    for name, a in arrays.items():
        a = a.astype(np.uint8)
        raw = bytes([0, 0, 8, a.ndim]) + struct.pack(f">{a.ndim}I", *a.shape) + a.tobytes()
        (d / name).write_bytes(gzip.compress(raw))
        sums[name] = [len(raw), hashlib.md5(raw).hexdigest()]
    (tmp_path / "sums.json").write_text(json.dumps(sums))
    monkeypatch.setattr(mnist_data, "CHECKSUMS", {k: mnist_data.Digest(*v) for k, v in sums.items()})
    wrapper = tmp_path / "run_example.py"
    wrapper.write_text(WRAPPER.format(root=str(ROOT), sums=str(tmp_path / "sums.json"),
                                      example=str(ROOT / "examples" / "mnist_chain.py")))
    return d, wrapper


def common(d, out, epochs):
    return ["--data", str(d), "--out", str(out), "--K", str(K), "--batch-size", str(BATCH), "--seed", str(SEED),
            "--limit-test", "24", "--eval-batch-size", "8", "--epochs", str(epochs), "--threads", "1",
            "--no-progress", "--no-download", "--no-plots", "--allocator", "default"]


def torchrun(wrapper, argv, cwd):
    if shutil.which("torchrun") is None and importlib.util.find_spec("torch.distributed.run") is None:
        pytest.skip("torchrun is not available")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(wrapper),
           "--distributed", *argv]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=cwd,
                       env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def reference(d, epochs: int) -> list:
    """Plain single-process training on the global batches, written from the definition.

    Returns the weights after each epoch, each epoch's mean over steps of (N / B) * (the
    batch's sum of per-image estimates), and the trained model and proposal.
    """
    ex = load_example()
    torch.set_num_threads(1)  # as the runs (the autouse fixture restores the count)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model, proposal = mnist_vae.build("small", ex.COUPLING)
    est = tg.TMC(model, proposal, K=K)
    opt = torch.optim.Adam(list(model.parameters()) + list(proposal.parameters()), lr=1e-3)
    shuffle = torch.Generator().manual_seed(SEED + 1)
    xs = mnist_data.load_mnist(d, download=False).train_x
    out, full = [], []
    for epoch in range(1, epochs + 1):
        figures = []
        for step, ib in enumerate(mnist_data.batches(len(xs), BATCH, shuffle=True, generator=shuffle)):
            values = [objective(est, {"x": xs[ib[s::2]]}, "reparam", seed=ex.particle_seed(SEED, epoch, step, s)).value
                      for s in range(2)]
            opt.zero_grad()
            (-torch.cat(values).mean()).backward()  # the mean over the global batch
            opt.step()
            figures.append(len(xs) / len(ib) * float(torch.cat(values).detach().sum()))
        out.append({"model": {k: v.clone() for k, v in model.state_dict().items()},
                    "proposal": {k: v.clone() for k, v in proposal.state_dict().items()}})
        full.append(sum(figures) / len(figures))
    return out, full, model, proposal


def assert_close(a: dict, b: dict, atol=2e-5):
    for part in ("model", "proposal"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            torch.testing.assert_close(a[part][k], b[part][k], atol=atol, rtol=1e-4, msg=f"{part}.{k}")


def test_two_gloo_processes_resume_and_train_like_one(tiny, tmp_path):
    d, wrapper = tiny
    ex = load_example()
    out = tmp_path / "run"
    ref, ref_full, model, proposal = reference(d, 2)

    # epoch 1 in this process (2 shards) == the reference
    ex.main([*common(d, out, 1), "--shards", "2"])
    s1 = checkpoint.load(out / "checkpoint.pt", ex.KIND)
    assert_close(s1["state"], ref[0])
    init = mnist_vae.build("small")[0].state_dict()
    assert any(not torch.allclose(init[k], ref[0]["model"][k]) for k in init)  # training did move the weights

    # resumed by 2 gloo processes for epoch 2 == the reference's epoch 2
    r = torchrun(wrapper, [*common(d, out, 2), "--resume"], tmp_path)
    assert r.stdout.count("epoch 2:") == 1 and "epoch 1:" not in r.stdout  # only rank 0 prints (and writes)
    s2 = checkpoint.load(out / "checkpoint.pt", ex.KIND)
    assert s2["config"]["shards"] == 2 and s2["state"]["epoch"] == 2
    assert_close(s2["state"], ref[1])
    m = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in m] == [1, 2] and [r["steps"] for r in m] == [N_TRAIN // BATCH] * 2
    # the full-data figure: shard s of the 2 processes scaled by N / B_s and weighted by B_s / B, summed over them
    for r, want in zip(m, ref_full, strict=True):
        assert r["train_full_data"] == pytest.approx(want, rel=1e-5)
        assert r["train_full_data"] == pytest.approx(N_TRAIN * r["train_objective"], rel=1e-6)  # equal batches
    # the test bounds (evaluation batches split over the processes) equal a one-process evaluation
    test_x = mnist_data.load_mnist(d, download=False).test_x[:24]
    ev = ex.evaluate(model, proposal, test_x, K, 8, seed=10_000 * 2)
    assert m[1]["test_tmc"] == pytest.approx(ev["tmc"], abs=1e-3) and m[1]["test_iwae"] == pytest.approx(ev["iwae"],
                                                                                                          abs=1e-3)


def test_options_that_do_not_fit_the_processes(tiny, tmp_path):
    d, _ = tiny
    ex = load_example()
    with pytest.raises(tg.TMCGraphError, match="torchrun"):
        ex.main([*common(d, tmp_path / "x", 1), "--distributed"])
    with pytest.raises(tg.TMCGraphError, match="--grad dregs .* --distributed"):
        ex.parse_args([*common(d, tmp_path / "x", 1), "--distributed", "--grad", "dregs"])
    with pytest.raises(tg.TMCGraphError, match="--shards must be a positive integer"):
        ex.parse_args(["--shards", "0"])


def test_shards_and_particle_seeds(tiny, tmp_path):
    ex = load_example()
    ib = torch.arange(10)
    parts = ex.shards_of(ib, 3)
    assert [p.tolist() for p in parts] == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]  # DistributedSampler's split
    seeds = {ex.particle_seed(0, e, t, s) for e in (1, 2) for t in range(50) for s in range(4)}
    assert len(seeds) == 400 and all(0 <= v < 2**63 for v in seeds)
    assert ex.particle_seed(5, 1, 2, 3) == ex.particle_seed(5, 1, 2, 3)
    # with dregs (single process) the shards are back-propagated one by one: same update as the global mean
    d, _ = tiny
    torch.set_num_threads(2)
    a = ex.main([*common(d, tmp_path / "a", 1), "--shards", "4", "--grad", "dregs"])
    assert torch.get_num_threads() == 2  # --threads 1 held for the run only
    assert a["config"]["shards"] == 4 and np.isfinite(a["metrics"][0]["test_tmc"])
