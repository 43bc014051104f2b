"""Reading BEIR-format folders: corpus.jsonl, queries.jsonl, qrels/test.tsv."""

from __future__ import annotations

import dataclasses
import json
import os

from absl import logging


@dataclasses.dataclass
class BeirData:
  name: str
  doc_ids: list[str]
  doc_texts: list[str]  # title + " " + text, as BEIR joins them.
  query_ids: list[str]
  query_texts: list[str]
  qrels: dict[str, dict[str, int]]
  warnings: list[str]


def _read_jsonl(path: str, required: tuple[str, ...]) -> list[dict]:
  if not os.path.exists(path):
    raise FileNotFoundError(f"BEIR file {path} is missing.")
  rows = []
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg}).") from None
      missing = [k for k in required if k not in row]
      if missing:
        raise ValueError(f"{path}:{lineno}: missing field(s) {missing}.")
      rows.append(row)
  return rows


def load_beir(folder: str, split: str = "test") -> BeirData:
  """Loads one folder; unknown ids in qrels and empty texts are counted, not fatal."""
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"BEIR folder {folder} does not exist.")
  warnings = []
  corpus = _read_jsonl(os.path.join(folder, "corpus.jsonl"), ("_id", "text"))
  queries = _read_jsonl(os.path.join(folder, "queries.jsonl"), ("_id", "text"))
  doc_ids = [str(r["_id"]) for r in corpus]
  doc_texts = [(r.get("title") or "").strip() + " " + r["text"] if (r.get("title") or "").strip()
               else r["text"] for r in corpus]
  query_ids = [str(r["_id"]) for r in queries]
  query_texts = [r["text"] for r in queries]
  empty = sum(1 for t in doc_texts if not t.strip()) + sum(1 for t in query_texts if not t.strip())
  if empty:
    warnings.append(f"{empty} empty texts (embedded as empty strings)")
  qrels_path = os.path.join(folder, "qrels", f"{split}.tsv")
  if not os.path.exists(qrels_path):
    raise FileNotFoundError(f"BEIR file {qrels_path} is missing.")
  known_docs, known_queries = set(doc_ids), set(query_ids)
  qrels: dict[str, dict[str, int]] = {}
  unknown = 0
  with open(qrels_path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      parts = line.rstrip("\n").split("\t")
      if lineno == 1 and not parts[-1].lstrip("-").isdigit():
        continue  # Header.
      if not line.strip():
        continue
      if len(parts) != 3 or not parts[2].lstrip("-").isdigit():
        raise ValueError(f"{qrels_path}:{lineno}: expected 'query-id<TAB>corpus-id<TAB>score'.")
      qid, did, score = parts[0], parts[1], int(parts[2])
      if qid not in known_queries or did not in known_docs:
        unknown += 1
        continue
      qrels.setdefault(qid, {})[did] = score
  if unknown:
    warnings.append(f"{unknown} qrels lines name unknown query or document ids (ignored)")
  for w in warnings:
    logging.warning("%s: %s", folder, w)
  # Only queries that have judgements are evaluated, as BEIR does.
  keep = [i for i, q in enumerate(query_ids) if q in qrels]
  return BeirData(os.path.basename(os.path.normpath(folder)), doc_ids, doc_texts,
                  [query_ids[i] for i in keep], [query_texts[i] for i in keep], qrels, warnings)
