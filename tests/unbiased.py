"""Statistical checks shared by the unbiasedness tests."""

import math

import torch


def z_score(log_est: torch.Tensor, exact: float):
    """``(mean(w) - 1) / se`` and ``se`` for w = exp(log_est - exact) over replicates."""
    w = torch.exp(log_est.detach().double() - exact)
    se = w.std() / math.sqrt(w.numel())
    return float((w.mean() - 1) / se), float(se)


def assert_unbiased(log_est, exact, max_se=0.1):
    """exp(log_est) is unbiased for exp(exact): |z| < 4, with a standard error small enough to have power."""
    assert torch.isfinite(log_est).all()
    z, se = z_score(log_est, exact)
    assert abs(z) < 4, f"z-score {z:.2f} (se {se:.3g})"
    assert se < max_se, f"standard error {se:.3g} too large for the test to have power"
