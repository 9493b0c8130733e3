"""How ``burda.evaluate_bounds`` (L_5000, the Burda table's NLL) should be chunked on a CPU.

``evaluate_bounds`` draws the K samples of each batch of ``batch_size`` test images in
chunks whose decoder logits hold at most ``max_elements`` numbers. The work does not
depend on the chunking; the memory traffic does: a chunk that fits in the caches keeps
the logits, the ``softplus`` of the Bernoulli likelihood and the ``tanh`` layers there.

Contenders, ``(batch_size, max_elements)``, alternated in one process on the same images
(the order rotates every repetition); each is ``evaluate_bounds`` of a freshly built
Burda model (one and two stochastic layers) at K = 5000:

* ``b100-2^24``: 100 images, 2^24 logits per chunk (214 samples);
* ``b100-2^22``, ``b100-2^20``: the same batch, smaller chunks (53, 13 samples);
* ``b10-2^20``, ``b20-2^20``: fewer images per batch, so the chunks hold more samples
  (133, 66) within 2^20 logits.

Reported: each contender's median CPU seconds per image and the median of its paired
ratios to ``b100-2^24`` (> 1: faster). Different chunkings draw different samples, so the
estimates differ by their Monte Carlo error; the largest difference of the per-model mean
bound from ``b100-2^24``'s is recorded (it must stay below 1 nat at K = 5000).

    python benchmarks/perf_burda_eval.py
    python benchmarks/perf_burda_eval.py --quick     # 4 images, K = 50
"""

from __future__ import annotations

import pathlib
import statistics
import sys

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))  # this checkout's tmcgraph, even if another copy is installed

import torch  # noqa: E402
from _common import base_parser, clock, keeps_process_state, run_cli, save_results, set_threads, summary  # noqa: E402

import tmcgraph as tg  # noqa: E402
from tmcgraph.models import burda  # noqa: E402

NAME = "perf_burda_eval"
#: ``name -> (batch_size, max_elements)``; the first is the reference.
CONTENDERS = {
    "b100-2^24": (100, 2**24),
    "b100-2^22": (100, 2**22),
    "b100-2^20": (100, 2**20),
    "b10-2^20": (10, 2**20),
    "b20-2^20": (20, 2**20),
}
REFERENCE = "b100-2^24"


def plot(rows, path):
    from _common import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    names = list(CONTENDERS)
    width = 0.8 / max(1, len(rows))
    for i, r in enumerate(rows):
        ys = [j + i * width for j in range(len(names))]
        ax.barh(ys, [r["speedup_over_reference"][n] for n in names], height=width,
                label=f"{r['layers']} stochastic layer(s)")
    ax.set_yticks([j + width * (len(rows) - 1) / 2 for j in range(len(names))], names)
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_xlabel(f"CPU time of {REFERENCE} / contender (median of paired ratios)")
    ax.invert_yaxis()
    ax.legend(fontsize=8)
    save_figure(fig, path)


@keeps_process_state
def main(argv=None) -> dict:
    p = base_parser(__doc__, seeds=1)
    p.add_argument("--reps", type=int, default=None, help="repetitions per contender (default 5; quick: 2)")
    p.add_argument("--images", type=int, default=None, help="test images per call (default 100; quick: 4)")
    p.add_argument("--layers", default="1,2", help="comma list of 1,2")
    a = p.parse_args(argv)
    threads = set_threads(a.threads, a.allocator)
    reps = a.reps or (2 if a.quick else 5)
    n_img = a.images or (4 if a.quick else 100)
    K = 50 if a.quick else 5000
    layers = [int(v) for v in a.layers.split(",") if v]
    if reps < 1 or n_img < 1 or any(L not in burda.ARCHITECTURES for L in layers):
        raise tg.TMCGraphError(f"--reps and --images must be positive and --layers in {sorted(burda.ARCHITECTURES)}; "
                               f"got {reps}, {n_img}, {layers}")
    x = (torch.rand(n_img, 784, generator=torch.Generator().manual_seed(0)) < 0.3).float()
    rows = []
    names = list(CONTENDERS)
    for L in layers:
        m, q = burda.build(L, seed=0)
        times = {n: [] for n in names}
        bounds = {n: [] for n in names}
        for i in range(reps + 1):  # repetition 0 warms up
            for n in names[i % len(names):] + names[:i % len(names)]:
                b, me = CONTENDERS[n]
                res, cpu_s, _ = clock(lambda: burda.evaluate_bounds(m, q, x, K=K, seed=i, max_elements=me,
                                                                    batch_size=b))
                if i:
                    times[n].append(cpu_s / n_img)
                    bounds[n].append(float(res["bound"].mean()))
        ref = bounds[REFERENCE]
        diff = max(abs(statistics.mean(bounds[n]) - statistics.mean(ref)) for n in names)
        if K >= 5000 and diff > 1.0:
            raise tg.TMCGraphError(f"{L} layer(s): mean bounds of the chunkings differ by {diff:.2f} nats")
        row = {"layers": L, "K": K, "images": n_img, "reps": reps,
               "cpu_s_per_image": {n: summary(times[n]) for n in names},
               "speedup_over_reference": {n: statistics.median(r / t for r, t in zip(times[REFERENCE], times[n]))
                                          for n in names},
               "max_mean_bound_difference": diff}
        rows.append(row)
        for n in names:
            print(f"{L} layer(s) {n:10s} {row['cpu_s_per_image'][n]['median'] * 1e3:8.1f} CPU ms per image  "
                  f"{row['speedup_over_reference'][n]:.2f}x", flush=True)
    return save_results(a, NAME, argv, threads, plot, quick=a.quick, contenders=CONTENDERS, reference=REFERENCE,
                        rows=rows)


def cli(argv=None) -> int:
    return run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
