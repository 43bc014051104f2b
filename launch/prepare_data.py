"""Builds a contrastive dataset folder from JSONL or .jsonl.gz files.

  python launch/prepare_data.py --input=pairs/ --output=/data/pairs --train_tokenizer_vocab=32000
  python launch/prepare_data.py --input=a.jsonl,b.jsonl.gz --output=/data/ft \
      --tokenizer=/models/xlmr/sentencepiece.bpe.model

Texts are stored as text and tokenised by the batch iterator; with
--max_query_len / --max_doc_len and a tokenizer, the report says how many
queries and documents those lengths would truncate.

Records: {"query", "document", "negatives"?: [...], "source"?}. Exact duplicate
(query, document) pairs are dropped; malformed lines are skipped and reported
with their line numbers; counts per source are printed at the end.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from moe_embed import cli  # noqa: E402

_INPUT = flags.DEFINE_string("input", None, "JSONL files, globs or folders, comma-separated.")
_OUTPUT = flags.DEFINE_string("output", None, "Dataset folder to write.")
_TOKENIZER = flags.DEFINE_string(
    "tokenizer", None, "SentencePiece .model to store with the dataset (optional).")
_TRAIN_VOCAB = flags.DEFINE_integer(
    "train_tokenizer_vocab", 0, "Train a SentencePiece model of this size on the corpus.")
_MAX_QUERY = flags.DEFINE_integer(
    "max_query_len", 0, "Report how many queries a tokenizer would truncate at this length.")
_MAX_DOC = flags.DEFINE_integer(
    "max_doc_len", 0, "Report how many documents a tokenizer would truncate at this length.")
_OVERWRITE = flags.DEFINE_bool(
    "overwrite", False, "Replace an existing dataset at --output (built aside, then swapped in).")
flags.mark_flags_as_required(["input", "output"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from moe_embed import data
  info, report = data.prepare(_INPUT.value, _OUTPUT.value, tokenizer=_TOKENIZER.value,
                              train_tokenizer_vocab=_TRAIN_VOCAB.value,
                              max_query_len=_MAX_QUERY.value, max_doc_len=_MAX_DOC.value,
                              overwrite=_OVERWRITE.value)
  print(f"Wrote {info['num_examples']} examples to {_OUTPUT.value}")
  for source, entry in info["sources"].items():
    line = f"  {source:24s} {entry['num_examples']:>10d}"
    cut = info.get("truncated", {}).get(source)
    if cut:
      line += (f"   truncated of the first {cut['sampled']}: {cut['queries']} queries "
               f"(> {_MAX_QUERY.value}), {cut['documents']} documents (> {_MAX_DOC.value})")
    print(line)
  print(f"Read {report.read} valid records; dropped {report.duplicates} duplicate pairs; "
        f"skipped {report.malformed} malformed lines.")
  for example in report.examples:
    print(f"  malformed: {example}")
  if report.malformed > len(report.examples):
    print(f"  ... and {report.malformed - len(report.examples)} more.")


if __name__ == "__main__":
  cli.run(main)
