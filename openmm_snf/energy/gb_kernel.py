"""Compiled generalized-Born energies and forces, block by block of samples like ``kernels.py``.

Evaluates a :class:`~openmm_snf.energy.gb.GBModel` (the app's HCT/OBC1/OBC2/GBn/GBn2 CustomGBForce
or a native GBSAOBCForce) in float64, in three passes over the atom pairs of a block of samples:

1. Born integrals I_i (each pair adds to both of its atoms, with different radii);
2. Born radii B_i and dB_i/dI_i, the self and ACE energies, then the pair energies with their direct
   forces (at fixed Born radii) and dE/dB_i;
3. the chain rule through the Born radii: dE/dr_ij = dE/dI_i dI_i/dr_ij + dE/dI_j dI_j/dr_ij.

Like the rest of the kernel, each sample's arithmetic is fixed (results do not depend on the batch or
the thread count), and overlapping atoms give inf/nan for their sample only. The GB force has its own
kernel rather than a call inside ``kernels.py``'s: numba caches a function's machine code by the
content of its own file, so a changed function from another file would stay stale in that cache.
"""
from __future__ import annotations

import math

import numba
import numpy as np

__all__ = ["CHUNK", "gb_block", "gb_parallel_kernel", "gb_serial_kernel", "load_block", "pack"]

CHUNK = 32  # samples per block; a compile-time trip count lets every loop over them vectorize (measured 3-5x)

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
def _integral_geometry(r, o, s):  # pragma: no cover - compiled
    """(L, dL/dr, active) of the HCT integral of an atom of offset radius o from a neighbour of scaled
    radius s at distance r: L = max(o, |r - s|); active = step(r + s - o) (1.0 or 0.0)."""
    d = r - s
    dl = 1.0 if d >= 0.0 else -1.0
    d = d * dl
    inner = o >= d
    return (o if inner else d), (0.0 if inner else dl), (1.0 if r + s - o >= 0.0 else 0.0)


@numba.njit(inline="always", **_OPTIONS)
def _integral(r, inv_r, o, s, big_l, dl, active, log_lu, native):  # pragma: no cover - compiled
    """(HCT Born-integral term, its r-derivative): active * 0.5 (1/L - 1/U + (r - s^2/r)(1/U^2 - 1/L^2)/4
    + log(L/U)/(2r)), U = r + s; ``native`` (GBSAOBCForce) adds 1/o - 1/L where o < s - r."""
    inv_l, inv_u = 1.0 / big_l, 1.0 / (r + s)
    inv_l2, inv_u2 = inv_l * inv_l, inv_u * inv_u
    s2r = s * s * inv_r
    value = 0.5 * (inv_l - inv_u + 0.25 * (r - s2r) * (inv_u2 - inv_l2) + 0.5 * log_lu * inv_r)
    deriv = 0.5 * (-dl * inv_l2 + inv_u2 + 0.25 * (1.0 + s2r * inv_r) * (inv_u2 - inv_l2)
                   + 0.5 * (r - s2r) * (dl * inv_l2 * inv_l - inv_u2 * inv_u)
                   + 0.5 * (dl * inv_l - inv_u) * inv_r - 0.5 * log_lu * inv_r * inv_r)
    if native and o < s - r:
        value += 1.0 / o - inv_l
        deriv += dl * inv_l2
    return (value, deriv) if active != 0.0 else (0.0, 0.0)


@numba.njit(inline="always", **_OPTIONS)
def _neck(r, m0, d0, limit):  # pragma: no cover - compiled
    """(neck term, its r-derivative): step(limit - r) m0 / (1 + 100 x^2 + 3e5 x^6), x = r - d0."""
    x = r - d0
    x2 = x * x
    x4 = x2 * x2
    inv = 1.0 / (1.0 + 100.0 * x2 + 300000.0 * x4 * x2)
    inside = r <= limit
    return (m0 * inv if inside else 0.0), (-m0 * inv * inv * (200.0 * x + 1800000.0 * x4 * x) if inside else 0.0)


@numba.njit(inline="always", **_OPTIONS)
def _scatter(f, i, j, g):  # pragma: no cover - compiled
    """f[:, j] -= g[:3]; f[:, i] += g[:3] (one store stream per loop: vectorizes)."""
    for k in range(3):
        for b in range(CHUNK):
            f[k, j, b] -= g[k, b]
        for b in range(CHUNK):
            f[k, i, b] += g[k, b]


@numba.njit(**_OPTIONS)
def gb_block(c, f, e, atoms, consts, m0, d0):  # pragma: no cover - compiled; tested through CompiledTerms
    """Add the GB energies to e (CHUNK,) and forces to f (3, n, CHUNK) of a block of CHUNK samples
    with coordinates c (3, n, CHUNK), for the model packed by :func:`pack` (a partial block is padded
    with copies of a real sample: every sample's arithmetic is its own).

    Every pair loop is split so that the loops of arithmetic vectorize and only the log/exp calls
    run one by one.
    """
    n = atoms.shape[0]
    native, hct = consts[2] != 0.0, consts[1] != 0.0
    coulomb, inv_in, inv_out, kappa = consts[3], consts[4], consts[5], consts[6]
    cutoff, shift, neck_scale, neck_cut = consts[7], consts[8], consts[9], consts[10]
    integral = np.zeros((n, CHUNK))
    slope = np.empty((n * (n - 1) // 2, 2, CHUNK))  # dI_i/dr / r and dI_j/dr / r of each pair
    g = np.empty((12, CHUNK))
    pair = 0
    for i in range(n):  # pass 1: Born integrals
        o_i, s_i = atoms[i, 1], atoms[i, 2]
        for j in range(i + 1, n):
            o_j, s_j = atoms[j, 1], atoms[j, 2]
            for b in range(CHUNK):
                dx, dy, dz = c[0, j, b] - c[0, i, b], c[1, j, b] - c[1, i, b], c[2, j, b] - c[2, i, b]
                r = math.sqrt(dx * dx + dy * dy + dz * dz)
                l_i, dl_i, on_i = _integral_geometry(r, o_i, s_j)
                l_j, dl_j, on_j = _integral_geometry(r, o_j, s_i)
                inside = 1.0 if r < cutoff else 0.0
                g[0, b], g[1, b], g[2, b], g[3, b], g[4, b] = r, l_i, dl_i, on_i * inside, l_i / (r + s_j)
                g[5, b], g[6, b], g[7, b], g[8, b] = l_j, dl_j, on_j * inside, l_j / (r + s_i)
            for b in range(CHUNK):  # the only scalar calls of this pass
                g[4, b] = math.log(g[4, b])
                g[8, b] = math.log(g[8, b])
            for b in range(CHUNK):
                r = g[0, b]
                inv_r = 1.0 / r
                v_i, dv_i = _integral(r, inv_r, o_i, s_j, g[1, b], g[2, b], g[3, b], g[4, b], native)
                v_j, dv_j = _integral(r, inv_r, o_j, s_i, g[5, b], g[6, b], g[7, b], g[8, b], native)
                g[9, b], g[10, b], g[11, b] = v_i, v_j, inv_r
                slope[pair, 0, b], slope[pair, 1, b] = dv_i * inv_r, dv_j * inv_r
            if neck_scale != 0.0:
                a, z = int(atoms[i, 8]), int(atoms[j, 8])
                m0_ij, d0_ij, m0_ji, d0_ji = m0[a, z], d0[a, z], m0[z, a], d0[z, a]
                limit = atoms[i, 3] + atoms[j, 3] + neck_cut
                for b in range(CHUNK):
                    r = g[0, b]
                    n_i, dn_i = _neck(r, m0_ij, d0_ij, limit)
                    n_j, dn_j = _neck(r, m0_ji, d0_ji, limit)
                    inside = r < cutoff
                    g[9, b] += neck_scale * n_i if inside else 0.0
                    g[10, b] += neck_scale * n_j if inside else 0.0
                    slope[pair, 0, b] += neck_scale * dn_i * g[11, b] if inside else 0.0
                    slope[pair, 1, b] += neck_scale * dn_j * g[11, b] if inside else 0.0
            for b in range(CHUNK):
                integral[i, b] += g[9, b]
            for b in range(CHUNK):
                integral[j, b] += g[10, b]
            pair += 1
    born = np.empty((n, CHUNK))
    chain = np.empty((n, CHUNK))  # dB/dI, then dE/dI
    de_db = np.empty((n, CHUNK))
    for i in range(n):  # Born radii, self and surface energies
        q, o, radius, alpha, beta, gamma, ace = (atoms[i, 0], atoms[i, 1], atoms[i, 3], atoms[i, 4], atoms[i, 5],
                                                 atoms[i, 6], atoms[i, 7])
        half_qq = -0.5 * coulomb * q * q
        for b in range(CHUNK):
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
            ratio = radius * inv_b
            ratio3 = ratio * ratio * ratio
            surface = ace * ratio3 * ratio3
            e[b] += half_qq * pref * inv_b + surface
            de_db[i, b] = half_qq * (kappa * screen * inv_out - pref * inv_b) * inv_b - 6.0 * surface * inv_b
            born[i, b] = born_i
            chain[i, b] = db_di
    for i in range(n):  # pass 2: pair energies, direct forces, dE/dB
        for j in range(i + 1, n):
            qq = -coulomb * atoms[i, 0] * atoms[j, 0]
            for b in range(CHUNK):
                dx, dy, dz = c[0, j, b] - c[0, i, b], c[1, j, b] - c[1, i, b], c[2, j, b] - c[2, i, b]
                r2 = dx * dx + dy * dy + dz * dz
                bb = born[i, b] * born[j, b]
                g[0, b], g[1, b], g[2, b] = r2, bb, -0.25 * r2 / bb
            for b in range(CHUNK):  # the only scalar calls of this pass
                g[2, b] = math.exp(g[2, b])
            if kappa != 0.0:
                for b in range(CHUNK):
                    g[3, b] = math.exp(-kappa * math.sqrt(g[0, b] + g[1, b] * g[2, b]))
            else:
                for b in range(CHUNK):
                    g[3, b] = 1.0
            for b in range(CHUNK):
                r2, bb, ex, screen = g[0, b], g[1, b], g[2, b], g[3, b]
                inv_f = 1.0 / math.sqrt(r2 + bb * ex)
                pref = inv_in - screen * inv_out
                de_df = qq * (kappa * screen * inv_out * (inv_f - shift) - pref * inv_f * inv_f)
                inside = r2 < cutoff * cutoff
                e[b] += qq * pref * (inv_f - shift) if inside else 0.0
                scale = de_df * (1.0 - 0.25 * ex) * inv_f if inside else 0.0  # dE/dr / r
                dbb = de_df * ex * (1.0 + 0.25 * r2 / bb) * 0.5 * inv_f if inside else 0.0  # dE/d(B_i B_j)
                g[4, b] = dbb * born[j, b]
                g[5, b] = dbb * born[i, b]
                g[0, b] = scale * (c[0, j, b] - c[0, i, b])
                g[1, b] = scale * (c[1, j, b] - c[1, i, b])
                g[2, b] = scale * (c[2, j, b] - c[2, i, b])
            for b in range(CHUNK):
                de_db[i, b] += g[4, b]
            for b in range(CHUNK):
                de_db[j, b] += g[5, b]
            _scatter(f, i, j, g)
    for i in range(n):
        for b in range(CHUNK):
            chain[i, b] *= de_db[i, b]
    pair = 0
    for i in range(n):  # pass 3: through the Born radii
        for j in range(i + 1, n):
            for b in range(CHUNK):
                scale = chain[i, b] * slope[pair, 0, b] + chain[j, b] * slope[pair, 1, b]
                g[0, b] = scale * (c[0, j, b] - c[0, i, b])
                g[1, b] = scale * (c[1, j, b] - c[1, i, b])
                g[2, b] = scale * (c[2, j, b] - c[2, i, b])
            _scatter(f, i, j, g)
            pair += 1


@numba.njit(inline="always", **_OPTIONS)
def load_block(x, lo, m):
    """Samples lo .. lo + m of x (B, n_atoms, 3) in the component-major block layout (3, n_atoms, CHUNK),
    a partial block padded with copies of its first sample."""
    n_atoms = x.shape[1]
    c = np.empty((3, n_atoms, CHUNK))
    for a in range(n_atoms):
        for k in range(3):
            for b in range(m):
                c[k, a, b] = x[lo + b, a, k]
            for b in range(m, CHUNK):
                c[k, a, b] = c[k, a, 0]
    return c


def _gb_kernel(x, atoms, consts, m0, d0, energy, forces):  # pragma: no cover - compiled; tested through CompiledTerms
    """Add the GB energies to energy (B,) and forces to forces (B, n_atoms, 3) of x (B, n_atoms, 3), block
    by block of CHUNK samples in component-major layout (a partial block padded with its first sample)."""
    n_batch, n_atoms = x.shape[0], x.shape[1]
    for block in numba.prange((n_batch + CHUNK - 1) // CHUNK):
        lo = block * CHUNK
        m = min(CHUNK, n_batch - lo)
        c = load_block(x, lo, m)
        f = np.zeros((3, n_atoms, CHUNK))
        e = np.zeros(CHUNK)
        gb_block(c, f, e, atoms, consts, m0, d0)
        for a in range(n_atoms):
            for k in range(3):
                for b in range(m):
                    forces[lo + b, a, k] += f[k, a, b]
        for b in range(m):
            energy[lo + b] += e[b]


gb_parallel_kernel = numba.njit(parallel=True, **_OPTIONS)(_gb_kernel)
gb_serial_kernel = numba.njit(**_OPTIONS)(_gb_kernel)  # the same arithmetic, for batches of one block
