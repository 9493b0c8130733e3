"""benchmarks/pyro_bridge.py runs end to end in --quick mode and writes its JSON and PNG.

Timings are never asserted; the exact values are checked against closed forms computed here
(scipy), and the bridge against the native declaration on the same particles.
"""

import importlib
import json
import math
import pathlib
import sys

import numpy as np
import pytest

pytest.importorskip("pyro")

from scipy.stats import multivariate_normal, norm  # noqa: E402

BENCH = pathlib.Path(__file__).resolve().parents[2] / "benchmarks"


def _module(name):
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module(name)


def test_pyro_bridge_benchmark_quick(tmp_path):
    payload = _module("pyro_bridge").main(["--quick", "--out", str(tmp_path)])
    js, png = tmp_path / "pyro_bridge_quick.json", tmp_path / "pyro_bridge_quick.png"
    assert js.exists() and png.exists() and png.stat().st_size > 10_000
    data = json.loads(js.read_text())
    assert data["threads"]["torch_threads"] == 1 and data["quick"] is True
    toy, chain = data["rows"]
    from tmcgraph.models.toys import gaussian_toy_data

    x = gaussian_toy_data(toy["N"], seed=0).double().numpy()
    N = len(x)
    assert toy["exact"] == pytest.approx(multivariate_normal(np.zeros(N), 2 * np.eye(N) + 1).logpdf(x), abs=1e-6)
    assert chain["exact"] == pytest.approx(norm(0, math.sqrt(2)).logpdf(1.0), abs=1e-9)
    assert set(toy["results"]) == {"pyro", "bridge", "native"}
    assert {"pyro-mixture", "bridge-mixture", "native-mixture", "pyro-diagonal", "bridge-paired",
            "native-permutation"} <= set(chain["results"])
    for row in (toy, chain):
        assert all("median_s" in r for r in row["results"].values())
        same = row["same_particles_max_abs_difference"]
        assert same and max(same.values()) < 1e-3
    assert data["bias_exact"] == pytest.approx(norm(0, math.sqrt(3)).logpdf(2.0), abs=1e-9)
    assert {(b["K"], b["coupling"]) for b in data["bias"]} == {(3, "paired"), (3, "mixture"), (3, "permutation")}
    assert all("pyro" in b for b in data["bias"] if b["tmc"]) and all(b["bridge"]["n"] == 200 for b in data["bias"])
    assert payload["rows"][0]["workload"] == "toy"
