"""BEIR retrieval evaluation: encode queries and documents, exact search, trec_eval metrics.

The encoder is either a function `encode(texts, prefix) -> float [n, d]` or an
object with `.encode(texts, *, prefix, batch_size, show_progress)` and, for the
default prefixes, `.query_prefix` / `.doc_prefix` (moe_embed.inference.Embedder).
Embeddings are L2-normalised here whatever the encoder returns; with `dim`, the
first `dim` dimensions are kept and re-normalised (Matryoshka).

As BEIR does, a retrieved document whose id equals the query's id is dropped
before scoring (BEIR's `ignore_identical_ids`, on by default): one extra hit is
retrieved so that `top` remain.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional, Sequence, Union

from absl import logging
import numpy as np
import tqdm

from moe_embed.evaluation import beir, metrics, search

EncodeFn = Callable[[Sequence[str], str], np.ndarray]  # (texts, prefix) -> [n, d]
Encoder = Union[EncodeFn, Any]  # An EncodeFn or an object with .encode (see module doc).

TOP = 100  # Hits kept per query: enough for recall@100.
_ENCODE_CHUNK = 8192  # Texts per call of a plain encode function (bounds its memory).


def normalize(x: np.ndarray, dim: Optional[int] = None) -> np.ndarray:
  """float32 [n, dim or d]: the first `dim` columns, L2-normalised row by row."""
  x = np.asarray(x, np.float32)
  if x.ndim != 2:
    raise ValueError(f"The encoder returned shape {x.shape}; expected [num_texts, dim].")
  if dim is not None:
    if not 0 < dim <= x.shape[1]:
      raise ValueError(f"dim={dim} must be between 1 and the embedding width {x.shape[1]}.")
    x = x[:, :dim]
  norms = np.linalg.norm(x, axis=1, keepdims=True)
  return x / np.maximum(norms, 1e-12)


def _encode(encoder: Encoder, texts: Sequence[str], prefix: str, *, batch_size: int,
            show_progress: bool, desc: str) -> np.ndarray:
  """Raw embeddings [len(texts), d] in input order."""
  if hasattr(encoder, "encode"):
    out = encoder.encode(list(texts), prefix=prefix, batch_size=batch_size,
                         show_progress=show_progress)
  else:
    parts = []
    with tqdm.tqdm(total=len(texts), desc=desc, unit="text", disable=not show_progress) as bar:
      for start in range(0, len(texts), _ENCODE_CHUNK):
        chunk = list(texts[start:start + _ENCODE_CHUNK])
        parts.append(np.asarray(encoder(chunk, prefix), np.float32))
        bar.update(len(chunk))
    out = np.concatenate(parts) if parts else np.zeros((0, 1), np.float32)
  out = np.asarray(out)
  if out.ndim != 2 or len(out) != len(texts):
    raise ValueError(f"The encoder returned shape {out.shape} for {len(texts)} texts; expected "
                     f"[{len(texts)}, dim].")
  return out


def retrieve(query_emb: np.ndarray, doc_emb: np.ndarray, query_ids: Sequence[str],
             doc_ids: Sequence[str], *, top: int = TOP, ignore_identical_ids: bool = True,
             show_progress: bool = False, **chunks) -> dict[str, dict[str, float]]:
  """Run {query id: {doc id: score}} of the `top` best documents per query.

  query_emb: float [num_queries, d]; doc_emb: float [num_docs, d]; scores are
  inner products. `chunks` passes query_chunk / doc_chunk to search.top_k.
  """
  extra = 1 if ignore_identical_ids else 0
  scores, idx = search.top_k(query_emb, doc_emb, top + extra, show_progress=show_progress,
                             **chunks)
  run = {}
  for qi, qid in enumerate(query_ids):
    hits = {}
    for s, j in zip(scores[qi].tolist(), idx[qi].tolist()):
      did = doc_ids[j]
      if ignore_identical_ids and did == qid:
        continue
      if len(hits) < top:
        hits[did] = s
    run[qid] = hits
  return run


def evaluate_data(encoder: Encoder, data: beir.BeirData, *, dim: Optional[int] = None,
                  batch_size: int = 64, query_prefix: str = "", doc_prefix: str = "",
                  show_progress: bool = False) -> dict[str, float]:
  """Metrics of one loaded folder: METRIC_KEYS, num_queries, skipped_queries, num_docs."""
  if data.query_ids and data.doc_ids:
    docs = normalize(_encode(encoder, data.doc_texts, doc_prefix, batch_size=batch_size,
                             show_progress=show_progress, desc=f"{data.name} docs"), dim)
    queries = normalize(_encode(encoder, data.query_texts, query_prefix, batch_size=batch_size,
                                show_progress=show_progress, desc=f"{data.name} queries"), dim)
    run = retrieve(queries, docs, data.query_ids, data.doc_ids, show_progress=show_progress)
  else:
    run = {}
  result = metrics.evaluate_run(run, data.qrels)
  result["num_docs"] = len(data.doc_ids)
  return result


def _default_prefix(encoder: Encoder, given: Optional[str], attr: str) -> str:
  if given is not None:
    return given
  return getattr(encoder, attr, "") or ""


def evaluate_beir(encode_fn: Encoder, beir_dirs: Sequence[Union[str, beir.BeirData]], *,
                  dim: Optional[int] = None, batch_size: int = 64,
                  query_prefix: Optional[str] = None, doc_prefix: Optional[str] = None,
                  split: str = "test",
                  show_progress: bool = False) -> dict[str, dict[str, float]]:
  """{folder name: metrics, ..., "average": means over folders}.

  Args:
    encode_fn: `(texts, prefix) -> [n, d]` or an Embedder-like object.
    beir_dirs: BEIR folders (or folders already read with beir.load_beir); all
      are read and checked before anything is encoded.
    dim: Matryoshka dimension (first `dim` dims, re-normalised); None = full.
    batch_size: passed to an object's `.encode`.
    query_prefix, doc_prefix: prepended to queries / documents; None = the
      encoder's own `.query_prefix` / `.doc_prefix` ('' for a plain function).
    split: qrels file, qrels/<split>.tsv.
    show_progress: tqdm bars while encoding and searching.

  Returns:
    Per folder "ndcg@10", "recall@10", "recall@100", "mrr@10" (means over queries
    with a relevant document), "num_queries", "skipped_queries", "num_docs";
    "average" holds the unweighted mean of each metric over folders (as BEIR
    averages are reported) and the summed counts.
  """
  if isinstance(beir_dirs, str):
    beir_dirs = [d for d in beir_dirs.split(",") if d]
  if batch_size <= 0:
    raise ValueError(f"batch_size={batch_size} must be positive.")
  if dim is not None and dim <= 0:
    raise ValueError(f"dim={dim} must be positive (or None for the full width).")
  names = {}
  for folder in beir_dirs:
    name = folder.name if isinstance(folder, beir.BeirData) else (
        os.path.basename(os.path.normpath(folder)))
    if name == "average" or name in names:
      raise ValueError(f"BEIR folders {names.get(name, '(reserved)')} and {folder} share the "
                       f"name {name!r}; results are keyed by folder name, so rename one.")
    names[name] = folder
  datasets = [folder if isinstance(folder, beir.BeirData) else beir.load_beir(folder, split)
              for folder in beir_dirs]
  q_prefix = _default_prefix(encode_fn, query_prefix, "query_prefix")
  d_prefix = _default_prefix(encode_fn, doc_prefix, "doc_prefix")
  results: dict[str, dict[str, float]] = {}
  for data in datasets:
    logging.info("Evaluating %s: %d queries, %d documents.", data.name, len(data.query_ids),
                 len(data.doc_ids))
    results[data.name] = evaluate_data(encode_fn, data, dim=dim, batch_size=batch_size,
                                       query_prefix=q_prefix, doc_prefix=d_prefix,
                                       show_progress=show_progress)
  if results:
    average: dict[str, float] = {
        k: float(np.mean([r[k] for r in results.values()])) for k in metrics.METRIC_KEYS}
    for k in ("num_queries", "skipped_queries", "num_docs"):
      average[k] = int(sum(r[k] for r in results.values()))
    results["average"] = average
  return results


def format_table(results: dict[str, dict[str, float]]) -> str:
  """A fixed-width text table of evaluate_beir's results, one row per folder."""
  cols = metrics.METRIC_KEYS + ("num_queries", "num_docs")
  width = max([len("dataset")] + [len(n) for n in results])
  lines = [f"{'dataset':<{width}}  " + "  ".join(f"{c:>11}" for c in cols)]
  for name, r in results.items():
    cells = [f"{r[c]:>11.4f}" if c in metrics.METRIC_KEYS else f"{int(r[c]):>11d}"
             for c in cols]
    lines.append(f"{name:<{width}}  " + "  ".join(cells))
  return "\n".join(lines)
