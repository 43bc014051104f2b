#!/usr/bin/env bash
# Train on a Cloud TPU VM slice: create (or reuse) the slice, install moe-embed on
# every worker, and start launch/train.py on all of them at once.
#
#   TPU_NAME=moe-v5p-64 ZONE=us-east5-a ACCELERATOR_TYPE=v5p-64 \
#   WORKDIR=gs://my-bucket/runs/ft1 \
#   bash launch/tpu_pod.sh --config=configs/finetune.py:model=gs://my-bucket/upcycled \
#       --config.mesh.expert=8 --config.batch_size=4096
#
#   bash launch/tpu_pod.sh --dry_run ...   # print every gcloud command, in order; run none
#
# First, on this machine, the train step is compiled for ACCELERATOR_TYPE
# (launch/compile.py, the [tpu] extra; minutes for nomic_v2_moe): a config that
# does not fit the slice's memory stops here, before any slice is created or
# used. --skip_compile_check skips it; with --dry_run the check is printed, not run.
#
# Every worker runs the same command; jax.distributed.initialize() finds the
# other workers from the TPU metadata (--distributed). The workdir must be on
# GCS: a TPU VM's disk goes with the VM, and every worker (and a resumed run)
# must see the same checkpoints. Data, models and tokenizers may be gs:// too.
set -euo pipefail

DRY_RUN=0
COMPILE_CHECK=1
TRAIN_FLAGS=()
COMPILE_FLAGS=()  # The --config flags: what launch/compile.py takes of the training flags.
for arg in "$@"; do
  if [[ "${arg}" == "--dry_run" || "${arg}" == "--dry_run=true" ]]; then
    DRY_RUN=1
  elif [[ "${arg}" == "--skip_compile_check" || "${arg}" == "--skip_compile_check=true" ]]; then
    COMPILE_CHECK=0
  else
    TRAIN_FLAGS+=("${arg}")
    if [[ "${arg}" == --config=* || "${arg}" == --config.* ]]; then
      COMPILE_FLAGS+=("${arg}")
    fi
  fi
done

: "${TPU_NAME:?set TPU_NAME, the TPU VM slice name}"
: "${ZONE:?set ZONE, e.g. us-east5-a}"
: "${WORKDIR:?set WORKDIR, a gs:// path shared by all workers}"
if [[ "${WORKDIR}" != gs://?* ]]; then
  echo "tpu_pod.sh: WORKDIR=${WORKDIR} is not a gs:// path; a TPU VM's disk is lost with the VM and not shared by its workers, so use WORKDIR=gs://BUCKET/RUN." >&2
  exit 1
fi
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v5p-8}"
RUNTIME_VERSION="${RUNTIME_VERSION:-v2-alpha-tpuv5}"
PROJECT_FLAG=()
if [[ -n "${PROJECT:-}" ]]; then
  PROJECT_FLAG=(--project="${PROJECT}")
fi
REPO_URL="${REPO_URL:-$(git config --get remote.origin.url || true)}"
BRANCH="${BRANCH:-main}"
if [[ -z "${REPO_URL}" ]]; then
  echo "tpu_pod.sh: set REPO_URL, the git URL the workers clone moe-embed from (this checkout has no origin remote)." >&2
  exit 1
fi

# Runs a gcloud command, or with --dry_run prints it (shell-quoted) instead.
gcloud_run() {
  if [[ "${DRY_RUN}" == 1 ]]; then
    printf 'gcloud'
    printf ' %q' "$@"
    printf '\n'
  else
    gcloud "$@"
  fi
}

# The compile check: the step train.py would run, compiled here for the slice's chips.
CHECK=(python3 "$(dirname "$0")/compile.py" --topology="${ACCELERATOR_TYPE}"
       "${COMPILE_FLAGS[@]+"${COMPILE_FLAGS[@]}"}")
if [[ "${COMPILE_CHECK}" == 1 && "${DRY_RUN}" == 1 ]]; then
  echo "# compile check on this machine first (--skip_compile_check skips it):"
  printf '%q ' "${CHECK[@]}"
  printf '\n'
elif [[ "${COMPILE_CHECK}" == 1 ]]; then
  echo "Compiling the train step for ${ACCELERATOR_TYPE} on this machine first (--skip_compile_check skips it)."
  if ! "${CHECK[@]}"; then
    echo "tpu_pod.sh: the train step does not compile within ${ACCELERATOR_TYPE}'s memory (see above); no slice was created or used. Apply the change launch/compile.py --fit prints, or pass --skip_compile_check." >&2
    exit 1
  fi
fi

DESCRIBE=(compute tpus tpu-vm describe "${TPU_NAME}" --zone="${ZONE}" "${PROJECT_FLAG[@]}")
CREATE=(compute tpus tpu-vm create "${TPU_NAME}" --zone="${ZONE}" "${PROJECT_FLAG[@]}"
        --accelerator-type="${ACCELERATOR_TYPE}" --version="${RUNTIME_VERSION}")
if [[ "${DRY_RUN}" == 1 ]]; then
  gcloud_run "${DESCRIBE[@]}"
  echo "# if the slice does not exist:"
  gcloud_run "${CREATE[@]}"
elif ! gcloud "${DESCRIBE[@]}" >/dev/null 2>&1; then
  echo "Creating TPU slice ${TPU_NAME} (${ACCELERATOR_TYPE}) in ${ZONE}."
  gcloud_run "${CREATE[@]}"
else
  echo "Reusing TPU slice ${TPU_NAME}."
fi

# Quote the training flags once so they survive the remote shell.
TRAIN_ARGS=""
for arg in "${TRAIN_FLAGS[@]+"${TRAIN_FLAGS[@]}"}"; do
  TRAIN_ARGS+=" $(printf '%q' "${arg}")"
done

REMOTE_SCRIPT=$(cat <<REMOTE
set -euo pipefail
if [[ ! -d moe-embed ]]; then git clone --branch ${BRANCH} ${REPO_URL} moe-embed; fi
cd moe-embed && git fetch -q origin ${BRANCH} && git checkout -q origin/${BRANCH}
pip install -q -c constraints.txt -e '.[tpu]'
# Exit 143: SIGTERM (a maintenance event) arrived and a checkpoint was saved;
# run again to resume from it. Any other failure stops the job.
until python3 launch/train.py --distributed --workdir=$(printf '%q' "${WORKDIR}")${TRAIN_ARGS}; do
  rc=\$?
  if [[ \$rc -ne 143 ]]; then exit \$rc; fi
  echo "Preempted after a checkpoint; resuming."
done
REMOTE
)

gcloud_run compute tpus tpu-vm ssh "${TPU_NAME}" --zone="${ZONE}" "${PROJECT_FLAG[@]}" \
    --worker=all --command="${REMOTE_SCRIPT}"
