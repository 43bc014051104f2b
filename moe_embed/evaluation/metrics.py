"""Retrieval metrics with trec_eval's conventions (as pytrec_eval and BEIR report them).

A run maps query id -> {doc id: score}; qrels map query id -> {doc id: grade}.

- Ranking: by descending score; equal scores are ordered by descending doc id
  (string comparison), which is what trec_eval does, so ties are deterministic
  and independent of the order in which the run lists documents.
- nDCG@k: gain = the judged grade (trec_eval's linear gain; grades <= 0 and
  unjudged documents gain 0), discount 1 / log2(rank + 1) with rank from 1, ideal
  DCG from the query's own judged grades.
- recall@k: relevant documents (grade > 0) in the top k / all relevant documents.
- MRR@k: 1 / rank of the first relevant document within the top k, else 0.
- Queries whose judgements hold no relevant document are skipped (they have no
  ideal ranking) and counted in `skipped_queries`. A judged query missing from
  the run scores 0 on every metric.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

Run = Mapping[str, Mapping[str, float]]  # query id -> doc id -> score
Qrels = Mapping[str, Mapping[str, int]]  # query id -> doc id -> grade

METRIC_KEYS = ("ndcg@10", "recall@10", "recall@100", "mrr@10")


def rank(scores: Mapping[str, float]) -> list[str]:
  """Doc ids by descending score; ties by descending doc id, as trec_eval orders them."""
  return [d for d, _ in sorted(scores.items(), key=lambda kv: (kv[1], kv[0]), reverse=True)]


def _gain(grade: int) -> float:
  return float(grade) if grade > 0 else 0.0


def dcg(gains: Sequence[float]) -> float:
  """sum_i gains[i] / log2(i + 2): discounted cumulative gain of a ranked list."""
  return sum(g / math.log2(i + 2) for i, g in enumerate(gains))


def ndcg_at(ranked: Sequence[str], judged: Mapping[str, int], k: int) -> float:
  """nDCG@k of one ranked list; 0 when the query has no relevant document."""
  actual = dcg([_gain(judged.get(d, 0)) for d in ranked[:k]])
  ideal = dcg(sorted((_gain(g) for g in judged.values()), reverse=True)[:k])
  return actual / ideal if ideal > 0 else 0.0


def recall_at(ranked: Sequence[str], judged: Mapping[str, int], k: int) -> float:
  """Fraction of the relevant documents (grade > 0) found in the top k."""
  relevant = {d for d, g in judged.items() if g > 0}
  if not relevant:
    return 0.0
  return len(relevant.intersection(ranked[:k])) / len(relevant)


def mrr_at(ranked: Sequence[str], judged: Mapping[str, int], k: int) -> float:
  """Reciprocal rank of the first relevant document within the top k (0 if none)."""
  for i, d in enumerate(ranked[:k]):
    if judged.get(d, 0) > 0:
      return 1.0 / (i + 1)
  return 0.0


def per_query(run: Run, qrels: Qrels) -> dict[str, dict[str, float]]:
  """{query id: {metric: value}} for every judged query with a relevant document."""
  out = {}
  for qid, judged in qrels.items():
    if not any(g > 0 for g in judged.values()):
      continue
    ranked = rank(run.get(qid, {}))
    out[qid] = {
        "ndcg@10": ndcg_at(ranked, judged, 10),
        "recall@10": recall_at(ranked, judged, 10),
        "recall@100": recall_at(ranked, judged, 100),
        "mrr@10": mrr_at(ranked, judged, 10),
    }
  return out


def evaluate_run(run: Run, qrels: Qrels) -> dict[str, float]:
  """Means of METRIC_KEYS over the scored queries, with `num_queries` and `skipped_queries`."""
  scores = per_query(run, qrels)
  n = len(scores)
  out: dict[str, float] = {
      key: (math.fsum(s[key] for s in scores.values()) / n if n else 0.0)
      for key in METRIC_KEYS}
  out["num_queries"] = n
  out["skipped_queries"] = len(qrels) - n
  return out
