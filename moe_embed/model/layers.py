"""Dense building blocks of the encoder: embeddings, rotary positions, attention, MLP.

Axis letters: B batch, L sequence, D model width, H heads, Dh head dim, F MLP width.
Every parameter carries logical axis names ('vocab', 'embed', 'heads', 'kv', 'mlp')
that `moe_embed.partitioning` maps onto mesh axes.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_embed.model import attention
from moe_embed.model.config import EncoderConfig
from moe_embed.moe import expert_parallel


def dtype_of(config: EncoderConfig) -> jnp.dtype:
  return jnp.dtype(config.dtype)


def normal_init(config: EncoderConfig, names: tuple[Optional[str], ...]):
  return nn.with_logical_partitioning(
      nn.initializers.normal(config.initializer_range), names)


def zeros_init(names: tuple[Optional[str], ...]):
  return nn.with_logical_partitioning(nn.initializers.zeros_init(), names)


def layer_norm(config: EncoderConfig, name: str) -> nn.LayerNorm:
  """LayerNorm with float32 statistics and parameters; output in compute dtype."""
  return nn.LayerNorm(
      epsilon=config.layer_norm_eps, dtype=dtype_of(config), param_dtype=jnp.float32,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
      bias_init=zeros_init(("embed",)), name=name)


def gelu(x: jax.Array) -> jax.Array:
  """Exact (erf) GELU, as BERT, XLM-R and nomic-bert use."""
  return jax.nn.gelu(x, approximate=False)


class Embeddings(nn.Module):
  """Word + token-type (+ learned absolute position) embeddings, then LayerNorm."""

  config: EncoderConfig

  @nn.compact
  def __call__(self, ids: jax.Array, token_type_ids: Optional[jax.Array] = None,
               positions: Optional[jax.Array] = None) -> jax.Array:
    """ids: int [B, L], positions: int [B, L] or None (= 0..L-1) -> [B, L, D]."""
    cfg = self.config
    dtype = dtype_of(cfg)
    x = nn.Embed(
        cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=jnp.float32,
        embedding_init=normal_init(cfg, ("vocab", "embed")), name="word_embeddings")(ids)
    if cfg.type_vocab_size:
      if token_type_ids is None:
        token_type_ids = jnp.zeros_like(ids)
      x = x + nn.Embed(
          cfg.type_vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=jnp.float32,
          embedding_init=normal_init(cfg, (None, "embed")),
          name="token_type_embeddings")(token_type_ids)
    if cfg.position_embedding == "learned":
      length = ids.shape[1]
      if length + cfg.position_offset > cfg.max_position_embeddings:
        raise ValueError(
            f"Sequence length {length} (+ position_offset {cfg.position_offset}) exceeds "
            f"max_position_embeddings={cfg.max_position_embeddings}; truncate inputs "
            "to fit.")
      # XLM-R numbers real tokens from pad_token_id + 1; with right padding that
      # is arange + offset for every non-padding token.
      if positions is None:
        positions = jnp.arange(length)[None, :]
      positions = positions + cfg.position_offset
      x = x + nn.Embed(
          cfg.max_position_embeddings, cfg.hidden_size, dtype=dtype,
          param_dtype=jnp.float32, embedding_init=normal_init(cfg, (None, "embed")),
          name="position_embeddings")(positions)
    return layer_norm(cfg, "layer_norm")(x)


def rotary_tables(length: int, rot_dim: int, base: float) -> tuple[jax.Array, jax.Array]:
  """cos, sin tables [L, rot_dim] (float32) for GPT-NeoX style (half-split) rotary."""
  inv_freq = 1.0 / (base ** (jnp.arange(0, rot_dim, 2, dtype=jnp.float32) / rot_dim))
  angles = jnp.arange(length, dtype=jnp.float32)[:, None] * inv_freq[None, :]  # [L, rot/2]
  angles = jnp.concatenate([angles, angles], axis=-1)  # [L, rot]
  return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates the first rot_dim features of x [B, L, H, Dh] (non-interleaved halves).

  cos, sin: [L, rot_dim], or [B, L, rot_dim] for per-token positions (packed rows).
  """
  rot_dim = cos.shape[-1]
  x_rot, x_pass = x[..., :rot_dim], x[..., rot_dim:]
  xf = x_rot.astype(jnp.float32)
  half = rot_dim // 2
  rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
  cos, sin = (cos[None, :, None, :], sin[None, :, None, :]) if cos.ndim == 2 else (
      cos[:, :, None, :], sin[:, :, None, :])
  out = (xf * cos + rotated * sin).astype(x.dtype)
  return jnp.concatenate([out, x_pass], axis=-1) if x_pass.shape[-1] else out


class Projection(nn.Module):
  """A linear map with a multi-axis kernel: einsum(`equation`, x, kernel) + bias.

  The kernel is created in its full shape (e.g. [D, H, Dh]) so that its logical
  axis names apply as is under a mesh.
  """

  equation: str
  kernel_shape: tuple[int, ...]
  kernel_axes: tuple[Optional[str], ...]
  bias_axes: tuple[Optional[str], ...]
  use_bias: bool
  config: EncoderConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dtype = dtype_of(self.config)
    kernel = self.param("kernel", normal_init(self.config, self.kernel_axes),
                        self.kernel_shape, jnp.float32)
    y = jnp.einsum(self.equation, x.astype(dtype), kernel.astype(dtype))
    if self.use_bias:
      bias_shape = self.kernel_shape[-len(self.bias_axes):]
      y = y + self.param("bias", zeros_init(self.bias_axes), bias_shape,
                         jnp.float32).astype(dtype)
    return y


class SelfAttention(nn.Module):
  """Bidirectional multi-head self-attention with a key padding mask, or within segments.

  The kernel is `config.attention` for the platform of the mesh's devices
  (`model.attention`): splash attention on TPU, XLA's masked attention elsewhere.
  """

  config: EncoderConfig

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array, segment_ids: Optional[jax.Array] = None,
               positions: Optional[jax.Array] = None) -> jax.Array:
    """x: [B, L, D], mask: bool [B, L] (True = real token), segment_ids / positions int
    [B, L] for packed rows (attention within a segment, rotary positions per segment)
    -> [B, L, D]."""
    cfg = self.config
    dtype = dtype_of(cfg)

    def proj(name):
      return Projection("bld,dhk->blhk", (cfg.hidden_size, cfg.num_heads, cfg.head_dim),
                        ("embed", "heads", "kv"), ("heads", "kv"), cfg.qkv_bias, cfg,
                        name=name)(x)

    q, k, v = proj("query"), proj("key"), proj("value")  # [B, L, H, Dh]
    if cfg.position_embedding == "rotary":
      rot_dim = int(cfg.head_dim * cfg.rotary_fraction)
      cos, sin = rotary_tables(x.shape[1], rot_dim, cfg.rotary_base)
      if positions is not None:
        cos, sin = cos[positions], sin[positions]  # [B, L, rot]
      q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    platform = expert_parallel.mesh_platform()
    if attention.kernel_for_platform(cfg.attention, platform) == "splash":
      mesh = expert_parallel.current_mesh()
      batch_axes = expert_parallel.placement(None, nn.logical_to_mesh_axes(("batch",))[0])
      out = attention.splash_attention(
          q, k, v, mask, segment_ids, mesh=mesh,
          batch_axes=batch_axes.token_axes if batch_axes is not None else (),
          interpret=platform != "tpu")  # [B, L, H, Dh]
    else:
      out = attention.xla_attention(q, k, v, mask, segment_ids)  # [B, L, H, Dh]
    return Projection("blhk,hkd->bld", (cfg.num_heads, cfg.head_dim, cfg.hidden_size),
                      ("heads", "kv", "embed"), ("embed",), True, cfg, name="out")(out)


class Mlp(nn.Module):
  """Dense MLP: fc2(gelu(fc1 x)), or fc2(silu(fc1 x) * gate x) for SwiGLU."""

  config: EncoderConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, L, D] -> [B, L, D]."""
    cfg = self.config
    dtype = dtype_of(cfg)

    def dense(features, names, name):
      return nn.Dense(
          features, use_bias=cfg.mlp_bias, dtype=dtype, param_dtype=jnp.float32,
          kernel_init=normal_init(cfg, names), bias_init=zeros_init(names[-1:]),
          name=name)

    h = dense(cfg.mlp_dim, ("embed", "mlp"), "fc1")(x)  # [B, L, F]
    if cfg.mlp_activation == "swiglu":
      h = jax.nn.silu(h) * dense(cfg.mlp_dim, ("embed", "mlp"), "gate")(x)
    else:
      h = gelu(h)
    h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
    return dense(cfg.hidden_size, ("mlp", "embed"), "fc2")(h)
