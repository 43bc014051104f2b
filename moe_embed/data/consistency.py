"""Consistency filtering: keep a pair only if its document ranks in the top k for its query.

The paper cleans its pairs this way with a smaller embedding model. Each query
is ranked against a pool of `pool_size` distinct documents of its own source:
its document plus pool_size - 1 others drawn at random. A source's distinct
documents are shuffled (seeded by the seed and the source's name) and cut into
blocks of pool_size, the last block topped up with documents drawn at random
from the other blocks; every pair is scored against the block holding its
document. So each document is embedded once, scoring is one [pairs, pool_size]
product per block (never an [n, n] matrix), and a source with fewer than
pool_size documents is ranked against all of them.

Ties are conservative: the document ranks after every other candidate that
scores at least as high, so a pair is kept when fewer than k candidates do.

Process p of P takes every P-th block (`process_index`, `process_count`).
Blocks do not depend on P, so the union of the shards equals a one-process run.
"""

from __future__ import annotations

import dataclasses
import os
import zlib
from typing import Callable, Sequence

import numpy as np

from moe_embed.data import jsonl


@dataclasses.dataclass(frozen=True)
class Pool:
  """One block of a source's documents and the pairs ranked against it."""

  source: str
  documents: tuple[str, ...]  # [N] distinct texts: the block's own, then the top-ups.
  own: int  # The first `own` documents are the block's; the rest top it up to N.
  pairs: tuple[int, ...]  # Records whose document is one of the block's own.
  positives: tuple[int, ...]  # Each pair's document as a position in `documents`.


@dataclasses.dataclass
class SourceReport:
  """Counts of one source: pairs and kept are this process's, documents all of them."""

  documents: int  # Distinct documents of the source.
  pool_size: int  # Documents each query was ranked against.
  pairs: int = 0
  kept: int = 0

  @property
  def kept_fraction(self) -> float:
    return self.kept / self.pairs if self.pairs else 0.0

  def as_dict(self) -> dict:
    return {"pairs": self.pairs, "kept": self.kept,
            "kept_fraction": round(self.kept_fraction, 6),
            "pool_size": self.pool_size, "documents": self.documents}


def _source(record: dict) -> str:
  return record.get("source", jsonl.DEFAULT_SOURCE)


def plan_pools(records: Sequence[dict], pool_size: int, seed: int = 0) -> list[Pool]:
  """Every source's blocks, sources in name order; depends only on the texts and seed."""
  if pool_size < 2:
    raise ValueError(f"pool_size={pool_size} must be at least 2.")
  if seed < 0:
    raise ValueError(f"seed={seed} must be non-negative.")
  by_source: dict[str, dict[str, list[int]]] = {}  # source -> document -> records
  for i, record in enumerate(records):
    by_source.setdefault(_source(record), {}).setdefault(record["document"], []).append(i)
  pools = []
  for source in sorted(by_source):
    pairs_of = by_source[source]
    texts = sorted(pairs_of)
    rng = np.random.default_rng([seed, zlib.crc32(source.encode("utf-8"))])
    order = rng.permutation(len(texts))
    size = min(pool_size, len(texts))
    for start in range(0, len(texts), size):
      own = order[start:start + size]
      extra = order[:0]
      if len(own) < size:  # The last block: topped up from the earlier ones.
        extra = rng.choice(order[:start], size - len(own), replace=False)
      pairs, positives = [], []
      for position, j in enumerate(own):
        pairs += pairs_of[texts[j]]
        positives += [position] * len(pairs_of[texts[j]])
      pools.append(Pool(source, tuple(texts[j] for j in np.concatenate([own, extra])),
                        len(own), tuple(pairs), tuple(positives)))
  return pools


def keep_mask(queries: np.ndarray, pool: np.ndarray, positives: np.ndarray, k: int,
              *, chunk: int = 4096) -> np.ndarray:
  """bool [m]: query i's positive pool[positives[i]] is in its top k (ties count against).

  queries float [m, dim], pool float [N, dim], positives int [m]; scored in
  chunks of rows, so memory is one [chunk, N] block.
  """
  keep = np.zeros(len(queries), bool)
  for start in range(0, len(queries), chunk):
    scores = queries[start:start + chunk] @ pool.T  # [chunk, N]
    rows = np.arange(len(scores))
    own = scores[rows, positives[start:start + chunk]]
    rank = np.sum(scores >= own[:, None], axis=1)  # 1 + candidates scoring >= the positive.
    keep[start:start + chunk] = rank <= k
  return keep


def _check_args(k: int, pool_size: int, process_index: int, process_count: int) -> None:
  if not 0 < k < pool_size:
    raise ValueError(f"k={k} must be at least 1 and below pool_size={pool_size}, or every "
                     "pair is kept.")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must be in [0, {process_count}).")


def _check_vectors(name: str, x: np.ndarray, rows: int) -> np.ndarray:
  x = np.asarray(x, np.float32)
  if x.ndim != 2 or len(x) != rows:
    raise ValueError(f"{name} must be [{rows}, dim], one row per text; got shape {x.shape}.")
  bad = ~np.isfinite(x).all(axis=1)
  if bad.any():
    raise ValueError(f"{name} has {int(bad.sum())} rows with NaN or Inf (first at row "
                     f"{int(np.argmax(bad))}); check the encoder's output.")
  return x


def _filter(records: Sequence[dict], pools: Sequence[Pool], mine: Sequence[Pool], k: int,
            query_rows: Callable[[Pool], np.ndarray], doc_rows: Callable[[Pool], np.ndarray]
            ) -> tuple[list[dict], dict[str, SourceReport]]:
  """Ranks the pairs of this process's pools; reports cover every source."""
  reports: dict[str, SourceReport] = {}
  for pool in pools:
    report = reports.setdefault(pool.source, SourceReport(0, len(pool.documents)))
    report.documents += pool.own
  kept = []
  for pool in mine:
    keep = keep_mask(query_rows(pool), doc_rows(pool), np.asarray(pool.positives), k)
    reports[pool.source].pairs += len(pool.pairs)
    reports[pool.source].kept += int(keep.sum())
    kept += [i for i, ok in zip(pool.pairs, keep) if ok]
  return [records[i] for i in sorted(kept)], reports


def filter_embedded(records: Sequence[dict], queries: np.ndarray, documents: np.ndarray, *,
                    k: int = 2, pool_size: int, seed: int = 0, process_index: int = 0,
                    process_count: int = 1) -> tuple[list[dict], dict[str, SourceReport]]:
  """Kept records (input order) and per-source counts, from precomputed embeddings.

  queries, documents: float [n, dim], row i the embedding of record i's query
  and document (a document's first row is used when it repeats).
  """
  _check_args(k, pool_size, process_index, process_count)
  queries = _check_vectors("queries", queries, len(records))
  documents = _check_vectors("documents", documents, len(records))
  row_of: dict[str, int] = {}
  for i, record in enumerate(records):
    row_of.setdefault(record["document"], i)
  pools = plan_pools(records, pool_size, seed)
  return _filter(records, pools, pools[process_index::process_count], k,
                 lambda pool: queries[list(pool.pairs)],
                 lambda pool: documents[[row_of[t] for t in pool.documents]])


def filter_pairs(records: Sequence[dict], embedder, *, k: int = 2, pool_size: int,
                 seed: int = 0, process_index: int = 0, process_count: int = 1,
                 batch_size: int = 64, show_progress: bool = True
                 ) -> tuple[list[dict], dict[str, SourceReport]]:
  """Kept records (input order) and per-source counts, embedding with `embedder`.

  `embedder.encode(texts, prefix=, batch_size=, show_progress=)` returns float
  [n, dim]; only this process's pools are embedded, each text once.
  """
  _check_args(k, pool_size, process_index, process_count)
  pools = plan_pools(records, pool_size, seed)
  mine = pools[process_index::process_count]
  query_texts = sorted({records[i]["query"] for pool in mine for i in pool.pairs})
  doc_texts = sorted({t for pool in mine for t in pool.documents})

  def encode(texts: list[str], prefix: str) -> np.ndarray:
    if not texts:  # More processes than pools: nothing to rank here.
      return np.zeros((0, 1), np.float32)
    vectors = embedder.encode(texts, prefix=prefix, batch_size=batch_size,
                              show_progress=show_progress)
    return _check_vectors(f"{prefix} embeddings", vectors, len(texts))

  queries, documents = encode(query_texts, "query"), encode(doc_texts, "document")
  query_row = {t: i for i, t in enumerate(query_texts)}
  doc_row = {t: i for i, t in enumerate(doc_texts)}
  return _filter(records, pools, mine, k,
                 lambda pool: queries[[query_row[records[i]["query"]] for i in pool.pairs]],
                 lambda pool: documents[[doc_row[t] for t in pool.documents]])


def report_json(reports: dict[str, SourceReport], **settings) -> dict:
  """The report file: the settings, every source's counts and their total."""
  pairs = sum(r.pairs for r in reports.values())
  kept = sum(r.kept for r in reports.values())
  return {**settings, "sources": {name: r.as_dict() for name, r in sorted(reports.items())},
          "total": {"pairs": pairs, "kept": kept,
                    "kept_fraction": round(kept / pairs, 6) if pairs else 0.0}}


def format_table(reports: dict[str, SourceReport], pool_size: int) -> str:
  """A per-source table of pairs, kept, kept fraction and pool size, with a total row."""
  width = max([len("source"), len("total")] + [len(name) for name in reports])
  lines = [f"{'source':<{width}}  {'pairs':>9}  {'kept':>9}  {'kept %':>7}  {'pool':>6}"]
  for name, r in sorted(reports.items()):
    note = f"  (all {r.documents} documents: fewer than {pool_size})" \
        if r.pool_size < pool_size else ""
    lines.append(f"{name:<{width}}  {r.pairs:>9}  {r.kept:>9}  "
                 f"{100 * r.kept_fraction:>6.1f}%  {r.pool_size:>6}{note}")
  pairs = sum(r.pairs for r in reports.values())
  kept = sum(r.kept for r in reports.values())
  lines.append(f"{'total':<{width}}  {pairs:>9}  {kept:>9}  "
               f"{100 * kept / max(pairs, 1):>6.1f}%")
  return "\n".join(lines)


def shard_path(path: str, process_index: int, process_count: int) -> str:
  """`path` itself for one process; else kept.jsonl -> kept-0001-of-0004.jsonl."""
  if process_count == 1:
    return path
  stem, ext = os.path.splitext(path)
  return f"{stem}-{process_index:04d}-of-{process_count:04d}{ext}"
