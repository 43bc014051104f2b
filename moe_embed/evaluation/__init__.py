"""Retrieval evaluation on BEIR-format folders: encode, exact chunked search, trec_eval metrics.

  from moe_embed.evaluation import evaluate_beir
  results = evaluate_beir(embedder, ["/data/beir/scifact"], dim=256)
  results["scifact"]["ndcg@10"], results["average"]["ndcg@10"]

Modules: `beir` (reading and checking folders, MIRACL-style folders of
languages), `search` (exact top-k in JAX), `metrics` (nDCG, recall, MRR as
trec_eval computes them), `evaluator` (the pipeline: Matryoshka widths from one
encoding, router statistics, chunked encoding), `mteb` (MTEB tasks through the
`mteb` package; imported on its own, as it needs the [mteb] extra), `quantization`
(int8 and binary storage precisions with sentence-transformers' conventions, scored
by `evaluator` from the same encoding).
"""

from __future__ import annotations

from moe_embed.evaluation.evaluator import (average_rows, evaluate_beir, evaluate_data,
                                            format_routing, format_table, retrieve,
                                            summarize_routing)
from moe_embed.evaluation.metrics import METRIC_KEYS

__all__ = ["average_rows", "evaluate_beir", "evaluate_data", "format_routing", "format_table",
           "retrieve", "summarize_routing", "METRIC_KEYS"]
