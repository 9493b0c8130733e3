"""Peak memory of each speed-benchmark workload and contender, each in its own process.

For every workload x contender x mode the parent runs ``python benchmarks/perf_memory.py
--child ...``, a fresh process that imports what it needs, builds the workload (data,
parameters, estimator or hand-written function) and then:

1. frees what it can (``gc.collect()``, glibc ``malloc_trim(0)``), resets the kernel's
   peak-RSS mark (``/proc/self/clear_refs``: 5) and reads its RSS: the *baseline* (RSS
   after imports and data setup);
2. runs the workload once (the first call: planning; the hand-compiled contender compiles
   here) and reads ``resource.getrusage(RUSAGE_SELF).ru_maxrss``: ``first_call_extra_mib`` =
   peak - baseline;
3. frees, trims and resets again and runs it a second time (``tmcgraph-compiled`` compiles
   on a program's second call); ``warmup_peak_extra_mib`` is the larger of the two peaks;
4. frees, trims and resets again, reads its RSS, runs the workload a third time and reads
   ``ru_maxrss``: ``peak_extra_mib`` = peak - RSS before that call, the steady-state peak
   of one call (the headline figure).

Modes: ``forward`` under ``torch.no_grad()`` and ``forward+backward`` (the loss with autograd,
then ``backward()``). On CUDA the child also records ``torch.cuda.max_memory_allocated``
above what was allocated before the call (``cuda_peak_extra_mib``).

Workloads (the largest size of each speed benchmark) and contenders:

* ``toy``: N = 1024, K = 512 (``perf_toy``): tmcgraph, tmcgraph-compiled, hand, hand-compiled, pyro;
* ``chain``: mixture-proposal chain, n = 200, K = 1000 (``perf_chain``; backward: gradient
  w.r.t. x): the same plus ``hand-streaming``, a Python loop over links under ``no_grad``
  keeping one K x K factor alive at a time (forward only): the memory reference;
* ``hmm``: S = 10, T = 100 (``perf_hmm``): tmcgraph, tmcgraph-compiled, hand, hand-compiled,
  pyro-enum, pyro-tmc;
* ``mnist``: K = 20, batch 128, each recognition model (``perf_mnist``'s loss): tmcgraph,
  tmcgraph-compiled, hand, hand-compiled and their IWAE counterparts.

``grid_mib`` is the size of one inherent float32 grid of the workload (toy: K x K x N; chain:
K x K; hmm: S x S; mnist: K x K x batch), for scale. ``--quick`` runs a tiny subset (a few
children, ``QUICK_SUBSET``, within the selection) at tiny sizes, for the tests.

    python benchmarks/perf_memory.py
    python benchmarks/perf_memory.py --quick
    python benchmarks/perf_memory.py --workloads chain --contenders hand,hand-streaming
"""

from __future__ import annotations

import argparse
import gc
import json
import pathlib
import resource
import subprocess
import sys
import time

import torch
from _common import (
    add_compile_arg,
    add_device_arg,
    base_parser,
    keeps_process_state,
    no_distribution_validation,
    pyplot,
    save_figure,
    save_partial,
    save_results,
    set_threads,
)

__all__ = ["main", "child", "SIZES", "CONTENDERS"]

HERE = pathlib.Path(__file__).resolve().parent
MODES = ("forward", "forward+backward")
MNIST_CONTENDERS = ("tmcgraph", "tmcgraph-compiled", "hand", "hand-compiled", "tmcgraph-iwae",
                    "tmcgraph-iwae-compiled", "hand-iwae", "hand-iwae-compiled")
CONTENDERS = {
    "toy": ("tmcgraph", "tmcgraph-compiled", "hand", "hand-compiled", "pyro"),
    "chain": ("tmcgraph", "tmcgraph-compiled", "hand", "hand-compiled", "hand-streaming", "pyro"),
    "hmm": ("tmcgraph", "tmcgraph-compiled", "hand", "hand-compiled", "pyro-enum", "pyro-tmc"),
    "mnist": MNIST_CONTENDERS,
}
SIZES = {
    "full": {"toy": [{"N": 1024, "K": 512}], "chain": [{"n": 200, "K": 1000}], "hmm": [{"S": 10, "T": 100}],
             "mnist": [{"recognition": r, "K": 20, "batch": 128} for r in ("factorised", "small", "large")]},
    "quick": {"toy": [{"N": 16, "K": 8}], "chain": [{"n": 5, "K": 10}], "hmm": [{"S": 3, "T": 5}],
              "mnist": [{"recognition": "small", "K": 3, "batch": 8}]},
}
#: ``--quick`` runs these (workload, contender, mode) only: the mechanics, in a few seconds.
QUICK_SUBSET = {("chain", "tmcgraph", "forward"), ("chain", "hand-streaming", "forward"),
                ("toy", "hand", "forward+backward")}


# --------------------------------------------------------------------------------------
# The child: one workload x contender x mode in this process.
# --------------------------------------------------------------------------------------


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1])
    return -1


def _rss_kib() -> int:
    v = _status_kib("VmRSS:")
    if v >= 0:
        return v
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # no /proc: the best we have


def _settle() -> dict:
    """Free what can be freed and reset the peak-RSS mark; report what worked."""
    import ctypes

    gc.collect()
    out = {"malloc_trim": False, "peak_reset": False}
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        out["malloc_trim"] = True
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        out["peak_reset"] = True
    except OSError:
        pass
    return out


def _build(workload: str, contender: str, size: dict, mode: str, dev, backend: str):
    """``(call, grid_elements)``: ``call()`` returns the scalar (loss or estimate) of one run."""
    from _common import compile_hand, tmcgraph_compile_skip

    import tmcgraph as tg

    backward = mode != "forward"
    compiled_tg = contender.startswith("tmcgraph") and contender.endswith("compiled")
    why = tmcgraph_compile_skip(tg.IWAE if "iwae" in contender else tg.TMC)
    if compiled_tg and why:
        raise _Skip(why)
    if workload == "toy":
        from perf_toy import _params, hand_toy, pyro_or_none, pyro_toy, tmc_toy

        from tmcgraph.models.toys import gaussian_toy_data

        N, K = size["N"], size["K"]
        x = gaussian_toy_data(N, seed=1).to(dev)
        p = _params(dev)
        if contender.startswith("tmcgraph"):
            f = tmc_toy(N, K, p, dev, compiled=compiled_tg)
        elif contender.startswith("hand"):
            f = hand_toy(K, p)
            f = compile_hand(f, backend) if contender == "hand-compiled" else f
        else:
            pm = pyro_or_none()
            if pm is None:
                raise _Skip("pyro-ppl not importable")
            f = pyro_toy(K, p, pm, dev)
        return (lambda: f(x)), K * K * N
    if workload == "chain":
        from perf_chain import hand_chain_mixture, hand_chain_streaming, pyro_chain, tmc_chain
        from perf_toy import pyro_or_none

        n, K = size["n"], size["K"]
        if contender == "hand-streaming" and backward:
            raise _Skip("the streaming loop runs without autograd (forward only, by design)")
        x = torch.tensor(0.5, device=dev, requires_grad=backward)
        if contender.startswith("tmcgraph"):
            f = tmc_chain(n, K, dev, compiled=compiled_tg, proposal="prior")
        elif contender == "hand-streaming":
            f = hand_chain_streaming(n, K, dev)
        elif contender.startswith("hand"):
            f = hand_chain_mixture(n, K, dev)
            f = compile_hand(f, backend) if contender == "hand-compiled" else f
        else:
            pm = pyro_or_none()
            if pm is None:
                raise _Skip("pyro-ppl not importable")
            f = pyro_chain(n, K, pm, dev, proposal="prior")
        return (lambda: f(x)), K * K
    if workload == "hmm":
        from perf_hmm import hand_forward, hmm_data, hmm_params, pyro_hmm_enum, pyro_hmm_tmc, tmc_hmm
        from perf_toy import pyro_or_none

        S, T = size["S"], size["T"]
        p = hmm_params(S, dev)
        x = hmm_data(p, T)
        if contender.startswith("tmcgraph"):
            f = tmc_hmm(p, T, dev, compiled=compiled_tg)
        elif contender.startswith("hand"):
            f = hand_forward(p)
            f = compile_hand(f, backend) if contender == "hand-compiled" else f
        else:
            pm = pyro_or_none()
            if pm is None:
                raise _Skip("pyro-ppl not importable")
            f = (pyro_hmm_enum if contender == "pyro-enum" else pyro_hmm_tmc)(p, pm)
        return (lambda: f(x)), S * S
    if workload == "mnist":
        from perf_mnist import _images, default_coupling, step_losses

        from tmcgraph.models import mnist_vae

        rec, K, B = size["recognition"], size["K"], size["batch"]
        torch.manual_seed(0)
        model, proposal = mnist_vae.build(rec)
        model.to(dev)
        proposal.to(dev)
        x = _images(B)[0].to(dev)
        fns, _ = step_losses(model, proposal, x, K, rec, dev, backend, compiled_tg,
                             contender.startswith("hand") and contender.endswith("compiled"), default_coupling())
        return fns[contender], K * K * B
    raise ValueError(f"unknown workload {workload!r}; choose from {tuple(CONTENDERS)}")


class _Skip(Exception):
    """The contender does not run in this configuration (the message says why)."""


def child(workload: str, contender: str, size: dict, mode: str, dev, backend: str) -> dict:
    """Measure one workload x contender x mode in this process (see the module docstring)."""
    cuda = dev.type == "cuda"
    out = {"workload": workload, "contender": contender, "mode": mode, "size": size}
    try:
        call, grid = _build(workload, contender, size, mode, dev, backend)
    except _Skip as e:
        return {**out, "skipped": str(e)}
    out["grid_mib"] = 4 * grid / 2**20
    backward = mode != "forward"

    def run():
        torch.manual_seed(0)
        if backward:
            v = call()
            v.backward()
        else:
            with torch.no_grad():
                v = call()
        if cuda:
            torch.cuda.synchronize(dev)
        return float(v.detach())

    try:
        for key in ("first_call", "second_call", "third_call"):
            settle = _settle()
            if cuda:
                torch.cuda.synchronize(dev)
                torch.cuda.reset_peak_memory_stats(dev)
                cuda0 = torch.cuda.memory_allocated(dev)
            rss0 = _rss_kib()
            c0, w0 = time.process_time(), time.perf_counter()
            value = run()
            c1, w1 = time.process_time(), time.perf_counter()
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            out[key] = {"rss_before_mib": rss0 / 1024, "peak_rss_mib": peak / 1024,
                        "peak_extra_mib": max(0, peak - rss0) / 1024, "cpu_s": c1 - c0, "wall_s": w1 - w0,
                        "value": value, **settle}
            if cuda:
                out[key]["cuda_peak_extra_mib"] = (torch.cuda.max_memory_allocated(dev) - cuda0) / 2**20
    except Exception as e:  # a contender that cannot run this size is reported, not fatal
        lines = str(e).strip().splitlines() or [""]
        return {**out, "error": f"{type(e).__name__}: {lines[0][:300]}"}
    calls = [out[k] for k in ("first_call", "second_call", "third_call")]
    out["baseline_rss_mib"] = calls[0]["rss_before_mib"]
    out["first_call_extra_mib"] = calls[0]["peak_extra_mib"]
    out["warmup_peak_extra_mib"] = max(calls[0]["peak_extra_mib"], calls[1]["peak_extra_mib"])
    out["peak_extra_mib"] = calls[2]["peak_extra_mib"]
    out["peak_rss_mib"] = max(c["peak_rss_mib"] for c in calls)
    if cuda:
        out["cuda_peak_extra_mib"] = calls[2]["cuda_peak_extra_mib"]
    return out


# --------------------------------------------------------------------------------------
# The parent.
# --------------------------------------------------------------------------------------


def _spawn(args, workload, contender, size, mode) -> dict:
    cmd = [sys.executable, str(HERE / "perf_memory.py"), "--child", "--workloads", workload, "--contenders",
           contender, "--modes", mode, "--size", json.dumps(size), "--threads", str(args.threads),
           "--allocator", args.allocator, "--device", args.device]
    if args.compile_backend:
        cmd += ["--compile-backend", args.compile_backend]
    if args.quick:
        cmd.append("--quick")
    t0 = time.perf_counter()
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"workload": workload, "contender": contender, "mode": mode, "size": size,
                "error": f"timed out after {args.timeout} s"}
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        return {"workload": workload, "contender": contender, "mode": mode, "size": size,
                "error": f"child exited with {out.returncode}: {out.stderr.strip()[-500:]}"}
    res = json.loads(lines[-1][len("RESULT "):])
    res["child_wall_s"] = time.perf_counter() - t0
    return res


@keeps_process_state
def main(argv=None) -> dict:
    ap = base_parser(__doc__)
    add_device_arg(ap)
    add_compile_arg(ap)
    ap.add_argument("--workloads", default=None, help=f"comma-separated subset of {tuple(CONTENDERS)}")
    ap.add_argument("--contenders", default=None, help="comma-separated subset of the contenders")
    ap.add_argument("--modes", default=None, help=f"comma-separated subset of {MODES}")
    ap.add_argument("--exclude", default=None,
                    help="comma-separated workload:contender pairs not to run (e.g. chain:hand-compiled)")
    ap.add_argument("--recognition", default=None,
                    help="comma-separated recognition models of the mnist workload (default factorised,small,large)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per child (default 1800)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--size", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    from _common import compile_backend, resolve_device

    dev = resolve_device(args.device)
    threads = {**set_threads(args.threads, args.allocator), **no_distribution_validation()}
    if args.child:
        res = child(args.workloads, args.contenders, json.loads(args.size), args.modes, dev, compile_backend(args))
        print("RESULT " + json.dumps(res), flush=True)
        return res
    workloads = args.workloads.split(",") if args.workloads else list(CONTENDERS)
    contenders = args.contenders.split(",") if args.contenders else None
    modes = args.modes.split(",") if args.modes else list(MODES)
    for w in workloads:
        if w not in CONTENDERS:
            ap.error(f"unknown workload {w!r}; choose from {tuple(CONTENDERS)}")
    sizes = dict(SIZES["quick" if args.quick else "full"])
    if args.recognition:
        base = sizes["mnist"][0]
        sizes["mnist"] = [{**base, "recognition": r} for r in args.recognition.split(",") if r]
    exclude = {tuple(e.split(":", 1)) for e in (args.exclude or "").split(",") if e}
    rows = []
    t0 = time.perf_counter()
    for w in workloads:
        for size in sizes[w]:
            for c in CONTENDERS[w]:
                if (contenders is not None and c not in contenders) or (w, c) in exclude:
                    continue
                for mode in modes:
                    if args.quick and (w, c, mode) not in QUICK_SUBSET:
                        continue
                    r = _spawn(args, w, c, size, mode)
                    rows.append(r)
                    what = (f"peak +{r['peak_extra_mib']:.1f} MiB (first call +{r['first_call_extra_mib']:.1f}, "
                            f"baseline {r['baseline_rss_mib']:.0f} MiB)" if "peak_extra_mib" in r
                            else (r.get("error") or r.get("skipped"))[:120])
                    print(f"{w:5s} {json.dumps(size):48s} {c:22s} {mode:17s} {what}", flush=True)
                    save_partial(args, "perf_memory", argv, threads, device=str(dev), rows=rows)
    return save_results(args, "perf_memory", argv, threads, _plot, device=str(dev),
                        wall_time_s=time.perf_counter() - t0,
                        measure="peak RSS of one call above the RSS just before it (ru_maxrss after resetting the "
                                "peak mark via /proc/self/clear_refs, after gc.collect and malloc_trim); the "
                                "third call in each child is the headline (the first two include planning and "
                                "compilation)", rows=rows)


def _plot(rows, path):
    plt = pyplot()
    groups = list(dict.fromkeys((r["workload"], json.dumps(r["size"])) for r in rows))
    fig, axes = plt.subplots(len(groups), 1, figsize=(9, 2.8 * max(1, len(groups))), squeeze=False)
    for ax, (w, size) in zip(axes[:, 0], groups):
        sub = [r for r in rows if r["workload"] == w and json.dumps(r["size"]) == size]
        names = list(dict.fromkeys(r["contender"] for r in sub))
        for j, mode in enumerate(MODES):
            vals = []
            for c in names:
                r = next((r for r in sub if r["contender"] == c and r["mode"] == mode), {})
                vals.append(max(r.get("peak_extra_mib", float("nan")), 1e-2))
            ax.bar([i + (j - 0.5) * 0.4 for i in range(len(names))], vals, 0.4, label=mode)
        grid = next((r["grid_mib"] for r in sub if "grid_mib" in r), None)
        if grid:
            ax.axhline(grid, color="k", ls="--", lw=0.8, label=f"one grid ({grid:.3g} MiB)")
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("peak RSS above\nbaseline (MiB)")
        ax.set_title(f"{w} {size}", fontsize=8)
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
