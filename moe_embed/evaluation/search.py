"""Exact top-k inner-product search in JAX, chunked over queries and documents.

Each step scores one [query_chunk, doc_chunk] block and merges it into a
running [query_chunk, k] top-k, so memory is bounded by one score block plus
the running results: a 1M x 768 corpus never needs a full similarity matrix,
and each document chunk is moved to the device once. Chunks are padded to fixed
shapes, so the merge compiles once.

Ties are deterministic: equal scores keep the lower document index first (the
order a stable sort of -score gives), across chunk boundaries too, because the
running top-k (earlier documents) precedes the new chunk in every merge.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import tqdm


@functools.partial(jax.jit, static_argnames=("k",))
def _merge_topk(best_scores, best_ids, queries, docs, doc_offset, num_valid, *, k):
  """Merges one doc chunk into the running top-k.

  best_scores f32 [q, k], best_ids i32 [q, k], queries f32 [q, d], docs f32 [c, d];
  documents at chunk positions >= num_valid are padding and never selected.
  """
  scores = jnp.dot(queries, docs.T, precision=jax.lax.Precision.HIGHEST)  # [q, c]
  col = jnp.arange(docs.shape[0], dtype=jnp.int32)
  scores = jnp.where(col[None, :] < num_valid, scores, -jnp.inf)
  ids = jnp.broadcast_to(col + doc_offset, scores.shape)
  all_scores = jnp.concatenate([best_scores, scores], axis=1)  # [q, k + c]
  all_ids = jnp.concatenate([best_ids, ids], axis=1)
  # lax.top_k keeps the lower position first among equal values.
  top, pos = jax.lax.top_k(all_scores, k)
  return top, jnp.take_along_axis(all_ids, pos, axis=1)


def _check(name: str, x: np.ndarray) -> np.ndarray:
  x = np.asarray(x)
  if x.ndim != 2:
    raise ValueError(f"{name} must be a 2-D [n, dim] array; got shape {x.shape}.")
  bad = ~np.isfinite(x).all(axis=1)
  if bad.any():
    raise ValueError(f"{name} has {int(bad.sum())} rows with NaN or Inf (first at row "
                     f"{int(np.argmax(bad))}); check the encoder's output.")
  return x.astype(np.float32, copy=False)


def _pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
  if len(x) == rows:
    return x
  return np.concatenate([x, np.zeros((rows - len(x), x.shape[1]), x.dtype)])


def top_k(queries: np.ndarray, docs: np.ndarray, k: int, *, query_chunk: int = 1024,
          doc_chunk: int = 16384, show_progress: bool = False
          ) -> tuple[np.ndarray, np.ndarray]:
  """Exact top-k documents by inner product for every query.

  Args:
    queries: float [num_queries, dim].
    docs: float [num_docs, dim].
    k: results per query; clipped to num_docs.
    query_chunk, doc_chunk: block sizes; one block is query_chunk x doc_chunk
      float32 scores (64 MiB at the defaults).
    show_progress: a tqdm bar over blocks.

  Returns:
    (scores float32 [num_queries, k'], doc indices int64 [num_queries, k']) with
    k' = min(k, num_docs), best first, equal scores by ascending doc index.
  """
  queries, docs = _check("queries", queries), _check("docs", docs)
  if queries.shape[1] != docs.shape[1]:
    raise ValueError(f"queries have dim {queries.shape[1]} but docs have dim {docs.shape[1]}; "
                     "encode both with the same model and --dim.")
  if k < 0 or query_chunk <= 0 or doc_chunk <= 0:
    raise ValueError(f"k={k}, query_chunk={query_chunk}, doc_chunk={doc_chunk}: k must be "
                     ">= 0 and the chunk sizes positive.")
  nq, nd = len(queries), len(docs)
  k = min(k, nd)
  if k == 0 or nq == 0:
    return np.zeros((nq, k), np.float32), np.zeros((nq, k), np.int64)
  if nd >= 2**31:
    raise ValueError(f"{nd} documents exceed the int32 index range; shard the corpus.")
  query_chunk, doc_chunk = min(query_chunk, nq), min(doc_chunk, nd)
  q_starts, d_starts = range(0, nq, query_chunk), range(0, nd, doc_chunk)
  q_blocks = [jnp.asarray(_pad_rows(queries[s:s + query_chunk], query_chunk)) for s in q_starts]
  best = [(jnp.full((query_chunk, k), -jnp.inf, jnp.float32),
           jnp.full((query_chunk, k), -1, jnp.int32)) for _ in q_starts]
  with tqdm.tqdm(total=len(q_starts) * len(d_starts), desc="search", unit="block",
                 disable=not show_progress) as bar:
    for ds in d_starts:
      chunk = docs[ds:ds + doc_chunk]
      d_block = jnp.asarray(_pad_rows(chunk, doc_chunk))
      for i, q_block in enumerate(q_blocks):
        best[i] = _merge_topk(*best[i], q_block, d_block, np.int32(ds), np.int32(len(chunk)),
                              k=k)
        bar.update(1)
  scores = np.concatenate([np.asarray(s) for s, _ in best])[:nq]
  ids = np.concatenate([np.asarray(i) for _, i in best])[:nq].astype(np.int64)
  return scores, ids
