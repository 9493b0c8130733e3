"""benchmarks/burda_table.py end to end on synthetic images: table, markdown, schedule, resuming, refusals."""

import importlib
import json
import pathlib
import sys

import pytest
import torch

import tmcgraph as tg
from tmcgraph.models import burda

BENCH = pathlib.Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def table():
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module("burda_table")


def _argv(tmp_path, *extra):
    return ["--quick", "--out", str(tmp_path), "--runs", str(tmp_path / "runs"), "--limit-train", "48",
            "--limit-test", "24", "--eval-k", "30", "--objectives", "vae:1,iwae:3,tmc:2,piwae:2:2", *extra]


def test_quick_table_markdown_and_schedule(table, tmp_path):
    state = torch.get_rng_state()
    out = table.main(_argv(tmp_path, "--stages", "2", "--epochs", "2"))
    assert torch.equal(torch.get_rng_state(), state)
    data = json.loads((tmp_path / "burda_table_quick.json").read_text())
    md = (tmp_path / "burda_table_quick.md").read_text()
    assert f"Command: `{data['command']}`" in md
    assert (tmp_path / "burda_table_quick.png").exists()
    keys = sorted(r["key"] for r in data["runs"])
    assert keys == sorted(["L1-vae_1-seed0", "L1-iwae_3-seed0", "L1-piwae_2_2-seed0", "L2-vae_1-seed0",
                           "L2-iwae_3-seed0", "L2-tmc_2-seed0", "L2-piwae_2_2-seed0"])  # no TMC on one layer
    for r in data["runs"]:
        assert [m["lr"] for m in r["metrics"]] == pytest.approx([1e-3, 1e-3 * 10 ** (-1 / 7)])
        e = r["evaluation"]
        assert e["eval_k"] == 30 and e["test_images"] == 24
        assert e["kl"] >= -1e-4 and 1 <= e["ess"] <= 30
        assert e["nll"] == pytest.approx(-(e["elbo"] + e["kl"]), abs=1e-4)
        units = [int(u) for u in e["active_units_str"].split("+")]
        assert len(units) == r["config"]["layers"] and sum(units) == e["active_units_total"]
    assert data["table"]["1/1"]["vae"]["nll"] == data["table"]["1/1"]["iwae"]["nll"]  # k = 1: the same bound
    assert data["table"]["2/2"]["tmc"]["nll"] > 0
    assert "| # stoch. layers | k | VAE NLL |" in md and "86.76 (19)" in md and "82.90 (26+7)" in md
    assert out["orderings"]["1_layer"]["nll_iwae50_lt_iwae5"] is None  # not run at this setting
    assert data["published"]["2/50"]["iwae"] == [82.90, "26+7"]


def test_completed_runs_are_reused_and_other_configurations_refused(table, tmp_path):
    first = table.main(_argv(tmp_path, "--layers", "1", "--objectives", "iwae:3"))
    ck = tmp_path / "runs" / "L1-iwae_3-seed0" / "checkpoint.pt"
    mtime = ck.stat().st_mtime_ns
    again = table.main(_argv(tmp_path, "--layers", "1", "--objectives", "iwae:3"))
    assert ck.stat().st_mtime_ns == mtime  # neither retrained nor re-evaluated
    saved = torch.load(ck, weights_only=True)
    assert saved["format"] == "tmcgraph.checkpoint" and saved["kind"] == "benchmarks/burda_table"
    assert saved["state"]["epoch"] == 1 and saved["config"]["objective"] == "iwae:3"
    assert again["runs"][0]["evaluation"] == first["runs"][0]["evaluation"]
    longer = table.main(_argv(tmp_path, "--layers", "1", "--objectives", "iwae:3", "--eval-k", "40"))
    assert longer["runs"][0]["evaluation"]["eval_k"] == 40 and longer["runs"][0]["epochs"] == 1
    with pytest.raises(tg.TMCGraphError, match=r"batch_size: checkpoint 32 vs requested 16"):
        table.main(_argv(tmp_path, "--layers", "1", "--objectives", "iwae:3", "--batch-size", "16"))


def test_random_streams_do_not_cross_devices(table, tmp_path):
    out = table.main(_argv(tmp_path, "--layers", "1", "--objectives", "iwae:3", "--device", "cpu"))
    assert out["device"] == "cpu"
    ck = tmp_path / "runs" / "L1-iwae_3-seed0" / "checkpoint.pt"
    state = table.load_checkpoint(ck, out["runs"][0]["config"], table.CONFIG_KEYS, kind=table.KIND)
    assert state["rng_device"] == "cpu"
    state["rng_device"] = "cuda"  # as if trained on a GPU
    table.save_checkpoint(ck, kind=table.KIND, state=state)
    with pytest.raises(tg.TMCGraphError, match=r"L1-iwae_3-seed0 .* was trained on cuda.*--device cuda"):
        table.main(_argv(tmp_path, "--layers", "1", "--objectives", "iwae:3", "--epochs", "2", "--stages", "2"))
    if not torch.cuda.is_available():
        with pytest.raises(tg.TMCGraphError, match="cuda.is_available"):
            table.main(_argv(tmp_path, "--device", "cuda"))


def test_bad_arguments(table, tmp_path):
    with pytest.raises(tg.TMCGraphError, match="layers"):
        table.main(_argv(tmp_path, "--layers", "3"))
    with pytest.raises(tg.TMCGraphError, match="objective 'elbo:5'"):
        table.main(_argv(tmp_path, "--objectives", "elbo:5"))
    with pytest.raises(tg.TMCGraphError, match="stages"):
        table.main(_argv(tmp_path, "--stages", "0"))


def test_table_and_orderings_on_constructed_evaluations(table):
    def run(L, spec, nll, au):
        return {"config": {"layers": L, "objective": spec},
                "evaluation": {"nll": nll, "active_units_str": au, "kl": 1.0, "ess": 2.0}}

    runs = [run(1, "vae:1", 90.0, "10"), run(1, "vae:50", 89.5, "11"), run(1, "iwae:5", 89.0, "12"),
            run(1, "iwae:50", 88.0, "15"), run(2, "vae:1", 88.0, "10+2"), run(2, "iwae:5", 88.5, "12+3"),
            run(2, "iwae:50", 87.0, "14+3"), run(2, "vae:50", 86.0, "20+4"), run(2, "tmc:5", 87.5, "13+3")]
    t = table.table(runs)
    assert t["1/1"]["iwae"]["nll"] == 90.0 and t["2/5"]["tmc"]["nll"] == 87.5
    o = table.orderings(t)
    assert o["1_layer"] == {"nll_iwae50_lt_iwae5": True, "nll_iwae5_lt_vae1": True, "nll_iwae50_lt_vae50": True,
                            "active_units_iwae50_gt_vae50": True}
    assert o["2_layer"] == {"nll_iwae50_lt_iwae5": True, "nll_iwae5_lt_vae1": False, "nll_iwae50_lt_vae50": False,
                            "active_units_iwae50_gt_vae50": False}
    o = table.orderings(table.table([r for r in runs if r["config"]["objective"] != "vae:50"]))
    assert o["2_layer"]["active_units_iwae50_gt_vae1"] is True and o["2_layer"]["nll_iwae50_lt_vae50"] is None


def test_binarisation_is_a_bernoulli_draw_per_epoch(table):
    x = torch.full((2000, 10), 0.3)
    g = torch.Generator().manual_seed(0)
    a, b = table.binarize(x, g), table.binarize(x, g)
    assert set(a.unique().tolist()) <= {0.0, 1.0} and not torch.equal(a, b)
    assert float(a.mean()) == pytest.approx(0.3, abs=0.02)
    assert burda.parse_objective("tmc:2").name == "tmc"


def test_a_truncated_schedule_continues_to_more_stages(table, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    objs = ("--layers", "1", "--objectives", "iwae:3")
    table.main(_argv(a, *objs, "--stages", "1"))  # stage 0: one epoch
    longer = table.main(_argv(a, *objs, "--stages", "2", "--epochs", "2"))  # continued into stage 1
    fresh = table.main(_argv(b, *objs, "--stages", "2", "--epochs", "2"))
    (r,), (s,) = longer["runs"], fresh["runs"]
    assert r["epochs"] == s["epochs"] == 2
    assert [m["lr"] for m in r["metrics"]] == [m["lr"] for m in s["metrics"]] == pytest.approx(
        [1e-3, 1e-3 * 10 ** (-1 / 7)])
    assert [m["train_objective"] for m in r["metrics"]] == [m["train_objective"] for m in s["metrics"]]
    assert r["evaluation"]["nll"] == s["evaluation"]["nll"]
    with pytest.raises(tg.TMCGraphError, match="has 2 epochs, more than the 1 requested"):
        table.main(_argv(a, *objs, "--stages", "1"))


def test_shards_train_and_evaluate_what_one_process_does(table, tmp_path):
    objs = ("--layers", "1", "--objectives", "vae:1,iwae:3")
    whole = table.main(_argv(tmp_path / "whole", *objs))
    parts = [table.main(_argv(tmp_path / "part", *objs, "--shard", f"{i}/2")) for i in range(2)]
    assert [r["key"] for p in parts for r in p["runs"]] == [r["key"] for r in whole["runs"]]
    ref = {r["key"]: r for r in whole["runs"]}
    for p in parts:
        for r in p["runs"]:
            assert r["metrics"][0]["train_objective"] == ref[r["key"]]["metrics"][0]["train_objective"]
            assert r["evaluation"]["nll"] == ref[r["key"]]["evaluation"]["nll"]
    combined = table.main(_argv(tmp_path / "part", *objs))  # trains and evaluates nothing new
    assert combined["table"] == whole["table"]
    with pytest.raises(tg.TMCGraphError, match="--shard"):
        table.main(_argv(tmp_path, *objs, "--shard", "2/2"))


def test_cli_prints_an_error_line_with_status_2(table, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["burda_table.py"])
    assert table.cli(_argv(tmp_path, "--layers", "3")) == 2
    err = capsys.readouterr().err
    assert err.startswith("burda_table.py: error: --layers") and "Traceback" not in err
