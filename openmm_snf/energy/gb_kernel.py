"""Compiled generalized-Born energies and forces: one block of samples, called by ``kernels.py``.

Evaluates a :class:`~openmm_snf.energy.gb.GBModel` (the app's HCT/OBC1/OBC2/GBn/GBn2 CustomGBForce
or a native GBSAOBCForce) in float64, in three passes over the atom pairs of a block of samples:

1. Born integrals I_i (each pair adds to both of its atoms, with different radii);
2. Born radii B_i and dB_i/dI_i, the self and ACE energies, then the pair energies with their direct
   forces (at fixed Born radii) and dE/dB_i;
3. the chain rule through the Born radii: dE/dr_ij = dE/dI_i dI_i/dr_ij + dE/dI_j dI_j/dr_ij.

Like the rest of the kernel, each sample's arithmetic is fixed (results do not depend on the batch or
the thread count), and overlapping atoms give inf/nan for their sample only.
"""
from __future__ import annotations

import math

import numba
import numpy as np

__all__ = ["gb_block", "pack"]

_OPTIONS = dict(cache=True, error_model="numpy", boundscheck=False)
_EMPTY_TABLE = np.zeros((1, 1))


def pack(model) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(atoms (n, 9), constants (11,), m0, d0) of a GBModel for :func:`gb_block`; no model: 0 atoms.

    atoms: q, or, sr, radius, alpha, beta, gamma, ace, neck index; constants: 1, hct, native,
    coulomb, 1/eps_solute, 1/eps_solvent, kappa, cutoff (inf: none), shift, neck scale, neck cut.
    """
    if model is None:
        return np.zeros((0, 9)), np.zeros(11), _EMPTY_TABLE, _EMPTY_TABLE
    n = len(model.charge)
    neck = np.zeros(n) if model.neck_index is None else model.neck_index.astype(np.float64)
    atoms = np.column_stack([model.charge, model.offset_radius, model.scaled_radius, model.radius, model.alpha,
                             model.beta, model.gamma, model.ace, neck])
    constants = np.array([1.0, float(model.hct), float(model.native), model.coulomb, model.inv_solute,
                          model.inv_solvent, model.kappa, np.inf if model.cutoff is None else model.cutoff,
                          model.shift, model.neck_scale, model.neck_cut])
    m0 = _EMPTY_TABLE if model.m0 is None else np.ascontiguousarray(model.m0)
    d0 = _EMPTY_TABLE if model.d0 is None else np.ascontiguousarray(model.d0)
    return np.ascontiguousarray(atoms), constants, m0, d0


@numba.njit(inline="always", **_OPTIONS)
def _integral(r, o, s, native):  # pragma: no cover - compiled
    """(HCT Born-integral term, its r-derivative) of an atom of offset radius o from a neighbour of
    scaled radius s at distance r: select(step(r+s-o), 0.5 (1/L - 1/U + (r - s^2/r)(1/U^2 - 1/L^2)/4
    + log(L/U)/(2r)), 0), U = r + s, L = max(o, |r - s|); ``native`` adds 1/o - 1/L where o < s - r."""
    if r + s - o < 0.0:
        return 0.0, 0.0
    u = r + s
    d = abs(r - s)
    if o >= d:
        big_l, dl = o, 0.0
    else:
        big_l, dl = d, (1.0 if r >= s else -1.0)
    inv_l, inv_u, inv_r = 1.0 / big_l, 1.0 / u, 1.0 / r
    inv_l2, inv_u2 = inv_l * inv_l, inv_u * inv_u
    s2r = s * s * inv_r
    log_lu = math.log(big_l * inv_u)
    value = 0.5 * (inv_l - inv_u + 0.25 * (r - s2r) * (inv_u2 - inv_l2) + 0.5 * log_lu * inv_r)
    deriv = 0.5 * (-dl * inv_l2 + inv_u2 + 0.25 * (1.0 + s2r * inv_r) * (inv_u2 - inv_l2)
                   + 0.5 * (r - s2r) * (dl * inv_l2 * inv_l - inv_u2 * inv_u)
                   + 0.5 * (dl * inv_l - inv_u) * inv_r - 0.5 * log_lu * inv_r * inv_r)
    if native and o < s - r:
        value += 1.0 / o - inv_l
        deriv += dl * inv_l2
    return value, deriv


@numba.njit(inline="always", **_OPTIONS)
def _neck(r, m0, d0, limit):  # pragma: no cover - compiled
    """(neck term, its r-derivative): step(limit - r) m0 / (1 + 100 x^2 + 3e5 x^6), x = r - d0."""
    if r > limit:
        return 0.0, 0.0
    x = r - d0
    x2 = x * x
    x4 = x2 * x2
    inv = 1.0 / (1.0 + 100.0 * x2 + 300000.0 * x4 * x2)
    return m0 * inv, -m0 * inv * inv * (200.0 * x + 1800000.0 * x4 * x)


@numba.njit(inline="always", **_OPTIONS)
def _pair_integrals(r, atoms, i, j, consts, m0, d0):  # pragma: no cover - compiled
    """(dI_i, dI_i/dr, dI_j, dI_j/dr) of one pair at distance r (zero beyond the cutoff)."""
    if not r < consts[7]:
        return 0.0, 0.0, 0.0, 0.0
    native = consts[2] != 0.0
    vi, di = _integral(r, atoms[i, 1], atoms[j, 2], native)
    vj, dj = _integral(r, atoms[j, 1], atoms[i, 2], native)
    scale = consts[9]
    if scale != 0.0:
        a, b = int(atoms[i, 8]), int(atoms[j, 8])
        limit = atoms[i, 3] + atoms[j, 3] + consts[10]
        ni, dni = _neck(r, m0[a, b], d0[a, b], limit)
        nj, dnj = _neck(r, m0[b, a], d0[b, a], limit)
        vi, di, vj, dj = vi + scale * ni, di + scale * dni, vj + scale * nj, dj + scale * dnj
    return vi, di, vj, dj


@numba.njit(**_OPTIONS)
def gb_block(c, f, e, m, atoms, consts, m0, d0):  # pragma: no cover - compiled; tested through CompiledTerms
    """Add the GB energies to e (CHUNK,) and forces to f (3, n, CHUNK) of the block's m samples
    with coordinates c (3, n, CHUNK), for the model packed by :func:`pack`."""
    n, chunk = atoms.shape[0], c.shape[2]
    integral = np.zeros((n, chunk))
    for i in range(n):  # pass 1: Born integrals
        for j in range(i + 1, n):
            for b in range(m):
                d0_, d1_, d2_ = c[0, j, b] - c[0, i, b], c[1, j, b] - c[1, i, b], c[2, j, b] - c[2, i, b]
                r = math.sqrt(d0_ * d0_ + d1_ * d1_ + d2_ * d2_)
                vi, _, vj, _ = _pair_integrals(r, atoms, i, j, consts, m0, d0)
                integral[i, b] += vi
                integral[j, b] += vj
    hct, coulomb, inv_in, inv_out, kappa = consts[1] != 0.0, consts[3], consts[4], consts[5], consts[6]
    born = np.empty((n, chunk))
    chain = np.empty((n, chunk))  # dB/dI, then dE/dI
    de_db = np.empty((n, chunk))
    for i in range(n):  # Born radii, self and surface energies
        q, o, radius, alpha, beta, gamma, ace = (atoms[i, 0], atoms[i, 1], atoms[i, 3], atoms[i, 4], atoms[i, 5],
                                                 atoms[i, 6], atoms[i, 7])
        half_qq = -0.5 * coulomb * q * q
        for b in range(m):
            if hct:
                inv_b = 1.0 / o - integral[i, b]
                born_i = 1.0 / inv_b
                db_di = born_i * born_i
            else:
                psi = integral[i, b] * o
                t = math.tanh(psi * (alpha + psi * (gamma * psi - beta)))
                inv_b = 1.0 / o - t / radius
                born_i = 1.0 / inv_b
                db_di = born_i * born_i * (1.0 - t * t) * (alpha + psi * (3.0 * gamma * psi - 2.0 * beta)) * o / radius
            screen = math.exp(-kappa * born_i) if kappa != 0.0 else 1.0
            pref = inv_in - screen * inv_out
            energy = half_qq * pref * inv_b
            derivative = half_qq * (kappa * screen * inv_out - pref * inv_b) * inv_b
            ratio = radius * inv_b
            ratio3 = ratio * ratio * ratio
            surface = ace * ratio3 * ratio3
            e[b] += energy + surface
            de_db[i, b] = derivative - 6.0 * surface * inv_b
            born[i, b] = born_i
            chain[i, b] = db_di
    cutoff, shift = consts[7], consts[8]
    for i in range(n):  # pass 2: pair energies, direct forces, dE/dB
        for j in range(i + 1, n):
            qq = -coulomb * atoms[i, 0] * atoms[j, 0]
            for b in range(m):
                d0_, d1_, d2_ = c[0, j, b] - c[0, i, b], c[1, j, b] - c[1, i, b], c[2, j, b] - c[2, i, b]
                r2 = d0_ * d0_ + d1_ * d1_ + d2_ * d2_
                bb = born[i, b] * born[j, b]
                ex = math.exp(-0.25 * r2 / bb)
                fij = math.sqrt(r2 + bb * ex)
                inv_f = 1.0 / fij
                screen = math.exp(-kappa * fij) if kappa != 0.0 else 1.0
                pref = inv_in - screen * inv_out
                de_df = qq * (kappa * screen * inv_out * (inv_f - shift) - pref * inv_f * inv_f)
                inside = r2 < cutoff * cutoff
                e[b] += qq * pref * (inv_f - shift) if inside else 0.0
                scale = de_df * (1.0 - 0.25 * ex) * inv_f if inside else 0.0  # dE/dr / r
                dbb = de_df * ex * (1.0 + 0.25 * r2 / bb) * 0.5 * inv_f if inside else 0.0  # dE/d(B_i B_j)
                de_db[i, b] += dbb * born[j, b]
                de_db[j, b] += dbb * born[i, b]
                f[0, j, b] -= scale * d0_
                f[1, j, b] -= scale * d1_
                f[2, j, b] -= scale * d2_
                f[0, i, b] += scale * d0_
                f[1, i, b] += scale * d1_
                f[2, i, b] += scale * d2_
    for i in range(n):
        for b in range(m):
            chain[i, b] *= de_db[i, b]
    for i in range(n):  # pass 3: through the Born radii
        for j in range(i + 1, n):
            for b in range(m):
                d0_, d1_, d2_ = c[0, j, b] - c[0, i, b], c[1, j, b] - c[1, i, b], c[2, j, b] - c[2, i, b]
                r = math.sqrt(d0_ * d0_ + d1_ * d1_ + d2_ * d2_)
                _, di, _, dj = _pair_integrals(r, atoms, i, j, consts, m0, d0)
                scale = (chain[i, b] * di + chain[j, b] * dj) / r
                f[0, j, b] -= scale * d0_
                f[1, j, b] -= scale * d1_
                f[2, j, b] -= scale * d2_
                f[0, i, b] += scale * d0_
                f[1, i, b] += scale * d1_
                f[2, i, b] += scale * d2_
