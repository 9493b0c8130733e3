"""Planning overhead: later calls on the same structure and shapes do no path search.

For several models (Gaussian toy, Gaussian chain, a 3 x 3 lattice, and the MNIST chain
when :mod:`tmcgraph.models.mnist_vae` is available) the plan cache is cleared, then the estimator
is called repeatedly on same-shaped data. Reported per model: path searches on the
first call and on all later calls (from :func:`tmcgraph.plan_cache_info`, which counts
every search), the time of an uncached ``make_plan`` (the search) against a cached
lookup (``plan_for`` on the same factors), and the first vs median later call. Then a
different data size forces one new search, and returning to the first size does none
(the LRU cache keeps both).

    python benchmarks/perf_planning.py
    python benchmarks/perf_planning.py --quick
"""

from __future__ import annotations

import statistics
import sys
import time

import torch
from _common import (
    base_parser,
    command_line,
    keeps_process_state,
    machine_info,
    output_paths,
    pyplot,
    save_figure,
    set_threads,
    write_json,
)
from perf_lattice import lattice

import tmcgraph as tg
from tmcgraph.models.toys import gaussian_chain, gaussian_toy, gaussian_toy_data
from tmcgraph.ops.plan import _cached_plan

__all__ = ["main"]


def _models(quick: bool):
    K = 4 if quick else 16
    m, q = gaussian_toy()
    yield "gaussian toy", tg.TMC(m, q, K=K), (lambda n: {"x": gaussian_toy_data(n)}), (8, 12) if quick else (128, 64)
    n = 5 if quick else 100
    m, q = gaussian_chain(n, "factorised")
    yield f"chain n={n}", tg.TMC(m, q, K=K), (lambda _: {"x": torch.tensor(0.5)}), None
    R = 2 if quick else 3
    m, q, data = lattice(R, R)
    yield f"lattice {R}x{R}", tg.TMC(m, q, K=K), (lambda _: data), None
    try:
        from tmcgraph.models import mnist_vae
    except ImportError as e:
        print(f"tmcgraph.models.mnist_vae not available ({e}); skipping the MNIST chain")
        return
    torch.manual_seed(0)
    m, q = mnist_vae.build("small")
    B = (4, 6) if quick else (128, 64)
    yield "mnist chain", tg.TMC(m, q, K=3 if quick else 20), (lambda b: {"x": torch.rand(b, 784)}), B


@keeps_process_state
def main(argv=None) -> dict:
    ap = base_parser(__doc__, seeds=10)
    args = ap.parse_args(argv)
    threads = set_threads(args.threads, args.allocator)
    reps = args.seeds or (3 if args.quick else args.default_seeds)
    rows = []
    for name, est, make, sizes in _models(args.quick):
        size0 = sizes[0] if sizes else None
        data = make(size0)
        tg.ops.plan_cache_clear()
        t0 = time.perf_counter()
        with torch.no_grad():
            est.log_evidence(data, seed=0)
        first_s = time.perf_counter() - t0
        first_searches = tg.ops.plan_cache_info()["searches"]
        later = []
        for r in range(reps):
            t0 = time.perf_counter()
            with torch.no_grad():
                est.log_evidence(data, seed=r + 1)
            later.append(time.perf_counter() - t0)
        later_searches = tg.ops.plan_cache_info()["searches"] - first_searches
        s = est.sample(data, seed=0)
        fs = est.factor_graph(s).factors
        t0 = time.perf_counter()
        for _ in range(reps):
            est.plan(tg.FactorGraph(fs, s.ordinals))
        cached_s = (time.perf_counter() - t0) / reps
        t0 = time.perf_counter()
        for _ in range(reps):
            _cached_plan.__wrapped__(*_key(est, fs, s.ordinals))
        search_s = (time.perf_counter() - t0) / reps
        row = {"model": name, "first_call_searches": first_searches, "later_calls_searches": later_searches,
               "later_calls": reps, "first_call_s": first_s, "later_call_median_s": statistics.median(later),
               "plan_search_s": search_s, "plan_cached_lookup_s": cached_s,
               "search_over_lookup": search_s / cached_s}
        if sizes:
            before = tg.ops.plan_cache_info()["searches"]
            with torch.no_grad():
                est.log_evidence(make(sizes[1]), seed=0)
            mid = tg.ops.plan_cache_info()["searches"]
            with torch.no_grad():
                est.log_evidence(make(size0), seed=0)
            row["new_shape_searches"] = mid - before
            row["back_to_first_shape_searches"] = tg.ops.plan_cache_info()["searches"] - mid
        rows.append(row)
        print(f"{name:14s}: searches first call {first_searches}, next {reps} calls {later_searches}"
              + (f", new shape {row['new_shape_searches']}, back to first shape {row['back_to_first_shape_searches']}"
                 if sizes else "")
              + f"; search {search_s * 1e3:.2f} ms vs cached lookup {cached_s * 1e3:.3f} ms; first call "
              f"{first_s * 1e3:.1f} ms, later median {row['later_call_median_s'] * 1e3:.1f} ms")
        if later_searches:
            raise RuntimeError(f"{name}: later calls searched paths again")
    jpath, ppath = output_paths(args.out, "perf_planning", args.quick)
    payload = {"benchmark": "perf_planning", "command": command_line(argv), "machine": machine_info(), **threads,
               "repetitions": reps, "rows": rows}
    write_json(jpath, payload)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3))
    xs = range(len(rows))
    w = 0.38
    ax.bar([x - w / 2 for x in xs], [r["plan_search_s"] * 1e3 for r in rows], w, label="path search (uncached)")
    ax.bar([x + w / 2 for x in xs], [r["plan_cached_lookup_s"] * 1e3 for r in rows], w, label="cached lookup")
    ax.set_yscale("log")
    ax.set_xticks(list(xs), [r["model"] for r in rows], fontsize=8)
    ax.set_ylabel("ms per plan")
    ax.legend(fontsize=8)
    save_figure(fig, ppath)
    print(f"wrote {jpath} and {ppath}")
    return payload


def _key(est, fs, levels):
    structure = tuple((f.sample_dims, f.plates, tuple(f.tensor.shape)) for f in fs)
    used = {d for f in fs for d in f.sample_dims}
    lv = tuple(sorted((d, tuple(levels[d])) for d in used))
    return structure, lv, None, est.strategy, est.memory_limit


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
