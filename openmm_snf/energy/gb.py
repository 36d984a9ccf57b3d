"""Exact per-sample energies of generalized-Born forces, vectorized over a batch in torch (float64).

GB energies are many-body (each Born radius depends on all atoms), so they cannot be split into
per-copy terms inside OpenMM; here they are recomputed from the force's parameters:

* :class:`CustomGBTerm` evaluates any CustomGBForce (the OBC1, OBC2, GBn, GBn2 models that
  ``openmm.app`` builds) from its computed values and energy terms with the Lepton-expression
  evaluator, over all ordered pairs of a molecule: cost O(B * n_atoms^2) per call.
* :class:`GBSAOBCTerm` evaluates OpenMM's native GBSAOBCForce (OBC2 with the ACE surface term).

Like the terms of ``terms.py``, they take coordinates (3, n_atoms, B) and return energies (B,) kJ/mol.

Each term also carries :attr:`model`: the force in closed form (:class:`GBModel`, per-atom arrays and
constants) when it is one of the models ``openmm.app`` builds (HCT, OBC1, OBC2, GBn, GBn2: recognised
by rebuilding the app's force with the same settings and comparing every expression text) or a
native GBSAOBCForce without cutoff; the compiled kernel (``kernels.py``) evaluates those, else None.
"""
from __future__ import annotations

import dataclasses
import math
import re

import numpy as np
import torch
from openmm.app.internal import customgbforces as app_gb

from .expression import parse, tabulated_function
from .openmm_access import md_value

__all__ = ["CustomGBTerm", "GBModel", "GBSAOBCTerm", "app_gb_model", "native_gb_model", "tabulated_functions"]

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


@dataclasses.dataclass
class GBModel:
    """A generalized-Born force in closed form (nm, e, kJ/mol), as the compiled kernel evaluates it.

    Born integral of atom i: I_i = sum_j [HCT(r_ij, or_i, sr_j) + neck_scale * neck(r_ij)] over j != i
    (within ``cutoff``); Born radius B_i = 1/(1/or_i - I_i) (``hct``) or
    1/(1/or_i - tanh(alpha psi - beta psi^2 + gamma psi^3)/radius_i), psi = I_i or_i. Energy:
    sum_i [-coulomb/2 q_i^2 pref(B_i)/B_i + ace_i (radius_i/B_i)^6]
    - coulomb sum_{i<j} q_i q_j pref(f_ij) (1/f_ij - shift), f^2 = r^2 + B_i B_j exp(-r^2/(4 B_i B_j)),
    pref(x) = inv_solute - exp(-kappa x) inv_solvent. ``native``: GBSAOBCForce's Born integral, which
    adds 1/or_i - 1/L when atom i lies inside the scaled sphere of j. ``neck_index`` (n,) int, ``m0``
    and ``d0`` (k, k): the neck tables of GBn/GBn2, indexed [index_i, index_j] (empty otherwise).
    """

    name: str
    charge: np.ndarray
    offset_radius: np.ndarray
    scaled_radius: np.ndarray
    radius: np.ndarray
    alpha: np.ndarray
    beta: np.ndarray
    gamma: np.ndarray
    ace: np.ndarray
    coulomb: float
    inv_solute: float
    inv_solvent: float
    kappa: float = 0.0
    cutoff: float | None = None
    shift: float = 0.0
    hct: bool = False
    native: bool = False
    neck_scale: float = 0.0
    neck_cut: float = 0.0
    neck_index: np.ndarray | None = None
    m0: np.ndarray | None = None
    d0: np.ndarray | None = None


# the app's models: class, tanh coefficients (None: per atom; "hct": no tanh), neck scale and cut
_APP_MODELS = {"HCT": (app_gb.GBSAHCTForce, "hct", 0.0), "OBC1": (app_gb.GBSAOBC1Force, (0.8, 0.0, 2.909125), 0.0),
               "OBC2": (app_gb.GBSAOBC2Force, (1.0, 0.8, 4.85), 0.0),
               "GBn": (app_gb.GBSAGBnForce, (1.09511284, 1.907992938, 2.50798245), 0.361825),
               "GBn2": (app_gb.GBSAGBn2Force, None, 0.826836)}
_SETTINGS = re.compile(r"; solventDielectric=([^;]+); soluteDielectric=([^;]+); kappa=([^;]+); offset=([^;]+)"
                       r"(?:; cutoff=([^;]+))?$")
_APP_COULOMB = 138.935485  # the app's expressions use this value, not ONE_4PI_EPS0
_ACE = 28.3919551  # kJ/mol/nm^2: 4 pi 2.25936, the app's ACE surface-tension factor
_PROBE = 0.14
_NECK_CUT = 0.68


def _texts(force):
    return ([force.getPerParticleParameterName(k) for k in range(force.getNumPerParticleParameters())],
            [tuple(force.getComputedValueParameters(k)) for k in range(force.getNumComputedValues())],
            [tuple(force.getEnergyTermParameters(k)) for k in range(force.getNumEnergyTerms())])


def _discrete_2d(function) -> np.ndarray:
    """(xsize, ysize) table of a Discrete2DFunction: f(x, y) = values[x + xsize y]."""
    xsize, ysize, values = function.getFunctionParameters()
    return np.asarray(values, dtype=np.float64).reshape(int(ysize), int(xsize)).T.copy()


def app_gb_model(force) -> GBModel | None:
    """The :class:`GBModel` of a CustomGBForce built by ``openmm.app`` (implicit/*.xml), else None.

    The force is recognised when the app's class, built with the settings read from the force's first
    energy term, gives exactly the same parameter names, computed values and energy terms.
    """
    if force.getNumGlobalParameters() or force.getNumEnergyTerms() == 0 or force.getNonbondedMethod() not in (0, 1):
        return None
    settings = _SETTINGS.search(force.getEnergyTermParameters(0)[0])
    if settings is None:
        return None
    solvent, solute, kappa, offset = (float(v) for v in settings.groups()[:4])
    expression_cutoff = None if settings.group(5) is None else float(settings.group(5))
    texts = _texts(force)
    for name, (cls, tanh, neck_scale) in _APP_MODELS.items():
        for surface in ("ACE", None):
            built = cls(solventDielectric=solvent, soluteDielectric=solute, SA=surface, cutoff=expression_cutoff,
                        kappa=kappa)
            built.addParticle([0.0, 0.15, 0.8] + ([1.0, 0.8, 4.85] if tanh is None else []))
            built.finalize()
            if _texts(built) == texts:
                return _custom_model(force, name, tanh, neck_scale, offset, surface, solvent, solute, kappa,
                                     expression_cutoff)
    return None


def _custom_model(force, name, tanh, neck_scale, offset, surface, solvent, solute, kappa, expression_cutoff):
    n = force.getNumParticles()
    table = np.array([list(force.getParticleParameters(i)) for i in range(n)], dtype=np.float64).reshape(n, -1)
    charge, offset_radius, scaled_radius = table[:, 0], table[:, 1], table[:, 2]
    radius = offset_radius + offset
    if tanh is None:  # GBn2: per-atom coefficients
        alpha, beta, gamma = table[:, 3].copy(), table[:, 4].copy(), table[:, 5].copy()
    else:
        alpha, beta, gamma = np.outer((0.0, 0.0, 0.0) if tanh == "hct" else tanh, np.ones(n))
    model = GBModel(name, charge, offset_radius, scaled_radius, radius, alpha, beta, gamma,
                    ace=_ACE * (radius + _PROBE) ** 2 if surface else np.zeros(n), coulomb=_APP_COULOMB,
                    inv_solute=1.0 / solute, inv_solvent=1.0 / solvent, kappa=kappa,
                    cutoff=None if force.getNonbondedMethod() == 0 else md_value(force.getCutoffDistance()),
                    shift=0.0 if expression_cutoff is None else 1.0 / expression_cutoff, hct=tanh == "hct")
    if neck_scale:
        functions = {force.getTabulatedFunctionName(k): force.getTabulatedFunction(k)
                     for k in range(force.getNumTabulatedFunctions())}
        model.neck_scale, model.neck_cut = neck_scale, _NECK_CUT
        model.neck_index = np.rint(table[:, -1]).astype(np.int64)
        model.m0, model.d0 = _discrete_2d(functions["getm0"]), _discrete_2d(functions["getd0"])
    return model


def native_gb_model(force) -> GBModel | None:
    """The :class:`GBModel` of a native GBSAOBCForce without cutoff (OBC2 radii, ACE term), else None."""
    if force.getNonbondedMethod() != 0:
        return None
    rows = np.array([[md_value(v) for v in force.getParticleParameters(i)]
                     for i in range(force.getNumParticles())], dtype=np.float64).reshape(-1, 3)
    charge, radius, scale = rows.T
    offset_radius = radius - GBSAOBCTerm.OFFSET
    ones = np.ones(len(rows))
    surface = 4.0 * math.pi * md_value(force.getSurfaceAreaEnergy())
    return GBModel("GBSAOBCForce", charge, offset_radius, offset_radius * scale, radius, GBSAOBCTerm.ALPHA * ones,
                   GBSAOBCTerm.BETA * ones, GBSAOBCTerm.GAMMA * ones, surface * (radius + GBSAOBCTerm.PROBE) ** 2,
                   coulomb=ONE_4PI_EPS0, inv_solute=1.0 / force.getSoluteDielectric(),
                   inv_solvent=1.0 / force.getSolventDielectric(), native=True)


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
        self.cutoff = None if force.getNonbondedMethod() == 0 else md_value(force.getCutoffDistance())
        self.n = n
        self.model = app_gb_model(force)

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
        rows = [[md_value(v) for v in force.getParticleParameters(i)]
                for i in range(force.getNumParticles())]
        charge, radius, scale = (torch.as_tensor(np.array(c, dtype=np.float64)).unsqueeze(-1) for c in zip(*rows))
        self.charge, self.radius = charge, radius
        self.offset_radius = radius - self.OFFSET
        self.scaled_radius = self.offset_radius * scale
        self.prefactor = -ONE_4PI_EPS0 * (1.0 / force.getSoluteDielectric() - 1.0 / force.getSolventDielectric())
        self.surface = 4.0 * math.pi * md_value(force.getSurfaceAreaEnergy())
        self.ordered = torch.as_tensor(_pairs(len(rows), set(), True, False))
        self.model = native_gb_model(force)

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
