"""Shared helpers for the benchmark scripts: arguments, threads, timing, summaries, JSON and figures.

Every benchmark script takes ``--quick`` (tiny grid, used by the tests), ``--out DIR``
(default ``benchmarks/results``; quick runs write ``<name>_quick.*``), ``--threads``
(default 1), ``--seeds`` and ``--allocator`` (``default``, or ``tuned`` for
:func:`tmcgraph.runtime.tune_allocator`; recorded in every JSON). Import it from a script in this folder with
``from _common import ...`` (the script's folder is on ``sys.path``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import platform
import statistics
import sys
import time
from typing import Callable, Iterable, Optional

import torch

__all__ = [
    "RESULTS",
    "base_parser",
    "set_threads",
    "machine_info",
    "command_line",
    "output_paths",
    "timed",
    "repeat",
    "summary",
    "write_json",
    "save_results",
    "pyplot",
    "save_figure",
]

#: Default output folder for results.
RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def _positive(s: str) -> int:
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s}")
    return v


def base_parser(description: str, seeds: int = 20) -> argparse.ArgumentParser:
    """An argument parser with ``--quick``, ``--out``, ``--threads`` and ``--seeds``."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny grid and few seeds (seconds; used by the tests)")
    p.add_argument("--out", type=pathlib.Path, default=RESULTS, help=f"output folder (default {RESULTS})")
    p.add_argument("--threads", type=_positive, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--seeds", type=_positive, default=None, help=f"seeds per point (default {seeds}; quick: 3)")
    p.add_argument("--allocator", choices=("default", "tuned"), default="default",
                   help="'tuned': keep freed memory in the heap (tmcgraph.tune_allocator); default: leave malloc as is")
    p.set_defaults(default_seeds=seeds)
    return p


def set_threads(n: int, allocator: str = "default") -> dict:
    """Fix torch's intra-op thread count and tune malloc if ``allocator == "tuned"``; return the thread counts.

    What the allocator is set to is recorded by :func:`machine_info`.
    """
    from tmcgraph.contrib.allocator import tune_allocator

    torch.set_num_threads(int(n))
    if allocator == "tuned" and not tune_allocator():
        print("allocator: tune_allocator() not available here (not glibc); running with the default allocator")
    return {"torch_threads": torch.get_num_threads(), "torch_interop_threads": torch.get_num_interop_threads()}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_state() -> dict:
    """Commit of the checkout and whether the library sources differ from it (read-only git calls)."""
    import subprocess

    root = pathlib.Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "tmcgraph"], cwd=root, capture_output=True,
                               text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": None, "library_modified": None}
    return {"git_commit": commit or None, "library_modified": bool(dirty)}


def machine_info() -> dict:
    """Platform, CPU, core count, Python and library versions, torch threads, git commit."""
    import numpy
    import opt_einsum

    from tmcgraph.contrib.allocator import allocator_settings

    return {
        **_git_state(),
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "opt_einsum": opt_einsum.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": "cpu",
        "default_dtype": str(torch.get_default_dtype()),
        "allocator": allocator_settings(),
    }


def command_line(argv: Optional[list] = None) -> str:
    """The command that produced a result, relative to the repository root when possible."""
    script = pathlib.Path(sys.argv[0]).resolve()
    try:
        script = script.relative_to(pathlib.Path(__file__).resolve().parents[1])
    except ValueError:
        pass
    args = sys.argv[1:] if argv is None else list(argv)
    return " ".join(["python", str(script), *args])


def output_paths(out: pathlib.Path, name: str, quick: bool) -> tuple:
    """``(json_path, png_path)`` for a benchmark; quick runs get a ``_quick`` suffix."""
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{name}_quick" if quick else name
    return out / f"{stem}.json", out / f"{stem}.png"


def timed(fn: Callable, *args, **kwargs) -> tuple:
    """``(fn(*args, **kwargs), seconds)`` measured with ``time.perf_counter``."""
    t0 = time.perf_counter()
    r = fn(*args, **kwargs)
    return r, time.perf_counter() - t0


def repeat(fn: Callable, seeds: Iterable[int], warmup: int = 1, warmup_seed: int = 10**6) -> tuple:
    """Call ``fn(seed)`` after ``warmup`` untimed calls; return ``(values, seconds)`` lists.

    ``fn`` should return a float (or a 0-d tensor); warm-up calls use seeds from
    ``warmup_seed`` on, so they never coincide with the measured seeds.
    """
    for i in range(warmup):
        fn(warmup_seed + i)
    values, times = [], []
    for s in seeds:
        v, dt = timed(fn, s)
        values.append(float(v))
        times.append(dt)
    return values, times


def summary(values: list) -> dict:
    """Mean, standard deviation, median, quartiles, min, max and count of a list of floats.

    Raises:
        ValueError: a value is not finite (non-finite results are errors, not rows to drop).
    """
    bad = [v for v in values if not math.isfinite(v)]
    if bad:
        raise ValueError(f"non-finite values in a benchmark result: {bad[:5]}")
    vs = sorted(values)
    n = len(vs)
    q = statistics.quantiles(vs, n=4, method="inclusive") if n > 1 else [vs[0]] * 3
    return {
        "mean": statistics.fmean(vs),
        "std": statistics.stdev(vs) if n > 1 else 0.0,
        "median": statistics.median(vs),
        "q25": q[0],
        "q75": q[2],
        "min": vs[0],
        "max": vs[-1],
        "n": n,
    }


def write_json(path: pathlib.Path, payload: dict) -> None:
    """Write ``payload`` as indented JSON; non-finite numbers raise ``ValueError``."""
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, allow_nan=False)
        f.write("\n")


def save_results(args, name: str, argv, threads: dict, plot: Callable, **fields) -> dict:
    """Write a benchmark's JSON (name, command, machine, threads, ``fields``) and its figure.

    ``plot(rows, png_path)`` draws ``fields["rows"]``. Returns the payload.
    """
    jpath, ppath = output_paths(args.out, name, args.quick)
    payload = {"benchmark": name, "command": command_line(argv), "machine": machine_info(), **threads, **fields}
    write_json(jpath, payload)
    plot(payload["rows"], ppath)
    print(f"wrote {jpath} and {ppath}")
    return payload


def pyplot():
    """``matplotlib.pyplot`` with the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: pathlib.Path, dpi: int = 120) -> None:
    """Save a matplotlib figure and close it."""
    plt = pyplot()
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
