"""Router statistics, losses and usage metrics: additive, so exact across calls and chunks.

Each MoE layer reports sums over its real (non-padding) tokens (`statistics`):
'expert_counts' [E] (top-k assignments, no gradient), 'prob_sum' [E] (router
probabilities), 'z_sum' (logsumexp(logits)^2), 'entropy_sum', 'dropped' and
'num_tokens'. Because they are sums, statistics of several forward calls
(queries and documents, or GradCache chunks) add up to those of one call over
all tokens, so the load-balancing loss  E * sum_e f_e * P_e  (f_e = counts_e /
(n K), P_e = prob_sum_e / n) is the same whichever way the batch was split. Its
gradient flows only through P_e, which is linear in the per-token
probabilities: `router_losses(chunk, total)` gives each chunk's exact share.
Every readable number (fractions, entropy, losses) is derived from the sums
here, in one place.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from moe_embed.moe.routing import Routing

LayerStats = Mapping[str, jax.Array]  # statistic name -> array
Stats = Mapping[str, LayerStats]  # layer name -> statistics
STAT_KEYS = ("expert_counts", "prob_sum", "z_sum", "entropy_sum", "dropped", "num_tokens")


def statistics(routing: Routing, dropped: Optional[jax.Array] = None) -> dict[str, jax.Array]:
  """Additive sums over the real tokens of one routing call (see the module docstring)."""
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


def add_stats(all_stats: Sequence[Stats]) -> dict[str, dict[str, jax.Array]]:
  """Sums the statistics of several forward calls, layer by layer."""
  total: dict[str, dict[str, jax.Array]] = {}
  for stats in all_stats:
    for layer, values in stats.items():
      acc = total.setdefault(layer, {})
      for key in STAT_KEYS:
        acc[key] = acc[key] + values[key] if key in acc else values[key]
  return total


def add_on_host(all_stats: Sequence[Stats]) -> dict[str, dict[str, np.ndarray]]:
  """add_stats of statistics fetched to the host, in float64 (token counts stay exact)."""
  return add_stats([{layer: {k: np.asarray(values[k], np.float64) for k in STAT_KEYS}
                     for layer, values in stats.items()} for stats in all_stats])


def _load_balancing(values: LayerStats, whole: LayerStats, top_k: int) -> jax.Array:
  """E * sum_e f_e * P_e with f from `whole` (no gradient) and P from `values`."""
  n = jnp.maximum(whole["num_tokens"], 1.0)
  num_experts = values["prob_sum"].shape[-1]
  fraction = jax.lax.stop_gradient(whole["expert_counts"]) / (n * top_k)
  return num_experts * jnp.sum(fraction * values["prob_sum"] / n)


def router_losses(stats: Stats, total: Optional[Stats] = None,
                  top_k: int = 1) -> tuple[jax.Array, jax.Array]:
  """(load-balancing loss, z-loss), each averaged over MoE layers.

  `stats` are the statistics whose gradient is wanted; `total` those of the
  whole step (defaults to `stats`). With stats = one chunk, the returned value
  is that chunk's additive share of the full-batch loss.
  """
  total = stats if total is None else total
  if not stats:
    zero = jnp.zeros((), jnp.float32)
    return zero, zero
  lb, z = [], []
  for layer, values in stats.items():
    lb.append(_load_balancing(values, total[layer], top_k))
    z.append(values["z_sum"] / jnp.maximum(total[layer]["num_tokens"], 1.0))
  return jnp.mean(jnp.stack(lb)), jnp.mean(jnp.stack(z))


def load_balancing_loss(stats: LayerStats, top_k: int) -> jax.Array:
  """Switch loss of one layer's statistics (1.0 when routing is uniform)."""
  return _load_balancing(stats, stats, top_k)


def layer_metrics(stats: LayerStats, top_k: int) -> dict[str, jax.Array]:
  """Readable numbers of one layer: losses, entropy, dropped and per-expert fractions."""
  n = jnp.maximum(stats["num_tokens"], 1.0)
  return {
      "load_balancing_loss": load_balancing_loss(stats, top_k),
      "router_z_loss": stats["z_sum"] / n,
      "router_entropy": stats["entropy_sum"] / n,
      "dropped_fraction": stats["dropped"] / (n * top_k),
      "expert_fraction": stats["expert_counts"] / (n * top_k),  # [E]
  }


def usage_metrics(stats: Stats, top_k: int) -> dict[str, jax.Array]:
  """Per-layer scalars for logs: min/max expert fraction, entropy, dropped fraction."""
  out = {}
  for layer, values in stats.items():
    m = layer_metrics(values, top_k)
    out[f"{layer}/expert_fraction_min"] = jnp.min(m["expert_fraction"])
    out[f"{layer}/expert_fraction_max"] = jnp.max(m["expert_fraction"])
    out[f"{layer}/router_entropy"] = m["router_entropy"]
    out[f"{layer}/dropped_fraction"] = m["dropped_fraction"]
  return out
