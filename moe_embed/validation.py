"""Checks that several packages apply where a value enters: field names and Matryoshka widths.

Each is one function, so every config section, flag and API argument words the
same problem the same way: an unknown field names the nearest known one, and a
Matryoshka width names the embedding width it must fit.
"""

from __future__ import annotations

import difflib
from typing import Iterable, Optional


def nearest(name: str, known: Iterable[str]) -> Optional[str]:
  """The known name closest to `name` (difflib's ratio), however far; None if none is known."""
  close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.0)
  return close[0] if close else None


def check_fields(given: Iterable[str], known: Iterable[str], what: str,
                 error: type[Exception] = KeyError) -> None:
  """Raises `error` for the first name of `given` that is not in `known`:
  "Unknown <what> 'x'. Did you mean 'y'?", y the nearest known name."""
  known = list(known)
  for key in given:
    if key not in known:
      guess = nearest(key, known)
      hint = f" Did you mean {guess!r}?" if guess is not None else ""
      raise error(f"Unknown {what} {key!r}.{hint}")


def check_widths(widths: Iterable[Optional[int]], embedding_dim: int, name: str = "dim") -> None:
  """Every Matryoshka width (None: the full width) is an integer in [1, embedding_dim].

  Called where a width enters (a config, a flag, an API argument); the
  functions that then cut embeddings (model.pooling.matryoshka,
  evaluation.evaluator.normalize) do not check again.
  """
  for width in widths:
    if width is None:
      continue
    if isinstance(width, bool) or int(width) != width or not 0 < width <= embedding_dim:
      raise ValueError(f"Matryoshka width {name}={width} must be between 1 and the embedding "
                       f"width {embedding_dim}.")
