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

With `input.packing` the same texts come packed instead (`moe_embed.data.packing`):
the global batch is cut into `pack_units` packing units (batch shards x
GradCache chunks, in batch order), this process packs its own u = pack_units / P
of them, each unit's q = b / u queries, documents and negatives into R rows of
pack_length tokens:
  packed_ids, packed_segment_ids, packed_positions int32 [u * R, pack_length],
  query_lengths int32 [u, q], doc_lengths int32 [u, q, 1 + N] (tokens each text
  kept; the positive first), packed_capped int32 [u] (texts capped to fit).
Before packing, the examples of each GradCache chunk are dealt out among that
chunk's local units so that each holds about as many tokens (input.pack_balance,
`packing.chunk_balanced_order`): unit order is no longer batch order, but every
example stays in its chunk. With input.pack_balance_steps = S > 1 the balancing
reaches across steps instead: a source's stream is cut into blocks of S batches
(the batch at cursor c is number (c / B) mod S of its block), and the block's
examples are dealt among its S x pack_units units, so one step's rows hold about
the mean even where a unit is the whole step. Every process reads and tokenises
the whole block (S global batches, once per S steps of that source) and keeps its
own share, so a global batch stays a pure function of its state, independent of
the number of processes, and each example of a block is used once in it. R is
sized once at start-up from the lengths of a sample of every source
(`packing.size_rows`, the same on every process), so shapes never change midway:
one R for all sources, or with input.pack_shapes = K > 1 one per source, in at
most K distinct counts (`packing.group_rows`; `row_shapes` lists them for the
trainer, which compiles each at start-up).

Prompts and lengths are per source (the reference pretrains with
`search_query: ` / `search_document: ` next to `classification: ` and
`clustering: ` sources): each of query_prefix, doc_prefix, max_query_len and
max_doc_len comes from `input.source_prefixes[source]`, else from the
dataset's `dataset_info.json` (`info["sources"][source]`), else from the global
`input` field. Lq and Ld are always the global input.max_query_len and
input.max_doc_len: a source's texts are truncated at its own length and padded
to the global one, so every batch has the same shape and the step compiles
once. A source length above the global one is an error in the config and is
capped (with a warning) when it comes from the dataset.

Texts are tokenised here rather than stored as ids: on the stdlib data at batch
256, length 128, reading takes 10-15 ms and tokenising 7-11 ms per batch on a
shared 2-core CPU (benchmarks/data_loader.py), about 50 batches/s in all, far
above what a train step consumes; and prefixes and lengths stay training options.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import os
import queue
import threading
from typing import Any, Mapping, Optional, Sequence

from absl import logging
import numpy as np

from moe_embed import validation
from moe_embed.data import dataset, packing

# The per-source settings: keys of input.source_prefixes[source] and of
# dataset_info.json's info["sources"][source].
SOURCE_FIELDS = dataset.SOURCE_OPTIONS  # Per-source prompts and lengths, checked there.
MIN_LEN = dataset.MIN_LEN
PACK_SAMPLE = 1024  # Examples per source whose lengths size the packed rows.


@dataclasses.dataclass(frozen=True)
class SourceInputs:
  """The prompts and token limits of one source's batches."""

  query_prefix: str
  doc_prefix: str
  max_query_len: int
  max_doc_len: int


@dataclasses.dataclass(frozen=True)
class InputConfig:
  """What a batch holds: lengths, hard negatives, prefixes, source mix (`config.input`).

  The defaults here are those of every run config (configs/common.py takes them).
  """

  # Query / document tokens, including special tokens: the width of every batch.
  max_query_len: int = 128
  max_doc_len: int = 128
  num_negatives: int = 0  # Hard negatives per query (from the dataset).
  # Prepended to every query / document of a source that sets no prefix of its own.
  query_prefix: str = "search_query: "
  doc_prefix: str = "search_document: "
  # Source name -> sampling weight; None = proportional to source size. Like
  # source_prefixes, a dict is set in a config file, not on the command line.
  source_weights: Optional[Mapping[str, float]] = None
  # False: data without any hard negatives trains with in-batch negatives only
  # (with a logged note) instead of failing.
  negatives_required: bool = True
  # Per-source prompts and lengths: source name -> any of query_prefix, doc_prefix,
  # max_query_len, max_doc_len, e.g. {"reviews": {"query_prefix": "classification: ",
  # "doc_prefix": "classification: "}}. Wins over the dataset's own per-source values
  # (prepare_data.py --source_prefixes), which win over the global fields above.
  # Lengths truncate that source's texts and may not exceed the global ones (batches
  # are padded to the global width, so shapes never change). None = none.
  source_prefixes: Optional[Mapping[str, Mapping[str, Any]]] = None
  # Pack each step's texts into rows of pack_length tokens (segment ids, positions
  # per text; attention, pooling and routing per text) instead of padding every text
  # to its width. Rows per step are sized from the data at start-up.
  packing: bool = False
  pack_length: int = 0  # Tokens per packed row; 0 = max(max_query_len, max_doc_len).
  # Even out the tokens of each GradCache chunk's units (one per device) before packing,
  # so fewer rows hold the heaviest unit (`packing.chunk_balanced_order`). Examples stay
  # in their chunk: the loss and router statistics are unchanged.
  pack_balance: bool = True
  # Deal the examples of this many consecutive batches of a source among those batches'
  # packing units by token count (`packing.balanced_order`), so every step's rows hold
  # about the mean (1 = each step keeps its own examples). Rows are sized for the
  # heaviest unit, so this raises the fill where one unit is a whole step's share: on
  # the embedded corpus at 128/128, 0.81 -> 0.85 at batch 64 and 0.74 -> 0.82 at 32.
  # Which examples share a step (in-batch negatives) changes; each is used once per
  # block. Every process reads and tokenises each whole block.
  pack_balance_steps: int = 1
  # Distinct row counts a packed step may have. Sources need different rows (on the
  # embedded corpus at 128/128 and batch 32, `code` 30 rows and `methods` 23), so with one
  # shape the light sources' steps run the heaviest one's rows. With more, sources are
  # grouped by need (the groups that waste the fewest rows per step by sampling
  # weight), each group sized for its heaviest source; the trainer compiles every
  # shape at start-up, so nothing compiles midway.
  pack_shapes: int = 1

  def __post_init__(self):
    width = max(self.max_query_len, self.max_doc_len)
    if self.pack_length and self.pack_length < width:
      raise ValueError(f"input.pack_length={self.pack_length} is shorter than the longest "
                       f"text width {width} (input.max_query_len / max_doc_len); a text "
                       "never spans two rows, so raise pack_length or set it to 0.")
    if not isinstance(self.pack_balance_steps, int) or self.pack_balance_steps < 1:
      raise ValueError(f"input.pack_balance_steps={self.pack_balance_steps!r} must be a whole "
                       "number of batches >= 1 (1 = each step packs its own examples).")
    if not isinstance(self.pack_shapes, int) or self.pack_shapes < 1:
      raise ValueError(f"input.pack_shapes={self.pack_shapes!r} must be a whole number of "
                       "row counts >= 1 (1 = one shape for every source).")
    if self.pack_balance_steps > 1 and not self.pack_balance:
      raise ValueError(f"input.pack_balance_steps={self.pack_balance_steps} deals examples "
                       "between steps, but input.pack_balance=False asks for no balancing; "
                       "set pack_balance_steps=1 or pack_balance=True.")
    for source, fields in (self.source_prefixes or {}).items():
      where = f"input.source_prefixes[{source!r}]"
      dataset.check_source_entry(where, fields)
      for field, value in fields.items():
        if field.startswith("max_") and value > getattr(self, field):
          raise ValueError(f"{where}.{field}={value} exceeds input.{field}="
                           f"{getattr(self, field)}, the padded batch width; raise "
                           f"input.{field} or lower the source's.")

  def check_sources(self, sources: Sequence[str], where: str) -> None:
    """Every source named in source_prefixes exists in `sources` (the dataset's)."""
    dataset.check_sources(self.source_prefixes or {}, sources, "input.source_prefixes", where)

  def resolve(self, info_sources: Mapping[str, Mapping[str, Any]], where: str
              ) -> dict[str, SourceInputs]:
    """Source -> its SourceInputs: config override > dataset metadata > global field.

    `info_sources` is dataset_info.json's info["sources"]; `where` names it in errors.
    """
    self.check_sources(list(info_sources), where)
    out = {}
    for source, entry in info_sources.items():
      values = {f: getattr(self, f) for f in SOURCE_FIELDS}
      for field in SOURCE_FIELDS:
        if entry.get(field) is None:
          continue
        value = entry[field]
        dataset.check_option(f"{where} sources[{source!r}].{field}", field, value)
        if field.startswith("max_") and value > values[field]:
          logging.warning("%s gives source %r %s=%d; capped at input.%s=%d, the padded batch "
                          "width.", where, source, field, value, field, values[field])
          value = values[field]
        values[field] = value
      values.update((self.source_prefixes or {}).get(source, {}))
      out[source] = SourceInputs(**values)
    return out

  @classmethod
  def from_mapping(cls, fields: Mapping[str, Any]) -> "InputConfig":
    """From `config.input`; an unknown field is named, with the closest known one."""
    validation.check_fields(fields, [f.name for f in dataclasses.fields(cls)], "input field")
    return cls(**dict(fields))


def _source_seed(source: str) -> int:
  return int.from_bytes(hashlib.sha1(source.encode()).digest()[:4], "little")


class TrainIterator:
  """Infinite iterator of per-process batches with get_state / set_state."""

  def __init__(self, data_dir: str, *, inputs: InputConfig, tokenizer, global_batch_size: int,
               seed: int = 0, process_index: int = 0, process_count: int = 1,
               state: Optional[dict] = None, prefetch: int = 2, pack_units: int = 1,
               pack_rows: int = 0, pack_chunks: int = 1):
    """pack_units: packing units in the global batch (with input.packing); pack_rows:
    rows per unit, 0 = sized from the data at start-up; pack_chunks: GradCache chunks
    per step (the units are batch shards x chunks)."""
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
    self.global_inputs = SourceInputs(inputs.query_prefix, inputs.doc_prefix,
                                      inputs.max_query_len, inputs.max_doc_len)
    self.source_inputs = inputs.resolve(info["sources"], os.path.join(data_dir, dataset.INFO))
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
      dataset.check_sources(source_weights, info["sources"], "input.source_weights",
                            "the dataset")
      weights = np.array([float(source_weights.get(s, 0.0)) for s in self.sources])
    else:
      weights = np.array([len(self.eligible[s]) for s in self.sources], np.float64)
    if weights.sum() <= 0:
      raise ValueError("input.source_weights gives every usable source weight 0.")
    self.weights = weights / weights.sum()
    self._perm_cache: dict[tuple[str, int], np.ndarray] = {}
    self.packing = inputs.packing
    if self.packing:
      self._setup_packing(inputs, pack_units, process_count, pack_rows, pack_chunks)
    self._state = {"step": 0, "cursors": {s: 0 for s in self.sources}}
    self._prefetch = prefetch
    self._queue: Optional[queue.Queue] = None
    if state is not None:
      self.set_state(state)

  def _setup_packing(self, inputs: InputConfig, pack_units: int, process_count: int,
                     pack_rows: int, pack_chunks: int) -> None:
    if pack_units <= 0 or pack_units % process_count or self.batch_size % pack_units:
      raise ValueError(f"{pack_units} packing units do not split batch_size="
                       f"{self.batch_size} over {process_count} processes evenly.")
    self.pack_length = inputs.pack_length or max(self.max_query_len, self.max_doc_len)
    self.local_units = pack_units // process_count
    if pack_chunks <= 0:
      raise ValueError(f"pack_chunks={pack_chunks} must be a positive count of GradCache chunks.")
    self.pack_chunks = pack_chunks
    self.balance_steps = inputs.pack_balance_steps
    # Units this process balances together: every unit of a block of balance_steps
    # batches, or else one per local batch shard of a chunk (none where a shard spans
    # processes).
    if self.balance_steps > 1:
      self.balanced_units = self.balance_steps * pack_units
    else:
      self.balanced_units = (self.local_units // pack_chunks if inputs.pack_balance
                             and self.local_units % pack_chunks == 0 else 1)
    self._blocks: dict[str, tuple[int, list]] = {}  # source -> (block start, its batches).
    self._blocks_lock = threading.Lock()
    self.texts_per_unit = self.batch_size // pack_units  # Queries per unit.
    self.pack_shapes = inputs.pack_shapes
    # Rows per unit of each source's steps; pack_rows is the most of them.
    self.source_rows = (dict.fromkeys(self.sources, pack_rows) if pack_rows
                        else self.size_source_rows())
    self.pack_rows = max(self.source_rows.values())
    balanced = ""
    if self.balance_steps > 1:
      balanced = (f", the {self.balanced_units} units of every {self.balance_steps} batches "
                  "of a source balanced")
    elif self.balanced_units > 1:
      balanced = f", {self.balanced_units} units of each chunk balanced"
    logging.info("Packing %d queries (+ documents) per unit into %d rows of %d tokens%s.",
                 self.texts_per_unit, self.pack_rows, self.pack_length, balanced)
    if len(self.row_shapes) > 1:
      logging.info("Rows per unit by source (input.pack_shapes=%d): %s.", self.pack_shapes,
                   ", ".join(f"{s} {r}" for s, r in self.source_rows.items()))

  @property
  def row_shapes(self) -> list[int]:
    """The distinct rows per unit of packed steps, fewest first (one compile each)."""
    return sorted(set(self.source_rows.values()))

  def size_source_rows(self, sample: int = PACK_SAMPLE, shapes: int = 0) -> dict[str, int]:
    """Source -> rows per packing unit of its steps, from the token lengths of each
    source's first `sample` examples (`packing.size_source_rows`), in at most `shapes`
    distinct counts (default input.pack_shapes; `packing.group_rows`). The same on
    every process."""
    stats, drawn = [], []
    for source in self.sources:
      if self.weights[self.sources.index(source)] == 0:
        continue
      n = min(sample, len(self.eligible[source]))
      records = self.readers[source].read(list(self._stream(source, np.arange(n))))
      q, d, negs = self.encode(records, source)
      lengths = [[len(a), len(b)] + [len(x) for x in ns] for a, b, ns in zip(q, d, negs)]
      stats.append(np.array(lengths, np.int64))
      drawn.append(source)
    widths = [self.max_query_len] + [self.max_doc_len] * (stats[0].shape[1] - 1 if stats else 1)
    rows = packing.size_source_rows(stats, self.texts_per_unit, self.pack_length, self.seed,
                                    widths, self.balanced_units)
    weights = [self.weights[self.sources.index(s)] for s in drawn]
    rows = packing.group_rows(rows, weights, shapes or self.pack_shapes)
    by_source = dict(zip(drawn, rows))
    # A source that is never drawn takes the most rows (it has no steps).
    return {s: by_source.get(s, max(rows, default=1)) for s in self.sources}

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
    if self.packing and self.balance_steps > 1:
      source = self.source_of_step(state["step"])
      batch = self.block_balanced_batch(source, state["cursors"][source])
    else:
      source, records = self.records_at(state)
      batch = self.tokenize(records, source)
    cursors = dict(state["cursors"])
    cursors[source] += self.batch_size
    return batch, {"step": state["step"] + 1, "cursors": cursors}

  def records_at(self, state: Mapping[str, Any]) -> tuple[str, list[dict]]:
    """(source, this process's untokenised records) of the batch at `state`."""
    source = self.source_of_step(state["step"])
    start = state["cursors"][source] + self.process_index * self.local_batch
    positions = np.arange(start, start + self.local_batch)
    return source, self.readers[source].read(list(self._stream(source, positions)))

  def block_balanced_batch(self, source: str, cursor: int) -> dict[str, np.ndarray]:
    """The packed batch at `cursor` of `source` with input.pack_balance_steps = S > 1.

    Batch i = (cursor / B) mod S of its block of S batches holds the examples the deal
    of the whole block gives its units (`_deal_block`); this process packs its own.
    """
    i = (cursor // self.batch_size) % self.balance_steps
    start = cursor - i * self.batch_size
    with self._blocks_lock:
      cached = self._blocks.get(source)
    if cached is None or cached[0] != start:
      cached = (start, self._deal_block(source, start))
      with self._blocks_lock:
        self._blocks[source] = cached
    q, d, negs = cached[1][i]
    return packing.pack_batch(q, d, negs, self.local_units, self.source_rows[source],
                              self.pack_length, self.tokenizer.pad_id)

  def _deal_block(self, source: str, start: int) -> list[tuple]:
    """This process's (queries, documents, negatives) of each batch of the block of S
    batches from stream position `start`.

    The block's S x B examples are dealt among its S x U packing units (U per global
    batch) in equal counts and about equal tokens (`packing.balanced_order`); batch i
    is units [i U, (i + 1) U), in the global batch's order. Every process deals the
    whole block alike, so a global batch does not depend on the number of processes;
    only this process's share of it is kept.
    """
    size = self.balance_steps * self.batch_size
    records = self.readers[source].read(list(self._stream(source, start + np.arange(size))))
    q, d, negs = self.encode(records, source)
    tokens = np.array([len(a) + len(b) + sum(map(len, ns)) for a, b, ns in zip(q, d, negs)])
    order = packing.balanced_order(tokens, self.balanced_units)
    steps = []
    for i in range(self.balance_steps):
      first = i * self.batch_size + self.process_index * self.local_batch
      mine = order[first:first + self.local_batch]
      steps.append(([q[k] for k in mine], [d[k] for k in mine], [negs[k] for k in mine]))
    return steps

  def tokenize(self, records: list[dict], source: Optional[str] = None
               ) -> dict[str, np.ndarray]:
    """Token arrays of `records` with `source`'s prompts and lengths (None: the global ones).

    Texts are truncated at the source's max_*_len and padded to the global one, or
    packed (input.packing).
    """
    tok = self.tokenizer
    q, d, negs = self.encode(records, source)
    if self.packing:
      return self.pack(q, d, negs, source)
    batch = {}
    batch["query_ids"], batch["query_mask"] = tok.pad(q, self.max_query_len)
    batch["doc_ids"], batch["doc_mask"] = tok.pad(d, self.max_doc_len)
    if self.num_negatives:
      ids, mask = tok.pad([t for ns in negs for t in ns], self.max_doc_len)
      shape = (len(records), self.num_negatives, self.max_doc_len)
      batch["neg_ids"], batch["neg_mask"] = ids.reshape(shape), mask.reshape(shape)
    return batch

  def encode(self, records: list[dict], source: Optional[str] = None
             ) -> tuple[list[list[int]], list[list[int]], list[list[list[int]]]]:
    """(query, document, per-record hard negative [N]) token lists of `records`."""
    tok = self.tokenizer
    s = self.source_inputs[source] if source is not None else self.global_inputs
    q, _ = tok.encode([s.query_prefix + r["query"] for r in records], s.max_query_len)
    d, _ = tok.encode([s.doc_prefix + r["document"] for r in records], s.max_doc_len)
    negs: list[list[list[int]]] = [[] for _ in records]
    if self.num_negatives:
      texts = []
      for r in records:
        negatives = r["negatives"]
        texts += [s.doc_prefix + negatives[i % len(negatives)]
                  for i in range(self.num_negatives)]
      n, _ = tok.encode(texts, s.max_doc_len)
      negs = [n[i * self.num_negatives:(i + 1) * self.num_negatives]
              for i in range(len(records))]
    return q, d, negs

  def pack(self, q, d, negs, source: Optional[str] = None) -> dict[str, np.ndarray]:
    """The packed batch of token lists (see the module docstring), each chunk's units
    balanced first (input.pack_balance), in `source`'s rows (None: the most)."""
    if self.balanced_units > 1:
      tokens = np.array([len(a) + len(b) + sum(map(len, ns)) for a, b, ns in zip(q, d, negs)])
      order = packing.chunk_balanced_order(tokens, self.balanced_units, self.pack_chunks)
      q, d, negs = ([x[i] for i in order] for x in (q, d, negs))
    rows = self.source_rows[source] if source is not None else self.pack_rows
    return packing.pack_batch(q, d, negs, self.local_units, rows, self.pack_length,
                              self.tokenizer.pad_id)

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


def pack_units(batch_size: int, grad_cache_chunk: int, batch_shards: int) -> int:
  """Packing units per global batch: one per device share of each GradCache chunk."""
  return batch_shards * pack_chunks(batch_size, grad_cache_chunk)


def pack_chunks(batch_size: int, grad_cache_chunk: int) -> int:
  """GradCache chunks per step (1 without GradCache)."""
  return batch_size // grad_cache_chunk if grad_cache_chunk else 1


def batch_shapes(inputs: InputConfig, batch_size: int, units: int = 0, rows: int = 0
                 ) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """Key -> (shape, dtype) of the batches `TrainIterator` yields for `inputs`, `batch_size` rows.

  What an ahead-of-time compile of the train step takes in place of data. With
  num_negatives > 0 the negatives are included (data without them trains with
  in-batch negatives only when negatives_required is False: a smaller step).
  With input.packing, the packed batch of `units` packing units of `rows` rows
  each (`pack_units`; rows as `TrainIterator` logs them at start-up).
  """
  lq, ld, n = inputs.max_query_len, inputs.max_doc_len, inputs.num_negatives
  if inputs.packing:
    if units <= 0 or rows <= 0 or batch_size % units:
      raise ValueError(f"A packed batch needs packing units dividing batch_size={batch_size} "
                       f"and rows per unit (got units={units}, rows={rows}).")
    length = inputs.pack_length or max(lq, ld)
    i32 = np.dtype(np.int32)
    return {"packed_ids": ((units * rows, length), i32),
            "packed_segment_ids": ((units * rows, length), i32),
            "packed_positions": ((units * rows, length), i32),
            "query_lengths": ((units, batch_size // units), i32),
            "doc_lengths": ((units, batch_size // units, 1 + n), i32),
            "packed_capped": ((units,), i32)}
  out = {"query_ids": ((batch_size, lq), np.dtype(np.int32)),
         "query_mask": ((batch_size, lq), np.dtype(bool)),
         "doc_ids": ((batch_size, ld), np.dtype(np.int32)),
         "doc_mask": ((batch_size, ld), np.dtype(bool))}
  if n:
    out["neg_ids"] = ((batch_size, n, ld), np.dtype(np.int32))
    out["neg_mask"] = ((batch_size, n, ld), np.dtype(bool))
  return out
