"""Peak memory and CPU time of plate splitting (``split={"data": chunk}``) versus the chunk size.

Workload: a global latent ``a ~ N(0, 1)``, a plate ``data`` of N elements (default 20000;
``--quick``: 200) with a latent ``z_n ~ N(a, s)`` per element and an observed vector
``x_n`` of 4 values (inner plate ``obs``), ``x_nj ~ N(z_n, 0.5)``. The proposal draws ``a``
from ``N(0.1, 1.3)`` and each ``z_n`` from ``N(0.5 a + 0.3 mean_j x_nj, 1.1)`` with the
mixture coupling on ``a``, K = 64 particles (``--quick``: 8), float32. The largest factor
is ``log p(z | a)``, a K x K x N grid (N = 20000, K = 64: 312.5 MiB); splitting ``data``
builds it, and everything else inside the plate, ``chunk`` elements at a time. The
mixture coupling's density ``log q(z_n^k) = log (1/K) sum_j q(z_n^k | a^j)`` is a grid of
the same size; the rows show whether it, too, is bounded by the chunk.
The model parameter ``s`` (1.0) is a leaf tensor with ``requires_grad``.

Modes: ``forward`` (the estimate under ``torch.no_grad()``) and ``forward+backward`` (the
estimate with autograd, then ``backward()``: the gradient w.r.t. ``s``). Chunk sizes:
``none`` (unsplit), 10000, 2000, 500, 100 (``--quick``: none, 50, 10).

Every mode x chunk runs in its own fresh process (``python benchmarks/perf_split.py
--child ...``), measured as in ``perf_memory.py`` (its ``_settle`` and ``_rss_kib``): after
building data, model and estimator the child frees what it can (``gc.collect()``, glibc
``malloc_trim(0)``), resets the kernel's peak-RSS mark (``/proc/self/clear_refs``) and
reads its RSS, runs one call and reads ``ru_maxrss``; three times. Reported per row:

* ``peak_extra_mib``: peak RSS of the third call above the RSS just before it (the
  steady state; the headline figure);
* ``first_call_extra_mib``: the same for the first call (planning from a probe graph);
* ``cpu_median_s``: median CPU time (``time.process_time``) of ``--calls`` further calls
  in the same child (gc paused during each, ``_common.clock``);
* ``value``: the estimate (every call uses ``seed=0``, so every child and chunk size
  draws the same particles), and in ``forward+backward`` the gradient ``grad_s``.

Built-in check: within a mode, every split value equals the unsplit one to ``--rtol``
(default 1e-6) relative; the gradient is recorded with its relative difference. The
estimator runs with ``compile=False`` (the ``"auto"`` policy would compile some
configurations mid-run). One torch thread (``_common.set_threads``).

    python benchmarks/perf_split.py
    python benchmarks/perf_split.py --quick
    python benchmarks/perf_split.py --chunks none,1000 --modes forward --N 5000
"""

from __future__ import annotations

import argparse
import json
import pathlib
import resource
import statistics
import subprocess
import sys
import time

import torch
from _common import (
    base_parser,
    clock,
    keeps_process_state,
    no_distribution_validation,
    pyplot,
    save_figure,
    save_partial,
    save_results,
    set_threads,
    tmcgraph_estimator,
)
from perf_memory import _rss_kib, _settle

__all__ = ["main", "child", "build", "MODES", "CHUNKS", "OBS"]

HERE = pathlib.Path(__file__).resolve().parent
MODES = ("forward", "forward+backward")
#: Chunk sizes (``None``: unsplit) of the full and the quick run.
CHUNKS = {"full": (None, 10000, 2000, 500, 100), "quick": (None, 50, 10)}
#: Size of the inner plate of observations per element.
OBS = 4


def build(N: int, K: int, chunk):
    """``(estimator, data, s)``: the workload (see the module docstring) split in chunks of ``chunk``.

    ``chunk=None`` is the unsplit estimator. ``s`` is the model parameter (the scale of
    ``z`` given ``a``), a float32 leaf with ``requires_grad``.
    """
    from torch.distributions import Normal

    import tmcgraph as tg

    g = torch.Generator().manual_seed(1)
    a_true = 0.7
    z_true = a_true + torch.randn(N, generator=g)
    x = z_true[:, None] + 0.5 * torch.randn(N, OBS, generator=g)
    s = torch.tensor(1.0, requires_grad=True)
    m = tg.Model()
    m.plate("data", size=N)
    m.plate("obs", size=OBS)
    m.latent("a", lambda: Normal(0.0, 1.0))
    m.latent("z", lambda a: Normal(a, s), plate="data")
    m.observed("x", lambda z: Normal(z, 0.5), plate=("data", "obs"))
    q = tg.Proposal(m)
    q.latent("a", lambda: Normal(0.1, 1.3))
    q.latent("z", lambda a, x: Normal(0.5 * a + 0.3 * x.mean(-1), 1.1), plate="data", coupling="mixture")
    split = None if chunk is None else {"data": int(chunk)}
    est = tmcgraph_estimator(tg.TMC, m, q, K, compiled=False, split=split)
    return est, {"x": x}, s


def child(mode: str, N: int, K: int, chunk, calls: int) -> dict:
    """Measure one mode x chunk size in this process (see the module docstring)."""
    est, data, s = build(N, K, chunk)
    backward = mode != "forward"
    out = {"mode": mode, "chunk": chunk, "N": N, "K": K, "grid_mib": 4 * K * K * N / 2**20,
           "chunk_grid_mib": 4 * K * K * (N if chunk is None else min(chunk, N)) / 2**20}

    def run():
        s.grad = None
        if backward:
            v = est.log_evidence(data, seed=0)
            v.backward()
        else:
            with torch.no_grad():
                v = est.log_evidence(data, seed=0)
        return float(v.detach())

    measured = []
    for _ in range(3):
        settle = _settle()
        rss0 = _rss_kib()
        c0, w0 = time.process_time(), time.perf_counter()
        value = run()
        c1, w1 = time.process_time(), time.perf_counter()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        measured.append({"rss_before_mib": rss0 / 1024, "peak_rss_mib": peak / 1024,
                         "peak_extra_mib": max(0, peak - rss0) / 1024, "cpu_s": c1 - c0, "wall_s": w1 - w0,
                         "value": value, **settle})
    for key, rec in zip(("first_call", "second_call", "third_call"), measured):
        out[key] = rec
    cpu, wall, values = [], [], []
    for _ in range(calls):
        v, c, w = clock(run)
        cpu.append(c)
        wall.append(w)
        values.append(v)
    out.update({
        "baseline_rss_mib": measured[0]["rss_before_mib"],
        "first_call_extra_mib": measured[0]["peak_extra_mib"],
        "peak_extra_mib": measured[2]["peak_extra_mib"],
        "peak_rss_mib": max(r["peak_rss_mib"] for r in measured),
        "cpu_s": cpu, "wall_s": wall, "cpu_median_s": statistics.median(cpu),
        "wall_median_s": statistics.median(wall),
        "value": measured[2]["value"], "values": [r["value"] for r in measured] + values,
    })
    if backward:
        out["grad_s"] = float(s.grad)
    return out


def _spawn(args, mode: str, chunk) -> dict:
    cmd = [sys.executable, str(HERE / "perf_split.py"), "--child", "--modes", mode,
           "--chunks", "none" if chunk is None else str(chunk), "--N", str(args.N), "--K", str(args.K),
           "--calls", str(args.calls), "--threads", str(args.threads), "--allocator", args.allocator]
    base = {"mode": mode, "chunk": chunk, "N": args.N, "K": args.K}
    t0 = time.perf_counter()
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {**base, "error": f"timed out after {args.timeout} s"}
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        return {**base, "error": f"child exited with {out.returncode}: {out.stderr.strip()[-800:]}"}
    res = json.loads(lines[-1][len("RESULT "):])
    res["child_wall_s"] = time.perf_counter() - t0
    return res


def _check(rows: list, rtol: float) -> dict:
    """Every split row's values against its mode's unsplit value (``rtol`` relative); records the differences.

    Returns:
        ``{mode: max relative difference}``. Raises ``RuntimeError`` if a row has no
        value or one differs by more than ``rtol``.
    """
    worst = {}
    for mode in dict.fromkeys(r["mode"] for r in rows):
        sub = [r for r in rows if r["mode"] == mode]
        failed = [r for r in sub if "value" not in r]
        if failed:
            raise RuntimeError(f"mode {mode}: chunk {failed[0]['chunk']} did not run: {failed[0].get('error')}")
        ref = next((r for r in sub if r["chunk"] is None), None)
        if ref is None:
            raise RuntimeError(f"mode {mode}: no unsplit row to check the split values against")
        worst[mode] = 0.0
        for r in sub:
            rel = max(abs(v - ref["value"]) for v in r["values"]) / max(abs(ref["value"]), 1e-30)
            r["value_rel_difference"] = rel
            if "grad_s" in r and "grad_s" in ref:
                r["grad_rel_difference"] = abs(r["grad_s"] - ref["grad_s"]) / max(abs(ref["grad_s"]), 1e-30)
            worst[mode] = max(worst[mode], rel)
            if rel > rtol:
                raise RuntimeError(f"mode {mode}: chunk {r['chunk']} gives {r['values']}, the unsplit estimator "
                                   f"{ref['value']!r}: relative difference {rel:.3g} > {rtol:g}")
    return worst


def _chunk_arg(s: str) -> list:
    out = []
    for v in s.split(","):
        v = v.strip().lower()
        if not v:
            continue
        if v == "none":
            out.append(None)
            continue
        try:
            c = int(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"chunk sizes are positive integers or 'none', got {v!r}") from None
        if c < 1:
            raise argparse.ArgumentTypeError(f"chunk sizes are positive integers or 'none', got {v!r}")
        out.append(c)
    if not out:
        raise argparse.ArgumentTypeError("--chunks: no chunk size given")
    return out


@keeps_process_state
def main(argv=None) -> dict:
    ap = base_parser(__doc__)
    ap.add_argument("--N", type=int, default=None, help="elements of the plate 'data' (default 20000; quick 200)")
    ap.add_argument("--K", type=int, default=None, help="particles (default 64; quick 8)")
    ap.add_argument("--chunks", type=_chunk_arg, default=None,
                    help="comma-separated chunk sizes, 'none' for unsplit (default none,10000,2000,500,100; "
                         "quick none,50,10)")
    ap.add_argument("--modes", default=None, help=f"comma-separated subset of {MODES}")
    ap.add_argument("--calls", type=int, default=None, help="timed calls per child after the three memory calls "
                                                            "(default 5; quick 2)")
    ap.add_argument("--rtol", type=float, default=1e-6, help="relative tolerance of the value check (default 1e-6)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per child (default 1800)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    for flag, quick, full in (("N", 200, 20000), ("K", 8, 64), ("calls", 2, 5)):
        if getattr(args, flag) is None:
            setattr(args, flag, quick if args.quick else full)
    for flag in ("N", "K", "calls"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag}: expected a positive integer, got {getattr(args, flag)}")
    chunks = args.chunks or list(CHUNKS["quick" if args.quick else "full"])
    modes = args.modes.split(",") if args.modes else list(MODES)
    for mode in modes:
        if mode not in MODES:
            ap.error(f"--modes: unknown mode {mode!r}; choose from {MODES}")
    threads = {**set_threads(args.threads, args.allocator), **no_distribution_validation()}
    if args.child:
        res = child(modes[0], args.N, args.K, chunks[0], args.calls)
        print("RESULT " + json.dumps(res), flush=True)
        return res
    if None not in chunks:
        chunks = [None, *chunks]  # the value check needs the unsplit reference
    fields = {"quick": args.quick, "N": args.N, "K": args.K, "obs": OBS, "calls": args.calls, "rtol": args.rtol}
    rows = []
    t0 = time.perf_counter()
    for mode in modes:
        for chunk in chunks:
            r = _spawn(args, mode, chunk)
            rows.append(r)
            what = (f"peak +{r['peak_extra_mib']:8.1f} MiB (first call +{r['first_call_extra_mib']:8.1f}, baseline "
                    f"{r['baseline_rss_mib']:5.0f} MiB)  cpu {r['cpu_median_s'] * 1e3:9.1f} ms  value {r['value']:.8g}"
                    if "peak_extra_mib" in r else r["error"][:300])
            print(f"{mode:17s} chunk {str(chunk):>6s}  {what}", flush=True)
            save_partial(args, "perf_split", argv, threads, **fields, rows=rows)
    worst = _check(rows, args.rtol)
    return save_results(args, "perf_split", argv, threads, _plot, **fields, wall_time_s=time.perf_counter() - t0,
                        max_value_rel_difference=worst,
                        measure="peak RSS of one call above the RSS just before it (ru_maxrss after resetting the "
                                "peak mark via /proc/self/clear_refs, after gc.collect and malloc_trim), each "
                                "configuration in a fresh process; the third call is the headline",
                        rows=rows)


def _plot(rows, path):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ran = [r for r in rows if "peak_extra_mib" in r]
    N = max((r["N"] for r in ran), default=1)
    for mode, marker in zip(MODES, ("o", "s")):
        sub = sorted((r for r in ran if r["mode"] == mode), key=lambda r: r["chunk"] or N)
        if not sub:
            continue
        xs = [r["chunk"] or N for r in sub]
        ax.plot(xs, [max(r["peak_extra_mib"], 1e-2) for r in sub], marker=marker, label=f"{mode} (third call)")
        ax.plot(xs, [max(r["first_call_extra_mib"], 1e-2) for r in sub], marker=marker, ls=":", alpha=0.6,
                label=f"{mode} (first call)")
    if ran:
        r0 = ran[0]
        cs = sorted({r["chunk"] or N for r in ran})
        ax.plot(cs, [4 * r0["K"] ** 2 * c / 2**20 for c in cs], "k--", lw=0.8, label="one K x K x chunk grid")
    ax.set_xscale("log")
    ax.set_yscale("log")
    if any(r["chunk"] is None for r in ran):
        ax.annotate("unsplit", (N, 1), xycoords=("data", "axes fraction"), xytext=(0, -28),
                    textcoords="offset points", ha="center", fontsize=7)
    ax.set_xlabel(f"chunk size (elements of 'data'; unsplit plotted at N = {N})")
    ax.set_ylabel("peak RSS above baseline (MiB)")
    K = ran[0]["K"] if ran else "?"
    ax.set_title(f"split={{'data': chunk}}: N = {N}, K = {K}, CPU, 1 thread", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
