#!/usr/bin/env bash
# Train on a SLURM GPU cluster: one process per GPU, JAX's distributed runtime
# initialised from SLURM's variables (jax.distributed.initialize() reads
# SLURM_JOB_NODELIST, SLURM_NTASKS, SLURM_PROCID and SLURM_LOCALID itself).
#
#   sbatch --nodes=2 --ntasks-per-node=8 --gpus-per-node=8 launch/slurm_gpu.sh \
#       --config=configs/pretrain.py:nomic_v2_moe --config.mesh.expert=8
#
# WORKDIR defaults to ./workdirs/$SLURM_JOB_ID and must be on a shared file system.
# A preempted job (SIGTERM) saves a checkpoint and exits 143; the job is then
# requeued and resumes from that checkpoint.
#SBATCH --job-name=moe-embed
#SBATCH --gpus-per-task=1
#SBATCH --cpus-per-task=8
#SBATCH --output=moe-embed-%j.log
#SBATCH --requeue
set -euo pipefail

WORKDIR="${WORKDIR:-${PWD}/workdirs/${SLURM_JOB_ID:-local}}"
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"

# Each task sees only its own GPU; jax.distributed joins them into one mesh.
status=0
srun --kill-on-bad-exit=1 python3 launch/train.py --distributed --workdir="${WORKDIR}" "$@" \
  || status=$?
if [[ "${status}" -eq 143 && -n "${SLURM_JOB_ID:-}" ]]; then
  echo "Preempted after saving a checkpoint; requeueing job ${SLURM_JOB_ID}."
  scontrol requeue "${SLURM_JOB_ID}"
fi
exit "${status}"
