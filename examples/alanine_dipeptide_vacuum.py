"""Alanine dipeptide in vacuum at 1000 K, the SNF paper's setting (Wu, Köhler & Noé 2020, Sec. 5).

AMBER ff96, no constraints; training data from replica MD at 1000 K; the paper's model: 5 RealNVP
blocks (hidden [128, 128, 128], ReLU) on the internal coordinates augmented with 66 Gaussian
momenta, a Metropolis block (20 steps, λ = 0, .25, .5, .75, 1) after each; maximum likelihood,
batch 128. Prints ΔF(phi > 0 vs phi < 0) from the weighted samples next to the MD data's, and the
ESS. The run folder holds the model, metrics and MD data (``openmm-snf report RUN`` plots them).

    python examples/alanine_dipeptide_vacuum.py          # short budget, under 15 minutes on 2 CPU cores
    python examples/alanine_dipeptide_vacuum.py --full   # the paper's 1000 iterations, more MD data
"""
import argparse
import tempfile

import mdtraj
import numpy as np
import torch

from openmm_snf.analysis import compute_cvs, free_energy_difference
from openmm_snf.flows import PAPER_ALANINE_DIPEPTIDE
from openmm_snf.config import resolve_config
from openmm_snf.runs import build_run
from openmm_snf.sampling import sample

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--full", action="store_true", help="paper-scale budget (1000 iterations)")
parser.add_argument("--out", help="run folder (default: a new temporary folder)")
args = parser.parse_args()
# One torch thread: on a loaded CPU, torch's OpenMP threads fight OpenMM's and the small flow
# kernels run up to 25x slower (measured on a shared 2-core machine).
torch.set_num_threads(1)

model = {key: list(value) if isinstance(value, tuple) else value for key, value in PAPER_ALANINE_DIPEPTIDE.items()}
md = {"n_replicas": 32, "n_frames": 1000 if args.full else 250, "steps_per_frame": 250}
config = resolve_config({"source": "alanine_dipeptide_vacuum"}, overrides={
    "model": model, "data": {"md": md},
    "training": {"n_iterations": 1000 if args.full else 200, "batch_size": 128, "learning_rate": 1e-3,
                 "ess_every": 20}})
run, trainer = build_run(args.out or tempfile.mkdtemp(prefix="snf_aldp_vacuum_"), config)
print(f"{run.mol.name} at {run.mol.temperature:g} K; run folder {run.folder}")
trainer.train()

samples = sample(run, 20_000 if args.full else 2_000, seed=1)
md_data = mdtraj.load(str(run.folder / "data.dcd"), top=str(run.folder / "data.pdb"))
phi_md = compute_cvs(md_data, ["phi"], cvs=run.mol.cvs)["phi"]
md_result = free_energy_difference(np.zeros(len(phi_md)), phi_md > 0, phi_md < 0, labels=("phi>0", "phi<0"),
                                   block_length=25)   # blocks of consecutive frames: MD frames are correlated
phi = compute_cvs(mdtraj.Trajectory(samples["xyz"].astype(np.float32), run.mol.mdtraj_topology()), ["phi"],
                  cvs=run.mol.cvs)["phi"]
snf_result = free_energy_difference(samples["log_weights"], phi > 0, phi < 0, labels=("phi>0", "phi<0"))
print("SNF:    " + snf_result.summary())
print("        " + "\n        ".join(snf_result.verdict.lines()))
print("MD:     " + md_result.summary())
print(f"ESS {100 * snf_result.ess_total / snf_result.n_total:.1f}% of {snf_result.n_total} samples; "
      f"Metropolis acceptance {samples['acceptance']}")
