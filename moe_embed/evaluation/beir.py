"""Reading and validating BEIR-format folders.

A folder holds:
  corpus.jsonl      one JSON object a line: "_id", "text", optional "title"
  queries.jsonl     one JSON object a line: "_id", "text"
  qrels/<split>.tsv a header line, then "query-id<TAB>corpus-id<TAB>score"

Conventions follow BEIR's loader and exact-search encoder: a document's text is
`(title + " " + text).strip()` (so an empty or missing title leaves the stripped
text), queries are used as written, and only queries named in the qrels are
evaluated. Where BEIR would crash or silently misbehave we check instead:

- a missing file or folder, a line that is not a JSON object, a missing or
  non-string field, or a qrels line that does not have three tab-separated
  fields with an integer score raises an error naming the file and line;
- qrels lines naming a query or document that is not in queries.jsonl or
  corpus.jsonl are counted, reported as a warning and ignored;
- empty texts, repeated ids (the last line wins, as in BEIR's dicts) and
  repeated qrels pairs are counted and reported;
- a first qrels line whose score is an integer is read as data, not as a header.

Everything is read and checked before any text is encoded, so bad input fails
in seconds rather than after hours of encoding.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Iterator, Optional, Sequence

from absl import logging
from etils import epath


@dataclasses.dataclass
class BeirData:
  """One BEIR folder, ready to encode and score."""
  name: str  # Folder name: the key of its results.
  doc_ids: list[str]
  doc_texts: list[str]  # (title + " " + text).strip(), in corpus order.
  query_ids: list[str]  # Queries to encode: those with at least one relevant document.
  query_texts: list[str]
  qrels: dict[str, dict[str, int]]  # Judged queries (known ids only) -> doc id -> grade.
  warnings: list[str]  # Human-readable problems found while loading.
  counts: dict[str, int]  # empty_docs, empty_queries, unknown_qrels, ... (for reports).


class BeirFormatError(ValueError):
  """A BEIR file is malformed; the message names the file and line."""


def _iter_jsonl(path: str) -> Iterator[tuple[int, dict]]:
  if not epath.Path(path).is_file():
    raise FileNotFoundError(f"BEIR file {path} is missing.")
  with epath.Path(path).open("r", encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise BeirFormatError(f"{path}:{lineno}: invalid JSON ({e.msg} at column "
                              f"{e.colno}).") from None
      if not isinstance(row, dict):
        raise BeirFormatError(f"{path}:{lineno}: expected a JSON object, got "
                              f"{type(row).__name__}.")
      yield lineno, row


def _field(row: dict, key: str, path: str, lineno: int, *, optional: bool = False) -> str:
  """A string field; ids may be integers (converted), titles may be null or absent."""
  value = row.get(key)
  if value is None:
    if optional:
      return ""
    raise BeirFormatError(f"{path}:{lineno}: missing field {key!r} (fields: {sorted(row)}).")
  if key == "_id" and isinstance(value, int) and not isinstance(value, bool):
    return str(value)
  if not isinstance(value, str):
    raise BeirFormatError(f"{path}:{lineno}: field {key!r} must be a string, got "
                          f"{type(value).__name__}.")
  return value


def read_corpus(path: str) -> tuple[dict[str, str], int]:
  """({doc id: BEIR-joined text}, number of repeated ids) in file order."""
  corpus: dict[str, str] = {}
  repeated = 0
  for lineno, row in _iter_jsonl(path):
    doc_id = _field(row, "_id", path, lineno)
    title = _field(row, "title", path, lineno, optional=True)
    text = _field(row, "text", path, lineno)
    repeated += doc_id in corpus
    corpus[doc_id] = (title + " " + text).strip()
  return corpus, repeated


def read_queries(path: str) -> tuple[dict[str, str], int]:
  """({query id: text}, number of repeated ids) in file order."""
  queries: dict[str, str] = {}
  repeated = 0
  for lineno, row in _iter_jsonl(path):
    query_id = _field(row, "_id", path, lineno)
    repeated += query_id in queries
    queries[query_id] = _field(row, "text", path, lineno)
  return queries, repeated


def read_qrels(path: str) -> tuple[list[tuple[int, str, str, int]], bool]:
  """([(line number, query id, doc id, grade)], whether a header line was skipped)."""
  if not epath.Path(path).is_file():
    raise FileNotFoundError(f"BEIR file {path} is missing.")
  rows, header = [], False
  with epath.Path(path).open("r", encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      line = line.rstrip("\r\n")
      if not line.strip():
        continue
      parts = line.split("\t")
      score = parts[2].strip() if len(parts) == 3 else None
      if score is not None and _is_int(score):
        rows.append((lineno, parts[0].strip(), parts[1].strip(), int(score)))
      elif lineno == 1:
        header = True
      else:
        raise BeirFormatError(
            f"{path}:{lineno}: expected 'query-id<TAB>corpus-id<TAB>integer score', got "
            f"{line[:80]!r} ({len(parts)} tab-separated fields).")
  return rows, header


def _is_int(s: str) -> bool:
  try:
    int(s)
  except ValueError:
    return False
  return True


def is_beir_folder(folder: str) -> bool:
  return epath.Path(os.path.join(folder, "corpus.jsonl")).is_file()


def expand_folders(folders: Sequence[str]) -> list[tuple[str, str]]:
  """[(result name, folder)]: a BEIR folder as itself; a folder without corpus.jsonl
  whose subfolders are BEIR folders (MIRACL-style, one per language) as each
  subfolder, named "<folder>/<subfolder>" (sorted), so results get per-language
  rows and a "<folder>/average" row."""
  out = []
  for folder in folders:
    base = os.path.basename(os.path.normpath(folder))
    if epath.Path(folder).is_dir() and not is_beir_folder(folder):
      subs = sorted(d.name for d in epath.Path(folder).iterdir() if is_beir_folder(os.fspath(d)))
      if subs:
        out.extend((f"{base}/{d}", os.path.join(folder, d)) for d in subs)
        continue
    out.append((base, folder))
  return out


def load_beir(folder: str, split: str = "test", name: Optional[str] = None) -> BeirData:
  """Reads and checks one BEIR folder; see the module docstring for the rules.

  `name` keys its results (default: the folder's base name).
  """
  if not epath.Path(folder).is_dir():
    raise FileNotFoundError(f"BEIR folder {folder} does not exist.")
  name = name or os.path.basename(os.path.normpath(folder))
  qrels_path = os.path.join(folder, "qrels", f"{split}.tsv")
  for path in (os.path.join(folder, "corpus.jsonl"), os.path.join(folder, "queries.jsonl"),
               qrels_path):
    if not epath.Path(path).is_file():
      raise FileNotFoundError(f"BEIR file {path} is missing.")
  corpus, repeated_docs = read_corpus(os.path.join(folder, "corpus.jsonl"))
  queries, repeated_queries = read_queries(os.path.join(folder, "queries.jsonl"))
  rows, _ = read_qrels(qrels_path)

  qrels: dict[str, dict[str, int]] = {}
  unknown_query = unknown_doc = repeated_pairs = 0
  examples = []
  for lineno, qid, did, grade in rows:
    if qid not in queries or did not in corpus:
      if qid not in queries:
        unknown_query += 1
      else:
        unknown_doc += 1
      if len(examples) < 3:
        examples.append(f"line {lineno}: {qid!r} -> {did!r}")
      continue
    judged = qrels.setdefault(qid, {})
    repeated_pairs += did in judged
    judged[did] = grade

  query_ids = [q for q in queries if any(g > 0 for g in qrels.get(q, {}).values())]
  counts = {
      "empty_docs": sum(1 for t in corpus.values() if not t.strip()),
      "empty_queries": sum(1 for q in query_ids if not queries[q].strip()),
      "repeated_doc_ids": repeated_docs,
      "repeated_query_ids": repeated_queries,
      "repeated_qrels_pairs": repeated_pairs,
      "unknown_qrels_queries": unknown_query,
      "unknown_qrels_docs": unknown_doc,
      "queries_without_relevant": sum(1 for j in qrels.values()
                                      if not any(g > 0 for g in j.values())),
      "unjudged_queries": len(queries) - len(qrels),
  }
  warnings = []
  if unknown_query or unknown_doc:
    warnings.append(
        f"{unknown_query + unknown_doc} qrels lines name unknown query or document ids "
        f"({unknown_query} queries missing from queries.jsonl, {unknown_doc} documents missing "
        f"from corpus.jsonl; e.g. {qrels_path} {'; '.join(examples)}); they are ignored")
  for key, what in (("empty_docs", "documents have empty text"),
                    ("empty_queries", "evaluated queries have empty text"),
                    ("repeated_doc_ids", "corpus lines repeat an earlier _id (the last wins)"),
                    ("repeated_query_ids", "query lines repeat an earlier _id (the last wins)"),
                    ("repeated_qrels_pairs", "qrels lines repeat a (query, doc) pair (the last "
                                             "wins)"),
                    ("queries_without_relevant", "judged queries have no relevant document "
                                                 "(grade > 0) and are skipped")):
    if counts[key]:
      warnings.append(f"{counts[key]} {what}")
  if not query_ids:
    warnings.append(f"no query has a relevant document in {qrels_path}: nothing to evaluate")
  if not corpus:
    warnings.append(f"{os.path.join(folder, 'corpus.jsonl')} holds no documents")
  for w in warnings:
    logging.warning("BEIR folder %s: %s.", folder, w)
  return BeirData(name=name, doc_ids=list(corpus), doc_texts=list(corpus.values()),
                  query_ids=query_ids, query_texts=[queries[q] for q in query_ids],
                  qrels=qrels, warnings=warnings, counts=counts)
