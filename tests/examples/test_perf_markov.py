"""benchmarks/perf_markov.py runs end to end in --quick mode and writes its JSON and PNG.

Only the mechanics and the values are tested, never timings. Truths: the HMM's log p(x) by
enumerating every state path, and the state space model's log p(x) as one multivariate normal
density of x (the Gaussian marginal of the whole chain), both in float64.
"""

import importlib
import itertools
import json
import math
import pathlib
import statistics
import sys

import pytest
import torch
from torch.distributions import MultivariateNormal, Normal

BENCH = pathlib.Path(__file__).resolve().parents[2] / "benchmarks"
HMM_NAMES = ("tmcgraph-markov", "tmcgraph-markov-compiled", "tmcgraph-unrolled", "hand", "hand-compiled", "pyro-enum")
SSM_NAMES = ("tmcgraph-markov", "hand-tmc", "kalman")


def _module(name="perf_markov"):
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module(name)


def _has_pyro():
    try:
        import pyro  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("perf_markov")
    payload = _module().main(["--quick", "--out", str(out)])
    return out, payload


def _path_enumeration(S, T):
    """log p(x) of perf_hmm's HMM at its quick data, summing over all S^T state paths (float64)."""
    hmm = _module("perf_hmm")
    p = hmm.hmm_params(S)
    x = hmm.hmm_data(p, T).double()
    b, A, mu = (p[k].detach().double() for k in ("b", "A", "mu"))
    lb, lA = torch.log_softmax(b, -1), torch.log_softmax(A, -1)
    em = Normal(mu[:, None], hmm.SIGMA).log_prob(x[None, :])  # [S, T]
    terms = []
    for z in itertools.product(range(S), repeat=T):
        lp = lb[z[0]] + em[z[0], 0]
        for t in range(1, T):
            lp = lp + lA[z[t - 1], z[t]] + em[z[t], t]
        terms.append(lp)
    return float(torch.logsumexp(torch.stack(terms), 0))


def _gaussian_marginal(T):
    """log p(x) of the state space model at its quick data: x ~ N(0, Cov(z) + R^2 I) (float64)."""
    pm = _module()
    x = pm.ssm_data(T).double()
    var = [pm.SSM_S0 ** 2]
    for _ in range(1, T):
        var.append(pm.SSM_A ** 2 * var[-1] + pm.SSM_Q ** 2)
    cov = torch.tensor([[pm.SSM_A ** abs(t - s) * var[min(s, t)] for t in range(T)] for s in range(T)],
                       dtype=torch.float64)
    cov = cov + pm.SSM_R ** 2 * torch.eye(T, dtype=torch.float64)
    return float(MultivariateNormal(torch.zeros(T, dtype=torch.float64), cov).log_prob(x))


def _ran(res, reps):
    assert "median_s" in res, res
    assert res["time_basis"] == "cpu"
    assert len(res["times_s"]) == len(res["cpu_s"]) == len(res["wall_s"]) == len(res["values"]) == reps
    assert len(res["warmup_wall_s"]) == 2
    assert all(math.isfinite(v) for v in res["values"])


def test_writes_json_and_png(quick):
    out, payload = quick
    jpath, ppath = out / "perf_markov_quick.json", out / "perf_markov_quick.png"
    assert jpath.exists() and ppath.exists() and ppath.stat().st_size > 10_000
    data = json.loads(jpath.read_text())
    assert data["benchmark"] == "perf_markov" and data["complete"] is True and data["quick"] is True
    assert data["torch_threads"] == 1 and data["machine"]["torch_threads"] == 1
    assert data["limits"]["exp_per_s"] > 0 and set(data["exp_counting_rule"]) == {"hmm", "ssm"}
    assert [(r["workload"], r["mode"]) for r in data["rows"]] == [
        (w, m) for w in ("hmm", "ssm") for m in ("forward", "forward+backward")]
    assert payload["rows"] == data["rows"]


def test_hmm_rows_are_exact(quick):
    _, data = quick
    reps = data["repetitions"]
    truth = _path_enumeration(3, 5)
    rows = [r for r in data["rows"] if r["workload"] == "hmm"]
    for row in rows:
        assert (row["S"], row["T"]) == (3, 5)
        res = row["results"]
        assert set(res) == set(HMM_NAMES)
        for name in ("tmcgraph-markov", "tmcgraph-unrolled", "hand", "hand-compiled"):
            _ran(res[name], reps)
        # quick runs compile hand-written code with aot_eager only; tmcgraph's compile says why not
        assert "--quick" in res["tmcgraph-markov-compiled"]["skipped"]
        if _has_pyro():
            _ran(res["pyro-enum"], reps)
        else:
            assert res["pyro-enum"]["skipped"]
        assert abs(row["exact_log_likelihood"] - truth) < 1e-9
        for name, r in res.items():
            for v in r.get("values", []):
                assert abs(v - truth) < 1e-4, (name, v, truth)
        assert set(row["value_checks"]) == {k for k in res if "values" in res[k]}
        assert row["gradient_check"]["max_abs_error"] < 1e-4
        assert row["chain_method"] in ("scan", "sequential")
        assert row["markov_over_hand"] > 0 and all(v > 0 for v in row["ratios"].values())
        assert "tmcgraph-unrolled/tmcgraph-markov" in row["ratios"]
        assert row["limit"]["ideal_s"] > 0 and set(row["limit"]["fraction_of_limit"]) >= {"tmcgraph-markov", "hand"}
    key = data["key_ratio"]
    assert key["ratio"] == "tmcgraph-markov/hand" and key["T"] == 5 and key["target_at_most"] == 2.0
    assert key["forward"] == rows[0]["markov_over_hand"] and key["forward+backward"] == rows[1]["markov_over_hand"]
    assert isinstance(key["met"], bool)


def test_ssm_rows_are_near_the_gaussian_marginal(quick):
    _, data = quick
    reps = data["repetitions"]
    truth = _gaussian_marginal(5)
    assert data["coupling"] == "permutation"
    for row in (r for r in data["rows"] if r["workload"] == "ssm"):
        assert (row["T"], row["K"]) == (5, 4)
        res = row["results"]
        assert set(res) == set(SSM_NAMES)
        for name in SSM_NAMES:
            _ran(res[name], reps)
        assert abs(row["kalman_log_evidence"] - truth) < 1e-9
        assert all(abs(v - truth) < 1e-3 for v in res["kalman"]["values"])
        # the hand-written estimator draws the same particles as tmcgraph: equal estimates
        tm, hd = res["tmcgraph-markov"]["values"], res["hand-tmc"]["values"]
        assert all(abs(a - b) <= 1e-4 * max(1.0, abs(b)) for a, b in zip(tm, hd)), (tm, hd)
        assert row["value_checks"]["hand-tmc"]["check"].startswith("same particles")
        assert len(set(tm)) == reps  # a new draw per repetition
        for name in ("tmcgraph-markov", "hand-tmc"):
            gap = row["gap_to_kalman"][name]
            assert gap["mean"] == pytest.approx(statistics.fmean(res[name]["values"]) - truth, abs=1e-6)
            assert abs(gap["mean"]) < row["ssm_tol"]
        g = row["gradient_check"]
        assert g["same_particles"] is True and g["abs_difference"] <= g["tolerance"]
        assert set(row["ratios"]) == {"tmcgraph-markov/hand-tmc", "tmcgraph-markov/kalman", "hand-tmc/kalman"}
        assert "kalman" not in row["limit"]["fraction_of_limit"]
        assert row["limit"]["exp_count"] == 2 * 4 * 4 * 4


def test_skips_name_their_reason(tmp_path):
    data = _module().main(["--quick", "--out", str(tmp_path), "--workloads", "hmm", "--no-pyro", "--no-compile",
                           "--T", "3,4", "--unrolled-max-T", "3", "--seeds", "2"])
    assert [(r["T"], r["mode"]) for r in data["rows"]] == [(T, m) for T in (3, 4)
                                                           for m in ("forward", "forward+backward")]
    for row in data["rows"]:
        res = row["results"]
        assert res["pyro-enum"]["skipped"] == "--no-pyro"
        assert res["hand-compiled"]["skipped"] == "--no-compile"
        assert res["tmcgraph-markov-compiled"]["skipped"] == "--no-compile"
        if row["T"] == 3:
            assert len(res["tmcgraph-unrolled"]["values"]) == 2
        else:
            assert "--unrolled-max-T 3" in res["tmcgraph-unrolled"]["skipped"]
        assert all(abs(v - _path_enumeration(3, row["T"])) < 1e-4 for v in res["tmcgraph-markov"]["values"])
    assert data["key_ratio"]["T"] == 4


@pytest.mark.parametrize("bad", [["--T", "1"], ["--ssm-T", "1"], ["--workloads", "lattice"], ["--ssm-tol", "0"]])
def test_rejects_bad_arguments(tmp_path, bad, capsys):
    with pytest.raises(SystemExit):
        _module().main(["--quick", "--out", str(tmp_path), *bad])
    assert "error:" in capsys.readouterr().err
