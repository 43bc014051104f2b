"""Evaluates an embedding model on BEIR-format folders (nDCG@10, recall@10/100, MRR@10).

  python launch/eval.py --model=/tmp/moe_embed_tiny --beir=/data/beir/scifact,/data/beir/nfcorpus \
      --output=/tmp/scores.json --dim=256

--model is a model folder (imported or upcycled) or a training workdir (its
latest checkpoint). Prefixes default to the model's own; pass --query_prefix=
(empty) to encode without one. Prints a table and, with --output, writes
{"<folder name>": {"ndcg@10", "recall@10", "recall@100", "mrr@10", "num_queries",
"num_docs", ...}, ..., "average": {...}} as JSON.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402

_MODEL = flags.DEFINE_string("model", None, "Model folder or training workdir.")
_BEIR = flags.DEFINE_list("beir", None, "Comma-separated BEIR folders.")
_OUTPUT = flags.DEFINE_string("output", None, "Write the results here as JSON.")
_DIM = flags.DEFINE_integer("dim", None, "Matryoshka dimension (first D dims, re-normalised).")
_QUERY_PREFIX = flags.DEFINE_string("query_prefix", None,
                                    "Prepended to queries; default: the model's own.")
_DOC_PREFIX = flags.DEFINE_string("doc_prefix", None,
                                  "Prepended to documents; default: the model's own.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Texts per encoder batch.")
_MAX_LENGTH = flags.DEFINE_integer("max_length", None,
                                   "Tokens per text; default: the model's own (512).")
_SPLIT = flags.DEFINE_string("split", "test", "Qrels file: qrels/<split>.tsv.")
flags.mark_flags_as_required(["model", "beir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from moe_embed import evaluation
  from moe_embed import inference
  from moe_embed.evaluation import beir
  try:
    # Folders first: a malformed file fails in seconds, before a model is loaded.
    datasets = [beir.load_beir(folder, _SPLIT.value) for folder in _BEIR.value]
    embedder = inference.load_embedder(_MODEL.value, max_length=_MAX_LENGTH.value)
    logging.info("Prefixes: query %r, document %r.",
                 embedder.query_prefix if _QUERY_PREFIX.value is None else _QUERY_PREFIX.value,
                 embedder.doc_prefix if _DOC_PREFIX.value is None else _DOC_PREFIX.value)
    results = evaluation.evaluate_beir(
        embedder, datasets, dim=_DIM.value, batch_size=_BATCH_SIZE.value,
        query_prefix=_QUERY_PREFIX.value, doc_prefix=_DOC_PREFIX.value, split=_SPLIT.value,
        show_progress=True)
  except (FileNotFoundError, beir.BeirFormatError) as e:
    sys.exit(f"Error: {e}")
  except ValueError as e:
    sys.exit(f"Bad value: {e}")
  print(evaluation.format_table(results))
  if _OUTPUT.value:
    parent = os.path.dirname(os.path.abspath(_OUTPUT.value))
    os.makedirs(parent, exist_ok=True)
    with open(_OUTPUT.value, "w") as f:
      json.dump(results, f, indent=2)
      f.write("\n")
    logging.info("Wrote %s.", _OUTPUT.value)


if __name__ == "__main__":
  app.run(main)
