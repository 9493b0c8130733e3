"""The toy benchmarks (the paper's Fig. 3 and Fig. 4) run end to end in --quick mode.

Their ground truth is checked against closed forms computed here independently (scipy), and
their outputs against the grid they promise.
"""

import json
import math
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from scipy.stats import multivariate_normal, norm

ROOT = pathlib.Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks"


def _run(script: str, out: pathlib.Path, *extra) -> dict:
    cmd = [sys.executable, str(BENCH / script), "--quick", "--out", str(out), *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    stem = script.removesuffix(".py") + "_quick"
    js, png = out / f"{stem}.json", out / f"{stem}.png"
    assert js.exists() and png.exists() and png.stat().st_size > 10_000
    assert not (out / (script.removesuffix(".py") + ".json")).exists()  # full results untouched
    return json.loads(js.read_text())


def _toy_data(N: int) -> np.ndarray:
    from tmcgraph.models.toys import gaussian_toy_data

    return gaussian_toy_data(N, seed=0).double().numpy()


def _check_common(d: dict):
    assert d["quick"] is True
    assert d["threads"]["torch_threads"] == 1 and d["machine"]["torch_threads"] == 1
    assert d["seeds_per_point"] == 3
    for r in d["rows"]:
        for key in ("estimate", "time_s"):
            s = r[key]
            assert s["n"] == 3
            assert all(math.isfinite(s[k]) for k in ("mean", "std", "median", "q25", "q75"))
        assert r["time_s"]["min"] > 0


def test_toy_tmc_smc_iwae_quick(tmp_path):
    d = _run("toy_tmc_smc_iwae.py", tmp_path)
    _check_common(d)
    grid = d["grid"]
    a = [r for r in d["rows"] if r["panel"] == "A"]
    c = [r for r in d["rows"] if r["panel"] == "C"]
    for m, Ks in grid["K"].items():
        assert sorted(r["K"] for r in a if r["method"] == m) == sorted(Ks)
    assert sorted({r["N"] for r in c}) == sorted(grid["N_C"])
    assert all(r["K"] == grid["K_C"] for r in c) and {r["method"] for r in c} == {"TMC", "SMC", "IWAE"}
    for r in a + c:
        x = _toy_data(r["N"])
        cov = 2 * np.eye(r["N"]) + np.ones((r["N"], r["N"]))
        exact = multivariate_normal(np.zeros(r["N"]), cov).logpdf(x)
        assert r["exact"] == pytest.approx(exact, abs=1e-6)
        assert r["per_point"]["mean"] == pytest.approx(r["estimate"]["mean"] / r["N"], rel=1e-9)
        assert r["gap"] == pytest.approx(r["exact"] - r["estimate"]["mean"])
    assert set(d["targets"]) >= {"A_tmc_gap_at_K128", "A_tmc_vs_smc_at_K128", "D_speed_at_N1024"}
    assert "--quick" in d["command"]
    # the figure can be redrawn from the JSON alone
    js = tmp_path / "toy_tmc_smc_iwae_quick.json"
    (tmp_path / "toy_tmc_smc_iwae_quick.png").unlink()
    r = subprocess.run([sys.executable, str(BENCH / "toy_tmc_smc_iwae.py"), "--replot", str(js)],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "toy_tmc_smc_iwae_quick.png").exists()


def test_chain_factorised_vs_nonfactorised_quick(tmp_path):
    d = _run("chain_factorised_vs_nonfactorised.py", tmp_path)
    _check_common(d)
    exact = norm(0.0, math.sqrt(2.0)).logpdf(1.0)
    contenders = {"factorised", "prior, paired", "prior, mixture", "prior, permutation", "SMC, prior"}
    assert set(d["contenders"]) == contenders
    for K in d["grid"]["K"]:
        rows = [r for r in d["rows"] if r["K"] == K]
        assert {r["contender"] for r in rows} == contenders
        for r in rows:
            assert r["exact"] == pytest.approx(exact, abs=1e-9)
            assert r["n"] == d["grid"]["n"]
    # with K = 1 the paired TMC estimate and SMC are the same importance sampler on the same draws
    k1 = {r["contender"]: r["estimate"]["mean"] for r in d["rows"] if r["K"] == 1}
    assert k1["prior, paired"] == pytest.approx(k1["SMC, prior"], abs=1e-4)
    js = tmp_path / "chain_factorised_vs_nonfactorised_quick.json"
    png = js.with_suffix(".png")
    png.unlink()
    r = subprocess.run([sys.executable, str(BENCH / "chain_factorised_vs_nonfactorised.py"), "--replot", str(js)],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert png.exists()
