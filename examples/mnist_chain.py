"""Train the TMC paper's five-layer MNIST VAE with a TMC or IWAE objective.

Examples:
    python examples/mnist_chain.py --objective tmc --grad reparam --recognition small --epochs 10
    python examples/mnist_chain.py --objective iwae --limit-train 512 --epochs 1 --out /tmp/run
    python examples/mnist_chain.py --out /tmp/run --epochs 2 --resume

Everything a run writes goes to ``--out``: ``metrics.jsonl`` and ``metrics.csv`` (one
row per epoch: mean training objective, test IWAE and TMC bounds in nats per image,
seconds), ``checkpoint.pt`` (every epoch; ``--resume`` continues exactly),
``config.json``, ``learning_curves.png``, ``reconstructions.png`` and, with
``--final-k``, ``final.json`` (IWAE estimate of log p(x) with many samples).
See docs/mnist.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import pathlib
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # this checkout's tmcgraph

import tmcgraph as tg  # noqa: E402
from tmcgraph.contrib import allocator  # noqa: E402
from tmcgraph.data import mnist as mnist_data  # noqa: E402
from tmcgraph.infer.objectives import GRADS, bound, objective  # noqa: E402
from tmcgraph.models import mnist_vae  # noqa: E402
from tmcgraph.sampling.couplings import COUPLINGS, DEFAULT  # noqa: E402

OBJECTIVES = {"tmc": tg.TMC, "iwae": tg.IWAE}
#: Options that must match for ``--resume``.
CONFIG_KEYS = (
    "objective", "grad", "recognition", "coupling", "K", "batch_size", "lr", "seed", "limit_train",
    "binarize",
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--objective", choices=sorted(OBJECTIVES), default="tmc", help="training objective")
    p.add_argument("--grad", choices=GRADS, default="reparam", help="gradient estimator")
    p.add_argument("--recognition", choices=mnist_vae.RECOGNITION, default="small", help="recognition model")
    p.add_argument("--coupling", choices=sorted(COUPLINGS), default=DEFAULT,
                   help="coupling of the non-factorised recognition layers")
    p.add_argument("--K", type=int, default=20, help="particles per latent (TMC) or joint samples (IWAE)")
    p.add_argument("--eval-K", type=int, default=None, help="particles for the test bounds (default: --K)")
    p.add_argument("--epochs", type=int, default=10, help="total number of training epochs")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--allocator", choices=("tuned", "default"), default="tuned",
                   help="'tuned' (default): keep freed tensor memory in the heap for reuse "
                        "(tmcgraph.tune_allocator; faster on CPU, keeps the peak heap); 'default': leave malloc as is")
    p.add_argument("--data", default=None, help="MNIST directory (default: $TMCGRAPH_DATA or the user cache)")
    p.add_argument("--no-download", action="store_true", help="never download missing MNIST files")
    p.add_argument("--binarize", action="store_true",
                   help="dynamic binarisation (resampled every epoch) instead of grey-level targets")
    p.add_argument("--limit-train", type=int, default=None, help="use only the first N training images")
    p.add_argument("--limit-test", type=int, default=None, help="evaluate on the first N test images")
    p.add_argument("--eval-batch-size", type=int, default=500)
    p.add_argument("--final-k", type=int, default=None, help="final IWAE estimate of log p(x) with this K (e.g. 5000)")
    p.add_argument("--final-images", type=int, default=None, help="test images for the final estimate (default all)")
    p.add_argument("--out", default=None, help="output directory (default runs/mnist_<objective>_<grad>_<recognition>)")
    p.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.pt")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    a = p.parse_args(argv)
    for name in ("K", "epochs", "batch_size", "eval_batch_size"):
        if getattr(a, name) < 1:
            raise tg.TMCGraphError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(a, name)}")
    for name in ("eval_K", "limit_train", "limit_test", "final_k", "final_images", "threads"):
        v = getattr(a, name)
        if v is not None and v < 1:
            raise tg.TMCGraphError(f"--{name.replace('_', '-')} must be a positive integer, got {v}")
    if not a.lr > 0:
        raise tg.TMCGraphError(f"--lr must be positive, got {a.lr}")
    if a.out is None:
        a.out = f"runs/mnist_{a.objective}_{a.grad}_{a.recognition}"
    return a


def config_of(a: argparse.Namespace) -> dict:
    return {k: getattr(a, k) for k in CONFIG_KEYS}


def evaluate(model, proposal, x: torch.Tensor, K: int, batch_size: int, seed: int, device=None) -> dict:
    """Test bounds in nats per image: IWAE and TMC with ``K`` samples (seeded, no gradients)."""
    out = {}
    for name, cls in OBJECTIVES.items():
        est = cls(model, proposal, K=K, device=device)
        total = 0.0
        for i, xb in enumerate(x.split(batch_size)):
            total += float(bound(est, {"x": xb}, seed=seed + i).sum())
        out[name] = total / len(x)
    return out


def final_estimate(model, proposal, x: torch.Tensor, K: int, device=None, seed: int = 12345) -> float:
    """IWAE estimate of log p(x) with ``K`` samples per image, in nats per image."""
    est = tg.IWAE(model, proposal, K=K, device=device)
    per = max(1, int(2e6 // (K * 784)))  # images per chunk: bounds the [K, B, 784] logits
    total = 0.0
    for i, xb in enumerate(x.split(per)):
        total += float(bound(est, {"x": xb}, seed=seed + i).sum())
    return total / len(x)


def _atomic_save(obj, path: pathlib.Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _write_metrics(out: pathlib.Path, metrics: list) -> None:
    with open(out / "metrics.jsonl", "w") as f:
        for r in metrics:
            f.write(json.dumps(r) + "\n")
    if metrics:
        with open(out / "metrics.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(metrics[0]))
            w.writeheader()
            w.writerows(metrics)


def plot_curves(metrics: list, path: pathlib.Path, title: str) -> None:
    """Learning curves (test bounds per epoch) like the paper's Fig. 5."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [r["epoch"] for r in metrics]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(ep, [r["test_tmc"] for r in metrics], "o-", color="tab:red", label="TMC bound")
    ax.plot(ep, [r["test_iwae"] for r in metrics], "o-", color="tab:blue", label="IWAE bound")
    ax.set_xlabel("epoch")
    ax.set_ylabel("test bound (nats per image)")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_reconstructions(model, proposal, x: torch.Tensor, path: pathlib.Path, n: int = 10) -> None:
    """Test images (top row) and their reconstructions (bottom row)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = x[:n]
    r = mnist_vae.reconstruct(model, proposal, x).cpu()
    fig, axes = plt.subplots(2, len(x), figsize=(len(x), 2.2))
    for i in range(len(x)):
        for row, img in ((0, x[i].cpu()), (1, r[i])):
            ax = axes[row, i] if len(x) > 1 else axes[row]
            ax.imshow(img.reshape(28, 28).numpy(), cmap="gray", vmin=0, vmax=1)
            ax.axis("off")
    fig.suptitle("test images (top) and reconstructions (bottom)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> dict:
    """Run training; return a summary dict (config, metrics, output directory)."""
    a = parse_args(argv)
    out = pathlib.Path(a.out)
    ckpt_path = out / "checkpoint.pt"
    config = config_of(a)
    ckpt = None
    if a.resume:
        if not ckpt_path.exists():
            raise tg.TMCGraphError(f"--resume: no checkpoint at {ckpt_path}")
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        diff = {k: (ckpt["config"].get(k), config[k]) for k in CONFIG_KEYS if ckpt["config"].get(k) != config[k]}
        if diff:
            shown = ", ".join(f"{k}: checkpoint {v[0]!r} vs requested {v[1]!r}" for k, v in diff.items())
            raise tg.TMCGraphError(f"checkpoint {ckpt_path} was made with a different configuration ({shown})")
    elif ckpt_path.exists():
        raise tg.TMCGraphError(f"{ckpt_path} exists; pass --resume to continue it or choose another --out")

    if a.threads:
        torch.set_num_threads(a.threads)
    if a.allocator == "tuned":
        allocator.tune_allocator()
    device = torch.device(a.device)
    data = mnist_data.load_mnist(a.data, download=not a.no_download)
    train_x = data.train_x[: a.limit_train]
    test_x = data.test_x[: a.limit_test]
    if a.binarize:
        test_x = mnist_data.binarize(test_x, torch.Generator().manual_seed(0))
    test_x = test_x.to(device)

    torch.manual_seed(a.seed)
    model, proposal = mnist_vae.build(a.recognition, a.coupling)
    model.to(device)
    proposal.to(device)
    est = OBJECTIVES[a.objective](model, proposal, K=a.K, device=device)
    params = list(model.parameters()) + list(proposal.parameters())
    opt = torch.optim.Adam(params, lr=a.lr)
    shuffle = torch.Generator().manual_seed(a.seed + 1)
    metrics, start = [], 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        proposal.load_state_dict(ckpt["proposal"])
        opt.load_state_dict(ckpt["optimizer"])
        shuffle.set_state(ckpt["shuffle_rng"])
        torch.set_rng_state(ckpt["torch_rng"])
        metrics, start = ckpt["metrics"], ckpt["epoch"]
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "config.json", "w") as f:
        json.dump({**config, "epochs": a.epochs, "device": a.device, "threads": torch.get_num_threads(),
                   "eval_K": a.eval_K or a.K, "limit_test": a.limit_test}, f, indent=1)

    from tqdm import tqdm

    for epoch in range(start + 1, a.epochs + 1):
        t0 = time.perf_counter()
        xs = mnist_data.binarize(train_x, shuffle) if a.binarize else train_x
        idx = mnist_data.batches(len(xs), a.batch_size, shuffle=True, generator=shuffle)
        bar = tqdm(idx, desc=f"epoch {epoch}/{a.epochs}", disable=a.no_progress, leave=False, file=sys.stderr)
        run_sum, run_n = 0.0, 0
        for step, ib in enumerate(bar):
            xb = xs[ib].to(device)
            o = objective(est, {"x": xb}, a.grad)
            if not torch.isfinite(o.loss):
                raise tg.TMCGraphError(
                    f"non-finite training objective at epoch {epoch}, step {step}; nothing saved for this epoch"
                )
            opt.zero_grad(set_to_none=True)
            o.backward()
            opt.step()
            run_sum += o.mean * len(ib)
            run_n += len(ib)
            bar.set_postfix(objective=f"{run_sum / run_n:.2f}")
        train_time = time.perf_counter() - t0
        ev = evaluate(model, proposal, test_x, a.eval_K or a.K, a.eval_batch_size, seed=10_000 * epoch, device=device)
        rec = {"epoch": epoch, "train_objective": run_sum / run_n, "test_iwae": ev["iwae"], "test_tmc": ev["tmc"],
               "train_seconds": train_time, "steps": len(idx)}
        metrics.append(rec)
        print(f"epoch {epoch}: train {rec['train_objective']:.2f}  test IWAE {ev['iwae']:.2f}  "
              f"test TMC {ev['tmc']:.2f} nats/image  ({train_time:.1f} s)", flush=True)
        _write_metrics(out, metrics)
        _atomic_save({"config": config, "epoch": epoch, "metrics": metrics, "model": model.state_dict(),
                      "proposal": proposal.state_dict(), "optimizer": opt.state_dict(),
                      "shuffle_rng": shuffle.get_state(), "torch_rng": torch.get_rng_state()}, ckpt_path)

    summary = {"out": str(out), "config": config, "metrics": metrics}
    if a.final_k:
        xf = test_x[: a.final_images]
        summary["final"] = {"K": a.final_k, "images": len(xf),
                            "iwae_log_px": final_estimate(model, proposal, xf, a.final_k, device)}
        with open(out / "final.json", "w") as f:
            json.dump(summary["final"], f, indent=1)
        print(f"final IWAE (K={a.final_k}, {len(xf)} images): {summary['final']['iwae_log_px']:.2f} nats/image")
    if not a.no_plots and metrics:
        title = f"{a.objective.upper()} / {a.grad} / {a.recognition}, K={a.K}"
        plot_curves(metrics, out / "learning_curves.png", title)
        plot_reconstructions(model, proposal, test_x, out / "reconstructions.png")
    if metrics and not all(math.isfinite(r["test_tmc"]) for r in metrics):
        print("warning: non-finite test bound", file=sys.stderr)
    return summary


def cli(argv=None) -> int:
    try:
        main(argv)
    except tg.TMCGraphError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli())
