"""Binding data: the finiteness check runs once per tensor version and still catches every change."""

import pytest
import torch

import tmcgraph as tg
from tmcgraph.models import toys
from tmcgraph.sampling import data as data_mod


def test_non_finite_data_is_caught_after_an_in_place_change():
    m, q = toys.gaussian_toy()
    est = tg.TMC(m, q, K=4, compile=False)
    x = toys.gaussian_toy_data(4)
    est.log_evidence({"x": x}, seed=0)
    assert data_mod._known_finite(x)  # the second call skips the scan
    x[2] = float("inf")
    assert not data_mod._known_finite(x)
    with pytest.raises(tg.TMCGraphError, match=r"data for 'x' has non-finite values \(first at index \[2\]\)"):
        est.log_evidence({"x": x}, seed=0)


def test_a_new_tensor_with_a_reused_id_is_checked_again():
    m, q = toys.gaussian_toy()
    est = tg.TMC(m, q, K=4, compile=False)
    est.log_evidence({"x": toys.gaussian_toy_data(3)}, seed=0)
    for _ in range(50):  # fresh tensors, some of which may reuse a dead one's id
        bad = torch.tensor([0.0, float("nan"), 1.0])
        with pytest.raises(tg.TMCGraphError, match="non-finite"):
            est.log_evidence({"x": bad}, seed=0)
