"""Token-choice top-k routing.

Axis letters: T tokens, D model width, E experts, K experts per token.
The router is a bias-free linear map to E logits in float32; a softmax over all
E experts gives the probabilities and the top-k of them pick the experts. The
k weights are the probabilities themselves (the released model) or, with
`renormalize` = p > 0, divided by their p-norm (megablocks' normalisation; p = 1
is their sum, since the weights are positive). Padding tokens get zero weights; their
statistics are left out in `router_stats`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Routing:
  """Which experts each token uses and with what weight."""

  experts: jax.Array  # int32 [T, K]
  weights: jax.Array  # float32 [T, K]; zero for padding tokens.
  probs: jax.Array  # float32 [T, E]
  logits: jax.Array  # float32 [T, E]
  valid: jax.Array  # bool [T]; False for padding tokens.


def topk_norm(weights: jax.Array, p: float) -> jax.Array:
  """[T, 1]: the p-norm of each token's k (positive) weights [T, K]; p = 1 is their sum."""
  if p == 1:
    return jnp.sum(weights, axis=-1, keepdims=True)
  return jnp.sum(weights ** p, axis=-1, keepdims=True) ** (1.0 / p)


def route(x: jax.Array, kernel: jax.Array, valid: jax.Array, top_k: int,
          renormalize: float) -> Routing:
  """x [T, D], kernel [D, E] (float32), valid bool [T] -> Routing."""
  logits = jnp.dot(x.astype(jnp.float32), kernel.astype(jnp.float32),
                   precision=jax.lax.Precision.HIGHEST)
  probs = jax.nn.softmax(logits, axis=-1)
  experts = jax.lax.top_k(jax.lax.stop_gradient(probs), top_k)[1]  # [T, K]
  # The weights read through a one-hot contraction, not top_k's own values: the
  # gradient of those is a scatter into [T, E], which TPUs run serially and which
  # XLA's TPU cost model cannot time (it returns a negative step time). Exact: each
  # weight is one probability times 1, plus zeros.
  one_hot = jax.nn.one_hot(experts, probs.shape[-1], dtype=probs.dtype)  # [T, K, E]
  weights = jnp.sum(probs[:, None, :] * one_hot, axis=-1)  # [T, K]
  if renormalize:
    weights = weights / topk_norm(weights, float(renormalize))
  weights = weights * valid[:, None]
  return Routing(experts.astype(jnp.int32), weights, probs, logits, valid)
