"""Builds a contrastive dataset folder from JSONL or .jsonl.gz files.

  python launch/prepare_data.py --input=pairs/ --output=/data/pairs --train_tokenizer_vocab=32000
  python launch/prepare_data.py --input=a.jsonl,b.jsonl.gz --output=/data/ft \
      --tokenizer=/models/xlmr/sentencepiece.bpe.model \
      --source_prefixes='{"clf": {"query_prefix": "classification: ", "max_query_len": 64}}'

Paper scale (1.6B pairs): the same preparation as an Apache Beam pipeline
(pip install -e '.[beam]'), on this machine or a cluster:

  python launch/prepare_data.py --input='gs://bucket/pairs/*.jsonl.gz' \
      --output=gs://bucket/datasets/pairs --tokenizer=/models/xlmr/sentencepiece.bpe.model \
      --runner=DataflowRunner \
      --beam_pipeline_options=project=P,region=R,temp_location=gs://bucket/tmp,setup_file=./setup.py

Without --runner everything runs in this process, fast for small data but with
a hash of every pair in memory; --runner=DirectRunner runs the pipeline here;
DataflowRunner, SparkRunner and FlinkRunner take Beam's standard options. Both
paths write the same folder (see moe_embed/data/beam_prepare.py). Inputs are
files, globs or folders, local or gs://; --output may be gs://, where
dataset_info.json, written last, marks the dataset complete.

Texts are stored as text and tokenised by the batch iterator; with
--max_query_len / --max_doc_len and a tokenizer, the report says how many
queries and documents those lengths would truncate. --source_prefixes (a JSON
object or a JSON file) stores per-source query_prefix, doc_prefix,
max_query_len and max_doc_len in dataset_info.json for the batch iterator.

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

_INPUT = flags.DEFINE_string(
    "input", None, "JSONL files, globs or folders, comma-separated; local or gs://.")
_OUTPUT = flags.DEFINE_string("output", None, "Dataset folder to write; local or gs://.")
_TOKENIZER = flags.DEFINE_string(
    "tokenizer", None, "SentencePiece .model to store with the dataset (optional).")
_TRAIN_VOCAB = flags.DEFINE_integer(
    "train_tokenizer_vocab", 0, "Train a SentencePiece model of this size on the corpus "
    "(with --runner: on a sample of 1M records from the start of the files).")
_MAX_QUERY = flags.DEFINE_integer(
    "max_query_len", 0, "Report how many queries a tokenizer would truncate at this length.")
_MAX_DOC = flags.DEFINE_integer(
    "max_doc_len", 0, "Report how many documents a tokenizer would truncate at this length.")
_SOURCE_PREFIXES = flags.DEFINE_string(
    "source_prefixes", None, "Per-source options stored in dataset_info.json: a JSON object "
    "or file, {source: {query_prefix, doc_prefix, max_query_len, max_doc_len}}.")
_RUNNER = flags.DEFINE_string(
    "runner", None, "Prepare with this Apache Beam runner (DirectRunner, DataflowRunner, "
    "SparkRunner, FlinkRunner, ...); unset: in this process.")
_BEAM_OPTIONS = flags.DEFINE_string(
    "beam_pipeline_options", None, "Comma-separated Beam pipeline options, e.g. "
    "'project=p,region=r,temp_location=gs://b/tmp' or '--direct_num_workers=2'.")
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
                              overwrite=_OVERWRITE.value,
                              source_prefixes=_SOURCE_PREFIXES.value, runner=_RUNNER.value,
                              beam_options=_BEAM_OPTIONS.value)
  print(f"Wrote {info['num_examples']} examples to {_OUTPUT.value}")
  for source, entry in info["sources"].items():
    line = f"  {source:24s} {entry['num_examples']:>10d}"
    cut = info.get("truncated", {}).get(source)
    if cut:
      line += (f"   truncated of the first {cut['sampled']}: {cut['queries']} queries "
               f"(> {cut['max_query_len']}), {cut['documents']} documents "
               f"(> {cut['max_doc_len']})")
    print(line)
  print(f"Read {report.read} valid records; dropped {report.duplicates} duplicate pairs; "
        f"skipped {report.malformed} malformed lines.")
  for example in report.examples:
    print(f"  malformed: {example}")
  if report.malformed > len(report.examples):
    print(f"  ... and {report.malformed - len(report.examples)} more.")
  if report.skipped_files:
    names = ", ".join(report.skipped_files[:5])
    more = f" and {len(report.skipped_files) - 5} more" if len(report.skipped_files) > 5 else ""
    print(f"Skipped {len(report.skipped_files)} files that are not .jsonl or .jsonl.gz: "
          f"{names}{more}.")


if __name__ == "__main__":
  cli.run(main)
