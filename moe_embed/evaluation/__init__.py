"""Retrieval evaluation on BEIR-format folders: encode, exact chunked search, trec_eval metrics.

  from moe_embed.evaluation import evaluate_beir
  results = evaluate_beir(embedder, ["/data/beir/scifact"], dim=256)
  results["scifact"]["ndcg@10"], results["average"]["ndcg@10"]

Modules: `beir` (reading and checking folders), `search` (exact top-k in JAX),
`metrics` (nDCG, recall, MRR as trec_eval computes them), `evaluator` (the pipeline).
"""

from __future__ import annotations

from moe_embed.evaluation.evaluator import evaluate_beir, evaluate_data, format_table, retrieve
from moe_embed.evaluation.metrics import METRIC_KEYS

__all__ = ["evaluate_beir", "evaluate_data", "format_table", "retrieve", "METRIC_KEYS"]
