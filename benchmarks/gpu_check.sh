#!/usr/bin/env bash
# The GPU checks of openmm-snf in one go, sized for under 8 minutes on one H100/H200:
#   1. the CUDA tests (pytest -k cuda),
#   2. the bridge benchmark with the CUDA platform: vacuum and implicit solvent, B up to 4096,
#   3. a short training and an annealed sampling of alanine dipeptide in implicit solvent, on the
#      platform "auto" picks (it must pick CUDA there) and torch on the GPU.
# Logs (at most 7 files) go to one folder: $OUT if set (the device machine's), else ./gpu_check_logs;
# summary.txt holds each step's exit status, time and last lines. Exit status 0 when every step passed,
# 1 when one failed, 2 when there is no usable CUDA platform.
#
# The GPU machine cannot download. Prepare once on the development machine, from the project root:
#   bash ../shared/device/fetch_wheels.sh        # OpenMM 8.6.1 + its CUDA 13 platform, mdtraj -> .whl/
#   mkdir -p .device && cp ../shared/device/setup_device.sh .device/ && echo /.device/ >> .git/info/exclude
# then on the GPU machine, with .whl and .device carried along:  bash benchmarks/gpu_check.sh
set -uo pipefail
logs=${OUT:-$PWD/gpu_check_logs}
work=$(mktemp -d)  # the run folder and samples stay out of $logs (few files come back from there)
mkdir -p "$logs"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
status=0

step() {  # step NAME SECONDS COMMAND...: run with a time limit into NAME.log, note the outcome
    local name=$1 limit=$2 start=$SECONDS rc
    shift 2
    echo "== $name (limit ${limit} s): $*" >> "$logs/summary.txt"
    timeout "$limit" "$@" > "$logs/$name.log" 2>&1
    rc=$?
    { echo "== $name: exit $rc after $((SECONDS - start)) s"; tr '\r' '\n' < "$logs/$name.log" | grep -v '^ *$' | tail -n 4 | sed 's/^/   /'; } \
        >> "$logs/summary.txt"
    [ "$rc" -eq 0 ] || status=1
}

if [ -f .device/setup_device.sh ]; then
    # shellcheck disable=SC1091
    source .device/setup_device.sh > "$logs/setup.log" 2>&1 || { echo "setup failed: see $logs/setup.log"; exit 2; }
fi
python3 - >> "$logs/setup.log" 2>&1 <<'EOF' || { echo "openmm-snf gpu_check: error: no usable CUDA (see $logs/setup.log)"; exit 2; }
import torch
from openmm_snf.energy.platforms import choose_platform
choice = choose_platform(None)
print(f"auto platform: {choice}; torch {torch.__version__}, CUDA device: {torch.cuda.is_available()}")
assert torch.cuda.is_available() and choice.name == "CUDA", "no CUDA device for torch or OpenMM"
EOF

step tests 60 python3 -m pytest -q -rs tests -k cuda
step bridge 200 python3 benchmarks/bridge.py --quick --batch-sizes 64 512 4096
# MD data (the default, tempering, needs pymbar, which the GPU machine lacks) and a plain flow (for --anneal)
cat > "$work/config.yaml" <<'YAML'
data: {method: md, md: {n_frames: 250, steps_per_frame: 100, n_replicas: 16, equilibration_steps: 1000}}
model: {stochastic: null}
training: {checkpoint_every: 60, ess_every: 20}
YAML
step train 120 python3 -m openmm_snf.cli train alanine_dipeptide_implicit --out "$work/run" --iterations 60 \
    --config "$work/config.yaml" --device cuda
grep -m1 "OpenMMEnergy on" "$logs/train.log" | sed 's/^/   the energy: /' >> "$logs/summary.txt"  # the platform chosen
step sample 60 python3 -m openmm_snf.cli sample "$work/run" --n 4096 --anneal 20 --out "$work/samples.dcd"
cp "$work/run/metrics.jsonl" "$logs/" 2>/dev/null
rm -rf "$work"
cat "$logs/summary.txt"
exit $status
