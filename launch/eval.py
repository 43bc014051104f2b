"""Retrieval evaluation (nDCG@10, recall@10/100, MRR@10) on BEIR-format folders.

  python launch/eval.py --model=PATH --beir=DIR[,DIR...] [--output=FILE.json] [--dim=D] \
      [--query_prefix=... --doc_prefix=...] [--batch_size=B]
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

_MODEL = flags.DEFINE_string("model", None, "Model folder or training workdir.")
_BEIR = flags.DEFINE_string("beir", None, "BEIR folders, comma-separated.")
_OUTPUT = flags.DEFINE_string("output", None, "Write the results as JSON here.")
_DIM = flags.DEFINE_integer("dim", None, "Matryoshka dimension to evaluate.")
_QUERY_PREFIX = flags.DEFINE_string("query_prefix", None, "Default: the model's own.")
_DOC_PREFIX = flags.DEFINE_string("doc_prefix", None, "Default: the model's own.")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Texts per encoding batch.")
_MAX_LENGTH = flags.DEFINE_integer("max_length", None, "Token limit; default: the model's.")
flags.mark_flags_as_required(["model", "beir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from moe_embed import evaluation, inference
  folders = [d for d in _BEIR.value.split(",") if d]
  try:
    embedder = inference.load_embedder(_MODEL.value, max_length=_MAX_LENGTH.value)
    encode = lambda texts, prefix: embedder.encode(texts, prefix=prefix,
                                                   batch_size=_BATCH.value)
    results = evaluation.evaluate_beir(
        encode, folders, dim=_DIM.value,
        query_prefix=(embedder.query_prefix if _QUERY_PREFIX.value is None
                      else _QUERY_PREFIX.value),
        doc_prefix=embedder.doc_prefix if _DOC_PREFIX.value is None else _DOC_PREFIX.value,
        show_progress=True)
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f"Error: {e}")
  print(evaluation.format_table(results))
  if _OUTPUT.value:
    with open(_OUTPUT.value, "w") as f:
      json.dump(results, f, indent=2)


if __name__ == "__main__":
  app.run(main)
