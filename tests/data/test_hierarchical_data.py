"""The radon and bus-breakdown loaders on tiny synthetic archives, good and bad.

The archives are written here with numpy (the shapes of the real files, synthetic
values); the loaders must return exactly those values, split into training and all
elements, and refuse every broken file with an error naming the file and what is wrong.
"""

import pathlib

import numpy as np
import pytest
import torch

import tmcgraph as tg
from tmcgraph.data import hierarchical as H

ROOT = pathlib.Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared" / "data" / "hierarchical"


def radon_arrays(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "log_radon": rng.normal(size=(4, 300)).astype(np.float32),
        "basement": (rng.random((4, 300)) < 0.5).astype(np.float32),
        "log_uranium": rng.normal(size=(4, 300)).astype(np.float32),
    }


def bus_arrays(seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for r, (R, C) in enumerate([(8, 5), (6, 4), (7, 3), (8, 6), (5, 2)]):
        for part in ("train", "test"):
            out[f"delay_{part}_{r}"] = (rng.random((2, 3, 150)) < 0.7).astype(np.float64)
            out[f"run_type_{part}_{r}"] = np.eye(R, dtype=np.uint8)[rng.integers(R, size=(2, 3, 150))]
            out[f"bus_company_name_{part}_{r}"] = np.eye(C, dtype=np.uint8)[rng.integers(C, size=(2, 3, 150))]
    return out


def write(d: pathlib.Path, name: str, arrays: dict) -> pathlib.Path:
    d.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(d / name, **arrays)
    return d / name


def test_radon_good(tmp_path):
    a = radon_arrays()
    write(tmp_path, "radon.npz", a)
    r = H.load_radon(tmp_path)
    assert r.root == tmp_path
    for k, v in a.items():
        assert r.all[k].dtype == torch.float32 and r.all[k].shape == (4, 300)
        np.testing.assert_array_equal(r.all[k].numpy(), v)
        np.testing.assert_array_equal(r.train[k].numpy(), v[:, :150])
    assert r.heldout.shape == (4, 300) and r.heldout[:, 150:].all() and not r.heldout[:, :150].any()


def test_bus_good_every_split(tmp_path):
    a = bus_arrays()
    write(tmp_path / "hierarchical", "bus_breakdown.npz", a)  # the sub-directory is found too
    for split, (R, C) in enumerate([(8, 5), (6, 4), (7, 3), (8, 6), (5, 2)]):
        b = H.load_bus_breakdown(tmp_path, split)
        assert b.root == tmp_path / "hierarchical" and (b.n_run_types, b.n_companies) == (R, C)
        assert b.all["delay"].shape == (2, 3, 300) and b.all["company"].shape == (2, 3, 300, C)
        np.testing.assert_array_equal(b.train["delay"].numpy(), a[f"delay_train_{split}"])
        np.testing.assert_array_equal(b.all["delay"][:, :, 150:].numpy(), a[f"delay_test_{split}"])
        np.testing.assert_array_equal(b.all["run_type"][:, :, 150:].numpy(), a[f"run_type_test_{split}"])
        np.testing.assert_array_equal(b.train["company"].numpy(), a[f"bus_company_name_train_{split}"])
        assert b.heldout[:, :, 150:].all() and not b.heldout[:, :, :150].any()


def test_env_var(tmp_path, monkeypatch):
    write(tmp_path, "radon.npz", radon_arrays())
    monkeypatch.setenv(H.ENV_VAR, str(tmp_path))
    assert H.load_radon().root == tmp_path


def test_missing_file_says_where(tmp_path, monkeypatch):
    with pytest.raises(tg.TMCGraphError, match=r"radon\.npz not found in .*hierarchical.*put the file"):
        H.load_radon(tmp_path)
    monkeypatch.delenv(H.ENV_VAR, raising=False)
    with pytest.raises(tg.TMCGraphError, match="TMCGRAPH_DATA"):
        H.load_bus_breakdown()


@pytest.mark.parametrize("change, match", [
    (lambda a: a.pop("basement"), "'basement' is missing"),
    (lambda a: a.update(log_radon=a["log_radon"][:, :200]), r"'log_radon' has shape \[4, 200\], expected \[4, 300\]"),
    (lambda a: a["log_uranium"].__setitem__((2, 7), np.nan), r"'log_uranium' has non-finite values .*\[2, 7\]"),
    (lambda a: a["basement"].__setitem__((0, 0), 0.5), "'basement' must be 0/1"),
    (lambda a: a.update(log_radon=a["log_radon"].astype(np.int32)), "dtype int32"),
])
def test_radon_bad(tmp_path, change, match):
    a = radon_arrays()
    change(a)
    write(tmp_path, "radon.npz", a)
    with pytest.raises(tg.TMCGraphError, match=match) as e:
        H.load_radon(tmp_path)
    assert "radon.npz" in str(e.value)


@pytest.mark.parametrize("change, match", [
    (lambda a: a.pop("delay_test_1"), "'delay_test_1' is missing"),
    (lambda a: a.update(delay_train_1=a["delay_train_1"][:, :2]), r"shape \[2, 2, 150\]"),
    (lambda a: a["delay_train_1"].__setitem__((0, 0, 0), np.inf), "non-finite"),
    (lambda a: a["delay_train_1"].__setitem__((0, 0, 0), 2.0), "must be 0/1"),
    (lambda a: a["run_type_test_1"].__setitem__((1, 2, 3), 0), r"one-hot .* row \[1, 2, 3\] sums to 0"),
    (lambda a: a.update(bus_company_name_test_1=np.eye(3, dtype=np.uint8)[np.zeros((2, 3, 150), int)]),
     "width 4 but bus_company_name_test_1 has 3"),
])
def test_bus_bad(tmp_path, change, match):
    a = bus_arrays()
    change(a)
    write(tmp_path, "bus_breakdown.npz", a)
    with pytest.raises(tg.TMCGraphError, match=match):
        H.load_bus_breakdown(tmp_path, split=1)


def test_oversized_and_unreadable(tmp_path, monkeypatch):
    path = write(tmp_path, "radon.npz", radon_arrays())
    monkeypatch.setattr(H, "MAX_FILE_BYTES", 100)
    with pytest.raises(tg.TMCGraphError, match=r"radon\.npz is \d+ bytes, more than the 100"):
        H.load_radon(tmp_path)
    monkeypatch.setattr(H, "MAX_FILE_BYTES", 1 << 20)
    monkeypatch.setattr(H, "MAX_MEMBER_BYTES", 1000)  # each member decompresses to 4800 bytes
    with pytest.raises(tg.TMCGraphError, match="decompresses to"):
        H.load_radon(tmp_path)
    monkeypatch.setattr(H, "MAX_MEMBER_BYTES", 1 << 20)
    path.write_bytes(b"not a zip archive")
    with pytest.raises(tg.TMCGraphError, match="not a readable NumPy"):
        H.load_radon(tmp_path)
    a = radon_arrays()
    a["log_radon"] = np.array([object()] * 1200, dtype=object).reshape(4, 300)  # a pickle inside
    np.savez(path, **a)
    with pytest.raises(tg.TMCGraphError, match="not a readable NumPy"):
        H.load_radon(tmp_path)


def test_bad_arguments(tmp_path):
    write(tmp_path, "bus_breakdown.npz", bus_arrays())
    with pytest.raises(tg.TMCGraphError, match="split must be"):
        H.load_bus_breakdown(tmp_path, split=5)
    write(tmp_path, "radon.npz", radon_arrays())
    with pytest.raises(tg.TMCGraphError, match="n_train"):
        H.load_radon(tmp_path, n_train=300)


@pytest.mark.skipif(not (SHARED / "radon.npz").exists(), reason=f"shared data not in {SHARED}")
def test_shared_files_load():
    r = H.load_radon(SHARED)
    b = H.load_bus_breakdown(SHARED, 0)
    assert r.train["log_radon"].shape == (4, 150)
    assert (b.n_run_types, b.n_companies) == (8, 59)
