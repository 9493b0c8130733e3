"""Process-level settings that change how fast the engine runs on CPU, never what it computes.

TMC's work on CPU is dominated by large short-lived tensors: every latent with a latent
parent gets a ``[K, K, ...]`` log-factor grid, and each density evaluation, shift and
``exp`` allocates another. glibc's ``malloc`` serves blocks above its *mmap threshold*
(128 KiB at start, raised dynamically up to 32 MiB) with fresh ``mmap`` pages and
returns freed heap tops above its *trim threshold* to the OS, so a loop that allocates
and frees the same few-MiB tensors can pay a page fault for every page of every
temporary, every call. Which side of the dynamic threshold a run lands on depends on the
order of earlier allocations, so the same code runs at different speeds in different
processes, and tensors above 32 MiB always get fresh pages (a 4-5x slower TMC estimate
on the Gaussian toy at N = 1024, K = 128).

:func:`tune_allocator` fixes both thresholds high (``mallopt``), so freed blocks are
reused from the heap. The same effect is available without code through the
environment (``MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=1073741824``)
or by preloading jemalloc or tcmalloc, as PyTorch's CPU performance guide recommends.
The cost is memory: the process keeps its peak heap instead of shrinking after it.
``docs/performance.md`` quotes the measured effect
(``python benchmarks/perf_allocator.py``).

Example:
    >>> from tmcgraph.contrib.allocator import allocator_settings
    >>> allocator_settings()["tuned_by_tmcgraph"] in (True, False)
    True
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

from ..errors import TMCGraphError

__all__ = ["tune_allocator", "allocator_settings"]

# mallopt parameter numbers from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_ARENA_MAX", "LD_PRELOAD")

_state = {"tuned_by_tmcgraph": False, "mmap_threshold": None, "trim_threshold": None}


def _glibc():
    """The C library as a ``ctypes.CDLL`` if it is glibc (has ``mallopt``), else ``None``."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") else None


def tune_allocator(mmap_threshold: int = 1 << 30, trim_threshold: int = 1 << 30) -> bool:
    """Keep freed tensors' memory in the heap for reuse instead of returning it to the OS.

    Sets glibc's ``M_MMAP_THRESHOLD`` (blocks at least this large get their own
    ``mmap``) and ``M_TRIM_THRESHOLD`` (free heap top kept before shrinking), which also
    turns off glibc's dynamic adjustment of the former. Process-wide and lasting: call it
    once, at start-up, in a program (a training script, a benchmark), not in library
    code. Values are unchanged by it; only allocation cost and resident memory change.

    Args:
        mmap_threshold: Bytes; allocations smaller than this come from the heap.
        trim_threshold: Bytes of free memory at the heap's top kept for reuse.

    Returns:
        ``True`` if both settings were applied; ``False`` where the C library is not
        glibc (macOS, Windows, musl) or refused a value, in which case nothing changed
        and the environment variables or an allocator preload are the alternatives.

    Raises:
        TMCGraphError: a threshold is not an integer in [1, 2**31 - 1].
    """
    for name, v in (("mmap_threshold", mmap_threshold), ("trim_threshold", trim_threshold)):
        if isinstance(v, bool) or not isinstance(v, int) or not 0 < v < 2**31:
            raise TMCGraphError(
                f"tune_allocator: {name} must be an integer number of bytes in [1, 2**31 - 1] "
                f"(mallopt takes a C int), got {v!r}"
            )
    libc = _glibc()
    if libc is None:
        return False
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    if libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold) != 1:
        return False
    if libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold) != 1:
        return False
    _state.update(tuned_by_tmcgraph=True, mmap_threshold=mmap_threshold, trim_threshold=trim_threshold)
    return True


def allocator_settings() -> dict:
    """What governs allocation in this process: the C library, the ``MALLOC_*`` and
    ``LD_PRELOAD`` environment, and whether :func:`tune_allocator` was applied.

    Returns:
        A JSON-serialisable dict (recorded by the benchmark scripts).
    """
    lib, ver = platform.libc_ver()
    return {
        "libc": f"{lib} {ver}".strip() or "unknown",
        **_state,
        "environment": {k: os.environ[k] for k in _ENV if k in os.environ},
    }
