#!/usr/bin/env bash
# Multi-node GPU training under SLURM: one JAX process per GPU (default) or per node.
#
#   sbatch launch/slurm.sh configs/X.py /shared/runs/x [--config.train.steps=1000 ...]
#   sbatch --nodes=4 --ntasks-per-node=1 launch/slurm.sh configs/X.py /shared/runs/x
#
# Every process runs `python -m mtjax.main`; mtjax.distributed.maybe_initialize
# sees MTJAX_COORDINATOR=auto and calls jax.distributed.initialize(), which
# reads SLURM's variables (SLURM_STEP_NODELIST, SLURM_NTASKS, SLURM_PROCID,
# SLURM_LOCALID): the first node is the coordinator, SLURM_PROCID the process
# id, and with one task per GPU each process keeps GPU number SLURM_LOCALID.
# WORKDIR must be on storage every node sees (checkpoints are written jointly).
# Environment: MTJAX_VENV (default $SLURM_SUBMIT_DIR/.venv), a virtualenv with
#   pip install -e . "jax[cuda12]==<the jax version in setup.py>"
#
#SBATCH --job-name=mtjax
#SBATCH --nodes=2
#SBATCH --gpus-per-node=8
#SBATCH --ntasks-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
set -euo pipefail

if [[ $# -lt 2 ]]; then
  echo "usage: sbatch launch/slurm.sh CONFIG WORKDIR [--config.KEY=VALUE ...]" >&2
  exit 2
fi
CONFIG=$1
WORKDIR=$2
shift 2

cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
VENV=${MTJAX_VENV:-$PWD/.venv}
if [[ -f "$VENV/bin/activate" ]]; then
  # shellcheck disable=SC1091
  . "$VENV/bin/activate"
fi

export MTJAX_COORDINATOR=auto
# One process per node: JAX would otherwise keep only GPU SLURM_LOCALID (= 0),
# so hand every GPU of the node to the one process.
if [[ "${SLURM_NTASKS_PER_NODE:-}" == "1" ]]; then
  gpus=${SLURM_GPUS_ON_NODE:-$(nvidia-smi -L | wc -l)}
  JAX_LOCAL_DEVICE_IDS=$(seq -s, 0 $((gpus - 1)))
  export JAX_LOCAL_DEVICE_IDS
fi

echo "mtjax: ${SLURM_NNODES:-?} nodes, ${SLURM_NTASKS:-?} processes, config=$CONFIG workdir=$WORKDIR"
# --kill-on-bad-exit: if one process fails, stop all (the rest would wait in a
# collective forever); --label prefixes each line with the process id.
srun --kill-on-bad-exit=1 --label \
  python -m mtjax.main --config="$CONFIG" --workdir="$WORKDIR" "$@"
