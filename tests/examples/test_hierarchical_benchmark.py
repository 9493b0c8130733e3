"""benchmarks/hierarchical.py end to end with --quick on synthetic archives of the real shapes.

Checks the grid it promises, that the final objective is the mean of the last iterations
of the recorded trace, that a second invocation reuses every cached run, and that bad
arguments end with an argparse ``error:`` line.
"""

import importlib.util
import json
import pathlib

import numpy as np
import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _load():
    spec = importlib.util.spec_from_file_location("hierarchical_benchmark", ROOT / "benchmarks" / "hierarchical.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def data_dir(tmp_path):
    rng = np.random.default_rng(0)
    d = tmp_path / "data"
    d.mkdir()
    np.savez_compressed(d / "radon.npz", log_radon=rng.normal(size=(4, 300)).astype(np.float32),
                        basement=(rng.random((4, 300)) < 0.5).astype(np.float32),
                        log_uranium=rng.normal(size=(4, 300)).astype(np.float32))
    bus = {}
    for r in range(5):
        for part in ("train", "test"):
            bus[f"delay_{part}_{r}"] = (rng.random((2, 3, 150)) < 0.7).astype(np.float64)
            bus[f"run_type_{part}_{r}"] = np.eye(4, dtype=np.uint8)[rng.integers(4, size=(2, 3, 150))]
            bus[f"bus_company_name_{part}_{r}"] = np.eye(6, dtype=np.uint8)[rng.integers(6, size=(2, 3, 150))]
    np.savez_compressed(d / "bus_breakdown.npz", **bus)
    return d


def test_quick_run_and_resume(tmp_path, data_dir, capsys):
    bench = _load()
    out = tmp_path / "results"
    argv = ["--quick", "--data", str(data_dir), "--out", str(out)]
    threads = torch.get_num_threads()
    d = bench.main(argv)
    assert (out / "hierarchical_quick.json").exists()
    md = (out / "hierarchical_quick.md").read_text()
    assert md.count("\n| radon |") == md.count("\n| bus |") == len(bench.METHODS)  # one row per method at K = 3
    for model in ("radon", "bus"):
        png = out / f"hierarchical_quick_{model}.png"
        assert png.exists() and png.stat().st_size > 10_000
    saved = json.loads((out / "hierarchical_quick.json").read_text())
    assert saved["complete"] is True and saved["quick"] is True and saved["threads"]["torch_threads"] == 1
    assert saved["runs_this_invocation"] == 12 and len(saved["runs"]) == 12
    s = saved["settings"]
    assert s["K"] == [3] and s["iterations"] == 6 and s["last"] == 3
    for key, r in saved["runs"].items():
        assert "diverged" not in r, key
        tr = r["trace"]
        assert tr["iteration"] == list(range(1, 7))
        assert r["final_objective"] == pytest.approx(np.mean(tr["objective"][-3:]), abs=1e-3)  # trace rounded
        assert np.isfinite(r["predictive_ll"]) and r["predictive_reps"] == 2
        assert r["time_per_iteration_s"] > 0 and r["cpu_per_iteration_s"] > 0
    rows = saved["rows"]
    assert {(r["model"], r["method"]) for r in rows} == {(m, k) for m in ("radon", "bus") for k in bench.METHODS}
    assert all(r["best_lr"] is not None for r in rows)
    # resumed: every run is cached, nothing is recomputed
    torch.set_num_threads(threads)
    again = bench.main(argv)
    assert again["runs_this_invocation"] == 0 and again["runs_skipped_cached"] == 12
    assert again["rows"] == d["rows"]
    assert "12 cached" in capsys.readouterr().out


@pytest.mark.parametrize("extra, message", [
    (["--methods", "mpvi,nope"], "unknown ['nope']"),
    (["--qem-lrs", "2"], "--qem-lrs"),
    (["--iterations", "0"], "--iterations must be positive"),
])
def test_bad_arguments(tmp_path, data_dir, capsys, extra, message):
    bench = _load()
    with pytest.raises(SystemExit) as e:
        bench.main(["--quick", "--data", str(data_dir), "--out", str(tmp_path), *extra])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and message in err


def test_missing_data_says_where(tmp_path, capsys):
    bench = _load()
    with pytest.raises(SystemExit):
        bench.main(["--quick", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert "error: --data:" in err and "radon.npz not found" in err


def test_parts_run_in_parallel_merge_into_one_result(tmp_path, data_dir):
    bench = _load()
    base = ["--quick", "--data", str(data_dir), "--methods", "mpvi,qem"]
    a = bench.main([*base, "--models", "radon", "--out", str(tmp_path / "a")])
    b = bench.main([*base, "--models", "bus", "--out", str(tmp_path / "b")])
    parts_json = [str(tmp_path / d / "hierarchical_quick.json") for d in ("a", "b")]
    merged = bench.main([*base, "--out", str(tmp_path / "all"), "--merge", *parts_json])
    assert merged["runs_this_invocation"] == 0 and merged["runs_skipped_cached"] == 4
    parts = {**a["runs"], **b["runs"]}
    assert merged["runs"].keys() == parts.keys()
    for k, r in parts.items():
        assert merged["runs"][k]["final_objective"] == r["final_objective"]
    assert [r["model"] for r in merged["rows"]] == ["radon"] * 2 + ["bus"] * 2


@pytest.mark.parametrize("content, message", [
    (None, "no result file"),
    ("{not json", "not a JSON result file"),
    ('{"benchmark": "perf_toy", "runs": {}}', "not a result file of benchmarks/hierarchical.py"),
])
def test_merge_refuses_missing_or_foreign_files(tmp_path, data_dir, capsys, content, message):
    bench = _load()
    f = tmp_path / "other.json"
    if content is not None:
        f.write_text(content)
    with pytest.raises(SystemExit) as e:
        bench.main(["--quick", "--data", str(data_dir), "--out", str(tmp_path), "--merge", str(f)])
    assert e.value.code == 2 and message in capsys.readouterr().err
