"""The embedded default corpus: pairs mined from the Python standard library's source.

Every machine with Python has the standard library's source, so this real,
English, technical pair corpus can be built offline anywhere. Two kinds of pair:
- text: for each documented function, method, class and module, the
  docstring's first paragraph (or first sentence) is the query and the rest of
  the docstring the document (sources 'functions', 'methods', 'classes', 'modules');
- code: the same summary as query and the function's code, docstring removed,
  as document (source 'code'), as in code-search corpora.
Pairs are
deduplicated and split deterministically (by a hash of the query) into a
training set and a held-out BEIR folder whose corpus also holds distractor
documents.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import json
import os
import sysconfig
import warnings
from typing import Iterator

SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}


def _split_docstring(doc: str) -> tuple[str, str] | None:
  """(summary, rest): the first paragraph, else the first sentence, and what follows."""
  doc = inspect.cleandoc(doc)
  head, sep, rest = doc.partition("\n\n")
  if not sep:
    flat = " ".join(doc.split())
    head, sep, rest = flat.partition(". ")
    head += "."
  query = " ".join(head.split())
  document = rest.strip()
  if not sep or len(query) < 15 or len(query) > 300 or len(document) < 40:
    return None
  if query.lower().startswith(("deprecated", "todo", "xxx")):
    return None
  return query, document[:2000]


def iter_stdlib_pairs(stdlib_dir: str | None = None) -> Iterator[dict]:
  """Yields {'query', 'document', 'source', 'name'} in a deterministic order."""
  root = stdlib_dir or sysconfig.get_paths()["stdlib"]
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
    for filename in sorted(filenames):
      if not filename.endswith(".py"):
        continue
      path = os.path.join(dirpath, filename)
      module = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
      try:
        with open(path, encoding="utf-8") as f, warnings.catch_warnings():
          warnings.simplefilter("ignore")  # Invalid escapes in old stdlib strings.
          tree = ast.parse(f.read())
      except (SyntaxError, UnicodeDecodeError, ValueError):
        continue
      yield from _pairs_of(tree, module)


def _pairs_of(tree: ast.Module, module: str) -> Iterator[dict]:
  doc = ast.get_docstring(tree, clean=False)
  split = doc and _split_docstring(doc)
  if split:
    yield {"query": split[0], "document": split[1], "source": "modules", "name": module}
  stack = [(node, module, False) for node in tree.body]
  while stack:
    node, prefix, in_class = stack.pop(0)
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
      name = f"{prefix}.{node.name}"
      doc = ast.get_docstring(node, clean=False)
      split = doc and _split_docstring(doc)
      if split:
        kind = "classes" if isinstance(node, ast.ClassDef) else (
            "methods" if in_class else "functions")
        yield {"query": split[0], "document": split[1], "source": kind, "name": name}
      if doc and not isinstance(node, ast.ClassDef):
        code = _code_pair(node, doc)
        if code:
          yield {**code, "source": "code", "name": name}
      if isinstance(node, ast.ClassDef):
        stack[:0] = [(child, name, True) for child in node.body]


def _code_pair(node: ast.AST, doc: str) -> dict | None:
  """(docstring summary, function code without the docstring), if both are substantial."""
  summary = " ".join(inspect.cleandoc(doc).partition("\n\n")[0].split())
  summary = summary.split(". ")[0].rstrip(".") + "."
  if not 15 <= len(summary) <= 300:
    return None
  stripped = ast.FunctionDef(
      name=node.name, args=node.args, body=node.body[1:] or [ast.Pass()], decorator_list=[],
      returns=node.returns, type_comment=None, type_params=[], lineno=0, col_offset=0)
  try:
    code = ast.unparse(stripped)
  except (AttributeError, TypeError, ValueError):
    return None
  if len(code) < 80 or len(node.body) < 2:
    return None
  return {"query": summary, "document": code[:1500]}


def _heldout(query: str, fraction: float) -> bool:
  digest = hashlib.sha256(query.encode()).digest()
  return int.from_bytes(digest[:4], "little") / 2**32 < fraction


def build_pairs(out_dir: str, heldout_fraction: float = 0.08,
                num_distractors: int = 3000) -> dict[str, int]:
  """Writes train.jsonl and a BEIR folder `heldout/` under out_dir; returns counts."""
  seen_queries, seen_docs = set(), set()
  train, heldout = [], []
  for pair in iter_stdlib_pairs():
    # Deduplicate on either side within a kind: inherited or copied docstrings repeat.
    kind = pair["source"] == "code"
    if (kind, pair["query"]) in seen_queries or (kind, pair["document"]) in seen_docs:
      continue
    seen_queries.add((kind, pair["query"]))
    seen_docs.add((kind, pair["document"]))
    # The split hashes the query, so a held-out query is held out in both kinds;
    # the held-out BEIR folder holds the text pairs.
    if not _heldout(pair["query"], heldout_fraction):
      train.append(pair)
    elif not kind:
      heldout.append(pair)
  os.makedirs(os.path.join(out_dir, "heldout", "qrels"), exist_ok=True)
  with open(os.path.join(out_dir, "train.jsonl"), "w") as f:
    for pair in train:
      f.write(json.dumps({"query": pair["query"], "document": pair["document"],
                          "source": pair["source"]}) + "\n")
  beir = os.path.join(out_dir, "heldout")
  # Distractors: documents of training pairs, spread evenly over the corpus.
  step = max(len(train) // max(num_distractors, 1), 1)
  text_train = [p for p in train if p["source"] != "code"]
  step = max(len(text_train) // max(num_distractors, 1), 1)
  distractors = text_train[::step][:num_distractors]
  with open(os.path.join(beir, "corpus.jsonl"), "w") as f:
    for i, pair in enumerate(heldout):
      f.write(json.dumps({"_id": f"d{i}", "title": "", "text": pair["document"]}) + "\n")
    for i, pair in enumerate(distractors):
      f.write(json.dumps({"_id": f"x{i}", "title": "", "text": pair["document"]}) + "\n")
  with open(os.path.join(beir, "queries.jsonl"), "w") as f:
    for i, pair in enumerate(heldout):
      f.write(json.dumps({"_id": f"q{i}", "text": pair["query"]}) + "\n")
  with open(os.path.join(beir, "qrels", "test.tsv"), "w") as f:
    f.write("query-id\tcorpus-id\tscore\n")
    for i in range(len(heldout)):
      f.write(f"q{i}\td{i}\t1\n")
  return {"train": len(train), "heldout_queries": len(heldout),
          "heldout_docs": len(heldout) + len(distractors)}
