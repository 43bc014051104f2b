"""Reading contrastive JSONL records: {"query", "document", "negatives"?, "source"?}.

Malformed lines are skipped, counted and their first line numbers kept for the
report; reading never stops midway on bad input.
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import json
import os
import zlib
from typing import Iterator, Sequence

DEFAULT_SOURCE = "default"
MAX_REPORTED = 5


@dataclasses.dataclass
class ReadReport:
  """What reading found: counts and where the bad lines are."""

  read: int = 0
  malformed: int = 0
  duplicates: int = 0
  examples: list[str] = dataclasses.field(default_factory=list)  # "file:line: why"

  def bad(self, where: str, why: str) -> None:
    self.malformed += 1
    if len(self.examples) < MAX_REPORTED:
      self.examples.append(f"{where}: {why}")


def expand_inputs(inputs: str | Sequence[str]) -> list[str]:
  """Files from a comma-separated list of files, globs and folders (*.jsonl, *.jsonl.gz)."""
  items = inputs.split(",") if isinstance(inputs, str) else list(inputs)
  files = []
  for item in filter(None, items):
    if os.path.isdir(item):
      found = sorted(glob.glob(os.path.join(item, "**", "*.jsonl"), recursive=True)
                     + glob.glob(os.path.join(item, "**", "*.jsonl.gz"), recursive=True))
      if not found:
        raise FileNotFoundError(f"No .jsonl or .jsonl.gz files under {item}.")
      files += found
    elif any(c in item for c in "*?["):
      found = sorted(glob.glob(item))
      if not found:
        raise FileNotFoundError(f"No files match {item}.")
      files += found
    elif os.path.exists(item):
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


def _lines(path: str) -> Iterator[bytes]:
  """Raw lines of a .jsonl or .jsonl.gz file; a damaged gzip stream is an error naming the file."""
  opener = gzip.open if path.endswith(".gz") else open
  try:
    with opener(path, "rb") as f:
      yield from f
  except (EOFError, gzip.BadGzipFile, zlib.error) as e:
    raise ValueError(f"{path} is truncated or not a valid gzip file ({e}); "
                     "re-create or re-download it.") from None


def read_records(files: Sequence[str], report: ReadReport) -> Iterator[dict]:
  """Yields valid records from JSONL / JSONL.gz files; counts bad ones in `report`.

  A line that is not valid UTF-8 is malformed like any other bad line.
  """
  for path in files:
    for lineno, raw_line in enumerate(_lines(path), 1):
      try:
        line = raw_line.decode("utf-8")
      except UnicodeDecodeError as e:
        report.bad(f"{path}:{lineno}", f"not valid UTF-8 (byte {e.start})")
        continue
      if not line.strip():
        continue
      try:
        raw = json.loads(line)
      except json.JSONDecodeError as e:
        report.bad(f"{path}:{lineno}", f"invalid JSON ({e.msg})")
        continue
      record, why = validate(raw)
      if record is None:
        report.bad(f"{path}:{lineno}", why)
        continue
      report.read += 1
      yield record
