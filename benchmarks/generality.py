"""Does the default path find every state, on systems it was not tuned for? (issue: rare states)

For each system (double_well; alanine_dipeptide_implicit and trialanine_implicit at 300 K) this script

1. runs the default commands as a user would, in this process through ``openmm_snf.cli.main``:
   ``md SYSTEM --out data.dcd`` (parallel tempering), ``train SYSTEM --data data.dcd --out run`` and
   ``sample run --n N [--anneal K] --out samples.dcd``, timing each stage and counting its energy
   evaluations (every configuration the batched energy model evaluates);
2. prints for each backbone phi (the double well: x) ΔF = F(phi > 0) − F(phi < 0) with its 95% bootstrap
   interval, the Kish ESS, the Pareto k-hat, the verdict, and KL(reference || samples) of the
   reweighted phi and psi marginals;
3. compares with a reference: exact quadrature for the double well; for the peptides, independent runs of
   replica-exchange umbrella sampling (Langevin dynamics; GHMC mixed too slowly) on a grid over each
   (phi, psi), pooled into one MBAR. Each run's frames are cached in ``benchmarks/cache/`` (ignored by
   git); the pooled result (ΔF, interval, each run's own ΔF, wall time, reweighted phi/psi histograms) is
   kept small in ``benchmarks/references.json``, in git, so that a fresh machine does not spend an hour on it;
   its interval is MBAR's, or the batch means' of time blocks of every run when that is wider;
4. at equal cost: the same flow alone, drawing as many samples as the annealed sampler spent energy
   evaluations; and the wall time umbrella sampling would need for an interval as narrow as the
   sampler's, ``t_umbrella x (width_umbrella / width_sampler)²`` (MBAR errors shrink as 1/sqrt(time)).

Usage:
    python benchmarks/generality.py [--systems double_well,alanine_dipeptide_implicit,trialanine_implicit]
                                    [--samples N] [--anneal auto] [--umbrella 24,500,100]
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import mdtraj
import numpy as np
import scipy.stats

from openmm_snf import load_system
from openmm_snf.analysis import AnalysisError, compute_cvs, free_energy_difference, histogram_kl_divergence
from openmm_snf.analysis.diagnostics import diagnose
from openmm_snf.analysis.profiles import ANGLE_RANGE
from openmm_snf.analysis.umbrella import (MIN_NEIGHBOUR_OVERLAP, dihedral_grid_biases, dihedral_grid_centers, next_windows,
                                          umbrella_dihedral, umbrella_grid, umbrella_mbar)
from openmm_snf.cli import main as cli
from openmm_snf.energy.base import EnergyModel
from openmm_snf.io import read_weighted_trajectory
from openmm_snf.md import UmbrellaBias
from openmm_snf.reus import ExchangeSettings
from openmm_snf.runs import load_run
from openmm_snf.sampling import sample
from openmm_snf.weights import kish_ess, pareto_khat

CACHE = Path(__file__).resolve().parent / "cache"
SYSTEMS = ("double_well", "alanine_dipeptide_implicit", "trialanine_implicit")
REFERENCES = Path(__file__).resolve().parent / "references.json"
#: umbrella reference for each phi: independent runs pooled into one MBAR, each (windows per torsion, on a grid
#: of N x N over phi and its psi; frames per window; Langevin steps of 2 fs per frame, hydrogens at 3 amu;
#: seed of the noise and of the window starts; starts: "md" frames of the md data near each window's centre,
#: "one" every window from the system's structure). Langevin grids without exchanges (run_md): at 16 x 16 and
#: 25 kT/rad² MBAR linked neighbours too weakly near the barriers (overlap down to 0.002), and alanine
#: dipeptide gave 5.64 and 6.51 kT from two sets of starts, each with an interval of +-0.11. Tri-alanine's phi1
#: blocks scatter about twice as much as phi2's (batch means, with_block_scatter), so phi1 has more runs
_TRIALANINE_RUNS = ((24, 500, 100, 11, "md"), (24, 1000, 100, 12, "md"), (24, 1000, 100, 13, "md"))
UMBRELLA = {"alanine_dipeptide_implicit": {"phi": ((24, 500, 100, 11, "md"), (24, 1000, 100, 12, "md"),
                                                   (24, 500, 100, 11, "one"))},
            "trialanine_implicit": {"phi1": _TRIALANINE_RUNS + ((24, 1000, 100, 14, "md"), (24, 1000, 100, 15, "md")),
                                    "phi2": _TRIALANINE_RUNS}}
UMBRELLA_K = 50.0  # kT/rad²: sigma 0.14 rad, about half the grid spacing
BLOCK_FRAMES = 250  # frames per window (50 ps) of each block of the reference's batch-means interval
HISTOGRAM_BINS = 64  # of the reference's reweighted phi and psi marginals, for the KLs (histogram_kl_divergence's)


class EvaluationCounter:
    """Counts the configurations every energy model of this process evaluates (patches EnergyModel._run)."""

    def __init__(self):
        self.count = 0
        original = EnergyModel._run
        counter = self

        def counting(model, x, energies):
            counter.count += int(x.shape[0])
            return original(model, x, energies)

        EnergyModel._run = counting

    def take(self) -> int:
        count, self.count = self.count, 0
        return count


def double_well_exact() -> float:
    x = np.linspace(-5, 5, 400001)
    p = np.exp(-(x**4 - 6 * x**2 - 0.5 * x) + 9.0)
    return float(-np.log(p[x > 0].sum() / p[x < 0].sum()))


def state_cvs(mol) -> list[str]:
    """The CVs whose sign defines the states: x for the double well, every phi of a peptide."""
    return [name for name in mol.cvs if name == "x" or name.startswith("phi")]


def torsion_pairs(mol) -> list[tuple[str, str]]:
    """(phi, psi) CV names of each residue (phi/psi or phiN/psiN)."""
    return [(name, "psi" + name[3:]) for name in mol.cvs if name.startswith("phi") and "psi" + name[3:] in mol.cvs]


def window_starts(mol, data, names: tuple[str, str], centers: np.ndarray, seed: int = 11) -> np.ndarray:
    """(windows, n_atoms, 3) one start per window: a frame of the ``md`` data drawn with its weight for T times
    the window's bias, so that the torsions the windows do not hold (another residue's phi and psi) start
    from about their equilibrium share instead of all from the one structure, which 60-ps windows keep."""
    values = compute_cvs(data.traj, list(names), cvs=mol.cvs)
    rng = np.random.default_rng(seed)
    picks = []
    for center in centers:
        bias = sum(UmbrellaBias("dihedral", tuple(mol.cvs[name]["atoms"]), (c,), UMBRELLA_K).reduced_energies(
            values[name])[0] for name, c in zip(names, center))
        log_p = data.log_weights - bias
        p = np.exp(log_p - log_p.max())
        picks.append(rng.choice(len(p), p=p / p.sum()))
    return data.traj.xyz[np.array(picks)].astype(np.float64)


def grid_biases(mol, phi: str, per_axis: int) -> tuple[UmbrellaBias, UmbrellaBias]:
    """The (phi, psi) biases of :func:`~openmm_snf.analysis.umbrella.umbrella_grid`'s windows, for MBAR."""
    names = (phi, "psi" + phi[3:])
    atoms = [umbrella_dihedral(mol, name)[0] for name in names]
    for name, one in zip(names, atoms):  # the frames' stored CVs must be the biased dihedrals
        if list(one) != list(mol.cvs[name]["atoms"]):
            raise SystemExit(f"{mol.name}: CV {name} has atoms {mol.cvs[name]['atoms']}, the bias {one}")
    return dihedral_grid_biases(atoms, per_axis, UMBRELLA_K)


def umbrella_run(mol, phi: str, run: tuple[int, int, int, int, str], data_path: Path,
                 metropolize: bool = False) -> dict:
    """One replica-exchange umbrella run on a grid over (phi, its psi) (:func:`~openmm_snf.analysis.umbrella.umbrella_grid`,
    Langevin dynamics at 2 fs; ``metropolize``: GHMC, exact at its time step but slow to mix: on tri-alanine
    its grids gave 4.49 and 5.43 kT from two start sets, where Langevin's gave 3.97): every frame's CV values
    and the wall time, cached in ``benchmarks/cache/``. Both torsions are held: along phi alone, windows with
    phi > 0 kept the psi basin they were pulled into (tri-alanine's psi1 switched 0-1 times in 600 ps), and
    the estimates moved by 0.9 kT with the window length. Without exchanges, (phi, psi) grids of Langevin MD
    depended on their starts (alanine dipeptide 16 x 16: 5.64 or 6.51 kT). Each window starts from a frame of
    the ``md`` data at ``data_path`` near its centre (:func:`window_starts`; starts "one": all from the
    system's structure)."""
    per_axis, frames, steps, seed, starts_tag = run
    if starts_tag not in ("md", "one"):
        raise SystemExit(f"umbrella run {run}: starts must be 'md' or 'one'")
    psi = "psi" + phi[3:]
    dynamics = "ghmc" if metropolize else "langevin"
    path = CACHE / (f"generality_reus_{mol.name}_{phi}{psi}_{per_axis}x{per_axis}x{frames}x{steps}_"
                    f"{starts_tag}starts_seed{seed}_{dynamics}.npz")
    if path.is_file():
        with np.load(path) as stored:
            return {key: stored[key] for key in stored.files}
    start = time.perf_counter()
    starts = None
    if starts_tag == "md":
        starts = window_starts(mol, read_weighted_trajectory(data_path), (phi, psi),
                               dihedral_grid_centers(per_axis, 2), seed=seed)
    grid = umbrella_grid(mol, (phi, psi), per_axis,
                         ExchangeSettings(n_frames=frames, steps_per_frame=steps, equilibration_steps=5000, seed=seed,
                                          metropolize=metropolize), force_constant=UMBRELLA_K, starts=starts)
    values = compute_cvs(mdtraj.Trajectory(grid.xyz, mol.mdtraj_topology()), list(mol.cvs), cvs=mol.cvs)
    out = {**{f"cv_{name}": v for name, v in values.items()},
           "md_acceptance": np.nan if grid.md_acceptance is None else grid.md_acceptance,
           "exchange_acceptance": np.asarray(grid.exchange_acceptance), "wall_s": time.perf_counter() - start}
    CACHE.mkdir(parents=True, exist_ok=True)
    np.savez(path, **out)
    return out


def umbrella_reference(mol, phi: str, runs, data_path: Path) -> dict:
    """ΔF(phi>0 − phi<0) of the umbrella ``runs`` (:func:`umbrella_run`) pooled into one MBAR (each window's
    frames of all runs together): ΔF, its 95% interval, each run's own ΔF and interval, the least MBAR overlap
    of neighbouring windows, the runs' summed wall time, and the reweighted phi and psi histograms. Read from
    ``benchmarks/references.json`` when it holds these runs, else computed and stored there."""
    runs = tuple(tuple(int(v) for v in run[:4]) + (str(run[4]),) for run in runs)
    key = f"{mol.name}:{phi}:" + ";".join(",".join(map(str, run)) for run in runs)
    stored = json.loads(REFERENCES.read_text()) if REFERENCES.is_file() else {}
    if "blocks" in stored.get(key, {}):
        return with_block_scatter(stored[key])
    if len({run[0] for run in runs}) != 1:
        raise SystemExit(f"pooled umbrella runs need one grid, got {runs}")
    psi = "psi" + phi[3:]
    per_axis = runs[0][0]
    biases = grid_biases(mol, phi, per_axis)
    n_windows = per_axis ** 2
    frames = [umbrella_run(mol, phi, run, data_path) for run in runs]

    def solve(parts):
        cvs = {name: np.concatenate([part[f"cv_{name}"].reshape(n_windows, -1) for part in parts], axis=1)
               for name in (phi, psi)}
        analysis = umbrella_mbar((cvs[phi], cvs[psi]), biases)
        flat = {name: values.reshape(-1) for name, values in cvs.items()}
        result = analysis.delta_f(flat[phi] > 0, flat[phi] < 0, labels=(f"{phi}>0", f"{phi}<0"))
        return analysis, flat, result

    per_run = [solve([part])[2] for part in frames]
    blocks = [solve([{field: part[field].reshape(n_windows, -1)[:, start:start + BLOCK_FRAMES].reshape(-1)
                      for field in (f"cv_{phi}", f"cv_{psi}")}])[2].delta_f
              for part in frames for start in range(0, part[f"cv_{phi}"].size // n_windows - BLOCK_FRAMES + 1,
                                                    BLOCK_FRAMES)]
    analysis, flat, result = solve(frames)
    weights = np.exp(analysis.log_weights)
    histograms = {name: np.histogram(flat[name], bins=HISTOGRAM_BINS, range=ANGLE_RANGE, weights=weights)[0].tolist()
                  for name in (phi, psi)}
    reference = {"delta_f": result.delta_f, "ci_low": result.ci_low, "ci_high": result.ci_high,
                 "runs": [{"run": run, "delta_f": one.delta_f, "ci_low": one.ci_low, "ci_high": one.ci_high}
                          for run, one in zip(runs, per_run)],
                 "block_frames": BLOCK_FRAMES, "blocks": blocks,
                 "min_overlap": float(analysis.overlap_matrix()[np.arange(n_windows),
                                                                next_windows((per_axis, per_axis))].min()),
                 "wall_s": float(sum(float(part["wall_s"]) for part in frames)),
                 "histogram_phi": histograms[phi], "histogram_psi": histograms[psi]}
    stored = json.loads(REFERENCES.read_text()) if REFERENCES.is_file() else {}  # another run may have added some
    stored[key] = reference
    REFERENCES.write_text(json.dumps(stored, indent=1))
    return with_block_scatter(reference)


def with_block_scatter(reference: dict) -> dict:
    """The reference with its interval widened to the batch means' one when that is wider: the ΔF of each
    block of ``block_frames`` frames per window (of every run, each block solved alone) scatter by s, and the
    pooled ΔF's standard error is s / sqrt(blocks), times Student's t for the 95% interval. MBAR's own error
    assumes every window's decorrelated frames independent; in replica exchange a slow motion the window's
    bias energy does not see travels between windows, and on tri-alanine the runs' ΔF scattered 2-4 times
    more than MBAR said. MBAR's interval stays as ``mbar_ci_low``/``mbar_ci_high``."""
    blocks = np.asarray(reference["blocks"], dtype=np.float64)
    half = (reference["ci_high"] - reference["ci_low"]) / 2
    block_half = float("nan")
    if blocks.size > 1:
        block_half = float(scipy.stats.t.ppf(0.975, blocks.size - 1) * blocks.std(ddof=1) / np.sqrt(blocks.size))
        half = max(half, block_half)
    return {**reference, "mbar_ci_low": reference["ci_low"], "mbar_ci_high": reference["ci_high"],
            "block_half_width": block_half, "ci_low": reference["delta_f"] - half, "ci_high": reference["delta_f"] + half}


def reference_kl(histogram, values, log_weights) -> float:
    """KL(reference || samples) of a marginal from the reference's stored histogram: its bin centres weighted
    by the bin contents are the same histogram for :func:`histogram_kl_divergence`."""
    centres = ANGLE_RANGE[0] + (np.arange(HISTOGRAM_BINS) + 0.5) * (ANGLE_RANGE[1] - ANGLE_RANGE[0]) / HISTOGRAM_BINS
    with np.errstate(divide="ignore"):
        log_p = np.log(np.asarray(histogram, dtype=np.float64))
    return histogram_kl_divergence(centres, values, reference_log_weights=log_p, log_weights=log_weights,
                                   bins=HISTOGRAM_BINS)


def measure(traj, log_weights, mol, refs: dict, exact: float | None) -> dict:
    """ΔF per state CV (with interval and error), ESS, k-hat, verdict and reweighted KLs of weighted samples."""
    values = compute_cvs(traj, list(mol.cvs), cvs=mol.cvs)
    states = {}
    for name in state_cvs(mol):
        states[f"{name}>0"], states[f"{name}<0"] = values[name] > 0, values[name] < 0
    verdict = diagnose(log_weights, states)
    out = {"ess": kish_ess(log_weights), "n": len(log_weights), "khat": pareto_khat(log_weights),
           "reliable": verdict.reliable, "cvs": {}}
    for name in state_cvs(mol):
        entry = {"reference": exact if exact is not None else float(refs[name]["delta_f"])}
        try:
            result = free_energy_difference(log_weights, values[name] > 0, values[name] < 0, n_bootstrap=300)
            entry.update(delta_f=result.delta_f, ci_low=result.ci_low, ci_high=result.ci_high,
                         error=abs(result.delta_f - entry["reference"]))
        except AnalysisError as err:  # an empty state: the sampler missed it
            entry.update(delta_f=None, error=float("inf"), missing=str(err))
        out["cvs"][name] = entry
    for phi, psi in torsion_pairs(mol):
        ref = refs[phi]
        out["cvs"][phi]["kl_phi"] = reference_kl(ref["histogram_phi"], values[phi], log_weights)
        out["cvs"][phi]["kl_psi"] = reference_kl(ref["histogram_psi"], values[psi], log_weights)
    return out


def run_system(system: str, args, counter: EvaluationCounter) -> dict:
    mol = load_system(system)
    folder = Path(args.out) / system
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    stages = {}
    for stage, argv in (("md", ["md", system, "--out", str(folder / "data.dcd")]),
                        ("train", ["train", system, "--data", str(folder / "data.dcd"), "--out", str(folder / "run")]),
                        ("sample", ["sample", str(folder / "run"), "--out", str(folder / "samples.dcd"), "--anneal",
                                    str(args.anneal)] + (["--n", str(args.samples)] if args.samples else []))):
        counter.take()
        start = time.perf_counter()
        status = cli(argv)
        stages[stage] = {"wall_s": time.perf_counter() - start, "evaluations": counter.take()}
        if status != 0:
            raise SystemExit(f"{system}: 'openmm-snf {' '.join(argv)}' exited with {status}")
    exact = double_well_exact() if system == "double_well" else None
    refs = {} if exact is not None else {name: umbrella_reference(mol, name, args.umbrella or UMBRELLA[system][name],
                                                                  folder / "data.dcd") for name in state_cvs(mol)}
    samples = read_weighted_trajectory(folder / "samples.dcd")
    result = {"system": system, "stages": stages, "default": measure(samples.traj, samples.log_weights, mol, refs,
                                                                     exact)}
    # the flow alone at the same number of energy evaluations as the sampler
    n_equal = int(min(stages["sample"]["evaluations"], args.max_equal_cost_samples))
    start = time.perf_counter()
    drawn = sample(load_run(folder / "run"), n_equal, seed=1, progress=False)
    flow_s = time.perf_counter() - start
    traj = mdtraj.Trajectory(drawn["xyz"].astype(np.float32), mol.mdtraj_topology())
    finite = np.isfinite(drawn["log_weights"])
    result["flow_equal_cost"] = {**measure(traj[np.flatnonzero(finite)], drawn["log_weights"][finite], mol, refs,
                                           exact), "wall_s": flow_s}
    result["references"] = {name: {key: value for key, value in r.items() if not key.startswith("histogram")}
                            for name, r in refs.items()}
    return result


def umbrella_time_ratio(result: dict) -> float | None:
    """Sampler's wall time / umbrella's wall time for the same interval width (the widest state CV)."""
    if not result["references"]:
        return None
    total = sum(stage["wall_s"] for stage in result["stages"].values())
    ratios = []
    for name, ref in result["references"].items():
        entry = result["default"]["cvs"][name]
        if entry.get("delta_f") is None:
            return float("inf")
        width = entry["ci_high"] - entry["ci_low"]
        umbrella_s = ref["wall_s"] * ((ref["ci_high"] - ref["ci_low"]) / width) ** 2
        ratios.append(total / umbrella_s)
    return max(ratios)


def print_result(result: dict) -> None:
    print(f"\n== {result['system']}")
    for stage, cost in result["stages"].items():
        print(f"  {stage:7s} {cost['wall_s']:8.1f} s  {cost['evaluations']:>12,d} energy evaluations")
    for name, ref in result["references"].items():
        batch = len(ref["blocks"]) > 1
        weak = ("" if ref["min_overlap"] >= MIN_NEIGHBOUR_OVERLAP else " (weakly linked windows: MBAR's interval is not to be "
                "trusted" + (", the batch means' is" if batch else "") + ")")
        blocks = (f"; batch means of {len(ref['blocks'])} blocks of {ref['block_frames']} frames: "
                  f"+-{ref['block_half_width']:.3f}" if batch else "; too short for batch means")
        print(f"  reference {name}: replica-exchange umbrella + MBAR dF {ref['delta_f']:.3f} [{ref['ci_low']:.3f}, "
              f"{ref['ci_high']:.3f}] kT (MBAR's [{ref['mbar_ci_low']:.3f}, {ref['mbar_ci_high']:.3f}]{blocks}) in "
              f"{ref['wall_s']:.0f} s, least neighbour overlap {ref['min_overlap']:.3f}{weak}")
        for run in ref["runs"]:
            print(f"    run {'x'.join(map(str, run['run'][:3]))} seed {run['run'][3]}, {run['run'][4]} starts: "
                  f"dF {run['delta_f']:.3f} "
                  f"[{run['ci_low']:.3f}, {run['ci_high']:.3f}]")
    for label, key in (("default sampler", "default"), ("flow alone, same E", "flow_equal_cost")):
        m = result[key]
        print(f"  {label}: n {m['n']}, Kish ESS {100 * m['ess'] / m['n']:.1f}%, k-hat {m['khat']:.2f}, "
              f"{'reliable' if m['reliable'] else 'UNRELIABLE'}")
        for name, entry in m["cvs"].items():
            if entry.get("delta_f") is None:
                print(f"    {name}: state missing ({entry['missing']})")
                continue
            kl = (f", KL phi/psi {entry['kl_phi']:.4f}/{entry['kl_psi']:.4f}" if "kl_phi" in entry else "")
            print(f"    {name}: dF {entry['delta_f']:.3f} [{entry['ci_low']:.3f}, {entry['ci_high']:.3f}] vs "
                  f"{entry['reference']:.3f}: error {entry['error']:.3f} kT{kl}")


def _umbrella_size(text: str) -> tuple[tuple[int, int, int, int]]:
    values = text.split(",")
    if len(values) != 3 or not all(v.isdigit() and int(v) > 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected WINDOWS,FRAMES,STEPS (positive integers), got {text!r}")
    return (tuple(int(v) for v in values) + (11, "md"),)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--samples", type=int, default=None, help="the sampler's --n (default: as 'sample')")
    parser.add_argument("--anneal", default="auto", help="the sampler's --anneal (default: auto, as 'sample')")
    parser.add_argument("--max-equal-cost-samples", type=int, default=200000)
    parser.add_argument("--umbrella", type=_umbrella_size, metavar="WINDOWS,FRAMES,STEPS",
                        help="size of the umbrella reference for every system, one run of seed 11 from md starts: WINDOWS per "
                        "torsion (a grid of WINDOWS x WINDOWS over each phi and its psi), FRAMES and 2-fs STEPS "
                        "per frame per window (default: UMBRELLA in this file, several runs pooled); smaller is "
                        "faster, with a wider interval")
    parser.add_argument("--out", default=str(CACHE / "generality"))
    args = parser.parse_args()
    counter = EvaluationCounter()
    results = [run_system(system, args, counter) for system in args.systems.split(",")]
    for result in results:
        print_result(result)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "results.json").write_text(json.dumps(results, indent=1, default=float))
    by_name = {r["system"]: r for r in results}
    print()
    if "double_well" in by_name:
        print(f"double_well_dF_error_kT={by_name['double_well']['default']['cvs']['x']['error']:.3f}")
    if "alanine_dipeptide_implicit" in by_name:
        r = by_name["alanine_dipeptide_implicit"]
        print(f"aldp_implicit_dF_error_kT={r['default']['cvs']['phi']['error']:.3f}")
        print(f"aldp_implicit_ess={r['default']['ess'] / r['default']['n']:.3f}")
    if "trialanine_implicit" in by_name:
        r = by_name["trialanine_implicit"]
        print(f"trialanine_max_dF_error_kT={max(e['error'] for e in r['default']['cvs'].values()):.3f}")
        print(f"trialanine_ess={r['default']['ess'] / r['default']['n']:.3f}")
    if "alanine_dipeptide_implicit" in by_name:
        print(f"aldp_implicit_time_vs_umbrella={umbrella_time_ratio(by_name['alanine_dipeptide_implicit']):.3f}")


if __name__ == "__main__":
    main()
