"""Hard-negative mining with false-negative filtering.

For each (query, positive) record, the pool of all positive documents is
searched exactly (chunked top-k in JAX) with the query's embedding; candidates
that score too close to the positive are dropped as likely false negatives:
with a relative margin a candidate is kept only if score < margin * s_pos (the
paper used 0.95), with an absolute one only if score < s_pos - abs_margin.
The first k survivors become the record's "negatives".
"""

from __future__ import annotations

import dataclasses
import json
from typing import Optional, Sequence

import numpy as np

from moe_embed.evaluation import search


@dataclasses.dataclass
class MiningReport:
  queries: int = 0
  kept: int = 0
  dropped_same_text: int = 0  # The positive itself, or an identical document.
  dropped_margin: int = 0  # Scored too close to the positive.
  short: int = 0  # Queries left with fewer than k negatives.


def mine(records: Sequence[dict], embedder, *, k: int, margin: Optional[float] = 0.95,
         abs_margin: Optional[float] = None, batch_size: int = 64,
         candidates: Optional[int] = None, show_progress: bool = True
         ) -> tuple[list[dict], MiningReport]:
  """Records with mined "negatives" (hardest first) and what was filtered."""
  if k <= 0:
    raise ValueError(f"k={k} must be positive.")
  if (margin is None) == (abs_margin is None):
    raise ValueError("Give exactly one of margin (relative) and abs_margin (absolute).")
  pool = sorted({r["document"] for r in records})
  index = {text: i for i, text in enumerate(pool)}
  docs = embedder.encode(pool, prefix="document", batch_size=batch_size,
                         show_progress=show_progress)
  queries = embedder.encode([r["query"] for r in records], prefix="query",
                            batch_size=batch_size, show_progress=show_progress)
  positives = docs[[index[r["document"]] for r in records]]
  pos_scores = np.sum(queries * positives, axis=1)
  scores, ids = search.top_k(queries, docs, candidates or 3 * k + 1,
                             show_progress=show_progress)
  report = MiningReport(queries=len(records))
  out = []
  for i, record in enumerate(records):
    limit = (margin * pos_scores[i]) if margin is not None else (pos_scores[i] - abs_margin)
    negatives = []
    for score, j in zip(scores[i], ids[i]):
      if len(negatives) == k:
        break
      if pool[j] == record["document"]:
        report.dropped_same_text += 1
      elif score >= limit:
        report.dropped_margin += 1
      else:
        negatives.append(pool[j])
    report.kept += len(negatives)
    report.short += len(negatives) < k
    out.append({**record, "negatives": negatives})
  return out, report


def write_jsonl(records: Sequence[dict], path: str) -> None:
  with open(path, "w", encoding="utf-8") as f:
    for r in records:
      f.write(json.dumps(r, ensure_ascii=False) + "\n")
