"""BEIR folders the evaluation tests build: a writer, a one-pair folder, stdlib docstrings.

A folder holds corpus.jsonl ({"_id", "title"?, "text"}), queries.jsonl ({"_id",
"text"}) and qrels/test.tsv (a header, then query-id, corpus-id, score lines).
Paths may be gs:// (written through etils.epath).
"""

import ast
import importlib
import inspect
import json

from etils import epath

HEADER = "query-id\tcorpus-id\tscore\n"
# Standard-library modules whose documented functions and classes give docstring pairs.
MODULES = ("textwrap", "string", "shutil", "tempfile", "argparse", "csv", "difflib", "calendar",
           "statistics", "fractions", "heapq", "bisect", "functools", "json.decoder",
           "json.encoder", "pathlib", "random", "glob", "fnmatch", "gettext", "locale",
           "posixpath", "zipfile", "tarfile", "configparser", "logging", "subprocess", "inspect",
           "dataclasses", "enum", "ipaddress", "uuid", "base64", "http.cookiejar", "smtplib")


def write_beir(folder, corpus, queries, qrels, *, header=HEADER):
  """corpus / queries: dicts or raw lines; qrels: (query, doc, score) or raw 'q<TAB>d<TAB>s'."""
  base = epath.Path(folder)
  (base / "qrels").mkdir(parents=True, exist_ok=True)
  for name, rows in (("corpus.jsonl", corpus), ("queries.jsonl", queries)):
    (base / name).write_text("".join(
        (row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows),
        encoding="utf-8")
  (base / "qrels" / "test.tsv").write_text(header + "".join(
      (line if isinstance(line, str) else "\t".join(map(str, line))) + "\n" for line in qrels),
      encoding="utf-8")
  return str(folder)


def one_pair_beir(folder):
  """One query, one relevant document."""
  return write_beir(folder, [{"_id": "d1", "text": "x"}], [{"_id": "q1", "text": "y"}],
                    ["q1\td1\t1"])


def docstring_pairs():
  """(module, name, summary line, rest of the docstring) of documented functions."""
  seen_q, seen_d = set(), set()
  for module in MODULES:
    source = inspect.getsource(importlib.import_module(module))
    for node in ast.walk(ast.parse(source)):
      if not isinstance(node, (ast.FunctionDef, ast.ClassDef)):
        continue
      doc = ast.get_docstring(node)
      if not doc:
        continue
      summary, _, rest = inspect.cleandoc(doc).partition("\n")
      summary, rest = " ".join(summary.split()), " ".join(rest.split())
      if len(summary.split()) < 4 or len(rest.split()) < 12:
        continue
      if summary in seen_q or rest in seen_d:
        continue
      seen_q.add(summary)
      seen_d.add(rest)
      yield module, node.name, summary, rest[:300].strip()


def docstring_beir(folder, num_queries, num_docs):
  """Summary line (query{i}) -> the rest of its docstring (doc{i}; title: the module on odd i).

  The first `num_queries` documents are judged, the rest up to `num_docs` are distractors.
  """
  pairs = list(docstring_pairs())
  assert len(pairs) >= num_docs, len(pairs)
  corpus = [{"_id": f"doc{i}", "title": module if i % 2 else "", "text": rest}
            for i, (module, _, _, rest) in enumerate(pairs[:num_docs])]
  queries = [{"_id": f"query{i}", "text": summary}
             for i, (_, _, summary, _) in enumerate(pairs[:num_queries])]
  return write_beir(folder, corpus, queries, [(f"query{i}", f"doc{i}", 1)
                                              for i in range(num_queries)])
