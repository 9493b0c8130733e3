"""The performance benchmarks run end to end in --quick mode and write their JSON and PNG.

Only the mechanics and the correctness checks built into the benchmarks are tested (the
contenders must agree on the same particles or with the exact value, later calls must not
search paths, the memory limit must hold); timings are never asserted.

The speed and memory benchmarks (perf_toy, perf_chain, perf_hmm, perf_mnist, perf_memory and
Fig. 3's timing panels) are run once, through ``benchmarks/gpu_suite.sh`` with
``GPU_SUITE_DEVICE=cpu GPU_SUITE_QUICK=1``: the same commands the GPU suite runs, on the CPU
with tiny grids; the tests below check what they wrote.
"""

import importlib
import json
import os
import pathlib
import subprocess
import sys

import pytest

BENCH = pathlib.Path(__file__).resolve().parents[2] / "benchmarks"
SUITE = BENCH / "gpu_suite.sh"


def _module(name):
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module(name)


def _run(name, tmp_path, *extra):
    payload = _module(name).main(["--quick", "--out", str(tmp_path), *extra])
    jpath = tmp_path / f"{name}_quick.json"
    assert jpath.exists() and (tmp_path / f"{name}_quick.png").exists()
    data = json.loads(jpath.read_text())
    assert data["torch_threads"] == 1
    return payload, data


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    """Output folder of one run of the GPU suite's commands on the CPU in quick mode."""
    out = tmp_path_factory.mktemp("gpu_suite")
    env = {**os.environ, "GPU_SUITE_DEVICE": "cpu", "GPU_SUITE_QUICK": "1", "GPU_SUITE_OUT": str(out),
           "GPU_SUITE_PYTHON": sys.executable}
    r = subprocess.run(["bash", str(SUITE)], env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"gpu_suite.sh failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return out


def _load(out, name):
    jpath = out / f"{name}_quick.json"
    assert jpath.exists() and (out / f"{name}_quick.png").exists(), f"{name} wrote no JSON/PNG"
    data = json.loads(jpath.read_text())
    assert data["torch_threads"] == 1
    assert data["machine"]["device"] == "cpu"
    return data


def test_gpu_suite_is_valid_bash_and_strict():
    assert subprocess.run(["bash", "-n", str(SUITE)], capture_output=True).returncode == 0
    text = SUITE.read_text()
    assert "set -euo pipefail" in text and "torch.cuda.is_available()" in text


def test_gpu_suite_refuses_to_run_without_cuda(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    env = {**os.environ, "GPU_SUITE_OUT": str(tmp_path), "GPU_SUITE_PYTHON": sys.executable}
    r = subprocess.run(["bash", str(SUITE)], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "cuda" in r.stderr.lower()
    assert not list(tmp_path.iterdir())


def test_gpu_suite_runs_every_step(suite):
    summary = json.loads((suite / "gpu_suite.json").read_text())
    assert [s["step"] for s in summary["steps"]] == ["toy", "chain", "hmm", "mnist", "memory", "fig3", "densities"]
    assert all(s["result"] == "ok" for s in summary["steps"]), summary
    assert all("--device cpu" in s["arguments"] for s in summary["steps"])


def _check_speed_rows(data, same_group):
    assert data["limits"]["exp_per_s"] > 0 and data["limits"]["matmul_flop_per_s"] > 0
    assert data["exp_counting_rule"]
    for row in data["rows"]:
        res = row["results"]
        for name in same_group:
            assert "median_s" in res[name], (name, res[name])
            r = res[name]
            assert r["time_basis"] == "cpu" and len(r["cpu_s"]) == len(r["wall_s"]) == len(r["values"])
            assert len(r["warmup_wall_s"]) == 2
        # tmcgraph-compiled either ran or says why not.
        tc = res["tmcgraph-compiled"]
        assert "median_s" in tc or tc.get("skipped")
        assert row["max_abs_value_difference"] < 1e-3
        assert row["tmcgraph_over_hand"] > 0 and row["tmcgraph_over_hand_compiled"] > 0
        assert all(v > 0 for v in row["ratios"].values())
        assert row["limit"]["ideal_s"] > 0
        assert set(row["limit"]["fraction_of_limit"]) >= set(same_group)
        assert all(v > 0 for v in row["limit"]["fraction_of_limit"].values())


@pytest.mark.parametrize("name", ["perf_toy", "perf_chain"])
def test_speed_benchmarks_run_and_contenders_agree(suite, name):
    data = _load(suite, name)
    _check_speed_rows(data, ["tmcgraph", "hand", "hand-compiled"])
    for row in data["rows"]:
        assert "pyro" in row["value_checks"]
    if name == "perf_toy":
        # The suite compiles the toy with inductor even in quick runs: both compiled contenders
        # run and draw the same particles as the eager ones.
        assert data["compile_backend"] == "inductor"
        assert {r["mode"] for r in data["rows"]} == {"forward", "forward+backward"}
        import inspect

        import tmcgraph as tg

        for row in data["rows"]:
            assert row["value_checks"]["hand-compiled"]["max_abs_difference"] < 1e-3
            assert row["results"]["hand-compiled"]["compile_s"] is not None
            if "compile" in inspect.signature(tg.TMC).parameters:
                assert row["value_checks"]["tmcgraph-compiled"]["check"].startswith("same particles")
                assert row["tmcgraph_compiled_programs"]["compiled"] >= 1


def test_hmm_benchmark_is_exact(suite):
    data = _load(suite, "perf_hmm")
    _check_speed_rows(data, ["tmcgraph", "hand", "hand-compiled", "pyro-enum"])
    for row in data["rows"]:
        # Every contender is exact here: checked against the float64 forward algorithm.
        for name, check in row["value_checks"].items():
            assert check["median_abs_error"] < 1e-2, (name, check)
        assert "pyro-tmc" in row["results"]


def test_mnist_benchmark_runs(suite):
    data = _load(suite, "perf_mnist")
    assert [r["recognition"] for r in data["rows"]] == ["small", "small"]
    for row in data["rows"]:
        for name in ("tmcgraph", "hand", "hand-compiled", "tmcgraph-iwae", "hand-iwae", "hand-iwae-compiled"):
            assert "median_s" in row["results"][name], (name, row["results"][name])
        assert row["max_abs_value_difference"] < 1e-2
        assert row["tmc_over_iwae"] > 0 and row["tmcgraph_over_hand"] > 0
        assert row["work"]["tmc"]["exps"] > row["work"]["iwae"]["exps"] > 0
        assert row["work"]["tmc"]["forward_flops"] > 0
        assert row["limit"]["tmc"]["ideal_s"] > 0 and row["limit"]["iwae"]["ideal_s"] > 0
    res = data["result"]
    assert res["network_calls_per_step"] > 0
    assert set(res["forward_split_median"]) == {"networks", "log_densities", "engine"}
    # The hand-written contender draws the same particles, so it returns the same values.
    assert res["hand_value_max_abs_difference"] < 1e-3
    assert res["tmcgraph_over_hand"] > 0


def test_memory_benchmark_measures_each_contender_in_its_own_process(suite):
    data = _load(suite, "perf_memory")
    rows = {(r["workload"], r["contender"], r["mode"]): r for r in data["rows"]}
    assert set(rows) == {("chain", "tmcgraph", "forward"), ("chain", "hand-streaming", "forward"),
                         ("toy", "hand", "forward+backward")}
    for r in rows.values():
        assert "error" not in r, r
        assert r["peak_extra_mib"] >= 0 and r["baseline_rss_mib"] > 0 and r["grid_mib"] > 0
        assert all(r[k]["peak_reset"] for k in ("first_call", "second_call", "third_call"))
    # Same particles (seed 0), same value, whatever the process.
    a, b = rows[("chain", "tmcgraph", "forward")], rows[("chain", "hand-streaming", "forward")]
    assert abs(a["third_call"]["value"] - b["third_call"]["value"]) < 1e-4


def test_fig3_timing_panels_run(suite):
    data = _load(suite, "perf_toy_fig3")
    assert {r["panel"] for r in data["rows"]} == {"B", "D"}
    assert {r["method"] for r in data["rows"]} == {"TMC", "SMC", "IWAE"}
    assert all(r["time_s"]["median"] > 0 for r in data["rows"])


def test_allocator_benchmark_runs_each_setting_in_fresh_processes(tmp_path):
    _, data = _run("perf_allocator", tmp_path, "--no-pyro")
    assert [r["workload"] for r in data["rows"]] == ["chain", "toy", "mnist"]
    for row in data["rows"]:
        for c in row["contenders"].values():
            assert c["default"]["median_s"] > 0 and c["tuned"]["median_s"] > 0


def test_lattice_benchmark_respects_memory_limit(tmp_path):
    _, data = _run("perf_lattice", tmp_path)
    for row in data["rows"]:
        assert row["limit_respected"]
        assert row["tmcgraph"]["cost"] > 0
        run = row["runs"]["limit"]
        assert run["largest_tensor"] <= run["memory_limit"]
        if run.get("value_float64") is not None:
            assert abs(run["value"] - run["value_float64"]) < 1e-3


def test_planning_benchmark_counts_no_searches_after_first_call(tmp_path):
    _, data = _run("perf_planning", tmp_path)
    for row in data["rows"]:
        assert row["first_call_searches"] == 1
        assert row["later_calls_searches"] == 0
        if "new_shape_searches" in row:
            assert row["new_shape_searches"] == 1 and row["back_to_first_shape_searches"] == 0


def test_densities_benchmark_runs_in_the_suite(suite):
    data = _load(suite, "perf_densities")
    assert all(r["time_basis"] == "cpu" and r["max_relative_difference"] <= 1e-4 for r in data["rows"])


def test_densities_benchmark_alternates_contenders_and_restores_the_kernel(tmp_path):
    from torch.distributions import Independent

    from tmcgraph.sampling import densities

    kernel = densities._REGISTRY[Independent]
    _, data = _run("perf_densities", tmp_path)
    assert densities._REGISTRY[Independent] is kernel
    assert [r["workload"] for r in data["rows"]] == ["op-mnist", "op-burda", "mnist-iwae", "mnist-tmc", "burda-L5000"]
    for row in data["rows"]:
        assert row["torch_over_fused"] > 0 and row["max_relative_difference"] <= 1e-4
    with pytest.raises(Exception, match="unknown"):
        _module("perf_densities").main(["--quick", "--out", str(tmp_path), "--workloads", "op-gpu"])


def test_burda_evaluation_chunking_benchmark_runs(tmp_path):
    _, data = _run("perf_burda_eval", tmp_path)
    assert [r["layers"] for r in data["rows"]] == [1, 2]
    for row in data["rows"]:
        assert set(row["speedup_over_reference"]) == set(data["contenders"])
        assert row["speedup_over_reference"][data["reference"]] == 1.0
        assert all(s["n"] == 2 for s in row["cpu_s_per_image"].values())
    with pytest.raises(Exception, match="--layers"):
        _module("perf_burda_eval").main(["--quick", "--out", str(tmp_path), "--layers", "3"])
