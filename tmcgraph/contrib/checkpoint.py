"""Checkpoints that load without running code, are written atomically and carry their configuration.

A checkpoint is one ``torch.save`` zip file holding a plain dictionary::

    {"format": "tmcgraph.checkpoint", "version": 1, "kind": <str>,
     "config": <plain data>, "state": <tensors and plain data>}

* **Safe to read.** :func:`load` reads with ``torch.load(..., weights_only=True)``,
  torch's restricted unpickler: only tensors, containers and Python scalars are
  rebuilt, and a file naming any other global (e.g. a pickle whose ``__reduce__``
  calls ``os.system``) is rejected before anything in it runs. Files that are not zip
  archives (legacy pickles, empty or foreign files) are refused before unpickling,
  and files larger than ``max_bytes`` are refused unread.
* **Plain configuration.** ``config`` must be JSON-like data: dicts with ``str`` keys,
  lists (tuples are stored as lists), ``str``, ``int``, ``float``, ``bool`` and
  ``None``. ``state`` may in addition hold tensors (``state_dict()`` of modules and
  optimisers, generator states). :func:`save` checks both before writing, so a state
  that :func:`load` would refuse is never written.
* **Atomic.** :func:`save` writes to a temporary file in the target's directory,
  flushes it to disk and renames it over the target (``os.replace``), so a crash
  leaves either the old or the new checkpoint, never a partial one.
* **Compatible or refused.** ``load(path, kind=..., config=...)`` checks the format
  marker, the kind (which program wrote it) and that the stored configuration equals
  the requested one on the compared keys; every failure is a :class:`CheckpointError`
  naming the file and, for a configuration mismatch, each setting with both values.
  Nothing here deletes or rewrites a file it could not read.

Example:
    >>> import pathlib, tempfile, torch
    >>> tmp = tempfile.TemporaryDirectory()
    >>> p = pathlib.Path(tmp.name) / "ckpt.pt"
    >>> _ = save(p, {"w": torch.ones(2)}, kind="demo", config={"lr": 0.1, "sizes": (3, 4)})
    >>> ck = load(p, kind="demo", config={"lr": 0.1, "sizes": [3, 4]})
    >>> ck["state"]["w"].tolist(), ck["config"]["sizes"]
    ([1.0, 1.0], [3, 4])
    >>> try:
    ...     load(p, kind="demo", config={"lr": 0.2, "sizes": [3, 4]})
    ... except CheckpointError as e:
    ...     print(str(e).split(" was ", 1)[1])
    made with a different configuration (lr: checkpoint 0.1 vs requested 0.2)
    >>> tmp.cleanup()
"""

from __future__ import annotations

import collections
import os
import pathlib
import pickle
import tempfile
import warnings
import zipfile
from typing import Callable, Iterable, Mapping, Optional

import torch

from ..errors import TMCGraphError

__all__ = [
    "FORMAT",
    "VERSION",
    "MAX_BYTES",
    "CheckpointError",
    "plain",
    "config_mismatches",
    "save",
    "load",
]

#: Format marker stored in every checkpoint.
FORMAT = "tmcgraph.checkpoint"
#: Version of the layout above.
VERSION = 1
#: Default largest checkpoint :func:`load` reads (bytes).
MAX_BYTES = 4 << 30

_SCALARS = (str, int, float, bool, type(None))


class CheckpointError(TMCGraphError):
    """A checkpoint that is missing, unreadable, foreign or incompatible (the message names the file)."""


def plain(obj, where: str = "config", tensors: bool = False):
    """``obj`` as plain data (tuples become lists), or :class:`CheckpointError` naming the offending entry.

    Args:
        obj: Nested dicts (``str`` keys), lists, tuples and scalars.
        where: Name of ``obj`` used in the error message.
        tensors: Also accept tensors (and ``torch.Size``, kept as a list) at any depth.
    """
    if isinstance(obj, torch.Tensor):
        if tensors:
            return obj
        raise CheckpointError(f"{where} is a tensor; a configuration holds plain data only")
    if isinstance(obj, _SCALARS):
        return obj
    if isinstance(obj, Mapping):
        out = collections.OrderedDict() if tensors and isinstance(obj, collections.OrderedDict) else {}
        for k, v in obj.items():
            int_key = tensors and isinstance(k, int) and not isinstance(k, bool)  # optimiser state is keyed by int
            if not (isinstance(k, str) or int_key):
                raise CheckpointError(f"{where} has a key {k!r} of type {type(k).__name__}; keys must be str")
            out[k] = plain(v, f"{where}[{k!r}]", tensors)
        return out
    if isinstance(obj, (list, tuple)):
        return [plain(v, f"{where}[{i}]", tensors) for i, v in enumerate(obj)]
    kinds = "dicts, lists, tensors, str, int, float, bool or None" if tensors else \
        "dicts, lists, str, int, float, bool or None"
    raise CheckpointError(f"{where} is of type {type(obj).__name__}; only {kinds} are stored")


def config_mismatches(saved: Mapping, requested: Mapping, keys: Optional[Iterable[str]] = None) -> list:
    """``[(key, saved value, requested value), ...]`` for the compared keys whose values differ.

    Values are compared as plain data (a tuple equals the list of its items); a key
    missing on one side counts as ``None``. ``keys`` defaults to the union of both.
    """
    if keys is None:
        keys = list(dict.fromkeys([*saved, *requested]))
    out = []
    for k in keys:
        a, b = saved.get(k), plain(requested.get(k), f"config[{k!r}]")
        if a != b or isinstance(a, bool) != isinstance(b, bool):
            out.append((k, a, b))
    return out


def save(path, state: Mapping, kind: str, config: Mapping) -> pathlib.Path:
    """Write a checkpoint atomically (temporary file in the same directory, then ``os.replace``).

    Args:
        path: Target file; its directory must exist.
        state: Tensors and plain data (e.g. ``{"model": m.state_dict(), "optimizer": opt.state_dict()}``).
        kind: Name of the program or model family; :func:`load` requires the same.
        config: Plain-data configuration, checked by :func:`load`.

    Returns:
        The path written.

    Raises:
        CheckpointError: ``state`` or ``config`` holds something :func:`load` would refuse.
    """
    path = pathlib.Path(path)
    obj = {"format": FORMAT, "version": VERSION, "kind": str(kind),
           "config": plain(config, "config"), "state": plain(state, "state", tensors=True)}
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def load(
    path,
    kind: str,
    config: Optional[Mapping] = None,
    keys: Optional[Iterable[str]] = None,
    label: Callable[[str], str] = str,
    map_location="cpu",
    max_bytes: int = MAX_BYTES,
) -> dict:
    """Read a checkpoint written by :func:`save` with ``torch.load(..., weights_only=True)``.

    Args:
        path: The checkpoint file.
        kind: The kind it must have been saved with.
        config: If given, the stored configuration must equal it on ``keys``.
        keys: Configuration keys to compare (default: all keys of either side).
        label: Display name of a key in messages (e.g. ``lambda k: "--" + k.replace("_", "-")``).
        map_location: Passed to ``torch.load``.
        max_bytes: Refuse larger files without reading them.

    Returns:
        ``{"config": dict, "state": dict, "kind": str, "version": int}``.

    Raises:
        CheckpointError: missing, empty, too large, truncated or otherwise unreadable
            file; a file holding objects other than tensors and plain data; another
            format or kind; a configuration that differs (each key with both values).
    """
    path = pathlib.Path(path)
    where = f"checkpoint {path}"
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{where} is empty (0 bytes)")
    if size > max_bytes:
        raise CheckpointError(f"{where} is {size} bytes, more than the {max_bytes} bytes allowed")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{where} is truncated or not a torch checkpoint (not a zip archive of {size} bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()
        detail = next((ln.strip() for ln in first if "Unsupported" in ln or "global" in ln.lower()), first[0] if first
                      else type(e).__name__)
        raise CheckpointError(
            f"{where} holds objects other than tensors and plain data and was not loaded ({detail})"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError, TypeError, AttributeError,
            zipfile.BadZipFile) as e:
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{where} is truncated or corrupt ({type(e).__name__}: {msg[:200]})") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(f"{where} is not a {FORMAT} file (no format marker)")
    if obj.get("version") != VERSION:
        raise CheckpointError(f"{where} has format version {obj.get('version')!r}; this code reads {VERSION}")
    if obj.get("kind") != kind:
        raise CheckpointError(f"{where} was written by {obj.get('kind')!r}, not {kind!r}")
    if not isinstance(obj.get("config"), dict) or not isinstance(obj.get("state"), dict):
        raise CheckpointError(f"{where} lacks its configuration or state")
    if config is not None:
        diff = config_mismatches(obj["config"], config, keys)
        if diff:
            shown = ", ".join(f"{label(k)}: checkpoint {a!r} vs requested {b!r}" for k, a, b in diff)
            raise CheckpointError(f"{where} was made with a different configuration ({shown})")
    return {"config": obj["config"], "state": obj["state"], "kind": obj["kind"], "version": obj["version"]}
