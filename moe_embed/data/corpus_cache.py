"""The embedded default data: the stdlib pair corpus, built on first use and cached.

`ensure_default_data` builds it (`corpus_stdlib` pairs, prepared with a trained
SentencePiece tokenizer and a held-out BEIR split) into `default_cache_dir()`
(`$MOE_EMBED_CACHE/stdlib_pairs`, else `~/.cache/moe_embed/stdlib_pairs`) and
rebuilds a cache of an older dataset format.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Optional

from absl import logging
from etils import epath

from moe_embed.data import corpus_stdlib, dataset
from moe_embed.data.preparation import prepare

DEFAULT_VOCAB = 4096  # SentencePiece vocabulary trained for the embedded corpus.


def default_cache_dir() -> str:
  root = os.environ.get("MOE_EMBED_CACHE") or os.path.join(
      os.path.expanduser("~"), ".cache", "moe_embed")
  return os.path.join(root, "stdlib_pairs")


def ensure_default_data(cache_dir: Optional[str] = None) -> str:
  """The embedded stdlib pair dataset, built (about 10 s) and cached on first use.

  The cache is a local folder: built beside it and renamed into place, atomically.
  """
  out = cache_dir or default_cache_dir()
  if _is_current(out):
    return out
  logging.info("Building the embedded stdlib pair corpus in %s (first use only).", out)
  parent = epath.Path(os.path.abspath(out)).parent
  parent.mkdir(parents=True, exist_ok=True)
  work = epath.Path(tempfile.mkdtemp(dir=parent, prefix=".build-"))
  try:
    counts = corpus_stdlib.build_pairs(os.fspath(work))
    prepare(os.fspath(work / "train.jsonl"), os.fspath(work / "data"),
            train_tokenizer_vocab=DEFAULT_VOCAB)
    (work / "heldout").rename(work / "data" / "heldout")
    (work / "data" / "corpus_counts.json").write_text(json.dumps(counts, indent=2))
    if epath.Path(out).exists() and not _is_current(out):
      # A cache of an older dataset format: move it aside, then replace it.
      try:
        epath.Path(out).replace(work / "stale")
      except OSError:
        pass
    try:
      (work / "data").replace(out)  # Atomic: a racing process may win.
    except OSError:
      if not _is_current(out):
        raise
    logging.info("Embedded corpus: %s", counts)
  finally:
    work.rmtree(missing_ok=True)
  return out


def _is_current(data_dir: str) -> bool:
  try:
    info = json.loads((epath.Path(data_dir) / dataset.INFO).read_text())
    return info.get("format") == dataset.FORMAT
  except (OSError, ValueError):
    return False
