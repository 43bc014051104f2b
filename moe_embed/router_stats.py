"""Router losses from additive per-layer statistics, exact across calls and chunks.

Each MoE layer reports sums over its real (non-padding) tokens:
'expert_counts' [E] (top-k assignments, no gradient), 'prob_sum' [E] (router
probabilities), 'z_sum' (logsumexp(logits)^2), 'entropy_sum' and 'num_tokens'.
Because they are sums, statistics of several forward calls (queries and
documents, or GradCache chunks) add up to those of one call over all tokens,
so the load-balancing loss  E * sum_e f_e * P_e  (f_e = counts_e / (n K),
P_e = prob_sum_e / n) is the same whichever way the batch was split. Its
gradient flows only through P_e, which is linear in the per-token
probabilities: `router_losses(chunk, total)` gives each chunk's exact share.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import jax
import jax.numpy as jnp

Stats = Mapping[str, Mapping[str, jax.Array]]  # layer name -> statistic -> array
STAT_KEYS = ("expert_counts", "prob_sum", "z_sum", "entropy_sum", "dropped", "num_tokens")


def add_stats(all_stats: Sequence[Stats]) -> dict[str, dict[str, jax.Array]]:
  """Sums the statistics of several forward calls, layer by layer."""
  total: dict[str, dict[str, jax.Array]] = {}
  for stats in all_stats:
    for layer, values in stats.items():
      acc = total.setdefault(layer, {})
      for key in STAT_KEYS:
        acc[key] = acc[key] + values[key] if key in acc else values[key]
  return total


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
    whole = total[layer]
    n = jnp.maximum(whole["num_tokens"], 1.0)
    num_experts = values["prob_sum"].shape[-1]
    fraction = jax.lax.stop_gradient(whole["expert_counts"]) / (n * top_k)
    lb.append(num_experts * jnp.sum(fraction * values["prob_sum"] / n))
    z.append(values["z_sum"] / n)
  return jnp.mean(jnp.stack(lb)), jnp.mean(jnp.stack(z))


def usage_metrics(stats: Stats, top_k: int) -> dict[str, jax.Array]:
  """Per-layer expert usage for logs: min/max token fraction, entropy, drops."""
  out = {}
  for layer, values in stats.items():
    n = jnp.maximum(values["num_tokens"], 1.0)
    fraction = values["expert_counts"] / (n * top_k)
    out[f"{layer}/expert_fraction_min"] = jnp.min(fraction)
    out[f"{layer}/expert_fraction_max"] = jnp.max(fraction)
    out[f"{layer}/router_entropy"] = values["entropy_sum"] / n
    out[f"{layer}/dropped_fraction"] = values["dropped"] / (n * top_k)
  return out
