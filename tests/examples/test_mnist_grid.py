"""benchmarks/mnist_grid.py end to end on synthetic images: outputs, resuming, skipping, refusals, summaries."""

import importlib
import json
import math
import os
import pathlib
import statistics
import sys

import pytest
import torch

import tmcgraph as tg

BENCH = pathlib.Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def grid():
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module("mnist_grid")


def _argv(tmp_path, *extra, plots=False):
    return ["--quick", *([] if plots else ["--no-plots"]), "--out", str(tmp_path), "--runs", str(tmp_path / "runs"),
            "--recognition", "small", "--grads", "reparam", "--limit-train", "64", "--limit-test", "32",
            "--batch-size", "32", *extra]


def test_quick_grid_writes_figures_table_and_fig6(grid, tmp_path):
    state = torch.get_rng_state()
    out = grid.main(_argv(tmp_path, "--recognition", "factorised,small", "--grads", "reparam,dregs",
                          "--epochs", "2", "--last", "2", "--limit-train", "32", plots=True))
    assert torch.equal(torch.get_rng_state(), state)  # private generators only
    data = json.loads((tmp_path / "mnist_grid_quick.json").read_text())
    assert (tmp_path / "mnist_grid_quick.png").exists() and (tmp_path / "mnist_grid_quick_fig6.png").exists()
    assert data["torch_threads"] == 1 and data["setting"] == out["setting"]
    assert len(data["runs"]) == 2 * 2 * 2
    for key, row in data["table1"].items():
        rec, grad, obj = key.split("/")
        run = next(r for r in data["runs"] if r["config"]["recognition"] == rec and r["config"]["grad"] == grad
                   and r["config"]["objective"] == obj)
        vals = [m["test_tmc"] for m in run["metrics"]][-2:]
        assert row["tmc_bound"]["mean"] == pytest.approx(statistics.fmean(vals))
        assert row["tmc_bound"]["sd_pooled"] == pytest.approx(statistics.stdev(vals))
        assert math.isfinite(row["iwae_bound"]["mean"])
    assert set(data["fig6"]["methods"]) == {"tmc/reparam", "iwae/reparam", "tmc/dregs", "iwae/dregs"}
    assert set(data["fig6"]["tmc_over_iwae"]) == {"factorised/reparam", "small/reparam", "factorised/dregs",
                                                  "small/dregs"}
    for k, w in data["fig5_y_windows"].items():
        assert w[0] < w[1]
    md = (tmp_path / "mnist_grid_quick.md").read_text()
    assert data["report"] == "mnist_grid_quick.md" and "## Table 1" in md and "## Fig. 6" in md
    assert set(data["fig5_comparisons"]) == {"factorised/reparam", "small/reparam", "factorised/dregs", "small/dregs"}


def test_resumed_runs_equal_uninterrupted_ones_and_complete_runs_are_skipped(grid, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    one = grid.main(_argv(a, "--epochs", "1"))
    assert len(one["runs"][0]["metrics"]) == 1
    two = grid.main(_argv(a, "--epochs", "2"))  # continues each run from its checkpoint
    ref = grid.main(_argv(b, "--epochs", "2"))
    for r, s in zip(two["runs"], ref["runs"]):
        for m, n in zip(r["metrics"], s["metrics"]):
            assert m["train_objective"] == n["train_objective"]
            assert m["test_tmc"] == n["test_tmc"] and m["test_iwae"] == n["test_iwae"]
    ck = a / "runs" / "small-reparam-tmc-seed0" / "checkpoint.pt"
    mtime = ck.stat().st_mtime_ns
    again = grid.main(_argv(a, "--epochs", "2"))
    assert sorted(again["budget"]["runs_skipped_as_complete"]) == sorted(r["key"] for r in again["runs"])
    assert ck.stat().st_mtime_ns == mtime
    saved = torch.load(ck, weights_only=True)
    assert saved["format"] == "tmcgraph.checkpoint" and saved["kind"] == "benchmarks/mnist_grid"
    assert saved["state"]["epoch"] == 2 and saved["config"]["K"] == 4


def test_report_writes_outputs_from_checkpoints_and_trains_nothing(grid, tmp_path):
    trained = grid.main(_argv(tmp_path, "--epochs", "2"))
    cks = sorted((tmp_path / "runs").glob("*/checkpoint.pt"))
    before = {c: c.read_bytes() for c in cks}
    out = grid.main(_argv(tmp_path, "--report", "--grads", "reparam,stl", plots=True))
    assert {c: c.read_bytes() for c in cks} == before  # nothing trained, nothing saved
    assert not (tmp_path / "runs" / "small-stl-tmc-seed0").exists()
    assert sorted(out["budget"]["runs_missing"]) == ["small-stl-iwae-seed0", "small-stl-tmc-seed0"]
    assert out["budget"]["report_only"] and out["budget"]["epochs_per_run"] == {
        "small-reparam-tmc-seed0": 2, "small-reparam-iwae-seed0": 2}
    assert [r["metrics"] for r in out["runs"]] == [r["metrics"] for r in trained["runs"]]
    assert out["table1"] == trained["table1"]
    assert (tmp_path / "mnist_grid_quick.png").exists()
    at1 = grid.main(_argv(tmp_path, "--report", "--at-epoch", "1"))
    assert at1["budget"]["epochs_per_run"] == {"small-reparam-tmc-seed0": 1, "small-reparam-iwae-seed0": 1}
    assert [r["metrics"] for r in at1["runs"]] == [r["metrics"][:1] for r in trained["runs"]]
    assert {c: c.read_bytes() for c in cks} == before
    with pytest.raises(tg.TMCGraphError, match="--at-epoch needs --report"):
        grid.main(_argv(tmp_path, "--epochs", "2", "--at-epoch", "1"))
    with pytest.raises(tg.TMCGraphError, match="--report trains nothing"):
        grid.main(_argv(tmp_path, "--report", "--epochs", "3"))
    with pytest.raises(tg.TMCGraphError, match="no run of this grid has a checkpoint"):
        grid.main(_argv(tmp_path, "--report", "--grads", "dregs"))


def test_device_is_checked_and_random_streams_do_not_cross_devices(grid, tmp_path):
    out = grid.main(_argv(tmp_path, "--epochs", "1", "--device", "cpu"))
    assert out["device"] == "cpu" and all("device" not in m for r in out["runs"] for m in r["metrics"])
    ck = tmp_path / "runs" / "small-reparam-tmc-seed0" / "checkpoint.pt"
    state = grid.load_checkpoint(ck, out["runs"][0]["config"], grid.CONFIG_KEYS)
    assert state["particle_rng_device"] == "cpu"
    state["particle_rng_device"] = "cuda"  # as if trained on a GPU
    grid.save_checkpoint(ck, state)
    with pytest.raises(tg.TMCGraphError, match=r"small-reparam-tmc-seed0 .* was trained on cuda.*--device cuda"):
        grid.main(_argv(tmp_path, "--epochs", "2"))
    if not torch.cuda.is_available():
        with pytest.raises(tg.TMCGraphError, match="cuda.is_available"):
            grid.main(_argv(tmp_path, "--epochs", "1", "--device", "cuda"))


def test_a_run_with_another_configuration_is_refused(grid, tmp_path):
    grid.main(_argv(tmp_path, "--epochs", "1"))
    with pytest.raises(tg.TMCGraphError, match=r"K: checkpoint 4 vs requested 5"):
        grid.main(_argv(tmp_path, "--epochs", "1", "--K", "5"))
    with pytest.raises(tg.TMCGraphError, match="lr"):
        grid.main(_argv(tmp_path, "--epochs", "1", "--lr", "0.01"))
    ck = tmp_path / "runs" / "small-reparam-iwae-seed0" / "checkpoint.pt"
    ck.write_bytes(b"not a checkpoint")
    with pytest.raises(tg.TMCGraphError, match="not a readable checkpoint"):
        grid.main(_argv(tmp_path, "--epochs", "1"))
    assert ck.read_bytes() == b"not a checkpoint"  # never overwritten


class _Shell:
    def __reduce__(self):
        return (os.system, ("echo pwned > pwned.txt",))


@pytest.mark.parametrize("content", ["empty", "truncated", "pickle", "foreign", "other-kind"])
def test_unsafe_or_foreign_checkpoints_are_refused_unread(grid, tmp_path, content, monkeypatch):
    from tmcgraph.contrib import checkpoint

    monkeypatch.chdir(tmp_path)
    grid.main(_argv(tmp_path, "--epochs", "1"))
    ck = tmp_path / "runs" / "small-reparam-tmc-seed0" / "checkpoint.pt"
    good = ck.read_bytes()
    if content == "empty":
        ck.write_bytes(b"")
    elif content == "truncated":
        ck.write_bytes(good[: len(good) // 2])
    elif content == "pickle":
        torch.save({"config": {}, "x": _Shell()}, ck)
    elif content == "foreign":  # a plain torch file without the format marker
        torch.save({"config": {"K": 4}, "epoch": 1}, ck)
    else:
        checkpoint.save(ck, {"epoch": 1}, kind="examples/mnist_chain", config={"K": 4})
    before = ck.read_bytes()
    with pytest.raises(tg.TMCGraphError, match=str(ck.name)):
        grid.main(_argv(tmp_path, "--epochs", "2"))
    assert not (tmp_path / "pwned.txt").exists()
    assert ck.read_bytes() == before


def test_shards_run_what_the_whole_grid_runs(grid, tmp_path):
    """Two processes sharing one grid (--shard 0/2, 1/2) train each run as one process does."""
    full = grid.main(_argv(tmp_path / "full", "--epochs", "1", "--seeds", "2"))
    keys = [r["key"] for r in full["runs"]]
    parts = [grid.main(_argv(tmp_path / "part", "--epochs", "1", "--seeds", "2", "--shard", f"{i}/2"))
             for i in range(2)]
    assert [r["key"] for r in parts[0]["runs"]] == keys[0::2] and [r["key"] for r in parts[1]["runs"]] == keys[1::2]
    assert parts[1]["budget"]["shard"] == "1/2"
    ref = {r["key"]: r["metrics"][0] for r in full["runs"]}
    for part in parts:
        for r in part["runs"]:
            m = r["metrics"][0]
            assert m["train_objective"] == ref[r["key"]]["train_objective"]
            assert m["test_tmc"] == ref[r["key"]]["test_tmc"] and m["test_iwae"] == ref[r["key"]]["test_iwae"]
    # a later invocation over the whole grid finds every run complete
    again = grid.main(_argv(tmp_path / "part", "--epochs", "1", "--seeds", "2"))
    assert sorted(again["budget"]["runs_skipped_as_complete"]) == sorted(keys)
    for bad in ("2/2", "a/2", "1", "-1/2"):
        with pytest.raises(tg.TMCGraphError, match="--shard"):
            grid.main(_argv(tmp_path, f"--shard={bad}"))
    with pytest.raises(tg.TMCGraphError, match="selects none"):
        grid.main(_argv(tmp_path, "--shard", "3/4", "--objectives", "tmc"))


def test_bad_arguments(grid, tmp_path):
    with pytest.raises(tg.TMCGraphError, match="recognition"):
        grid.main(_argv(tmp_path, "--recognition", "huge"))
    with pytest.raises(tg.TMCGraphError, match="grads"):
        grid.main(_argv(tmp_path, "--grads", "vimco"))
    with pytest.raises(tg.TMCGraphError, match="eval-every"):
        grid.main(_argv(tmp_path, "--eval-every", "0"))


def test_cli_prints_an_error_line(grid, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["mnist_grid.py"])
    assert grid.cli(_argv(tmp_path, "--objectives", "vae")) == 2
    assert "mnist_grid.py: error: --objectives" in capsys.readouterr().err


def test_summaries_on_constructed_metrics(grid):
    def run(rec, grad, obj, seed, tmc, iwae, cpu):
        ms = [{"epoch": e + 1, "test_tmc": t, "test_iwae": i, "train_cpu_s": c, "steps": 10}
              for e, (t, i, c) in enumerate(zip(tmc, iwae, cpu))]
        return {"config": {"recognition": rec, "grad": grad, "objective": obj, "seed": seed, "batch_size": 128},
                "metrics": ms}

    runs = [run("small", "reparam", "tmc", 0, [-100, -99, -98], [-101, -100, -99], [4, 5, 6]),
            run("small", "reparam", "tmc", 1, [-100, -97, -96], [-101, -99, -97], [5, 5, 5]),
            run("small", "reparam", "iwae", 0, [-101, -100, -99.5], [-101, -100, -99.6], [2, 2, 3])]
    t = grid.table1(runs, last=2)
    row = t["small/reparam/tmc"]["tmc_bound"]
    assert row["mean"] == pytest.approx(statistics.fmean([-99, -98, -97, -96]))
    assert row["sd_pooled"] == pytest.approx(statistics.stdev([-99, -98, -97, -96]))
    assert row["sd_over_seed_means"] == pytest.approx(statistics.stdev([-98.5, -96.5]))
    f = grid.fig6(runs)
    assert f["per_run_group"]["small/reparam/tmc"]["cpu_s_per_epoch"] == 5
    assert f["tmc_over_iwae"]["small/reparam"] == pytest.approx(5 / 2)
    assert f["per_run_group"]["small/reparam/tmc"]["cpu_s_per_full_epoch"] == pytest.approx(0.5 * 469)
    c = grid.curves(runs)["small/reparam/tmc"]
    assert c["epochs"] == [1, 2, 3] and c["tmc"] == [-100, -98, -97]
    lo, hi = grid.y_window([-97.0, -96.5, -96.9])
    assert lo < -97.0 and hi > -96.5 and hi - lo < 1.0  # a sub-nat window around sub-nat differences


def test_fig5_window_follows_the_longest_run_of_a_panel(grid, tmp_path):
    pytest.importorskip("matplotlib")
    long = {"epochs": [10, 20, 30, 40], "seeds": 1, "tmc": [-100.0, -97.0, -96.0, -95.5],
            "iwae": [-100.5, -97.5, -96.5, -96.0]}
    short = {"epochs": [5], "seeds": 1, "tmc": [-108.0], "iwae": [-109.0]}  # a run just started
    cv = {"large/reparam/tmc": long, "large/reparam/iwae": long, "large/stl/tmc": short, "large/stl/iwae": short}
    w = grid.plot_fig5(cv, tmp_path / "f.png", "t")
    for panel in ("large/A", "large/B", "large/C"):
        lo, hi = w[panel]
        assert -97.0 < lo <= -96.0 and -95.5 < hi < -95.0, (panel, lo, hi)  # epochs 30-40 of the long runs only
    assert (tmp_path / "f.png").stat().st_size > 0


def test_comparisons_and_markdown_report(grid):
    tmc = {"epochs": [5, 10, 15], "seeds": 1, "tmc": [-110.0, -104.0, -101.0], "iwae": [-111.0, -105.5, -102.25]}
    iwae = {"epochs": [5, 10], "seeds": 1, "tmc": [-109.5, -104.5], "iwae": [-109.75, -104.6]}
    comp = grid.comparisons({"large/stl/tmc": tmc, "large/stl/iwae": iwae})
    c = comp["large/stl"]
    assert [r["epoch"] for r in c["rows"]] == [5, 10]  # only epochs both runs evaluated
    r5, r10 = c["rows"]
    assert r5["lead"] == pytest.approx(-110.0 - -109.5) and r10["lead"] == pytest.approx(-104.0 - -104.5)
    assert r10["gap_b"] == pytest.approx(-104.5 - -104.6) and r10["gap_c"] == pytest.approx(-104.0 - -105.5)
    assert c["last_epoch"] == 10 and c["fig5a_tmc_trained_ahead_at_last"] is True
    assert c["fig5a_evaluations_ahead"] == 1 and c["evaluations"] == 2
    assert c["fig5bc_gap_b_below_gap_c_at_last"] is True

    t1 = {"large/stl/tmc": {"seeds": 1, "tmc_bound": {"mean": -101.5, "sd_pooled": 0.7, "epochs": [10, 15]},
                            "iwae_bound": {"mean": -103.0, "sd_pooled": 0.9, "epochs": [10, 15]}},
          "small/reparam/iwae": {"seeds": 3, "iwae_bound": {"mean": -97.5, "sd_pooled": 0.6, "epochs": [30, 50]}}}
    f6 = {"per_run_group": {"large/stl/tmc": {"cpu_s_per_epoch": 80.0, "epochs_measured": 15, "host_cpus": ["X"]},
                            "large/stl/iwae": {"cpu_s_per_epoch": 64.0, "epochs_measured": 10, "host_cpus": ["X"]}},
          "tmc_over_iwae": {"large/stl": 1.25}, "note": "n"}
    md = grid.markdown({"setting": "s", "command": "c", "budget": {"last": 2}, "table1": t1, "fig6": f6,
                        "fig5_comparisons": comp})
    assert "| large | stl | 1/0 | 10-15 | -101.50 +- 0.70 | - | -103.00 +- 0.90 | - | - / - |" in md
    assert "| small | reparam | 0/3 | 30-50 | - | - | - | -97.50 +- 0.60 | -91.63 +- 0.16 / -93.35 +- 0.12 |" in md
    assert "| large | stl | 10 | -104.00 | -104.50 | +0.50 | -105.50 | -104.60 | +0.10 | +1.50 |" in md
    assert "| large | stl | 80.0 | 64.0 | 1.25 | 15 / 10 | X |" in md
    assert ("| large | stl | 10 | -104.00 | -104.50 | +0.50 | yes (1 of 2 evaluations) | -105.50 | -104.60 | "
            "+0.10 | +1.50 | yes |") in md


def test_eval_last_adds_evaluations_and_changes_no_training(grid, tmp_path):
    plain = grid.main(_argv(tmp_path / "a", "--epochs", "5", "--eval-every", "5", "--limit-train", "32"))
    dense = grid.main(_argv(tmp_path / "b", "--epochs", "5", "--eval-every", "5", "--eval-last", "2",
                            "--limit-train", "32"))
    for p, want in ((plain, [5]), (dense, [4, 5])):
        for r in p["runs"]:
            assert [m["epoch"] for m in r["metrics"] if "test_tmc" in m] == want
    for r0, r1 in zip(plain["runs"], dense["runs"]):
        assert [m["train_objective"] for m in r0["metrics"]] == [m["train_objective"] for m in r1["metrics"]]
        assert r0["metrics"][-1]["test_tmc"] == r1["metrics"][-1]["test_tmc"]
    assert dense["table1"]["small/reparam/tmc"]["tmc_bound"]["epochs"] == [4, 5]
    with pytest.raises(tg.TMCGraphError, match="--eval-last"):
        grid.main(_argv(tmp_path / "c", "--eval-last", "-1"))
