"""Batches of tokenised pairs: one source per global batch, resumable, multi-host.

Global batch `s` is a pure function of (seed, s, per-source cursors): its source
is drawn by a generator seeded with (seed, s), its examples are the next
`global_batch_size` entries of that source's stream (a fresh permutation each
epoch, seeded by (seed, source, epoch)). The iterator state is therefore tiny
and independent of the number of processes: {"step", "cursors"}. Each process
reads and tokenises only its own rows [i*B/P, (i+1)*B/P) of every global batch.

A batch (numpy, per process; b = B / P):
  query_ids int32 [b, Lq], query_mask bool [b, Lq], doc_ids int32 [b, Ld],
  doc_mask bool [b, Ld], and with hard negatives neg_ids int32 [b, N, Ld],
  neg_mask bool [b, N, Ld]. With N > 0 only examples that have negatives are
  used; an example with fewer than N repeats its list (hardest first).

Texts are tokenised here rather than stored as ids: on the stdlib data at batch
256, length 128, reading takes 10-15 ms and tokenising 7-11 ms per batch on a
shared 2-core CPU (benchmarks/data_loader.py), about 50 batches/s in all, far
above what a train step consumes; and prefixes and lengths stay training options.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import queue
import threading
from typing import Any, Mapping, Optional

from absl import logging
import numpy as np

from moe_embed.data import dataset


@dataclasses.dataclass(frozen=True)
class InputConfig:
  """What a batch holds: lengths, hard negatives, prefixes, source mix (`config.input`)."""

  max_query_len: int = 128  # Query tokens, including special tokens.
  max_doc_len: int = 128  # Document tokens, including special tokens.
  num_negatives: int = 0  # Hard negatives per query.
  query_prefix: str = ""
  doc_prefix: str = ""
  source_weights: Optional[Mapping[str, float]] = None  # None = proportional to size.
  # False: data without any hard negatives trains with in-batch negatives only
  # (logged) instead of failing.
  negatives_required: bool = True

  @classmethod
  def from_mapping(cls, fields: Mapping[str, Any]) -> "InputConfig":
    """From `config.input`; an unknown field is named, with the closest known one."""
    names = [f.name for f in dataclasses.fields(cls)]
    for key in fields:
      if key not in names:
        close = difflib.get_close_matches(key, names, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise KeyError(f"Unknown input field {key!r}.{hint}")
    return cls(**dict(fields))


def _source_seed(source: str) -> int:
  return int.from_bytes(hashlib.sha1(source.encode()).digest()[:4], "little")


class TrainIterator:
  """Infinite iterator of per-process batches with get_state / set_state."""

  def __init__(self, data_dir: str, *, inputs: InputConfig, tokenizer, global_batch_size: int,
               seed: int = 0, process_index: int = 0, process_count: int = 1,
               state: Optional[dict] = None, prefetch: int = 2):
    info = dataset.read_info(data_dir)
    if global_batch_size % process_count:
      raise ValueError(f"global_batch_size={global_batch_size} is not divisible by "
                       f"{process_count} processes.")
    num_negatives, source_weights = inputs.num_negatives, inputs.source_weights
    splits = dataset.open_splits(data_dir)
    readers = {name: dataset.SourceReader(data_dir, entry, splits)
               for name, entry in info["sources"].items()}
    if (num_negatives and not inputs.negatives_required
        and not any(np.any(r.num_negatives > 0) for r in readers.values())):
      logging.warning("input.num_negatives=%d, but %s has no hard negatives: training with "
                      "in-batch negatives only.", num_negatives, data_dir)
      num_negatives = 0
    self.tokenizer = tokenizer
    self.batch_size = global_batch_size
    self.local_batch = global_batch_size // process_count
    self.process_index = process_index
    self.max_query_len, self.max_doc_len = inputs.max_query_len, inputs.max_doc_len
    self.num_negatives = num_negatives
    self.query_prefix, self.doc_prefix = inputs.query_prefix, inputs.doc_prefix
    self.seed = seed
    self.readers, self.eligible = {}, {}
    for name, reader in readers.items():
      eligible = (np.arange(len(reader)) if not num_negatives
                  else np.flatnonzero(reader.num_negatives > 0))
      if len(eligible) < global_batch_size:
        what = "examples" if not num_negatives else "examples with hard negatives"
        if source_weights and source_weights.get(name, 0) == 0:
          continue
        if not num_negatives or len(eligible):
          raise ValueError(
              f"Source {name!r} of {data_dir} has {len(eligible)} {what}, fewer than "
              f"batch_size={global_batch_size}; lower the batch size or give the source "
              "weight 0 in input.source_weights.")
        continue  # A source without negatives is left out of a hard-negative run.
      self.readers[name], self.eligible[name] = reader, eligible
    if not self.readers:
      raise ValueError(f"No source of {data_dir} can fill a batch of {global_batch_size}"
                       + (" with hard negatives" if num_negatives else "") + ".")
    self.sources = sorted(self.readers)
    if source_weights:
      unknown = set(source_weights) - set(info["sources"])
      if unknown:
        raise ValueError(f"input.source_weights names unknown sources {sorted(unknown)}; "
                         f"the dataset has {sorted(info['sources'])}.")
      weights = np.array([float(source_weights.get(s, 0.0)) for s in self.sources])
    else:
      weights = np.array([len(self.eligible[s]) for s in self.sources], np.float64)
    if weights.sum() <= 0:
      raise ValueError("input.source_weights gives every usable source weight 0.")
    self.weights = weights / weights.sum()
    self._perm_cache: dict[tuple[str, int], np.ndarray] = {}
    self._state = {"step": 0, "cursors": {s: 0 for s in self.sources}}
    self._prefetch = prefetch
    self._queue: Optional[queue.Queue] = None
    if state is not None:
      self.set_state(state)

  # -- State ---------------------------------------------------------------
  def get_state(self) -> dict:
    """The position after the last batch returned (JSON-serialisable)."""
    return copy.deepcopy(self._state)

  def set_state(self, state: Mapping[str, Any]) -> None:
    cursors = {s: int(state.get("cursors", {}).get(s, 0)) for s in self.sources}
    self._state = {"step": int(state["step"]), "cursors": cursors}
    self._stop_prefetch()

  # -- Batches -------------------------------------------------------------
  def source_of_step(self, step: int) -> str:
    rng = np.random.default_rng([self.seed, step])
    return self.sources[int(rng.choice(len(self.sources), p=self.weights))]

  def _stream(self, source: str, positions: np.ndarray) -> np.ndarray:
    eligible = self.eligible[source]
    n = len(eligible)
    out = np.empty(len(positions), np.int64)
    epochs = positions // n
    for epoch in np.unique(epochs):
      key = (source, int(epoch))
      if key not in self._perm_cache:
        if len(self._perm_cache) > 64:
          self._perm_cache.clear()
        rng = np.random.default_rng([self.seed, _source_seed(source), int(epoch)])
        self._perm_cache[key] = rng.permutation(n)
      sel = epochs == epoch
      out[sel] = eligible[self._perm_cache[key][positions[sel] % n]]
    return out

  def batch_at(self, state: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], dict]:
    """(this process's batch for `state`, the state after it)."""
    source, records = self.records_at(state)
    batch = self.tokenize(records)
    cursors = dict(state["cursors"])
    cursors[source] += self.batch_size
    return batch, {"step": state["step"] + 1, "cursors": cursors}

  def records_at(self, state: Mapping[str, Any]) -> tuple[str, list[dict]]:
    """(source, this process's untokenised records) of the batch at `state`."""
    source = self.source_of_step(state["step"])
    start = state["cursors"][source] + self.process_index * self.local_batch
    positions = np.arange(start, start + self.local_batch)
    return source, self.readers[source].read(list(self._stream(source, positions)))

  def tokenize(self, records: list[dict]) -> dict[str, np.ndarray]:
    tok = self.tokenizer
    q, _ = tok.encode([self.query_prefix + r["query"] for r in records], self.max_query_len)
    d, _ = tok.encode([self.doc_prefix + r["document"] for r in records], self.max_doc_len)
    batch = {}
    batch["query_ids"], batch["query_mask"] = tok.pad(q, self.max_query_len)
    batch["doc_ids"], batch["doc_mask"] = tok.pad(d, self.max_doc_len)
    if self.num_negatives:
      texts = []
      for r in records:
        negs = r["negatives"]
        texts += [self.doc_prefix + negs[i % len(negs)] for i in range(self.num_negatives)]
      n, _ = tok.encode(texts, self.max_doc_len)
      ids, mask = tok.pad(n, self.max_doc_len)
      shape = (len(records), self.num_negatives, self.max_doc_len)
      batch["neg_ids"], batch["neg_mask"] = ids.reshape(shape), mask.reshape(shape)
    return batch

  # -- Iteration with background prefetch -----------------------------------
  def _producer(self, state: dict, out: queue.Queue, stop: threading.Event) -> None:
    try:
      while not stop.is_set():
        batch, state = self.batch_at(state)
        while not stop.is_set():
          try:
            out.put((batch, state), timeout=0.1)
            break
          except queue.Full:
            continue
    except Exception as e:  # pylint: disable=broad-except  (re-raised in the consumer)
      out.put((e, None))

  def _stop_prefetch(self) -> None:
    if self._queue is not None:
      self._stop.set()
      self._thread.join()
      self._queue = None

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if not self._prefetch:
      batch, self._state = self.batch_at(self._state)
      return batch
    if self._queue is None:
      self._queue = queue.Queue(maxsize=self._prefetch)
      self._stop = threading.Event()
      self._thread = threading.Thread(
          target=self._producer, args=(self.get_state(), self._queue, self._stop), daemon=True)
      self._thread.start()
    batch, state = self._queue.get()
    if isinstance(batch, Exception):
      raise batch
    self._state = state
    return batch

  def close(self) -> None:
    self._stop_prefetch()


def make_train_iterator(data_dir: str, **kwargs) -> TrainIterator:
  """See TrainIterator; kwargs: inputs, tokenizer, global_batch_size, seed, ..."""
  return TrainIterator(data_dir, **kwargs)
