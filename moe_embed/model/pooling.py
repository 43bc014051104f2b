"""Pooling and normalisation of embeddings, including Matryoshka truncation."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def mean_pool(hidden: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean over non-padding tokens: hidden [B, L, D], mask [B, L] -> float32 [B, D]."""
  weights = mask.astype(jnp.float32)[..., None]  # [B, L, 1]
  summed = jnp.sum(hidden.astype(jnp.float32) * weights, axis=1)
  count = jnp.maximum(jnp.sum(weights, axis=1), 1.0)
  return summed / count


def segment_mean(hidden: jax.Array, segment_ids: jax.Array, num_segments: int) -> jax.Array:
  """Mean over each segment's tokens: hidden [U, T, D], segment_ids int [U, T] (1..S, 0 =
  padding) -> float32 [U, S, D]; segment s of group u is row s - 1 of [u].

  A one-hot matmul rather than a segment sum: a scatter-add runs serially on TPU
  (and XLA's TPU cost model cannot time it); this costs 2 x T x S x D FLOPs.
  """
  member = jax.nn.one_hot(segment_ids - 1, num_segments, dtype=jnp.float32)  # [U, T, S]
  summed = jnp.einsum("uts,utd->usd", member, hidden.astype(jnp.float32),
                      precision=jax.lax.Precision.HIGHEST)
  count = jnp.sum(member, axis=1)[..., None]  # [U, S, 1]
  return summed / jnp.maximum(count, 1.0)


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """Unit L2 norm along the last axis (float32)."""
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


def matryoshka(x: jax.Array, dim: int) -> jax.Array:
  """First `dim` features of x [..., D], re-normalised to unit length.

  1 <= dim <= D is checked where the width enters (moe_embed.validation.check_widths:
  the run config, Embedder.encode), not on every call.
  """
  return l2_normalize(x[..., :dim])
