"""Packing a step's texts into fixed rows: a padding-free batch of fixed shape.

A packing unit is one slice of the global batch (one device's share of one
GradCache chunk): its `q` queries and their `q * (1 + N)` documents (positive,
then hard negatives) are packed into `rows` rows of `pack_length` tokens. A
text never spans two rows. Per unit, texts are numbered queries first, then
documents in [query, group] order; a token's segment id is its text's number
+ 1 (0 = slack at a row's end, i.e. padding), and its position counts from 0
within its text. Rows are filled first-fit, longest text first.

A process balances its units before packing (`balanced_order`): the examples of
one GradCache chunk are dealt out among that chunk's units (one per device) so
that each unit holds about the same number of tokens. An example never leaves
its chunk, so each chunk's texts, its router statistics and the InfoNCE loss of
the step (which no order of examples changes) are those of the unbalanced batch.
Rows are sized for the heaviest unit, so evening the units out lowers the rows
every unit gets: at 16 queries per unit on the embedded corpus (128/128), the
heaviest of 4 units needs 13 rows balanced against 15 as drawn.

Overflow has a fixed home: the rows are sized at start-up from the dataset's
length statistics (`size_rows`), and a unit whose texts still do not fit is
packed with every text capped at the longest length that fits
(`pack_unit`): the step keeps its shape and runs, those texts lose their
tails, and the batch says how many were capped. `size_rows` guarantees
rows * pack_length >= texts per unit, so capping always succeeds.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
from typing import Sequence

import numpy as np

# Rows per unit are the most any simulated unit needed, times this (rounded up).
ROW_HEADROOM = 1.05
SIMULATED_UNITS = 32
MAX_SIMULATED_GROUP = 64  # Units balanced together, at most, when sizing rows.


def first_fit(lengths: np.ndarray, num_rows: int, pack_length: int
              ) -> tuple[np.ndarray, np.ndarray] | None:
  """(row [n], offset [n]) of each text, longest first into the first row with room; None if
  some text finds no room. lengths int [n], each <= pack_length."""
  remaining = np.full(num_rows, pack_length, np.int64)
  row = np.empty(len(lengths), np.int64)
  offset = np.empty(len(lengths), np.int64)
  for i in np.argsort(-np.asarray(lengths), kind="stable"):
    fits = remaining >= lengths[i]
    r = int(np.argmax(fits))
    if not fits[r]:
      return None
    row[i], offset[i] = r, pack_length - remaining[r]
    remaining[r] -= lengths[i]
  return row, offset


def balanced_order(tokens: np.ndarray, units: int) -> np.ndarray:
  """Permutation of n = units * q examples: entries [u * q, (u + 1) * q) are unit u's.

  Greedy, longest example first into the unit with the fewest tokens and room
  left, so the heaviest unit carries little more than the mean. tokens int [n]:
  each example's tokens (query, document, negatives); ties keep batch order.
  """
  tokens = np.asarray(tokens)
  per = len(tokens) // units
  if units <= 1 or per == 0:
    return np.arange(len(tokens))
  lightest = [(0, u) for u in range(units)]  # (tokens so far, unit): a heap.
  members: list[list[int]] = [[] for _ in range(units)]
  for i in np.argsort(-tokens, kind="stable"):
    load, u = heapq.heappop(lightest)
    members[u].append(int(i))
    if len(members[u]) < per:
      heapq.heappush(lightest, (load + int(tokens[i]), u))
  return np.array([i for unit in members for i in sorted(unit)], np.int64)


def chunk_balanced_order(tokens: np.ndarray, shards: int, chunks: int) -> np.ndarray:
  """Permutation of a process's examples [shards * chunks * q] that balances the units
  of each GradCache chunk among themselves.

  The batch layout is that of `step.split_chunks`: shard s holds a contiguous block,
  and unit s * chunks + j (chunk j of shard s) its j-th slice of q examples. Each
  chunk's examples are dealt out among its `shards` units by `balanced_order`.
  """
  tokens = np.asarray(tokens)
  per = len(tokens) // (shards * chunks)
  order = np.arange(len(tokens)).reshape(shards, chunks, per)
  for j in range(chunks):
    members = order[:, j].reshape(-1)  # The chunk's examples, shard by shard.
    order[:, j] = members[balanced_order(tokens[members], shards)].reshape(shards, per)
  return order.reshape(-1)


def rows_needed(lengths: np.ndarray, pack_length: int) -> int:
  """Rows first-fit uses for `lengths` with as many rows as it likes."""
  lengths = np.asarray(lengths)
  placed = first_fit(lengths, max(1, len(lengths)), pack_length)
  assert placed is not None
  return int(placed[0].max()) + 1 if len(lengths) else 0


def cap_to_fit(lengths: np.ndarray, num_rows: int, pack_length: int) -> int:
  """The longest cap c such that min(lengths, c) fits `num_rows` rows (binary search)."""
  lo, hi = 1, int(np.max(lengths))  # lo always fits (num_rows * pack_length >= n).
  while lo < hi:
    mid = (lo + hi + 1) // 2
    if first_fit(np.minimum(lengths, mid), num_rows, pack_length) is not None:
      lo = mid
    else:
      hi = mid - 1
  return lo


@dataclasses.dataclass
class PackedUnit:
  """One unit's rows: ids, segment_ids, positions int32 [rows, pack_length]."""

  ids: np.ndarray
  segment_ids: np.ndarray
  positions: np.ndarray
  lengths: np.ndarray  # int32 [n]: tokens each text kept.
  capped: int  # Texts shortened to fit.


def pack_unit(texts: Sequence[Sequence[int]], num_rows: int, pack_length: int,
              pad_id: int) -> PackedUnit:
  """Packs token lists (each <= pack_length) into `num_rows` rows; see the module docstring."""
  if num_rows * pack_length < len(texts):
    raise ValueError(f"{len(texts)} texts cannot fit {num_rows} rows of {pack_length} tokens.")
  lengths = np.array([len(t) for t in texts], np.int64)
  if lengths.size and lengths.max() > pack_length:
    raise ValueError(f"A text of {lengths.max()} tokens is longer than pack_length="
                     f"{pack_length}; raise input.pack_length to the longest text width.")
  placed = first_fit(lengths, num_rows, pack_length)
  capped = 0
  if placed is None:
    cap = cap_to_fit(lengths, num_rows, pack_length)
    capped = int(np.sum(lengths > cap))
    lengths = np.minimum(lengths, cap)
    placed = first_fit(lengths, num_rows, pack_length)
  row, offset = placed
  ids = np.full((num_rows, pack_length), pad_id, np.int32)
  segment_ids = np.zeros((num_rows, pack_length), np.int32)
  positions = np.zeros((num_rows, pack_length), np.int32)
  for i, text in enumerate(texts):
    n, r, o = int(lengths[i]), int(row[i]), int(offset[i])
    ids[r, o:o + n] = text[:n]
    segment_ids[r, o:o + n] = i + 1
    positions[r, o:o + n] = np.arange(n)
  return PackedUnit(ids, segment_ids, positions, lengths.astype(np.int32), capped)


def pack_batch(queries: Sequence[Sequence[int]], docs: Sequence[Sequence[int]],
               negatives: Sequence[Sequence[Sequence[int]]], units: int, rows: int,
               pack_length: int, pad_id: int) -> dict[str, np.ndarray]:
  """A packed batch of b examples' token lists (negatives: [b][N]) in `units` units.

  -> packed_ids, packed_segment_ids, packed_positions int32 [units * rows, pack_length],
  query_lengths int32 [units, q], doc_lengths int32 [units, q, 1 + N] (q = b / units),
  packed_capped int32 [units]; unit u holds examples [u * q, (u + 1) * q).
  """
  per = len(queries) // units
  group = 1 + (len(negatives[0]) if len(negatives) else 0)
  parts = []
  for u in range(units):
    texts = list(queries[u * per:(u + 1) * per])
    for i in range(u * per, (u + 1) * per):
      texts += [docs[i], *negatives[i]]
    parts.append(pack_unit(texts, rows, pack_length, pad_id))
  return {
      "packed_ids": np.concatenate([p.ids for p in parts]),
      "packed_segment_ids": np.concatenate([p.segment_ids for p in parts]),
      "packed_positions": np.concatenate([p.positions for p in parts]),
      "query_lengths": np.stack([p.lengths[:per] for p in parts]),
      "doc_lengths": np.stack([p.lengths[per:].reshape(per, group) for p in parts]),
      "packed_capped": np.array([p.capped for p in parts], np.int32),
  }


def size_rows(example_lengths: Sequence[np.ndarray], texts_per_unit: int, pack_length: int,
              seed: int = 0, widths: Sequence[int] | None = None,
              balanced_units: int = 1) -> int:
  """Rows per unit from length statistics: at least `SIMULATED_UNITS` units drawn from
  each sample, in groups of `balanced_units` balanced together (`balanced_order`).

  example_lengths: one int array [examples, texts per example] per source (a unit is
  one source's: every step draws one source); texts_per_unit: examples per unit;
  balanced_units: units of a chunk one process balances (its devices), 1 for none.
  Returns the most rows any simulated unit needed, with `ROW_HEADROOM`, and at least
  enough rows for every text to keep one token; given the texts' `widths` [texts per
  example] (their longest lengths), never more than a unit of texts at full width
  needs, which every unit fits without capping.
  """
  per_source = size_source_rows(example_lengths, texts_per_unit, pack_length, seed, widths,
                                balanced_units)
  return max(per_source) if per_source else _least_rows(example_lengths, texts_per_unit,
                                                        pack_length)


def size_source_rows(example_lengths: Sequence[np.ndarray], texts_per_unit: int,
                     pack_length: int, seed: int = 0, widths: Sequence[int] | None = None,
                     balanced_units: int = 1) -> list[int]:
  """`size_rows` of each source on its own: [sources] rows per unit; the largest is
  `size_rows` of them all (the same draws)."""
  rng = np.random.default_rng(seed)
  # Past a few dozen units a bigger deal balances no worse, so larger groups are
  # simulated as MAX_SIMULATED_GROUP units (a pod's block can hold thousands).
  group = min(max(1, balanced_units), MAX_SIMULATED_GROUP)
  # Groups drawn: SIMULATED_UNITS units in all, and at least 8 groups when balanced.
  draws = SIMULATED_UNITS if group == 1 else max(8, math.ceil(SIMULATED_UNITS / group))
  least = _least_rows(example_lengths, texts_per_unit, pack_length)
  full = None if widths is None else rows_needed(np.tile(np.asarray(widths), texts_per_unit),
                                                 pack_length)
  out = []
  for sample in example_lengths:
    sample = np.asarray(sample)
    most = 1
    for _ in range(draws):
      pick = sample[rng.integers(0, len(sample), size=texts_per_unit * group)]
      pick = pick[balanced_order(pick.sum(axis=1), group)]
      for u in range(group):
        unit = pick[u * texts_per_unit:(u + 1) * texts_per_unit].reshape(-1)
        most = max(most, rows_needed(unit, pack_length))
    rows = max(math.ceil(most * ROW_HEADROOM), least)
    out.append(rows if full is None else min(rows, full))
  return out


def _least_rows(example_lengths: Sequence[np.ndarray], texts_per_unit: int,
                pack_length: int) -> int:
  """Rows that give every text of a unit at least one token."""
  texts = texts_per_unit * (np.asarray(example_lengths[0]).shape[1] if example_lengths else 1)
  return max(1, math.ceil(texts / pack_length))


def group_rows(rows: Sequence[int], weights: Sequence[float], shapes: int) -> list[int]:
  """Each source's rows when at most `shapes` distinct row counts may be used.

  rows [sources]: what each source needs; weights [sources]: how often its steps
  come. Sources are grouped by need, each group taking its heaviest member's rows;
  the groups are the ones that waste the fewest rows per step on average (an exact
  dynamic programme over the sources sorted by need). -> rows [sources], each >= its
  need.
  """
  if shapes < 1:
    raise ValueError(f"shapes={shapes} must be at least 1.")
  if not len(rows):
    return []
  need = sorted(set(int(r) for r in rows))
  weight = [sum(w for r, w in zip(rows, weights) if r == n) for n in need]
  n = len(need)
  k = min(shapes, n)
  # cost[j][i]: least weighted rows of the first i needs in j groups (last group's
  # rows = need[i - 1]); cut[j][i]: where that last group starts.
  inf = float("inf")
  cost = [[inf] * (n + 1) for _ in range(k + 1)]
  cut = [[0] * (n + 1) for _ in range(k + 1)]
  cost[0][0] = 0.0
  for j in range(1, k + 1):
    for i in range(1, n + 1):
      for start in range(i):
        c = cost[j - 1][start] + need[i - 1] * sum(weight[start:i])
        if c < cost[j][i]:
          cost[j][i], cut[j][i] = c, start
  best = min(range(1, k + 1), key=lambda j: cost[j][n])
  assigned, i = {}, n
  for j in range(best, 0, -1):
    start = cut[j][i]
    for m in range(start, i):
      assigned[need[m]] = need[i - 1]
    i = start
  return [assigned[int(r)] for r in rows]
