"""Two real hierarchical models, declared with the public API: household radon and NYC bus breakdowns.

The models of the massively parallel importance-sampling benchmarks (Heap, Leech &
Aitchison, "Massively parallel reweighted wake-sleep", UAI 2023; Heap, Bowyer & Aitchison,
"Massively parallel expectation maximization for approximate posteriors", AABI 2025),
with the data of :mod:`tmcgraph.data.hierarchical`.

**Radon** (plates States > Zips)::

    global_mean ~ N(0, 1)                 global_log_sigma ~ N(0, 1)
    per state s:   state_mean_s ~ N(global_mean, exp(global_log_sigma))
                   state_log_sigma_s, beta_u_s, beta_basement_s ~ N(0, 1)
    per zip z:     log_radon_sz ~ N(state_mean_s + basement_sz beta_basement_s
                                    + log_uranium_sz beta_u_s, exp(state_log_sigma_s))

**Bus breakdown** (plates Year > Borough > ID; R run types, C companies)::

    psi ~ N(0, I_R)   phi ~ N(0, I_C)   sigma_beta, mu_beta ~ N(0, 1)
    per year y:      beta_y ~ N(mu_beta, exp(sigma_beta)),  sigma_alpha_y ~ N(0, 1)
    per borough b:   alpha_yb ~ N(beta_y, exp(sigma_alpha_y))
    per record i:    delay_ybi ~ Bernoulli(logits = alpha_yb + phi . company_ybi + psi . run_type_ybi)

Covariates (``basement``, ``log_uranium``; the one-hot ``run_type`` and ``company``) are
part of the model: its likelihood callables hold them as buffers, so a model is built for
a given set of plate elements (:func:`radon_model` on the training zips for fitting, on
all zips for prediction).

**Proposals** (:func:`radon_proposal`, :func:`bus_proposal`) are mean-field Normals,
:class:`tmcgraph.infer.qem.MeanFieldNormal`: a learnable loc and log-scale per latent and
plate element (and vector entry), initialised to N(0, 1). With ``groups=True`` (default)
latents at the same level share one sample dim (:class:`tmcgraph.sampling.group.Group`):
radon's two globals, and its four per-state latents; the bus model's four globals and
its two per-year latents. Without groups radon's likelihood, with four latent parents, is
a K^4 grid per zip (the bus likelihood K^3 per record); with them it is K (radon) or K^2
(bus).

**Held-out elements.** In both models the held-out elements (radon: zips 150..299 of
every state; bus: the test records) lie in the innermost plate, where no latent lives, so
the proposal fitted on the training elements is a complete proposal for the model over
all elements (:func:`predictive_proposal` copies it; latents of plate elements not seen
in training, where a model has them, would get N(``new_loc``, exp(``new_log_scale``)^2),
the initial proposal).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.distributions import Bernoulli, Independent, Normal

from ..errors import TMCGraphError
from ..infer.qem import MeanFieldNormal
from ..model import Model, Proposal
from ..sampling.group import Group

__all__ = [
    "RADON_LATENTS",
    "BUS_LATENTS",
    "radon_model",
    "radon_proposal",
    "radon",
    "bus_model",
    "bus_proposal",
    "bus",
    "predictive_proposal",
    "simulate_radon",
    "simulate_bus",
]

#: Radon latents -> (plates, group with ``groups=True``).
RADON_LATENTS = {
    "global_mean": ((), "globals"),
    "global_log_sigma": ((), "globals"),
    "state_mean": (("States",), "states"),
    "state_log_sigma": (("States",), "states"),
    "beta_u": (("States",), "states"),
    "beta_basement": (("States",), "states"),
}

#: Bus-breakdown latents -> (plates, group with ``groups=True``).
BUS_LATENTS = {
    "psi": ((), "globals"),
    "phi": ((), "globals"),
    "sigma_beta": ((), "globals"),
    "mu_beta": ((), "globals"),
    "beta": (("Year",), "years"),
    "sigma_alpha": (("Year",), "years"),
    "alpha": (("Year", "Borough"), None),
}


def _std_normal():
    return Normal(0.0, 1.0)


def _covariate(name: str, t, ndim: int) -> torch.Tensor:
    t = torch.as_tensor(t)
    if t.dim() != ndim or (not t.is_floating_point() and t.dtype not in (torch.uint8, torch.bool, torch.int64,
                                                                         torch.int32)):
        raise TMCGraphError(f"covariate {name!r} must be a {ndim}-d numeric tensor, got shape {tuple(t.shape)} "
                            f"dtype {t.dtype}")
    t = t.to(torch.get_default_dtype() if not t.is_floating_point() else t.dtype)
    if not bool(torch.isfinite(t).all()):
        raise TMCGraphError(f"covariate {name!r} has non-finite values")
    return t


class _RadonLikelihood(nn.Module):
    """log_radon ~ N(state_mean + basement beta_basement + log_uranium beta_u, exp(state_log_sigma))."""

    def __init__(self, basement: torch.Tensor, log_uranium: torch.Tensor):
        super().__init__()
        self.register_buffer("basement", basement)
        self.register_buffer("log_uranium", log_uranium)

    def forward(self, state_mean, state_log_sigma, beta_u, beta_basement):
        loc = state_mean + self.basement * beta_basement + self.log_uranium * beta_u
        return Normal(loc, state_log_sigma.exp(), validate_args=False)


def radon_model(basement, log_uranium) -> Model:
    """The radon model for the zips of ``basement`` and ``log_uranium`` (``[States, Zips]`` each)."""
    basement = _covariate("basement", basement, 2)
    log_uranium = _covariate("log_uranium", log_uranium, 2)
    if basement.shape != log_uranium.shape:
        raise TMCGraphError(f"basement {tuple(basement.shape)} and log_uranium {tuple(log_uranium.shape)} "
                            "must have the same [States, Zips] shape")
    S, Z = basement.shape
    m = Model()
    m.plate("States", size=S)
    m.plate("Zips", size=Z)
    m.latent("global_mean", _std_normal)
    m.latent("global_log_sigma", _std_normal)
    m.latent("state_mean", lambda global_mean, global_log_sigma: Normal(global_mean, global_log_sigma.exp()),
             plate="States")
    for name in ("state_log_sigma", "beta_u", "beta_basement"):
        m.latent(name, _std_normal, plate="States")
    m.observed("log_radon", _RadonLikelihood(basement, log_uranium), plate=("States", "Zips"))
    return m


def _mean_field(model: Model, latents: dict, groups: bool, events: Optional[dict] = None) -> Proposal:
    q = Proposal(model)
    for name, (plates, group) in latents.items():
        shape = [model.plates[p].size for p in plates] + list((events or {}).get(name, ()))
        n_event = len((events or {}).get(name, ()))
        q.latent(name, MeanFieldNormal(shape, event_dims=n_event),
                 coupling=Group(group) if groups and group else None)
    return q


def radon_proposal(model: Model, groups: bool = True) -> Proposal:
    """Mean-field Normal proposal for :func:`radon_model` (groups: see the module docstring)."""
    return _mean_field(model, RADON_LATENTS, groups)


def radon(data: dict, groups: bool = True) -> tuple:
    """``(model, proposal, observed)`` for a radon data dict (``log_radon``, ``basement``, ``log_uranium``)."""
    m = radon_model(data["basement"], data["log_uranium"])
    return m, radon_proposal(m, groups), {"log_radon": data["log_radon"]}


class _BusLikelihood(nn.Module):
    """delay ~ Bernoulli(logits = alpha + phi . company + psi . run_type)."""

    def __init__(self, run_type: torch.Tensor, company: torch.Tensor):
        super().__init__()
        self.register_buffer("run_type", run_type)
        self.register_buffer("company", company)

    @staticmethod
    def _dot(w: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
        # w: [..., 1, 1, 1, D] (a global vector at the record plates' positions); onehot: [Y, B, N, D].
        return torch.matmul(onehot.to(w.dtype), w[..., 0, :].unsqueeze(-1)).squeeze(-1)

    def forward(self, alpha, phi, psi):
        logits = alpha + self._dot(phi, self.company) + self._dot(psi, self.run_type)
        return Bernoulli(logits=logits, validate_args=False)


def bus_model(run_type, company) -> Model:
    """The bus-breakdown model for the records of ``run_type`` ``[Y, B, N, R]`` and ``company`` ``[Y, B, N, C]``."""
    run_type = _covariate("run_type", run_type, 4)
    company = _covariate("company", company, 4)
    if run_type.shape[:3] != company.shape[:3]:
        raise TMCGraphError(f"run_type {tuple(run_type.shape)} and company {tuple(company.shape)} must share "
                            "their [Year, Borough, ID] dims")
    Y, B, N, R = run_type.shape
    C = company.shape[-1]
    m = Model()
    m.plate("Year", size=Y)
    m.plate("Borough", size=B)
    m.plate("ID", size=N)
    m.latent("psi", lambda: Independent(Normal(torch.zeros(R), 1.0), 1))
    m.latent("phi", lambda: Independent(Normal(torch.zeros(C), 1.0), 1))
    m.latent("sigma_beta", _std_normal)
    m.latent("mu_beta", _std_normal)
    m.latent("beta", lambda mu_beta, sigma_beta: Normal(mu_beta, sigma_beta.exp()), plate="Year")
    m.latent("sigma_alpha", _std_normal, plate="Year")
    m.latent("alpha", lambda beta, sigma_alpha: Normal(beta, sigma_alpha.exp()), plate=("Year", "Borough"))
    m.observed("delay", _BusLikelihood(run_type, company), plate=("Year", "Borough", "ID"))
    return m


def bus_proposal(model: Model, groups: bool = True) -> Proposal:
    """Mean-field Normal proposal for :func:`bus_model` (groups: see the module docstring)."""
    lik = model["delay"].fn
    events = {"psi": (lik.run_type.shape[-1],), "phi": (lik.company.shape[-1],)}
    return _mean_field(model, BUS_LATENTS, groups, events)


def bus(data: dict, groups: bool = True) -> tuple:
    """``(model, proposal, observed)`` for a bus data dict (``delay``, ``run_type``, ``company``)."""
    m = bus_model(data["run_type"], data["company"])
    return m, bus_proposal(m, groups), {"delay": data["delay"]}


def predictive_proposal(fitted: Proposal, target: Proposal, new_loc: float = 0.0,
                        new_log_scale: float = 0.0) -> Proposal:
    """Copy a fitted mean-field proposal into ``target`` (a proposal of the model over all elements).

    Each latent's :class:`~tmcgraph.infer.qem.MeanFieldNormal` keeps the fitted loc and
    log-scale for the plate elements both share; elements only ``target`` has (new plate
    elements) get N(``new_loc``, exp(``new_log_scale``)^2). Returns ``target``.
    """
    for name, v in target.variables.items():
        src = fitted[name].fn if name in fitted else None
        if not isinstance(v.fn, MeanFieldNormal) or not isinstance(src, MeanFieldNormal):
            raise TMCGraphError(f"predictive_proposal: {name!r} is not a MeanFieldNormal in both proposals")
        new = src.resized(v.fn.loc.shape, new_loc, new_log_scale)
        with torch.no_grad():
            v.fn.loc.copy_(new.loc)
            v.fn.log_scale.copy_(new.log_scale)
    return target


def _draws(seed: int):
    return torch.Generator().manual_seed(int(seed))


def simulate_radon(states: int = 4, zips: int = 300, seed: int = 0) -> dict:
    """Synthetic radon-shaped data drawn from the model's prior (``float32 [states, zips]`` arrays)."""
    g = _draws(seed)
    n = lambda *s: torch.randn(*s, generator=g, dtype=torch.float32)  # noqa: E731
    basement = (torch.rand(states, zips, generator=g) < 0.6).float()
    log_uranium = 0.4 * n(states, zips) - 0.5
    gm, gls = n(()), -1.0 + 0.3 * n(())
    sm = gm + gls.exp() * n(states)
    sls = -0.3 + 0.2 * n(states)
    bu, bb = n(states), n(states)
    loc = sm[:, None] + basement * bb[:, None] + log_uranium * bu[:, None]
    log_radon = loc + sls.exp()[:, None] * n(states, zips)
    return {"log_radon": log_radon, "basement": basement, "log_uranium": log_uranium}


def simulate_bus(years: int = 2, boroughs: int = 3, records: int = 150, run_types: int = 8, companies: int = 10,
                 seed: int = 0) -> dict:
    """Synthetic bus-shaped data drawn from the model's prior (float32 one-hots and 0/1 delays)."""
    g = _draws(seed)
    shape = (years, boroughs, records)
    rt = torch.nn.functional.one_hot(torch.randint(run_types, shape, generator=g), run_types).float()
    co = torch.nn.functional.one_hot(torch.randint(companies, shape, generator=g), companies).float()
    f32 = torch.float32
    psi, phi = torch.randn(run_types, generator=g, dtype=f32), torch.randn(companies, generator=g, dtype=f32)
    beta = torch.randn(years, generator=g, dtype=f32)
    alpha = beta[:, None] + 0.5 * torch.randn(years, boroughs, generator=g, dtype=f32)
    logits = alpha[:, :, None] + co @ phi + rt @ psi
    delay = (torch.rand(shape, generator=g) < torch.sigmoid(logits)).float()
    return {"delay": delay, "run_type": rt, "company": co}
