"""Hard-negative mining with false-negative filtering.

The candidate pool is the pairs' own positives, plus any document collection
given as `corpus` (`read_corpus`), deduplicated by text (surrounding whitespace
stripped). Each query's embedding searches the pool exactly (chunked top-k in
JAX, `evaluation.search.top_k`, never a full score matrix) for its `window`
best candidates; queries go in blocks of `query_block`, so memory holds the
pool's embeddings and one block's [block, window] results. Then, per record:

1. every positive of the record's query (the record's own document and those
   of other records with the same query text) is dropped, whatever the score;
2. a candidate at or above the margin limit is dropped as a likely false
   negative (`margin_limit`): with a relative margin m (the paper's 0.95) a
   candidate is kept only if score < m * s_pos when the positive scores
   s_pos > 0, and only if score < (2 - m) * s_pos when s_pos <= 0, i.e. at
   least (1 - m) * |s_pos| below the positive either way and never above it
   (m * s_pos alone would lie above a negative s_pos); with an absolute margin
   a, only if score < s_pos - a;
3. of the survivors, in rank order, those at ranks [lo, hi) of `rank_range`
   (all when None) remain; the first k become the record's "negatives"
   (sampling="top"), or k drawn at random without replacement, then sorted
   hardest first (sampling="random"). Record i draws with
   np.random.default_rng([seed, i]), so a run is reproducible and independent
   of how the queries are blocked. Fewer survivors than k give fewer negatives.

The window is `candidates` if given, else hi + P with a rank range and 3k + P
without (P: the most distinct positives any query has, which step 1 removes).

Against sentence-transformers' `mine_hard_negatives` (6.x), these match: the
pool (corpus plus positives, deduplicated), the removal of all of a query's
positives, the window of range_max + max_positives candidates, rank_range =
(range_min, range_max) counted among the candidates that survive the filters,
and random sampling without replacement, re-sorted by score. These differ: our
`margin` is the fraction kept (0.95) where its `relative_margin` is the gap
(0.05); its limit `s_pos - |s_pos| * relative_margin` equals ours for both
signs of s_pos, but it keeps a candidate exactly at a limit (`<=`, also for
the absolute margin) where we drop it (`<`, "below 0.95 x the positive"); it
measures the margin against the lowest-scoring positive of a query, we against
the record's own; it samples with Python's unseeded global `random`, we with a
seed per record; it compares texts exactly, we after stripping whitespace; it
deduplicates queries before encoding them; without a range its default window
is 10k + max_positives (with a margin), ours 3k + P; we have no cross-encoder
rescoring and no min_score / max_score.

Corpus files (`read_corpus`): a folder holding corpus.jsonl is read as a BEIR
folder (`evaluation.beir.read_corpus`: "_id", "title", "text"), as is a folder
of such folders; other items are JSONL files, globs or folders of .jsonl /
.jsonl.gz files, one document a line: {"text": ...} (with an optional
"title", joined BEIR's way: (title + " " + text).strip()) or, failing that,
{"document": ...}, so a corpus.jsonl file and a pairs file both work. Lines
that are neither, or empty, are skipped and counted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import json
import os
from typing import Iterator, Optional, Sequence

from etils import epath
import numpy as np
import tqdm

from moe_embed.data import jsonl
from moe_embed.evaluation import beir, search

SAMPLINGS = ("top", "random")
QUERY_BLOCK = 16384  # Queries encoded and searched at a time; bounds the [block, window] arrays.


@dataclasses.dataclass
class MiningReport:
  queries: int = 0
  pool: int = 0  # Distinct candidate documents.
  window: int = 0  # Candidates searched per query.
  kept: int = 0
  dropped_positive: int = 0  # A positive of the query, or a document with its text.
  dropped_margin: int = 0  # Scored too close to (or above) the positive.
  short: int = 0  # Queries left with fewer than k negatives.


def margin_limit(pos_scores: np.ndarray, margin: Optional[float] = None,
                 abs_margin: Optional[float] = None) -> np.ndarray:
  """The score a candidate must stay below, per query (see the module docstring, step 2)."""
  pos_scores = np.asarray(pos_scores, np.float32)
  if abs_margin is not None:
    return pos_scores - np.float32(abs_margin)
  m = np.float32(margin)
  return np.where(pos_scores > 0, m * pos_scores, (np.float32(2) - m) * pos_scores)


def _check_args(k, margin, abs_margin, rank_range, sampling) -> None:
  if k <= 0:
    raise ValueError(f"k={k} must be positive.")
  if (margin is None) == (abs_margin is None):
    raise ValueError("Give exactly one of margin (relative) and abs_margin (absolute).")
  if margin is not None and not 0 <= margin <= 1:
    raise ValueError(f"margin={margin} must be in [0, 1]; 0.95 keeps candidates below 95% "
                     "of the positive's score.")
  if abs_margin is not None and abs_margin < 0:
    raise ValueError(f"abs_margin={abs_margin} must be >= 0, or negatives could score above "
                     "their positive.")
  if rank_range is not None:
    lo, hi = rank_range
    if not 0 <= lo < hi:
      raise ValueError(f"rank_range=({lo}, {hi}) needs 0 <= min < max.")
    if k > hi - lo:
      raise ValueError(f"rank_range=({lo}, {hi}) holds {hi - lo} ranks, fewer than k={k}; "
                       "widen the range or lower k.")
  if sampling not in SAMPLINGS:
    raise ValueError(f"sampling={sampling!r} must be one of {SAMPLINGS}.")


def mine(records: Sequence[dict], embedder, *, k: int, margin: Optional[float] = 0.95,
         abs_margin: Optional[float] = None, corpus: Sequence[str] = (),
         rank_range: Optional[tuple[int, int]] = None, sampling: str = "top", seed: int = 0,
         batch_size: int = 64, candidates: Optional[int] = None,
         query_block: int = QUERY_BLOCK, show_progress: bool = True
         ) -> tuple[list[dict], MiningReport]:
  """Records with mined "negatives" (hardest first) and what was filtered.

  `corpus`: extra candidate documents (texts); the pool always holds the
  records' positives. `embedder.encode(texts, prefix="query"|"document", ...)`
  must return L2-normalised float rows.
  """
  _check_args(k, margin, abs_margin, rank_range, sampling)
  lo, hi = rank_range or (0, None)
  positives = [r["document"].strip() for r in records]
  pool = sorted({*positives, *(t.strip() for t in corpus)} - {""})
  index = {text: i for i, text in enumerate(pool)}
  by_query: dict[str, list[int]] = {}
  for record, text in zip(records, positives):
    ids = by_query.setdefault(record["query"], [])
    if index[text] not in ids:
      ids.append(index[text])
  most = max((len(v) for v in by_query.values()), default=1)
  window = candidates or (hi if hi is not None else 3 * k) + most
  report = MiningReport(queries=len(records), pool=len(pool), window=min(window, len(pool)))
  docs = embedder.encode(pool, prefix="document", batch_size=batch_size,
                         show_progress=show_progress)
  out = []
  for start in tqdm.trange(0, len(records), query_block, desc="mine", unit="block",
                           disable=not show_progress or len(records) <= query_block):
    block = records[start:start + query_block]
    queries = embedder.encode([r["query"] for r in block], prefix="query",
                              batch_size=batch_size, show_progress=show_progress)
    own = np.array([index[t] for t in positives[start:start + len(block)]])
    pos_scores = np.sum(queries * docs[own], axis=1)
    scores, ids = search.top_k(queries, docs, window, show_progress=show_progress)
    query_pos = np.full((len(block), most), -1, np.int64)  # [b, P], -1 = none.
    for i, r in enumerate(block):
      query_pos[i, :len(by_query[r["query"]])] = by_query[r["query"]]
    is_pos = (ids[:, :, None] == query_pos[:, None, :]).any(-1)  # [b, window]
    too_close = ~is_pos & (scores >= margin_limit(pos_scores, margin, abs_margin)[:, None])
    keep = ~is_pos & ~too_close
    rank = np.cumsum(keep, axis=1) - 1  # Rank among the survivors.
    keep &= rank >= lo
    if hi is not None:
      keep &= rank < hi
    report.dropped_positive += int(is_pos.sum())
    report.dropped_margin += int(too_close.sum())
    for i, record in enumerate(block):
      cols = np.flatnonzero(keep[i])
      if sampling == "random" and len(cols) > k:
        rng = np.random.default_rng([seed, start + i])
        cols = cols[np.sort(rng.choice(len(cols), size=k, replace=False))]
      negatives = [pool[j] for j in ids[i, cols[:k]]]
      report.kept += len(negatives)
      report.short += len(negatives) < k
      out.append({**record, "negatives": negatives})
  return out, report


def _jsonl_rows(path: str, report: jsonl.ReadReport) -> Iterator[tuple[int, object]]:
  """(line number, parsed JSON) of a .jsonl or .jsonl.gz file; bad lines are counted."""
  with epath.Path(path).open("rb") as stream, (
      gzip.open(stream) if path.endswith(".gz") else contextlib.nullcontext(stream)) as f:
    for lineno, raw in enumerate(f, 1):
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        report.bad(f"{path}:{lineno}", f"not valid UTF-8 (byte {e.start})")
        continue
      if not line.strip():
        continue
      try:
        yield lineno, json.loads(line)
      except json.JSONDecodeError as e:
        report.bad(f"{path}:{lineno}", f"invalid JSON ({e.msg})")


def document_text(row: object) -> Optional[str]:
  """The document of one corpus line ({"text", "title"?} or {"document"}), or None."""
  if not isinstance(row, dict):
    return None
  text = row.get("text")
  if isinstance(text, str):
    title = row.get("title")
    return ((title if isinstance(title, str) else "") + " " + text).strip()
  document = row.get("document")
  return document.strip() if isinstance(document, str) else None


def read_corpus(inputs: str | Sequence[str], report: jsonl.ReadReport) -> list[str]:
  """Candidate documents from BEIR folders and JSONL files (see the module docstring)."""
  items = inputs.split(",") if isinstance(inputs, str) else list(inputs)
  texts: list[str] = []
  for item in filter(None, items):
    folders = [f for _, f in beir.expand_folders([item]) if beir.is_beir_folder(f)] \
        if epath.Path(item).is_dir() else []
    for folder in folders:
      corpus, _ = beir.read_corpus(os.path.join(folder, "corpus.jsonl"))
      texts += [t for t in corpus.values() if t]
    if folders:
      continue
    for path in jsonl.expand_inputs(item):
      for lineno, row in _jsonl_rows(path, report):
        text = document_text(row)
        if text:
          report.read += 1
          texts.append(text)
        else:
          report.bad(f"{path}:{lineno}", "no non-empty 'text' or 'document' string")
  return texts


def write_jsonl(records: Sequence[dict], path: str) -> None:
  with open(path, "w", encoding="utf-8") as f:
    for r in records:
      f.write(json.dumps(r, ensure_ascii=False) + "\n")
