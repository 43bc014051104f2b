"""The experts of an MoE layer as pure functions: dispatch, expert MLPs, combine.

Axis letters: B batch, L sequence, T = B*L tokens, D model width, F expert
hidden width, E experts, K experts per token, M = T*K assignments, P grouped
buffer rows, G groups (sequences) and C capacity per group in the capacity path.

Each expert computes w2^T act(w1 x [+ w1_bias]) (act = exact GELU, or SwiGLU
with a third matrix w3); the k expert outputs are summed with the router
weights. The shared output bias is the caller's (`model.moe_mlp`).

Two dispatch paths:
- `dropless_experts`: a counting sort of the M (token, expert) assignments into
  expert-contiguous groups, a grouped matmul per expert matrix, the inverse
  gather, and the weighted sum. No token is ever dropped.
- `capacity_experts`: static-shape one-hot einsum dispatch per sequence (vmoe
  style) with capacity C = ceil(capacity_factor * L * K / E). Assignments are
  served first by choice rank (every token's first choice before any second
  choice), then by position; those beyond capacity are dropped and counted.
Padding tokens are not routed: they take no capacity and no statistic.
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp

from moe_embed.moe import grouped_matmul
from moe_embed.moe.routing import Routing


def expert_activation(h1: jax.Array, h3: Optional[jax.Array]) -> jax.Array:
  """Exact (erf) GELU of the first projection, or SwiGLU when a gate projection is given."""
  return jax.nn.gelu(h1, approximate=False) if h3 is None else jax.nn.silu(h1) * h3


def expert_rows(rows: jax.Array, expert_ids: jax.Array, valid: jax.Array, w1, w2, w3=None,
                w1_bias=None, kernel: str = "windowed", tile: int | None = None,
                expected_rows: int | None = None) -> jax.Array:
  """Each row through its expert: rows [N, D], expert_ids [N] -> [N, D] (0 where not valid).

  `expected_rows` is how many rows are typically valid (default N); it sizes the
  grouping tiles and windows.

  A counting sort groups the rows by expert, a grouped matmul applies each
  expert matrix, and a gather puts the results back in row order.
  """
  n, d = rows.shape
  num_experts = w1.shape[0]
  group_sizes = jnp.sum(
      jax.nn.one_hot(expert_ids, num_experts, dtype=jnp.int32) * valid[:, None], axis=0)
  expected = expected_rows or n
  tile = tile or grouped_matmul.default_tile(expected, num_experts, kernel)
  window = grouped_matmul.default_window(expected, num_experts, tile, kernel)
  layout = grouped_matmul.make_layout(group_sizes, n, tile, window)
  positions = grouped_matmul.row_positions(expert_ids, valid, layout, num_experts)  # [N]
  # Invalid rows fall off the end of the buffer.
  buffer = jnp.zeros((layout.num_rows, d), rows.dtype).at[positions].set(
      rows, mode="drop", unique_indices=True)
  h1 = grouped_matmul.gmm(buffer, w1, layout, kernel)  # [P, F]
  if w1_bias is not None:
    h1 = h1 + w1_bias[grouped_matmul.expert_of_row(layout)].astype(h1.dtype)
  h3 = None if w3 is None else grouped_matmul.gmm(buffer, w3, layout, kernel)
  out = grouped_matmul.gmm(expert_activation(h1, h3), w2, layout, kernel)  # [P, D]
  return out.at[positions].get(mode="fill", fill_value=0)


def combine(per_assignment: jax.Array, weights: jax.Array) -> jax.Array:
  """[T*K, D] expert outputs, weights [T, K] -> weighted sum [T, D] (float32 sum)."""
  t, k = weights.shape
  out = per_assignment.reshape(t, k, -1).astype(jnp.float32) * weights[..., None]
  return jnp.sum(out, axis=1).astype(per_assignment.dtype)


def dropless_experts(x: jax.Array, route: Routing, w1, w2, w3=None, w1_bias=None,
                     kernel: str = "windowed", tile: int | None = None) -> jax.Array:
  """Dropless MoE without the shared bias, all experts local: x [T, D] -> [T, D]."""
  t, _ = x.shape
  k = route.experts.shape[1]
  rows = jnp.repeat(x, k, axis=0)  # [T*K, D], assignment a = t * K + j.
  out = expert_rows(rows, route.experts.reshape(t * k), jnp.repeat(route.valid, k),
                    w1, w2, w3, w1_bias, kernel, tile)
  return combine(out, route.weights)


def capacity_experts(x: jax.Array, route: Routing, w1, w2, w3=None, w1_bias=None,
                     capacity: int = 1) -> tuple[jax.Array, jax.Array]:
  """Capacity-limited MoE without the shared bias, per group.

  x [G, S, D] with route fields shaped [G*S, ...] -> ([G, S, D], dropped count).
  """
  g, s, d = x.shape
  k = route.experts.shape[1]
  num_experts = w1.shape[0]
  experts = route.experts.reshape(g, s, k)
  valid = route.valid.reshape(g, s)
  weights = route.weights.reshape(g, s, k)
  # Rank-major priority: [G, K, S] flattened so first choices come first.
  one_hot = jax.nn.one_hot(jnp.swapaxes(experts, 1, 2), num_experts, dtype=jnp.int32)
  one_hot = one_hot * jnp.swapaxes(jnp.broadcast_to(valid[..., None], (g, s, k)), 1, 2)[..., None]
  flat = one_hot.reshape(g, k * s, num_experts)
  position = (jnp.cumsum(flat, axis=1) - flat).reshape(g, k, s, num_experts)
  position = jnp.swapaxes(position, 1, 2)  # [G, S, K, E]
  one_hot = jnp.swapaxes(one_hot, 1, 2)  # [G, S, K, E]
  kept = one_hot * (position < capacity)
  dropped = jnp.sum(one_hot) - jnp.sum(kept)
  slot = jax.nn.one_hot(jnp.sum(position * kept, axis=-1), capacity, dtype=x.dtype)  # [G,S,K,C]
  dispatch = jnp.einsum("gske,gskc->gsec", kept.astype(x.dtype), slot)  # [G, S, E, C]
  combine_weights = jnp.einsum("gske,gskc,gsk->gsec", kept.astype(jnp.float32),
                               slot.astype(jnp.float32), weights)
  expert_in = jnp.einsum("gsec,gsd->egcd", dispatch, x)  # [E, G, C, D]
  h1 = jnp.einsum("egcd,edf->egcf", expert_in, w1)
  if w1_bias is not None:
    h1 = h1 + w1_bias[:, None, None, :].astype(h1.dtype)
  h3 = None if w3 is None else jnp.einsum("egcd,edf->egcf", expert_in, w3)
  expert_out = jnp.einsum("egcf,efd->egcd", expert_activation(h1, h3), w2)
  y = jnp.einsum("gsec,egcd->gsd", combine_weights, expert_out.astype(jnp.float32))
  return y.astype(x.dtype), dropped


def capacity_for(capacity_factor: float, group_size: int, top_k: int, num_experts: int) -> int:
  """Slots per expert and group: ceil(capacity_factor * S * K / E), at most S."""
  c = math.ceil(capacity_factor * group_size * top_k / num_experts)
  return max(1, min(c, group_size))
