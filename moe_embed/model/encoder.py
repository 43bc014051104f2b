"""The MoE text encoder and the embedding model built on it.

`Encoder` maps token ids [B, L] to hidden states [B, L, D]; layer i uses a routed
`MoeMlp` in place of the dense MLP when `config.is_moe_layer(i)`.
`EmbeddingModel` mean-pools the non-padding tokens, optionally projects, and
L2-normalises: the text embedding [B, d].
Both return `(output, aux)`, where aux maps 'layer_{i}' of every MoE layer to its
router metrics (losses and expert usage); the train step adds the losses.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_embed.model import pooling
from moe_embed.model.config import EncoderConfig
from moe_embed.model.layers import Embeddings, Mlp, SelfAttention, layer_norm, normal_init
from moe_embed.model.moe_mlp import MoeMlp

Aux = dict[str, dict[str, jax.Array]]


class Block(nn.Module):
  """One transformer layer, post-norm (BERT, nomic-bert) or pre-norm."""

  config: EncoderConfig
  moe: bool

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array, segment_ids: Optional[jax.Array] = None,
               positions: Optional[jax.Array] = None
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """x: [B, L, D], mask: bool [B, L], segment_ids / positions: int [B, L] of packed rows
    or None -> ([B, L, D], router metrics or {})."""
    cfg = self.config
    attn = SelfAttention(cfg, name="attention")
    attn_norm = layer_norm(cfg, "attention_norm")
    mlp_norm = layer_norm(cfg, "mlp_norm")
    if self.moe:
      mlp = MoeMlp(cfg, name="mlp")
      run_mlp = lambda h: mlp(h, mask)
    else:
      mlp = Mlp(cfg, name="mlp")
      run_mlp = lambda h: (mlp(h), {})
    if cfg.norm == "post":
      h = attn_norm(x + attn(x, mask, segment_ids, positions))
      y, metrics = run_mlp(h)
      out = mlp_norm(h + y)
    else:
      h = x + attn(attn_norm(x), mask, segment_ids, positions)
      y, metrics = run_mlp(mlp_norm(h))
      out = h + y
    out = nn.with_logical_constraint(out, ("batch", "length", "embed"))
    return out, metrics


class Encoder(nn.Module):
  """Embeddings followed by `num_layers` blocks; returns hidden states and router aux."""

  config: EncoderConfig

  @nn.compact
  def __call__(self, ids: jax.Array, mask: jax.Array,
               token_type_ids: Optional[jax.Array] = None,
               segment_ids: Optional[jax.Array] = None,
               positions: Optional[jax.Array] = None) -> tuple[jax.Array, Aux]:
    """ids: int [B, L], mask: [B, L] (nonzero = real token) -> ([B, L, D], aux).

    Packed rows also pass segment_ids (int [B, L], 0 = padding) and positions (int
    [B, L], from 0 in each segment): tokens attend within their segment only.
    """
    cfg = self.config
    mask = mask.astype(bool)
    x = Embeddings(cfg, name="embeddings")(ids, token_type_ids, positions)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    block_cls = nn.remat(Block, static_argnums=()) if cfg.remat else Block
    aux: Aux = {}
    for i in range(cfg.num_layers):
      moe = cfg.is_moe_layer(i)
      x, metrics = block_cls(cfg, moe=moe, name=f"layer_{i}")(x, mask, segment_ids, positions)
      if moe:
        aux[f"layer_{i}"] = metrics
    if cfg.norm == "pre":
      x = layer_norm(cfg, "final_norm")(x)
    return x, aux


class EmbeddingModel(nn.Module):
  """Text embeddings: encoder, masked mean pooling, optional projection, L2 norm."""

  config: EncoderConfig

  def setup(self):
    self.encoder = Encoder(self.config)
    if self.config.projection_dim:
      self.projection = nn.Dense(
          self.config.projection_dim, use_bias=False, dtype=jnp.float32,
          param_dtype=jnp.float32,
          kernel_init=normal_init(self.config, ("embed", None)))

  def __call__(self, ids: jax.Array, mask: jax.Array,
               token_type_ids: Optional[jax.Array] = None) -> tuple[jax.Array, Aux]:
    """ids: int [B, L], mask: [B, L] -> (unit-norm float32 [B, d], aux)."""
    hidden, aux = self.encoder(ids, mask, token_type_ids)
    return self._finish(pooling.mean_pool(hidden, mask)), aux  # [B, D] float32 pooled

  def embed_packed(self, ids: jax.Array, segment_ids: jax.Array, positions: jax.Array,
                   num_units: int, texts_per_unit: int) -> tuple[jax.Array, Aux]:
    """Packed rows -> (unit-norm float32 [num_units * texts_per_unit, d], aux).

    ids, segment_ids, positions: int [R, P], the rows of `num_units` units one after
    another (R / num_units each); segment s of unit u is text u * texts_per_unit + s - 1.
    """
    hidden, aux = self.encoder(ids, segment_ids > 0, segment_ids=segment_ids,
                               positions=positions)
    rows, length, width = hidden.shape
    per_unit = (rows // num_units) * length
    pooled = pooling.segment_mean(hidden.reshape(num_units, per_unit, width),
                                  segment_ids.reshape(num_units, per_unit), texts_per_unit)
    return self._finish(pooled.reshape(num_units * texts_per_unit, width)), aux

  def _finish(self, pooled: jax.Array) -> jax.Array:
    if self.config.projection_dim:
      pooled = self.projection(pooled)
    return pooling.l2_normalize(pooled)


def init_params(config: EncoderConfig, rng: jax.Array, seq_len: int = 8) -> Any:
  """Initialises EmbeddingModel parameters (boxed with logical axis names)."""
  ids = jnp.zeros((1, seq_len), jnp.int32)
  return EmbeddingModel(config).init(rng, ids, jnp.ones_like(ids))["params"]

