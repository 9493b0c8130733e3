"""The performance benchmarks run end to end in --quick mode and write their JSON and PNG.

Only the mechanics and the correctness checks built into the benchmarks are tested (the
contenders must agree on the same particles, later calls must not search paths, the
memory limit must hold); timings are never asserted.
"""

import importlib
import json
import pathlib
import sys

import pytest

BENCH = pathlib.Path(__file__).resolve().parents[2] / "benchmarks"


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


@pytest.mark.parametrize("name", ["perf_toy", "perf_chain"])
def test_speed_benchmarks_run_and_contenders_agree(name, tmp_path):
    _, data = _run(name, tmp_path)
    for row in data["rows"]:
        assert row["max_abs_value_difference"] < 1e-3
        assert row["tmcgraph_over_hand"] > 0
        assert "median_s" in row["results"]["tmcgraph"]


def test_mnist_benchmark_runs(tmp_path):
    payload, data = _run("perf_mnist", tmp_path)
    res = data["result"]
    assert res["network_calls_per_step"] > 0
    assert set(res["forward_split_median"]) == {"networks", "log_densities", "engine"}
    # The hand-written contender draws the same particles, so it returns the same values.
    assert res["hand_value_max_abs_difference"] < 1e-3
    assert res["tmcgraph_over_hand"] > 0


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
