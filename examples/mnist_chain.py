"""Train the TMC paper's five-layer MNIST VAE with a TMC or IWAE objective.

Examples:
    python examples/mnist_chain.py --objective tmc --grad reparam --recognition small --epochs 10
    python examples/mnist_chain.py --objective iwae --limit-train 512 --epochs 1 --out /tmp/run
    python examples/mnist_chain.py --out /tmp/run --epochs 2 --resume
    python examples/mnist_chain.py --dataset fashion-mnist --data DIR --epochs 5
    torchrun --nproc_per_node=2 examples/mnist_chain.py --distributed --threads 1 --out /tmp/ddp

Everything a run writes goes to ``--out``: ``metrics.jsonl`` and ``metrics.csv`` (one
row per epoch: mean training objective in nats per image and, with
``--full-data-bound`` (the default), ``train_full_data``, its estimate of
log p(X_train) for the whole training set; test IWAE and TMC bounds in nats per image,
seconds, steps), ``checkpoint.pt`` (every epoch, written atomically and read with
``weights_only=True``; ``--resume`` continues exactly), ``config.json``,
``learning_curves.png``, ``samples.png`` (images drawn from the generative model),
``reconstructions.png``, ``pictures/`` (samples and reconstructions at the epochs of
``--picture-epochs``) and, with ``--final-k``, ``final.json`` (IWAE estimate of
log p(x) with many samples). See docs/mnist.md and docs/distributed.md.

Pictures: a run on ``--limit-train 512`` for one epoch only checks the plumbing (the
samples are grey blobs). Digits need the full training set: with ``--K 5 --threads 1``
one epoch (469 steps, about 2 minutes) gives blurry but recognisable samples and five
epochs clear ones (test TMC bound about -115 nats per image), e.g.
``python examples/mnist_chain.py --data DIR --K 5 --epochs 5 --picture-epochs 1,5``.

Particles. The global batch of every step is split into ``--shards`` interleaved
shards (shard s holds the batch's examples s, s + S, s + 2S, ...), and the particles
of shard s at step t of epoch e are drawn with their own seed, derived from
``(--seed, e, t, s)``. The objective is the mean of the per-image estimates over the
global batch, i.e. the shard means weighted by shard size. A run is therefore
determined by its options (``--shards`` included), whatever the number of processes:
with ``--distributed`` each of N processes takes the shards s with s mod N equal to its
rank (``--shards`` defaults to N and must be a multiple of it), which for S = N is the
interleaved split of ``torch.utils.data.DistributedSampler``. A final batch with fewer
than S images is skipped.

The full-data bound. With ``--full-data-bound`` (the default) training uses the same
networks with the ``"data"`` plate declared as a subsampled plate of the N training
images (``mnist_vae.with_data_plate(model, proposal, size=N, subsample=True)``, the
declaration of ``mnist_vae.build(..., size=N, subsample=True)``; N is known once the
data are read, after any checkpoint is checked), and every shard is passed with its
images' indices (:func:`tmcgraph.infer.subsample.subsample`): shard s, holding B_s of
the batch's B images, gives V_s = (N / B_s) * (sum of its per-image estimates), an
estimate of log p(X_train) in nats for the whole training set. The step's figure is
sum_s (B_s / B) V_s = (N / B) * (sum of the batch's per-image estimates); the epoch's
``train_full_data`` is the mean of the steps' figures. The optimised loss is kept the
per-image mean, sum_s (B_s / B) * (-V_s / N), the same number as without the flag (up to
one float rounding, none when N and B_s are powers of two), so gradients, Adam's steps
and the trained weights are unchanged (the flag is not part of the checkpoint's
configuration). ``--grad dregs``, which the engine refuses on subsampled plates, trains
per image and forms the same figure as (N / B_s) times the shard's sum (identical, since
every latent of the model is per image). Test bounds are always per image.
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

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # this checkout's tmcgraph

import tmcgraph as tg  # noqa: E402
from tmcgraph.contrib import allocator, checkpoint  # noqa: E402
from tmcgraph.contrib.threads import torch_threads  # noqa: E402
from tmcgraph.data import mnist as mnist_data  # noqa: E402
from tmcgraph.infer.objectives import GRADS, Loss, bound, objective  # noqa: E402
from tmcgraph.infer.subsample import is_subsampled, subsample  # noqa: E402
from tmcgraph.models import mnist_vae  # noqa: E402
from tmcgraph.sampling.context import resolve_device  # noqa: E402
from tmcgraph.sampling.couplings import COUPLINGS  # noqa: E402
from tmcgraph.sampling.samplers import draw_sample  # noqa: E402

OBJECTIVES = {"tmc": tg.TMC, "iwae": tg.IWAE}
#: Default coupling of the non-factorised recognition layers. Measured on this model
#: (``benchmarks/couplings_mnist.py --steps 3600 --eval-every 200``: one seed, same initial
#: weights and minibatches, K = 20, 1000 test images): TMC bound after 3600 steps -106.35
#: (paired), -106.74 (mixture), -106.91 (permutation) nats per image, with 15% cheaper steps
#: for paired (0.083 vs 0.097 CPU s); at equal training CPU time -106.35 vs -108.10 / -108.32.
COUPLING = "paired"
#: Kind recorded in (and required of) checkpoints.
KIND = "examples/mnist_chain"
#: Options that must match for ``--resume``: what is trained, and how it is evaluated.
CONFIG_KEYS = (
    "dataset", "objective", "grad", "recognition", "coupling", "K", "batch_size", "lr", "seed", "limit_train",
    "binarize", "shards", "eval_K", "limit_test", "eval_batch_size",
)
#: Seed of the test images shown in the reconstructions and of the prior draws in the samples.
PICTURE_SEED = 0


def option(key: str) -> str:
    """Command-line name of a configuration key (``limit_test`` -> ``--limit-test``)."""
    return "--" + key.replace("_", "-")


def _epochs_list(text: str) -> list:
    try:
        out = sorted({int(t) for t in text.split(",") if t.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated epoch numbers, got {text!r}") from None
    if any(e < 1 for e in out):
        raise argparse.ArgumentTypeError(f"epoch numbers must be positive, got {text!r}")
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", choices=mnist_data.DATASETS, default="mnist", help="IDX dataset (default mnist)")
    p.add_argument("--objective", choices=sorted(OBJECTIVES), default="tmc", help="training objective")
    p.add_argument("--grad", choices=GRADS, default="reparam", help="gradient estimator")
    p.add_argument("--recognition", choices=mnist_vae.RECOGNITION, default="small", help="recognition model")
    p.add_argument("--coupling", choices=sorted(COUPLINGS), default=COUPLING,
                   help=f"coupling of the non-factorised recognition layers (default {COUPLING}, the best measured "
                        "on this model: docs/mnist.md)")
    p.add_argument("--K", type=int, default=20, help="particles per latent (TMC) or joint samples (IWAE)")
    p.add_argument("--eval-K", type=int, default=None, help="particles for the test bounds (default: --K)")
    p.add_argument("--epochs", type=int, default=10, help="total number of training epochs")
    p.add_argument("--batch-size", type=int, default=128, help="global batch size (all processes together)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shards", type=int, default=None,
                   help="shards per global batch, each with its own particle seed (default: number of processes)")
    p.add_argument("--distributed", action="store_true",
                   help="data-parallel training over the processes started by torchrun (gloo on CPU, nccl on GPU)")
    p.add_argument("--device", default="cpu", help="torch device ('cuda' with --distributed: one GPU per process)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per process (default: torch's)")
    p.add_argument("--allocator", choices=("tuned", "default"), default="tuned",
                   help="'tuned' (default): keep freed tensor memory in the heap for reuse "
                        "(tmcgraph.tune_allocator; faster on CPU, keeps the peak heap); 'default': leave malloc as is")
    p.add_argument("--data", default=None, help="data directory (default: $TMCGRAPH_DATA or the user cache)")
    p.add_argument("--no-download", action="store_true", help="never download missing MNIST files")
    p.add_argument("--binarize", action="store_true",
                   help="dynamic binarisation (resampled every epoch) instead of grey-level targets")
    p.add_argument("--limit-train", type=int, default=None, help="use only the first N training images")
    p.add_argument("--limit-test", type=int, default=None, help="evaluate on the first N test images")
    p.add_argument("--eval-batch-size", type=int, default=500)
    p.add_argument("--final-k", type=int, default=None, help="final IWAE estimate of log p(x) with this K (e.g. 5000)")
    p.add_argument("--final-images", type=int, default=None, help="test images for the final estimate (default all)")
    p.add_argument("--picture-epochs", type=_epochs_list, default=[],
                   help="comma-separated epochs after which to save samples and reconstructions to --out/pictures")
    p.add_argument("--out", default=None,
                   help="output directory (default runs/<dataset>_<objective>_<grad>_<recognition>)")
    p.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.pt")
    p.add_argument("--full-data-bound", action=argparse.BooleanOptionalAction, default=True,
                   help="also record train_full_data, the N/B-scaled minibatch estimate of log p(X_train) for all N "
                        "training images, via a subsampled data plate (default on; training is unchanged)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots and pictures")
    a = p.parse_args(argv)
    for name in ("K", "epochs", "batch_size", "eval_batch_size"):
        if getattr(a, name) < 1:
            raise tg.TMCGraphError(f"{option(name)} must be a positive integer, got {getattr(a, name)}")
    for name in ("eval_K", "limit_train", "limit_test", "final_k", "final_images", "threads", "shards"):
        v = getattr(a, name)
        if v is not None and v < 1:
            raise tg.TMCGraphError(f"{option(name)} must be a positive integer, got {v}")
    if a.seed < 0:
        raise tg.TMCGraphError(f"--seed must be a non-negative integer, got {a.seed}")
    resolve_device(a.device, "--device")  # an unavailable device is refused before any data is read
    if not a.lr > 0:
        raise tg.TMCGraphError(f"--lr must be positive, got {a.lr}")
    if a.distributed and a.grad == "dregs":
        raise tg.TMCGraphError("--grad dregs back-propagates two losses per step, which --distributed does not "
                               "support; use --grad reparam or stl, or train in one process with --shards")
    if a.out is None:
        a.out = f"runs/{a.dataset}_{a.objective}_{a.grad}_{a.recognition}"
    return a


def config_of(a: argparse.Namespace) -> dict:
    """The plain-data configuration stored in (and compared against) the checkpoint."""
    c = {k: getattr(a, k) for k in CONFIG_KEYS}
    c["eval_K"] = a.eval_K or a.K
    return c


# ------------------------------------------------------------------------------------ processes


class Ranks:
    """This process's place among the training processes (rank 0 of 1 without ``--distributed``)."""

    def __init__(self, rank: int = 0, world: int = 1, device=torch.device("cpu")):
        self.rank, self.world, self.device = rank, world, torch.device(device)

    @property
    def main(self) -> bool:
        """Whether this process writes files and prints."""
        return self.rank == 0

    def sum(self, values) -> list:
        """Element-wise sum of a list of floats over all processes."""
        if self.world == 1:
            return [float(v) for v in values]
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()


def start_processes(a: argparse.Namespace) -> Ranks:
    """Join the process group that torchrun set up (``RANK``, ``WORLD_SIZE``, ...), or a single process."""
    if not a.distributed:
        return Ranks(0, 1, a.device)
    import torch.distributed as dist

    missing = [v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise tg.TMCGraphError(f"--distributed needs the process group variables {missing}: start the script with "
                               "torchrun --nproc_per_node=N examples/mnist_chain.py --distributed ...")
    cuda = torch.device(a.device).type == "cuda"
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    return Ranks(dist.get_rank(), dist.get_world_size(), device)


def stop_processes(ranks: Ranks) -> None:
    if ranks.world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()


# ------------------------------------------------------------------------------------- training


def particle_seed(seed: int, epoch: int, step: int, shard: int) -> int:
    """Seed of shard ``shard``'s particles at step ``step`` of epoch ``epoch`` (independent streams)."""
    state = np.random.SeedSequence([seed, epoch, step, shard]).generate_state(1, dtype=np.uint64)
    return int(state[0] >> np.uint64(1))


def shards_of(ib: torch.Tensor, shards: int) -> list:
    """The interleaved split of a global batch's indices: shard s holds positions s, s + S, ..."""
    return [ib[s::shards] for s in range(shards)]


def shard_terms(est, data: dict, o: Loss, full_size: int) -> tuple:
    """One shard's ``(loss, image_sum, full_data)`` from its :class:`Loss` ``o`` on ``data``.

    * ``loss``: the shard's per-image mean loss (with graph), the quantity that is optimised.
    * ``image_sum``: the sum of the shard's per-image estimates (detached).
    * ``full_data``: (N / B_s) * ``image_sum``, the shard's estimate of log p(X_train) for
      all N = ``full_size`` training images (detached).

    On a subsampled plate (B_s < N) the engine returns the scalar V_s = (N / B_s) *
    ``image_sum`` and ``o.loss = -V_s``: the loss is divided by N, which gives exactly the
    per-image mean -``image_sum`` / B_s that the per-image model optimises. Otherwise (a
    per-image model, or a shard holding all N images) ``o.value`` is per image and
    ``o.loss`` already their negative mean.
    """
    images = len(data["x"])
    if is_subsampled(est.model, data):
        full = o.value.detach()
        return o.loss / full_size, full * (images / full_size), full
    image_sum = o.value.detach().sum()
    return o.loss, image_sum, image_sum * (full_size / images)


class TrainStep(nn.Module):
    """The objective of one process's shards as a module (what DistributedDataParallel wraps).

    ``forward(pieces)`` takes ``[(data, seed, weight), ...]``, one entry per shard with
    ``weight`` = B_s / B (its share of the global batch), and returns three sums over
    the shards (the last two detached): the weighted per-image mean losses, the per-image
    estimates, and the weighted full-data estimates ``weight * (N / B_s) * (shard sum)``
    (see :func:`shard_terms`). Over all shards of a batch, on whichever processes they
    run, these add up to the batch's mean loss, its sum of per-image estimates and its
    figure (N / B) * (that sum).
    """

    def __init__(self, model, proposal, est, grad: str, full_size: int):
        super().__init__()
        self.model, self.proposal = model, proposal
        self.est, self.grad, self.full_size = est, grad, full_size

    def forward(self, pieces):
        loss, total, full = 0.0, 0.0, 0.0
        for data, seed, weight in pieces:
            o = objective(self.est, data, self.grad, seed=seed)
            shard_loss, image_sum, shard_full = shard_terms(self.est, data, o, self.full_size)
            loss = loss + weight * shard_loss
            total = total + image_sum
            full = full + weight * shard_full
        return loss, total, full


def evaluate(model, proposal, x: torch.Tensor, K: int, batch_size: int, seed: int, device=None,
             ranks: Ranks = None) -> dict:
    """Test bounds in nats per image: IWAE and TMC with ``K`` samples (seeded, no gradients).

    Batch i uses seed ``seed + i``; with several processes, process r evaluates the
    batches i with i mod N = r and the sums are added up, which gives the single-process result.
    """
    ranks = ranks or Ranks()
    sums = []
    for name, cls in OBJECTIVES.items():
        est = cls(model, proposal, K=K, device=device)
        total = 0.0
        for i, xb in enumerate(x.split(batch_size)):
            if i % ranks.world == ranks.rank:
                total += float(bound(est, {"x": xb}, seed=seed + i).sum())
        sums.append(total)
    sums = ranks.sum(sums)
    return {name: s / len(x) for name, s in zip(OBJECTIVES, sums)}


def final_estimate(model, proposal, x: torch.Tensor, K: int, device=None, seed: int = 12345,
                   ranks: Ranks = None) -> float:
    """IWAE estimate of log p(x) with ``K`` samples per image, in nats per image (chunks split over processes)."""
    ranks = ranks or Ranks()
    est = tg.IWAE(model, proposal, K=K, device=device)
    per = max(1, int(2e6 // (K * 784)))  # images per chunk: bounds the [K, B, 784] logits
    total = 0.0
    for i, xb in enumerate(x.split(per)):
        if i % ranks.world == ranks.rank:
            total += float(bound(est, {"x": xb}, seed=seed + i).sum())
    return ranks.sum([total])[0] / len(x)


def _write_metrics(out: pathlib.Path, metrics: list) -> None:
    for name, write in (("metrics.jsonl", _jsonl), ("metrics.csv", _csv)):
        tmp = out / (name + ".tmp")
        with open(tmp, "w", newline="") as f:
            write(f, metrics)
        os.replace(tmp, out / name)


def _jsonl(f, metrics):
    for r in metrics:
        f.write(json.dumps(r) + "\n")


def _csv(f, metrics):
    if metrics:  # columns: every key of any row (a resumed run may add or drop train_full_data), first seen first
        w = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in metrics for k in r)), restval="")
        w.writeheader()
        w.writerows(metrics)


# ------------------------------------------------------------------------------------- pictures


def _pyplot():
    """matplotlib's pyplot on the Agg backend, or ``None`` when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@torch.no_grad()
def sample_images(model, n: int, seed: int = PICTURE_SEED) -> torch.Tensor:
    """Pixel means of P(x | z1) for ``n`` ancestral draws z5 -> ... -> z1 from the generative model, ``[n, 784]``.

    Draws come from a private generator seeded with ``seed`` (the same latents every
    time, so pictures of different epochs show the same draws through the current model).
    """
    import networkx as nx

    g = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    values = {}
    order = [v for v in nx.topological_sort(model.graph) if v in model.latents]
    for name in order:
        var = model[name]
        d = var.dist({p: values[p] for p in var.parents})
        values[name] = draw_sample(d, torch.Size([n]) if not var.parents else torch.Size(), g)
    x = model.observed_names[0]
    d = model[x].dist({p: values[p] for p in model[x].parents})
    return torch.sigmoid(d.base_dist.logits)


def picture_images(x: torch.Tensor, n: int = 10, seed: int = PICTURE_SEED) -> torch.Tensor:
    """``n`` test images chosen with a fixed seed (the same ones at every epoch)."""
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n]
    return x[idx.to(x.device)]


def plot_curves(metrics: list, path: pathlib.Path, title: str) -> None:
    """Learning curves (test bounds per epoch) like the paper's Fig. 5."""
    plt = _pyplot()
    if plt is None:
        return
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


def plot_samples(model, path: pathlib.Path, title: str, n: int = 64, seed: int = PICTURE_SEED) -> None:
    """A square grid of images drawn from the generative model (pixel means)."""
    plt = _pyplot()
    if plt is None:
        return
    imgs = sample_images(model, n, seed).cpu().reshape(-1, 28, 28).numpy()
    side = math.ceil(math.sqrt(n))
    grid = np.ones((side * 29 + 1, side * 29 + 1))
    for i, im in enumerate(imgs):
        r, c = divmod(i, side)
        grid[1 + 29 * r : 29 * (r + 1), 1 + 29 * c : 29 * (c + 1)] = im
    fig, ax = plt.subplots(figsize=(4.5, 4.8))
    ax.imshow(grid, cmap="gray", vmin=0, vmax=1)
    ax.axis("off")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_reconstructions(model, proposal, x: torch.Tensor, path: pathlib.Path, n: int = 10, title: str = "") -> None:
    """Test images (top row) and their reconstructions (bottom row): Bernoulli means at the mean of Q(z1 | x)."""
    plt = _pyplot()
    if plt is None:
        return
    x = x[:n]
    r = mnist_vae.reconstruct(model, proposal, x).cpu()
    fig, axes = plt.subplots(2, len(x), figsize=(len(x), 2.2), squeeze=False)
    for i in range(len(x)):
        for row, img in ((0, x[i].cpu()), (1, r[i])):
            ax = axes[row, i]
            ax.imshow(img.reshape(28, 28).numpy(), cmap="gray", vmin=0, vmax=1)
            ax.axis("off")
    fig.suptitle(title or "test images (top) and reconstructions (bottom)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_pictures(model, proposal, test_x, out: pathlib.Path, epoch: int, label: str) -> None:
    """Samples and reconstructions after ``epoch`` into ``out/pictures``."""
    d = out / "pictures"
    d.mkdir(exist_ok=True)
    plot_samples(model, d / f"samples_epoch{epoch:04d}.png", f"{label}: samples after epoch {epoch}")
    plot_reconstructions(model, proposal, picture_images(test_x), d / f"reconstructions_epoch{epoch:04d}.png",
                         title=f"{label}: test images (top) and reconstructions (bottom) after epoch {epoch}")


# ----------------------------------------------------------------------------------------- main


def _load_checkpoint(path: pathlib.Path, config: dict, model, proposal, opt, shuffle) -> tuple:
    """Restore weights, optimiser and shuffling state from ``path``; return ``(metrics, epoch)``."""
    ck = checkpoint.load(path, KIND, config=config, keys=CONFIG_KEYS, label=option)
    s = ck["state"]
    try:
        model.load_state_dict(s["model"])
        proposal.load_state_dict(s["proposal"])
        opt.load_state_dict(s["optimizer"])
        shuffle.set_state(s["shuffle_rng"])
        metrics, epoch = list(s["metrics"]), int(s["epoch"])
    except (KeyError, RuntimeError, ValueError, TypeError, IndexError) as e:
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise checkpoint.CheckpointError(
            f"checkpoint {path} does not fit this model and optimiser ({type(e).__name__}: {msg[:300]})") from None
    return metrics, epoch


def main(argv=None) -> dict:
    """Run training; return a summary dict (config, metrics, output directory)."""
    a = parse_args(argv)
    with torch_threads(a.threads):  # --threads for the run, the caller's count afterwards
        ranks = start_processes(a)
        try:
            return _run(a, ranks)
        finally:
            stop_processes(ranks)


def _run(a: argparse.Namespace, ranks: Ranks) -> dict:
    if a.shards is None:
        a.shards = ranks.world
    if a.shards % ranks.world:
        raise tg.TMCGraphError(f"--shards {a.shards} is not a multiple of the number of processes ({ranks.world})")
    out = pathlib.Path(a.out)
    ckpt_path = out / "checkpoint.pt"
    config = config_of(a)
    if a.resume:
        if not ckpt_path.exists():
            raise checkpoint.CheckpointError(f"--resume: no checkpoint at {ckpt_path}")
    elif ckpt_path.exists():
        raise tg.TMCGraphError(f"{ckpt_path} exists; pass --resume to continue it or choose another --out")

    if a.allocator == "tuned":
        allocator.tune_allocator()
    device = ranks.device
    with torch.random.fork_rng(devices=[]):  # initial weights from --seed; torch's global RNG is left as it was
        torch.manual_seed(a.seed)
        model, proposal = mnist_vae.build(a.recognition, a.coupling)  # per image: evaluation, pictures, checkpoints
    model.to(device)
    proposal.to(device)
    params = list(model.parameters()) + list(proposal.parameters())
    opt = torch.optim.Adam(params, lr=a.lr)
    shuffle = torch.Generator().manual_seed(a.seed + 1)
    metrics, start = [], 0
    if a.resume:  # a checkpoint is checked before the data are read
        metrics, start = _load_checkpoint(ckpt_path, config, model, proposal, opt, shuffle)
    data = mnist_data.load_mnist(a.data, download=not a.no_download, dataset=a.dataset)
    train_x = data.train_x[: a.limit_train]
    test_x = data.test_x[: a.limit_test]
    N = len(train_x)
    train_model, train_proposal = model, proposal
    # the same networks with "data" a subsampled plate of the N training images (what
    # mnist_vae.build(..., size=N, subsample=True) declares); DReGs, which the engine refuses
    # on subsampled plates, trains per image (see shard_terms)
    if a.full_data_bound and a.grad != "dregs":
        train_model, train_proposal = mnist_vae.with_data_plate(model, proposal, size=N, subsample=True)
    est = OBJECTIVES[a.objective](train_model, train_proposal, K=a.K, device=device)
    if a.binarize:
        test_x = mnist_data.binarize(test_x, torch.Generator().manual_seed(0))
    test_x = test_x.to(device)
    step_module = TrainStep(train_model, train_proposal, est, a.grad, N)
    if ranks.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        step_module = DistributedDataParallel(step_module, device_ids=[device.index] if device.type == "cuda" else None)
    if ranks.main:
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "config.json", "w") as f:
            json.dump({**config, "epochs": a.epochs, "device": a.device, "threads": torch.get_num_threads(),
                       "processes": ranks.world, "full_data_bound": a.full_data_bound, "train_images": N}, f,
                      indent=1)
    label = f"{a.dataset} {a.objective.upper()}"
    mine = [s for s in range(a.shards) if s % ranks.world == ranks.rank]

    from tqdm import tqdm

    for epoch in range(start + 1, a.epochs + 1):
        t0 = time.perf_counter()
        xs = mnist_data.binarize(train_x, shuffle) if a.binarize else train_x
        idx = [ib for ib in mnist_data.batches(len(xs), a.batch_size, shuffle=True, generator=shuffle)
               if len(ib) >= a.shards]
        bar = tqdm(idx, desc=f"epoch {epoch}/{a.epochs}", disable=a.no_progress or not ranks.main, leave=False,
                   file=sys.stderr)
        run_sum, run_n, full_sum = 0.0, 0, 0.0
        for step, ib in enumerate(bar):
            parts = shards_of(ib, a.shards)
            pieces = []
            for s in mine:
                shard = {"x": xs[parts[s]].to(device)}
                if est.model.plates["data"].subsample:  # with its images' indices among the N
                    shard = subsample(est.model, shard, {"data": parts[s].to(device)}, sliced=True)
                pieces.append((shard, particle_seed(a.seed, epoch, step, s), len(parts[s]) / len(ib)))
            opt.zero_grad(set_to_none=True)
            if a.grad == "dregs":  # two losses with their own parameter groups: back-propagated shard by shard
                total, full = 0.0, 0.0
                for shard, seed, w in pieces:
                    o = objective(est, shard, a.grad, seed=seed)
                    _, image_sum, shard_full = shard_terms(est, shard, o, N)
                    o.loss, o.proposal_loss = w * o.loss, w * o.proposal_loss
                    o.backward()
                    total += float(image_sum)
                    full += w * float(shard_full)
            else:
                # loss: the per-image mean over this process's shards (a subsampled shard's N / B_s-scaled
                # objective divided by N in shard_terms), so the gradients are those of the per-image model
                loss, total, full = step_module(pieces)
                (loss * ranks.world).backward()  # DistributedDataParallel averages gradients over processes
            ok = math.isfinite(float(total)) and math.isfinite(float(full))
            total, full, finite = ranks.sum([float(total), float(full), float(ok)])
            if finite < ranks.world or not math.isfinite(total):
                raise tg.TMCGraphError(
                    f"non-finite training objective at epoch {epoch}, step {step}; nothing saved for this epoch"
                )
            opt.step()
            run_sum += total
            run_n += len(ib)
            full_sum += full
            bar.set_postfix(objective=f"{run_sum / run_n:.2f}")
        train_time = time.perf_counter() - t0
        ev = evaluate(model, proposal, test_x, config["eval_K"], a.eval_batch_size, seed=10_000 * epoch,
                      device=device, ranks=ranks)
        rec = {"epoch": epoch, "train_objective": run_sum / max(run_n, 1)}
        if a.full_data_bound:  # the mean over the epoch's steps of (N / B) * (the batch's sum), nats for all N
            rec["train_full_data"] = full_sum / max(len(idx), 1)
        rec.update({"test_iwae": ev["iwae"], "test_tmc": ev["tmc"], "train_seconds": train_time, "steps": len(idx)})
        metrics.append(rec)
        if ranks.main:
            full_text = (f" nats/image ({rec['train_full_data']:.1f} nats for all {N} training images)"
                         if a.full_data_bound else "")
            print(f"epoch {epoch}: train {rec['train_objective']:.2f}{full_text}  test IWAE {ev['iwae']:.2f}  "
                  f"test TMC {ev['tmc']:.2f} nats/image  ({train_time:.1f} s, {len(idx) / train_time:.2f} steps/s)",
                  flush=True)
            _write_metrics(out, metrics)
            checkpoint.save(ckpt_path, {"epoch": epoch, "metrics": metrics, "model": model.state_dict(),
                                        "proposal": proposal.state_dict(), "optimizer": opt.state_dict(),
                                        "shuffle_rng": shuffle.get_state()}, KIND, config)
            if epoch in a.picture_epochs and not a.no_plots:
                save_pictures(model, proposal, test_x, out, epoch, label)

    summary = {"out": str(out), "config": config, "metrics": metrics, "processes": ranks.world}
    if a.final_k:
        xf = test_x[: a.final_images]
        summary["final"] = {"K": a.final_k, "images": len(xf),
                            "iwae_log_px": final_estimate(model, proposal, xf, a.final_k, device, ranks=ranks)}
        if ranks.main:
            with open(out / "final.json", "w") as f:
                json.dump(summary["final"], f, indent=1)
            print(f"final IWAE (K={a.final_k}, {len(xf)} images): {summary['final']['iwae_log_px']:.2f} nats/image")
    if ranks.main and not a.no_plots and metrics:
        if _pyplot() is None:
            print("note: matplotlib is not installed; no pictures written", file=sys.stderr)
        title = f"{a.dataset}: {a.objective.upper()} / {a.grad} / {a.recognition}, K={a.K}"
        plot_curves(metrics, out / "learning_curves.png", title)
        plot_samples(model, out / "samples.png", f"{label}: samples after epoch {metrics[-1]['epoch']}")
        plot_reconstructions(model, proposal, picture_images(test_x), out / "reconstructions.png")
    if ranks.main and metrics and not all(math.isfinite(r["test_tmc"]) for r in metrics):
        print("warning: non-finite test bound", file=sys.stderr)
    return summary


def cli(argv=None) -> int:
    """Command-line entry: bad input is one ``error:`` line on stderr and exit status 2, never a traceback."""
    try:
        main(argv)
    except tg.TMCGraphError as e:
        print(f"{pathlib.Path(__file__).name}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
