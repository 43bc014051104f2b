"""The prepared contrastive dataset: one ArrayRecord file of examples per source.

Layout of a dataset folder:
  dataset_info.json             sources, their sizes and splits, the tokenizer
  tfds/contrastive_pairs/1.0.0/ TFDS dataset (ArrayRecord), one split per source
  negatives-<source>.npy        int32 [n]: hard negatives per example
  tokenizer.model               SentencePiece model, when one was trained or copied
  heldout/                      optional BEIR folder for evaluation
`tfds.data_source` gives random access to ArrayRecord files without TensorFlow,
so any process can read any slice of any batch.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from typing import Iterable, Optional

import numpy as np
from tqdm import tqdm

from moe_embed.data import builder
from moe_embed.data.jsonl import ReadReport

INFO = "dataset_info.json"
FORMAT = "moe_embed.pairs.v2"
TFDS_DIR = "tfds"


def _safe(name: str) -> str:
  return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def write_dataset(records: Iterable[dict], out_dir: str, report: ReadReport,
                  tokenizer_path: Optional[str] = None, overwrite: bool = False) -> dict:
  """Writes deduplicated records grouped by source; returns dataset_info.

  The dataset is built in a folder beside `out_dir` and renamed into place, so an
  interrupted run leaves no half-written dataset; an existing `out_dir` is
  replaced whole only with `overwrite`.
  """
  if os.path.exists(out_dir) and os.listdir(out_dir) and not overwrite:
    raise FileExistsError(f"{out_dir} already exists and is not empty; pass --overwrite to "
                          "replace it, or choose another --output.")
  tmp = out_dir.rstrip("/") + ".tmp"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  try:
    info = _write(records, tmp, report, tokenizer_path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  if os.path.exists(out_dir):
    old = out_dir.rstrip("/") + ".old"
    shutil.rmtree(old, ignore_errors=True)
    os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)
  else:
    os.replace(tmp, out_dir)
  return info


def _write(records: Iterable[dict], tmp: str, report: ReadReport,
           tokenizer_path: Optional[str]) -> dict:
  """Builds the dataset in the folder `tmp`; returns dataset_info."""
  stage = os.path.join(tmp, "staged")
  os.makedirs(stage)
  writers, negatives, seen = {}, {}, set()
  for record in tqdm(records, desc="Reading records", unit=" records", mininterval=2):
    key = hashlib.sha1(
        (record["query"] + "\x00" + record["document"]).encode()).digest()
    if key in seen:
      report.duplicates += 1
      continue
    seen.add(key)
    source = record["source"]
    if source not in writers:
      split = builder.split_name(source)
      clash = [s for s in writers if builder.split_name(s) == split]
      if clash:
        raise ValueError(f"Sources {source!r} and {clash[0]!r} map to the same split name "
                         f"{split!r}; rename one of them.")
      writers[source] = open(os.path.join(stage, split + ".jsonl"), "w", encoding="utf-8")
      negatives[source] = []
    writers[source].write(json.dumps(
        {"query": record["query"], "document": record["document"],
         "negatives": record["negatives"]}) + "\n")
    negatives[source].append(len(record["negatives"]))
  for writer in writers.values():
    writer.close()
  if not writers:
    raise ValueError("No valid records to write: every input line was malformed or empty.")
  builder.build({builder.split_name(s): w.name for s, w in writers.items()},
                os.path.join(tmp, TFDS_DIR))
  shutil.rmtree(stage)
  sources = {}
  for source in sorted(writers):
    np.save(os.path.join(tmp, f"negatives-{_safe(source)}.npy"),
            np.asarray(negatives[source], np.int32))
    sources[source] = {"split": builder.split_name(source),
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


def open_splits(data_dir: str) -> dict:
  """Split name -> random-access data source of the dataset's TFDS folder."""
  return builder.data_sources(os.path.join(data_dir, TFDS_DIR))


class SourceReader:
  """Random access to one source's examples (a split of the TFDS dataset)."""

  def __init__(self, data_dir: str, entry: dict, sources: Optional[dict] = None):
    sources = sources if sources is not None else open_splits(data_dir)
    self.source = sources[entry["split"]]
    self.num_negatives = np.load(os.path.join(data_dir, entry["negatives_file"]))
    if len(self.source) != len(self.num_negatives):
      raise ValueError(f"{data_dir}: split {entry['split']!r} holds {len(self.source)} examples "
                       f"but {entry['negatives_file']} counts {len(self.num_negatives)}; "
                       "rebuild the dataset with launch/prepare_data.py.")

  def __len__(self) -> int:
    return len(self.num_negatives)

  def read(self, indices: list[int]) -> list[dict]:
    rows = self.source.__getitems__([int(i) for i in indices])
    return [{"query": r["query"].decode(), "document": r["document"].decode(),
             "negatives": [n.decode() for n in r["negatives"]]} for r in rows]
