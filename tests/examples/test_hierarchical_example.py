"""examples/hierarchical.py: its exact answers against an independent closed form, and
its TMC estimates against those (tiny arguments, run through ``main(argv)``)."""

import importlib.util
import math
import pathlib

import numpy as np
import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _load():
    spec = importlib.util.spec_from_file_location("hierarchical_example", ROOT / "examples" / "hierarchical.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _marginal_covariance(t, tau, sigma):
    """Cov(x) with mu and beta integrated out: 1 1^T + t t^T + tau^2 (same group) + sigma^2 I."""
    G, N = t.shape
    tf = t.reshape(-1)
    group = np.repeat(np.arange(G), N)
    return (np.ones((G * N, G * N)) + np.outer(tf, tf) + tau**2 * (group[:, None] == group[None, :])
            + sigma**2 * np.eye(G * N))


def _logpdf(x, cov):
    _, logdet = np.linalg.slogdet(cov)
    return float(-0.5 * (x @ np.linalg.solve(cov, x) + logdet + len(x) * math.log(2 * math.pi)))


def test_exact_answers_match_independent_closed_form():
    ex = _load()
    t, x = ex.make_data(3, 4, seed=5)
    held = np.zeros((3, 4), dtype=bool)
    held[:, -1] = True
    got = ex.exact_answers(t, x, held)
    t, x = t.numpy(), x.numpy()
    xf = x.reshape(-1)
    C = _marginal_covariance(t, ex.TAU, ex.SIGMA)
    assert got["log_evidence"] == pytest.approx(_logpdf(xf, C), abs=1e-9)
    r = ~held.reshape(-1)
    assert got["log_predictive"] == pytest.approx(_logpdf(xf, C) - _logpdf(xf[r], C[np.ix_(r, r)]), abs=1e-9)
    # (mu, beta) is Bayesian linear regression: x = H w + n, n ~ N(0, R), w ~ N(0, I).
    H = np.stack([np.ones(xf.size), t.reshape(-1)], 1)
    R = C - H @ H.T
    prec = np.eye(2) + H.T @ np.linalg.solve(R, H)
    cov = np.linalg.inv(prec)
    mean = cov @ H.T @ np.linalg.solve(R, xf)
    assert got["mu"][0] == pytest.approx(mean[0], abs=1e-9)
    assert got["mu"][1] == pytest.approx(math.sqrt(cov[0, 0]), abs=1e-9)
    assert got["beta"][0] == pytest.approx(mean[1], abs=1e-9)
    assert got["beta"][1] == pytest.approx(math.sqrt(cov[1, 1]), abs=1e-9)


def test_main_tiny_reports_close_to_exact(capsys):
    ex = _load()
    out = ex.main(["--G", "3", "--N", "3", "--K", "32", "--steps", "40", "--reps", "3", "--S", "300",
                   "--sweep", "4,8", "--seed", "1", "--json"])
    printed = capsys.readouterr().out
    assert "posterior samples" in printed and printed.strip().splitlines()[-1].startswith("{")
    exact, after = out["exact"], out["after"]
    assert after["sample_shapes"] == {"mu": [300], "beta": [300], "theta": [300, 3]}
    # Tolerances for K=32 on this 3 x 3 model (observed errors are about a fifth of these).
    assert abs(after["log_evidence"][0] - exact["log_evidence"]) < 0.5
    for name in ("mu", "beta"):
        sd = exact[name][1]
        assert abs(after[f"{name}_mean"][0] - exact[name][0]) < 0.5 * sd
        assert abs(after[f"{name}_sd"][0] - sd) < 0.3 * sd
        assert abs(after[f"sample_{name}"][0] - exact[name][0]) < 0.5 * sd
    assert abs(after["log_predictive"][0] - exact["log_predictive"]) < 1.0
    assert set(out["sweep"]) == {4, 8}
    assert all(math.isfinite(v) for r in out["sweep"].values() for m in r.values() for v in m.values())
    assert torch.get_default_dtype() == torch.float32  # the example does not change it
