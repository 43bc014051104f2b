"""BEIR retrieval evaluation: encode queries and documents, exact search, trec_eval metrics.

The encoder is either a function `encode(texts, prefix) -> float [n, d]` or an
object with `.encode(texts, *, prefix, batch_size, show_progress)` and, for the
default prefixes, `.query_prefix` / `.doc_prefix` (moe_embed.inference.Embedder;
router statistics also need its `.encode_with_routing`).
Embeddings are L2-normalised here whatever the encoder returns; with `dim`, the
first `dim` dimensions are kept and re-normalised (Matryoshka).

Queries are encoded first; documents are then encoded a chunk at a time and
each chunk is searched at every requested Matryoshka width and merged into a
running top-k, so a large corpus (a MIRACL language) never holds all its
embeddings at once, and every width comes from one encoding pass. So does
every storage precision (`quantize`: int8, binary; see `quantization`): the
first document chunk calibrates the int8 ranges, and each chunk is quantized
and searched with the quantized queries; with rescoring the quantized chunks
are kept (1 or 1/32 of the float32 bytes) for the final float re-ranking.

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

from moe_embed import validation
from moe_embed.evaluation import beir, metrics, quantization, search
from moe_embed.moe import router_stats

EncodeFn = Callable[[Sequence[str], str], np.ndarray]  # (texts, prefix) -> [n, d]
Encoder = Union[EncodeFn, Any]  # An EncodeFn or an object with .encode (see module doc).

TOP = 100  # Hits kept per query: enough for recall@100.
_ENCODE_CHUNK = 8192  # Documents encoded and searched at a time (bounds memory).


def normalize(x: np.ndarray, dim: Optional[int] = None) -> np.ndarray:
  """float32 [n, dim or d]: the first `dim` columns, L2-normalised row by row.

  `dim` is checked against the width by the caller, where it enters (evaluate_data).
  """
  x = np.asarray(x, np.float32)
  if x.ndim != 2:
    raise ValueError(f"The encoder returned shape {x.shape}; expected [num_texts, dim].")
  if dim is not None:
    x = x[:, :dim]
  norms = np.linalg.norm(x, axis=1, keepdims=True)
  return x / np.maximum(norms, 1e-12)


def _encode(encoder: Encoder, texts: Sequence[str], prefix: str, *, batch_size: int,
            show_progress: bool, desc: str, routing: bool = False
            ) -> tuple[np.ndarray, Optional[dict]]:
  """(raw embeddings [len(texts), d] in input order, router statistics or None).

  The statistics come from the encoder's `encode_with_routing`, with `routing` only.
  """
  stats = None
  if hasattr(encoder, "encode"):
    kwargs = dict(prefix=prefix, batch_size=batch_size, show_progress=show_progress)
    if routing:
      out, stats = encoder.encode_with_routing(list(texts), **kwargs)
    else:
      out = encoder.encode(list(texts), **kwargs)
  else:
    if routing:
      raise ValueError("Router statistics need an Embedder, not a plain encode function.")
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
  return out, stats


def _merge(best: Optional[tuple[np.ndarray, np.ndarray]], scores: np.ndarray, idx: np.ndarray,
           k: int) -> tuple[np.ndarray, np.ndarray]:
  """Running top-k [q, k] merged with one document chunk's (indices already global).

  The running results come first and the sort is stable, so equal scores keep
  the lower document index first, as search.top_k orders them within a chunk.
  """
  if best is not None:
    scores = np.concatenate([best[0], scores], axis=1)
    idx = np.concatenate([best[1], idx], axis=1)
  order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
  return np.take_along_axis(scores, order, axis=1), np.take_along_axis(idx, order, axis=1)


def retrieve(query_emb: np.ndarray, doc_emb: np.ndarray, query_ids: Sequence[str],
             doc_ids: Sequence[str], *, top: int = TOP, ignore_identical_ids: bool = True,
             show_progress: bool = False, **chunks) -> dict[str, dict[str, float]]:
  """Run {query id: {doc id: score}} of the `top` best documents per query.

  query_emb: float [num_queries, d]; doc_emb: float [num_docs, d]; scores are
  inner products. `chunks` passes query_chunk / doc_chunk to search.top_k.
  The run is built by `_to_run`, as evaluate_data builds its runs.
  """
  extra = 1 if ignore_identical_ids else 0
  scores, idx = search.top_k(query_emb, doc_emb, top + extra, show_progress=show_progress,
                             **chunks)
  return _to_run(scores, idx, query_ids, doc_ids, top, ignore_identical_ids)


def _to_run(scores: np.ndarray, idx: np.ndarray, query_ids: Sequence[str],
            doc_ids: Sequence[str], top: int, ignore_identical_ids: bool = True
            ) -> dict[str, dict[str, float]]:
  """{query id: {doc id: score}} of the first `top` hits of top-k arrays [q, k].

  With ignore_identical_ids (BEIR's default), a document whose id is the
  query's is dropped first; the arrays hold one extra hit so that `top` remain.
  """
  run = {}
  for qi, qid in enumerate(query_ids):
    hits = {}
    for sc, j in zip(scores[qi].tolist(), idx[qi].tolist()):
      did = doc_ids[j]
      if ignore_identical_ids and did == qid:
        continue
      if len(hits) < top:
        hits[did] = sc
    run[qid] = hits
  return run


def _unscorable_reason(data: beir.BeirData) -> str:
  """Why no query of a folder can be scored, in words."""
  c = data.counts
  if not data.doc_ids:
    return "the corpus holds no documents"
  if not data.qrels:
    unknown = c.get("unknown_qrels_queries", 0) + c.get("unknown_qrels_docs", 0)
    if unknown:
      return f"all {unknown} qrels lines name unknown query or document ids"
    return "no query is judged in the qrels"
  return "no judged query has a relevant document (grade > 0)"


def evaluate_data(encoder: Encoder, data: beir.BeirData, *, dim: Optional[int] = None,
                  dims: Sequence[int] = (), batch_size: int = 64, query_prefix: str = "",
                  doc_prefix: str = "", show_progress: bool = False, routing: bool = False,
                  chunk_size: int = _ENCODE_CHUNK, quantize: Sequence[str] = (),
                  rescore_multiplier: int = 0) -> dict[str, Any]:
  """Metrics of one loaded folder: METRIC_KEYS, num_queries, skipped_queries, num_docs.

  Documents are encoded `chunk_size` at a time and each chunk is searched and
  merged into a running top-k, so memory holds one chunk of embeddings plus
  [num_queries, TOP] results whatever the corpus size. The metrics are those of
  width `dim` (None = full); with `dims`, entry "dims" maps each width to its
  metrics, all from the same encoding. With `routing`, entry "routing" holds
  the router statistics of queries and documents (summarize_routing). With
  `quantize` (precisions of `quantization.PRECISIONS`), entry "quantize" maps
  each to its metrics at width `dim`, from the same encoding, ranked by the
  quantized scores or, with rescore_multiplier m > 0, the top m x 101 of them
  re-ranked by the float query; every row then gives "bytes_per_vector".
  A folder where no query can be scored has metrics None and "unscored" says why.
  """
  precisions = quantization.check_precisions(quantize)
  if rescore_multiplier < 0:
    raise ValueError(f"rescore_multiplier={rescore_multiplier} must be >= 0 (0: no rescoring).")
  widths = [dim] + [d for d in dims if d != dim]
  k = TOP + 1  # One extra: a document with the query's own id is dropped (module doc).
  best: dict[Optional[int], Any] = {w: None for w in widths}
  stats = {"queries": [], "documents": []}
  kq = k * max(1, rescore_multiplier)  # Candidates kept by the quantized scores.
  qbest: dict[str, Any] = {p: None for p in precisions}
  kept: dict[str, list[np.ndarray]] = {p: [] for p in precisions}
  ranges, q_quantized = None, {}
  if data.query_ids and data.doc_ids:
    raw, q_stats = _encode(encoder, data.query_texts, query_prefix, batch_size=batch_size,
                           show_progress=show_progress, desc=f"{data.name} queries",
                           routing=routing)
    if routing:
      stats["queries"].append(q_stats)
    validation.check_widths([dim], raw.shape[1], "dim")  # The encoder's width: known here.
    validation.check_widths(dims, raw.shape[1], "dims")
    queries = {w: normalize(raw, w) for w in widths}
    del raw
    with tqdm.tqdm(total=len(data.doc_ids), desc=f"{data.name} docs", unit="doc",
                   disable=not show_progress) as bar:
      for start in range(0, len(data.doc_ids), chunk_size):
        texts = data.doc_texts[start:start + chunk_size]
        raw, d_stats = _encode(encoder, texts, doc_prefix, batch_size=batch_size,
                               show_progress=False, desc="", routing=routing)
        if routing:
          stats["documents"].append(d_stats)
        for w in widths:
          scores, idx = search.top_k(queries[w], normalize(raw, w), k)
          best[w] = _merge(best[w], scores, idx + start, k)
        if precisions:
          docs = normalize(raw, dim)
          if ranges is None and "int8" in precisions:
            ranges = quantization.int8_ranges(docs)  # Calibrated on the first chunk.
          for p in precisions:
            if p not in q_quantized:
              q_quantized[p] = quantization.quantize(queries[dim], p, ranges)
            quantized = quantization.quantize(docs, p, ranges)
            scores, idx = quantization.top_k(q_quantized[p], quantized, p, docs.shape[1], kq)
            qbest[p] = _merge(qbest[p], scores, idx + start, kq)
            if rescore_multiplier:
              kept[p].append(quantized)
        bar.update(len(texts))
  runs = {w: (_to_run(*best[w], data.query_ids, data.doc_ids, TOP) if best[w] is not None
              else {}) for w in widths}
  result: dict[str, Any] = _scored(runs[dim], data)
  full = getattr(getattr(encoder, "config", None), "embedding_dim", None)
  width_of = lambda w: w or (queries[dim].shape[1] if data.query_ids and data.doc_ids else full)
  if dims:
    result["dims"] = {str(w): _scored(runs[w], data) for w in widths if w in dims}
  if precisions:  # Bytes per vector next to every score: float32 rows too.
    if width_of(dim):
      result["bytes_per_vector"] = quantization.bytes_per_vector("float32", width_of(dim))
    for w in dims:
      result["dims"][str(w)]["bytes_per_vector"] = quantization.bytes_per_vector("float32", w)
    result["quantize"] = {}
    for p in precisions:
      found = qbest[p]
      if found is not None and rescore_multiplier:
        found = quantization.rescore(queries[dim], np.concatenate(kept[p]), found[1], p, k,
                                     ranges)
      run = _to_run(*found, data.query_ids, data.doc_ids, TOP) if found is not None else {}
      result["quantize"][p] = _scored(run, data)
      if width_of(dim):
        result["quantize"][p]["bytes_per_vector"] = quantization.bytes_per_vector(
            p, width_of(dim))
  if routing:
    top_k = getattr(getattr(encoder, "config", None), "top_k", 1)
    result["routing"] = {part: summarize_routing(router_stats.add_on_host(s), top_k)
                         for part, s in stats.items()}
  return result


def _scored(run: dict[str, dict[str, float]], data: beir.BeirData) -> dict[str, Any]:
  """evaluate_run's metrics and counts; metrics None (and "unscored") without a scorable query."""
  result: dict[str, Any] = metrics.evaluate_run(run, data.qrels)
  result["num_docs"] = len(data.doc_ids)
  if result["num_queries"] == 0:
    for key in metrics.METRIC_KEYS:
      result[key] = None
    result["unscored"] = _unscorable_reason(data)
  return result


def summarize_routing(stats: dict[str, dict[str, np.ndarray]], top_k: int) -> dict[str, Any]:
  """Per MoE layer: expert_fraction [E] (share of top-k assignments), router_entropy
  (mean per-token entropy of the router, nats), usage_entropy (entropy of
  expert_fraction: log E when balanced), load_balancing_loss, num_tokens.

  The fractions, entropy and loss are router_stats.layer_metrics' (their one
  definition); usage_entropy is the entropy of those fractions.
  """
  out = {}
  for layer in sorted(stats, key=lambda name: (len(name), name)):
    values = stats[layer]
    derived = router_stats.layer_metrics(values, top_k)
    fraction = np.asarray(derived["expert_fraction"], np.float64)
    p = fraction[fraction > 0]
    out[layer] = {
        "expert_fraction": [round(float(f), 6) for f in fraction],
        "router_entropy": float(derived["router_entropy"]),
        "usage_entropy": float(-np.sum(p * np.log(p))),
        "load_balancing_loss": float(derived["load_balancing_loss"]),
        "num_tokens": int(values["num_tokens"]),
    }
  return out


def _default_prefix(encoder: Encoder, given: Optional[str], attr: str) -> str:
  if given is not None:
    return given
  return getattr(encoder, attr, "") or ""


def evaluate_beir(encode_fn: Encoder, beir_dirs: Sequence[Union[str, beir.BeirData]], *,
                  dim: Optional[int] = None, dims: Sequence[int] = (), batch_size: int = 64,
                  query_prefix: Optional[str] = None, doc_prefix: Optional[str] = None,
                  split: str = "test", show_progress: bool = False, routing: bool = False,
                  chunk_size: int = _ENCODE_CHUNK, quantize: Sequence[str] = (),
                  rescore_multiplier: int = 0) -> dict[str, dict[str, Any]]:
  """{folder name: metrics, ..., "average": means over folders}.

  Args:
    encode_fn: `(texts, prefix) -> [n, d]` or an Embedder-like object.
    beir_dirs: BEIR folders (or folders already read with beir.load_beir); all
      are read and checked before anything is encoded.
    dim: Matryoshka dimension (first `dim` dims, re-normalised); None = full.
    dims: more Matryoshka widths scored from the same encoding: each folder's
      entry gains "dims": {"<width>": metrics}.
    batch_size: passed to an object's `.encode`.
    query_prefix, doc_prefix: prepended to queries / documents; None = the
      encoder's own `.query_prefix` / `.doc_prefix` ('' for a plain function).
    split: qrels file, qrels/<split>.tsv.
    show_progress: tqdm bars while encoding and searching.
    routing: add each folder's router statistics (an Embedder of an MoE model).
    chunk_size: documents encoded and searched at a time (bounds memory).
    quantize: storage precisions ('int8', 'binary') scored from the same encoding:
      each folder's entry gains "quantize": {"<precision>": metrics}.
    rescore_multiplier: 0 ranks by the quantized scores; m > 0 re-ranks their
      top m x 101 with the float query (evaluate_data).

  Returns:
    Per folder "ndcg@10", "recall@10", "recall@100", "mrr@10" (means over queries
    with a relevant document; None, with "unscored" saying why, where no query
    can be scored), "num_queries", "skipped_queries", "num_docs"; "average"
    holds the unweighted mean of each metric over the scored folders (as BEIR
    averages are reported), the summed counts and "num_folders" /
    "unscored_folders". Folders named "<group>/<name>" (beir.expand_folders:
    one folder per language) also get a "<group>/average" row.
  """
  if isinstance(beir_dirs, str):
    beir_dirs = [d for d in beir_dirs.split(",") if d]
  if batch_size <= 0 or chunk_size <= 0:
    raise ValueError(f"batch_size={batch_size} and chunk_size={chunk_size} must be positive.")
  quantization.check_precisions(quantize)
  names = {}
  for folder in beir_dirs:
    name = folder.name if isinstance(folder, beir.BeirData) else (
        os.path.basename(os.path.normpath(folder)))
    if name == "average" or name.endswith("/average") or name in names:
      raise ValueError(f"BEIR folders {names.get(name, '(reserved)')} and {folder} share the "
                       f"name {name!r}; results are keyed by folder name, so rename one.")
    names[name] = folder
  datasets = [folder if isinstance(folder, beir.BeirData) else beir.load_beir(folder, split)
              for folder in beir_dirs]
  q_prefix = _default_prefix(encode_fn, query_prefix, "query_prefix")
  d_prefix = _default_prefix(encode_fn, doc_prefix, "doc_prefix")
  results: dict[str, dict[str, Any]] = {}
  for data in datasets:
    logging.info("Evaluating %s: %d queries, %d documents.", data.name, len(data.query_ids),
                 len(data.doc_ids))
    results[data.name] = evaluate_data(encode_fn, data, dim=dim, dims=dims,
                                       batch_size=batch_size, query_prefix=q_prefix,
                                       doc_prefix=d_prefix, show_progress=show_progress,
                                       routing=routing, chunk_size=chunk_size,
                                       quantize=quantize, rescore_multiplier=rescore_multiplier)
    if results[data.name].get("unscored"):
      logging.warning("BEIR folder %s: no query can be scored (%s); it is left out of the "
                      "average.", data.name, results[data.name]["unscored"])
  groups: dict[str, list[dict]] = {}
  for name, r in results.items():
    if "/" in name:
      groups.setdefault(name.rsplit("/", 1)[0], []).append(r)
  averages = {f"{g}/average": average_rows(rows) for g, rows in groups.items() if len(rows) > 1}
  if results:
    averages["average"] = average_rows(list(results.values()))
  results.update(averages)
  return results


def average_rows(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
  """Unweighted means of the metrics over the scored rows (also per Matryoshka width), summed
  counts, and how many rows were scored."""
  scored = [r for r in rows if r.get(metrics.METRIC_KEYS[0]) is not None]
  average: dict[str, Any] = {
      k: (float(np.mean([r[k] for r in scored])) if scored else None)
      for k in metrics.METRIC_KEYS}
  for k in ("num_queries", "skipped_queries", "num_docs"):
    average[k] = int(sum(r[k] for r in rows))
  average["num_folders"] = len(rows)
  average["unscored_folders"] = len(rows) - len(scored)
  if rows and all("bytes_per_vector" in r for r in rows) and len(
      {r["bytes_per_vector"] for r in rows}) == 1:
    average["bytes_per_vector"] = rows[0]["bytes_per_vector"]
  for sub in ("dims", "quantize"):
    keys = [w for w in rows[0].get(sub, {})] if rows else []
    if keys and all(set(r.get(sub, {})) == set(keys) for r in rows):
      average[sub] = {w: average_rows([r[sub][w] for r in rows]) for w in keys}
      for w in keys:
        for k in ("num_folders", "unscored_folders"):
          average[sub][w].pop(k)
  return average


def format_table(results: dict[str, dict[str, Any]]) -> str:
  """A fixed-width text table of evaluate_beir's results: one row per folder and,
  where Matryoshka widths were scored, one per folder and width ("name @256"),
  and one per storage precision ("name int8"); bytes per vector in the last column."""
  cols = metrics.METRIC_KEYS + ("num_queries", "num_docs")
  rows = []
  for name, r in results.items():
    rows.append((name, r))
    for width, sub in r.get("dims", {}).items():
      rows.append((f"{name} @{width}", sub))
    for precision, sub in r.get("quantize", {}).items():
      rows.append((f"{name} {precision}", sub))
  with_bytes = any("bytes_per_vector" in r for _, r in rows)
  if with_bytes:
    cols += ("bytes/vector",)
  width = max([len("dataset")] + [len(n) for n, _ in rows])
  lines = [f"{'dataset':<{width}}  " + "  ".join(f"{c:>11}" for c in cols)]
  for name, r in rows:
    if r.get(metrics.METRIC_KEYS[0]) is None:
      cells = [f"{'n/a':>11}" for _ in metrics.METRIC_KEYS]
    else:
      cells = [f"{r[c]:>11.4f}" for c in metrics.METRIC_KEYS]
    cells += [f"{int(r[c]):>11d}" for c in ("num_queries", "num_docs")]
    if with_bytes:
      cells.append(f"{r['bytes_per_vector']:>12d}" if "bytes_per_vector" in r else " " * 12)
    line = f"{name:<{width}}  " + "  ".join(cells)
    if r.get("unscored"):
      line += f"  (not scored: {r['unscored']})"
    elif r.get("unscored_folders"):
      line += f"  ({r['unscored_folders']} of {r['num_folders']} folders not scored)"
    lines.append(line)
  return "\n".join(lines)


def format_routing(results: dict[str, dict[str, Any]]) -> str:
  """Router statistics of evaluate_beir(routing=True), one line per folder, part and layer:
  router entropy, usage entropy and the share of tokens sent to each expert."""
  lines = [f"{'dataset':<24} {'part':<9} {'layer':<9} {'entropy':>8} {'usage':>7}  expert share"]
  for name, r in results.items():
    for part, layers in r.get("routing", {}).items():
      for layer, m in layers.items():
        share = " ".join(f"{f:.3f}" for f in m["expert_fraction"])
        lines.append(f"{name:<24} {part:<9} {layer:<9} {m['router_entropy']:>8.4f} "
                     f"{m['usage_entropy']:>7.4f}  {share}")
  return "\n".join(lines)
