"""JSONL files -> a prepared dataset folder, and how much its lengths would truncate.

`prepare` runs in this process by default (fast for small data; a set of every
pair's hash stays in memory) or, given a Beam runner, as a pipeline on one
machine or a cluster that writes the same folder (`beam_prepare`, the [beam]
extra). Paths may be `gs://`.
"""

from __future__ import annotations

import os
import tempfile
from typing import Mapping, Optional, Sequence

from etils import epath

from moe_embed.data import dataset, jsonl

# With a Beam runner, a tokenizer is trained on this many records (an equal share
# from the start of every input file), so the driver's work stays bounded.
TOKENIZER_SAMPLE = 1_000_000
# Queries and documents per source whose token counts `truncation_stats` checks.
TRUNCATION_SAMPLE = 10_000


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
