"""Compiled CPU kernels: energies and forces of the common native forces in one fused pass.

The torch terms of ``terms.py`` are vectorized over the batch, but every arithmetic step is its own
kernel over a (terms x batch) array: for a small molecule the time goes into memory traffic and
kernel launches. Here the same formulas (harmonic bonds and angles, periodic torsions, NonbondedForce
with NoCutoff or CutoffNonPeriodic) run in one numba-compiled float64 function, block by block of 32
samples (parallel over blocks; inside a block each term is a loop over the block's samples, a
compile-time trip count that the compiler vectorizes: a partial block is padded with copies of a
sample), writing energies and forces directly; one generalized-Born force of the kinds ``openmm.app``
builds is added by ``gb_kernel.py``'s kernel, written the same way. cos(n phi - phase) comes from
integer powers of cos(phi) and sin(phi); the only transcendental calls left are the atan2 of each
angle and the GB model's log and exp of each pair. Exact like the torch terms (each sample's
arithmetic is fixed, so results do not depend on the thread count or the batch around it) and
checked against OpenMM's Reference platform when an :class:`~openmm_snf.energy.OpenMMEnergy` is
built. Forces without a kernel here (custom and RB forces, GB forces of other forms) stay on the
torch terms.

The kernels are compiled once per machine (a few seconds) and cached by numba next to this file (or in
``NUMBA_CACHE_DIR``). Overlapping atoms give inf/nan, never an exception (numpy error model).
"""
from __future__ import annotations

import math
import os

import numba
import numpy as np

from .gb import CustomGBTerm, GBSAOBCTerm
from .gb_kernel import CHUNK, gb_parallel_kernel, gb_serial_kernel, load_block, pack
from .terms import HarmonicAngleTerm, HarmonicBondTerm, NonbondedTerm, PeriodicTorsionTerm

__all__ = ["CompiledTerms"]

_NO_SWITCH = -1.0
_CHUNK = CHUNK  # samples per block: their coordinates and forces stay in the L1 cache, loops over them vectorize
# the GB kernel keeps dI/dr of every atom pair of a block: 67 MB per thread at 512 atoms; larger
# molecules leave their GB force to the torch terms
GB_MAX_ATOMS = 512

# numba's OpenMP layer, loaded beside torch's OpenMP runtime, made every later small torch op ~1000x
# slower (measured: log + sin of a 128 x 17 tensor, 7 us -> 12 ms); its own "workqueue" layer does not.
if "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER = "workqueue"


def _columns(term) -> np.ndarray:
    """(m, k) int64 atom indices of an indexed term."""
    return np.stack([a.cpu().numpy() for a in term._cpu], axis=1).astype(np.int64).reshape(-1, len(term._cpu))


def _params(term, names) -> np.ndarray:
    """(m, len(names)) float64 per-term parameters of an indexed term."""
    return np.stack([term._params[n].cpu().numpy().reshape(-1) for n in names], axis=1).astype(np.float64)


class CompiledTerms:
    """The compiled share of a System's energy terms.

    Args:
        terms: [(force index, term)] from :func:`~openmm_snf.energy.terms.build_energy_terms`.
        threads: threads of the parallel loop over the batch (None: numba's default, all cores).

    Attributes:
        indices: the force indices this object evaluates; :attr:`rest` the (index, term) pairs it
            leaves to the torch terms (another kind, a second NonbondedForce or GB force, a GB force
            of another form or of more than ``GB_MAX_ATOMS`` atoms); :attr:`gb_model` the name of the
            GB model it evaluates, or None.
    """

    def __init__(self, terms, threads: int | None = None):
        self.threads = threads
        self.indices, self.rest = [], []
        bonds, angles, torsions, nonbonded, gb = [], [], [], None, None
        for index, term in terms:
            if isinstance(term, HarmonicBondTerm):
                bonds.append(term)
            elif isinstance(term, HarmonicAngleTerm):
                angles.append(term)
            elif isinstance(term, PeriodicTorsionTerm):
                torsions.append(term)
            elif isinstance(term, NonbondedTerm) and nonbonded is None:
                nonbonded = term
            elif (isinstance(term, (CustomGBTerm, GBSAOBCTerm)) and term.model is not None and gb is None
                  and len(term.model.charge) <= GB_MAX_ATOMS):
                gb = term.model
            else:
                self.rest.append((index, term))
                continue
            self.indices.append(index)
        self.bonds = _concat([_columns(t) for t in bonds], 2, np.int64)
        self.bond_params = _concat([_params(t, ("r0", "k")) for t in bonds], 2)
        self.angles = _concat([_columns(t) for t in angles], 3, np.int64)
        self.angle_params = _concat([_params(t, ("theta0", "k")) for t in angles], 2)
        self.quads, self.torsion_start, self.torsion_params = _torsions(torsions)
        self.gb_model = None if gb is None else gb.name
        self.gb = pack(gb)
        pair_params = ("four_eps", "sigma_sq", "qq")
        self.plain = np.zeros((0, 2), np.int64)
        self.plain_params = np.zeros((0, 3))
        self.cut, self.cut_params = self.plain, self.plain_params
        self.reaction_field = np.array([np.inf, 0.0, 0.0, _NO_SWITCH])
        if nonbonded is not None:
            main = (_columns(nonbonded), _params(nonbonded, pair_params))
            extra = (_columns(nonbonded.exceptions), _params(nonbonded.exceptions, pair_params))
            if nonbonded.cutoff is None:
                self.plain = np.concatenate([main[0], extra[0]])
                self.plain_params = np.concatenate([main[1], extra[1]])
            else:
                (self.cut, self.cut_params), (self.plain, self.plain_params) = main, extra
                switch = _NO_SWITCH if nonbonded.switch is None else nonbonded.switch
                self.reaction_field = np.array([nonbonded.cutoff, nonbonded.k_rf, nonbonded.c_rf, switch])

    def __call__(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(energies (B,) kJ/mol, forces (B, n_atoms, 3) kJ/mol/nm) of x (B, n_atoms, 3) float64 nm."""
        x = np.ascontiguousarray(x, dtype=np.float64)
        energy = np.empty(len(x))
        forces = np.empty(x.shape)
        args = (x, self.bonds, self.bond_params, self.angles, self.angle_params, self.quads, self.torsion_start,
                self.torsion_params, self.plain, self.plain_params, self.cut, self.cut_params, self.reaction_field,
                energy, forces)
        gb = self.gb_model is not None
        if len(x) <= _CHUNK:  # one block: no threads to start (saves ~20 us)
            _serial_kernel(*args)
            if gb:
                gb_serial_kernel(x, *self.gb, energy, forces)
            return energy, forces
        previous = numba.get_num_threads()
        numba.set_num_threads(min(self.threads or numba.config.NUMBA_NUM_THREADS, numba.config.NUMBA_NUM_THREADS))
        try:
            _parallel_kernel(*args)
            if gb:  # its own kernel: numba's cache of this file's kernel would not see changes to gb_kernel.py
                gb_parallel_kernel(x, *self.gb, energy, forces)
        finally:
            numba.set_num_threads(previous)
        return energy, forces


def _concat(arrays, width, dtype=np.float64):
    return np.ascontiguousarray(np.concatenate(arrays) if arrays else np.zeros((0, width)), dtype=dtype)


def _torsions(terms):
    """Unique dihedrals (u, 4), CSR offsets (u + 1,) into their periodic terms (t, 5): n, phase, k,
    cos(phase), sin(phase), sorted by n within each dihedral."""
    quads, which, params, shift = [], [], [], 0
    for term in terms:
        quads.append(_columns(term))
        which.append(term._which.cpu().numpy() + shift)
        params.append(_params(term, ("n", "phase", "k")))
        shift += len(quads[-1])
    if not quads:
        return np.zeros((0, 4), np.int64), np.zeros(1, np.int64), np.zeros((0, 5))
    which, params = np.concatenate(which), np.concatenate(params)
    order = np.lexsort((params[:, 0], which))
    which, params = which[order], params[order]
    start = np.searchsorted(which, np.arange(shift + 1)).astype(np.int64)
    params = np.column_stack([params, np.cos(params[:, 1]), np.sin(params[:, 1])])
    return np.ascontiguousarray(np.concatenate(quads)), start, np.ascontiguousarray(params)


@numba.njit(cache=True, error_model="numpy", boundscheck=False)
def _add(f, atom, scale, g0, g1, g2, m):  # pragma: no cover - compiled
    """f[:, atom, :m] += scale * (g0, g1, g2)[:m] (one store stream per loop: no aliasing, vectorizes)."""
    for b in range(m):
        f[0, atom, b] += scale * g0[b]
    for b in range(m):
        f[1, atom, b] += scale * g1[b]
    for b in range(m):
        f[2, atom, b] += scale * g2[b]


def _kernel(x, bonds, bond_p, angles, angle_p, quads, t_start, t_p, plain, plain_p, cut, cut_p, rf,
            energy, forces):  # pragma: no cover - compiled; tested through CompiledTerms
    """Energies (B,) and forces (B, n_atoms, 3) of x (B, n_atoms, 3), block by block of _CHUNK samples.

    Inside a block, coordinates and forces are component-major (3, n_atoms, _CHUNK) and every term is
    a loop over the block's samples. Each sample's arithmetic is the same whatever its block, so the
    results do not depend on the batch or the thread count.
    """
    n_batch, n_atoms = x.shape[0], x.shape[1]
    cutoff, k_rf, c_rf, switch = rf[0], rf[1], rf[2], rf[3]
    for block in numba.prange((n_batch + _CHUNK - 1) // _CHUNK):
        lo = block * _CHUNK
        m = min(_CHUNK, n_batch - lo)
        c = load_block(x, lo, m)
        f = np.zeros((3, n_atoms, _CHUNK))
        e = np.zeros(_CHUNK)
        g = np.empty((17, _CHUNK))  # per-term scratch: gradient vectors and intermediate values
        for t in range(bonds.shape[0]):  # harmonic bonds: k/2 (r - r0)^2
            i, j, r0, kb = bonds[t, 0], bonds[t, 1], bond_p[t, 0], bond_p[t, 1]
            for b in range(_CHUNK):
                d0, d1, d2 = c[0, j, b] - c[0, i, b], c[1, j, b] - c[1, i, b], c[2, j, b] - c[2, i, b]
                r = math.sqrt(d0 * d0 + d1 * d1 + d2 * d2)
                s = r - r0
                e[b] += 0.5 * kb * s * s
                scale = kb * s / r
                g[0, b], g[1, b], g[2, b] = scale * d0, scale * d1, scale * d2
            _add(f, j, -1.0, g[0], g[1], g[2], _CHUNK)
            _add(f, i, 1.0, g[0], g[1], g[2], _CHUNK)
        for t in range(angles.shape[0]):  # harmonic angles: k/2 (theta - theta0)^2, theta at j
            i, j, k, theta0, ka = angles[t, 0], angles[t, 1], angles[t, 2], angle_p[t, 0], angle_p[t, 1]
            for b in range(_CHUNK):
                a0, a1, a2 = c[0, i, b] - c[0, j, b], c[1, i, b] - c[1, j, b], c[2, i, b] - c[2, j, b]
                b0, b1, b2 = c[0, k, b] - c[0, j, b], c[1, k, b] - c[1, j, b], c[2, k, b] - c[2, j, b]
                n0, n1, n2 = a1 * b2 - a2 * b1, a2 * b0 - a0 * b2, a0 * b1 - a1 * b0
                g[6, b] = math.sqrt(n0 * n0 + n1 * n1 + n2 * n2)
                g[7, b] = a0 * b0 + a1 * b1 + a2 * b2
            for b in range(_CHUNK):  # the only scalar call; the loops around it vectorize
                g[8, b] = math.atan2(g[6, b], g[7, b]) - theta0
            for b in range(_CHUNK):
                a0, a1, a2 = c[0, i, b] - c[0, j, b], c[1, i, b] - c[1, j, b], c[2, i, b] - c[2, j, b]
                b0, b1, b2 = c[0, k, b] - c[0, j, b], c[1, k, b] - c[1, j, b], c[2, k, b] - c[2, j, b]
                norm_n, ab, bend = g[6, b], g[7, b], g[8, b]
                e[b] += 0.5 * ka * bend * bend
                scale = ka * bend / (norm_n if norm_n > 1e-6 else 1e-6)  # OpenMM's bound for linear angles
                sa = ab / (a0 * a0 + a1 * a1 + a2 * a2)
                sb = ab / (b0 * b0 + b1 * b1 + b2 * b2)
                g[0, b], g[1, b], g[2, b] = (a0 * sa - b0) * scale, (a1 * sa - b1) * scale, (a2 * sa - b2) * scale
                g[3, b], g[4, b], g[5, b] = (b0 * sb - a0) * scale, (b1 * sb - a1) * scale, (b2 * sb - a2) * scale
            _add(f, i, -1.0, g[0], g[1], g[2], _CHUNK)
            _add(f, k, -1.0, g[3], g[4], g[5], _CHUNK)
            _add(f, j, 1.0, g[0], g[1], g[2], _CHUNK)
            _add(f, j, 1.0, g[3], g[4], g[5], _CHUNK)
        for u in range(quads.shape[0]):  # periodic torsions: sum of k (1 + cos(n phi - phase)) per dihedral
            i, j, k, l = quads[u, 0], quads[u, 1], quads[u, 2], quads[u, 3]
            for b in range(_CHUNK):  # cos(phi), sin(phi) with OpenMM's sign of phi
                u0, u1, u2 = c[0, j, b] - c[0, i, b], c[1, j, b] - c[1, i, b], c[2, j, b] - c[2, i, b]
                v0, v1, v2 = c[0, k, b] - c[0, j, b], c[1, k, b] - c[1, j, b], c[2, k, b] - c[2, j, b]
                w0, w1, w2 = c[0, l, b] - c[0, k, b], c[1, l, b] - c[1, k, b], c[2, l, b] - c[2, k, b]
                m0, m1, m2 = u1 * v2 - u2 * v1, u2 * v0 - u0 * v2, u0 * v1 - u1 * v0
                q0, q1, q2 = v1 * w2 - v2 * w1, v2 * w0 - v0 * w2, v0 * w1 - v1 * w0
                inv = 1.0 / math.sqrt((m0 * m0 + m1 * m1 + m2 * m2) * (q0 * q0 + q1 * q1 + q2 * q2))
                g[12, b] = (m0 * q0 + m1 * q1 + m2 * q2) * inv
                g[13, b] = math.sqrt(v0 * v0 + v1 * v1 + v2 * v2) * (u0 * q0 + u1 * q1 + u2 * q2) * inv
                g[14, b], g[15, b], g[16, b] = 1.0, 0.0, 0.0  # cos(n phi), sin(n phi), dU/dphi
            power = 0
            for t in range(t_start[u], t_start[u + 1]):  # sorted by n: cos/sin(n phi) by multiplication
                while power < t_p[t, 0]:
                    for b in range(_CHUNK):
                        g[14, b], g[15, b] = (g[14, b] * g[12, b] - g[15, b] * g[13, b],
                                              g[15, b] * g[12, b] + g[14, b] * g[13, b])
                    power += 1
                n, kt, cos_phase, sin_phase = t_p[t, 0], t_p[t, 2], t_p[t, 3], t_p[t, 4]
                for b in range(_CHUNK):  # k (1 + cos(n phi - phase)) and its derivative
                    e[b] += kt * (1.0 + g[14, b] * cos_phase + g[15, b] * sin_phase)
                    g[16, b] -= kt * n * (g[15, b] * cos_phase - g[14, b] * sin_phase)
            for b in range(_CHUNK):  # gradient as in terms._add_dihedral_gradient
                u0, u1, u2 = c[0, j, b] - c[0, i, b], c[1, j, b] - c[1, i, b], c[2, j, b] - c[2, i, b]
                v0, v1, v2 = c[0, k, b] - c[0, j, b], c[1, k, b] - c[1, j, b], c[2, k, b] - c[2, j, b]
                w0, w1, w2 = c[0, l, b] - c[0, k, b], c[1, l, b] - c[1, k, b], c[2, l, b] - c[2, k, b]
                m0, m1, m2 = u1 * v2 - u2 * v1, u2 * v0 - u0 * v2, u0 * v1 - u1 * v0
                q0, q1, q2 = v1 * w2 - v2 * w1, v2 * w0 - v0 * w2, v0 * w1 - v1 * w0
                v_sq = v0 * v0 + v1 * v1 + v2 * v2
                scale = g[16, b] * math.sqrt(v_sq)
                si, sl = -scale / (m0 * m0 + m1 * m1 + m2 * m2), scale / (q0 * q0 + q1 * q1 + q2 * q2)
                gi0, gi1, gi2 = m0 * si, m1 * si, m2 * si
                gl0, gl1, gl2 = q0 * sl, q1 * sl, q2 * sl
                pp = (u0 * v0 + u1 * v1 + u2 * v2) / v_sq
                qq = (w0 * v0 + w1 * v1 + w2 * v2) / v_sq
                g[0, b], g[1, b], g[2, b], g[3, b], g[4, b], g[5, b] = gi0, gi1, gi2, gl0, gl1, gl2
                g[6, b], g[7, b], g[8, b] = (qq * gl0 - (1.0 + pp) * gi0, qq * gl1 - (1.0 + pp) * gi1,
                                             qq * gl2 - (1.0 + pp) * gi2)
                g[9, b], g[10, b], g[11, b] = (pp * gi0 - (1.0 + qq) * gl0, pp * gi1 - (1.0 + qq) * gl1,
                                               pp * gi2 - (1.0 + qq) * gl2)
            _add(f, i, -1.0, g[0], g[1], g[2], _CHUNK)
            _add(f, l, -1.0, g[3], g[4], g[5], _CHUNK)
            _add(f, j, -1.0, g[6], g[7], g[8], _CHUNK)
            _add(f, k, -1.0, g[9], g[10], g[11], _CHUNK)
        for t in range(plain.shape[0]):  # Coulomb + LJ without cutoff (NoCutoff pairs, all exceptions)
            i, j = plain[t, 0], plain[t, 1]
            four_eps, sigma_sq, qq = plain_p[t, 0], plain_p[t, 1], plain_p[t, 2]
            for b in range(_CHUNK):
                d0, d1, d2 = c[0, j, b] - c[0, i, b], c[1, j, b] - c[1, i, b], c[2, j, b] - c[2, i, b]
                inv_r = 1.0 / math.sqrt(d0 * d0 + d1 * d1 + d2 * d2)
                inv_r_sq = inv_r * inv_r
                coulomb = qq * inv_r
                s2 = sigma_sq * inv_r_sq
                s6 = s2 * s2 * s2
                four_eps_s6 = four_eps * s6
                e[b] += coulomb + four_eps_s6 * (s6 - 1.0)
                scale = (four_eps_s6 * (6.0 - 12.0 * s6) - coulomb) * inv_r_sq
                g[0, b], g[1, b], g[2, b] = scale * d0, scale * d1, scale * d2
            _add(f, j, -1.0, g[0], g[1], g[2], _CHUNK)
            _add(f, i, 1.0, g[0], g[1], g[2], _CHUNK)
        for t in range(cut.shape[0]):  # reaction-field Coulomb + (switched) LJ inside the cutoff
            i, j = cut[t, 0], cut[t, 1]
            four_eps, sigma_sq, qq = cut_p[t, 0], cut_p[t, 1], cut_p[t, 2]
            for b in range(_CHUNK):
                d0, d1, d2 = c[0, j, b] - c[0, i, b], c[1, j, b] - c[1, i, b], c[2, j, b] - c[2, i, b]
                inv_r = 1.0 / math.sqrt(d0 * d0 + d1 * d1 + d2 * d2)
                r = 1.0 / inv_r
                s2 = sigma_sq * inv_r * inv_r
                s6 = s2 * s2 * s2
                four_eps_s6 = four_eps * s6
                lj = four_eps_s6 * (s6 - 1.0)
                r_dlj = four_eps_s6 * (6.0 - 12.0 * s6)
                if switch >= 0.0:
                    width = cutoff - switch
                    s = (r - switch) / width
                    s = s if s > 0.0 else 0.0
                    factor = 1.0 - s * s * s * (10.0 - 15.0 * s + 6.0 * s * s)
                    r_dlj = r_dlj * factor - lj * (30.0 * s * s * (1.0 - s) * (1.0 - s) / width) * r
                    lj = lj * factor
                inside = r < cutoff
                e[b] += qq * (inv_r + k_rf * r * r - c_rf) + lj if inside else 0.0
                scale = (qq * (2.0 * k_rf * r * r - inv_r) + r_dlj) * inv_r * inv_r if inside else 0.0
                g[0, b], g[1, b], g[2, b] = scale * d0, scale * d1, scale * d2
            _add(f, j, -1.0, g[0], g[1], g[2], _CHUNK)
            _add(f, i, 1.0, g[0], g[1], g[2], _CHUNK)
        for a in range(n_atoms):
            for k in range(3):
                for b in range(m):
                    forces[lo + b, a, k] = f[k, a, b]
        for b in range(m):
            energy[lo + b] = e[b]


_OPTIONS = dict(cache=True, error_model="numpy", boundscheck=False)
_parallel_kernel = numba.njit(parallel=True, **_OPTIONS)(_kernel)
_serial_kernel = numba.njit(**_OPTIONS)(_kernel)  # the same arithmetic, for batches of one block
