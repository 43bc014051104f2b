"""Trains a MoE text embedding model with InfoNCE.

  python launch/train.py --config=configs/finetune.py:tiny --workdir=/tmp/moe_embed_tiny
  python launch/train.py --config=configs/finetune.py   # workdir ~/moe_embed_runs/finetune
  python launch/train.py --config=configs/pretrain.py:nomic_v2_moe --workdir=gs://b/run \
      --config.mesh.expert=4 --config.batch_size=4096

Rerunning the same command on the same workdir resumes from its latest checkpoint.
Without --workdir, each config gets its own folder under ~/moe_embed_runs (or
$MOE_EMBED_WORKDIRS), printed at the start, so the same command resumes too.
On a TPU pod slice or a multi-process GPU job, pass --distributed (or set
MOE_EMBED_DISTRIBUTED=1) to call jax.distributed.initialize() first.

Every path (--workdir, config.data, config.model, config.tokenizer, eval.beir)
may be a gs://bucket/... URI; with STORAGE_EMULATOR_HOST set, all of them go to
that GCS emulator instead (see the README's pod section).

Exit codes: 0 done; 1 a bad config, diverged training, unreadable checkpoints or
a workdir in use by another run (one line on stderr says what to change); 143
stopped by SIGTERM or at --stop_at_step after saving a checkpoint: rerun the
same command to resume (launch/slurm_gpu.sh requeues, launch/tpu_pod.sh
reruns); 130 stopped by Ctrl-C (SIGINT) after saving a checkpoint.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from moe_embed import cli  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config file, e.g. configs/finetune.py:tiny.", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for checkpoints, metrics.jsonl, TensorBoard and config.json; "
    "default: ~/moe_embed_runs/<config>[_<argument>] (or under $MOE_EMBED_WORKDIRS).")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", os.environ.get("MOE_EMBED_DISTRIBUTED", "") == "1",
    "Call jax.distributed.initialize() (TPU pods, SLURM, multi-process GPU).")
_STOP_AT_STEP = flags.DEFINE_integer(
    "stop_at_step", None, "Save and stop after this step, as a preemption would (exit 143); "
    "the schedule still runs to config.total_steps when the command is rerun.")
flags.mark_flags_as_required(["config"])


class _QuietLibraries:
  """Drops INFO chatter of checkpointing internals, and the tracebacks Orbax logs for a
  failed save (the run reports that failure itself, in one line); warnings pass."""

  def filter(self, record):
    if "orbax" not in record.pathname:
      return True
    return record.levelno >= 30 and not (record.levelno >= 40 and cli.quiet())


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_QuietLibraries())
  if cli.quiet():  # A failed save's abandoned writes: "Task exception was never retrieved".
    import logging as py_logging
    py_logging.getLogger("asyncio").setLevel(py_logging.CRITICAL)
  import jax
  if _DISTRIBUTED.value:
    jax.distributed.initialize()
  logging.info("JAX %s: process %d of %d, %d local / %d global devices (%s).",
               jax.__version__, jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count(), jax.default_backend())
  from moe_embed.io import checkpoints
  from moe_embed.train import trainer
  from moe_embed.train import workdir as workdir_lib
  workdir = _WORKDIR.value
  if workdir is None:
    workdir = workdir_lib.default_workdir(config_flags.get_config_filename(flags.FLAGS["config"]))
    print(f"Workdir: {workdir} (no --workdir given; the same command resumes there)",
          flush=True)
  try:
    result = trainer.train_and_evaluate(_CONFIG.value, workdir,
                                        stop_at_step=_STOP_AT_STEP.value)
  except trainer.ConfigError as e:
    print(f"Config error: {cli.one_line(e)}", file=sys.stderr)
    sys.exit(1)
  except (trainer.TrainingDiverged, trainer.OutOfMemory, checkpoints.CheckpointError,
          workdir_lib.WorkdirLocked) as e:
    print(f"\nError: {cli.one_line(e)}", file=sys.stderr)  # On a line of its own, after tqdm.
    if isinstance(e, checkpoints.CheckpointError):
      # A failed save leaves TensorStore writes that end after their event loop closed;
      # at interpreter shutdown each prints a traceback. Everything saved is on disk.
      sys.stdout.flush()
      sys.stderr.flush()
      os._exit(1)
    sys.exit(1)
  if result.get("preempted"):  # Saved; a scheduler reruns the command to resume.
    sys.exit(cli.EXIT_INTERRUPTED if result.get("signal") == "SIGINT" else cli.EXIT_PREEMPTED)


if __name__ == "__main__":
  sys.argv = cli.resolve_config_path(sys.argv)
  cli.run(main)
