"""Shared helpers for the benchmark scripts: arguments, threads, timing, summaries, JSON and figures.

Every benchmark script takes ``--quick`` (tiny grid, used by the tests), ``--out DIR``
(default ``benchmarks/results``; quick runs write ``<name>_quick.*``), ``--threads``
(default 1), ``--seeds`` and ``--allocator`` (``default``, or ``tuned`` for
:func:`tmcgraph.runtime.tune_allocator`; recorded in every JSON). Import it from a script in this folder with
``from _common import ...`` (the script's folder is on ``sys.path``).

The speed benchmarks (``perf_toy``, ``perf_chain``, ``perf_hmm``, ``perf_mnist``) share one
timing implementation, :func:`compare`:

* contenders run interleaved in one process (A B C A B C ...), every contender once per
  repetition with the same ``torch.manual_seed(r)``, after untimed warm-up repetitions
  (which is where ``torch.compile`` compiles; their times are kept as ``warmup_wall_s``);
* each call is timed with ``time.process_time()`` (CPU seconds of the whole process) and
  ``time.perf_counter()`` (wall); on CUDA the device is synchronised before and after the
  call and the *wall* time is the primary figure (host CPU time does not measure kernels).
  ``median_s`` is the median of the primary figure (``time_basis``);
* ratios between contenders are medians of per-repetition paired ratios
  (:func:`paired_ratio`), not ratios of medians;
* :func:`measure_limits` times ``torch.exp`` (elements/s) and a float32 ``torch.matmul``
  (flop/s) on the benchmark's device and thread count in the same run, and
  :func:`limit_fields` turns a workload's inherent operation count into an "ideal" time and
  each contender's fraction of it (ideal / measured). Full runs also time ``exp`` fused into a
  reduction by inductor (``exp_per_s_fused``, about 3x ``torch.exp`` on a CPU): compiled code
  can beat the ``torch.exp`` limit, so ``fraction_of_fused_limit`` is reported beside it;
* ``torch.distributions`` argument validation is off for every contender
  (:func:`no_distribution_validation`; the first ``torch.compile`` turns it off anyway).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import pathlib
import platform
import statistics
import sys
import time
from typing import Callable, Iterable, Optional, Sequence

import torch

__all__ = [
    "RESULTS",
    "RATIO_PAIRS",
    "COLORS",
    "best_limits",
    "compile_backend",
    "tmcgraph_compiled_skip",
    "base_parser",
    "set_threads",
    "keeps_process_state",
    "machine_info",
    "command_line",
    "output_paths",
    "timed",
    "repeat",
    "summary",
    "write_json",
    "save_results",
    "run_cli",
    "cli_device",
    "check_rng_device",
    "save_partial",
    "pyplot",
    "save_figure",
    "add_device_arg",
    "add_compile_arg",
    "resolve_device",
    "no_distribution_validation",
    "synchronize",
    "clock",
    "compare",
    "paired_ratio",
    "ratios",
    "measure_limits",
    "limit_fields",
    "check_values",
    "compile_hand",
    "tmcgraph_compile_skip",
    "tmcgraph_estimator",
    "compile_info",
    "parse_list",
    "print_row",
    "plot_contenders",
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


def keeps_process_state(main: Callable) -> Callable:
    """Decorate a benchmark's ``main``: the process state it sets is restored when it returns.

    A benchmark fixes torch's intra-op thread count (:func:`set_threads`), turns
    distribution argument validation off (:func:`no_distribution_validation`) and may seed
    torch's global generator. These are right for the process that runs the script. The
    tests call ``main`` in the pytest process, and there a changed thread count changes
    the summation order of every later test's matrix products. So the decorated ``main``
    restores the thread count, torch's (and Pyro's, when it is imported) default argument
    validation and the CPU generator's state, whether it returns or raises. A tuned
    allocator (``--allocator tuned``) is not undone: it is process-wide by design and
    opted into by flag.
    """

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        threads = torch.get_num_threads()
        validate = torch.distributions.Distribution._validate_args
        pyro_validate = None
        if sys.modules.get("pyro") is not None:
            pyro_validate = sys.modules["pyro"].infer.util.is_validation_enabled()
        try:
            with torch.random.fork_rng(devices=[]):
                return main(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)
            torch.distributions.Distribution.set_default_validate_args(validate)
            if sys.modules.get("pyro") is not None:
                sys.modules["pyro"].enable_validation(True if pyro_validate is None else pyro_validate)

    return wrapper


def set_threads(n: int, allocator: str = "default") -> dict:
    """Fix torch's intra-op thread count and tune malloc if ``allocator == "tuned"``; return the thread counts.

    What the allocator is set to is recorded by :func:`machine_info`.
    """
    from tmcgraph.contrib.allocator import tune_allocator

    torch.set_num_threads(int(n))
    if allocator == "tuned" and not tune_allocator():
        print("allocator: tune_allocator() not available here (not glibc); running with the default allocator")
    return {"torch_threads": torch.get_num_threads(), "torch_interop_threads": torch.get_num_interop_threads()}


def cpu_name() -> str:
    """The CPU model name (from /proc/cpuinfo, else the platform's processor string)."""
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


def machine_info(device="cpu") -> dict:
    """Platform, CPU, core count, Python and library versions, torch threads, git commit, device."""
    import numpy
    import opt_einsum

    from tmcgraph.contrib.allocator import allocator_settings

    return {
        **_git_state(),
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "load_average_1_5_15min": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "opt_einsum": opt_einsum.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        **({"cuda_device": torch.cuda.get_device_name(torch.device(device))}
           if torch.device(device).type == "cuda" else {}),
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

    ``plot(rows, png_path)`` draws ``fields["rows"]``. The machine's device is
    ``args.device`` when the script has ``--device``. Returns the payload.
    """
    jpath, ppath = output_paths(args.out, name, args.quick)
    device = getattr(args, "device", "cpu")
    payload = {"benchmark": name, "command": command_line(argv), "complete": True, "machine": machine_info(device),
               **threads, **fields}
    write_json(jpath, payload)
    plot(payload["rows"], ppath)
    print(f"wrote {jpath} and {ppath}")
    return payload


def save_partial(args, name: str, argv, threads: dict, **fields) -> None:
    """Write the JSON a benchmark has so far, marked ``"complete": false`` (no figure).

    Called after every row, so a run that is stopped (e.g. by ``gpu_suite.sh``'s time
    limits) leaves the rows it finished; :func:`save_results` overwrites it at the end.
    """
    jpath, _ = output_paths(args.out, name, args.quick)
    device = getattr(args, "device", "cpu")
    write_json(jpath, {"benchmark": name, "command": command_line(argv), "complete": False,
                       "machine": machine_info(device), **threads, **fields})


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


# ---------------------------------------------------------------------------------------
# Shared machinery of the speed benchmarks (perf_toy, perf_chain, perf_hmm, perf_mnist).
# ---------------------------------------------------------------------------------------


def add_shard_arg(p: argparse.ArgumentParser, what: str) -> argparse.ArgumentParser:
    """Add ``--shard I/N``: run only items I, I+N, I+2N, ... of ``what`` (see :func:`take_shard`)."""
    p.add_argument("--shard", default=None, metavar="I/N",
                   help=f"run only runs I, I+N, I+2N, ... of {what} (0-based), so that N processes share one "
                        "--runs folder; a last invocation without --shard writes the combined outputs")
    return p


def take_shard(items: Sequence, shard: Optional[str]) -> list:
    """The items of shard ``"I/N"`` (every N-th from the I-th, 0-based); all of them for ``None``.

    Raises:
        TMCGraphError: ``shard`` is not ``I/N`` with ``0 <= I < N``, or selects nothing.
    """
    from tmcgraph import TMCGraphError

    if shard is None:
        return list(items)
    try:
        i, n = (int(v) for v in str(shard).split("/"))
    except ValueError:
        raise TMCGraphError(f"--shard must be I/N with integers 0 <= I < N, got {shard!r}") from None
    if not 0 <= i < n:
        raise TMCGraphError(f"--shard must be I/N with integers 0 <= I < N, got {shard!r}")
    picked = list(items)[i::n]
    if not picked:
        raise TMCGraphError(f"--shard {shard} selects none of the {len(items)} runs")
    return picked


def add_device_arg(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--device`` (default ``cpu``): where tmcgraph and the hand-written code run."""
    p.add_argument("--device", default="cpu",
                   help="torch device for every contender, e.g. cpu or cuda (default cpu); on CUDA the "
                        "device is synchronised around every timed call and wall time is the primary figure")
    return p


def add_compile_arg(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--compile-backend`` for the ``hand-compiled`` contender (and ``--no-compile``)."""
    p.add_argument("--compile-backend", default=None,
                   help="torch.compile backend of the hand-compiled contender (default inductor; with --quick "
                        "aot_eager, which traces the same graphs without generating C++, to keep quick runs short, "
                        "and tmcgraph-compiled, always inductor, is skipped unless this is inductor)")
    p.add_argument("--no-compile", action="store_true", help="skip the compiled contenders")
    return p


def compile_backend(args) -> str:
    """The ``--compile-backend`` in effect (see :func:`add_compile_arg`)."""
    return args.compile_backend or ("aot_eager" if args.quick else "inductor")


def tmcgraph_compiled_skip(args, *classes) -> Optional[str]:
    """Why the ``tmcgraph-compiled`` contender does not run (``None``: it runs).

    It needs a ``compile=`` option on the estimators; ``--no-compile`` turns it off; and
    ``--quick`` turns it off unless ``--compile-backend inductor`` is given (tmcgraph always
    compiles with inductor, which takes seconds to a minute per program, more than a quick
    run should).
    """
    if args.no_compile:
        return "--no-compile"
    for cls in classes or (None,):
        why = tmcgraph_compile_skip(cls)
        if why:
            return why
    if args.quick and args.compile_backend != "inductor":
        return "--quick without --compile-backend inductor (tmcgraph compiles with inductor: seconds per program)"
    return None


def no_distribution_validation() -> dict:
    """Turn ``torch.distributions`` argument validation off for the process, and Pyro's when it is imported.

    The first ``torch.compile`` call does this anyway, process-wide (dynamo's one-time
    patching calls ``Distribution.set_default_validate_args(False)``), so without this a
    run's eager contenders would validate before the first compilation and not after, and
    a process without compiled contenders (``--no-compile``, ``perf_memory``'s children)
    would differ from one with. tmcgraph builds its distributions with
    ``validate_args=False`` either way. Returns the setting, for the JSON.
    """
    torch.distributions.Distribution.set_default_validate_args(False)
    if sys.modules.get("pyro") is not None:
        sys.modules["pyro"].enable_validation(False)
    return {"distribution_validation": False}


def resolve_device(name: str) -> torch.device:
    """``torch.device(name)``, checked to exist here; exit with a message if it is not a device or unavailable."""
    from tmcgraph.errors import TMCGraphError

    try:
        return cli_device(name)
    except TMCGraphError as e:
        raise SystemExit(str(e)) from None


def synchronize(device) -> None:
    """Wait for the device's queued kernels (a no-op on CPU)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def clock(fn: Callable, device="cpu") -> tuple:
    """``(fn(), cpu_seconds, wall_seconds)``: ``time.process_time`` and ``time.perf_counter`` around the call.

    The device is synchronised before the clocks start and before they stop, and the
    garbage collector is paused during the call.
    """
    import gc

    synchronize(device)
    enabled = gc.isenabled()
    gc.disable()
    try:
        c0, w0 = time.process_time(), time.perf_counter()
        v = fn()
        synchronize(device)
        c1, w1 = time.process_time(), time.perf_counter()
    finally:
        if enabled:
            gc.enable()
    return v, c1 - c0, w1 - w0


def _error(e: Exception) -> str:
    lines = str(e).strip().splitlines() or [""]
    return f"{type(e).__name__}: {lines[0][:300]}"


def compare(fns: dict, reps: int, backward: bool = False, params=(), warmup: int = 2, device="cpu",
            skipped: Optional[dict] = None, max_reps: Optional[dict] = None) -> dict:
    """Time contenders interleaved: per repetition every contender runs once with the same seed.

    Repetition ``r`` (warm-ups first) calls ``torch.manual_seed(r)`` before each
    contender, so contenders that consume torch's global stream in the same order draw
    the same particles. ``fns[name]()`` returns a scalar tensor; with ``backward`` its
    ``.backward()`` is inside the timed region and ``params``' gradients are reset after.

    Returns:
        ``{name: {...}}`` with ``median_s`` (median of the primary time, see
        ``time_basis``: CPU seconds on CPU, synchronised wall seconds on CUDA),
        ``times_s`` (primary, per repetition), ``cpu_s``, ``wall_s``, their medians,
        ``values``, ``warmup_wall_s`` (the warm-up calls: compilation happens there) and
        ``compile_s`` (slowest warm-up call minus the median wall time; tmcgraph compiles
        a program on its second call, so use ``warmup >= 2``). A contender that raises
        is reported with ``"error"`` (and dropped from later repetitions); ``skipped``
        names are reported with ``"skipped": reason``. ``max_reps[name]`` caps a slow
        contender's measured repetitions (it takes part in the first ones only; paired
        ratios use the repetitions both contenders ran).
    """
    dev = torch.device(device)
    basis = "wall" if dev.type == "cuda" else "cpu"
    rec = {k: {"cpu": [], "wall": [], "values": [], "warmup": []} for k in fns}
    errors = {}

    def call(f):
        v = f()
        if backward:
            v.backward()
        return v

    cap = max_reps or {}
    for r in range(warmup + reps):
        for k, f in fns.items():
            if k in errors or (k in cap and r >= warmup + cap[k]):
                continue
            torch.manual_seed(r)
            try:
                v, cpu, wall = clock(lambda f=f: call(f), dev)
                val = float(v.detach())
            except Exception as e:  # a contender that cannot run this size is reported, not fatal
                errors[k] = _error(e)
                continue
            finally:
                for p in params:
                    p.grad = None
            if r >= warmup:
                rec[k]["cpu"].append(cpu)
                rec[k]["wall"].append(wall)
                rec[k]["values"].append(val)
            else:
                rec[k]["warmup"].append(wall)
    out = {k: {"skipped": why} for k, why in (skipped or {}).items()}
    for k in fns:
        if k in errors:
            out[k] = {"error": errors[k]}
            continue
        c, w = rec[k]["cpu"], rec[k]["wall"]
        wmed = statistics.median(w)
        prim = c if basis == "cpu" else w
        out[k] = {
            "median_s": statistics.median(prim), "times_s": prim, "time_basis": basis,
            "cpu_median_s": statistics.median(c), "wall_median_s": wmed, "cpu_s": c, "wall_s": w,
            "values": rec[k]["values"], "warmup_wall_s": rec[k]["warmup"],
            "compile_s": max(0.0, max(rec[k]["warmup"]) - wmed) if rec[k]["warmup"] else None,
        }
    return out


def paired_ratio(res: dict, a: str, b: str) -> Optional[float]:
    """Median over repetitions of ``time_a[r] / time_b[r]`` (``None`` if either did not run)."""
    ta, tb = res.get(a, {}).get("times_s"), res.get(b, {}).get("times_s")
    if not ta or not tb:
        return None
    return statistics.median(x / y for x, y in zip(ta, tb))  # repetition r with r; a capped one ran the first


#: Ratios every speed benchmark reports when both contenders ran: ``"a/b"``.
RATIO_PAIRS = (
    ("tmcgraph", "hand"),
    ("tmcgraph", "hand-compiled"),
    ("tmcgraph-compiled", "hand-compiled"),
    ("tmcgraph-compiled", "tmcgraph"),
    ("hand-compiled", "hand"),
)


def ratios(res: dict, pairs: Sequence = RATIO_PAIRS) -> dict:
    """``{"a/b": paired_ratio(res, a, b)}`` for the pairs where both ran."""
    out = {}
    for a, b in pairs:
        r = paired_ratio(res, a, b)
        if r is not None:
            out[f"{a}/{b}"] = r
    return out


def _best_time(fn: Callable, device, reps: int) -> tuple:
    fn()
    ts = []
    for _ in range(reps):
        _, cpu, wall = clock(fn, device)
        ts.append(wall if torch.device(device).type == "cuda" else cpu)
    return min(ts), statistics.median(ts)


def measure_limits(device="cpu", quick: bool = False, reps: int = 7) -> dict:
    """Throughput of ``torch.exp`` and float32 ``torch.matmul`` on ``device`` with the current thread count.

    ``exp``: ``torch.exp(x, out=y)`` on ``2**24`` float32 elements (``2**20`` with
    ``quick``), elements per second; also on ``2**14`` elements (cache resident),
    repeated. ``matmul``: ``torch.matmul(a, b, out=c)`` of two ``n x n`` float32 matrices
    (n = 1024, 2048 on CUDA, 256 with ``quick``), ``2 n^3`` flops per call. Rates use the
    best of ``reps`` timed calls (same clock as :func:`compare`); medians are recorded too.

    ``exp_per_s_fused`` (not with ``quick``): ``torch.compile(lambda t: torch.exp(t).sum())``
    on the same tensor, i.e. exp fused into a reduction with inductor's vectorised exp and
    no output written. It is the relevant ceiling for compiled code, which fuses each
    density grid's exp into the reduction that consumes it (on this machine's CPU it is
    about 3x ``torch.exp``'s rate), so compiled contenders can exceed a fraction of 1 of the
    ``torch.exp`` limit; :func:`limit_fields` reports both fractions.
    """
    dev = torch.device(device)
    n = 2**20 if quick else 2**24
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(n, device=dev, generator=g)
    y = torch.empty_like(x)
    best, med = _best_time(lambda: torch.exp(x, out=y), dev, reps)
    xs, ys = x[: 2**14].clone(), y[: 2**14].clone()

    def small():
        for _ in range(256):
            torch.exp(xs, out=ys)

    sbest, smed = _best_time(small, dev, reps)
    m = 256 if quick else (2048 if dev.type == "cuda" else 1024)
    a = torch.randn(m, m, device=dev, generator=g)
    b = torch.randn(m, m, device=dev, generator=g)
    c = torch.empty(m, m, device=dev)
    mbest, mmed = _best_time(lambda: torch.matmul(a, b, out=c), dev, reps)
    out = {
        "device": str(dev), "torch_threads": torch.get_num_threads(),
        "time_basis": "wall" if dev.type == "cuda" else "cpu",
        "exp_elements": n, "exp_per_s": n / best, "exp_per_s_median": n / med,
        "exp_per_s_cache_resident": 256 * 2**14 / sbest, "exp_per_s_cache_resident_median": 256 * 2**14 / smed,
        "matmul_n": m, "matmul_flop_per_s": 2 * m**3 / mbest, "matmul_flop_per_s_median": 2 * m**3 / mmed,
        "exp_per_s_fused": None, "exp_per_s_fused_median": None,
    }
    if quick:
        out["exp_fused_note"] = "not measured with --quick (it compiles)"
        return out
    try:  # exp fused into a reduction by inductor: no output written, inductor's own vectorised exp
        fused = torch.compile(lambda t: torch.exp(t).sum(), dynamic=False)
        fbest, fmed = _best_time(lambda: fused(x), dev, reps)
        out["exp_per_s_fused"], out["exp_per_s_fused_median"] = n / fbest, n / fmed
    except Exception as e:  # noqa: BLE001 - no working compiler: no fused figure
        out["exp_fused_note"] = _error(e)
    return out


def best_limits(*measurements: dict) -> dict:
    """The highest throughputs of several :func:`measure_limits` results (the limit is the best seen)."""
    out = dict(measurements[0])
    for k in ("exp_per_s", "exp_per_s_cache_resident", "matmul_flop_per_s", "exp_per_s_fused"):
        vals = [m[k] for m in measurements if m.get(k) is not None]
        out[k] = max(vals) if vals else None
    out["measurements"] = list(measurements)
    return out


def limit_fields(res: dict, limits: dict, exps: float = 0, flops: float = 0) -> dict:
    """Ideal time of a workload and each contender's fraction of it.

    ``ideal_s = exps / exp_per_s + flops / matmul_flop_per_s`` with the throughputs of
    :func:`measure_limits` from the same run; ``fraction_of_limit[c] = ideal_s / median_s``.
    With a fused exp rate, ``ideal_fused_s`` and ``fraction_of_fused_limit`` use it instead
    of ``torch.exp``'s.
    """
    ideal = exps / limits["exp_per_s"] + flops / limits["matmul_flop_per_s"]
    out = {
        "exp_count": exps, "flops": flops, "ideal_s": ideal,
        "fraction_of_limit": {k: ideal / r["median_s"] for k, r in res.items() if r.get("median_s")},
    }
    if limits.get("exp_per_s_fused"):
        fused = exps / limits["exp_per_s_fused"] + flops / limits["matmul_flop_per_s"]
        out["ideal_fused_s"] = fused
        out["fraction_of_fused_limit"] = {k: fused / r["median_s"] for k, r in res.items() if r.get("median_s")}
    return out


def check_values(res: dict, same: Sequence = (), reference: str = "tmcgraph", rtol: float = 1e-3,
                 exact: Optional[float] = None, near_exact: Sequence = (), exact_tol: Optional[float] = None,
                 soft_same: Sequence = ("tmcgraph-compiled",)) -> dict:
    """Check the contenders' values; raise ``RuntimeError`` on a failed check.

    * ``same``: drew the same particles as ``reference`` (same seed, same stream), so every
      repetition's value must agree within ``rtol * max(1, |value|)``; a name in
      ``soft_same`` that does not is checked against the exact value instead (noted);
    * ``near_exact``: draws its own particles (or is exact): the median over repetitions
      must be within ``exact_tol`` of ``exact``.

    Returns:
        ``{"max_abs_value_difference": over ``same``, "value_checks": {name: {...}}}``.
    """
    checks = {}
    ref = res.get(reference, {}).get("values")
    worst = 0.0
    tol_exact = exact_tol

    def near(name, note=None):
        vals = res[name]["values"]
        dev = abs(statistics.median(vals) - exact)
        checks[name] = {"check": f"median within {tol_exact:.3g} of the exact value", "median_abs_error": dev,
                        **({"note": note} if note else {})}
        if dev > tol_exact:
            raise RuntimeError(f"{name}: median value {statistics.median(vals):.6g} is {dev:.3g} from the exact "
                               f"{exact:.6g} (tolerance {tol_exact:.3g}); values {vals}")

    for name in same:
        if name == reference or "values" not in res.get(name, {}) or ref is None:
            continue
        d = max(abs(a - b) for a, b in zip(res[name]["values"], ref))
        tol = rtol * max(1.0, max(abs(v) for v in ref))
        if d > tol and name in soft_same and exact is not None and tol_exact is not None:
            near(name, note=f"does not reproduce {reference}'s particles (|diff| {d:.3g})")
            continue
        checks[name] = {"check": f"same particles as {reference}", "max_abs_difference": d}
        worst = max(worst, d)
        if d > tol:
            raise RuntimeError(f"{name} and {reference} disagree on the same particles by {d:.3g}: "
                               f"{res[name]['values']} vs {ref}")
    for name in near_exact:
        if "values" in res.get(name, {}):
            near(name)
    return {"max_abs_value_difference": worst, "value_checks": checks}


def compile_hand(fn: Callable, backend: str = "inductor") -> Callable:
    """``torch.compile(fn, dynamic=False, backend=backend)`` drawing from torch's eager RNG stream.

    ``torch._inductor.config.fallback_random = True`` makes compiled random ops call the
    eager kernels, so the compiled code draws the same particles as ``fn`` under the same
    seed (checked by every benchmark). The recompile limit is raised, since one function
    is compiled for several shapes.
    """
    import torch._dynamo
    import torch._inductor.config as inductor_config

    inductor_config.fallback_random = True
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 256))
            break
    return torch.compile(fn, dynamic=False, backend=backend)


def tmcgraph_compile_skip(cls=None) -> Optional[str]:
    """``None`` if ``tmcgraph.TMC`` (or ``cls``) takes ``compile=``, else the reason to skip the compiled contender."""
    import inspect

    import tmcgraph as tg

    cls = cls or tg.TMC
    if "compile" in inspect.signature(cls).parameters:
        return None
    return "this tmcgraph has no compile= option"


def tmcgraph_estimator(cls, model, proposal, K: int, device="cpu", compiled: bool = False, **kwargs):
    """``cls(model, proposal, K=K, device=device, compile=compiled)`` (``cls`` is ``tg.TMC`` or ``tg.IWAE``).

    Where the estimator has a ``compile=`` option it is always passed explicitly
    (``False`` for the eager contender: its default, ``"auto"``, compiles large programs).
    """
    if tmcgraph_compile_skip(cls) is None:
        kwargs["compile"] = bool(compiled)
    elif compiled:
        raise TypeError(tmcgraph_compile_skip(cls))
    return cls(model, proposal, K=K, device=device, **kwargs)


def compile_info(est) -> Optional[dict]:
    """What a tmcgraph estimator compiled: ``est.programs.info()`` (programs, compiled, failed), if it has one."""
    progs = getattr(est, "programs", None)
    return progs.info() if progs is not None and hasattr(progs, "info") else None


def parse_list(s: Optional[str], cast=int) -> Optional[list]:
    """``"1,2,3"`` -> ``[1, 2, 3]`` (``None`` stays ``None``)."""
    if s is None:
        return None
    return [cast(v) for v in str(s).split(",") if v.strip()]


def print_row(label: str, row: dict) -> None:
    """One line per workload: median ms per contender, paired ratios, fractions of the limit."""
    res = row["results"]
    parts = []
    for k, r in res.items():
        if "median_s" in r:
            parts.append(f"{k}={r['median_s'] * 1e3:.2f}ms")
        else:
            parts.append(f"{k}: {(r.get('error') or r.get('skipped'))[:60]}")
    rs = "  ".join(f"{k}={v:.2f}" for k, v in row.get("ratios", {}).items())
    fr = row.get("limit", {}).get("fraction_of_limit", {})
    ff = row.get("limit", {}).get("fraction_of_fused_limit", {})
    frs = "  ".join(f"{k}={v:.3g}" + (f" (fused {ff[k]:.3g})" if k in ff else "") for k, v in fr.items())
    print(f"{label}  " + "  ".join(parts) + (f"\n    paired ratios: {rs}" if rs else "")
          + (f"\n    fraction of the torch.exp limit: {frs}" if frs else ""), flush=True)


#: Plot colours per contender (others get matplotlib's cycle).
COLORS = {"tmcgraph": "tab:red", "tmcgraph-compiled": "tab:orange", "hand": "tab:blue",
          "hand-compiled": "tab:cyan", "pyro": "tab:green", "pyro-enum": "tab:green", "pyro-tmc": "tab:olive",
          "tmcgraph-iwae": "tab:purple", "tmcgraph-iwae-compiled": "tab:pink", "hand-iwae": "tab:brown",
          "hand-iwae-compiled": "tab:gray"}


def plot_contenders(rows: list, path, label: Callable, title: str, extra: Optional[Callable] = None) -> None:
    """Two panels: median time per contender per workload (log), and fraction of the limit (log).

    ``extra(ax)``, if given, draws a third panel below.
    """
    plt = pyplot()
    names = list(dict.fromkeys(k for r in rows for k, v in r["results"].items() if "median_s" in v))
    labels = [label(r) for r in rows]
    width_in = max(6, 0.9 * len(rows) * max(1, len(names)) / 3 + 3)
    if extra is None:
        fig, axes = plt.subplots(2, 1, figsize=(width_in, 7))
    else:
        fig, axes = plt.subplots(3, 1, figsize=(width_in, 9.5), gridspec_kw={"height_ratios": [3, 3, 1.6]})
        extra(axes[2])
    width = 0.8 / max(1, len(names))
    for i, k in enumerate(names):
        xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(rows))]
        t = [r["results"].get(k, {}).get("median_s", float("nan")) * 1e3 for r in rows]
        f = [r.get("limit", {}).get("fraction_of_limit", {}).get(k, float("nan")) for r in rows]
        kw = {"color": COLORS[k]} if k in COLORS else {}
        axes[0].bar(xs, t, width, label=k, **kw)
        axes[1].bar(xs, f, width, label=k, **kw)
        ff = [r.get("limit", {}).get("fraction_of_fused_limit", {}).get(k, float("nan")) for r in rows]
        fused = axes[1].plot(xs, ff, "k_", ms=8, mew=1.5)[0]
    axes[0].set_yscale("log")
    lo, hi = axes[0].get_ylim()
    axes[0].set_ylim(lo, hi * 6)  # room for the legend
    axes[0].set_xticks(range(len(rows)))
    axes[0].set_xticklabels(labels, fontsize=7)
    axes[0].set_ylabel("median ms per call")
    axes[0].set_title(title, fontsize=9)
    axes[0].legend(fontsize=7, ncol=3)
    axes[1].set_yscale("log")
    axes[1].set_ylabel("fraction of the torch.exp limit\n(ideal time / measured; bars)")
    axes[1].axhline(1.0, color="k", lw=0.8, ls="--")
    if names and any("fraction_of_fused_limit" in r.get("limit", {}) for r in rows):
        axes[1].legend([fused], ["fraction of the fused-exp limit (inductor exp, measured)"], fontsize=7,
                       loc="lower right")
    axes[1].set_xticks(range(len(rows)))
    axes[1].set_xticklabels(labels, fontsize=7)
    missing = {}
    for r in rows:
        for k, v in r["results"].items():
            if "median_s" not in v:
                why = (v.get("error") or v.get("skipped"))[:90]
                missing.setdefault(f"{k}: {why}", []).append(label(r).replace("\n", " "))
    fig.tight_layout()
    if missing:
        note = "not run: " + "; ".join(f"{m} [{', '.join(w)}]" if len(w) < len(rows) else m for m, w in missing.items())
        fig.text(0.01, -0.01, "\n".join(note[i:i + 150] for i in range(0, len(note), 150)), fontsize=6, va="top")
    save_figure(fig, path)


def run_cli(main: Callable, argv: Optional[list] = None, prog: Optional[str] = None) -> int:
    """Run ``main(argv)``: a ``TMCGraphError`` becomes one ``error:`` line on stderr and exit status 2.

    The line starts with ``prog`` (default: the name of the running script).
    """
    from tmcgraph.errors import TMCGraphError

    try:
        main(argv)
    except TMCGraphError as e:
        print(f"{prog or pathlib.Path(sys.argv[0]).name}: error: {e}", file=sys.stderr)
        return 2
    return 0


def cli_device(name: str) -> torch.device:
    """:func:`resolve_device` for drivers whose errors are ``TMCGraphError`` (one ``error:`` line)."""
    from tmcgraph.sampling.context import resolve_device as resolve

    return resolve(name, "--device")


def check_rng_device(run: str, folder, trained_on: str, device) -> None:
    """Refuse to continue a run whose saved random streams belong to another device type."""
    from tmcgraph.errors import TMCGraphError

    here = torch.device(device).type
    if trained_on != here:
        raise TMCGraphError(
            f"run {run} in {folder} was trained on {trained_on}; its random streams cannot continue on {here}: "
            f"continue it with --device {trained_on}, or train on {here} in another --runs folder")

