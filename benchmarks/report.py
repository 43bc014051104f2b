"""What every benchmark does with its results: write them as JSON where --json says."""

from __future__ import annotations

import json
from typing import Any, Optional


def write_json(path: Optional[str], value: Any, quiet: bool = False) -> None:
  """Writes `value` as indented JSON to `path` and says so; nothing when path is empty."""
  if not path:
    return
  with open(path, "w") as f:
    json.dump(value, f, indent=2)
  if not quiet:
    what = f"{len(value)} rows" if isinstance(value, list) else "the results"
    print(f"Wrote {what} to {path}")
