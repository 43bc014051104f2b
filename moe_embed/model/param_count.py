"""Parameter counts read from a parameter tree (total, and active per token), and
the model FLOPs of a train step that MFU figures divide by.

An expert parameter is one whose first logical axis is 'exp'; a token uses
top_k of the num_experts slices of it, so it counts top_k / num_experts.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import numpy as np

from moe_embed.model import encoder
from moe_embed.model.config import EncoderConfig


def _leaves_with_names(boxed_params: Any) -> list[tuple[int, tuple]]:
  leaves = jax.tree_util.tree_leaves(
      boxed_params, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  out = []
  for leaf in leaves:
    names = leaf.names if isinstance(leaf, nn.Partitioned) else ()
    value = leaf.value if isinstance(leaf, nn.Partitioned) else leaf
    out.append((int(np.prod(value.shape)), tuple(names)))
  return out


def count_params(boxed_params: Any) -> int:
  """Total number of parameters (arrays or ShapeDtypeStructs)."""
  return sum(size for size, _ in _leaves_with_names(boxed_params))


def count_active_params(boxed_params: Any, config: EncoderConfig) -> int:
  """Parameters used per token: expert tensors scaled by top_k / num_experts."""
  total = 0
  for size, names in _leaves_with_names(boxed_params):
    if names and names[0] == "exp":
      if size % config.num_experts:
        raise ValueError(f"Expert tensor of {size} elements is not split in "
                         f"{config.num_experts} experts.")
      total += size // config.num_experts * config.top_k
    else:
      total += size
  return total


def abstract_params(config: EncoderConfig) -> Any:
  """Boxed parameter shapes of EmbeddingModel without allocating them."""
  return jax.eval_shape(lambda: encoder.init_params(config, jax.random.PRNGKey(0)))


def forward_flops(config: EncoderConfig, tokens: float, seq: int) -> float:
  """Matmul FLOPs of one forward pass over `tokens` real tokens in sequences of `seq`.

  Per token: the Q, K, V and output projections, attention over `seq` keys, and
  the (active) MLP; plus the projection head once per sequence. A batch of
  n sequences of length L is `forward_flops(config, n * L, L)`.
  """
  d, f = config.hidden_size, config.mlp_dim
  mats = 3 if config.mlp_activation == "swiglu" else 2
  per_token = 0.0
  for i in range(config.num_layers):
    per_token += 2 * 4 * d * d  # Q, K, V and output projections.
    per_token += 2 * 2 * seq * d  # Scores q.k and the weighted sum of values.
    if config.is_moe_layer(i):
      per_token += 2 * mats * d * f * config.top_k + 2 * d * config.num_experts
    else:
      per_token += 2 * mats * d * f
  return per_token * tokens + 2 * d * config.projection_dim * tokens / seq


def train_step_flops(config: EncoderConfig, batch: int, query_len: int, doc_len: int,
                     negatives: int = 0) -> float:
  """Model FLOPs of one train step: 3 x the forward matmuls (forward and backward), plus
  the loss logits. Remat and GradCache recompute forwards; those FLOPs are not counted."""
  forward = (forward_flops(config, batch * query_len, query_len)
             + forward_flops(config, batch * (1 + negatives) * doc_len, doc_len))
  logits = 2 * batch * batch * (1 + negatives) * config.embedding_dim
  return 3.0 * (forward + logits)


def real_forward_flops(config: EncoderConfig, lengths: Any) -> Any:
  """Matmul FLOPs of one forward pass over texts of `lengths` real tokens, each attending
  over its own tokens only: forward_flops of the real tokens, padding and packing slack
  left out. `lengths` is any int array (NumPy or jax, traced too); returns a scalar."""
  attention = 2 * 2 * config.hidden_size * config.num_layers  # Per token, per key.
  # Per token, without attention and the head.
  linear = forward_flops(config.replace(projection_dim=0), 1, 1) - attention
  n = lengths.astype("float32")
  head = 2 * config.hidden_size * config.projection_dim * (n > 0)
  return (linear * n + attention * n * n + head).sum()


def real_train_step_flops(config: EncoderConfig, query_lengths: Any, doc_lengths: Any) -> Any:
  """train_step_flops of the real tokens: query_lengths [B], doc_lengths [B, 1 + N]."""
  b, group = doc_lengths.shape[0], doc_lengths.shape[-1]
  logits = float(2 * b * b * group * config.embedding_dim)  # A Python int above 2**31
  # would not convert to a jax scalar (the pretrain recipe's batch of 16,384 has 4.1e11).
  return 3.0 * (real_forward_flops(config, query_lengths)
                + real_forward_flops(config, doc_lengths) + logits)
