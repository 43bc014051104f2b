"""The Flax MoE layer: router and expert parameters around the pure `moe_embed.moe` functions.

Replaces the dense MLP in every MoE layer of the encoder. The experts compute
w2^T act(w1 x [+ w1_bias]); their k outputs are summed with the router weights
and one shared output bias is added, as in the released model. The dispatch
path is `config.moe_dispatch`: 'dropless' (expert-parallel when the logical-axis
rules put 'exp' on mesh axes of more than one device, exchanging tokens as
`config.expert_exchange` says; with experts on every device, each device runs
its own tokens; without a mesh, local) or 'capacity'.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_embed.model.config import EncoderConfig
from moe_embed.model.layers import dtype_of
from moe_embed.moe import expert_parallel, experts, grouped_matmul, router_stats, routing


class RouterKernel(nn.Module):
  """Holds the bias-free router matrix as `router/kernel` [D, E]."""

  config: EncoderConfig

  @nn.compact
  def __call__(self) -> jax.Array:
    cfg = self.config
    return self.param("kernel", nn.with_logical_partitioning(
        nn.initializers.normal(cfg.router_init_std), ("embed", None)),
        (cfg.hidden_size, cfg.num_experts), jnp.float32)


def _expert_placement() -> expert_parallel.Placement | None:
  """Where experts and tokens live, from the current mesh and logical-axis rules."""
  return expert_parallel.placement(nn.logical_to_mesh_axes(("exp",))[0],
                                   nn.logical_to_mesh_axes(("batch",))[0])


class MoeMlp(nn.Module):
  """Routed experts in place of a dense MLP; returns (output, router metrics)."""

  config: EncoderConfig

  @nn.compact
  def __call__(self, x: jax.Array, token_mask: jax.Array):
    """x [B, L, D], token_mask bool [B, L] -> (y [B, L, D], float32 metrics).

    The metrics are the layer's additive statistics (`router_stats.STAT_KEYS`)
    and the readable numbers derived from them.
    """
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
    flat = x.reshape(b * length, d)  # [T, D]
    route = routing.route(flat, kernel, token_mask.reshape(-1).astype(bool), cfg.top_k,
                          cfg.renormalize_topk)
    cast = lambda w: None if w is None else w.astype(dtype)
    dropped = None
    if cfg.moe_dispatch == "dropless":
      # Kernel and exchange for the devices of the mesh (not the host's backend).
      platform = expert_parallel.mesh_platform()
      kernel_name = grouped_matmul.kernel_for_backend(cfg.grouped_matmul, platform)
      where = _expert_placement()
      if where is not None and where.applies(flat.shape[0]):
        y = expert_parallel.dropless(flat, route, cast(w1), cast(w2), cast(w3), w1_bias,
                                     where=where, kernel=kernel_name,
                                     exchange=expert_parallel.exchange_for_backend(
                                         cfg.expert_exchange, platform))
      elif where is not None and where.applies_per_device(flat.shape[0]):
        y = expert_parallel.per_device(flat, route, cast(w1), cast(w2), cast(w3), w1_bias,
                                       where=where, kernel=kernel_name)
      else:
        y = experts.dropless_experts(flat, route, cast(w1), cast(w2), cast(w3), w1_bias,
                                     kernel_name)
    else:
      capacity = experts.capacity_for(cfg.capacity_factor, length, cfg.top_k, cfg.num_experts)
      y, dropped = experts.capacity_experts(x, route, cast(w1), cast(w2), cast(w3), w1_bias,
                                            capacity)
    y = y.reshape(b, length, d) + bias.astype(dtype)
    stats = router_stats.statistics(route, dropped)
    return y, {**stats, **router_stats.layer_metrics(stats, cfg.top_k)}
