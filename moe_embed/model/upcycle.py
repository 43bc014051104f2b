"""Sparse upcycling: a dense encoder becomes an MoE encoder, as the paper built its model.

In every MoE layer the dense MLP is copied into all experts and a fresh router
is drawn from Normal(0, router_init_std). The released model's settings drop
the dense MLP biases (the shared expert bias starts at zero); with
`keep_biases` the fc1 bias is kept per expert and the fc2 bias becomes the
shared bias, so that with renormalised top-k weights the upcycled model
computes exactly the dense model's function at step 0. `noise_std` adds
Gaussian noise to each expert copy to break their symmetry (off by default, as
in the paper).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from moe_embed.model.config import EncoderConfig


def upcycle(params: Any, config: EncoderConfig, *, num_experts: int = 8, top_k: int = 2,
            moe_every_n_layers: int = 2, renormalize_topk: bool = False,
            keep_biases: bool = False, noise_std: float = 0.0,
            seed: int = 0) -> tuple[dict, EncoderConfig]:
  """(MoE params, MoE config) from a dense model's params and config."""
  if config.moe_every_n_layers:
    raise ValueError("The model is already a mixture of experts (moe_every_n_layers="
                     f"{config.moe_every_n_layers}).")
  if config.mlp_activation != "gelu":
    raise ValueError("Upcycling supports GELU MLPs (the nomic-bert MoE layout).")
  if keep_biases and not config.mlp_bias:
    raise ValueError("keep_biases needs a dense model with MLP biases.")
  new_config = config.replace(
      moe_every_n_layers=moe_every_n_layers, num_experts=num_experts, top_k=top_k,
      renormalize_topk=renormalize_topk, expert_w1_bias=keep_biases)
  rng = np.random.default_rng(seed)
  encoder = dict(params["encoder"])
  for i in new_config.moe_layers:
    layer = dict(encoder[f"layer_{i}"])
    dense = layer["mlp"]
    w1 = np.asarray(dense["fc1"]["kernel"], np.float32)  # [D, F]
    w2 = np.asarray(dense["fc2"]["kernel"], np.float32)  # [F, D]
    moe = {
        "router": {"kernel": rng.normal(0.0, config.router_init_std,
                                        (config.hidden_size, num_experts)).astype(np.float32)},
        "w1": np.repeat(w1[None], num_experts, axis=0),
        "w2": np.repeat(w2[None], num_experts, axis=0),
        "bias": (np.asarray(dense["fc2"]["bias"], np.float32) if keep_biases
                 else np.zeros(config.hidden_size, np.float32)),
    }
    if keep_biases:
      moe["w1_bias"] = np.repeat(np.asarray(dense["fc1"]["bias"], np.float32)[None],
                                 num_experts, axis=0)
    if noise_std:
      for key in ("w1", "w2"):
        moe[key] = (moe[key] + rng.normal(0.0, noise_std, moe[key].shape)).astype(np.float32)
    layer["mlp"] = moe
    encoder[f"layer_{i}"] = layer
  return {**params, "encoder": encoder}, new_config
