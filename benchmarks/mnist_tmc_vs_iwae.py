"""TMC vs IWAE training on MNIST (the TMC paper's Fig. 5A-C, non-factorised small model).

Trains the five-layer VAE of ``examples/mnist_chain.py`` twice with the same budget,
once with the IWAE objective and once with the TMC objective (K = 20, reparameterised
gradients, batch 128, Adam 1e-3), alternating epochs in one process so both models
always have the same number of epochs. After every epoch both models are evaluated on
the test set under both bounds (IWAE and TMC, K = 20, nats per image). Panels:

* A: TMC bound of the IWAE-trained (blue) and TMC-trained (red) models;
* B: the IWAE-trained model under the IWAE (blue) and TMC (red) bounds;
* C: the TMC-trained model under the IWAE (blue) and TMC (red) bounds;
* D: the difference of panel A's lines per epoch (positive: the TMC-trained model is better).

Target: at equal epochs the TMC-trained model's TMC bound beats the IWAE-trained
model's TMC bound. The budget is recorded in the JSON; it is far from the paper's 1200
epochs.
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))  # this checkout's tmcgraph, even if another copy is installed

from _common import (  # noqa: E402
    base_parser,
    command_line,
    keeps_process_state,
    machine_info,
    output_paths,
    pyplot,
    run_cli,
    save_figure,
    set_threads,
    write_json,
)

NAME = "mnist_tmc_vs_iwae"


def load_example():
    """Import ``examples/mnist_chain.py`` as a module."""
    path = HERE.parent / "examples" / "mnist_chain.py"
    spec = importlib.util.spec_from_file_location("mnist_chain", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def parse(argv=None):
    p = base_parser(__doc__, seeds=1)
    p.add_argument("--epochs", type=int, default=None, help="epochs per model (default 10; quick: 1)")
    p.add_argument("--limit-train", type=int, default=None, help="training images (default all; quick: 256)")
    p.add_argument("--limit-test", type=int, default=None, help="test images (default all; quick: 200)")
    p.add_argument("--K", type=int, default=20)
    p.add_argument("--recognition", default="small")
    p.add_argument("--data", default=None, help="MNIST directory")
    p.add_argument("--dataset", default="mnist", choices=("mnist", "fashion-mnist"), help="IDX dataset")
    p.add_argument("--runs", default=None, help="folder for the two training runs (default: a temporary folder)")
    return p.parse_args(argv)


@keeps_process_state
def main(argv=None) -> dict:
    a = parse(argv)
    threads = set_threads(a.threads, a.allocator)
    epochs = a.epochs or (1 if a.quick else 10)
    limit_train = a.limit_train or (256 if a.quick else None)
    limit_test = a.limit_test or (200 if a.quick else None)
    seed = 0
    ex = load_example()
    runs = pathlib.Path(a.runs) if a.runs else pathlib.Path(tempfile.mkdtemp(prefix="mnist_tmc_vs_iwae_"))
    common = ["--dataset", a.dataset, "--recognition", a.recognition, "--K", str(a.K), "--seed", str(seed),
              "--threads", str(a.threads),
              "--no-progress", "--no-plots", "--no-download"]
    if a.data:
        common += ["--data", a.data]
    if limit_train:
        common += ["--limit-train", str(limit_train)]
    if limit_test:
        common += ["--limit-test", str(limit_test)]
    summaries = {}
    t0 = time.perf_counter()
    for epoch in range(1, epochs + 1):
        for obj in ("iwae", "tmc"):
            argv_run = ["--objective", obj, "--epochs", str(epoch), "--out", str(runs / obj), *common]
            if (runs / obj / "checkpoint.pt").exists():  # continue earlier epochs (also of an earlier invocation)
                argv_run.append("--resume")
            summaries[obj] = ex.main(argv_run)
    wall = time.perf_counter() - t0
    m_iwae = summaries["iwae"]["metrics"]
    m_tmc = summaries["tmc"]["metrics"]
    def bounds(r):
        return {"iwae_bound": r["test_iwae"], "tmc_bound": r["test_tmc"], "train_seconds": r["train_seconds"]}

    per_epoch = [
        {"epoch": ri["epoch"], "iwae_trained": bounds(ri), "tmc_trained": bounds(rt),
         "tmc_minus_iwae_trained_tmc_bound": rt["test_tmc"] - ri["test_tmc"]}
        for ri, rt in zip(m_iwae, m_tmc)
    ]
    wins = [r["tmc_minus_iwae_trained_tmc_bound"] > 0 for r in per_epoch]
    couplings = coupling_check(ex, runs, a, limit_test)
    payload = {
        "benchmark": NAME,
        "command": command_line(argv),
        "quick": a.quick,
        "budget": {"epochs": epochs, "train_images": limit_train or 60000, "test_images": limit_test or 10000,
                   "batch_size": 128, "K": a.K, "lr": 1e-3, "recognition": a.recognition, "coupling": "mixture",
                   "grad": "reparam", "seed": seed,
                   "train_seconds": {o: sum(r["train_seconds"] for r in summaries[o]["metrics"]) for o in summaries},
                   "wall_seconds_this_invocation": wall,
                   "note": "far from the paper's 1200 epochs"},
        "threads": threads,
        "machine": machine_info(),
        "per_epoch": per_epoch,
        "final": per_epoch[-1],
        "target": "TMC-trained model's TMC bound > IWAE-trained model's TMC bound at equal epochs",
        "target_met_every_epoch": all(wins),
        "target_met_final_epoch": wins[-1],
        "coupling_check": couplings,
    }
    json_path, png_path = output_paths(a.out, NAME, a.quick)
    write_json(json_path, payload)
    plot(payload, png_path)
    f = payload["final"]
    print(f"after {epochs} epoch(s): IWAE-trained: IWAE {f['iwae_trained']['iwae_bound']:.2f}, "
          f"TMC {f['iwae_trained']['tmc_bound']:.2f}; TMC-trained: IWAE {f['tmc_trained']['iwae_bound']:.2f}, "
          f"TMC {f['tmc_trained']['tmc_bound']:.2f} nats/image; target met at every epoch: {all(wins)}")
    print(f"wrote {json_path} and {png_path}")
    return payload


def coupling_check(ex, runs: pathlib.Path, a, limit_test) -> dict:
    """TMC bound of each trained model with its recognition layers drawn with the mixture (as trained)
    and with the paired coupling (same weights), and the IWAE bound for reference."""
    from tmcgraph.contrib import checkpoint
    from tmcgraph.data import mnist as mnist_data
    from tmcgraph.models import mnist_vae

    test_x = mnist_data.load_mnist(a.data, download=False, dataset=a.dataset).test_x[:limit_test]
    out = {}
    for obj in ("iwae", "tmc"):
        state = checkpoint.load(runs / obj / "checkpoint.pt", ex.KIND)["state"]  # weights_only=True
        row = {}
        for coupling in ("mixture", "permutation", "paired"):
            m, q = mnist_vae.build(a.recognition, coupling)
            m.load_state_dict(state["model"])
            q.load_state_dict(state["proposal"])
            ev = ex.evaluate(m, q, test_x, a.K, 500, seed=777)
            row[f"tmc_bound_{coupling}"] = ev["tmc"]
            row["iwae_bound"] = ev["iwae"]
        out[f"{obj}_trained"] = row
    out["note"] = "same trained weights (trained with the mixture coupling), evaluated under both couplings"
    return out


def plot(payload: dict, path) -> None:
    plt = pyplot()
    rows = payload["per_epoch"]
    ep = [r["epoch"] for r in rows]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    panels = [
        ("A: TMC bound", [("IWAE-trained", "iwae_trained", "tmc_bound", "tab:blue"),
                          ("TMC-trained", "tmc_trained", "tmc_bound", "tab:red")]),
        ("B: IWAE-trained model", [("IWAE bound", "iwae_trained", "iwae_bound", "tab:blue"),
                                   ("TMC bound", "iwae_trained", "tmc_bound", "tab:red")]),
        ("C: TMC-trained model", [("IWAE bound", "tmc_trained", "iwae_bound", "tab:blue"),
                                  ("TMC bound", "tmc_trained", "tmc_bound", "tab:red")]),
    ]
    for ax, (title, lines) in zip(axes[:3], panels):
        for label, model, b, color in lines:
            ax.plot(ep, [r[model][b] for r in rows], "o-", color=color, label=label)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        ax.legend(fontsize=8)
    axes[0].set_ylabel("test bound (nats per image)")
    lo = min(min(r[m][b] for m in ("iwae_trained", "tmc_trained") for b in ("iwae_bound", "tmc_bound")) for r in rows)
    hi = max(max(r[m][b] for m in ("iwae_trained", "tmc_trained") for b in ("iwae_bound", "tmc_bound")) for r in rows)
    for ax in axes[:3]:
        ax.set_ylim(lo - 0.02 * (hi - lo + 1), hi + 0.02 * (hi - lo + 1))
    d = [r["tmc_minus_iwae_trained_tmc_bound"] for r in rows]
    axes[3].bar(ep, d, color=["tab:red" if v > 0 else "tab:blue" for v in d])
    axes[3].axhline(0, color="k", lw=0.8)
    axes[3].set_title("D: TMC bound, TMC-trained minus IWAE-trained", fontsize=10)
    axes[3].set_xlabel("epoch")
    axes[3].set_ylabel("nats per image")
    b = payload["budget"]
    fig.suptitle(f"MNIST, {b['recognition']} recognition, K={b['K']}, {b['train_images']} training images, "
                 f"{b['epochs']} epoch(s)", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


def cli(argv=None) -> int:
    """Command-line entry: bad input (e.g. a foreign or incompatible checkpoint in ``--runs``) is one
    ``error:`` line on stderr and exit status 2."""
    return run_cli(main, argv, prog=pathlib.Path(__file__).name)


if __name__ == "__main__":
    sys.exit(cli())
