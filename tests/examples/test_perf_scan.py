"""benchmarks/perf_scan.py runs end to end in --quick mode and writes its JSON and PNG.

Only the mechanics and the benchmark's built-in check (every contender's value equals the
float64 sequential oracle) are tested; timings are never asserted.
"""

import importlib
import json
import math
import pathlib
import sys

import pytest

BENCH = pathlib.Path(__file__).resolve().parents[2] / "benchmarks"


def _module():
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module("perf_scan")


def test_perf_scan_quick(tmp_path):
    payload = _module().main(["--quick", "--out", str(tmp_path)])
    jpath, ppath = tmp_path / "perf_scan_quick.json", tmp_path / "perf_scan_quick.png"
    assert jpath.exists() and ppath.exists() and ppath.stat().st_size > 10_000
    data = json.loads(jpath.read_text())
    assert data["complete"] is True and data["quick"] is True
    assert data["torch_threads"] == 1 and data["machine"]["torch_threads"] == 1
    rows = data["rows"]
    assert [(r["K"], r["T"], r["B"], r["mode"]) for r in rows] == [
        (3, T, B, mode) for T in (5, 9) for B in (1, 2) for mode in ("forward", "forward+backward")]
    for r in rows:
        assert set(r["results"]) == {"scan", "sequential", "hand"}
        for res in r["results"].values():
            assert len(res["times_s"]) == data["repetitions"] and res["time_basis"] == "cpu"
            assert all(abs(v - r["exact_log_z"]) <= 1e-3 + 1e-4 * abs(r["exact_log_z"]) for v in res["values"])
        assert set(r["ratios"]) == {"scan/sequential", "scan/hand", "sequential/hand"}
        assert r["auto_choice"] in ("scan", "sequential") and r["faster_of_scan_and_sequential"] in r["results"]
        assert math.isfinite(r["limit"]["ideal_s"])
    assert payload["rows"] == data["rows"]


def test_perf_scan_skips_points_over_the_memory_bound(tmp_path):
    data = _module().main(["--quick", "--out", str(tmp_path), "--K", "4", "--T", "6", "--B", "1",
                           "--max-elements", "10"])
    for r in data["rows"]:
        assert all("memory" in res["skipped"] for res in r["results"].values())


@pytest.mark.parametrize("bad", [["--T", "1"], ["--K", "0"], ["--B", "-2"]])
def test_perf_scan_rejects_bad_grids(tmp_path, bad, capsys):
    with pytest.raises(SystemExit):
        _module().main(["--quick", "--out", str(tmp_path), *bad])
    assert "error:" in capsys.readouterr().err
