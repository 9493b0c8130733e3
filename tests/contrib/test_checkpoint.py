"""tmcgraph.contrib.checkpoint: round trips, atomic writes, and refusal of bad, foreign or incompatible files."""

import collections
import os
import pickle
import subprocess
import sys
import zipfile

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tmcgraph as tg
from tmcgraph.contrib import checkpoint as ck


class Payload:
    """Unpickling this runs a shell command that creates ``marker`` (what a malicious checkpoint does)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


@pytest.fixture
def evil_files(tmp_path):
    """A raw pickle and a torch.save zip, each running a command when unpickled without restrictions."""
    marker = tmp_path / "MARKER"
    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps({"format": ck.FORMAT, "state": Payload(marker)}))
    zipped = tmp_path / "zipped.pt"
    torch.save({"format": ck.FORMAT, "version": ck.VERSION, "kind": "k", "config": {}, "state": {"x": Payload(marker)}},
               zipped)
    # the payloads are live: an unrestricted load (in a fresh process) does run the command
    for code in (f"import pickle; pickle.load(open({str(raw)!r}, 'rb'))",
                 f"import torch; torch.load({str(zipped)!r}, weights_only=False)"):
        subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
        assert marker.exists(), code
        marker.unlink()
    return marker, raw, zipped


def _state():
    m = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(m.parameters(), lr=0.1)
    m(torch.ones(4, 3)).sum().backward()
    opt.step()
    return m, opt, {"model": m.state_dict(), "optimizer": opt.state_dict(),
                    "rng": torch.Generator().manual_seed(5).get_state(), "epoch": 3, "metrics": [{"loss": -1.5}]}


def test_round_trip_restores_modules_optimiser_and_rng(tmp_path):
    m, opt, state = _state()
    cfg = {"lr": 0.1, "sizes": (3, 4), "name": "x", "flag": True, "none": None, "nested": {"a": [1, 2.5]}}
    p = ck.save(tmp_path / "c.pt", state, kind="demo", config=cfg)
    got = ck.load(p, kind="demo", config=cfg)
    assert got["config"] == {**cfg, "sizes": [3, 4]} and got["kind"] == "demo" and got["version"] == ck.VERSION
    s = got["state"]
    m2 = torch.nn.Linear(3, 2)
    m2.load_state_dict(s["model"])
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), m2.state_dict().values()))
    opt2 = torch.optim.Adam(m2.parameters(), lr=0.1)
    opt2.load_state_dict(s["optimizer"])
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    g = torch.Generator()
    g.set_state(s["rng"])
    assert torch.equal(torch.rand(5, generator=g), torch.rand(5, generator=torch.Generator().manual_seed(5)))
    assert s["epoch"] == 3 and s["metrics"] == [{"loss": -1.5}]
    assert isinstance(s["model"], collections.OrderedDict)
    assert [f.name for f in tmp_path.iterdir()] == ["c.pt"]  # no temporary files left


def test_config_must_be_plain_data_and_nothing_is_written(tmp_path):
    target = tmp_path / "c.pt"
    for cfg, where in [({"w": torch.ones(1)}, r"config\['w'\] is a tensor"),
                       ({"f": object()}, r"config\['f'\] is of type object"),
                       ({"a": {3: 1}}, r"config\['a'\] has a key 3"),
                       ({"s": {1, 2}}, r"config\['s'\] is of type set")]:
        with pytest.raises(ck.CheckpointError, match=where):
            ck.save(target, {}, kind="k", config=cfg)
    with pytest.raises(ck.CheckpointError, match=r"state\['m'\] is of type Linear"):
        ck.save(target, {"m": torch.nn.Linear(1, 1)}, kind="k", config={})
    assert list(tmp_path.iterdir()) == []
    assert issubclass(ck.CheckpointError, tg.TMCGraphError)


def test_atomic_write_keeps_the_old_file_when_saving_fails(tmp_path, monkeypatch):
    target = tmp_path / "c.pt"
    ck.save(target, {"epoch": 1}, kind="k", config={"a": 1})
    before = target.read_bytes()
    real_save = torch.save

    def crash(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        f.write(b"partial")
        raise KeyboardInterrupt  # dies after writing part of the new file

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        ck.save(target, {"epoch": 2}, kind="k", config={"a": 1})
    monkeypatch.undo()
    assert target.read_bytes() == before and [f.name for f in tmp_path.iterdir()] == ["c.pt"]
    assert ck.load(target, kind="k")["state"]["epoch"] == 1
    ck.save(target, {"epoch": 2}, kind="k", config={"a": 1})  # a successful save replaces it
    assert ck.load(target, kind="k")["state"]["epoch"] == 2


def test_foreign_pickles_never_run(tmp_path, evil_files):
    marker, raw, zipped = evil_files
    for path in (raw, zipped):
        before = path.read_bytes()
        with pytest.raises(ck.CheckpointError) as e:
            ck.load(path, kind="k")
        assert str(path) in str(e.value)
        assert not marker.exists()
        assert path.read_bytes() == before
    with pytest.raises(ck.CheckpointError, match="not a zip archive"):
        ck.load(raw, kind="k")
    with pytest.raises(ck.CheckpointError, match="objects other than tensors and plain data"):
        ck.load(zipped, kind="k")
    assert not marker.exists()


def test_missing_empty_junk_and_oversized_files(tmp_path):
    with pytest.raises(ck.CheckpointError, match="no checkpoint at"):
        ck.load(tmp_path / "nope.pt", kind="k")
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(ck.CheckpointError, match=r"empty \(0 bytes\)"):
        ck.load(empty, kind="k")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"hello, not a checkpoint")
    with pytest.raises(ck.CheckpointError, match="not a zip archive"):
        ck.load(junk, kind="k")
    good = ck.save(tmp_path / "good.pt", {"w": torch.zeros(1000)}, kind="k", config={})
    with pytest.raises(ck.CheckpointError, match="more than the 100 bytes allowed"):
        ck.load(good, kind="k", max_bytes=100)
    assert empty.read_bytes() == b"" and junk.read_bytes() == b"hello, not a checkpoint"


@settings(max_examples=20, deadline=None)
@given(frac=st.floats(0.0, 0.999), seed=st.integers(0, 3))
def test_any_truncation_is_a_clear_error(tmp_path_factory, frac, seed):
    d = tmp_path_factory.mktemp("trunc")
    good = ck.save(d / "good.pt", {"w": torch.arange(200.0) + seed, "m": [1, 2]}, kind="k", config={"s": seed})
    data = good.read_bytes()
    cut = d / "cut.pt"
    cut.write_bytes(data[: int(frac * len(data))])
    with pytest.raises(ck.CheckpointError, match=str(cut)):
        ck.load(cut, kind="k")
    assert cut.read_bytes() == data[: int(frac * len(data))]


def test_a_flipped_byte_is_refused_or_loads_plain_data(tmp_path):
    good = ck.save(tmp_path / "good.pt", {"w": torch.ones(50)}, kind="k", config={"a": 1})
    data = bytearray(good.read_bytes())
    for i in range(0, len(data), 37):
        bad = bytearray(data)
        bad[i] ^= 0xFF
        p = tmp_path / "bad.pt"
        p.write_bytes(bytes(bad))
        try:
            got = ck.load(p, kind="k")
        except ck.CheckpointError as e:
            assert str(p) in str(e)
        else:  # a flip inside tensor data or padding still gives a well-formed checkpoint
            assert set(got["state"]) == {"w"}


def test_foreign_format_kind_and_version(tmp_path):
    plain_torch = tmp_path / "plain.pt"
    torch.save({"model": {"w": torch.ones(1)}}, plain_torch)
    with pytest.raises(ck.CheckpointError, match="not a tmcgraph.checkpoint file"):
        ck.load(plain_torch, kind="k")
    other = ck.save(tmp_path / "other.pt", {}, kind="benchmarks/other", config={})
    with pytest.raises(ck.CheckpointError, match="written by 'benchmarks/other', not 'k'"):
        ck.load(other, kind="k")
    future = tmp_path / "future.pt"
    torch.save({"format": ck.FORMAT, "version": 99, "kind": "k", "config": {}, "state": {}}, future)
    with pytest.raises(ck.CheckpointError, match="format version 99"):
        ck.load(future, kind="k")
    assert zipfile.is_zipfile(other)


def test_configuration_mismatch_names_every_setting_with_both_values(tmp_path):
    p = ck.save(tmp_path / "c.pt", {}, kind="k", config={"K": 3, "limit_test": 50, "binarize": False, "shape": [2]})
    with pytest.raises(ck.CheckpointError) as e:
        ck.load(p, kind="k", config={"K": 4, "limit_test": None, "binarize": False, "shape": (2,)},
                label=lambda k: "--" + k.replace("_", "-"))
    msg = str(e.value)
    assert str(p) in msg and "--K: checkpoint 3 vs requested 4" in msg
    assert "--limit-test: checkpoint 50 vs requested None" in msg
    assert "binarize" not in msg and "shape" not in msg  # equal values (a tuple equals its list) are not listed
    assert ck.load(p, kind="k", config={"K": 4, "binarize": False}, keys=["binarize"])  # only compared keys count
    assert ck.config_mismatches({"a": 1}, {"a": True}) == [("a", 1, True)]
    assert ck.config_mismatches({"a": 1.0}, {"a": 1}) == []
    assert ck.config_mismatches({"a": 1}, {"b": 2}) == [("a", 1, None), ("b", None, 2)]
