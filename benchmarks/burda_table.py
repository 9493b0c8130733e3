"""Burda et al. (2016), "Importance Weighted Autoencoders", Table 1 on MNIST, for a stated (truncated) schedule.

Trains the paper's one- and two-stochastic-layer models (``tmcgraph.models.burda``) with
the VAE bound (k samples: the mean of k ELBOs) and the IWAE bound for k in {1, 5, 50},
and TMC (k particles per layer) on the two-layer model, on dynamically binarised MNIST (a
fresh Bernoulli draw of the training images every epoch, from a private generator; the
test images are binarised once, with a fixed seed, the same for every model). Other
objectives of ``tmcgraph.models.burda.parse_objective`` (``ciwae:K:beta``,
``miwae:M:K``, ``piwae:M:K``) can be added with ``--objectives``.

Optimisation as in the paper: Adam (beta = 0.9, 0.999, eps = 1e-4), batch 20, stage i
of 3^i epochs at learning rate 1e-3 * 10^(-i/7), i = 0..7 (3280 epochs). ``--stages``
keeps the first stages and ``--epochs`` stops earlier still (the learning rate of an
epoch never depends on where training stops, so a run can be continued to more epochs
and more stages). Every run keeps a checkpoint folder under ``--runs`` and is skipped when
complete; a folder holding more epochs than requested is refused. ``--shard I/N`` trains
and evaluates every N-th run, so that N processes share one ``--runs`` folder; a last
invocation without it finds every run done and writes the table.

After training, each model is evaluated on the test set (all 10000 images, or
``--limit-test``): NLL = -L_5000 (``--eval-k``; chunked over samples, memory bounded),
the ELBO over the same samples, KL(q || p(h|x)) ~ L_5000 - ELBO, the effective sample
size of the 5000 importance weights, and the active units (Cov_x E_q[u | x] > 1e-2 on
the test images; higher layers' means averaged over 100 draws of the layers below).

Outputs (``--out``, default ``benchmarks/results``): ``burda_table.json`` (setting,
every run's metrics, the table, the published numbers, the orderings checked),
``burda_table.md`` (the table in the layout of Burda et al.'s Table 1, with the
published numbers beside it) and ``burda_table.png``. ``--quick``: synthetic images,
a tiny schedule and ``L_200``, for the tests.

The full protocol (days on a CPU; a GPU job, ``--device cuda``, run with the grid by
``benchmarks/gpu_papers.sh``; not run here)::

    python benchmarks/burda_table.py --data ../shared/data/mnist --stages 8 --device cuda
"""

from __future__ import annotations

import math
import pathlib
import statistics
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))  # this checkout's tmcgraph, even if another copy is installed

import _common  # noqa: E402
import torch  # noqa: E402
from _common import (  # noqa: E402,E501
    base_parser,
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
    write_json,
)
from mnist_grid import load_checkpoint, load_data, save_checkpoint  # noqa: E402

import tmcgraph as tg  # noqa: E402
from tmcgraph.models import burda  # noqa: E402

NAME = "burda_table"
HOST_CPU = cpu_name()
#: Kind recorded in (and required of) this command's checkpoints.
KIND = "benchmarks/burda_table"
DEFAULT_OBJECTIVES = "vae:1,vae:5,vae:50,iwae:5,iwae:50,tmc:5,tmc:50"
#: Settings that must agree for a run folder to be continued.
CONFIG_KEYS = ("layers", "objective", "seed", "batch_size", "lr", "adam_eps", "train_images", "data")
#: Settings of the final evaluation (recomputed when they change).
EVAL_KEYS = ("eval_k", "test_images", "au_samples", "max_elements")


def binarize(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """A Bernoulli draw of every pixel with probability its grey level."""
    return torch.bernoulli(x, generator=g)


class Run:
    """One model trained with one objective: weights, optimiser, generators, metrics, checkpoint."""

    def __init__(self, config: dict, folder: pathlib.Path, pixel_means: torch.Tensor, stages: int = 8,
                 device="cpu"):
        self.config = config
        self.device = torch.device(device)
        self.stages = stages  # not part of the configuration: an epoch's rate does not depend on it
        self.path = pathlib.Path(folder) / "checkpoint.pt"
        self.obj = burda.parse_objective(config["objective"])
        self.model, self.proposal = burda.build(config["layers"], pixel_means=pixel_means, seed=config["seed"])
        self.model.to(self.device)
        self.proposal.to(self.device)
        params = list(self.model.parameters()) + list(self.proposal.parameters())
        self.opt = torch.optim.Adam(params, lr=config["lr"], eps=config["adam_eps"])
        self.shuffle = torch.Generator().manual_seed(config["seed"] + 1)
        self.particles = torch.Generator(device=self.device).manual_seed(config["seed"] + 2)
        self.binarizer = torch.Generator(device=self.device).manual_seed(config["seed"] + 3)
        self.epoch, self.metrics, self.evaluation = 0, [], None
        state = load_checkpoint(self.path, config, CONFIG_KEYS, kind=KIND)
        if state is not None:
            _common.check_rng_device(self.key, self.path.parent, state.get("rng_device", "cpu"), self.device)
            self.model.load_state_dict(state["model"])
            self.proposal.load_state_dict(state["proposal"])
            self.opt.load_state_dict(state["optimizer"])
            for g, k in ((self.shuffle, "shuffle_rng"), (self.particles, "particle_rng"),
                         (self.binarizer, "binarize_rng")):
                g.set_state(state[k])
            self.epoch, self.metrics = int(state["epoch"]), list(state["metrics"])
            self.evaluation = state.get("evaluation")

    @property
    def key(self) -> str:
        return f"L{self.config['layers']}-{self.config['objective'].replace(':', '_')}-seed{self.config['seed']}"

    def save(self) -> None:
        save_checkpoint(self.path, kind=KIND, state={
            "config": self.config, "epoch": self.epoch, "metrics": self.metrics, "evaluation": self.evaluation,
            "model": self.model.state_dict(), "proposal": self.proposal.state_dict(),
            "optimizer": self.opt.state_dict(), "shuffle_rng": self.shuffle.get_state(),
            "particle_rng": self.particles.get_state(), "binarize_rng": self.binarizer.get_state(),
            "rng_device": self.device.type,
        })

    def train_epoch(self, train_x: torch.Tensor) -> dict:
        c = self.config
        lr = burda.learning_rate(self.epoch, self.stages, c["lr"])
        for group in self.opt.param_groups:
            group["lr"] = lr
        xs = binarize(train_x, self.binarizer)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        order = torch.randperm(len(xs), generator=self.shuffle).to(xs.device)
        total, n, steps = 0.0, 0, 0
        for ib in order.split(c["batch_size"]):
            o = self.obj(self.model, self.proposal, {"x": xs[ib]}, seed=self.particles)
            if not torch.isfinite(o.loss):
                raise tg.TMCGraphError(f"run {self.key}: non-finite objective at epoch {self.epoch + 1}; "
                                       "the last checkpoint is kept")
            self.opt.zero_grad(set_to_none=True)
            o.backward()
            self.opt.step()
            total += o.mean * len(ib)
            n += len(ib)
            steps += 1
        synchronize(self.device)
        self.epoch += 1
        self.evaluation = None  # the weights changed
        rec = {"epoch": self.epoch, "lr": lr, "train_objective": total / n,
               "train_cpu_s": time.process_time() - cpu0, "train_wall_s": time.perf_counter() - wall0, "steps": steps}
        if self.device.type != "cpu":
            rec["device"] = self.device.type
        rec["host_cpu"] = HOST_CPU  # epochs of one run may be trained on different machines
        return rec

    def evaluate(self, test_x: torch.Tensor, settings: dict) -> dict:
        cpu0 = time.process_time()
        r = burda.evaluate_bounds(self.model, self.proposal, test_x, K=settings["eval_k"], seed=777,
                                  max_elements=settings["max_elements"])
        means = burda.posterior_means(self.proposal, test_x, samples=settings["au_samples"], seed=778)
        au = {n: burda.active_units(m) for n, m in means.items()}
        return {**settings, "nll": -float(r["bound"].mean()), "elbo": float(r["elbo"].mean()),
                "kl": float(r["kl"].mean()), "ess": float(r["ess"].mean()),
                "nll_se": float(r["bound"].std() / math.sqrt(len(test_x))),
                "active_units": au, "active_units_total": sum(au.values()),
                "active_units_str": "+".join(str(au[n]) for n in sorted(au)),
                "eval_cpu_s": time.process_time() - cpu0}


def table(runs: list) -> dict:
    """``{(layers, k): {"vae": ..., "iwae": ..., "tmc": ...}}`` of NLL / active units (means over seeds)."""
    cells = {}
    for r in runs:
        o = burda.parse_objective(r["config"]["objective"])
        if o.name not in ("vae", "iwae", "tmc") or r["evaluation"] is None:
            continue
        cells.setdefault((r["config"]["layers"], o.k, o.name), []).append(r["evaluation"])
    out = {}
    for (L, k, name), evs in cells.items():
        cell = {"nll": statistics.fmean(e["nll"] for e in evs), "seeds": len(evs),
                "nll_sd_over_seeds": statistics.stdev([e["nll"] for e in evs]) if len(evs) > 1 else 0.0,
                "active_units": evs[0]["active_units_str"] if len(evs) == 1 else
                "/".join(e["active_units_str"] for e in evs),
                "kl": statistics.fmean(e["kl"] for e in evs), "ess": statistics.fmean(e["ess"] for e in evs)}
        out.setdefault(f"{L}/{k}", {})[name] = cell
        if k == 1 and name == "vae":  # the VAE and IWAE bounds coincide at k = 1
            out[f"{L}/{k}"].setdefault("iwae", {**cell, "note": "k=1: the IWAE bound is the VAE bound"})
    return out


def orderings(tab: dict) -> dict:
    """The paper's qualitative claims, checked on this table (``None``: a cell was not run)."""
    out = {}

    def cell(L, k, name, what="nll"):
        c = tab.get(f"{L}/{k}", {}).get(name)
        if c is None:
            return None
        return c[what] if what == "nll" else sum(int(v) for v in str(c["active_units"]).split("/")[0].split("+"))

    for L in (1, 2):
        i50, i5, v1, v50 = cell(L, 50, "iwae"), cell(L, 5, "iwae"), cell(L, 1, "vae"), cell(L, 50, "vae")
        a_i = cell(L, 50, "iwae", "au")
        kv = 50 if cell(L, 50, "vae") is not None else 1  # the VAE at k = 50 if it was run, else at k = 1
        a_v = cell(L, kv, "vae", "au")

        def lt(a, b):
            return None if a is None or b is None else bool(a < b)

        out[f"{L}_layer"] = {
            "nll_iwae50_lt_iwae5": lt(i50, i5), "nll_iwae5_lt_vae1": lt(i5, v1), "nll_iwae50_lt_vae50": lt(i50, v50),
            f"active_units_iwae50_gt_vae{kv}": None if a_i is None or a_v is None else bool(a_i > a_v),
        }
    return out


def _ks(tab: dict, L: int) -> list:
    """The k of the published rows and of every cell run for ``L`` layers, ascending."""
    return sorted({1, 5, 50} | {int(key.split("/")[1]) for key in tab if key.startswith(f"{L}/")})


def markdown(tab: dict, payload: dict) -> str:
    has_tmc = any("tmc" in v for v in tab.values())
    head = ["# stoch. layers", "k", "VAE NLL", "VAE active", "IWAE NLL", "IWAE active"]
    head += ["TMC NLL", "TMC active"] if has_tmc else []
    head += ["published VAE NLL (active)", "published IWAE NLL (active)"]
    lines = [f"Setting: {payload['setting']}", "", f"Command: `{payload['command']}`", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def fmt(c):
        return ("-", "-") if c is None else (f"{c['nll']:.2f}", str(c["active_units"]))

    for L in (1, 2):
        for k in _ks(tab, L):
            row = tab.get(f"{L}/{k}", {})
            cells = [str(L), str(k), *fmt(row.get("vae")), *fmt(row.get("iwae"))]
            if has_tmc:
                cells += list(fmt(row.get("tmc")))
            pub = burda.PUBLISHED.get((L, k))
            cells += [f"{pub['vae'][0]:.2f} ({pub['vae'][1]})", f"{pub['iwae'][0]:.2f} ({pub['iwae'][1]})"] \
                if pub else ["-", "-"]
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Every run (test set; NLL = -L_K, KL ~ L_K - ELBO, ESS of the K weights):", "",
              "| layers | objective | epochs | NLL | ELBO | KL | ESS | active units | train CPU s |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in payload["runs"]:
        e = r["evaluation"] or {}
        lines.append(f"| {r['config']['layers']} | {burda.parse_objective(r['config']['objective']).label} | "
                     f"{r['epochs']} | {e.get('nll', float('nan')):.2f} | {e.get('elbo', float('nan')):.2f} | "
                     f"{e.get('kl', float('nan')):.2f} | {e.get('ess', float('nan')):.1f} | "
                     f"{e.get('active_units_str', '-')} | {r['train_cpu_s']:.0f} |")
    lines += ["", "Orderings of the paper (true / false / not run):", ""]
    for L, checks in payload["orderings"].items():
        lines.append(f"* {L}: " + ", ".join(f"{k} = {v}" for k, v in checks.items()))
    return "\n".join(lines) + "\n"


def plot(tab: dict, path, title: str) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    colors = {"vae": "tab:green", "iwae": "tab:blue", "tmc": "tab:red"}
    for ax, L in zip(axes, (1, 2)):
        for name, col in colors.items():
            ks = [k for k in _ks(tab, L) if name in tab.get(f"{L}/{k}", {})]
            if ks:
                ax.plot(ks, [tab[f"{L}/{k}"][name]["nll"] for k in ks], "o-", color=col, label=f"{name} (here)")
            pk = [k for k in (1, 5, 50) if (L, k) in burda.PUBLISHED and name in ("vae", "iwae")]
            if pk:
                ax.plot(pk, [burda.PUBLISHED[(L, k)][name][0] for k in pk], "x--", color=col, alpha=0.5,
                        label=f"{name} (published, full schedule)")
        ax.set_xscale("log")
        ax.set_xlabel("k")
        ax.set_ylabel("test NLL (nats)")
        ax.set_title(f"{L} stochastic layer(s)", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


def parse(argv=None):
    p = base_parser(__doc__, seeds=1)
    p.add_argument("--layers", default="1,2", help="comma list of 1,2")
    p.add_argument("--objectives", default=None, help=f"comma list of objective specs (default {DEFAULT_OBJECTIVES}; "
                                                      "tmc runs on the two-layer model only)")
    p.add_argument("--objectives-2", default=None, help="objective specs of the two-layer model (default --objectives)")
    p.add_argument("--stages", type=int, default=8, help="schedule stages kept (stage i: 3^i epochs)")
    p.add_argument("--epochs", type=int, default=None, help="stop after this many epochs (default: all of --stages)")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate of stage 0")
    p.add_argument("--adam-eps", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=20)
    p.add_argument("--eval-k", type=int, default=None, help="samples of the NLL estimate L_K (default 5000)")
    p.add_argument("--au-samples", type=int, default=100, help="draws of lower layers for higher layers' means")
    p.add_argument("--max-elements", type=int, default=2**22, help="largest logits tensor of the evaluation")
    p.add_argument("--limit-train", type=int, default=None)
    p.add_argument("--limit-test", type=int, default=None)
    p.add_argument("--data", default=None, help="MNIST directory (default $TMCGRAPH_DATA)")
    p.add_argument("--synthetic", action="store_true", help="synthetic stroke images instead of MNIST")
    p.add_argument("--runs", type=pathlib.Path, default=None, help="folder of the per-run checkpoint folders")
    p.add_argument("--setting", default=None, help="label of this setting, recorded in the outputs")
    _common.add_shard_arg(p, "the table (in the order layers, objective, seed)")
    _common.add_device_arg(p)
    a = p.parse_args(argv)
    try:
        a.layers = sorted({int(v) for v in a.layers.split(",") if v.strip()})
    except ValueError:
        raise tg.TMCGraphError(f"--layers: expected a comma list of 1 and 2, got {a.layers!r}") from None
    if not a.layers or any(v not in burda.ARCHITECTURES for v in a.layers):
        raise tg.TMCGraphError(f"--layers: expected a comma list of 1 and 2, got {a.layers!r}")
    if a.quick:
        a.objectives = a.objectives or "vae:1,vae:5,iwae:5,tmc:3,ciwae:4:0.5,miwae:2:2,piwae:2:2"
        a.stages, a.epochs = min(a.stages, 2), a.epochs or 1
        a.eval_k = a.eval_k or 200
        a.au_samples = min(a.au_samples, 10)
        a.batch_size = 32 if a.batch_size == 20 else a.batch_size
    a.objectives = [s.strip() for s in (a.objectives or DEFAULT_OBJECTIVES).split(",") if s.strip()]
    a.objectives_2 = [s.strip() for s in a.objectives_2.split(",") if s.strip()] if a.objectives_2 else a.objectives
    for s in a.objectives + a.objectives_2:
        burda.parse_objective(s)
    a.eval_k = a.eval_k or 5000
    full = sum(n for n, _ in burda.schedule(a.stages, a.lr)) if a.stages >= 1 else 0
    a.epochs = min(a.epochs or full, full)
    for name in ("stages", "epochs", "batch_size", "eval_k", "au_samples", "max_elements", "limit_train",
                 "limit_test"):
        v = getattr(a, name)
        if v is not None and v < 1:
            raise tg.TMCGraphError(f"--{name.replace('_', '-')} must be a positive integer, got {v}")
    return a


@keeps_process_state
def main(argv=None) -> dict:
    a = parse(argv)
    threads = set_threads(a.threads, a.allocator)
    device = cli_device(a.device)
    train_x, test_x, source = load_data(a)
    test_b = binarize(test_x, torch.Generator().manual_seed(12345)).to(device)  # the same images on every device
    pixel_means = train_x.mean(0)
    train_x = train_x.to(device)
    runs_dir = a.runs or (pathlib.Path(a.out) / "burda_table_quick_runs" if a.quick else pathlib.Path("runs/burda"))
    seeds = list(range(a.seeds or 1))
    planned = []
    for L in a.layers:
        for spec in (a.objectives_2 if L == 2 else a.objectives):
            if burda.parse_objective(spec).name == "tmc" and L < 2:
                continue  # one stochastic layer: TMC is IWAE
            for seed in seeds:
                cfg = {"layers": L, "objective": spec, "seed": seed, "batch_size": a.batch_size, "lr": a.lr,
                       "adam_eps": a.adam_eps, "train_images": len(train_x), "data": source}
                planned.append((cfg, runs_dir / f"L{L}-{spec.replace(':', '_')}-seed{seed}"))
    runs = []
    for cfg, folder in _common.take_shard(planned, a.shard):
        r = Run(cfg, folder, pixel_means, a.stages, device)
        if r.epoch > a.epochs:
            raise tg.TMCGraphError(f"run {r.key} in {r.path.parent} has {r.epoch} epochs, more than the "
                                   f"{a.epochs} requested; ask for at least {r.epoch} epochs or choose "
                                   "another --runs folder")
        runs.append(r)
    settings = {"eval_k": a.eval_k, "test_images": len(test_x), "au_samples": a.au_samples,
                "max_elements": a.max_elements}
    t0 = time.perf_counter()
    for epoch in range(1, a.epochs + 1):
        for r in runs:
            if r.epoch >= epoch:
                continue
            rec = r.train_epoch(train_x)
            r.metrics.append(rec)
            r.save()
            print(f"{r.key} epoch {r.epoch}: lr {rec['lr']:.2e}  train {rec['train_objective']:.2f}  "
                  f"({rec['train_cpu_s']:.1f} CPU s)", flush=True)
    for r in runs:
        if r.evaluation is None or any(r.evaluation.get(k) != v for k, v in settings.items()):
            r.evaluation = r.evaluate(test_b, settings)
            r.save()
        e = r.evaluation
        print(f"{r.key}: NLL {e['nll']:.2f} (se {e['nll_se']:.2f})  KL {e['kl']:.2f}  ESS {e['ess']:.1f}  "
              f"active units {e['active_units_str']}", flush=True)
    wall = time.perf_counter() - t0
    done = [{"key": r.key, "config": r.config, "epochs": r.epoch, "metrics": r.metrics, "evaluation": r.evaluation,
             "train_cpu_s": sum(m["train_cpu_s"] for m in r.metrics)} for r in runs]
    sched = burda.schedule(a.stages, a.lr)
    setting = a.setting or (
        f"{'synthetic images' if source == 'synthetic' else 'MNIST'} (dynamic binarisation): {len(train_x)} training "
        f"/ {len(test_x)} test images, {a.epochs} epochs of the schedule's first {a.stages} stage(s) "
        f"(of 8; 3280 epochs in the paper), batch {a.batch_size}, NLL = -L_{a.eval_k}, seeds {len(seeds)}")
    tab = table(done)
    payload = {
        "benchmark": NAME, "command": command_line(argv), "quick": a.quick, "setting": setting,
        "budget": {"layers": a.layers, "objectives": a.objectives, "objectives_2_layer": a.objectives_2,
                   "stages": a.stages, "epochs": a.epochs,
                   "schedule": [{"epochs": n, "lr": lr} for n, lr in sched], "batch_size": a.batch_size,
                   "adam_eps": a.adam_eps, "train_images": len(train_x), "test_images": len(test_x),
                   "data": source, "seeds": seeds, **settings, "wall_seconds_this_invocation": wall,
                   "shard": a.shard},
        "machine": machine_info(str(device)), "device": str(device), **threads,
        "table": tab, "published": {f"{L}/{k}": v for (L, k), v in burda.PUBLISHED.items()},
        "published_note": "Burda et al. (2016) Table 1, MNIST: 3280 epochs, full data, NLL = -L_5000",
        "runs": done,
    }
    payload["orderings"] = orderings(tab)
    jpath, ppath = output_paths(a.out, NAME, a.quick)
    mpath = jpath.with_suffix(".md")
    write_json(jpath, payload)
    mpath.write_text(markdown(tab, payload))
    plot(tab, ppath, f"Burda et al. Table 1: {setting}")
    print(mpath.read_text())
    print(f"wrote {jpath}, {mpath} and {ppath}")
    return payload


def cli(argv=None) -> int:
    return run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
