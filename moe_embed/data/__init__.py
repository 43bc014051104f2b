"""Contrastive data: JSONL records -> prepared ArrayRecord datasets -> batches.

  jsonl          reading and checking {"query", "document", "negatives"?, "source"?} lines
  builder        the TFDS builder: one ArrayRecord split per source
  dataset        writing a dataset folder (all or nothing) and reading its sources
  beam_prepare   the same preparation as Apache Beam pipelines, for corpora of any size
  pipeline       InputConfig and the resumable, multi-host batch iterator
  corpus_stdlib  the embedded pair corpus built from the standard library's docstrings
  mining         hard negatives by exact search with a model (uses evaluation.search)

This module: `prepare` (JSONL -> dataset folder) and the embedded default data.
`prepare` runs in this process by default (fast for small data; a set of every
pair's hash stays in memory) or, given a Beam runner, as a pipeline on one
machine or a cluster that writes the same folder. Paths may be `gs://`.
Imports: `moe_embed.tokenizers`; `mining` also `moe_embed.evaluation.search`;
`beam_prepare` needs the [beam] extra.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Mapping, Optional, Sequence

from absl import logging
from etils import epath

from moe_embed.data import corpus_stdlib, dataset, jsonl
from moe_embed.data.pipeline import InputConfig, TrainIterator, make_train_iterator

__all__ = ["InputConfig", "TrainIterator", "make_train_iterator", "prepare",
           "ensure_default_data", "dataset_tokenizer_path", "heldout_beir_dirs"]

DEFAULT_VOCAB = 4096
# With a Beam runner, a tokenizer is trained on this many records (an equal share
# from the start of every input file), so the driver's work stays bounded.
TOKENIZER_SAMPLE = 1_000_000


def prepare(inputs: str | Sequence[str], output: str, tokenizer: Optional[str] = None,
            train_tokenizer_vocab: int = 0, max_query_len: int = 0,
            max_doc_len: int = 0, overwrite: bool = False,
            source_prefixes: str | Mapping | None = None, runner: Optional[str] = None,
            beam_options: str | Sequence[str] | None = None
            ) -> tuple[dict, jsonl.ReadReport]:
  """Builds a dataset folder from JSONL files; trains a SentencePiece model if asked.

  Texts are stored untokenised and tokenised by the batch iterator (prefixes and
  lengths stay training options; benchmarks/data_loader.py measures the cost).
  `source_prefixes` (a JSON object, a path to one, or a dict) stores per-source
  query_prefix / doc_prefix / max_query_len / max_doc_len in dataset_info.json.
  With a tokenizer and max_query_len / max_doc_len (or per-source lengths),
  info["truncated"] reports per source how many of the first `TRUNCATION_SAMPLE`
  queries and documents those lengths (a source's own, where it has them, with
  its own prefixes) would cut. `runner` or `beam_options` (Beam pipeline options,
  "runner=DataflowRunner,project=...") prepare with Apache Beam (`beam_prepare`).
  """
  skipped: list[str] = []
  files = jsonl.expand_inputs(inputs, skipped)
  dataset.check_output(output, overwrite)
  source_options = dataset.parse_source_options(source_prefixes)
  options = None
  if runner or beam_options:
    try:
      from moe_embed.data import beam_prepare
    except ImportError as e:
      raise ValueError(f"--runner needs Apache Beam ({e}); pip install -e '.[beam]'.") from e
    options = beam_prepare.pipeline_options(runner, beam_options)
  report = jsonl.ReadReport(skipped_files=skipped)
  with tempfile.TemporaryDirectory() as scratch:
    tokenizer_path = tokenizer
    if train_tokenizer_vocab:
      from moe_embed.tokenizers import train_sentencepiece
      records = (jsonl.sample_records(files, TOKENIZER_SAMPLE) if options
                 else jsonl.read_records(files, jsonl.ReadReport()))
      texts = (t for r in records for t in (r["query"], r["document"], *r["negatives"]))
      train_sentencepiece(texts, train_tokenizer_vocab, os.path.join(scratch, "tokenizer"))
      tokenizer_path = os.path.join(scratch, "tokenizer.model")
    if tokenizer_path and not epath.Path(tokenizer_path).exists():
      raise FileNotFoundError(f"Tokenizer {tokenizer_path} does not exist.")

    def build(folder: epath.Path) -> dict:
      if options:
        info = beam_prepare.build_dataset(files, folder, report, options, source_options)
      else:
        info = dataset.build_dataset(jsonl.read_records(files, report), folder, report,
                                     source_options)
      if tokenizer_path and not tokenizer_path.endswith(".json"):
        dataset.store_tokenizer(folder, tokenizer_path, info)
      own_lengths = any(k in entry for entry in info["sources"].values()
                        for k in ("max_query_len", "max_doc_len"))
      if tokenizer_path and (max_query_len or max_doc_len or own_lengths):
        info["truncated"] = truncation_stats(os.fspath(folder), info["sources"],
                                             tokenizer_path, max_query_len, max_doc_len)
      return info

    info = dataset.commit(output, build, overwrite)
  return info, report


TRUNCATION_SAMPLE = 10_000


def truncation_stats(data_dir: str, sources: Mapping[str, dict], tokenizer_path: str,
                     max_query_len: int, max_doc_len: int) -> dict[str, dict[str, int]]:
  """Per source of info["sources"]: {"sampled", "queries", "documents", "max_query_len",
  "max_doc_len"}: how many texts the lengths cut (0: not checked).

  A source's own max_*_len and prefixes (--source_prefixes) replace the global
  lengths and the empty prefix, as they do in training.
  """
  from moe_embed.tokenizers import load_tokenizer
  tok = load_tokenizer(tokenizer_path)
  splits = dataset.open_splits(data_dir)
  stats = {}
  for source, entry in sources.items():
    reader = dataset.SourceReader(data_dir, entry, splits)
    records = reader.read(list(range(min(len(reader), TRUNCATION_SAMPLE))))
    lengths = {"query": entry.get("max_query_len", max_query_len),
               "doc": entry.get("max_doc_len", max_doc_len)}
    stats[source] = {"sampled": len(records), "queries": 0, "documents": 0,
                     "max_query_len": lengths["query"], "max_doc_len": lengths["doc"]}
    for side, key, count in (("query", "query", "queries"), ("doc", "document", "documents")):
      if lengths[side]:
        prefix = entry.get(f"{side}_prefix", "")
        stats[source][count] = tok.encode([prefix + r[key] for r in records], lengths[side])[1]
  return stats


def default_cache_dir() -> str:
  root = os.environ.get("MOE_EMBED_CACHE") or os.path.join(
      os.path.expanduser("~"), ".cache", "moe_embed")
  return os.path.join(root, "stdlib_pairs")


def ensure_default_data(cache_dir: Optional[str] = None) -> str:
  """The embedded stdlib pair dataset, built (about 10 s) and cached on first use.

  The cache is a local folder: built beside it and renamed into place, atomically.
  """
  out = cache_dir or default_cache_dir()
  if _is_current(out):
    return out
  logging.info("Building the embedded stdlib pair corpus in %s (first use only).", out)
  parent = epath.Path(os.path.abspath(out)).parent
  parent.mkdir(parents=True, exist_ok=True)
  work = epath.Path(tempfile.mkdtemp(dir=parent, prefix=".build-"))
  try:
    counts = corpus_stdlib.build_pairs(os.fspath(work))
    prepare(os.fspath(work / "train.jsonl"), os.fspath(work / "data"),
            train_tokenizer_vocab=DEFAULT_VOCAB)
    (work / "heldout").rename(work / "data" / "heldout")
    (work / "data" / "corpus_counts.json").write_text(json.dumps(counts, indent=2))
    if epath.Path(out).exists() and not _is_current(out):
      # A cache of an older dataset format: move it aside, then replace it.
      try:
        epath.Path(out).replace(work / "stale")
      except OSError:
        pass
    try:
      (work / "data").replace(out)  # Atomic: a racing process may win.
    except OSError:
      if not _is_current(out):
        raise
    logging.info("Embedded corpus: %s", counts)
  finally:
    work.rmtree(missing_ok=True)
  return out


def _is_current(data_dir: str) -> bool:
  try:
    info = json.loads((epath.Path(data_dir) / dataset.INFO).read_text())
    return info.get("format") == dataset.FORMAT
  except (OSError, ValueError):
    return False


def dataset_tokenizer_path(data_dir: str) -> str:
  info = dataset.read_info(data_dir)
  if "tokenizer" not in info:
    raise FileNotFoundError(
        f"{data_dir} carries no tokenizer; set config.tokenizer or start from a model folder.")
  return os.fspath(epath.Path(data_dir) / info["tokenizer"])


def heldout_beir_dirs(data_dir: str) -> list[str]:
  path = epath.Path(data_dir) / "heldout"
  return [os.fspath(path)] if (path / "queries.jsonl").exists() else []
