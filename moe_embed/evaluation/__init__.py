"""Retrieval evaluation on BEIR-format folders: encode, exact search, trec_eval metrics."""

from __future__ import annotations

import os
from typing import Callable, Optional, Sequence

import numpy as np

from moe_embed.evaluation import beir, metrics, search

EncodeFn = Callable[[Sequence[str], str], np.ndarray]  # (texts, prefix) -> [n, d] unit-norm
METRIC_KEYS = ("ndcg@10", "recall@10", "recall@100", "mrr@10")


def _truncate(x: np.ndarray, dim: Optional[int]) -> np.ndarray:
  if not dim:
    return x
  if dim > x.shape[1]:
    raise ValueError(f"dim={dim} is larger than the embedding width {x.shape[1]}.")
  x = x[:, :dim]
  return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def evaluate_folder(encode: EncodeFn, folder: str, *, dim: Optional[int] = None,
                    query_prefix: str = "", doc_prefix: str = "", top: int = 100,
                    show_progress: bool = False) -> dict:
  """Metrics of one BEIR folder."""
  data = beir.load_beir(folder)
  docs = _truncate(encode(data.doc_texts, doc_prefix), dim)
  queries = _truncate(encode(data.query_texts, query_prefix), dim)
  # One extra hit so that dropping a document whose id equals the query's
  # (BEIR's ignore_identical_ids) still leaves `top`.
  scores, ids = search.top_k(queries, docs, top + 1, show_progress=show_progress)
  run = {}
  for qi, qid in enumerate(data.query_ids):
    hits = {data.doc_ids[j]: float(s) for s, j in zip(scores[qi], ids[qi])
            if data.doc_ids[j] != qid}
    run[qid] = dict(sorted(hits.items(), key=lambda kv: -kv[1])[:top])
  result = metrics.evaluate_run(run, data.qrels)
  result["num_docs"] = len(data.doc_ids)
  return result


def evaluate_beir(encode: EncodeFn, beir_dirs: Sequence[str], *, dim: Optional[int] = None,
                  query_prefix: str = "", doc_prefix: str = "",
                  show_progress: bool = False) -> dict:
  """{folder name: metrics, ..., 'average': mean metrics over folders}."""
  results = {}
  for folder in beir_dirs:
    r = evaluate_folder(encode, folder, dim=dim, query_prefix=query_prefix,
                        doc_prefix=doc_prefix, show_progress=show_progress)
    results[os.path.basename(os.path.normpath(folder))] = r
  if results:
    results["average"] = {k: float(np.mean([r[k] for r in results.values()]))
                          for k in METRIC_KEYS}
    results["average"]["num_queries"] = int(
        sum(r["num_queries"] for name, r in results.items() if name != "average"))
  return results


def format_table(results: dict) -> str:
  """A fixed-width table of the results, one row per folder."""
  header = f"{'dataset':24s}" + "".join(f"{k:>12s}" for k in METRIC_KEYS) + f"{'queries':>9s}"
  rows = [header, "-" * len(header)]
  for name, r in results.items():
    rows.append(f"{name:24s}" + "".join(f"{r[k]:12.4f}" for k in METRIC_KEYS)
                + f"{r.get('num_queries', 0):9d}")
  return "\n".join(rows)
