"""Devices given by users are checked where they are given (tmcgraph.sampling.context.resolve_device)."""

import pytest
import torch
from torch.distributions import Normal

import tmcgraph as tg
from tmcgraph.sampling.context import Context, resolve_device


def _pair(plate="data"):
    m = tg.Model()
    m.plate(plate, size=3)
    m.latent("z", lambda: Normal(0.0, 1.0), plate=plate)
    m.observed("x", lambda z: Normal(z, 1.0), plate=plate)
    q = tg.Proposal(m)
    q.latent("z", lambda: Normal(0.0, 2.0), plate=plate)
    return m, q


def test_cpu_meta_and_none_resolve():
    assert resolve_device(None) is None
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("meta")).type == "meta"


def test_a_string_that_is_no_device_names_the_argument():
    with pytest.raises(tg.TMCGraphError, match=r"device='gpu0' is not a torch device"):
        resolve_device("gpu0")
    with pytest.raises(tg.TMCGraphError, match=r"device=3.5 is not a torch device"):
        Context(device=3.5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("cls", [tg.TMC, tg.IWAE, tg.VAE])
def test_an_unavailable_device_is_refused_at_construction(cls):
    m, q = _pair()
    kw = {} if cls is tg.VAE else {"K": 2}
    with pytest.raises(tg.TMCGraphError, match=r"device='cuda' is not available on this machine.*is_available\(\) is "
                                               r"False"):
        cls(m, q, device="cuda", **kw)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_smc_refuses_an_unavailable_device():
    m, q = _pair("t")
    with pytest.raises(tg.TMCGraphError, match="not available"):
        tg.SMC(m, q, K=4, seq_plate="t", device="cuda:1")


def test_a_cpu_estimator_still_runs():
    m, q = _pair()
    v = tg.TMC(m, q, K=4, device="cpu").log_evidence({"x": torch.zeros(3)}, seed=0)
    assert torch.isfinite(v)
