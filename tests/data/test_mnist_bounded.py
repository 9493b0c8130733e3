"""The IDX reader reads bounded sizes (gzip bombs, oversized raw files) and knows MNIST and Fashion-MNIST."""

import gzip
import hashlib
import os
import struct
import time
import tracemalloc

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tmcgraph as tg
from tmcgraph.data import mnist as mnist_data

NAMES = list(mnist_data.FILES.values())
MiB = 1 << 20


def idx_bytes(a: np.ndarray) -> bytes:
    """IDX encoding of a uint8 array: magic 0 0 8 ndim, big-endian sizes, data."""
    return bytes([0, 0, 8, a.ndim]) + struct.pack(f">{a.ndim}I", *a.shape) + a.astype(np.uint8).tobytes()


def bomb(path, head: bytes, gigabytes: float = 1.0):
    """A gzip file of ``head`` followed by ``gigabytes`` GB of zeros, about 1 MB on disk.

    gzip allows concatenated members, so one compressed 16 MiB block of zeros is repeated.
    """
    block = gzip.compress(bytes(16 * MiB), compresslevel=9)
    with open(path, "wb") as f:
        f.write(gzip.compress(head))
        for _ in range(int(gigabytes * 1024 / 16)):
            f.write(block)
    return path


def write_set(d, n_train=6, n_test=4, seed=0, compress=True):
    """The four files with small 28 x 28 arrays; returns ``(arrays, content digests, .gz digests)``."""
    rng = np.random.default_rng(seed)
    arrays = {
        NAMES[0]: rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        NAMES[1]: rng.integers(0, 10, (n_train,), dtype=np.uint8),
        NAMES[2]: rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        NAMES[3]: rng.integers(0, 10, (n_test,), dtype=np.uint8),
    }
    os.makedirs(d, exist_ok=True)
    content, gz = {}, {}
    for name, a in arrays.items():
        raw = idx_bytes(a)
        if compress:
            (d / name).write_bytes(gzip.compress(raw))
            gz[name] = mnist_data.Digest(len(raw), None, hashlib.md5((d / name).read_bytes()).hexdigest())
        else:
            (d / name[:-3]).write_bytes(raw)
        content[name] = mnist_data.Digest(len(raw), hashlib.md5(raw).hexdigest())
    return arrays, content, gz


def peak_bytes(fn):
    """Run ``fn`` (which must raise TMCGraphError); return (error, peak Python heap bytes, seconds)."""
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(tg.TMCGraphError) as e:
            fn()
    finally:
        seconds = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return e.value, peak, seconds


def test_the_digest_tables_match_the_shapes():
    for table in (mnist_data.CHECKSUMS, mnist_data.FASHION_MNIST_CHECKSUMS):
        sizes = {n: mnist_data._as_digest(v).size for n, v in table.items()}
        assert sizes == {NAMES[0]: 16 + 60000 * 784, NAMES[1]: 8 + 60000, NAMES[2]: 16 + 10000 * 784,
                         NAMES[3]: 8 + 10000}
    assert all(len(d.gz_md5) == 32 and d.md5 is None for d in mnist_data.FASHION_MNIST_CHECKSUMS.values())


def test_gzip_bomb_with_a_known_name_reads_only_the_expected_size(tmp_path, monkeypatch):
    a = np.zeros((5000, 28, 28), dtype=np.uint8)  # 3.9 MB of expected content
    head = idx_bytes(a)
    monkeypatch.setattr(mnist_data, "CHECKSUMS", {NAMES[2]: (hashlib.md5(head).hexdigest(), len(head))})
    path = bomb(tmp_path / NAMES[2], head[:16], gigabytes=1.0)
    assert path.stat().st_size < 2 * MiB  # small on disk, 1 GB of content
    err, peak, _ = peak_bytes(lambda: mnist_data.read_idx(path))
    assert NAMES[2] in str(err) and str(tmp_path) in str(err)
    assert f"decompressed size exceeds the expected {len(head)} bytes" in str(err)
    assert peak < 2 * len(head) + MiB, f"peak Python heap {peak / MiB:.1f} MiB while rejecting a 1 GB bomb"


def test_gzip_file_too_large_for_its_expected_content_is_refused_unread(tmp_path, monkeypatch):
    head = idx_bytes(np.zeros((10, 28, 28), dtype=np.uint8))
    monkeypatch.setattr(mnist_data, "CHECKSUMS", {NAMES[2]: (hashlib.md5(head).hexdigest(), len(head))})
    path = bomb(tmp_path / NAMES[2], head, gigabytes=1.0)
    err, peak, _ = peak_bytes(lambda: mnist_data.read_idx(path))
    assert f"{NAMES[2]} in {tmp_path} is {path.stat().st_size} bytes on disk" in str(err)
    assert peak < MiB


def test_gzip_bomb_without_a_checksum_is_bounded_by_its_header(tmp_path):
    head = idx_bytes(np.zeros((3, 28, 28), dtype=np.uint8))
    path = bomb(tmp_path / "images.gz", head, gigabytes=1.0)
    err, peak, _ = peak_bytes(lambda: mnist_data.read_idx(path))
    assert "images.gz" in str(err) and "header says shape (3, 28, 28)" in str(err) and "holds more" in str(err)
    assert peak < 4 * MiB
    # a header that announces more than max_bytes is refused before its data is read
    huge = bytes([0, 0, 8, 3]) + struct.pack(">3I", 60000, 2000, 2000)
    path = bomb(tmp_path / "huge.gz", huge, gigabytes=0.25)
    err, peak, _ = peak_bytes(lambda: mnist_data.read_idx(path))
    assert "huge.gz" in str(err) and "more than the 268435456 bytes allowed" in str(err) and peak < 4 * MiB


def test_bomb_among_the_dataset_files_is_reported_by_load_mnist(tmp_path, monkeypatch):
    d = tmp_path / "mnist"
    _, content, _ = write_set(d, n_train=3000)  # 2.4 MB of training images
    monkeypatch.setattr(mnist_data, "CHECKSUMS", content)
    header = gzip.decompress((d / NAMES[0]).read_bytes())[:16]
    bomb(d / NAMES[0], header, gigabytes=0.5)  # the right header, then far too many (zero) pixels
    before = (d / NAMES[0]).read_bytes()
    err, peak, _ = peak_bytes(lambda: mnist_data.load_mnist(d, download=False))
    assert NAMES[0] in str(err) and "exceeds the expected" in str(err)
    assert peak < 2 * content[NAMES[0]].size + MiB
    assert (d / NAMES[0]).read_bytes() == before  # never overwritten


def test_oversized_raw_file_is_read_only_up_to_the_expected_size(tmp_path, monkeypatch):
    a = np.zeros((2, 28, 28), dtype=np.uint8)
    raw = idx_bytes(a)
    path = tmp_path / NAMES[2][:-3]  # the uncompressed name
    with open(path, "wb") as f:
        f.write(raw)
        f.truncate(1 << 30)  # sparse: 1 GB long, almost nothing on disk
    monkeypatch.setattr(mnist_data, "CHECKSUMS", {NAMES[2]: mnist_data.Digest(len(raw), hashlib.md5(raw).hexdigest())})
    err, peak, _ = peak_bytes(lambda: mnist_data.read_idx(path))
    assert path.name in str(err) and "exceeds the expected 1584 bytes" in str(err) and peak < 4 * MiB
    err, peak, _ = peak_bytes(lambda: mnist_data.read_idx(path, verify=False))  # bounded by the header
    assert "holds more" in str(err) and peak < 4 * MiB


def test_gz_file_larger_on_disk_than_its_content_allows_is_refused_unread(tmp_path, monkeypatch):
    raw = idx_bytes(np.zeros((1, 2), dtype=np.uint8))
    monkeypatch.setattr(mnist_data, "CHECKSUMS", {NAMES[3]: (hashlib.md5(raw).hexdigest(), len(raw))})
    path = tmp_path / NAMES[3]
    with open(path, "wb") as f:
        f.write(gzip.compress(raw))
        f.truncate(1 << 30)
    with pytest.raises(tg.TMCGraphError, match=f"{NAMES[3]} in .* is {1 << 30} bytes on disk"):
        mnist_data.read_idx(path)


@settings(max_examples=25, deadline=None)
@given(delta=st.integers(-20, 20).filter(lambda k: k != 0), compress=st.booleans())
def test_content_longer_or_shorter_than_expected_names_the_file(tmp_path_factory, delta, compress):
    d = tmp_path_factory.mktemp("len")
    raw = idx_bytes(np.arange(40, dtype=np.uint8).reshape(2, 20))
    body = raw + bytes(delta) if delta > 0 else raw[:delta]
    name = "train-labels-idx1-ubyte.gz" if compress else "train-labels-idx1-ubyte"
    path = d / name
    path.write_bytes(gzip.compress(body) if compress else body)
    table = {"train-labels-idx1-ubyte.gz": mnist_data.Digest(len(raw), hashlib.md5(raw).hexdigest())}
    old = mnist_data.CHECKSUMS
    mnist_data.CHECKSUMS = table
    try:
        with pytest.raises(tg.TMCGraphError, match=f"{name} in .*decompressed size"):
            mnist_data.read_idx(path)
    finally:
        mnist_data.CHECKSUMS = old
    with pytest.raises(tg.TMCGraphError, match=f"{name} in .*header says shape"):
        mnist_data.read_idx(path, verify=False)


def test_uncompressed_mnist_files_load_and_are_verified(tmp_path, monkeypatch):
    d = tmp_path / "raw"
    arrays, content, _ = write_set(d, compress=False)
    monkeypatch.setattr(mnist_data, "CHECKSUMS", content)
    m = mnist_data.load_mnist(d, download=False)
    assert np.array_equal(m.train_images.numpy(), arrays[NAMES[0]]) and m.dataset == "mnist"
    assert np.array_equal(m.test_labels.numpy(), arrays[NAMES[3]])
    a = arrays[NAMES[2]].copy()
    a[0, 0, 0] ^= 1
    (d / NAMES[2][:-3]).write_bytes(idx_bytes(a))
    with pytest.raises(tg.TMCGraphError, match="t10k-images-idx3-ubyte in .* corrupt: MD5"):
        mnist_data.load_mnist(d, download=False)


def test_fashion_mnist_by_name_with_its_gz_digests(tmp_path, monkeypatch):
    def no_network(*a, **k):
        raise AssertionError("Fashion-MNIST must never be downloaded")

    monkeypatch.setattr(mnist_data, "urlopen", no_network)
    root = tmp_path / "data"
    arrays, _, gz = write_set(root / "fashion-mnist", seed=7)  # found in the dataset's sub-directory
    monkeypatch.setattr(mnist_data, "FASHION_MNIST_CHECKSUMS", gz)
    m = mnist_data.load_mnist(root, download=True, dataset="fashion-mnist")
    assert m.dataset == "fashion-mnist" and m.root == root / "fashion-mnist"
    assert np.array_equal(m.train_images.numpy(), arrays[NAMES[0]])
    assert torch.equal(m.test_labels, torch.from_numpy(arrays[NAMES[3]].astype(np.int64)))
    # a .gz whose bytes differ from the published file is refused
    d = root / "fashion-mnist"
    (d / NAMES[1]).write_bytes(gzip.compress(idx_bytes(arrays[NAMES[1]]), compresslevel=1, mtime=12345))
    with pytest.raises(tg.TMCGraphError, match=r"train-labels-idx1-ubyte.gz in .*MD5 \w+ of the .gz file, expected"):
        mnist_data.load_mnist(root, dataset="fashion-mnist")
    # an uncompressed copy has no recorded content digest: its size and IDX header are checked
    (d / NAMES[1]).unlink()
    (d / NAMES[1][:-3]).write_bytes(idx_bytes(arrays[NAMES[1]]))
    assert np.array_equal(mnist_data.load_mnist(root, dataset="fashion-mnist").train_labels.numpy(), arrays[NAMES[1]])
    (d / NAMES[1][:-3]).write_bytes(idx_bytes(arrays[NAMES[1]][:-1]))
    with pytest.raises(tg.TMCGraphError, match="train-labels-idx1-ubyte in .*decompressed size"):
        mnist_data.load_mnist(root, dataset="fashion-mnist")
    # missing files: the error names the directory and the four files, and nothing is fetched
    with pytest.raises(tg.TMCGraphError) as e:
        mnist_data.load_mnist(tmp_path / "none", dataset="fashion-mnist")
    msg = str(e.value)
    assert "Fashion-MNIST" in msg and str(tmp_path / "none") in msg and all(n in msg for n in NAMES)
    assert "never downloaded" in msg
    with pytest.raises(tg.TMCGraphError, match="dataset must be one of"):
        mnist_data.load_mnist(root, dataset="kmnist")


def test_images_must_be_28_by_28(tmp_path, monkeypatch):
    d = tmp_path / "m"
    _, content, _ = write_set(d)
    raw = idx_bytes(np.zeros((6, 27, 29), dtype=np.uint8))
    (d / NAMES[0]).write_bytes(gzip.compress(raw))
    content[NAMES[0]] = mnist_data.Digest(len(raw), hashlib.md5(raw).hexdigest())
    monkeypatch.setattr(mnist_data, "CHECKSUMS", content)
    with pytest.raises(tg.TMCGraphError, match=r"images of shape \(6, 27, 29\).*expected \[N, 28, 28\]"):
        mnist_data.load_mnist(d, download=False)


def test_dataset_directories(tmp_path, monkeypatch):
    monkeypatch.delenv(mnist_data.ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert mnist_data.dataset_dir("fashion-mnist") == tmp_path / "xdg" / "tmcgraph" / "fashion-mnist"
    monkeypatch.setenv(mnist_data.ENV_VAR, str(tmp_path / "env"))
    assert mnist_data.dataset_dir("fashion-mnist") == tmp_path / "env"
    write_set(tmp_path / "env" / "fashion-mnist", compress=False)
    assert mnist_data.dataset_dir("fashion-mnist") == tmp_path / "env" / "fashion-mnist"
    assert mnist_data.dataset_dir("mnist") == tmp_path / "env"  # the other dataset's sub-directory is ignored
