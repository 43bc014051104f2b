"""Parameter counts read from a parameter tree: total, and active per token.

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
