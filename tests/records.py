"""Contrastive records the data tests build, and writing them as JSONL input files."""

import gzip
import json
from typing import Mapping

import numpy as np


def pair_records(sources: Mapping[str, int], negatives: int = 0, *, documents: int = 0,
                 seed: int = 0) -> list[dict]:
  """{"query", "document", "negatives", "source"}: `sources[s]` records of source s, in order.

  Query i of source s is "s question i about ...", its document "s answer i: ..." and
  its `negatives` wrong answers "s wrong answer i-j ...". With `documents`, each
  document is instead one of that many shared answers drawn at random (seeded), so
  a document repeats within and across sources.
  """
  rng = np.random.default_rng(seed)
  rows = []
  for source, n in sources.items():
    for i in range(n):
      document = (f"answer {rng.integers(documents)}: call sorted() with a key function"
                  if documents else
                  f"{source} answer {i}: call sorted() with a key function and reverse")
      rows.append({"query": f"{source} question {i} about sorting lists of numbers quickly",
                   "document": document,
                   "negatives": [f"{source} wrong answer {i}-{j} about reading files"
                                 for j in range(negatives)],
                   "source": source})
  return rows


def write_jsonl(path, rows, extra_lines=()):
  """One JSON object per line, then `extra_lines` as they are; gzipped for a .gz path."""
  opener = gzip.open if str(path).endswith(".gz") else open
  with opener(path, "wt", encoding="utf-8") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")
    for line in extra_lines:
      f.write(line + "\n")
