"""The MNIST loader: IDX parsing, checksums, directory resolution, downloads and their failures."""

import gzip
import hashlib
import io
import os
import struct

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tmcgraph as tg
from tmcgraph.data import mnist as mnist_data

NAMES = list(mnist_data.FILES.values())


def idx_bytes(a: np.ndarray) -> bytes:
    """IDX encoding of a uint8 array: magic 0 0 8 ndim, big-endian sizes, data."""
    return bytes([0, 0, 8, a.ndim]) + struct.pack(f">{a.ndim}I", *a.shape) + a.astype(np.uint8).tobytes()


def write_tiny_mnist(d, n_train=12, n_test=5, seed=0):
    """Write the four files with small arrays; return ``(arrays, checksums)``."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte.gz": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte.gz": rng.integers(0, 10, (n_train,), dtype=np.uint8),
        "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte.gz": rng.integers(0, 10, (n_test,), dtype=np.uint8),
    }
    sums = {}
    os.makedirs(d, exist_ok=True)
    for name, a in arrays.items():
        raw = idx_bytes(a)
        with gzip.open(os.path.join(d, name), "wb") as f:
            f.write(raw)
        sums[name] = (hashlib.md5(raw).hexdigest(), len(raw))
    return arrays, sums


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    d = tmp_path / "mnist"
    arrays, sums = write_tiny_mnist(d)
    monkeypatch.setattr(mnist_data, "CHECKSUMS", sums)
    return d, arrays, sums


def test_loads_the_tiny_files_exactly(tiny):
    d, arrays, _ = tiny
    m = mnist_data.load_mnist(d, download=False)
    assert np.array_equal(m.train_images.numpy(), arrays["train-images-idx3-ubyte.gz"])
    assert np.array_equal(m.test_labels.numpy(), arrays["t10k-labels-idx1-ubyte.gz"])
    assert m.train_x.shape == (12, 784) and m.test_x.shape == (5, 784)
    assert torch.allclose(m.train_x[3] * 255, m.train_images[3].reshape(-1).float())
    assert 0 <= float(m.train_x.min()) and float(m.train_x.max()) <= 1


def test_corrupt_content_fails_checksum_and_is_not_overwritten(tiny):
    d, arrays, _ = tiny
    a = arrays["t10k-images-idx3-ubyte.gz"].copy()
    a[0, 0, 0] ^= 1  # same size, different content
    path = d / "t10k-images-idx3-ubyte.gz"
    with gzip.open(path, "wb") as f:
        f.write(idx_bytes(a))
    before = path.read_bytes()
    with pytest.raises(tg.TMCGraphError, match="t10k-images-idx3-ubyte.gz.*corrupt: MD5") as e:
        mnist_data.load_mnist(d)  # download allowed: still no overwrite
    assert str(d) in str(e.value)
    assert path.read_bytes() == before


def test_size_mismatch_and_truncated_files(tiny, monkeypatch):
    d, arrays, sums = tiny
    path = d / "train-labels-idx1-ubyte.gz"
    with gzip.open(path, "wb") as f:
        f.write(idx_bytes(arrays["train-labels-idx1-ubyte.gz"])[:-3])
    with pytest.raises(tg.TMCGraphError, match="train-labels-idx1-ubyte.gz.*decompressed size"):
        mnist_data.load_mnist(d, download=False)
    # without a checksum entry the IDX header is checked against the data
    monkeypatch.setattr(mnist_data, "CHECKSUMS", {})
    with pytest.raises(tg.TMCGraphError, match=r"header says shape \(12,\).*holds 9 bytes"):
        mnist_data.load_mnist(d, download=False)
    path.write_bytes(b"not gzip at all")
    with pytest.raises(tg.TMCGraphError, match="not a readable gzip file"):
        mnist_data.read_idx(path)
    with gzip.open(path, "wb") as f:
        f.write(b"\x01\x02\x03\x04rest")
    with pytest.raises(tg.TMCGraphError, match="bad magic"):
        mnist_data.read_idx(path)


def test_image_label_count_mismatch(tmp_path, monkeypatch):
    d = tmp_path / "m"
    _, sums = write_tiny_mnist(d)
    labels = np.zeros(11, dtype=np.uint8)
    raw = idx_bytes(labels)
    with gzip.open(d / "train-labels-idx1-ubyte.gz", "wb") as f:
        f.write(raw)
    sums["train-labels-idx1-ubyte.gz"] = (hashlib.md5(raw).hexdigest(), len(raw))
    monkeypatch.setattr(mnist_data, "CHECKSUMS", sums)
    with pytest.raises(tg.TMCGraphError, match="do not match labels"):
        mnist_data.load_mnist(d, download=False)


def test_missing_files_without_network_name_directory_and_files(tmp_path, monkeypatch):
    def no_network(*a, **k):
        raise OSError("network unreachable")

    monkeypatch.setattr(mnist_data, "urlopen", no_network)
    d = tmp_path / "empty"
    with pytest.raises(tg.TMCGraphError) as e:
        mnist_data.load_mnist(d)
    msg = str(e.value)
    assert str(d) in msg and all(n in msg for n in NAMES) and "network unreachable" in msg
    assert list(d.iterdir()) == []  # no partial downloads left behind
    with pytest.raises(tg.TMCGraphError, match="downloading is off") as e:
        mnist_data.load_mnist(tmp_path / "nowhere", download=False)
    assert all(n in str(e.value) for n in NAMES)


def test_download_verifies_and_installs_files(tmp_path, monkeypatch):
    src = tmp_path / "server"
    arrays, sums = write_tiny_mnist(src, seed=3)
    monkeypatch.setattr(mnist_data, "CHECKSUMS", sums)
    served = []

    def fake_urlopen(url, timeout=None):
        served.append(url)
        return io.BytesIO((src / url.rsplit("/", 1)[1]).read_bytes())

    monkeypatch.setattr(mnist_data, "urlopen", fake_urlopen)
    d = tmp_path / "cache"
    m = mnist_data.load_mnist(d)
    assert len(served) == 4 and all(u.startswith(mnist_data.MIRRORS[0]) for u in served)
    assert np.array_equal(m.train_images.numpy(), arrays["train-images-idx3-ubyte.gz"])
    assert sorted(p.name for p in d.iterdir()) == sorted(NAMES)

    # a mirror serving corrupt content: rejected by every mirror, nothing installed
    bad = tmp_path / "bad"
    monkeypatch.setattr(mnist_data, "urlopen", lambda url, timeout=None: io.BytesIO(gzip.compress(b"\0\0\x08\x01junk")))
    with pytest.raises(tg.TMCGraphError, match="download failed") as e:
        mnist_data.load_mnist(bad)
    assert str(bad) in str(e.value) and "corrupt" in str(e.value)
    assert list(bad.iterdir()) == []


def test_directory_resolution(tmp_path, monkeypatch):
    monkeypatch.delenv(mnist_data.ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert mnist_data.mnist_dir() == tmp_path / "xdg" / "tmcgraph" / "mnist"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert mnist_data.mnist_dir() == tmp_path / "home" / ".cache" / "tmcgraph" / "mnist"
    monkeypatch.setenv(mnist_data.ENV_VAR, str(tmp_path / "env"))
    assert mnist_data.mnist_dir() == tmp_path / "env"
    assert mnist_data.mnist_dir(tmp_path / "arg") == tmp_path / "arg"  # the argument wins
    write_tiny_mnist(tmp_path / "root" / "mnist")
    assert mnist_data.mnist_dir(tmp_path / "root") == tmp_path / "root" / "mnist"


@settings(max_examples=25, deadline=None)
@given(shape=st.lists(st.integers(1, 5), min_size=1, max_size=4), seed=st.integers(0, 2**16))
def test_idx_round_trip(tmp_path_factory, shape, seed):
    a = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
    p = tmp_path_factory.mktemp("idx") / "x.gz"
    p.write_bytes(gzip.compress(idx_bytes(a)))
    assert np.array_equal(mnist_data.read_idx(p), a)


def test_binarize_and_batches():
    g = torch.Generator().manual_seed(0)
    x = torch.full((2000, 784), 0.3)
    b = mnist_data.binarize(x, g)
    assert set(b.unique().tolist()) <= {0.0, 1.0}
    assert abs(float(b.mean()) - 0.3) < 4 * (0.3 * 0.7 / b.numel()) ** 0.5
    idx = mnist_data.batches(10, 4, generator=g)
    assert [len(i) for i in idx] == [4, 4, 2]
    assert sorted(torch.cat(idx).tolist()) == list(range(10))
    with pytest.raises(tg.TMCGraphError, match="batch_size"):
        mnist_data.batches(10, 0)


def test_shared_mnist_files(mnist_dir):
    m = mnist_data.load_mnist(mnist_dir, download=False)  # verifies sizes and checksums
    assert m.train_images.shape == (60000, 28, 28) and m.test_images.shape == (10000, 28, 28)
    assert m.train_labels.bincount().tolist()[:3] == [5923, 6742, 5958]
    assert m.test_labels.bincount().sum() == 10000
    assert m.train_images.dtype == torch.uint8 and int(m.train_images.max()) == 255
    assert m.root == mnist_dir
