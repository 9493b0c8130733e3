"""One training loop for every method: MP-VI, MP-RWS and QEM on any estimator.

:func:`fit` runs ``iterations`` steps of a *method* (an object, not a flag) on an
estimator (:class:`tmcgraph.TMC` for the massively parallel methods, :class:`tmcgraph.IWAE`
for their "global" importance-sampling versions, or a TMC whose proposal groups latents
with :class:`tmcgraph.sampling.group.Group`). Each step draws fresh particles with the
seed ``iteration_seed(seed, i)``, so a run is reproducible and a resumed run draws
exactly the particles the uninterrupted one would have.

Methods (with ``theta`` the model's and ``phi`` the proposal's parameters, ``log P`` the
estimator's log P_TMC at the step's particles and ``pi`` the TMC-reweighted posterior):

:class:`MPVI`
    Massively parallel variational inference: ascend ``log P`` with reparameterised
    gradients w.r.t. ``theta`` and ``phi`` (Adam; :mod:`tmcgraph.infer.objectives`, so
    ``grad="stl"``/``"dregs"`` work too).
:class:`MPRWS`
    Massively parallel reweighted wake-sleep (Heap, Leech & Aitchison, UAI 2023): the
    model by ``grad_theta log P`` at fixed particles, the proposal by the wake-phase
    objective ``sum_j sum_k pi(k_j = k) log q_j(z_j^k)`` (Adam; :mod:`tmcgraph.infer.rws`).
:class:`tmcgraph.infer.qem.QEM`
    Moment matching of an exponential-family proposal to the posterior moments of each
    step (no gradients; :mod:`tmcgraph.infer.qem`).

Every step returns the objective ``log P`` of its particles (for MP-VI before the
update), recorded in the history with the step's wall time. Checkpoints hold the model
and proposal parameters, the method's state (the optimiser's moments), the history and
the run's configuration, are written atomically and read with
``torch.load(..., weights_only=True)``; resuming from a checkpoint whose configuration
differs (method, learning rate, estimator, K, seed, parameter shapes, data) is refused.
A run is bit-for-bit resumable when its estimator does not switch between eager and
compiled execution mid-run (``compile=False`` or ``True``).
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..errors import TMCGraphError
from .estimators import TMC
from .objectives import get_objective, objective
from .rws import RWS

__all__ = ["Method", "GradientMethod", "MPVI", "MPRWS", "FitResult", "fit", "iteration_seed", "load_history"]

_FORMAT = "tmcgraph.fit/1"


def iteration_seed(seed: int, iteration: int) -> int:
    """The particle seed of step ``iteration`` of a run seeded with ``seed`` (independent of resumption)."""
    return (int(seed) * 1_000_003 + int(iteration)) % (1 << 62)


class Method:
    """A training method: how one step changes the estimator's parameters.

    Subclasses implement :meth:`start` (fresh state for an estimator) and :meth:`step`
    (one update, returning the step's objective ``log P``), and, when they keep state
    between steps, :meth:`state_dict` / :meth:`load_state_dict`.
    """

    #: Name used in histories and configurations.
    name = ""

    def __init__(self, lr: float):
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (lr > 0 and math.isfinite(lr)):
            raise TMCGraphError(f"{type(self).__name__}: lr must be a positive number, got {lr!r}")
        self.lr = float(lr)

    def config(self) -> dict:
        """What identifies the method in a checkpoint (name and hyper-parameters)."""
        return {"method": self.name, "lr": self.lr}

    def start(self, estimator: TMC) -> None:
        """Set up fresh state for training ``estimator``."""

    def step(self, estimator: TMC, data: dict, seed: int) -> float:
        """One update on particles drawn with ``seed``; returns the objective log P of those particles."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        """State kept between steps (tensors and plain values)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`."""

    def __repr__(self):
        return f"{type(self).__name__}(lr={self.lr})"


class GradientMethod(Method):
    """A method that steps an Adam optimiser over the model's and the proposal's parameters."""

    def start(self, estimator: TMC) -> None:
        params = list(estimator.model.parameters()) + list(estimator.proposal.parameters())
        params = [p for p in params if p.requires_grad]
        if not params:
            raise TMCGraphError(f"{self.name}: the model and the proposal register no trainable parameters; "
                                "declare their callables as nn.Modules with nn.Parameters")
        self.params = params
        self.optimizer = torch.optim.Adam(params, lr=self.lr)

    def _update(self, loss_backward: Callable) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss_backward()
        self.optimizer.step()

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])


class MPVI(GradientMethod):
    """Massively parallel VI: Adam ascent of log P_TMC with reparameterised gradients.

    Args:
        lr: Adam's learning rate.
        grad: Gradient estimator (``"reparam"``, ``"stl"``, ``"dregs"`` or an
            :class:`~tmcgraph.infer.objectives.Objective`).
    """

    name = "MP-VI"

    def __init__(self, lr: float = 0.01, grad="reparam"):
        super().__init__(lr)
        self.grad = get_objective(grad)

    def config(self) -> dict:
        return {**super().config(), "grad": self.grad.name}

    def step(self, estimator: TMC, data: dict, seed: int) -> float:
        loss = objective(estimator, data, self.grad, seed=seed)
        self._update(loss.backward)
        return float(loss.value.detach().sum())

    def __repr__(self):
        return f"MPVI(lr={self.lr}, grad={self.grad.name!r})"


class MPRWS(GradientMethod):
    """Massively parallel reweighted wake-sleep: Adam on the wake-theta and wake-phi surrogates.

    Args:
        lr: Adam's learning rate.
    """

    name = "MP-RWS"

    def step(self, estimator: TMC, data: dict, seed: int) -> float:
        r = RWS(estimator)(data, seed=seed)
        self._update(r.loss.backward)
        return float(r.log_evidence)


@dataclass
class FitResult:
    """What :func:`fit` returns.

    Attributes:
        history: One record per iteration: ``iteration``, ``objective`` (log P of that
            step's particles), ``seconds`` (wall time of the step), ``cpu_seconds``
            (process CPU time of the step) and ``elapsed`` (cumulative wall seconds of
            the run, resumed parts included).
        config: The run's configuration (what a checkpoint must match).
        resumed_from: Iterations loaded from a checkpoint (0 for a fresh run).
    """

    history: list
    config: dict
    resumed_from: int = 0

    @property
    def objectives(self) -> list:
        """The objective of every iteration."""
        return [h["objective"] for h in self.history]

    def final_objective(self, last: int = 100) -> float:
        """Mean objective over the last ``last`` iterations."""
        obj = self.objectives[-last:]
        if not obj:
            raise TMCGraphError("the run has no iterations")
        return sum(obj) / len(obj)


def _fingerprint(t: torch.Tensor) -> list:
    t = torch.as_tensor(t).detach().to(torch.float64)
    return [list(t.shape), round(float(t.sum()), 6), round(float((t * t).sum()), 6)]


def _config(estimator: TMC, data: dict, method: Method, seed: int) -> dict:
    shapes = {f"model.{k}": list(v.shape) for k, v in estimator.model.state_dict().items()}
    shapes.update({f"proposal.{k}": list(v.shape) for k, v in estimator.proposal.state_dict().items()})
    return {
        "method": method.config(),
        "estimator": type(estimator).__name__,
        "K": int(estimator.K),
        "seed": int(seed),
        "parameters": shapes,
        "data": {k: _fingerprint(v) for k, v in sorted(data.items())},
    }


def _atomic_write(path: pathlib.Path, write: Callable) -> None:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _save_checkpoint(path, estimator, method, config, history) -> None:
    state = {
        "format": _FORMAT,
        "config": config,
        "iteration": len(history),
        "model": estimator.model.state_dict(),
        "proposal": estimator.proposal.state_dict(),
        "method": method.state_dict(),
        "history": history,
    }
    _atomic_write(path, lambda tmp: torch.save(state, tmp))


def _differences(a, b, prefix="") -> list:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            if k not in a or k not in b:
                out.append(f"{prefix}{k}")
            else:
                out.extend(_differences(a[k], b[k], f"{prefix}{k}."))
        return out
    return [] if a == b else [f"{prefix.rstrip('.')}: checkpoint {b!r}, this run {a!r}"]


def _load_checkpoint(path, estimator, method, config) -> list:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise TMCGraphError(f"checkpoint {path} cannot be read: {e}") from e
    if not isinstance(state, dict) or state.get("format") != _FORMAT:
        raise TMCGraphError(f"{path} is not a tmcgraph.infer.fit checkpoint")
    diff = _differences(config, state["config"])
    if diff:
        raise TMCGraphError(
            f"checkpoint {path} was written by a different configuration ({'; '.join(diff)}); "
            "remove it or pass another checkpoint path"
        )
    estimator.model.load_state_dict(state["model"])
    estimator.proposal.load_state_dict(state["proposal"])
    method.load_state_dict(state["method"])
    return list(state["history"])


def _progress(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, desc="fit", leave=False)


def load_history(path) -> dict:
    """Read a history JSON written by :func:`fit` (bounded to 256 MiB): ``{"config", "history"}``."""
    path = pathlib.Path(path)
    if path.stat().st_size > 256 << 20:
        raise TMCGraphError(f"{path} is larger than 256 MiB; not a fit history")
    with open(path) as f:
        return json.load(f)


def fit(
    estimator: TMC,
    data: dict,
    method: Method,
    iterations: int = 1000,
    seed: int = 0,
    progress: bool = True,
    checkpoint=None,
    checkpoint_every: int = 100,
    history=None,
    callback: Optional[Callable] = None,
) -> FitResult:
    """Train ``estimator``'s parameters with ``method`` for ``iterations`` steps.

    Args:
        estimator: A :class:`tmcgraph.TMC` or :class:`tmcgraph.IWAE` (its model and
            proposal are updated in place).
        data: Observed name -> tensor.
        method: :class:`MPVI`, :class:`MPRWS`, :class:`tmcgraph.infer.qem.QEM` or any
            :class:`Method`.
        iterations: Total steps of the run (a resumed run does the remaining ones).
        seed: Seeds step i's particles with :func:`iteration_seed` ``(seed, i)``.
        progress: Show a ``tqdm`` bar with the running objective (mean of the last 100)
            when tqdm is installed; nothing otherwise.
        checkpoint: Path of a checkpoint: resumed from when it exists, written every
            ``checkpoint_every`` steps and at the end.
        checkpoint_every: Steps between checkpoints.
        history: Path of a JSON file for the configuration and the history (written with
            each checkpoint and at the end).
        callback: ``callback(iteration, record)`` after every step.

    Returns:
        The :class:`FitResult`.

    Raises:
        TMCGraphError: bad arguments, a checkpoint of another configuration or with more
            iterations than asked for, or a non-finite objective (the step is named).
    """
    if not isinstance(estimator, TMC):
        raise TMCGraphError(f"fit needs a tmcgraph estimator (TMC or IWAE), got {type(estimator).__name__}")
    if not isinstance(method, Method):
        raise TMCGraphError(f"method must be a tmcgraph.infer.fit.Method (MPVI, MPRWS, QEM), got {method!r}")
    for arg, v in (("iterations", iterations), ("checkpoint_every", checkpoint_every)):
        if isinstance(v, bool) or not isinstance(v, int) or v < (0 if arg == "iterations" else 1):
            raise TMCGraphError(f"fit: {arg} must be a {'non-negative' if arg == 'iterations' else 'positive'} "
                                f"integer, got {v!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TMCGraphError(f"fit: seed must be an integer, got {seed!r}")
    method.start(estimator)
    config = _config(estimator, data, method, seed)
    records: list = []
    if checkpoint is not None and pathlib.Path(checkpoint).exists():
        records = _load_checkpoint(checkpoint, estimator, method, config)
        if len(records) > iterations:
            raise TMCGraphError(f"checkpoint {checkpoint} holds {len(records)} iterations, more than the "
                                f"{iterations} asked for")
    start = len(records)
    elapsed = records[-1]["elapsed"] if records else 0.0
    bar = _progress(iterations, start, progress)

    def save():
        if checkpoint is not None:
            _save_checkpoint(checkpoint, estimator, method, config, records)
        if history is not None:
            _atomic_write(history, lambda tmp: pathlib.Path(tmp).write_text(
                json.dumps({"config": config, "history": records}, allow_nan=False) + "\n"))

    try:
        for i in range(start, iterations):
            t0, c0 = time.perf_counter(), time.process_time()
            value = method.step(estimator, data, iteration_seed(seed, i))
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            if not math.isfinite(value):
                raise TMCGraphError(f"{method!r}: the objective of iteration {i} is {value}; the run diverged")
            elapsed += dt
            rec = {"iteration": i, "objective": float(value), "seconds": dt, "cpu_seconds": dc, "elapsed": elapsed}
            records.append(rec)
            if callback is not None:
                callback(i, rec)
            if bar is not None:
                bar.update(1)
                if i % 10 == 0 or i == iterations - 1:
                    recent = [r["objective"] for r in records[-100:]]
                    bar.set_postfix(objective=f"{sum(recent) / len(recent):.3f}")
            if (i + 1) % checkpoint_every == 0 and i + 1 < iterations:
                save()
    finally:
        if bar is not None:
            bar.close()
    save()
    return FitResult(records, config, start)
