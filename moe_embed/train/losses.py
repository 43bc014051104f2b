"""Contrastive losses on global arrays: InfoNCE with in-batch and hard negatives, Matryoshka.

Written on global (sharded) arrays under jit, as big_vision does: `q @ docs.T`
spans every device's documents and the compiler inserts the gathers. Axis
letters: B global batch, N hard negatives per query, d embedding width.
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp

from moe_embed.model import pooling


def info_nce(q: jax.Array, p: jax.Array, negatives: Optional[jax.Array],
             temperature: jax.Array, symmetric: bool = False) -> jax.Array:
  """InfoNCE of each query against [its positive, all other positives, all hard negatives].

  q, p: unit-norm [B, d]; negatives: unit-norm [B, N, d] or None.
  Row i's logits are [q_i . p_j for all j] ++ [q_i . n_jk for all j, k]: the label
  of row i is column i whatever N is, so hard negatives never shift the labels.
  The symmetric term adds document -> query InfoNCE over the positives.
  """
  q = q.astype(jnp.float32)
  p = p.astype(jnp.float32)
  docs = p
  if negatives is not None and negatives.shape[1]:
    docs = jnp.concatenate([p, negatives.reshape(-1, negatives.shape[-1]).astype(jnp.float32)])
  logits = q @ docs.T / temperature  # [B, B + B*N]
  labels = jnp.arange(q.shape[0])
  loss = _cross_entropy(logits, labels)
  if symmetric:
    loss = 0.5 * (loss + _cross_entropy(p @ q.T / temperature, labels))
  return loss


def _cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean cross-entropy of integer labels: logits [B, C], labels [B]."""
  log_z = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]
  return jnp.mean(log_z - picked)


def matryoshka_info_nce(q: jax.Array, p: jax.Array, negatives: Optional[jax.Array],
                        temperature: jax.Array, dims: Sequence[int],
                        weights: Sequence[float], symmetric: bool = False) -> jax.Array:
  """Weighted sum of InfoNCE on the first d features (re-normalised) for each d.

  An empty `dims` means the full embedding with weight 1.
  """
  if not dims:
    return info_nce(q, p, negatives, temperature, symmetric)
  total = jnp.zeros((), jnp.float32)
  for dim, weight in zip(dims, weights):
    total += weight * info_nce(
        pooling.matryoshka(q, dim), pooling.matryoshka(p, dim),
        None if negatives is None else pooling.matryoshka(negatives, dim),
        temperature, symmetric)
  return total
