"""The hierarchical benchmark data sets: household radon and NYC school-bus breakdowns.

Two small real data sets used by the massively parallel importance-sampling literature
(Heap, Leech & Aitchison, "Massively parallel reweighted wake-sleep", UAI 2023; Heap,
Bowyer & Aitchison, "Massively parallel expectation maximization for approximate
posteriors", AABI 2025) to compare inference methods on plated hierarchical models.

Where the files are looked for, in order:

1. the ``root`` argument;
2. the ``TMCGRAPH_DATA`` environment variable.

In either, the files may sit directly in the directory or in its ``hierarchical/``
sub-directory (so ``TMCGRAPH_DATA`` can name a folder shared with other data sets).
Nothing is downloaded: when a file is missing the error names the directories searched
and the files to put there.

Files (compressed NumPy archives, read with ``allow_pickle=False``; every archive member
is size-checked before it is decompressed):

``radon.npz``
    ``log_radon``, ``basement``, ``log_uranium``: ``float32 [4, 300]`` (4 US states x 300
    zip codes, one house per zip). Zips 0..149 of every state are the training set,
    150..299 are held out.
``bus_breakdown.npz``
    For each split ``r`` in 0..4 and part in ``train``/``test``: ``delay_{part}_{r}``
    ``float64 [2, 3, 150]`` (0/1), ``run_type_{part}_{r}`` ``uint8 [2, 3, 150, R_r]`` and
    ``bus_company_name_{part}_{r}`` ``uint8 [2, 3, 150, C_r]`` (one-hot; the widths depend
    on the split and agree between its two parts). Plates Year (2) > Borough (3) > ID.

The loaders return float32 tensors for the training elements and for all elements
(training then held-out, concatenated along the innermost plate) with the mask of the
held-out ones.
"""

from __future__ import annotations

import os
import pathlib
import zipfile
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from ..errors import TMCGraphError

__all__ = [
    "ENV_VAR",
    "SUBDIR",
    "FILES",
    "MAX_FILE_BYTES",
    "MAX_MEMBER_BYTES",
    "Radon",
    "BusBreakdown",
    "data_dir",
    "read_npz",
    "load_radon",
    "load_bus_breakdown",
]

#: Environment variable naming the data directory.
ENV_VAR = "TMCGRAPH_DATA"

#: Sub-directory of the root that may hold the files.
SUBDIR = "hierarchical"

#: Data set -> file name.
FILES = {"radon": "radon.npz", "bus_breakdown": "bus_breakdown.npz"}

#: Largest archive read (bytes on disk).
MAX_FILE_BYTES = 16 << 20

#: Largest decompressed archive member (bytes).
MAX_MEMBER_BYTES = 64 << 20

RADON_KEYS = ("log_radon", "basement", "log_uranium")
RADON_SHAPE = (4, 300)
RADON_TRAIN = 150
BUS_SPLITS = 5
BUS_SHAPE = (2, 3, 150)


@dataclass
class Radon:
    """The radon data: plates States (4) > Zips.

    Attributes:
        train: ``log_radon``, ``basement``, ``log_uranium`` -> ``float32 [4, 150]`` (zips 0..149).
        all: The same names -> ``float32 [4, 300]`` (every zip).
        heldout: ``bool [4, 300]``: True for the held-out zips 150..299.
        root: Directory the file was read from.
    """

    train: dict
    all: dict
    heldout: torch.Tensor
    root: pathlib.Path


@dataclass
class BusBreakdown:
    """One train/test split of the bus-breakdown data: plates Year (2) > Borough (3) > ID.

    Attributes:
        train: ``delay`` -> ``float32 [2, 3, 150]``, ``run_type`` -> ``[2, 3, 150, R]``,
            ``company`` -> ``[2, 3, 150, C]`` (one-hot, float32).
        all: The same names over 300 records (training records then test records).
        heldout: ``bool [2, 3, 300]``: True for the test records.
        split: The split (0..4).
        root: Directory the file was read from.
    """

    train: dict
    all: dict
    heldout: torch.Tensor
    split: int
    root: pathlib.Path

    @property
    def n_run_types(self) -> int:
        """Width R of the run-type one-hot."""
        return int(self.train["run_type"].shape[-1])

    @property
    def n_companies(self) -> int:
        """Width C of the bus-company one-hot."""
        return int(self.train["company"].shape[-1])


def _roots(root) -> list:
    if root is not None:
        return [pathlib.Path(root)]
    env = os.environ.get(ENV_VAR)
    return [pathlib.Path(env)] if env else []


def data_dir(root=None, files=tuple(FILES.values())) -> pathlib.Path:
    """The directory holding ``files``: ``root`` (or ``$TMCGRAPH_DATA``) or its ``hierarchical/`` sub-directory.

    Raises:
        TMCGraphError: no directory given, or the files are in neither place.
    """
    roots = _roots(root)
    if not roots:
        raise TMCGraphError(
            f"no data directory: pass root=... or set {ENV_VAR}; put {', '.join(files)} in that directory "
            f"or in its {SUBDIR}/ sub-directory"
        )
    tried = []
    for r in roots:
        for d in (r, r / SUBDIR):
            tried.append(str(d))
            if all((d / f).is_file() for f in files):
                return d
    raise TMCGraphError(
        f"{', '.join(files)} not found in {' or '.join(tried)}; put the file(s) there "
        f"(the data README describes them) or pass root= / set {ENV_VAR} to the directory holding them"
    )


def read_npz(path: pathlib.Path, max_file_bytes: Optional[int] = None, max_member_bytes: Optional[int] = None) -> dict:
    """Every array of a ``.npz`` archive, with bounded sizes and no pickles.

    The file size is checked before it is opened and every member's decompressed size
    before it is read (limits default to :data:`MAX_FILE_BYTES` and :data:`MAX_MEMBER_BYTES`).

    Raises:
        TMCGraphError: the file is too large, not a NumPy archive, or a member is too large.
    """
    path = pathlib.Path(path)
    max_file_bytes = MAX_FILE_BYTES if max_file_bytes is None else max_file_bytes
    max_member_bytes = MAX_MEMBER_BYTES if max_member_bytes is None else max_member_bytes
    size = path.stat().st_size
    if size > max_file_bytes:
        raise TMCGraphError(f"{path} is {size} bytes, more than the {max_file_bytes} bytes allowed for this data set")
    try:
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                if info.file_size > max_member_bytes:
                    raise TMCGraphError(
                        f"{path}: member {info.filename!r} decompresses to {info.file_size} bytes, more than the "
                        f"{max_member_bytes} allowed"
                    )
        with np.load(path, allow_pickle=False) as d:
            return {k: d[k] for k in d.files}
    except TMCGraphError:
        raise
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise TMCGraphError(f"{path} is not a readable NumPy .npz archive: {e}") from e


def _get(arrays: dict, path, key: str, shape: tuple, kinds: str) -> np.ndarray:
    """``arrays[key]`` checked for shape (``None`` = any size), dtype kind and finiteness."""
    if key not in arrays:
        raise TMCGraphError(f"{path}: array {key!r} is missing; it holds {sorted(arrays)}")
    a = arrays[key]
    ok = a.ndim == len(shape) and all(s is None or s == t for s, t in zip(shape, a.shape))
    if not ok:
        want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise TMCGraphError(f"{path}: array {key!r} has shape {list(a.shape)}, expected {want}")
    if a.dtype.kind not in kinds:
        raise TMCGraphError(f"{path}: array {key!r} has dtype {a.dtype}, expected kind(s) {kinds!r}")
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        bad = np.argwhere(~np.isfinite(a))[0].tolist()
        raise TMCGraphError(f"{path}: array {key!r} has non-finite values (first at index {bad})")
    return a


def _binary(path, key: str, a: np.ndarray) -> None:
    if not np.isin(a, (0, 1)).all():
        bad = np.argwhere(~np.isin(a, (0, 1)))[0].tolist()
        raise TMCGraphError(f"{path}: array {key!r} must be 0/1, found {a[tuple(bad)]!r} at index {bad}")


def _one_hot(path, key: str, a: np.ndarray) -> None:
    _binary(path, key, a)
    rows = a.sum(-1)
    if not (rows == 1).all():
        bad = np.argwhere(rows != 1)[0].tolist()
        raise TMCGraphError(f"{path}: array {key!r} must be one-hot along its last axis; row {bad} sums to "
                            f"{rows[tuple(bad)]}")


def _tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


def load_radon(root=None, n_train: int = RADON_TRAIN) -> Radon:
    """Load ``radon.npz`` (see the module docstring).

    Args:
        root: Directory holding ``radon.npz`` (or its ``hierarchical/`` sub-directory);
            default ``$TMCGRAPH_DATA``.
        n_train: Zips per state used for training (the rest are held out).

    Raises:
        TMCGraphError: missing or oversized file, a missing array, wrong shape or dtype,
            non-finite values, or a ``basement`` indicator that is not 0/1.
    """
    d = data_dir(root, (FILES["radon"],))
    path = d / FILES["radon"]
    arrays = read_npz(path)
    if not (isinstance(n_train, int) and 0 < n_train < RADON_SHAPE[1]):
        raise TMCGraphError(f"n_train must be an integer in 1..{RADON_SHAPE[1] - 1}, got {n_train!r}")
    out = {k: _get(arrays, path, k, RADON_SHAPE, "f") for k in RADON_KEYS}
    _binary(path, "basement", out["basement"])
    full = {k: _tensor(v) for k, v in out.items()}
    train = {k: v[:, :n_train].clone() for k, v in full.items()}
    heldout = torch.zeros(RADON_SHAPE, dtype=torch.bool)
    heldout[:, n_train:] = True
    return Radon(train, full, heldout, d)


def load_bus_breakdown(root=None, split: int = 0) -> BusBreakdown:
    """Load split ``split`` of ``bus_breakdown.npz`` (see the module docstring).

    Args:
        root: Directory holding ``bus_breakdown.npz`` (or its ``hierarchical/``
            sub-directory); default ``$TMCGRAPH_DATA``.
        split: Train/test split, 0..4.

    Raises:
        TMCGraphError: missing or oversized file, a missing array, wrong shape or dtype,
            non-finite values, a delay that is not 0/1, a one-hot that is not, or one-hot
            widths that differ between the split's train and test parts.
    """
    if isinstance(split, bool) or not isinstance(split, int) or not 0 <= split < BUS_SPLITS:
        raise TMCGraphError(f"split must be an integer in 0..{BUS_SPLITS - 1}, got {split!r}")
    d = data_dir(root, (FILES["bus_breakdown"],))
    path = d / FILES["bus_breakdown"]
    arrays = read_npz(path)
    parts = {}
    for part in ("train", "test"):
        delay = _get(arrays, path, f"delay_{part}_{split}", BUS_SHAPE, "fiub")
        _binary(path, f"delay_{part}_{split}", delay)
        run = _get(arrays, path, f"run_type_{part}_{split}", BUS_SHAPE + (None,), "iub")
        comp = _get(arrays, path, f"bus_company_name_{part}_{split}", BUS_SHAPE + (None,), "iub")
        _one_hot(path, f"run_type_{part}_{split}", run)
        _one_hot(path, f"bus_company_name_{part}_{split}", comp)
        parts[part] = {"delay": delay, "run_type": run, "company": comp}
    for k, key in (("run_type", "run_type"), ("company", "bus_company_name")):
        wt, ws = parts["train"][k].shape[-1], parts["test"][k].shape[-1]
        if wt != ws:
            raise TMCGraphError(f"{path}: {key}_train_{split} has width {wt} but {key}_test_{split} has {ws}")
    train = {k: _tensor(v) for k, v in parts["train"].items()}
    full = {k: torch.cat([train[k], _tensor(parts["test"][k])], dim=2) for k in train}
    n = BUS_SHAPE[2]
    heldout = torch.zeros(BUS_SHAPE[:2] + (2 * n,), dtype=torch.bool)
    heldout[:, :, n:] = True
    return BusBreakdown(train, full, heldout, split, d)
