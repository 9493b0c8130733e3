"""Closed-form evidence of scalar linear-Gaussian networks (test oracle, numpy only).

Each variable v = b_v + sum_p w_vp * parent_p + sd_v * eps_v. Stacking latents and
observations into one vector y = M (b + D eps) with M = (I - W)^-1 gives the joint
Gaussian; the evidence is the marginal density of the observed coordinates.
"""

import math

import numpy as np


class LinearGaussian:
    """A scalar linear-Gaussian DAG declared node by node in topological order."""

    def __init__(self):
        self.names = []
        self.parents = {}
        self.bias = {}
        self.sd = {}

    def add(self, name, parents=None, bias=0.0, sd=1.0):
        """Add ``name = bias + sum(w * parent) + sd * eps``; ``parents`` maps name -> weight."""
        self.names.append(name)
        self.parents[name] = dict(parents or {})
        self.bias[name] = float(bias)
        self.sd[name] = float(sd)

    def moments(self):
        n = len(self.names)
        idx = {v: i for i, v in enumerate(self.names)}
        W = np.zeros((n, n))
        for v, ps in self.parents.items():
            for p, w in ps.items():
                W[idx[v], idx[p]] = w
        M = np.linalg.inv(np.eye(n) - W)
        b = np.array([self.bias[v] for v in self.names])
        D = np.diag([self.sd[v] for v in self.names])
        return idx, M @ b, M @ D @ D @ M.T

    def log_evidence(self, observed: dict) -> float:
        """log p(observed) with ``observed`` mapping names to values."""
        idx, mean, cov = self.moments()
        o = [idx[k] for k in observed]
        x = np.array([observed[k] for k in observed], dtype=float)
        mu, S = mean[o], cov[np.ix_(o, o)]
        d = x - mu
        _, logdet = np.linalg.slogdet(S)
        return float(-0.5 * (d @ np.linalg.solve(S, d) + logdet + len(o) * math.log(2 * math.pi)))

    def posterior(self, observed: dict, names):
        """Exact posterior means and covariance of ``names`` given ``observed``."""
        idx, mean, cov = self.moments()
        o = [idx[k] for k in observed]
        h = [idx[k] for k in names]
        x = np.array([observed[k] for k in observed], dtype=float)
        Soo = cov[np.ix_(o, o)]
        Sho = cov[np.ix_(h, o)]
        m = mean[h] + Sho @ np.linalg.solve(Soo, x - mean[o])
        C = cov[np.ix_(h, h)] - Sho @ np.linalg.solve(Soo, Sho.T)
        return m, C
