"""Token-choice top-k router and its additive statistics.

Axis letters: T tokens, D model width, E experts, K experts per token.
The router is a bias-free linear map to E logits in float32; a softmax over all
E experts gives the probabilities and the top-k of them pick the experts. The
k weights are the probabilities themselves (the released model) or, with
`renormalize`, rescaled to sum to one. Padding tokens get zero weights and
enter no statistic.
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


def route(x: jax.Array, kernel: jax.Array, valid: jax.Array, top_k: int,
          renormalize: bool) -> Routing:
  """x [T, D], kernel [D, E] (float32), valid bool [T] -> Routing."""
  logits = jnp.dot(x.astype(jnp.float32), kernel.astype(jnp.float32),
                   precision=jax.lax.Precision.HIGHEST)
  probs = jax.nn.softmax(logits, axis=-1)
  weights, experts = jax.lax.top_k(probs, top_k)
  if renormalize:
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
  weights = weights * valid[:, None]
  return Routing(experts.astype(jnp.int32), weights, probs, logits, valid)


def statistics(routing: Routing, dropped: jax.Array | None = None) -> dict[str, jax.Array]:
  """Additive sums over real tokens (see `moe_embed.router_stats`).

  expert_counts [E]: top-k assignments per expert (no gradient); prob_sum [E];
  z_sum: sum of logsumexp(logits)^2; entropy_sum: sum of router entropies;
  dropped: assignments dropped for lack of capacity; num_tokens.
  """
  valid = routing.valid.astype(jnp.float32)
  num_experts = routing.probs.shape[-1]
  counts = jnp.sum(jax.nn.one_hot(routing.experts, num_experts) * valid[:, None, None],
                   axis=(0, 1))
  log_z = jax.nn.logsumexp(routing.logits, axis=-1)
  log_probs = jax.nn.log_softmax(routing.logits, axis=-1)
  entropy = -jnp.sum(routing.probs * log_probs, axis=-1)
  return {
      "expert_counts": jax.lax.stop_gradient(counts),
      "prob_sum": jnp.sum(routing.probs * valid[:, None], axis=0),
      "z_sum": jnp.sum(jnp.square(log_z) * valid),
      "entropy_sum": jax.lax.stop_gradient(jnp.sum(entropy * valid)),
      "dropped": (jnp.zeros((), jnp.float32) if dropped is None
                  else jax.lax.stop_gradient(dropped.astype(jnp.float32))),
      "num_tokens": jnp.sum(valid),
  }


def load_balancing_loss(stats: dict[str, jax.Array], top_k: int) -> jax.Array:
  """Switch loss E * sum_e f_e * P_e from one call's statistics (1.0 when uniform)."""
  from moe_embed import router_stats  # The one definition, shared with the train step.
  return router_stats.router_losses({"layer": stats}, top_k=top_k)[0]


def metrics(stats: dict[str, jax.Array], top_k: int) -> dict[str, jax.Array]:
  """Readable per-call metrics next to the raw statistics."""
  n = jnp.maximum(stats["num_tokens"], 1.0)
  return {
      **stats,
      "load_balancing_loss": load_balancing_loss(stats, top_k),
      "router_z_loss": stats["z_sum"] / n,
      "router_entropy": stats["entropy_sum"] / n,
      "dropped_fraction": stats["dropped"] / (n * top_k),
      "expert_fraction": stats["expert_counts"] / (n * top_k),
  }
