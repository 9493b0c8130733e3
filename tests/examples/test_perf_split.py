"""benchmarks/perf_split.py runs end to end in --quick mode and writes its JSON and PNG.

Only the mechanics and the benchmark's built-in check (every chunk size gives the unsplit
value on the same particles) are tested, plus the value itself against the TMC estimate
written out by hand in float64 on the particles the benchmark draws (``seed=0``); memory
figures and timings are never asserted.
"""

import importlib
import json
import math
import pathlib
import sys

import pytest
import torch
from torch.distributions import Normal

BENCH = pathlib.Path(__file__).resolve().parents[2] / "benchmarks"
MODES = ("forward", "forward+backward")


def _module():
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module("perf_split")


def _hand_tmc(N, K):
    """``(log_z, d log_z / d s)`` in float64 at the benchmark's particles, written out by hand.

    log Z = log (1/K) sum_i p(a_i)/q(a_i) prod_n (1/K) sum_k p(z_nk | a_i) p(x_n | z_nk) / q(z_nk),
    with q(z_nk) = (1/K) sum_j q(z_nk | a_j) (the mixture coupling's density).
    """
    est, data, _ = _module().build(N, K, None)
    smp = est.sample(data, seed=0)
    a, z, x = smp.values["a"].double(), smp.values["z"].double(), data["x"].double()
    assert a.shape == (K,) and z.shape == (K, N)
    s = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    lw_a = Normal(0.0, 1.0).log_prob(a) - Normal(0.1, 1.3).log_prob(a)
    loc = 0.5 * a[:, None] + 0.3 * x.mean(-1)[None, :]
    lq_z = torch.logsumexp(Normal(loc[None], 1.1).log_prob(z[:, None, :]), 1) - math.log(K)
    lp_x = Normal(z[..., None], 0.5).log_prob(x[None]).sum(-1)
    lp_z = Normal(a[:, None, None], s).log_prob(z[None])
    inner = torch.logsumexp(lp_z + (lp_x - lq_z)[None], 1) - math.log(K)
    log_z = torch.logsumexp(lw_a + inner.sum(-1), 0) - math.log(K)
    (grad,) = torch.autograd.grad(log_z, s)
    return float(log_z.detach()), float(grad)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("perf_split")
    payload = _module().main(["--quick", "--out", str(out)])
    return out, payload


def test_perf_split_quick_writes_json_and_png(quick):
    out, payload = quick
    jpath, ppath = out / "perf_split_quick.json", out / "perf_split_quick.png"
    assert jpath.exists() and ppath.exists() and ppath.stat().st_size > 10_000
    data = json.loads(jpath.read_text())
    assert data["complete"] is True and data["quick"] is True and data["benchmark"] == "perf_split"
    assert data["torch_threads"] == 1 and data["machine"]["torch_threads"] == 1
    assert (data["N"], data["K"], data["obs"], data["rtol"]) == (200, 8, 4, 1e-6)
    assert payload["rows"] == data["rows"]
    rows = data["rows"]
    assert [(r["mode"], r["chunk"]) for r in rows] == [(m, c) for m in MODES for c in (None, 50, 10)]
    for r in rows:
        assert "error" not in r, r.get("error")
        for key in ("peak_extra_mib", "first_call_extra_mib", "baseline_rss_mib", "cpu_median_s"):
            assert math.isfinite(r[key]) and r[key] >= 0, key
        assert len(r["cpu_s"]) == data["calls"] == 2
        assert len(r["values"]) == 3 + data["calls"]
        for key in ("first_call", "second_call", "third_call"):
            assert r[key]["malloc_trim"] is True and r[key]["peak_reset"] is True
        assert r["grid_mib"] == pytest.approx(4 * 8 * 8 * 200 / 2**20)
        assert ("grad_s" in r) == (r["mode"] == "forward+backward")


def test_perf_split_values_agree_and_equal_the_hand_written_estimate(quick):
    _, payload = quick
    log_z, grad = _hand_tmc(200, 8)
    for r in payload["rows"]:
        assert r["value_rel_difference"] <= 1e-6
        assert all(abs(v - log_z) <= 1e-5 * abs(log_z) for v in r["values"]), (r["chunk"], r["values"], log_z)
        if r["mode"] == "forward+backward":
            assert r["grad_s"] == pytest.approx(grad, rel=1e-4, abs=1e-3)
    assert set(payload["max_value_rel_difference"]) == set(MODES)


def test_perf_split_check_rejects_disagreeing_values():
    rows = [{"mode": "forward", "chunk": None, "value": -10.0, "values": [-10.0]},
            {"mode": "forward", "chunk": 5, "value": -10.001, "values": [-10.001]}]
    with pytest.raises(RuntimeError, match="chunk 5"):
        _module()._check(rows, 1e-6)


@pytest.mark.parametrize("bad", [["--chunks", "0"], ["--chunks", "ten"], ["--modes", "sideways"], ["--N", "0"]])
def test_perf_split_rejects_bad_arguments(tmp_path, bad, capsys):
    with pytest.raises(SystemExit):
        _module().main(["--quick", "--out", str(tmp_path), *bad])
    assert "error:" in capsys.readouterr().err
