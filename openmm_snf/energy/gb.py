"""Exact per-sample energies of generalized-Born forces, vectorized over a batch in torch (float64).

GB energies are many-body (each Born radius depends on all atoms), so they cannot be split into
per-copy terms inside OpenMM; here they are recomputed from the force's parameters:

* :class:`CustomGBTerm` evaluates any CustomGBForce (the OBC1, OBC2, GBn, GBn2 models that
  ``openmm.app`` builds) from its computed values and energy terms with the Lepton-expression
  evaluator, over all ordered pairs of a molecule: cost O(B * n_atoms^2) per call.
* :class:`GBSAOBCTerm` evaluates OpenMM's native GBSAOBCForce (OBC2 with the ACE surface term).

Like the terms of ``terms.py``, they take coordinates (3, n_atoms, B) and return energies (B,) kJ/mol.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .expression import parse, tabulated_function

__all__ = ["CustomGBTerm", "GBSAOBCTerm", "tabulated_functions"]

_SINGLE, _PAIR, _PAIR_ALL = 0, 1, 2  # CustomGBForce computation types
ONE_4PI_EPS0 = 138.93545764438198  # kJ/mol nm / e^2, OpenMM's value


def _pairs(n: int, exclusions: set, ordered: bool, skip_excluded: bool) -> np.ndarray:
    rows = [(i, j) for i in range(n) for j in range(n)
            if i != j and (ordered or i < j) and not (skip_excluded and (min(i, j), max(i, j)) in exclusions)]
    return np.array(rows, dtype=np.int64).reshape(-1, 2)


def tabulated_functions(force) -> dict:
    """name -> torch callable for the tabulated functions of a custom force (discrete ones only)."""
    count = force.getNumTabulatedFunctions() if hasattr(force, "getNumTabulatedFunctions") else 0
    return {force.getTabulatedFunctionName(k): tabulated_function(force.getTabulatedFunction(k))
            for k in range(count)}


class CustomGBTerm:
    """Energy of a CustomGBForce with NoCutoff or CutoffNonPeriodic (discrete tabulated functions only)."""

    def __init__(self, force):
        n = force.getNumParticles()
        names = [force.getPerParticleParameterName(k) for k in range(force.getNumPerParticleParameters())]
        table = np.array([list(force.getParticleParameters(i)) for i in range(n)], dtype=np.float64).reshape(n, -1)
        self.params = {name: torch.as_tensor(table[:, k]).unsqueeze(-1) for k, name in enumerate(names)}
        self.globals = {force.getGlobalParameterName(g): force.getGlobalParameterDefaultValue(g)
                        for g in range(force.getNumGlobalParameters())}
        functions = tabulated_functions(force)
        self.values = []
        for k in range(force.getNumComputedValues()):
            name, text, kind = force.getComputedValueParameters(k)
            self.values.append((name, parse(text, functions=functions), kind))
        self.energies = [(parse(t, functions=functions), kind) for t, kind in
                         (force.getEnergyTermParameters(k) for k in range(force.getNumEnergyTerms()))]
        exclusions = {tuple(sorted(force.getExclusionParticles(e))) for e in range(force.getNumExclusions())}
        self.pair_index = {(ordered, skip): torch.as_tensor(_pairs(n, exclusions, ordered, skip))
                           for ordered in (True, False) for skip in (True, False)}
        # distances are computed once per unordered pair i < j (never i == i: sqrt's gradient at 0 is
        # infinite, which would turn autograd's gradients into nan); each pair list reads them by position
        self.upper = self.pair_index[(False, False)]
        position = {(int(i), int(j)): k for k, (i, j) in enumerate(self.upper.tolist())}
        self.pair_position = {key: torch.as_tensor([position[(min(i, j), max(i, j))] for i, j in index.tolist()],
                                                   dtype=torch.long)
                              for key, index in self.pair_index.items()}
        self.cutoff = None if force.getNonbondedMethod() == 0 else force.getCutoffDistance()._value
        self.n = n

    def _pair_values(self, distances, known, ordered, skip, needed):
        """r (P, B) and the per-pair variables (suffixes 1 and 2) in ``needed``, for the chosen pair list.

        ``distances`` (n*(n-1)/2, B) holds the distances of the pairs i < j of the batch.
        """
        index = self.pair_index[(ordered, skip)].to(distances.device)
        i, j = index[:, 0], index[:, 1]
        r = distances[self.pair_position[(ordered, skip)].to(distances.device)]
        values = dict(self.globals, r=r)
        for name, value in known.items():
            for suffix, index in (("1", i), ("2", j)):
                if name + suffix in needed:
                    values[name + suffix] = value[index]
        return values, i, r

    def _cut(self, term, r):
        term = torch.as_tensor(term, dtype=r.dtype, device=r.device).expand_as(r)
        return term if self.cutoff is None else torch.where(r < self.cutoff, term, torch.zeros_like(r))

    def __call__(self, c):
        batch = c.shape[2]
        known = {k: v.to(c.device) for k, v in self.params.items()}
        single = {"x": c[0], "y": c[1], "z": c[2]}
        upper = self.upper.to(c.device)
        d = c.index_select(1, upper[:, 1]) - c.index_select(1, upper[:, 0])
        distances = torch.sqrt((d * d).sum(0))
        for name, expression, kind in self.values:
            if kind == _SINGLE:
                value = expression.evaluate({**self.globals, **known, **single})
            else:
                values, i, r = self._pair_values(distances, known, True, kind == _PAIR, expression.variables)
                term = self._cut(expression.evaluate(values), r)
                value = torch.zeros(self.n, batch, dtype=c.dtype, device=c.device).index_add_(0, i, term)
            known[name] = torch.as_tensor(value, dtype=c.dtype, device=c.device).expand(self.n, batch)
        energy = torch.zeros(batch, dtype=c.dtype, device=c.device)
        for expression, kind in self.energies:
            if kind == _SINGLE:
                term = expression.evaluate({**self.globals, **known, **single})
                energy = energy + torch.as_tensor(term, dtype=c.dtype, device=c.device).expand(self.n, batch).sum(0)
            else:
                values, _, r = self._pair_values(distances, known, False, kind == _PAIR, expression.variables)
                energy = energy + self._cut(expression.evaluate(values), r).sum(0)
        return energy


class GBSAOBCTerm:
    """Energy of OpenMM's GBSAOBCForce (OBC2 Born radii, pair and self polar terms, ACE non-polar term).

    Only NoCutoff: with a cutoff the force is evaluated by the sequential fallback instead.
    """

    ALPHA, BETA, GAMMA, OFFSET, PROBE = 1.0, 0.8, 4.85, 0.009, 0.14

    def __init__(self, force):
        if force.getNonbondedMethod() != 0:
            raise NotImplementedError("GBSAOBCForce with a cutoff")
        rows = [[getattr(v, "_value", v) for v in force.getParticleParameters(i)]
                for i in range(force.getNumParticles())]
        charge, radius, scale = (torch.as_tensor(np.array(c, dtype=np.float64)).unsqueeze(-1) for c in zip(*rows))
        self.charge, self.radius = charge, radius
        self.offset_radius = radius - self.OFFSET
        self.scaled_radius = self.offset_radius * scale
        self.prefactor = -ONE_4PI_EPS0 * (1.0 / force.getSoluteDielectric() - 1.0 / force.getSolventDielectric())
        self.surface = 4.0 * math.pi * getattr(force.getSurfaceAreaEnergy(), "_value", force.getSurfaceAreaEnergy())
        self.ordered = torch.as_tensor(_pairs(len(rows), set(), True, False))

    def born_radii(self, c):
        """(n, B) Born radii in nm."""
        i, j = self.ordered[:, 0].to(c.device), self.ordered[:, 1].to(c.device)
        d = c[:, j] - c[:, i]
        r = torch.sqrt((d * d).sum(0))
        or_i, sr_j = self.offset_radius.to(c.device)[i], self.scaled_radius.to(c.device)[j]
        l_inv = 1.0 / torch.maximum(or_i.expand_as(r), (r - sr_j).abs())
        u_inv = 1.0 / (r + sr_j)
        term = (l_inv - u_inv + 0.25 * r * (u_inv ** 2 - l_inv ** 2) + 0.5 / r * torch.log(u_inv / l_inv)
                + 0.25 * sr_j ** 2 / r * (l_inv ** 2 - u_inv ** 2))
        term = term + torch.where(or_i < sr_j - r, 2.0 * (1.0 / or_i - l_inv), torch.zeros_like(r))
        term = torch.where(or_i < r + sr_j, term, torch.zeros_like(r))
        total = torch.zeros(len(self.radius), c.shape[2], dtype=c.dtype, device=c.device).index_add_(0, i, term)
        offset_radius, radius = self.offset_radius.to(c.device), self.radius.to(c.device)
        psi = 0.5 * offset_radius * total
        return 1.0 / (1.0 / offset_radius - torch.tanh(self.ALPHA * psi - self.BETA * psi ** 2
                                                       + self.GAMMA * psi ** 3) / radius)

    def __call__(self, c):
        born = self.born_radii(c)
        q, radius = self.charge.to(c.device), self.radius.to(c.device)
        i, j = self.ordered[:, 0].to(c.device), self.ordered[:, 1].to(c.device)
        upper = i < j
        i, j = i[upper], j[upper]
        d = c[:, j] - c[:, i]
        r2 = (d * d).sum(0)
        bb = born[i] * born[j]
        pair = (q[i] * q[j] / torch.sqrt(r2 + bb * torch.exp(-r2 / (4.0 * bb)))).sum(0)
        self_term = 0.5 * (q * q / born).sum(0)
        ace = (self.surface * (radius + self.PROBE) ** 2 * (radius / born) ** 6).sum(0)
        return self.prefactor * (pair + self_term) + ace
