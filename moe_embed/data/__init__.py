"""Contrastive data: JSONL records -> prepared ArrayRecord datasets -> batches.

  jsonl          reading and checking {"query", "document", "negatives"?, "source"?} lines
  builder        the TFDS builder: one ArrayRecord split per source
  dataset        writing a dataset folder and reading its sources
  pipeline       InputConfig and the resumable, multi-host batch iterator
  corpus_stdlib  the embedded pair corpus built from the standard library's docstrings
  mining         hard negatives by exact search with a model (uses evaluation.search)

This module: `prepare` (JSONL -> dataset folder) and the embedded default data.
Imports: `moe_embed.tokenizers`; `mining` also `moe_embed.evaluation.search`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Optional, Sequence

from absl import logging

from moe_embed.data import corpus_stdlib, dataset, jsonl
from moe_embed.data.pipeline import InputConfig, TrainIterator, make_train_iterator

__all__ = ["InputConfig", "TrainIterator", "make_train_iterator", "prepare",
           "ensure_default_data", "dataset_tokenizer_path", "heldout_beir_dirs"]

DEFAULT_VOCAB = 4096


def prepare(inputs: str | Sequence[str], output: str, tokenizer: Optional[str] = None,
            train_tokenizer_vocab: int = 0, max_query_len: int = 0,
            max_doc_len: int = 0, overwrite: bool = False) -> tuple[dict, jsonl.ReadReport]:
  """Builds a dataset folder from JSONL files; trains a SentencePiece model if asked.

  Texts are stored untokenised and tokenised by the batch iterator (prefixes and
  lengths stay training options; benchmarks/data_loader.py measures the cost).
  With a tokenizer and max_query_len / max_doc_len, info["truncated"] reports
  per source how many of the first `TRUNCATION_SAMPLE` queries and documents
  those lengths would cut.
  """
  files = jsonl.expand_inputs(inputs)
  if os.path.exists(output) and os.listdir(output) and not overwrite:
    raise FileExistsError(f"{output} already exists and is not empty; pass --overwrite to "
                          "replace it, or choose another --output.")
  report = jsonl.ReadReport()
  tokenizer_path = tokenizer
  if train_tokenizer_vocab:
    from moe_embed.tokenizers import train_sentencepiece
    texts = (t for r in jsonl.read_records(files, jsonl.ReadReport())
             for t in (r["query"], r["document"], *r["negatives"]))
    prefix = os.path.join(tempfile.mkdtemp(), "tokenizer")
    train_sentencepiece(texts, train_tokenizer_vocab, prefix)
    tokenizer_path = prefix + ".model"
  if tokenizer_path and not os.path.exists(tokenizer_path):
    raise FileNotFoundError(f"Tokenizer {tokenizer_path} does not exist.")
  info = dataset.write_dataset(jsonl.read_records(files, report), output, report,
                               tokenizer_path if tokenizer_path and
                               not tokenizer_path.endswith(".json") else None,
                               overwrite=overwrite)
  if train_tokenizer_vocab:
    shutil.rmtree(os.path.dirname(tokenizer_path), ignore_errors=True)
    tokenizer_path = os.path.join(output, info["tokenizer"])
  if tokenizer_path and (max_query_len or max_doc_len):
    info["truncated"] = truncation_stats(output, tokenizer_path, max_query_len, max_doc_len)
    with open(os.path.join(output, dataset.INFO), "w") as f:
      json.dump(info, f, indent=2)
  return info, report


TRUNCATION_SAMPLE = 10_000


def truncation_stats(data_dir: str, tokenizer_path: str, max_query_len: int,
                     max_doc_len: int) -> dict[str, dict[str, int]]:
  """Per source: {"sampled", "queries", "documents"} cut at the given lengths."""
  from moe_embed.tokenizers import load_tokenizer
  tok = load_tokenizer(tokenizer_path)
  splits = dataset.open_splits(data_dir)
  stats = {}
  for source, entry in dataset.read_info(data_dir)["sources"].items():
    reader = dataset.SourceReader(data_dir, entry, splits)
    records = reader.read(list(range(min(len(reader), TRUNCATION_SAMPLE))))
    stats[source] = {"sampled": len(records), "queries": 0, "documents": 0}
    if max_query_len:
      stats[source]["queries"] = tok.encode([r["query"] for r in records], max_query_len)[1]
    if max_doc_len:
      stats[source]["documents"] = tok.encode([r["document"] for r in records], max_doc_len)[1]
  return stats


def default_cache_dir() -> str:
  root = os.environ.get("MOE_EMBED_CACHE") or os.path.join(
      os.path.expanduser("~"), ".cache", "moe_embed")
  return os.path.join(root, "stdlib_pairs")


def ensure_default_data(cache_dir: Optional[str] = None) -> str:
  """The embedded stdlib pair dataset, built (about 10 s) and cached on first use."""
  out = cache_dir or default_cache_dir()
  if _is_current(out):
    return out
  logging.info("Building the embedded stdlib pair corpus in %s (first use only).", out)
  parent = os.path.dirname(os.path.abspath(out))
  os.makedirs(parent, exist_ok=True)
  work = tempfile.mkdtemp(dir=parent, prefix=".build-")
  try:
    counts = corpus_stdlib.build_pairs(work)
    info, _ = prepare(os.path.join(work, "train.jsonl"), os.path.join(work, "data"),
                      train_tokenizer_vocab=DEFAULT_VOCAB)
    shutil.move(os.path.join(work, "heldout"), os.path.join(work, "data", "heldout"))
    with open(os.path.join(work, "data", "corpus_counts.json"), "w") as f:
      json.dump(counts, f, indent=2)
    if os.path.exists(out) and not _is_current(out):
      # A cache of an older dataset format: move it aside, then replace it.
      try:
        os.replace(out, os.path.join(work, "stale"))
      except OSError:
        pass
    try:
      os.replace(os.path.join(work, "data"), out)  # Atomic: a racing process may win.
    except OSError:
      if not _is_current(out):
        raise
    logging.info("Embedded corpus: %s", counts)
  finally:
    shutil.rmtree(work, ignore_errors=True)
  return out


def _is_current(data_dir: str) -> bool:
  try:
    with open(os.path.join(data_dir, dataset.INFO)) as f:
      return json.load(f).get("format") == dataset.FORMAT
  except (OSError, ValueError):
    return False


def dataset_tokenizer_path(data_dir: str) -> str:
  info = dataset.read_info(data_dir)
  if "tokenizer" not in info:
    raise FileNotFoundError(
        f"{data_dir} carries no tokenizer; set config.tokenizer or start from a model folder.")
  return os.path.join(data_dir, info["tokenizer"])


def heldout_beir_dirs(data_dir: str) -> list[str]:
  path = os.path.join(data_dir, "heldout")
  return [path] if os.path.exists(os.path.join(path, "queries.jsonl")) else []
