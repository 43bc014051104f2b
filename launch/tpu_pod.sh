#!/usr/bin/env bash
# Train on a Cloud TPU VM slice: create (or reuse) the slice, install moe-embed on
# every worker, and start launch/train.py on all of them at once.
#
#   TPU_NAME=moe-v5p-64 ZONE=us-east5-a ACCELERATOR_TYPE=v5p-64 \
#   WORKDIR=gs://my-bucket/runs/ft1 \
#   bash launch/tpu_pod.sh --config=configs/finetune.py:model=gs://my-bucket/upcycled \
#       --config.mesh.expert=8 --config.batch_size=4096
#
# Every worker runs the same command; jax.distributed.initialize() finds the
# other workers from the TPU metadata (--distributed). The workdir must be on
# GCS so all workers (and a resumed run) see the same checkpoints.
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME, the TPU VM slice name}"
: "${ZONE:?set ZONE, e.g. us-east5-a}"
: "${WORKDIR:?set WORKDIR, a gs:// path shared by all workers}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v5p-8}"
RUNTIME_VERSION="${RUNTIME_VERSION:-v2-alpha-tpuv5}"
PROJECT_FLAG=()
if [[ -n "${PROJECT:-}" ]]; then
  PROJECT_FLAG=(--project="${PROJECT}")
fi
REPO_URL="${REPO_URL:-$(git config --get remote.origin.url || true)}"
BRANCH="${BRANCH:-main}"

if ! gcloud compute tpus tpu-vm describe "${TPU_NAME}" --zone="${ZONE}" "${PROJECT_FLAG[@]}" \
    >/dev/null 2>&1; then
  echo "Creating TPU slice ${TPU_NAME} (${ACCELERATOR_TYPE}) in ${ZONE}."
  gcloud compute tpus tpu-vm create "${TPU_NAME}" --zone="${ZONE}" "${PROJECT_FLAG[@]}" \
      --accelerator-type="${ACCELERATOR_TYPE}" --version="${RUNTIME_VERSION}"
else
  echo "Reusing TPU slice ${TPU_NAME}."
fi

# Quote the training flags once so they survive the remote shell.
TRAIN_ARGS=""
for arg in "$@"; do
  TRAIN_ARGS+=" $(printf '%q' "${arg}")"
done

REMOTE_SCRIPT=$(cat <<REMOTE
set -euo pipefail
if [[ ! -d moe-embed ]]; then git clone --branch ${BRANCH} ${REPO_URL} moe-embed; fi
cd moe-embed && git fetch -q origin ${BRANCH} && git checkout -q origin/${BRANCH}
pip install -q -e . 'jax[tpu]'
# Exit 143: SIGTERM (a maintenance event) arrived and a checkpoint was saved;
# run again to resume from it. Any other failure stops the job.
until python3 launch/train.py --distributed --workdir=${WORKDIR} ${TRAIN_ARGS}; do
  rc=\$?
  if [[ \$rc -ne 143 ]]; then exit \$rc; fi
  echo "Preempted after a checkpoint; resuming."
done
REMOTE
)

gcloud compute tpus tpu-vm ssh "${TPU_NAME}" --zone="${ZONE}" "${PROJECT_FLAG[@]}" \
    --worker=all --command="${REMOTE_SCRIPT}"
