"""benchmarks/gpu_papers.sh: the papers' full protocols as one unattended, resumable GPU job.

Checked on the CPU: the script is strict bash, refuses to run without CUDA or data, prints
the sharded commands in a dry run, and (with ``GPU_PAPERS_QUICK=1 GPU_PAPERS_DEVICE=cpu``)
runs both steps in two shard processes and a combining one, whose outputs hold every run.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_papers.sh"


def _run(tmp_path, timeout=600, **env):
    full = {**os.environ, "TMCGRAPH_DATA": "", "GPU_PAPERS_OUT": str(tmp_path / "out"),
            "GPU_PAPERS_PYTHON": sys.executable, **env}
    return subprocess.run(["bash", str(SCRIPT)], env=full, capture_output=True, text=True, timeout=timeout)


def test_is_valid_strict_bash():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0
    text = SCRIPT.read_text()
    assert "set -euo pipefail" in text and "torch.cuda.is_available()" in text


def test_refuses_without_cuda_or_data(tmp_path):
    r = _run(tmp_path, GPU_PAPERS_DEVICE="cpu")
    assert r.returncode == 2 and "GPU_PAPERS_DATA" in r.stderr
    if not torch.cuda.is_available():
        r = _run(tmp_path, GPU_PAPERS_DATA=str(tmp_path))
        assert r.returncode == 2 and "cuda.is_available() is False" in r.stderr
    for bad in ({"GPU_PAPERS_GPUS": "0"}, {"GPU_PAPERS_STEPS": "grid fig9"}):
        r = _run(tmp_path, GPU_PAPERS_QUICK="1", GPU_PAPERS_DEVICE="cpu", **bad)
        assert r.returncode == 2 and "gpu_papers:" in r.stderr
    assert not (tmp_path / "out").exists()


def test_dry_run_prints_the_full_protocols_sharded(tmp_path):
    r = _run(tmp_path, GPU_PAPERS_DRY_RUN="1", GPU_PAPERS_DATA="/data/mnist", GPU_PAPERS_GPUS="3")
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("== gpu_papers:")]
    grid = [ln for ln in lines if "mnist_grid.py" in ln]
    burda = [ln for ln in lines if "burda_table.py" in ln]
    assert len(grid) == len(burda) == 4
    for i in range(3):
        assert any(f"CUDA_VISIBLE_DEVICES={i} " in ln and f"--shard {i}/3" in ln for ln in grid)
        assert any(f"CUDA_VISIBLE_DEVICES={i} " in ln and f"--shard {i}/3" in ln for ln in burda)
    train = grid[0]
    for opt in ("--recognition factorised,small,large", "--grads reparam,stl,dregs", "--seeds 3", "--epochs 1200",
                "--device cuda", "--data /data/mnist"):
        assert opt in train
    assert "--report" in grid[-1] and "--epochs" not in grid[-1] and "--shard" not in grid[-1]
    assert "--stages 8" in burda[0] and "tmc:50" in burda[0]
    assert not (tmp_path / "out").exists()


def test_quick_cpu_run_trains_in_shards_and_combines(tmp_path):
    r = _run(tmp_path, GPU_PAPERS_QUICK="1", GPU_PAPERS_DEVICE="cpu", GPU_PAPERS_GPUS="2")
    assert r.returncode == 0, r.stdout + r.stderr
    out = tmp_path / "out"
    status = json.loads((out / "gpu_papers.json").read_text())
    assert sorted(s["step"] for s in status["steps"]) == sorted(
        ["grid-0", "grid-1", "grid-combined", "burda-0", "burda-1", "burda-combined"])
    assert all(s["result"] == "ok" for s in status["steps"])
    grid = json.loads((out / "mnist_grid_quick.json").read_text())
    assert grid["budget"]["report_only"] and sorted(grid["budget"]["epochs_per_run"].values()) == [2, 2]
    burda = json.loads((out / "burda_table_quick.json").read_text())
    assert len(burda["runs"]) == 4 and all(r["evaluation"] for r in burda["runs"])
    assert (out / "logs" / "grid-0.log").exists() and (out / "mnist_grid_quick.png").exists()
    # a failing step makes the exit status non-zero and is recorded
    r = _run(tmp_path, GPU_PAPERS_QUICK="1", GPU_PAPERS_DEVICE="cpu", GPU_PAPERS_STEPS="grid",
             GPU_PAPERS_SEEDS="0")
    assert r.returncode != 0
    status = json.loads((out / "gpu_papers.json").read_text())
    assert [s["result"] for s in status["steps"]] == ["failed"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_quick_cuda_run(tmp_path):  # pragma: no cover - GPU machines only
    r = _run(tmp_path, GPU_PAPERS_QUICK="1")
    assert r.returncode == 0, r.stdout + r.stderr
