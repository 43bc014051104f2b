"""Embedding quantization for storage, with sentence-transformers' `quantize_embeddings` conventions.

- int8: per-dimension ranges [2, d] (min, max) from calibration embeddings;
  q = clip(floor((x - min) / step), 0, 255) - 128 with step = (max - min) / 255
  (1 where max == min). Scored by the integer inner product of the int8 query
  and document vectors; rescoring uses the float query against the dequantized
  documents, (q + 128) * step + min.
- binary: the signs packed 8 per byte, np.packbits(x > 0) - 128 as int8
  ([n, ceil(d / 8)]). Scored by minus the Hamming distance between query and
  document bits; rescoring uses the float query against the unpacked 0/1 bits.

With rescoring, the top `rescore_multiplier * k` documents by the quantized
score are re-ranked by the float query's score (sentence-transformers'
`semantic_search_*(rescore=True)`); the documents stay quantized.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

PRECISIONS = ("int8", "binary")
_QUERY_BLOCK = 1024  # Queries scored at a time (bounds the [queries, docs] block).


def check_precisions(precisions) -> list[str]:
  precisions = list(precisions)
  bad = [p for p in precisions if p not in PRECISIONS]
  if bad:
    raise ValueError(f"quantize={','.join(precisions)}: {bad} not among {PRECISIONS}.")
  return precisions


def bytes_per_vector(precision: str, dim: int) -> int:
  """Storage of one embedding of width `dim`: float32, int8 or packed binary."""
  return {"float32": 4 * dim, "int8": dim, "binary": -(-dim // 8)}[precision]


def int8_ranges(calibration: np.ndarray) -> np.ndarray:
  """float32 [2, d]: per-dimension min and max of calibration embeddings [n, d], n >= 2."""
  calibration = np.asarray(calibration, np.float32)
  if calibration.ndim != 2 or len(calibration) < 2:
    raise ValueError(f"int8 ranges need at least two calibration embeddings; got shape "
                     f"{calibration.shape}.")
  return np.stack([calibration.min(0), calibration.max(0)])


def _steps(ranges: np.ndarray) -> np.ndarray:
  steps = (ranges[1] - ranges[0]) / 255
  return np.where(steps == 0, 1, steps).astype(np.float32)


def quantize(x: np.ndarray, precision: str, ranges: Optional[np.ndarray] = None) -> np.ndarray:
  """int8 [n, d] (needs ranges [2, d]) or packed binary int8 [n, ceil(d / 8)] of x [n, d]."""
  x = np.asarray(x, np.float32)
  if precision == "int8":
    if ranges is None:
      raise ValueError("int8 quantization needs ranges (int8_ranges of calibration embeddings).")
    ranges = np.asarray(ranges, np.float32)
    if ranges.shape != (2, x.shape[1]):
      raise ValueError(f"int8 ranges have shape {ranges.shape}; the embeddings need "
                       f"(2, {x.shape[1]}).")
    q = np.clip(np.floor((x - ranges[0]) / _steps(ranges)), 0, 255)
    return (q - 128).astype(np.int8)
  if precision == "binary":
    return (np.packbits(x > 0, axis=-1).astype(np.int16) - 128).astype(np.int8)
  raise ValueError(f"precision={precision!r} is not one of {PRECISIONS}.")


def dequantize(q: np.ndarray, precision: str, dim: int,
               ranges: Optional[np.ndarray] = None) -> np.ndarray:
  """float64 [n, dim] that a float query is rescored against: int8 back to the float
  range; binary as its 0/1 bits."""
  if precision == "int8":
    ranges = np.asarray(ranges, np.float32)
    return (q.astype(np.float64) + 128) * _steps(ranges) + ranges[0]
  bits = (q.astype(np.int16) + 128).astype(np.uint8)
  return np.unpackbits(bits, axis=-1)[:, :dim].astype(np.float64)


def scores(queries: np.ndarray, docs: np.ndarray, precision: str, dim: int) -> np.ndarray:
  """float64 [q, n] quantized scores: int8 inner product, or minus the Hamming distance."""
  if precision == "int8":
    return (queries.astype(np.int32) @ docs.astype(np.int32).T).astype(np.float64)
  # Hamming distance from +-1 bit vectors: d - 2 * hamming = <a, b> (exact in float32).
  signs = lambda q: (dequantize(q, "binary", dim) * 2 - 1).astype(np.float32)
  return -(dim - signs(queries) @ signs(docs).T).astype(np.float64) / 2


def top_k(queries: np.ndarray, docs: np.ndarray, precision: str, dim: int, k: int
          ) -> tuple[np.ndarray, np.ndarray]:
  """(scores [q, k'], doc indices [q, k']) of quantized queries and docs, best first;
  equal scores keep the lower document index first."""
  k = min(k, len(docs))
  out_s, out_i = [], []
  for start in range(0, len(queries), _QUERY_BLOCK):
    s = scores(queries[start:start + _QUERY_BLOCK], docs, precision, dim)
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    out_s.append(np.take_along_axis(s, order, axis=1))
    out_i.append(order)
  if not out_s:
    return np.zeros((0, k)), np.zeros((0, k), np.int64)
  return np.concatenate(out_s), np.concatenate(out_i).astype(np.int64)


def rescore(float_queries: np.ndarray, quantized_docs: np.ndarray, candidates: np.ndarray,
            precision: str, k: int, ranges: Optional[np.ndarray] = None
            ) -> tuple[np.ndarray, np.ndarray]:
  """Re-ranks candidate doc indices [q, c] by the float query's score against the
  quantized docs (dequantize); returns the best k (scores, indices), ties by position."""
  dim = float_queries.shape[1]
  out_s, out_i = [], []
  for qi in range(len(float_queries)):
    docs = dequantize(quantized_docs[candidates[qi]], precision, dim, ranges)  # [c, dim]
    s = docs @ float_queries[qi].astype(np.float64)
    order = np.argsort(-s, kind="stable")[:k]
    out_s.append(s[order])
    out_i.append(candidates[qi][order])
  return np.array(out_s).reshape(len(float_queries), -1), np.array(out_i, np.int64).reshape(
      len(float_queries), -1)
