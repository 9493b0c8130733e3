"""The core example runs end to end with tiny arguments, and its JSON is well formed."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import ROOT


def test_gaussian_toy_example_json():
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "gaussian_toy.py"), "--N", "8", "--K", "16", "--reps", "3",
         "--json", "--threads", "1"],
        capture_output=True, text=True, check=True, timeout=300,
    )
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(res) >= {"exact", "tmc", "iwae"}
    for k in ("tmc", "iwae"):
        assert set(res[k]) >= {"mean", "std", "values", "median_time_s"}
        assert len(res[k]["values"]) == 3
    # TMC at K=16 is already close at N=8 and never above the truth by much (a lower bound in expectation)
    assert res["tmc"]["mean"] == pytest.approx(res["exact"], abs=3.0)


def test_gaussian_toy_example_rejects_bad_arguments():
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "gaussian_toy.py"), "--K", "0"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "must be a positive integer" in out.stderr


@pytest.mark.parametrize("script", ["gaussian_toy.py", "state_space.py", "mnist_chain.py"])
@pytest.mark.parametrize("device, message", [("gpu0", "is not a torch device"),
                                             pytest.param("cuda:7", "is not available on this machine",
                                                          marks=pytest.mark.skipif(
                                                              torch.cuda.device_count() > 7, reason="8 GPUs"))])
def test_examples_refuse_a_device_they_cannot_use(script, device, message, tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "examples" / script), "--device", device,
                          *(["--data", str(tmp_path), "--out", str(tmp_path / "o")] if script == "mnist_chain.py"
                            else [])],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and f"--device={device!r} {message}" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
