"""Reading contrastive JSONL records: {"query", "document", "negatives"?, "source"?}.

Malformed lines are skipped, counted and their first line numbers kept for the
report; reading never stops midway on bad input. `parse_line` is the one check
of a line, shared by the in-process reader here and the Beam pipeline
(`beam_prepare`). Paths go through `etils.epath`, so inputs may be `gs://`.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import itertools
import json
import math
import os
import zlib
from typing import Iterator, Optional, Sequence

from etils import epath
from moe_embed import storage

DEFAULT_SOURCE = "default"
MAX_REPORTED = 5
_WILDCARDS = "*?["


@dataclasses.dataclass
class ReadReport:
  """What reading found: counts and where the bad lines are."""

  read: int = 0
  malformed: int = 0
  duplicates: int = 0
  examples: list[str] = dataclasses.field(default_factory=list)  # "file:line: why"
  skipped_files: list[str] = dataclasses.field(default_factory=list)  # Not JSONL, in a folder.

  def bad(self, where: str, why: str) -> None:
    self.malformed += 1
    if len(self.examples) < MAX_REPORTED:
      self.examples.append(f"{where}: {why}")

  def none_valid(self) -> ValueError:
    """The error when no line was a valid record, with the first reasons why."""
    reasons = "; ".join(self.examples[:3])
    return ValueError("No valid records to write: every input line was malformed or empty"
                      + (f" (first: {reasons})." if reasons else "."))


def _glob(pattern: str) -> list[str]:
  """Files matching a glob whose wildcards may sit in any part (gs://b/*/x-*.jsonl.gz)."""
  if "**" in pattern:
    raise ValueError(f"Input {pattern}: '**' is not supported in globs; give the folder to "
                     "read all .jsonl and .jsonl.gz files under it, or one '*' per level.")
  parts = pattern.split("/")
  first = next(i for i, part in enumerate(parts) if any(c in part for c in _WILDCARDS))
  base = "/".join(parts[:first]) or ("/" if pattern.startswith("/") else ".")
  return sorted(os.fspath(p) for p in epath.Path(base).glob("/".join(parts[first:])))


def expand_inputs(inputs: str | Sequence[str],
                  skipped: Optional[list[str]] = None) -> list[str]:
  """Files from a comma-separated list of files, globs and folders (*.jsonl, *.jsonl.gz).

  The other files found in a folder are appended to `skipped`.
  """
  items = inputs.split(",") if isinstance(inputs, str) else list(inputs)
  files = []
  for item in filter(None, items):
    path = epath.Path(item)
    if any(c in item for c in _WILDCARDS):
      found = _glob(item)
      if not found:
        raise FileNotFoundError(f"No files match {item}.")
      files += found
    elif path.is_dir():
      every = [os.fspath(f) for f in storage.walk_files(path)]
      found = [f for f in every if f.endswith((".jsonl", ".jsonl.gz"))]
      if skipped is not None:
        skipped += [f for f in every if f not in found]
      if not found:
        raise FileNotFoundError(f"No .jsonl or .jsonl.gz files under {item}.")
      files += found
    elif path.exists():
      files.append(item)
    else:
      raise FileNotFoundError(f"Input {item} does not exist.")
  if not files:
    raise FileNotFoundError(f"No input files in {inputs!r}.")
  return files


def validate(record: object) -> tuple[dict | None, str]:
  """A clean record, or (None, reason)."""
  if not isinstance(record, dict):
    return None, "not a JSON object"
  for key in ("query", "document"):
    value = record.get(key)
    if not isinstance(value, str) or not value.strip():
      return None, f"missing or empty {key!r}"
  negatives = record.get("negatives", [])
  if negatives is None:
    negatives = []
  if not isinstance(negatives, list) or not all(isinstance(n, str) for n in negatives):
    return None, "'negatives' must be a list of strings"
  source = record.get("source", DEFAULT_SOURCE)
  if not isinstance(source, str) or not source:
    return None, "'source' must be a non-empty string"
  return {"query": record["query"], "document": record["document"],
          "negatives": [n for n in negatives if n.strip()], "source": source}, ""


def parse_line(raw_line: bytes) -> tuple[dict | None, str]:
  """A clean record, or (None, why it is malformed); (None, "") for a blank line."""
  try:
    line = raw_line.decode("utf-8")
  except UnicodeDecodeError as e:
    return None, f"not valid UTF-8 (byte {e.start})"
  if not line.strip():
    return None, ""
  try:
    raw = json.loads(line)
  except json.JSONDecodeError as e:
    return None, f"invalid JSON ({e.msg})"
  return validate(raw)


def pair_key(record: dict) -> bytes:
  """SHA-1 of query + NUL + document: the identity under which duplicates are dropped."""
  return hashlib.sha1((record["query"] + "\x00" + record["document"]).encode()).digest()


def read_lines(path: str) -> Iterator[bytes]:
  """Raw lines of a .jsonl or .jsonl.gz file; a damaged gzip stream is an error naming the file."""
  try:
    with epath.Path(path).open("rb") as f:
      if path.endswith(".gz"):
        with gzip.GzipFile(fileobj=f) as unzipped:
          yield from unzipped
      else:
        yield from f
  except (EOFError, gzip.BadGzipFile, zlib.error) as e:
    raise ValueError(f"{path} is truncated or not a valid gzip file ({e}); "
                     "re-create or re-download it.") from None


def read_records(files: Sequence[str], report: ReadReport) -> Iterator[dict]:
  """Yields valid records from JSONL / JSONL.gz files; counts bad ones in `report`.

  A line that is not valid UTF-8 is malformed like any other bad line.
  """
  for path in files:
    for lineno, raw_line in enumerate(read_lines(path), 1):
      record, why = parse_line(raw_line)
      if record is None:
        if why:
          report.bad(f"{path}:{lineno}", why)
        continue
      report.read += 1
      yield record


def sample_records(files: Sequence[str], limit: int) -> Iterator[dict]:
  """About `limit` valid records, an equal share from the start of each file.

  For what must stay small on one host however large the corpus is (training
  a tokenizer before a distributed preparation).
  """
  share = max(1, math.ceil(limit / len(files)))
  for path in files:
    yield from itertools.islice(read_records([path], ReadReport()), share)
