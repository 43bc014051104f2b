"""The prepared contrastive dataset: one ArrayRecord file of examples per source.

Layout of a dataset folder:
  dataset_info.json             sources, their sizes and files, the tokenizer
  train-<source>.array_record   JSON examples {"query", "document", "negatives"}
  negatives-<source>.npy        int32 [n]: hard negatives per example
  tokenizer.model               SentencePiece model, when one was trained or copied
  heldout/                      optional BEIR folder for evaluation
ArrayRecord gives random access without TensorFlow, so any process can read any
slice of any batch.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from typing import Iterable, Optional

import numpy as np
from array_record.python import array_record_module

from moe_embed.data.jsonl import ReadReport

INFO = "dataset_info.json"
FORMAT = "moe_embed.pairs.v1"


def _safe(name: str) -> str:
  return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def write_dataset(records: Iterable[dict], out_dir: str, report: ReadReport,
                  tokenizer_path: Optional[str] = None) -> dict:
  """Writes deduplicated records grouped by source; returns dataset_info."""
  tmp = out_dir.rstrip("/") + ".tmp"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  writers, negatives, seen = {}, {}, set()
  for record in records:
    key = hashlib.sha1(
        (record["query"] + "\x00" + record["document"]).encode()).digest()
    if key in seen:
      report.duplicates += 1
      continue
    seen.add(key)
    source = record["source"]
    if source not in writers:
      path = os.path.join(tmp, f"train-{_safe(source)}.array_record")
      writers[source] = array_record_module.ArrayRecordWriter(path, "group_size:1")
      negatives[source] = []
    writers[source].write(json.dumps(
        {"query": record["query"], "document": record["document"],
         "negatives": record["negatives"]}).encode())
    negatives[source].append(len(record["negatives"]))
  for writer in writers.values():
    writer.close()
  if not writers:
    shutil.rmtree(tmp)
    raise ValueError("No valid records to write: every input line was malformed or empty.")
  sources = {}
  for source in sorted(writers):
    np.save(os.path.join(tmp, f"negatives-{_safe(source)}.npy"),
            np.asarray(negatives[source], np.int32))
    sources[source] = {"file": f"train-{_safe(source)}.array_record",
                       "negatives_file": f"negatives-{_safe(source)}.npy",
                       "num_examples": len(negatives[source])}
  info = {"format": FORMAT, "sources": sources,
          "num_examples": sum(s["num_examples"] for s in sources.values()),
          "duplicates_dropped": report.duplicates, "malformed_skipped": report.malformed}
  if tokenizer_path:
    shutil.copy(tokenizer_path, os.path.join(tmp, "tokenizer.model"))
    info["tokenizer"] = "tokenizer.model"
  with open(os.path.join(tmp, INFO), "w") as f:
    json.dump(info, f, indent=2)
  if os.path.exists(out_dir):
    # Keep what else the folder holds (a held-out split), replace the examples.
    for name in os.listdir(out_dir):
      if name.startswith(("train-", "negatives-")) or name in (INFO, "tokenizer.model"):
        os.remove(os.path.join(out_dir, name))
    for name in os.listdir(tmp):
      os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))
    os.rmdir(tmp)
  else:
    os.replace(tmp, out_dir)
  return info


def read_info(data_dir: str) -> dict:
  path = os.path.join(data_dir, INFO)
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"{data_dir} is not a prepared dataset ({INFO} is missing); build it with "
        "`python launch/prepare_data.py --input=... --output={data_dir}`.")
  with open(path) as f:
    info = json.load(f)
  if info.get("format") != FORMAT:
    raise ValueError(f"{path} has format {info.get('format')!r}; expected {FORMAT!r}.")
  return info


class SourceReader:
  """Random access to one source's examples."""

  def __init__(self, data_dir: str, entry: dict):
    self.path = os.path.join(data_dir, entry["file"])
    self.reader = array_record_module.ArrayRecordReader(self.path)
    self.num_negatives = np.load(os.path.join(data_dir, entry["negatives_file"]))

  def __len__(self) -> int:
    return len(self.num_negatives)

  def read(self, indices: list[int]) -> list[dict]:
    return [json.loads(b) for b in self.reader.read(list(map(int, indices)))]
