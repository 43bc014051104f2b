"""Retrieval metrics with trec_eval's conventions (as pytrec_eval and BEIR report them).

- nDCG@k: linear gain (the qrels grade), discount log2(rank + 1), ideal DCG
  from the query's judged grades.
- recall@k: relevant documents (grade > 0) in the top k over all relevant.
- MRR@k: reciprocal rank of the first relevant document in the top k.
- Ranking: by score, ties broken by document id in descending order (trec_eval).
- Queries with no relevant document are skipped and counted.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

Run = Mapping[str, Mapping[str, float]]  # query id -> doc id -> score
Qrels = Mapping[str, Mapping[str, int]]  # query id -> doc id -> grade


def rank(scores: Mapping[str, float]) -> list[str]:
  """Doc ids by descending score; ties by descending doc id, as trec_eval."""
  return [d for d, _ in sorted(scores.items(), key=lambda kv: (kv[1], kv[0]), reverse=True)]


def ndcg_at(ranked: Sequence[str], judged: Mapping[str, int], k: int) -> float:
  dcg = sum(judged.get(d, 0) / math.log2(i + 2) for i, d in enumerate(ranked[:k]))
  ideal = sorted((g for g in judged.values() if g > 0), reverse=True)[:k]
  idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal))
  return dcg / idcg if idcg > 0 else 0.0


def recall_at(ranked: Sequence[str], judged: Mapping[str, int], k: int) -> float:
  relevant = {d for d, g in judged.items() if g > 0}
  return len(relevant.intersection(ranked[:k])) / len(relevant) if relevant else 0.0


def mrr_at(ranked: Sequence[str], judged: Mapping[str, int], k: int) -> float:
  for i, d in enumerate(ranked[:k]):
    if judged.get(d, 0) > 0:
      return 1.0 / (i + 1)
  return 0.0


def evaluate_run(run: Run, qrels: Qrels) -> dict[str, float]:
  """Mean nDCG@10, recall@10, recall@100, MRR@10 over queries with relevant documents."""
  totals = {"ndcg@10": 0.0, "recall@10": 0.0, "recall@100": 0.0, "mrr@10": 0.0}
  scored = skipped = 0
  for qid, judged in qrels.items():
    if not any(g > 0 for g in judged.values()):
      skipped += 1
      continue
    ranked = rank(run.get(qid, {}))
    totals["ndcg@10"] += ndcg_at(ranked, judged, 10)
    totals["recall@10"] += recall_at(ranked, judged, 10)
    totals["recall@100"] += recall_at(ranked, judged, 100)
    totals["mrr@10"] += mrr_at(ranked, judged, 10)
    scored += 1
  out = {k: v / scored if scored else 0.0 for k, v in totals.items()}
  out["num_queries"] = scored
  out["skipped_queries"] = skipped
  return out
