"""MNIST from the four standard IDX ``.gz`` files, with checksums and an explicit cache.

Where the files are looked for, in order:

1. the ``root`` argument of :func:`load_mnist` / :func:`mnist_dir`;
2. the ``TMCGRAPH_DATA`` environment variable;
3. ``$XDG_CACHE_HOME/tmcgraph/mnist`` (default ``~/.cache/tmcgraph/mnist``).

A directory that holds the files in an ``mnist/`` sub-directory is accepted too. Files
that are missing are downloaded from the standard mirrors (only when :func:`load_mnist`
is called, never at import) to a temporary name, verified, then renamed into place.
When a file cannot be obtained the error names the directory and the four files to put
there. A file that is present but corrupt (wrong size or checksum, bad IDX header) is an
error and is never overwritten.

Checksums are MD5 digests and byte counts of the *decompressed* IDX content, so any
gzip re-compression of the standard files is accepted.

Targets: :attr:`MNIST.train_x` / :attr:`MNIST.test_x` are grey levels in [0, 1], used
directly as Bernoulli targets (as in the TMC paper's code); :func:`binarize` draws a
dynamic binarisation (resample it every epoch).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pathlib
import shutil
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
    "FILES",
    "CHECKSUMS",
    "MIRRORS",
    "ENV_VAR",
    "default_cache_dir",
    "mnist_dir",
    "read_idx",
    "load_mnist",
    "binarize",
    "batches",
]

#: Environment variable naming the MNIST directory.
ENV_VAR = "TMCGRAPH_DATA"

#: Role -> file name of the four standard files.
FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}

#: File name -> (MD5 of the decompressed content, decompressed size in bytes).
CHECKSUMS = {
    "train-images-idx3-ubyte.gz": ("6bbc9ace898e44ae57da46a324031adb", 47040016),
    "train-labels-idx1-ubyte.gz": ("a25bea736e30d166cdddb491f175f624", 60008),
    "t10k-images-idx3-ubyte.gz": ("2646ac647ad5339dbf082846283269ea", 7840016),
    "t10k-labels-idx1-ubyte.gz": ("27ae3e4e09519cfbb04c329615203637", 10008),
}

#: Base URLs tried in order.
MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)

_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


@dataclass
class MNIST:
    """The MNIST arrays.

    Attributes:
        train_images: ``uint8`` tensor ``[60000, 28, 28]``.
        train_labels: ``int64`` tensor ``[60000]``.
        test_images: ``uint8`` tensor ``[10000, 28, 28]``.
        test_labels: ``int64`` tensor ``[10000]``.
        root: Directory the files were read from.
    """

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    root: pathlib.Path

    @property
    def train_x(self) -> torch.Tensor:
        """Training grey levels in [0, 1], flattened: ``float32 [N, 784]``."""
        return self.train_images.reshape(len(self.train_images), -1).float() / 255.0

    @property
    def test_x(self) -> torch.Tensor:
        """Test grey levels in [0, 1], flattened: ``float32 [N, 784]``."""
        return self.test_images.reshape(len(self.test_images), -1).float() / 255.0


def default_cache_dir() -> pathlib.Path:
    """``$XDG_CACHE_HOME/tmcgraph/mnist``, or ``~/.cache/tmcgraph/mnist``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "tmcgraph" / "mnist"


def mnist_dir(root=None) -> pathlib.Path:
    """The directory MNIST is read from (argument, then ``TMCGRAPH_DATA``, then the cache).

    If the chosen directory lacks the files but has an ``mnist/`` sub-directory that
    holds them, that sub-directory is used.
    """
    if root is None:
        root = os.environ.get(ENV_VAR) or None
    d = pathlib.Path(root).expanduser() if root is not None else default_cache_dir()
    sub = d / "mnist"
    if not all((d / n).exists() for n in FILES.values()) and all((sub / n).exists() for n in FILES.values()):
        return sub
    return d


def _missing_message(d: pathlib.Path, why: str) -> str:
    names = "\n".join(f"  {n}" for n in FILES.values())
    return (
        f"MNIST is not available in {d} ({why}). Put the four standard IDX files there:\n{names}\n"
        f"(or pass another directory, or set {ENV_VAR})"
    )


def _decompressed(path: pathlib.Path) -> bytes:
    try:
        with gzip.open(path, "rb") as f:
            return f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise TMCGraphError(
            f"{path.name} in {path.parent} is not a readable gzip file ({e}); delete it and download it again"
        ) from e


def _verify(path: pathlib.Path, raw: bytes) -> None:
    """Raise unless ``raw`` (decompressed content of ``path``) has the expected size and MD5."""
    if path.name not in CHECKSUMS:
        return
    md5, size = CHECKSUMS[path.name]
    if len(raw) != size:
        raise TMCGraphError(
            f"{path.name} in {path.parent} is corrupt: decompressed size {len(raw)} bytes, expected {size}; "
            "delete it and download it again"
        )
    got = hashlib.md5(raw).hexdigest()
    if got != md5:
        raise TMCGraphError(
            f"{path.name} in {path.parent} is corrupt: MD5 {got} of its content, expected {md5}; "
            "delete it and download it again"
        )


def _parse_idx(raw: bytes, where: str) -> np.ndarray:
    """Decode an IDX byte string (magic ``0 0 type ndim``, big-endian sizes, data)."""
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise TMCGraphError(f"{where}: not an IDX file (bad magic number {raw[:4].hex() or 'empty'})")
    ndim = raw[3]
    if ndim < 1 or len(raw) < 4 + 4 * ndim:
        raise TMCGraphError(f"{where}: truncated IDX header ({len(raw)} bytes, {ndim} dims)")
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    dtype = np.dtype(_IDX_TYPES[raw[2]])
    n = int(np.prod(shape)) * dtype.itemsize
    body = raw[4 + 4 * ndim :]
    if len(body) != n:
        raise TMCGraphError(
            f"{where}: IDX header says shape {shape} ({n} bytes of data) but the file holds {len(body)} bytes"
        )
    return np.frombuffer(body, dtype=dtype).reshape(shape)


def read_idx(path, verify: bool = True) -> np.ndarray:
    """Read one IDX ``.gz`` file into a numpy array.

    Args:
        path: The file.
        verify: Check size and MD5 when the name is one of :data:`CHECKSUMS`.

    Raises:
        TMCGraphError: unreadable gzip, wrong size or checksum, or a bad IDX header.
    """
    path = pathlib.Path(path)
    raw = _decompressed(path)
    if verify:
        _verify(path, raw)
    return _parse_idx(raw, f"{path.name} in {path.parent}")


def _download(d: pathlib.Path, name: str) -> None:
    """Fetch ``name`` from the first mirror that works, verify it, then move it into ``d``."""
    errors = []
    for base in MIRRORS:
        url = base + name
        tmp = None
        try:
            d.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=name + ".", suffix=".part", dir=d)
            with os.fdopen(fd, "wb") as out, urlopen(url, timeout=60) as r:
                shutil.copyfileobj(r, out)
            raw = _decompressed(pathlib.Path(tmp))
            _verify(d / name, raw)
            _parse_idx(raw, f"{name} from {url}")
            os.replace(tmp, d / name)
            return
        except Exception as e:  # network, disk or checksum failure: try the next mirror
            errors.append(f"{url}: {type(e).__name__}: {e}")
            if tmp is not None and os.path.exists(tmp):
                os.remove(tmp)
    raise TMCGraphError(_missing_message(d, "download failed: " + "; ".join(errors)))


def load_mnist(root=None, download: bool = True) -> MNIST:
    """Load MNIST, downloading missing files when ``download`` is true.

    Args:
        root: Directory of the four IDX ``.gz`` files (see :func:`mnist_dir`).
        download: Fetch missing files from :data:`MIRRORS` (with checksum verification).

    Returns:
        The :class:`MNIST` arrays.

    Raises:
        TMCGraphError: files missing and not downloadable (the message names the
            directory and the four files), or a corrupt file (never overwritten).
    """
    d = mnist_dir(root)
    missing = [n for n in FILES.values() if not (d / n).exists()]
    if missing and not download:
        raise TMCGraphError(_missing_message(d, f"missing {missing}; downloading is off"))
    for n in missing:
        _download(d, n)
    arrays = {role: read_idx(d / name) for role, name in FILES.items()}
    for split in ("train", "test"):
        im, lab = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if im.ndim != 3 or lab.ndim != 1 or im.shape[0] != lab.shape[0]:
            raise TMCGraphError(
                f"{FILES[split + '_images']} / {FILES[split + '_labels']} in {d}: images of shape {im.shape} "
                f"do not match labels of shape {lab.shape}"
            )
    return MNIST(
        torch.from_numpy(arrays["train_images"].astype(np.uint8)),
        torch.from_numpy(arrays["train_labels"].astype(np.int64)),
        torch.from_numpy(arrays["test_images"].astype(np.uint8)),
        torch.from_numpy(arrays["test_labels"].astype(np.int64)),
        d,
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
