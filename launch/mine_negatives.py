"""Mines hard negatives for (query, document) pairs and writes triplet JSONL.

  python launch/mine_negatives.py --model=PATH --data=pairs.jsonl --output=triplets.jsonl \
      --k=10 [--margin=0.95 | --abs_margin=0.05]

The output feeds launch/prepare_data.py. A candidate scoring at or above
margin x the positive's score (or above the positive's score minus abs_margin)
is dropped as a likely false negative.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from moe_embed import cli  # noqa: E402

_MODEL = flags.DEFINE_string("model", None, "Model folder or training workdir.")
_DATA = flags.DEFINE_string("data", None, "JSONL files (comma-separated, globs, folders).")
_OUTPUT = flags.DEFINE_string("output", None, "Triplet JSONL to write.")
_K = flags.DEFINE_integer("k", 10, "Negatives per query.")
_MARGIN = flags.DEFINE_float("margin", None, "Relative margin (default 0.95).")
_ABS_MARGIN = flags.DEFINE_float("abs_margin", None, "Absolute margin instead.")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Texts per encoding batch.")
flags.mark_flags_as_required(["model", "data", "output"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if _MARGIN.value is not None and _ABS_MARGIN.value is not None:
    sys.exit("Error: give --margin or --abs_margin, not both.")
  margin = None if _ABS_MARGIN.value is not None else (_MARGIN.value or 0.95)
  from moe_embed import inference
  from moe_embed.data import mining
  from moe_embed.data import jsonl
  report = jsonl.ReadReport()
  records = list(jsonl.read_records(jsonl.expand_inputs(_DATA.value), report))
  if not records:
    raise cli.UserError(f"no valid records in {_DATA.value} ({report.malformed} malformed).")
  cli.check_output_file(_OUTPUT.value)  # Before the embedding work, not after.
  embedder = inference.load_embedder(_MODEL.value)
  mined, summary = mining.mine(records, embedder, k=_K.value, margin=margin,
                               abs_margin=_ABS_MARGIN.value, batch_size=_BATCH.value)
  with cli.atomic_path(_OUTPUT.value) as tmp:
    mining.write_jsonl(mined, tmp)
  rule = f"score < {margin} x positive" if margin is not None else \
      f"score < positive - {_ABS_MARGIN.value}"
  print(f"Mined {summary.kept} negatives for {summary.queries} queries ({rule}) into "
        f"{_OUTPUT.value}")
  print(f"Dropped candidates: {summary.dropped_margin} too close to the positive, "
        f"{summary.dropped_same_text} identical to it; {summary.short} queries got fewer "
        f"than {_K.value}. Skipped {report.malformed} malformed input lines.")


if __name__ == "__main__":
  cli.run(main)
