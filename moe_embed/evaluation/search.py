"""Exact top-k inner-product search in JAX, chunked over queries and documents.

Memory stays bounded by one [query_chunk, doc_chunk] score block and a running
[query_chunk, k] top-k: a 1M x 768 corpus never needs a full similarity matrix.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import tqdm


@functools.partial(jax.jit, static_argnames=("k",))
def _merge_topk(best_scores, best_ids, queries, docs, doc_offset, num_valid, k):
  """Merges a doc chunk's scores into the running top-k of each query."""
  scores = queries @ docs.T  # [q, c]
  col = jnp.arange(docs.shape[0])
  scores = jnp.where(col[None, :] < num_valid, scores, -jnp.inf)
  ids = jnp.broadcast_to(col + doc_offset, scores.shape)
  all_scores = jnp.concatenate([best_scores, scores], axis=1)
  all_ids = jnp.concatenate([best_ids, ids], axis=1)
  top, pos = jax.lax.top_k(all_scores, k)
  return top, jnp.take_along_axis(all_ids, pos, axis=1)


def top_k(queries: np.ndarray, docs: np.ndarray, k: int, query_chunk: int = 1024,
          doc_chunk: int = 16384, show_progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """(scores float32 [nq, k'], doc indices int64 [nq, k']) with k' = min(k, n_docs)."""
  nq, nd = len(queries), len(docs)
  k = min(k, nd)
  if k <= 0 or nq == 0:
    return np.zeros((nq, 0), np.float32), np.zeros((nq, 0), np.int64)
  doc_chunk = min(doc_chunk, nd)
  out_scores = np.zeros((nq, k), np.float32)
  out_ids = np.zeros((nq, k), np.int64)
  n_chunks = -(-nd // doc_chunk)
  bar = tqdm.tqdm(total=nq * n_chunks, desc="search", disable=not show_progress)
  for qs in range(0, nq, query_chunk):
    q = jnp.asarray(queries[qs:qs + query_chunk], jnp.float32)
    best = jnp.full((q.shape[0], k), -jnp.inf, jnp.float32)
    best_ids = jnp.full((q.shape[0], k), -1, jnp.int32)
    for ds in range(0, nd, doc_chunk):
      d = docs[ds:ds + doc_chunk]
      valid = len(d)
      if valid < doc_chunk:  # Fixed shape: one compilation per query chunk size.
        d = np.concatenate([d, np.zeros((doc_chunk - valid, d.shape[1]), d.dtype)])
      best, best_ids = _merge_topk(best, best_ids, q, jnp.asarray(d, jnp.float32), ds, valid, k)
      bar.update(q.shape[0])
    out_scores[qs:qs + len(q)] = np.asarray(best)
    out_ids[qs:qs + len(q)] = np.asarray(best_ids)
  bar.close()
  return out_scores, out_ids
