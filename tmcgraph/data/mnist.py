"""MNIST and Fashion-MNIST from the four standard IDX files, with checksums and bounded reads.

Both datasets use the same four file names (``train-images-idx3-ubyte.gz``,
``train-labels-idx1-ubyte.gz``, ``t10k-images-idx3-ubyte.gz``,
``t10k-labels-idx1-ubyte.gz``); each file may also be stored uncompressed (the same name
without ``.gz``). Where the files are looked for, in order:

1. the ``root`` argument of :func:`load_mnist` / :func:`dataset_dir`;
2. the ``TMCGRAPH_DATA`` environment variable;
3. ``$XDG_CACHE_HOME/tmcgraph/<dataset>`` (default ``~/.cache/tmcgraph/<dataset>``).

A directory that holds the files in a sub-directory named after the dataset (``mnist/``
or ``fashion-mnist/``) is accepted too. Missing MNIST files are downloaded from the
standard mirrors when ``download`` is true (only when :func:`load_mnist` is called, never
at import) to a temporary name, verified, then renamed into place; Fashion-MNIST is never
downloaded. When a file cannot be obtained the error names the directory and the four
files to put there. A file that is present but corrupt (wrong size or checksum, bad IDX
header) is an error and is never overwritten.

Verification (:data:`CHECKSUMS`, :data:`FASHION_MNIST_CHECKSUMS`, one :class:`Digest`
per file):

* MNIST: byte count and MD5 of the *decompressed* IDX content, so any gzip
  re-compression (or an uncompressed copy) of the standard files is accepted.
* Fashion-MNIST: byte count of the decompressed content (it follows from the shapes
  60000 x 28 x 28 and 10000 x 28 x 28) and the MD5 of the published ``.gz`` file
  (Zalando Research's release, as listed by torchvision). The MD5 of the decompressed
  content is not recorded here, so an uncompressed or re-compressed Fashion-MNIST file is
  checked only for its size, IDX header and shape, not its content.

Bounded reads: a file is never decompressed past its expected size. The reader asks for
at most ``size + 1`` decompressed bytes (the size from the table above or, for files
without an entry, from the IDX header, capped by ``max_bytes``), so a gzip bomb costs at
most that much memory and time, and is reported as too large, naming the file.

Targets: :attr:`MNIST.train_x` / :attr:`MNIST.test_x` are grey levels in [0, 1], used
directly as Bernoulli targets (as in the TMC paper's code); :func:`binarize` draws a
dynamic binarisation (resample it every epoch).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pathlib
import struct
import tempfile
import zlib
from dataclasses import dataclass
from typing import Optional
from urllib.request import urlopen

import numpy as np
import torch

from ..errors import TMCGraphError

__all__ = [
    "MNIST",
    "Digest",
    "DATASETS",
    "FILES",
    "CHECKSUMS",
    "FASHION_MNIST_CHECKSUMS",
    "MIRRORS",
    "ENV_VAR",
    "MAX_BYTES",
    "default_cache_dir",
    "dataset_dir",
    "mnist_dir",
    "read_idx",
    "load_mnist",
    "binarize",
    "batches",
]

#: Environment variable naming the data directory.
ENV_VAR = "TMCGRAPH_DATA"

#: Dataset names accepted by :func:`load_mnist` (also the sub-directory names looked for).
DATASETS = ("mnist", "fashion-mnist")

#: Largest decompressed IDX content read for a file without a checksum entry (bytes).
MAX_BYTES = 256 << 20

#: Role -> file name of the four standard files (the same for both datasets).
FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}


@dataclass(frozen=True)
class Digest:
    """What a file must match.

    Attributes:
        size: Bytes of the decompressed IDX content (header included).
        md5: MD5 of the decompressed content, or ``None`` if not recorded.
        gz_md5: MD5 of the published ``.gz`` file, or ``None``; checked only when the
            content MD5 is not recorded and the file is gzip-compressed.
    """

    size: int
    md5: Optional[str] = None
    gz_md5: Optional[str] = None


#: MNIST file name -> :class:`Digest` (a ``(md5, size)`` pair is accepted as well).
CHECKSUMS = {
    "train-images-idx3-ubyte.gz": Digest(47040016, "6bbc9ace898e44ae57da46a324031adb"),
    "train-labels-idx1-ubyte.gz": Digest(60008, "a25bea736e30d166cdddb491f175f624"),
    "t10k-images-idx3-ubyte.gz": Digest(7840016, "2646ac647ad5339dbf082846283269ea"),
    "t10k-labels-idx1-ubyte.gz": Digest(10008, "27ae3e4e09519cfbb04c329615203637"),
}

#: Fashion-MNIST file name -> :class:`Digest` (content sizes from the shapes; MD5s of the published ``.gz`` files).
FASHION_MNIST_CHECKSUMS = {
    "train-images-idx3-ubyte.gz": Digest(47040016, None, "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
    "train-labels-idx1-ubyte.gz": Digest(60008, None, "25c81989df183df01b3e8a0aad5dffbe"),
    "t10k-images-idx3-ubyte.gz": Digest(7840016, None, "bef4ecab320f06d8554ea6380940ec79"),
    "t10k-labels-idx1-ubyte.gz": Digest(10008, None, "bb300cfdad3c16e7a12a480ee83cd310"),
}

#: Base URLs tried in order (MNIST only).
MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)

_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


@dataclass
class MNIST:
    """The arrays of MNIST or Fashion-MNIST.

    Attributes:
        train_images: ``uint8`` tensor ``[60000, 28, 28]``.
        train_labels: ``int64`` tensor ``[60000]``.
        test_images: ``uint8`` tensor ``[10000, 28, 28]``.
        test_labels: ``int64`` tensor ``[10000]``.
        root: Directory the files were read from.
        dataset: ``"mnist"`` or ``"fashion-mnist"``.
    """

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    root: pathlib.Path
    dataset: str = "mnist"

    @property
    def train_x(self) -> torch.Tensor:
        """Training grey levels in [0, 1], flattened: ``float32 [N, 784]``."""
        return self.train_images.reshape(len(self.train_images), -1).float() / 255.0

    @property
    def test_x(self) -> torch.Tensor:
        """Test grey levels in [0, 1], flattened: ``float32 [N, 784]``."""
        return self.test_images.reshape(len(self.test_images), -1).float() / 255.0


def _dataset(dataset: str) -> str:
    if dataset not in DATASETS:
        raise TMCGraphError(f"dataset must be one of {DATASETS}, got {dataset!r}")
    return dataset


def _checksums(dataset: str) -> dict:
    """File name -> :class:`Digest` of ``dataset`` (looked up at call time)."""
    table = CHECKSUMS if _dataset(dataset) == "mnist" else FASHION_MNIST_CHECKSUMS
    return {name: _as_digest(v) for name, v in table.items()}


def _as_digest(v) -> Digest:
    if isinstance(v, Digest):
        return v
    md5, size = v
    return Digest(int(size), md5)


def default_cache_dir(dataset: str = "mnist") -> pathlib.Path:
    """``$XDG_CACHE_HOME/tmcgraph/<dataset>``, or ``~/.cache/tmcgraph/<dataset>``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "tmcgraph" / _dataset(dataset)


def _find(d: pathlib.Path, name: str) -> Optional[pathlib.Path]:
    """``d / name``, else its uncompressed twin (``name`` without ``.gz``), else ``None``."""
    for p in (d / name, d / name[: -len(".gz")]):
        if p.is_file():
            return p
    return None


def dataset_dir(dataset: str = "mnist", root=None) -> pathlib.Path:
    """The directory ``dataset`` is read from (argument, then ``TMCGRAPH_DATA``, then the cache).

    If the chosen directory lacks the files but has a sub-directory named after the
    dataset that holds them, that sub-directory is used.
    """
    _dataset(dataset)
    if root is None:
        root = os.environ.get(ENV_VAR) or None
    d = pathlib.Path(root).expanduser() if root is not None else default_cache_dir(dataset)
    sub = d / dataset
    if not all(_find(d, n) for n in FILES.values()) and all(_find(sub, n) for n in FILES.values()):
        return sub
    return d


def mnist_dir(root=None) -> pathlib.Path:
    """:func:`dataset_dir` of MNIST."""
    return dataset_dir("mnist", root)


def _missing_message(d: pathlib.Path, why: str, dataset: str = "mnist") -> str:
    names = "\n".join(f"  {n}" for n in FILES.values())
    title = {"mnist": "MNIST", "fashion-mnist": "Fashion-MNIST"}[dataset]
    return (
        f"{title} is not available in {d} ({why}). Put the four standard IDX files there "
        f"(gzip-compressed or not):\n{names}\n(or pass another directory, or set {ENV_VAR})"
    )


def _where(path: pathlib.Path) -> str:
    return f"{path.name} in {path.parent}"


def _read_limited(f, n: int) -> bytearray:
    """At most ``n`` bytes from ``f``, read in chunks into one buffer (memory is bounded by ``n``)."""
    buf = bytearray()
    while len(buf) < n:
        b = f.read(min(1 << 20, n - len(buf)))
        if not b:
            break
        buf += b
    return buf


def _header_size(head: bytes, where: str, max_bytes: int) -> int:
    """Total IDX size (header + data) announced by the header bytes ``head``."""
    if len(head) < 4 or head[0] != 0 or head[1] != 0 or head[2] not in _IDX_TYPES:
        raise TMCGraphError(f"{where}: not an IDX file (bad magic number {head[:4].hex() or 'empty'})")
    ndim = head[3]
    if ndim < 1 or len(head) < 4 + 4 * ndim:
        raise TMCGraphError(f"{where}: truncated IDX header ({len(head)} bytes, {ndim} dims)")
    shape = struct.unpack(f">{ndim}I", head[4 : 4 + 4 * ndim])
    total = 4 + 4 * ndim + int(np.prod(shape, dtype=object)) * np.dtype(_IDX_TYPES[head[2]]).itemsize
    if total > max_bytes:
        raise TMCGraphError(
            f"{where}: IDX header says shape {shape} ({total} bytes), more than the {max_bytes} bytes allowed"
        )
    return total


def _content(path: pathlib.Path, size: Optional[int], max_bytes: int) -> bytearray:
    """The (decompressed, for ``.gz`` names) content of ``path``, reading at most ``size + 1`` bytes.

    Without ``size`` the IDX header's announced size is used. The result is longer than
    ``size`` only by the one byte that shows the file holds more.
    """
    where = _where(path)
    gz = path.name.endswith(".gz")
    disk = path.stat().st_size
    cap = size if size is not None else max_bytes
    if gz and disk > cap + cap // 100 + (64 << 10):  # deflate never expands data by more than ~0.01 %
        raise TMCGraphError(
            f"{where} is {disk} bytes on disk, more than any gzip file of {cap} bytes of content can be; "
            "delete it and fetch it again"
        )
    try:
        with open(path, "rb") as raw:
            f = gzip.GzipFile(fileobj=raw, mode="rb") if gz else raw
            if size is None:
                head = _read_limited(f, 4)
                if len(head) == 4 and head[0] == 0 and head[1] == 0:
                    head += _read_limited(f, 4 * head[3])
                size = _header_size(head, where, max_bytes)
                return head + _read_limited(f, size + 1 - len(head))
            return _read_limited(f, size + 1)
    except (OSError, EOFError, zlib.error) as e:
        raise TMCGraphError(
            f"{where} is not a readable gzip file ({e}); delete it and fetch it again"
        ) from e


def _file_md5(path: pathlib.Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _verify(path: pathlib.Path, raw, digest: Optional[Digest], label: Optional[str] = None) -> None:
    """Raise unless ``raw`` (the content of ``path``, read with a size cap) matches ``digest``."""
    if digest is None:
        return
    where = label or _where(path)
    if len(raw) > digest.size:
        raise TMCGraphError(
            f"{where} is corrupt: decompressed size exceeds the expected {digest.size} bytes (reading stopped "
            f"after {len(raw)}); delete it and fetch it again"
        )
    if len(raw) != digest.size:
        raise TMCGraphError(
            f"{where} is corrupt: decompressed size {len(raw)} bytes, expected {digest.size}; "
            "delete it and fetch it again"
        )
    if digest.md5 is not None:
        got = hashlib.md5(raw).hexdigest()
        if got != digest.md5:
            raise TMCGraphError(
                f"{where} is corrupt: MD5 {got} of its content, expected {digest.md5}; delete it and fetch it again"
            )
    elif digest.gz_md5 is not None and path.name.endswith(".gz"):
        got = _file_md5(path)
        if got != digest.gz_md5:
            raise TMCGraphError(
                f"{where} is corrupt or not the published file: MD5 {got} of the .gz file, expected "
                f"{digest.gz_md5}; delete it and fetch it again"
            )


def _parse_idx(raw, where: str) -> np.ndarray:
    """Decode an IDX byte string (magic ``0 0 type ndim``, big-endian sizes, data)."""
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise TMCGraphError(f"{where}: not an IDX file (bad magic number {raw[:4].hex() or 'empty'})")
    ndim = raw[3]
    if ndim < 1 or len(raw) < 4 + 4 * ndim:
        raise TMCGraphError(f"{where}: truncated IDX header ({len(raw)} bytes, {ndim} dims)")
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    dtype = np.dtype(_IDX_TYPES[raw[2]])
    n = int(np.prod(shape, dtype=object)) * dtype.itemsize
    body = memoryview(raw)[4 + 4 * ndim :]
    if len(body) != n:
        held = f"more than that (reading stopped after {len(body)})" if len(body) > n else f"{len(body)} bytes"
        raise TMCGraphError(f"{where}: IDX header says shape {shape} ({n} bytes of data) but the file holds {held}")
    return np.frombuffer(body, dtype=dtype).reshape(shape)


def read_idx(path, verify: bool = True, dataset: str = "mnist", max_bytes: int = MAX_BYTES) -> np.ndarray:
    """Read one IDX file (``.gz``-compressed when its name ends in ``.gz``) into a numpy array.

    At most the expected content size plus one byte is decompressed or read: the size
    of the file's :class:`Digest` when its name (or its name plus ``.gz``) has one in
    ``dataset``'s table and ``verify`` is true, otherwise the size the IDX header
    announces (at most ``max_bytes``).

    Args:
        path: The file.
        verify: Check size and checksum when the name is in ``dataset``'s table.
        dataset: Whose checksum table applies (:data:`DATASETS`).
        max_bytes: Largest content read for a file without a table entry.

    Raises:
        TMCGraphError: unreadable gzip, content larger or smaller than expected, wrong
            checksum, or a bad IDX header (each naming the file).
    """
    path = pathlib.Path(path)
    digest = None
    if verify:
        table = _checksums(dataset)
        digest = table.get(path.name) or table.get(path.name + ".gz")
    raw = _content(path, digest.size if digest else None, max_bytes)
    _verify(path, raw, digest)
    return _parse_idx(raw, _where(path))


def _download(d: pathlib.Path, name: str, digest: Optional[Digest]) -> None:
    """Fetch ``name`` from the first mirror that works, verify it, then move it into ``d``."""
    errors = []
    cap = (digest.size if digest else MAX_BYTES) * 2 + (1 << 20)  # no download may fill the disk
    for base in MIRRORS:
        url = base + name
        tmp = None
        try:
            d.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=name + ".", suffix=".part.gz", dir=d)
            with os.fdopen(fd, "wb") as out, urlopen(url, timeout=60) as r:
                got = _read_limited(r, cap + 1)
                if len(got) > cap:
                    raise TMCGraphError(f"{url} sent more than {cap} bytes")
                out.write(got)
            raw = _content(pathlib.Path(tmp), digest.size if digest else None, MAX_BYTES)
            _verify(pathlib.Path(tmp), raw, digest, label=f"{name} from {url}")
            _parse_idx(raw, f"{name} from {url}")
            os.replace(tmp, d / name)
            return
        except Exception as e:  # network, disk or checksum failure: try the next mirror
            errors.append(f"{url}: {type(e).__name__}: {e}")
            if tmp is not None and os.path.exists(tmp):
                os.remove(tmp)
    raise TMCGraphError(_missing_message(d, "download failed: " + "; ".join(errors)))


def load_mnist(root=None, download: bool = True, dataset: str = "mnist") -> MNIST:
    """Load MNIST or Fashion-MNIST, downloading missing MNIST files when ``download`` is true.

    Args:
        root: Directory of the four IDX files (see :func:`dataset_dir`).
        download: Fetch missing MNIST files from :data:`MIRRORS` (with checksum
            verification). Fashion-MNIST is never downloaded.
        dataset: ``"mnist"`` or ``"fashion-mnist"``.

    Returns:
        The :class:`MNIST` arrays.

    Raises:
        TMCGraphError: files missing and not downloadable (the message names the
            directory and the four files), a corrupt file (never overwritten), or
            images that are not 28 x 28 or do not match their labels.
    """
    d = dataset_dir(dataset, root)
    table = _checksums(dataset)
    missing = [n for n in FILES.values() if _find(d, n) is None]
    if missing and (not download or dataset != "mnist"):
        why = "downloading is off" if dataset == "mnist" else "it is never downloaded"
        raise TMCGraphError(_missing_message(d, f"missing {missing}; {why}", dataset))
    for n in missing:
        _download(d, n, table.get(n))
    arrays = {}
    for role, name in FILES.items():
        path = _find(d, name)
        raw = _content(path, table[name].size if name in table else None, MAX_BYTES)
        _verify(path, raw, table.get(name))
        arrays[role] = _parse_idx(raw, _where(path))
    for split in ("train", "test"):
        im, lab = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if im.ndim != 3 or lab.ndim != 1 or im.shape[0] != lab.shape[0] or im.shape[1:] != (28, 28):
            raise TMCGraphError(
                f"{FILES[split + '_images']} / {FILES[split + '_labels']} in {d}: images of shape {im.shape} "
                f"do not match labels of shape {lab.shape} (expected [N, 28, 28] and [N])"
            )
    return MNIST(
        torch.from_numpy(arrays["train_images"].astype(np.uint8, copy=False)),
        torch.from_numpy(arrays["train_labels"].astype(np.int64)),
        torch.from_numpy(arrays["test_images"].astype(np.uint8, copy=False)),
        torch.from_numpy(arrays["test_labels"].astype(np.int64)),
        d,
        dataset,
    )


def binarize(x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Dynamic binarisation: each pixel is 1 with probability equal to its grey level."""
    return torch.bernoulli(x, generator=generator)


def batches(n: int, batch_size: int, shuffle: bool = True, generator: Optional[torch.Generator] = None):
    """Index tensors of consecutive minibatches over ``n`` items (the last one may be short)."""
    if batch_size < 1:
        raise TMCGraphError(f"batch_size must be positive, got {batch_size}")
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    return list(order.split(batch_size))
