"""The Mixture-of-Experts MLP: router, dispatch, experts, combine.

Axis letters: B batch, L sequence, T = B*L tokens, D model width, F expert
hidden width, E experts, K experts per token, M = T*K assignments, P grouped
buffer rows, G groups (sequences) and C capacity per group in the capacity path.

Each expert computes w2^T act(w1 x [+ w1_bias]) (act = exact GELU, or SwiGLU
with a third matrix w3); the k expert outputs are summed with the router
weights and one shared output bias is added, as in the released model.

Two dispatch paths behind one module, chosen by `config.moe_dispatch`:
- 'dropless': a counting sort of the M (token, expert) assignments into
  expert-contiguous groups, a grouped matmul per expert matrix, the inverse
  gather, and the weighted sum. No token is ever dropped.
- 'capacity': static-shape one-hot einsum dispatch per sequence (vmoe style)
  with capacity C = ceil(capacity_factor * L * K / E). Assignments are served
  first by choice rank (every token's first choice before any second choice),
  then by position; those beyond capacity are dropped and counted.
Padding tokens are not routed: they take no capacity and no statistic.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_embed import expert_parallel, grouped_matmul, routing
from moe_embed.layers import dtype_of, gelu
from moe_embed.model_config import EncoderConfig


def expert_activation(h1: jax.Array, h3: jax.Array | None) -> jax.Array:
  """GELU of the first projection, or SwiGLU when a gate projection is given."""
  return gelu(h1) if h3 is None else jax.nn.silu(h1) * h3


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


def dropless_experts(x: jax.Array, route: routing.Routing, w1, w2, w3=None, w1_bias=None,
                     kernel: str = "windowed", tile: int | None = None) -> jax.Array:
  """Dropless MoE without the shared bias, all experts local: x [T, D] -> [T, D]."""
  t, _ = x.shape
  k = route.experts.shape[1]
  rows = jnp.repeat(x, k, axis=0)  # [T*K, D], assignment a = t * K + j.
  out = expert_rows(rows, route.experts.reshape(t * k), jnp.repeat(route.valid, k),
                    w1, w2, w3, w1_bias, kernel, tile)
  return combine(out, route.weights)


def capacity_experts(x: jax.Array, route: routing.Routing, w1, w2, w3=None, w1_bias=None,
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
  combine = jnp.einsum("gske,gskc,gsk->gsec", kept.astype(jnp.float32), slot.astype(jnp.float32),
                       weights)
  expert_in = jnp.einsum("gsec,gsd->egcd", dispatch, x)  # [E, G, C, D]
  h1 = jnp.einsum("egcd,edf->egcf", expert_in, w1)
  if w1_bias is not None:
    h1 = h1 + w1_bias[:, None, None, :].astype(h1.dtype)
  h3 = None if w3 is None else jnp.einsum("egcd,edf->egcf", expert_in, w3)
  expert_out = jnp.einsum("egcf,efd->egcd", expert_activation(h1, h3), w2)
  y = jnp.einsum("gsec,egcd->gsd", combine, expert_out.astype(jnp.float32))
  return y.astype(x.dtype), dropped


def capacity_for(config: EncoderConfig, group_size: int) -> int:
  """Slots per expert and group: ceil(capacity_factor * S * K / E), at most S."""
  c = math.ceil(config.capacity_factor * group_size * config.top_k / config.num_experts)
  return max(1, min(c, group_size))


class RouterKernel(nn.Module):
  """Holds the bias-free router matrix as `router/kernel` [D, E]."""

  config: EncoderConfig

  @nn.compact
  def __call__(self) -> jax.Array:
    cfg = self.config
    return self.param("kernel", nn.with_logical_partitioning(
        nn.initializers.normal(cfg.router_init_std), ("embed", None)),
        (cfg.hidden_size, cfg.num_experts), jnp.float32)


class MoeMlp(nn.Module):
  """Routed experts in place of a dense MLP; returns (output, router metrics)."""

  config: EncoderConfig

  @nn.compact
  def __call__(self, x: jax.Array, token_mask: jax.Array):
    """x [B, L, D], token_mask bool [B, L] -> (y [B, L, D], metrics of float32)."""
    cfg = self.config
    dtype = dtype_of(cfg)
    e, d, f = cfg.num_experts, cfg.hidden_size, cfg.mlp_dim

    def expert_param(name, shape, names):
      return self.param(name, nn.with_logical_partitioning(
          nn.initializers.normal(cfg.initializer_range), names), shape, jnp.float32)

    kernel = RouterKernel(cfg, name="router")()  # [D, E] float32
    w1 = expert_param("w1", (e, d, f), ("exp", "embed", "mlp"))
    w2 = expert_param("w2", (e, f, d), ("exp", "mlp", "embed"))
    w3 = expert_param("w3", (e, d, f), ("exp", "embed", "mlp")) \
        if cfg.mlp_activation == "swiglu" else None
    w1_bias = self.param("w1_bias", nn.with_logical_partitioning(
        nn.initializers.zeros_init(), ("exp", "mlp")), (e, f), jnp.float32) \
        if cfg.expert_w1_bias else None
    bias = self.param("bias", nn.with_logical_partitioning(
        nn.initializers.zeros_init(), ("embed",)), (d,), jnp.float32)

    b, length, _ = x.shape
    x = x.astype(dtype)
    flat = x.reshape(b * length, d)
    route = routing.route(flat, kernel, token_mask.reshape(-1).astype(bool), cfg.top_k,
                          cfg.renormalize_topk)
    cast = lambda w: None if w is None else w.astype(dtype)
    if cfg.moe_dispatch == "dropless":
      kernel_name = grouped_matmul.kernel_for_backend(cfg.grouped_matmul)
      mesh = expert_parallel.current_mesh()
      if expert_parallel.applies(mesh, flat.shape[0]):
        y = expert_parallel.dropless(flat, route, cast(w1), cast(w2), cast(w3), w1_bias,
                                     mesh=mesh, kernel=kernel_name)
      else:
        y = dropless_experts(flat, route, cast(w1), cast(w2), cast(w3), w1_bias, kernel_name)
      stats = routing.statistics(route)
    else:
      y, dropped = capacity_experts(x, route, cast(w1), cast(w2), cast(w3), w1_bias,
                                    capacity_for(cfg, length))
      stats = routing.statistics(route, dropped)
    y = y.reshape(b, length, d) + bias.astype(dtype)
    return y, routing.metrics(stats, cfg.top_k)
