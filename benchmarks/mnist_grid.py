"""The TMC paper's MNIST grid (Fig. 5, Fig. 6) and the reproduction's Table 1, as one resumable driver.

Runs every combination of recognition model (``factorised``, ``small``, ``large``),
gradient estimator (``reparam``, ``stl``, ``dregs``), training objective (``tmc``,
``iwae``) and seed on the five-layer MNIST VAE of ``tmcgraph.models.mnist_vae``. Each run
keeps its own folder under ``--runs`` (``checkpoint.pt``: weights, optimiser, generator
states, configuration and metrics, written atomically after every epoch), so an
interrupted grid continues where it stopped, a finished run is skipped, and a run whose
folder was made with another configuration is refused (the error names the setting).
Runs advance one epoch at a time in turn (A B C A B C ...), so their epoch times are
measured under the same machine load.

Every ``--eval-every`` epochs (and at each of the last ``--eval-last`` epochs, at least
the last one) each model is evaluated on the test set (all 10000 images, or
``--limit-test``) under both bounds, TMC and IWAE with ``--eval-K`` particles / samples
(nats per image). Outputs (``--out``, default
``benchmarks/results``):

* ``mnist_grid.png``: Fig. 5 in the paper's layout: one column per recognition model
  (factorised, small, large), rows A: every run under the TMC bound (IWAE-trained blue,
  TMC-trained red; line style = gradient estimator), B: IWAE-trained models under the
  IWAE (blue) and TMC (red) bounds, C: TMC-trained models under both bounds. Curves are
  means over seeds; each panel's y-window is chosen from the data (the values of the
  second half of the panel's longest run, padded), so sub-nat differences are visible;
* ``mnist_grid_fig6.png``: Fig. 6, CPU seconds per training epoch of each method
  (objective x estimator), averaged over the recognition models that were run, and the
  TMC / IWAE ratio per recognition model;
* ``mnist_grid.md``: Table 1 (with the reproduction's numbers beside it), the Fig. 5
  comparisons at every evaluation (TMC- minus IWAE-trained under the TMC bound; each
  model's TMC minus IWAE bound) and Fig. 6 per recognition model, as Markdown tables;
* ``mnist_grid.json``: the setting, every run's metrics, Table 1 (mean +- sd of the test
  bounds over the last ``--last`` evaluated epochs, pooled over seeds, and the sd of the
  per-seed means), Fig. 6's numbers and the y-windows.

The paper's protocol (Aitchison, section 4; details from the reproduction, Table 1): full
MNIST (60000 training, 10000 test images, grey levels as Bernoulli targets), batch 128,
K = 20 particles per latent (TMC) or joint samples (IWAE), Adam with PyTorch's defaults
(lr 1e-3; the reproduction used eps 1e-4), weight normalisation, 1200 epochs, test bounds
at K = 20; Table 1 averages the last 50 epochs over 3 runs (TMC small -91.63 +- 0.16,
IWAE small -93.35 +- 0.12 nats). On a GPU an epoch took 11 s (IWAE) and 14 s (TMC).

CPU-sized protocol (the part of Fig. 5A / Table 1 that a 2-core CPU can run): full 60k
training set, batch 128, K = 20, small recognition model, TMC and IWAE with reparameterised
gradients, 3 seeds, 50 epochs, test bounds every 5 epochs on the full test set, Table 1
over the last 5 evaluations (epochs 30-50)::

    python benchmarks/mnist_grid.py --data ../shared/data/mnist --recognition small --grads reparam \\
        --objectives tmc,iwae --seeds 3 --epochs 50 --eval-every 5 --last 5 \\
        --runs benchmarks/results/mnist_protocol/runs

Its run folders are kept in the repository, so the protocol continues from where the last
invocation stopped. ``--shard I/N`` runs every N-th run of the grid, so that N processes
(``--shard 0/2`` and ``--shard 1/2`` on two cores) share one ``--runs`` folder; a last
invocation without ``--shard`` skips the finished runs and writes the combined outputs.
``--report`` trains nothing: it writes the outputs from the checkpoints in ``--runs`` as
they stand (each run at the epoch it has reached; runs without a checkpoint are listed
under ``budget.runs_missing``), so a snapshot can be taken while other processes train;
``--at-epoch N`` cuts every run's metrics at epoch N, so runs that have reached different
epochs are compared at the same one.

CPU budget: see docs/mnist.md (measured seconds per epoch times 300 run-epochs). The
paper's protocol is a GPU job: ``--device cuda`` (epochs then timed in wall seconds);
``benchmarks/gpu_papers.sh`` runs the whole grid at 1200 epochs, sharded over GPUs.
``--quick`` runs the whole grid (3 x 3 x 2 runs) for one epoch on 128 synthetic images.
"""

from __future__ import annotations

import inspect
import math
import pathlib
import statistics
import sys
import textwrap
import time
from typing import Optional

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))  # this checkout's tmcgraph, even if another copy is installed

import torch  # noqa: E402
from _common import (  # noqa: E402
    add_device_arg,
    add_shard_arg,
    base_parser,
    check_rng_device,
    cli_device,
    command_line,
    cpu_name,
    keeps_process_state,
    machine_info,
    output_paths,
    pyplot,
    run_cli,
    save_figure,
    set_threads,
    synchronize,
    take_shard,
    write_json,
)

import tmcgraph as tg  # noqa: E402
from tmcgraph.contrib import checkpoint  # noqa: E402
from tmcgraph.infer.objectives import GRADS, bound, objective  # noqa: E402

NAME = "mnist_grid"
HOST_CPU = cpu_name()
RECOGNITION = ("factorised", "small", "large")
OBJECTIVES = ("tmc", "iwae")
#: The paper's gradient estimators (names of ``tmcgraph.infer.objectives.GRADS``).
GRAD_NAMES = ("reparam", "stl", "dregs")
#: Checkpoints larger than this are refused (bounded reads).
MAX_CHECKPOINT_BYTES = 1 << 30
#: Kind recorded in (and required of) this driver's checkpoints.
KIND = "benchmarks/mnist_grid"
#: Settings that must agree for a run folder to be continued.
CONFIG_KEYS = ("recognition", "grad", "objective", "seed", "K", "eval_K", "batch_size", "lr", "adam_eps",
               "coupling", "train_images", "test_images", "eval_every", "data")
FULL_TRAIN = 60000


# ------------------------------------------------------------------------------------ checkpoints


def save_checkpoint(path: pathlib.Path, state: dict, kind: str = KIND) -> None:
    """Write a run's ``state`` (its ``"config"`` entry is stored as the checkpoint's configuration).

    Uses :func:`tmcgraph.contrib.checkpoint.save`: plain data and tensors only, written to a
    temporary file and renamed over ``path``, so an interruption keeps the last checkpoint.
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = dict(state)
    config = state.pop("config")
    checkpoint.save(path, state, kind=kind, config=config)


def load_checkpoint(path: pathlib.Path, config: dict, keys=None, kind: str = KIND) -> Optional[dict]:
    """The run state at ``path`` (``None`` if absent), refused unless its configuration equals ``config``.

    Read by :func:`tmcgraph.contrib.checkpoint.load` (``torch.load(weights_only=True)``, at most
    ``MAX_CHECKPOINT_BYTES``, format and ``kind`` checked). Returns the saved state with the stored
    configuration under ``"config"``.

    Raises:
        tg.TMCGraphError: an oversized, unreadable or foreign file, or a different configuration
            (the message names every setting that differs, and the way out).
    """
    path = pathlib.Path(path)
    if not path.exists():
        return None
    try:
        ck = checkpoint.load(path, kind, config=config, keys=keys, max_bytes=MAX_CHECKPOINT_BYTES)
    except checkpoint.CheckpointError as e:
        hint = ("choose another --runs folder or the same settings" if "different configuration" in str(e)
                else "not a readable checkpoint of this driver; delete it or choose another --runs folder")
        raise checkpoint.CheckpointError(f"{e}; {hint}") from None
    return {**ck["state"], "config": ck["config"]}


# ------------------------------------------------------------------------------------ data


def synthetic_mnist(n_train: int, n_test: int, seed: int = 0) -> tuple:
    """Tiny stand-in for MNIST: blurred horizontal and vertical strokes, grey levels ``[N, 784]``."""
    g = torch.Generator().manual_seed(seed)

    def images(n):
        a = torch.zeros(n, 28, 28)
        rows = torch.randint(4, 24, (n,), generator=g)
        cols = torch.randint(4, 24, (n,), generator=g)
        level = torch.rand(n, generator=g) * 0.7 + 0.3
        for i in range(n):
            a[i, rows[i] - 2: rows[i] + 2, 4:24] = 1.0
            a[i, 4:24, cols[i]] = level[i]
        return a.reshape(n, 784)

    return images(n_train), images(n_test)


def load_data(a) -> tuple:
    """``(train_x, test_x, source)``: grey levels in [0, 1], ``[N, 784]``."""
    if a.data is None and (a.quick or a.synthetic):
        n_train, n_test = a.limit_train or 128, a.limit_test or 64
        tr, te = synthetic_mnist(n_train, n_test)
        return tr, te, "synthetic"
    from tmcgraph.data import mnist as mnist_data

    kwargs = {"download": False} if "download" in inspect.signature(mnist_data.load_mnist).parameters else {}
    data = mnist_data.load_mnist(a.data, **kwargs)
    return data.train_x[: a.limit_train], data.test_x[: a.limit_test], "mnist"


# ------------------------------------------------------------------------------------ one run


def build_model(recognition: str, coupling, seed: int):
    """The five-layer model and recognition model, initialised from ``seed``.

    ``mnist_vae.build`` draws its initial weights from torch's global generator; it runs
    inside ``torch.random.fork_rng`` seeded with ``seed``, so the caller's global random
    state is the same afterwards.
    """
    from tmcgraph.models import mnist_vae

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return mnist_vae.build(recognition, coupling)


class Run:
    """One training run of the grid: model, optimiser, private generators, metrics, checkpoint."""

    def __init__(self, config: dict, folder: pathlib.Path, device="cpu"):
        self.config = config
        self.folder = pathlib.Path(folder)
        self.path = self.folder / "checkpoint.pt"
        self.device = torch.device(device)
        self.model, self.proposal = build_model(config["recognition"], config["coupling"], config["seed"])
        self.model.to(self.device)
        self.proposal.to(self.device)
        cls = tg.TMC if config["objective"] == "tmc" else tg.IWAE
        self.est = cls(self.model, self.proposal, K=config["K"], compile=False, device=self.device)
        params = list(self.model.parameters()) + list(self.proposal.parameters())
        self.opt = torch.optim.Adam(params, lr=config["lr"], eps=config["adam_eps"])
        self.shuffle = torch.Generator().manual_seed(config["seed"] + 1)
        self.particles = torch.Generator(device=self.device).manual_seed(config["seed"] + 2)
        self.epoch, self.metrics = 0, []
        state = load_checkpoint(self.path, config, CONFIG_KEYS)
        if state is not None:
            check_rng_device(self.key, self.folder, state.get("particle_rng_device", "cpu"), self.device)
            self.model.load_state_dict(state["model"])
            self.proposal.load_state_dict(state["proposal"])
            self.opt.load_state_dict(state["optimizer"])
            self.shuffle.set_state(state["shuffle_rng"])
            self.particles.set_state(state["particle_rng"])
            self.epoch, self.metrics = int(state["epoch"]), list(state["metrics"])

    @property
    def key(self) -> str:
        c = self.config
        return f"{c['recognition']}-{c['grad']}-{c['objective']}-seed{c['seed']}"

    def save(self) -> None:
        save_checkpoint(self.path, {
            "config": self.config, "epoch": self.epoch, "metrics": self.metrics,
            "model": self.model.state_dict(), "proposal": self.proposal.state_dict(),
            "optimizer": self.opt.state_dict(), "shuffle_rng": self.shuffle.get_state(),
            "particle_rng": self.particles.get_state(), "particle_rng_device": self.device.type,
        })

    def train_epoch(self, train_x: torch.Tensor) -> dict:
        """One epoch of minibatch Adam steps; returns its record (objective, CPU and wall seconds, steps)."""
        from tmcgraph.data.mnist import batches

        c = self.config
        self.model.train()
        cpu0, wall0 = time.process_time(), time.perf_counter()
        idx = batches(len(train_x), c["batch_size"], shuffle=True, generator=self.shuffle)
        total, n = 0.0, 0
        for step, ib in enumerate(idx):
            o = objective(self.est, {"x": train_x[ib.to(train_x.device)]}, c["grad"], seed=self.particles)
            if not torch.isfinite(o.loss):
                raise tg.TMCGraphError(f"run {self.key}: non-finite training objective at epoch {self.epoch + 1}, "
                                       f"step {step}; the last checkpoint is kept")
            self.opt.zero_grad(set_to_none=True)
            o.backward()
            self.opt.step()
            total += o.mean * len(ib)
            n += len(ib)
        synchronize(self.device)
        self.epoch += 1
        rec = {"epoch": self.epoch, "train_objective": total / n, "train_cpu_s": time.process_time() - cpu0,
               "train_wall_s": time.perf_counter() - wall0, "steps": len(idx)}
        if self.device.type != "cpu":
            rec["device"] = self.device.type
        rec["host_cpu"] = HOST_CPU  # epochs of one run may be trained on different machines
        return rec

    @torch.no_grad()
    def evaluate(self, test_x: torch.Tensor, batch_size: int = 500) -> dict:
        """Test TMC and IWAE bounds at ``eval_K`` (nats per image; seeds fixed per epoch and batch)."""
        out, cpu0 = {}, time.process_time()
        for name, cls in (("tmc", tg.TMC), ("iwae", tg.IWAE)):
            est = cls(self.model, self.proposal, K=self.config["eval_K"], compile=False, device=self.device)
            s = 0.0
            for i, xb in enumerate(test_x.split(batch_size)):
                s += float(bound(est, {"x": xb}, seed=1_000_003 * self.epoch + i).sum())
            out[f"test_{name}"] = s / len(test_x)
        out["eval_cpu_s"] = time.process_time() - cpu0
        return out


# ------------------------------------------------------------------------------------ summaries


def _groups(runs: list) -> dict:
    g = {}
    for r in runs:
        c = r["config"]
        g.setdefault((c["recognition"], c["grad"], c["objective"]), []).append(r)
    return g


def curves(runs: list) -> dict:
    """``"rec/grad/obj"`` -> epochs evaluated in every seed, mean test bounds over seeds."""
    out = {}
    for (rec, grad, obj), rs in _groups(runs).items():
        evals = [{m["epoch"]: m for m in r["metrics"] if "test_tmc" in m} for r in rs]
        common = sorted(set.intersection(*(set(e) for e in evals))) if evals else []
        out[f"{rec}/{grad}/{obj}"] = {
            "epochs": common, "seeds": len(rs),
            **{b: [statistics.fmean(e[ep][f"test_{b}"] for e in evals) for ep in common] for b in ("tmc", "iwae")},
        }
    return out


def table1(runs: list, last: int) -> dict:
    """Mean +- sd of each test bound over the last ``last`` evaluated epochs of every seed."""
    out = {}
    for (rec, grad, obj), rs in _groups(runs).items():
        row = {"recognition": rec, "grad": grad, "objective": obj, "seeds": len(rs)}
        for b in ("tmc", "iwae"):
            per_seed = [[m[f"test_{b}"] for m in r["metrics"] if f"test_{b}" in m][-last:] for r in rs]
            pooled = [v for s in per_seed for v in s]
            if not pooled:
                continue
            means = [statistics.fmean(s) for s in per_seed if s]
            row[f"{b}_bound"] = {
                "mean": statistics.fmean(pooled), "sd_pooled": statistics.stdev(pooled) if len(pooled) > 1 else 0.0,
                "sd_over_seed_means": statistics.stdev(means) if len(means) > 1 else 0.0,
                "evaluations_per_seed": min(len(s) for s in per_seed),
                "epochs": sorted({m["epoch"] for r in rs for m in r["metrics"] if f"test_{b}" in m})[-last:],
            }
        out[f"{rec}/{grad}/{obj}"] = row
    return out


def fig6(runs: list) -> dict:
    """Seconds per training epoch per method (median over measured epochs and seeds), averaged over models."""
    per = {}
    for (rec, grad, obj), rs in _groups(runs).items():
        cpu = [m["train_wall_s"] if m.get("device", "cpu") != "cpu" else m["train_cpu_s"]
               for r in rs for m in r["metrics"] if "train_cpu_s" in m]
        steps = [m["steps"] for r in rs for m in r["metrics"] if "steps" in m]
        if not cpu:
            continue
        bs = rs[0]["config"]["batch_size"]
        med = statistics.median(cpu)
        per_step = med / statistics.median(steps)
        hosts = sorted({m.get("host_cpu", "not recorded") for r in rs for m in r["metrics"] if "train_cpu_s" in m})
        per[(rec, grad, obj)] = {"cpu_s_per_epoch": med, "cpu_s_per_step": per_step,
                                 "cpu_s_per_full_epoch": per_step * math.ceil(FULL_TRAIN / bs),
                                 "epochs_measured": len(cpu), "host_cpus": hosts}
    methods = {}
    for grad in GRAD_NAMES:
        for obj in OBJECTIVES:
            vals = [v for (r, g, o), v in per.items() if g == grad and o == obj]
            if vals:
                methods[f"{obj}/{grad}"] = {
                    "recognition_models": [r for (r, g, o) in per if g == grad and o == obj],
                    **{k: statistics.fmean(v[k] for v in vals) for k in
                       ("cpu_s_per_epoch", "cpu_s_per_step", "cpu_s_per_full_epoch")},
                }
    ratios = {}
    for (rec, grad, obj), v in per.items():
        if obj == "tmc" and (rec, grad, "iwae") in per:
            ratios[f"{rec}/{grad}"] = v["cpu_s_per_step"] / per[(rec, grad, "iwae")]["cpu_s_per_step"]
    return {"per_run_group": {f"{r}/{g}/{o}": v for (r, g, o), v in per.items()}, "methods": methods,
            "tmc_over_iwae": ratios,
            "note": "CPU seconds of this process (time.process_time) per epoch on the training set used "
                    "(wall seconds for epochs trained on an accelerator, whose records carry a 'device'); "
                    "cpu_s_per_full_epoch = seconds per step x ceil(60000 / batch size), an extrapolation "
                    "when fewer training images were used"}


#: The reproduction's Table 1 (mean over the last 50 of 1200 epochs, 3 runs, reparameterised
#: gradients): ``(recognition, objective) -> (mean, sd or None)``, each under its own bound.
PUBLISHED = {("small", "tmc"): (-91.63, 0.16), ("small", "iwae"): (-93.35, 0.12),
             ("large", "tmc"): (-91.94, None), ("large", "iwae"): (-93.08, None)}


def comparisons(cv: dict) -> dict:
    """The paper's Fig. 5 comparisons at every epoch both objectives of a ``rec/grad`` pair evaluated.

    ``lead`` is TMC-trained minus IWAE-trained under the TMC bound (Fig. 5A: positive);
    ``gap_b`` the IWAE-trained model's TMC minus IWAE bound (Fig. 5B: small); ``gap_c`` the
    TMC-trained model's (Fig. 5C: larger).
    """
    out = {}
    for rec in RECOGNITION:
        for grad in GRAD_NAMES:
            ct, ci = cv.get(f"{rec}/{grad}/tmc"), cv.get(f"{rec}/{grad}/iwae")
            if not (ct and ci):
                continue
            at_t = dict(zip(ct["epochs"], zip(ct["tmc"], ct["iwae"])))
            at_i = dict(zip(ci["epochs"], zip(ci["tmc"], ci["iwae"])))
            rows = []
            for e in sorted(set(at_t) & set(at_i)):
                (tt, ti), (it, ii) = at_t[e], at_i[e]
                rows.append({"epoch": e, "tmc_trained_tmc": tt, "iwae_trained_tmc": it, "lead": tt - it,
                             "tmc_trained_iwae": ti, "iwae_trained_iwae": ii, "gap_b": it - ii, "gap_c": tt - ti})
            if rows:
                last = rows[-1]
                out[f"{rec}/{grad}"] = {
                    "rows": rows, "last_epoch": last["epoch"],
                    "fig5a_tmc_trained_ahead_at_last": last["lead"] > 0,
                    "fig5a_evaluations_ahead": sum(r["lead"] > 0 for r in rows), "evaluations": len(rows),
                    "fig5bc_gap_b_below_gap_c_at_last": last["gap_b"] < last["gap_c"],
                }
    return out


def markdown(payload: dict) -> str:
    """The report in Markdown: Table 1, the Fig. 5 comparisons per evaluated epoch, Fig. 6."""
    t1, f6, comp = payload["table1"], payload["fig6"], payload["fig5_comparisons"]
    last = payload["budget"]["last"]
    lines = [f"Setting: {payload['setting']}", "", f"Command: `{payload['command']}`", "",
             f"## Table 1 (mean +- sd of the test bounds over the last {last} evaluations, pooled over seeds)", "",
             "| recognition | estimator | seeds | epochs | TMC-trained: TMC bound | IWAE-trained: TMC bound | "
             "TMC-trained: IWAE bound | IWAE-trained: IWAE bound | reproduction (1200 epochs): TMC / IWAE |",
             "|---|---|---|---|---|---|---|---|---|"]

    def cell(row, b):
        v = (row or {}).get(f"{b}_bound")
        return "-" if v is None else f"{v['mean']:.2f} +- {v['sd_pooled']:.2f}"

    def pub(rec, obj, grad):
        v = PUBLISHED.get((rec, obj)) if grad == "reparam" else None
        return "-" if v is None else f"{v[0]:.2f}" + (f" +- {v[1]:.2f}" if v[1] is not None else "")

    for rec in RECOGNITION:
        for grad in GRAD_NAMES:
            rt, ri = t1.get(f"{rec}/{grad}/tmc"), t1.get(f"{rec}/{grad}/iwae")
            if not (rt or ri):
                continue
            ep = sorted({e for r in (rt, ri) if r for b in ("tmc", "iwae")
                         for e in r.get(f"{b}_bound", {}).get("epochs", [])})
            seeds = "/".join(str(r["seeds"]) if r else "0" for r in (rt, ri))
            span = f"{ep[0]}-{ep[-1]}" if ep else "-"
            lines.append(f"| {rec} | {grad} | {seeds} | {span} | {cell(rt, 'tmc')} | {cell(ri, 'tmc')} | "
                         f"{cell(rt, 'iwae')} | {cell(ri, 'iwae')} | "
                         f"{pub(rec, 'tmc', grad)} / {pub(rec, 'iwae', grad)} |")
    lines += ["", "## Fig. 5: the test bounds at every evaluation (means over seeds)", "",
              "lead = TMC-trained minus IWAE-trained under the TMC bound (5A); B = the IWAE-trained model's "
              "TMC minus IWAE bound; C = the TMC-trained model's.", "",
              "| recognition | estimator | epoch | TMC-trained: TMC bound | IWAE-trained: TMC bound | lead | "
              "TMC-trained: IWAE bound | IWAE-trained: IWAE bound | B | C |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for key, c in comp.items():
        rec, grad = key.split("/")
        for r in c["rows"]:
            lines.append(f"| {rec} | {grad} | {r['epoch']} | {r['tmc_trained_tmc']:.2f} | "
                         f"{r['iwae_trained_tmc']:.2f} | {r['lead']:+.2f} | {r['tmc_trained_iwae']:.2f} | "
                         f"{r['iwae_trained_iwae']:.2f} | "
                         f"{r['gap_b']:+.2f} | {r['gap_c']:+.2f} |")
    lines += ["", "## Fig. 5 at each pair's last common evaluation", "",
              "| recognition | estimator | epoch | TMC-trained: TMC bound | IWAE-trained: TMC bound | lead | "
              "TMC-trained ahead | TMC-trained: IWAE bound | IWAE-trained: IWAE bound | B | C | B gap below C gap |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for key, c in comp.items():
        rec, grad = key.split("/")
        r = c["rows"][-1]
        ahead, b_below_c = ("yes" if c[k] else "no" for k in ("fig5a_tmc_trained_ahead_at_last",
                                                             "fig5bc_gap_b_below_gap_c_at_last"))
        lines.append(f"| {rec} | {grad} | {c['last_epoch']} | {r['tmc_trained_tmc']:.2f} | "
                     f"{r['iwae_trained_tmc']:.2f} | {r['lead']:+.2f} | {ahead} "
                     f"({c['fig5a_evaluations_ahead']} of {c['evaluations']} evaluations) | "
                     f"{r['tmc_trained_iwae']:.2f} | {r['iwae_trained_iwae']:.2f} | {r['gap_b']:+.2f} | "
                     f"{r['gap_c']:+.2f} | {b_below_c} |")
    lines += ["", "## Fig. 6: seconds per training epoch (median over measured epochs)", "",
              "| recognition | estimator | TMC | IWAE | TMC / IWAE per step | epochs measured (TMC / IWAE) | CPU |",
              "|---|---|---|---|---|---|---|"]
    per = f6["per_run_group"]
    for rec in RECOGNITION:
        for grad in GRAD_NAMES:
            pt, pi = per.get(f"{rec}/{grad}/tmc"), per.get(f"{rec}/{grad}/iwae")
            if not (pt or pi):
                continue
            ratio = f6["tmc_over_iwae"].get(f"{rec}/{grad}")
            hosts = sorted({h for p in (pt, pi) if p for h in p["host_cpus"]})
            sec = [f"{p['cpu_s_per_epoch']:.1f}" if p else "-" for p in (pt, pi)]
            n = [str(p["epochs_measured"]) if p else "0" for p in (pt, pi)]
            lines.append(f"| {rec} | {grad} | {sec[0]} | {sec[1]} | {'-' if ratio is None else f'{ratio:.2f}'} | "
                         f"{n[0]} / {n[1]} | {', '.join(hosts)} |")
    lines += ["", f"({f6['note']})"]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------ figures

STYLES = {"reparam": "-", "stl": "--", "dregs": ":"}
COLOR = {"iwae": "tab:blue", "tmc": "tab:red"}


def y_window(values: list, pad_frac: float = 0.25, min_pad: float = 0.1) -> Optional[tuple]:
    """``(lo, hi)`` around ``values`` padded by ``pad_frac`` of their span (at least ``min_pad`` nats)."""
    vs = [v for v in values if math.isfinite(v)]
    if not vs:
        return None
    lo, hi = min(vs), max(vs)
    pad = max(pad_frac * (hi - lo), min_pad)
    return lo - pad, hi + pad


def plot_fig5(cv: dict, path, title: str) -> dict:
    """Fig. 5 in the paper's layout; returns the y-window of every panel."""
    plt = pyplot()
    fig, axes = plt.subplots(3, 3, figsize=(13, 10), squeeze=False)
    rows = [
        ("A: TMC bound of every run", lambda obj: [(obj, "tmc")]),
        ("B: IWAE-trained, both bounds", lambda obj: [("iwae", b) for b in ("iwae", "tmc")] if obj == "iwae" else []),
        ("C: TMC-trained, both bounds", lambda obj: [("tmc", b) for b in ("iwae", "tmc")] if obj == "tmc" else []),
    ]
    windows = {}
    for j, rec in enumerate(RECOGNITION):
        for i, (rtitle, pick) in enumerate(rows):
            ax = axes[i][j]
            window_vals, drawn = [], 0
            # the window follows the longest run of the panel: a run still at its first
            # epochs would otherwise stretch it over values the others have left behind
            ends = [max(c["epochs"]) for g in GRAD_NAMES for o in OBJECTIVES
                    if pick(o) and (c := cv.get(f"{rec}/{g}/{o}")) and c["epochs"]]
            half = max(ends, default=0) / 2
            for grad in GRAD_NAMES:
                for obj in OBJECTIVES:
                    c = cv.get(f"{rec}/{grad}/{obj}")
                    if not c or not c["epochs"]:
                        continue
                    for o, b in pick(obj):
                        ys = c[b]
                        if i == 0:
                            label = f"{o.upper()}-trained, {grad}"
                            color = COLOR[o]
                        else:
                            label = f"{b.upper()} bound, {grad}"
                            color = COLOR[b]
                        ax.plot(c["epochs"], ys, STYLES[grad], color=color, marker="o", ms=3, label=label)
                        window_vals += [y for e, y in zip(c["epochs"], ys) if e > half]
                        drawn += 1
            notes = []
            if i == 0:
                for grad in GRAD_NAMES:
                    ct, ci = cv.get(f"{rec}/{grad}/tmc"), cv.get(f"{rec}/{grad}/iwae")
                    if ct and ci and ct["epochs"] and ci["epochs"] and ct["epochs"][-1] == ci["epochs"][-1]:
                        notes.append(f"{grad}, epoch {ct['epochs'][-1]}: {ct['tmc'][-1] - ci['tmc'][-1]:+.2f}")
            if not drawn:
                ax.text(0.5, 0.5, "not run", ha="center", va="center", transform=ax.transAxes, color="gray")
                ax.set_xticks([])
                ax.set_yticks([])
            else:
                w = y_window(window_vals)
                if w:
                    ax.set_ylim(*w)
                    windows[f"{rec}/{rtitle[0]}"] = list(w)
                lead = "TMC bound, TMC- minus IWAE-trained:\n" + "\n".join(notes) if notes else None
                ax.legend(fontsize=7, **({"title": lead, "title_fontsize": 7} if lead else {}))
                ax.grid(alpha=0.3)
            if i == 0:
                ax.set_title(f"{rec} recognition model\n{rtitle}", fontsize=9)
            else:
                ax.set_title(rtitle, fontsize=9)
            if i == 2:
                ax.set_xlabel("epoch")
            if j == 0:
                ax.set_ylabel("test bound (nats per image)")
    fig.suptitle(textwrap.fill(title, 150) + "\n(means over seeds; y-window from the second half of training)",
                 fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)
    return windows


def plot_fig6(f6: dict, path, title: str) -> None:
    plt = pyplot()
    fig, (a0, a1) = plt.subplots(1, 2, figsize=(11, 3.8))
    names = list(f6["methods"])
    if names:
        vals = [f6["methods"][n]["cpu_s_per_full_epoch"] for n in names]
        a0.bar(range(len(names)), vals, color=[COLOR[n.split("/")[0]] for n in names])
        a0.set_xticks(range(len(names)))
        counts = [len(f6["methods"][n]["recognition_models"]) for n in names]
        a0.set_xticklabels([n.replace("/", "\n") + f"\n({c} model{'s' if c != 1 else ''})"
                            for n, c in zip(names, counts)], fontsize=8)
        for k, v in enumerate(vals):
            a0.text(k, v, f"{v:.0f}", ha="center", va="bottom", fontsize=8)
    a0.set_ylabel("CPU s per 60k-image epoch\n(s per step x steps; mean over recognition models)")
    a0.set_title("Fig. 6: time per training epoch", fontsize=9)
    rs = f6["tmc_over_iwae"]
    if rs:
        a1.bar(range(len(rs)), list(rs.values()), color="tab:purple")
        a1.set_xticks(range(len(rs)))
        a1.set_xticklabels([k.replace("/", "\n") for k in rs], fontsize=8)
        for k, v in enumerate(rs.values()):
            a1.text(k, v, f"{v:.2f}", ha="center", va="bottom", fontsize=8)
    a1.axhline(1.0, color="k", lw=0.8, ls="--")
    a1.set_ylabel("TMC / IWAE time per step")
    a1.set_title("TMC / IWAE per recognition model and estimator", fontsize=9)
    fig.suptitle(textwrap.fill(title, 120), fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


# ------------------------------------------------------------------------------------ driver


def _names(s: str, allowed, what: str) -> list:
    vals = [v.strip() for v in s.split(",") if v.strip()]
    bad = [v for v in vals if v not in allowed]
    if bad or not vals:
        raise tg.TMCGraphError(f"--{what}: unknown value(s) {bad or s!r}; choose from {list(allowed)}")
    return vals


def parse(argv=None):
    p = base_parser(__doc__, seeds=1)
    p.add_argument("--recognition", default=None, help="comma list of factorised,small,large (default all)")
    p.add_argument("--grads", default=None, help="comma list of reparam,stl,dregs (default all)")
    p.add_argument("--objectives", default="tmc,iwae", help="comma list of tmc,iwae (default both)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per run (default 10; quick: 1)")
    p.add_argument("--eval-every", type=int, default=1, help="evaluate every N epochs (and at the last)")
    p.add_argument("--eval-last", type=int, default=0,
                   help="also evaluate at each of the last M epochs of --epochs (the reproduction's Table 1 "
                        "averages the last 50 epochs: --eval-last 50 --last 50); evaluation draws from its own "
                        "fixed seeds, so this changes no training")
    p.add_argument("--last", type=int, default=5, help="Table 1: evaluations averaged at the end (default 5)")
    p.add_argument("--K", type=int, default=None, help="training particles / samples (default 20; quick: 4)")
    p.add_argument("--eval-K", type=int, default=None, help="K of the test bounds (default --K)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--adam-eps", type=float, default=1e-8, help="Adam eps (PyTorch default, as the TMC paper)")
    p.add_argument("--coupling", default=None, help="coupling of the non-factorised recognition layers "
                                                    "(default: the engine's)")
    p.add_argument("--limit-train", type=int, default=None, help="first N training images (default all)")
    p.add_argument("--limit-test", type=int, default=None, help="first N test images (default all)")
    p.add_argument("--data", default=None, help="MNIST directory (default $TMCGRAPH_DATA)")
    p.add_argument("--synthetic", action="store_true", help="synthetic stroke images instead of MNIST")
    p.add_argument("--runs", type=pathlib.Path, default=None,
                   help="folder of the per-run checkpoint folders (default runs/mnist_grid; quick: under --out)")
    add_shard_arg(p, "the grid (in the order recognition, grad, objective, seed)")
    add_device_arg(p)
    p.add_argument("--setting", default=None, help="label of this setting, recorded in the JSON and figures")
    p.add_argument("--no-plots", action="store_true", help="write the JSON only")
    p.add_argument("--report", action="store_true",
                   help="train nothing: write the outputs from the checkpoints found in --runs, at whatever epoch "
                        "each run has reached (runs with no checkpoint are listed as missing)")
    p.add_argument("--at-epoch", type=int, default=None,
                   help="with --report: use each run's metrics up to this epoch only, so that runs which have "
                        "reached different epochs are compared at the same one (shorter runs are listed)")
    a = p.parse_args(argv)
    if a.report and a.epochs is not None:
        raise tg.TMCGraphError("--report trains nothing, so it takes no --epochs")
    if a.at_epoch is not None and (not a.report or a.at_epoch < 1):
        raise tg.TMCGraphError(f"--at-epoch needs --report and a positive epoch, got {a.at_epoch}")
    a.recognition = _names(a.recognition or ",".join(RECOGNITION), RECOGNITION, "recognition")
    a.grads = _names(a.grads or ",".join(GRAD_NAMES), tuple(g for g in GRAD_NAMES if g in GRADS), "grads")
    a.objectives = _names(a.objectives, OBJECTIVES, "objectives")
    a.epochs = a.epochs or (1 if a.quick else 10)
    a.K = a.K or (4 if a.quick else 20)
    a.eval_K = a.eval_K or a.K
    if a.quick and a.data is None:
        a.limit_train, a.limit_test = a.limit_train or 128, a.limit_test or 64
    for name in ("epochs", "eval_every", "last", "K", "eval_K", "batch_size", "limit_train", "limit_test"):
        v = getattr(a, name)
        if v is not None and v < 1:
            raise tg.TMCGraphError(f"--{name.replace('_', '-')} must be a positive integer, got {v}")
    if not a.lr > 0 or not a.adam_eps > 0:
        raise tg.TMCGraphError(f"--lr and --adam-eps must be positive, got {a.lr} and {a.adam_eps}")
    if a.eval_last < 0:
        raise tg.TMCGraphError(f"--eval-last must be zero or a positive integer, got {a.eval_last}")
    a.eval_last = max(a.eval_last, 1)  # the last epoch is always evaluated
    return a


@keeps_process_state
def main(argv=None) -> dict:
    a = parse(argv)
    threads = set_threads(a.threads, a.allocator)
    from tmcgraph.sampling.couplings import DEFAULT

    device = cli_device(a.device)
    train_x, test_x, source = load_data(a)
    train_x, test_x = train_x.to(device), test_x.to(device)
    runs_dir = a.runs or (pathlib.Path(a.out) / "mnist_grid_quick_runs" if a.quick else pathlib.Path("runs/mnist_grid"))
    seeds = list(range(a.seeds or 1))
    runs = []
    for rec in a.recognition:
        for grad in a.grads:
            for obj in a.objectives:
                for seed in seeds:
                    cfg = {"recognition": rec, "grad": grad, "objective": obj, "seed": seed, "K": a.K,
                           "eval_K": a.eval_K, "batch_size": a.batch_size, "lr": a.lr, "adam_eps": a.adam_eps,
                           "coupling": a.coupling or DEFAULT, "train_images": len(train_x),
                           "test_images": len(test_x), "eval_every": a.eval_every, "data": source}
                    runs.append((cfg, runs_dir / f"{rec}-{grad}-{obj}-seed{seed}"))
    runs = [Run(cfg, folder, device) for cfg, folder in take_shard(runs, a.shard)]
    missing = []
    if a.report:
        missing = [r.key for r in runs if r.epoch == 0]
        runs = [r for r in runs if r.epoch > 0]
        if not runs:
            raise tg.TMCGraphError(f"--report: no run of this grid has a checkpoint under {runs_dir}")
        if missing:
            print(f"--report: {len(missing)} run(s) have no checkpoint yet: {', '.join(missing)}", flush=True)
        if a.at_epoch is not None:
            short = [f"{r.key} ({r.epoch})" for r in runs if r.epoch < a.at_epoch]
            if short:
                print(f"--report: {len(short)} run(s) have fewer than {a.at_epoch} epochs: {', '.join(short)}",
                      flush=True)
            for r in runs:  # the checkpoints are not written in report mode
                r.metrics = [m for m in r.metrics if m["epoch"] <= a.at_epoch]
                r.epoch = min(r.epoch, a.at_epoch)
        a.epochs = max(r.epoch for r in runs)
    skipped = [r.key for r in runs if r.epoch >= a.epochs]
    if skipped and not a.report:
        print(f"{len(skipped)} of {len(runs)} runs already have {a.epochs} epochs: skipped", flush=True)
    t0 = time.perf_counter()
    for epoch in range(1, 0 if a.report else a.epochs + 1):
        for r in runs:
            if r.epoch >= epoch:
                continue
            rec = r.train_epoch(train_x)
            if r.epoch % a.eval_every == 0 or r.epoch > a.epochs - a.eval_last:
                rec.update(r.evaluate(test_x))
            r.metrics.append(rec)
            r.save()
            ev = f"  test TMC {rec['test_tmc']:.2f}  IWAE {rec['test_iwae']:.2f}" if "test_tmc" in rec else ""
            print(f"{r.key} epoch {r.epoch}: train {rec['train_objective']:.2f}{ev}  "
                  f"({rec['train_cpu_s']:.1f} CPU s, {rec['steps']} steps)", flush=True)
    wall = time.perf_counter() - t0
    done = [{"key": r.key, "config": r.config, "epochs": r.epoch, "metrics": r.metrics} for r in runs]
    lo = min(r.epoch for r in runs)
    epochs_text = f"{lo}-{a.epochs} epochs" if lo < a.epochs else f"{a.epochs} epoch(s)"
    setting = a.setting or (
        f"{'synthetic images' if source == 'synthetic' else 'MNIST'}: {len(train_x)} training / {len(test_x)} test "
        f"images, {epochs_text}, batch {a.batch_size}, K={a.K} (eval K={a.eval_K}), seeds {len(seeds)}, "
        f"recognition {','.join(a.recognition)}, grads {','.join(a.grads)}")
    paper = lo >= 1200 and len(train_x) == FULL_TRAIN and len(test_x) == 10000
    cv, t1, f6 = curves(done), table1(done, a.last), fig6(done)
    jpath, ppath = output_paths(a.out, NAME, a.quick)
    fig6_path = ppath.with_name(ppath.stem + "_fig6.png")
    windows = {}
    if not a.no_plots:
        windows = plot_fig5(cv, ppath, f"MNIST grid (Fig. 5): {setting}")
        plot_fig6(f6, fig6_path, f"{setting}")
    payload = {
        "benchmark": NAME, "command": command_line(argv), "quick": a.quick, "setting": setting,
        "paper_protocol": paper,
        "protocol_note": ("the paper trains 1200 epochs on all 60000 images; this setting is "
                          + ("that protocol" if paper else "far smaller, so its numbers are not the paper's")),
        "budget": {"epochs": a.epochs, "train_images": len(train_x), "test_images": len(test_x), "data": source,
                   "batch_size": a.batch_size, "K": a.K, "eval_K": a.eval_K, "lr": a.lr, "adam_eps": a.adam_eps,
                   "eval_every": a.eval_every, "eval_last": a.eval_last, "last": a.last, "seeds": seeds,
                   "recognition": a.recognition,
                   "grads": a.grads, "objectives": a.objectives, "coupling": a.coupling or DEFAULT,
                   "wall_seconds_this_invocation": wall, "runs_skipped_as_complete": skipped,
                   "shard": a.shard, "report_only": a.report, "runs_missing": missing, "at_epoch": a.at_epoch,
                   "epochs_per_run": {r.key: r.epoch for r in runs}},
        "machine": machine_info(str(device)), "device": str(device), **threads,
        "table1": t1, "fig6": f6, "fig5_curves": cv, "fig5_comparisons": comparisons(cv),
        "fig5_y_windows": windows, "runs": done,
        "published": {f"{r}/{o}": {"mean": m, "sd": sd} for (r, o), (m, sd) in PUBLISHED.items()},
        "published_note": "the reproduction's Table 1: mean over the last 50 of 1200 epochs, 3 runs, "
                          "reparameterised gradients, each objective under its own bound",
        "figures": {"fig5": ppath.name, "fig6": fig6_path.name},
    }
    mpath = jpath.with_suffix(".md")
    payload["report"] = mpath.name
    write_json(jpath, payload)
    mpath.write_text(markdown(payload))
    for k, row in t1.items():
        parts = [f"{b} bound {row[f'{b}_bound']['mean']:.2f} +- {row[f'{b}_bound']['sd_pooled']:.2f}"
                 for b in ("tmc", "iwae") if f"{b}_bound" in row]
        print(f"Table 1 {k}: " + ", ".join(parts))
    for k, v in f6["methods"].items():
        print(f"Fig. 6 {k}: {v['cpu_s_per_epoch']:.1f} CPU s per epoch here, {v['cpu_s_per_full_epoch']:.0f} "
              "per 60k epoch (extrapolated)")
    for k, v in f6["tmc_over_iwae"].items():
        print(f"Fig. 6 TMC/IWAE {k}: {v:.2f}")
    print(f"wrote {jpath}, {mpath}" + ("" if a.no_plots else f", {ppath} and {fig6_path}"))
    return payload


def cli(argv=None) -> int:
    return run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
