"""Consistency filtering: keeps a pair only if its document ranks in the top k for its query.

  python launch/filter_consistency.py --model=PATH --data=pairs.jsonl --output=kept.jsonl \
      --k=2 --pool_size=1024 [--seed=0] [--batch_size=64]

Each query is ranked against pool_size distinct documents of its own source:
its document plus others drawn at random (seeded); equal scores count against
the pair. A source with fewer documents is ranked against all of them (the
table says so). Writes the kept pairs as JSONL records in the input's format,
and a report (per source: pairs, kept, kept fraction, pool size) to
--report, by default OUTPUT.report.json. The model (a model folder or a
training workdir) runs sharded over this process's devices.

Several processes (--distributed, as launch/train.py, or --process_index and
--process_count for independent jobs) each rank their own share of the pools
and write OUTPUT-0001-of-0004.jsonl style shards with their own reports; the
shards together equal a one-process run.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from moe_embed import cli  # noqa: E402

_MODEL = flags.DEFINE_string("model", None, "Model folder or training workdir.")
_DATA = flags.DEFINE_string("data", None, "JSONL files (comma-separated, globs, folders).")
_OUTPUT = flags.DEFINE_string("output", None, "JSONL of the kept pairs.")
_REPORT = flags.DEFINE_string("report", None, "Report JSON; default: OUTPUT.report.json.")
_K = flags.DEFINE_integer("k", 2, "Keep a pair when its document is in its query's top k.")
_POOL_SIZE = flags.DEFINE_integer("pool_size", None,
                                  "Documents of the same source each query is ranked against.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the pools.")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Texts per encoding batch.")
_MAX_LENGTH = flags.DEFINE_integer("max_length", None, "Token limit; default: the model's.")
_EXPERT = flags.DEFINE_integer("mesh_expert", 1, "Devices the experts are split over.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", os.environ.get("MOE_EMBED_DISTRIBUTED", "") == "1",
    "Call jax.distributed.initialize() (TPU pods, SLURM, multi-process GPU).")
_PROCESS_INDEX = flags.DEFINE_integer("process_index", None,
                                      "This job's share; default: jax.process_index().")
_PROCESS_COUNT = flags.DEFINE_integer("process_count", None,
                                      "Number of shares; default: jax.process_count().")
flags.mark_flags_as_required(["model", "data", "output", "pool_size"])


def _sharded(embedder, expert: int):
  """The embedder with its parameters spread over this process's devices."""
  import jax
  from moe_embed import inference, partitioning
  from moe_embed.model.encoder import init_params
  devices = jax.local_devices()
  if len(devices) == 1 and expert == 1:
    return embedder
  # Local devices only: processes share no computation, so each ranks its own pools.
  mesh = partitioning.make_mesh(-1, expert, devices)
  rules = partitioning.DEFAULT_RULES
  abstract = jax.eval_shape(lambda rng: init_params(embedder.config, rng),
                            jax.random.PRNGKey(0))
  shardings = partitioning.logical_shardings(abstract, mesh, rules)
  params = jax.device_put(embedder.params, shardings)
  return inference.Embedder(embedder.config, params, embedder.tokenizer,
                            max_length=embedder.max_length,
                            query_prefix=embedder.query_prefix,
                            doc_prefix=embedder.doc_prefix, mesh=mesh, rules=rules,
                            param_shardings=shardings)


def _processes() -> tuple[int, int]:
  """(this process's index, number of processes) from the flags or JAX."""
  import jax
  if _DISTRIBUTED.value:
    jax.distributed.initialize()
  count = _PROCESS_COUNT.value or jax.process_count()
  index = jax.process_index() if _PROCESS_INDEX.value is None else _PROCESS_INDEX.value
  if not 0 <= index < count:
    raise cli.UserError(f"--process_index={index} must be in [0, {count}); set "
                        "--process_count too.")
  return index, count


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  k, pool_size = _K.value, _POOL_SIZE.value
  if not 0 < k < pool_size:
    raise cli.UserError(f"--k={k} must be at least 1 and below --pool_size={pool_size}.")
  if _OUTPUT.value.endswith(".gz"):
    raise cli.UserError(f"--output={_OUTPUT.value}: the output is plain JSONL; drop the .gz.")
  from moe_embed.data import consistency, jsonl, mining
  read = jsonl.ReadReport()
  records = list(jsonl.read_records(jsonl.expand_inputs(_DATA.value), read))
  if not records:
    raise cli.UserError(f"no valid records in {_DATA.value} ({read.malformed} malformed).")
  index, count = _processes()
  output = consistency.shard_path(_OUTPUT.value, index, count)
  report_path = consistency.shard_path(_REPORT.value, index, count) if _REPORT.value \
      else f"{output}.report.json"
  cli.check_output_file(output)  # Before the embedding work, not after.
  cli.check_output_file(report_path)
  from moe_embed import inference
  embedder = _sharded(inference.load_embedder(_MODEL.value, max_length=_MAX_LENGTH.value),
                      _EXPERT.value)
  kept, reports = consistency.filter_pairs(records, embedder, k=k, pool_size=pool_size,
                                           seed=_SEED.value, process_index=index,
                                           process_count=count, batch_size=_BATCH.value)
  with cli.atomic_path(output) as tmp:
    mining.write_jsonl(kept, tmp)
  report = consistency.report_json(
      reports, model=_MODEL.value, data=_DATA.value, output=output, k=k,
      pool_size=pool_size, seed=_SEED.value, process_index=index, process_count=count,
      malformed_lines=read.malformed)
  with cli.atomic_path(report_path) as tmp, open(tmp, "w", encoding="utf-8") as f:
    json.dump(report, f, indent=2, ensure_ascii=False)
  print(consistency.format_table(reports, pool_size))
  print(f"Kept {len(kept)} pairs whose document ranks in the top {k} of {pool_size} into "
        f"{output} (report: {report_path}). Skipped {read.malformed} malformed input lines.")


if __name__ == "__main__":
  cli.run(main)
