"""Text embeddings from a trained or imported model: the `encode` API.

  embedder = moe_embed.inference.load_embedder("/tmp/moe_embed_tiny")
  vectors = embedder.encode(["how to sort a list"], prefix=embedder.query_prefix)

Texts are sorted by length and batched with padded lengths rounded up to a
bucket, so few shapes compile and little compute goes to padding; results come
back in input order, float32, L2-normalised. Texts longer than max_length
tokens are truncated and counted (a logged warning, and `last_truncated`).
Empty texts are not an error: they are embedded as the prefix and special
tokens alone, with a logged warning, so that rows stay aligned with the input.

`encode_with_routing` also returns the MoE router statistics summed over the
real tokens of the texts (moe_embed.moe.router_stats: additive, so padding and
batching do not change them): what `launch/eval.py --routing` reports.

Given a mesh and the parameters' shardings, the forward pass runs sharded: the
rows of each batch split over the mesh as in training, parameters stay where
they are (no copy to the host), and the embeddings come back replicated to
every process. The trainer evaluates this way at start, during and at the end,
with one Embedder built without parameters and `with_params` for each
evaluation's (the forward compiles once).
"""

from __future__ import annotations

import copy
from typing import Any, Optional, Sequence

from absl import logging
import jax
import numpy as np
import tqdm
from jax.sharding import NamedSharding, PartitionSpec as P

from moe_embed import partitioning, validation
from moe_embed.model import pooling
from moe_embed.model.config import EncoderConfig
from moe_embed.model.encoder import EmbeddingModel
from moe_embed.moe import router_stats

PREFIXES = {"query": "query_prefix", "document": "doc_prefix", "none": None}


def _bucket(length: int, max_length: int) -> int:
  """Padded length: next multiple of 16 up to 64, then of 64 (bounded recompiles)."""
  step = 16 if length <= 64 else 64
  return min(max_length, -(-length // step) * step)


class Embedder:
  """Encodes texts with fixed parameters; holds the jitted forward per shape."""

  def __init__(self, config: EncoderConfig, params: Any, tokenizer, *, max_length: int = 512,
               query_prefix: str = "", doc_prefix: str = "", mesh=None, rules=None,
               param_shardings: Any = None):
    """`mesh`, `rules` and `param_shardings` (a tree like `params`) run it sharded.

    `params` may be None for an Embedder whose parameters come later, per
    `with_params` call (the trainer's: its parameters change every step).
    """
    self.config = config
    self.tokenizer = tokenizer
    self.max_length = max_length
    self.query_prefix, self.doc_prefix = query_prefix, doc_prefix
    self.params = params
    model = EmbeddingModel(config)
    forward = lambda params, ids, mask: model.apply({"params": params}, ids, mask)
    if mesh is None:
      self._rows_multiple = 1
      self._forward = jax.jit(forward)
    else:
      if param_shardings is None:
        raise ValueError("A sharded Embedder needs the parameters' shardings.")
      self._forward, self._rows_multiple = _sharded_forward(
          forward, mesh, rules or partitioning.DEFAULT_RULES, param_shardings)
    self.last_truncated = 0

  def resolve_prefix(self, prefix: str) -> str:
    """'query' / 'document' / 'none' name the model's prefixes; other strings are literal."""
    if prefix in PREFIXES:
      attr = PREFIXES[prefix]
      return getattr(self, attr) if attr else ""
    return prefix

  def with_params(self, params: Any) -> "Embedder":
    """This Embedder over other parameters (a tree like the constructor's, with the
    same shardings): a shallow copy sharing the jitted forward, so nothing recompiles."""
    bound = copy.copy(self)
    bound.params = params
    return bound

  def encode(self, texts: Sequence[str], *, prefix: str = "", dim: Optional[int] = None,
             batch_size: int = 64, show_progress: bool = True) -> np.ndarray:
    """float32 [n, d] unit-norm embeddings in input order (d = dim if given)."""
    return self._encode(texts, prefix, dim, batch_size, show_progress, routing=False)[0]

  def encode_with_routing(self, texts: Sequence[str], *, prefix: str = "",
                          dim: Optional[int] = None, batch_size: int = 64,
                          show_progress: bool = True
                          ) -> tuple[np.ndarray, dict[str, dict[str, np.ndarray]]]:
    """(encode's embeddings, {layer: {statistic: float64 array}}): the router statistics
    of every MoE layer summed over the texts' real tokens ({} for a dense model)."""
    return self._encode(texts, prefix, dim, batch_size, show_progress, routing=True)

  def _encode(self, texts: Sequence[str], prefix: str, dim: Optional[int], batch_size: int,
              show_progress: bool, routing: bool):
    """(embeddings [n, dim or d], summed router statistics, {} unless `routing`)."""
    if self.params is None:
      raise ValueError("This Embedder has no parameters; encode with embedder.with_params("
                       "params).")
    texts = list(texts)
    validation.check_widths([dim], self.config.embedding_dim)
    if batch_size <= 0:
      raise ValueError(f"batch_size={batch_size} must be positive.")
    prefix = self.resolve_prefix(prefix)
    empty = sum(1 for t in texts if not t.strip())
    if empty:
      logging.warning("%d of %d texts are empty; they are embedded as the prefix alone.",
                      empty, len(texts))
    ids, truncated = self.tokenizer.encode([prefix + t for t in texts], self.max_length)
    self.last_truncated = truncated
    if truncated:
      logging.warning("%d of %d texts were longer than %d tokens and were truncated.",
                      truncated, len(texts), self.max_length)
    order = np.argsort([len(x) for x in ids], kind="stable")[::-1]
    multiple = self._rows_multiple
    batch_size = -(-batch_size // multiple) * multiple  # Whole rows for every shard.
    width = self.config.embedding_dim
    out = np.zeros((len(texts), dim or width), np.float32)
    stats = []
    bar = tqdm.tqdm(total=len(texts), desc="encode", disable=not show_progress, unit="text")
    for start in range(0, len(texts), batch_size):
      rows = order[start:start + batch_size]
      chunk = [ids[i] for i in rows]
      length = _bucket(max(len(x) for x in chunk), self.max_length)
      arr, mask = self.tokenizer.pad(chunk, length)
      # Keep the batch shape fixed (and divisible over the shards): pad with
      # empty rows, dropped below.
      rows_wanted = batch_size if len(texts) > batch_size else -(-len(rows) // multiple) * multiple
      if len(rows) < rows_wanted:
        fill = rows_wanted - len(rows)
        arr = np.concatenate([arr, np.full((fill, length), self.tokenizer.pad_id, np.int32)])
        mask = np.concatenate([mask, np.zeros((fill, length), bool)])
      emb, aux = self._forward(self.params, arr, mask)
      if routing:
        stats.append(aux)  # The fill rows have no real tokens: they add nothing.
      if dim:
        emb = pooling.matryoshka(emb, dim)
      out[rows] = np.asarray(emb)[:len(rows)]
      bar.update(len(rows))
    bar.close()
    return out, router_stats.add_on_host(stats)


def _sharded_forward(forward, mesh, rules, param_shardings):
  """(forward(params, ids, mask) -> replicated embeddings, rows per batch multiple)."""
  rows = partitioning.batch_sharding(mesh, rules)
  jitted = jax.jit(forward, in_shardings=(param_shardings, rows, rows),
                   out_shardings=NamedSharding(mesh, P()))  # Embeddings and statistics.

  def run(params, ids: np.ndarray, mask: np.ndarray) -> jax.Array:
    # Every process holds the same rows; each device takes its slice of them.
    place = lambda x: jax.make_array_from_callback(x.shape, rows, lambda index: x[index])
    with partitioning.activate(mesh, rules):
      return jitted(params, place(ids), place(mask))

  return run, partitioning.batch_shards(mesh, rules)


def load_embedder(path: str, *, max_length: Optional[int] = None) -> Embedder:
  """An Embedder from a training workdir (latest checkpoint) or a model folder.

  max_length defaults to the model's own token limit (model_folder.encode_length),
  not to the truncation a workdir was trained with.
  """
  from moe_embed.io import model_folder
  from moe_embed.tokenizers import load_tokenizer
  params, config, meta = model_folder.load_any(path)
  tokenizer = load_tokenizer(meta["tokenizer"])
  length, source = model_folder.encode_length(config, meta)
  if max_length:
    length, source = max_length, "given"
  logging.info("Encoding with at most %d tokens per text (%s).", length, source)
  return Embedder(config, params, tokenizer, max_length=length,
                  query_prefix=meta.get("query_prefix", ""),
                  doc_prefix=meta.get("doc_prefix", ""))
