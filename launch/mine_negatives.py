"""Mines hard negatives for (query, document) pairs and writes triplet JSONL.

  python launch/mine_negatives.py --model=PATH --data=pairs.jsonl --output=triplets.jsonl \
      --k=10 [--margin=0.95 | --abs_margin=0.05] [--corpus=beir/nq,docs.jsonl] \
      [--rank_range=30,100] [--sample=N --seed=0]

The output feeds launch/prepare_data.py. Candidates are the pairs' positives,
plus the documents of --corpus (BEIR folders, or JSONL with one {"text",
"title"?} or {"document"} a line). A positive of the query is never its
negative; a candidate not below the margin limit is dropped as a likely false
negative; the rest, ranked, give the hardest --k, or --sample of them at
random. moe_embed/data/mining.py has the rules and how they compare with
sentence-transformers' mine_hard_negatives.
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
_CORPUS = flags.DEFINE_string(
    "corpus", None, "Extra candidate documents, comma-separated: BEIR folders (corpus.jsonl) "
    "and JSONL files, globs or folders of {\"text\", \"title\"?} or {\"document\"} lines. "
    "Without it the candidates are the pairs' positives.")
_K = flags.DEFINE_integer("k", 10, "Negatives per query, hardest first.")
_SAMPLE = flags.DEFINE_integer(
    "sample", 0, "Draw this many negatives per query at random (--seed) from the candidates "
    "that pass the filters and --rank_range, instead of the hardest --k.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of --sample.")
_RANK_RANGE = flags.DEFINE_string(
    "rank_range", None, "MIN,MAX: use only candidates ranked MIN..MAX-1 (from 0) among those "
    "that pass the filters, e.g. 30,100 to skip the 30 hardest (sentence-transformers' "
    "range_min, range_max).")
_MARGIN = flags.DEFINE_float(
    "margin", None, "Relative margin m (default 0.95): keep a candidate only if its score is "
    "below m x the positive's score s when s > 0, and below (2 - m) x s when s <= 0 (at least "
    "(1 - m) x |s| below the positive, never above it).")
_ABS_MARGIN = flags.DEFINE_float(
    "abs_margin", None, "Absolute margin a instead: keep a candidate only if score < s - a.")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Texts per encoding batch.")
flags.mark_flags_as_required(["model", "data", "output"])


def _rank_range(text):
  """(min, max) from "MIN,MAX", or None."""
  if not text:
    return None
  parts = text.split(",")
  if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
    raise cli.UserError(f"--rank_range={text!r} must be MIN,MAX with integers, e.g. 30,100.")
  return int(parts[0]), int(parts[1])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if _MARGIN.value is not None and _ABS_MARGIN.value is not None:
    raise cli.UserError("give --margin or --abs_margin, not both.")
  if _SAMPLE.value and flags.FLAGS["k"].present:
    raise cli.UserError("give --k (the hardest) or --sample (at random), not both.")
  if _SAMPLE.value < 0:
    raise cli.UserError(f"--sample={_SAMPLE.value} must be positive.")
  margin = None if _ABS_MARGIN.value is not None else (
      0.95 if _MARGIN.value is None else _MARGIN.value)
  k, sampling = (_SAMPLE.value, "random") if _SAMPLE.value else (_K.value, "top")
  rank_range = _rank_range(_RANK_RANGE.value)
  from moe_embed import inference
  from moe_embed.data import mining
  from moe_embed.data import jsonl
  report = jsonl.ReadReport()
  records = list(jsonl.read_records(jsonl.expand_inputs(_DATA.value), report))
  if not records:
    raise cli.UserError(f"no valid records in {_DATA.value} ({report.malformed} malformed).")
  corpus_report = jsonl.ReadReport()
  corpus = mining.read_corpus(_CORPUS.value, corpus_report) if _CORPUS.value else []
  if _CORPUS.value and not corpus:
    raise cli.UserError(f"no documents in --corpus={_CORPUS.value} "
                        f"({corpus_report.malformed} malformed lines).")
  cli.check_output_file(_OUTPUT.value)  # Before the embedding work, not after.
  embedder = inference.load_embedder(_MODEL.value)
  mined, summary = mining.mine(records, embedder, k=k, margin=margin,
                               abs_margin=_ABS_MARGIN.value, corpus=corpus,
                               rank_range=rank_range, sampling=sampling, seed=_SEED.value,
                               batch_size=_BATCH.value)
  with cli.atomic_path(_OUTPUT.value) as tmp:
    mining.write_jsonl(mined, tmp)
  rule = f"score < {margin} x positive" if margin is not None else \
      f"score < positive - {_ABS_MARGIN.value}"
  how = f"{k} at random (seed {_SEED.value})" if sampling == "random" else f"the hardest {k}"
  where = f" ranked {rank_range[0]}..{rank_range[1] - 1}" if rank_range else ""
  print(f"Mined {summary.kept} negatives for {summary.queries} queries ({rule}; {how}{where} "
        f"of {summary.window} candidates from a pool of {summary.pool} documents) into "
        f"{_OUTPUT.value}")
  print(f"Dropped candidates: {summary.dropped_margin} too close to the positive, "
        f"{summary.dropped_positive} positives of the query; {summary.short} queries got "
        f"fewer than {k}. Skipped {report.malformed} malformed input lines.")
  if _CORPUS.value:
    print(f"Corpus: {len(corpus)} documents from {_CORPUS.value}; skipped "
          f"{corpus_report.malformed} malformed lines.")
    for example in corpus_report.examples:
      print(f"  malformed: {example}")


if __name__ == "__main__":
  cli.run(main)
