"""What the train-step benchmarks build: the MoE and its dense counterparts, their
parameters, random batches, model FLOPs, and the compiled step as the trainer builds it.

Used by benchmarks/train_step.py, memory.py, profile_step.py, packing.py and
accelerator_check.py (each puts this folder on sys.path); they measure with
benchmarks/timing.py.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import numpy as np

from moe_embed import partitioning
from moe_embed.model import config as model_config
from moe_embed.model import param_count
from moe_embed.model.encoder import EmbeddingModel, init_params
from moe_embed.model.upcycle import upcycle
from moe_embed.train import optimizer as optimizer_lib
from moe_embed.train import state as state_lib
from moe_embed.train import step as step_lib

import timing  # benchmarks/timing.py

MODELS = ("moe", "dense_active", "dense_total")


def model_configs(preset: str, dtype: str = "float32", num_experts: int = 8, top_k: int = 2,
                  every: int = 2, **overrides: Any) -> dict[str, model_config.EncoderConfig]:
  """{'moe', 'dense_active', 'dense_total'}: the MoE and its two dense counterparts."""
  dense = model_config.preset(preset, moe_every_n_layers=0, dtype=dtype, **overrides)
  moe = dense.replace(moe_every_n_layers=every, num_experts=num_experts, top_k=top_k)
  n_moe, n = len(moe.moe_layers), moe.num_layers

  def width(per_moe_layer):
    total = dense.mlp_dim * ((n - n_moe) + per_moe_layer * n_moe)
    if total % n:
      raise ValueError(f"No integer dense MLP width matches {per_moe_layer} experts per "
                       f"MoE layer for preset {preset!r}.")
    return total // n

  return {"moe": moe, "dense_active": dense.replace(mlp_dim=width(top_k)),
          "dense_total": dense.replace(mlp_dim=width(num_experts))}


def model_params(name: str, configs: dict, seed: int = 0):
  """Unboxed parameters; the MoE is upcycled from its dense preset, as the paper built it."""
  config = configs[name]
  if name != "moe":
    return nn.meta.unbox(init_params(config, jax.random.PRNGKey(seed)))
  dense = config.replace(moe_every_n_layers=0)
  dense_params = jax.device_get(nn.meta.unbox(init_params(dense, jax.random.PRNGKey(seed))))
  params, _ = upcycle(dense_params, dense, num_experts=config.num_experts,
                      top_k=config.top_k, moe_every_n_layers=config.moe_every_n_layers)
  return params


def param_counts(config: model_config.EncoderConfig) -> tuple[int, int]:
  """(total, active per token) parameters."""
  boxed = param_count.abstract_params(config)
  return param_count.count_params(boxed), param_count.count_active_params(boxed, config)


def make_batch(config: model_config.EncoderConfig, batch: int, seq: int, negatives: int = 0,
               seed: int = 0) -> dict[str, np.ndarray]:
  """Random ids, every token real (so model FLOPs are exact)."""
  rng = np.random.default_rng(seed)
  ids = lambda *shape: rng.integers(4, config.vocab_size, size=shape).astype(np.int32)
  out = {"query_ids": ids(batch, seq), "doc_ids": ids(batch, seq)}
  if negatives:
    out["neg_ids"] = ids(batch, negatives, seq)
  for key in list(out):
    out[key.replace("_ids", "_mask")] = np.ones(out[key].shape, np.int32)
  return out


def forward_flops_per_sequence(config: model_config.EncoderConfig, seq: int) -> float:
  """Matmul FLOPs of one forward pass over one sequence of `seq` real tokens."""
  return param_count.forward_flops(config, seq, seq)


def step_model_flops(config: model_config.EncoderConfig, batch: int, seq: int,
                     negatives: int = 0) -> float:
  """Model FLOPs of one train step (`param_count.train_step_flops`), queries and documents
  of `seq` tokens."""
  return param_count.train_step_flops(config, batch, seq, seq, negatives)


def step_tokens(batch: dict) -> int:
  return int(sum(np.sum(v) for k, v in batch.items() if k.endswith("_mask")))


def build_step(config: model_config.EncoderConfig, params, batch: dict, chunk: int,
               mesh=None, rules=partitioning.DEFAULT_RULES, total_steps: int = 1000):
  """(compiled step, state, sharded batch, compile seconds) as the trainer builds them."""
  mesh = mesh or partitioning.make_mesh(-1, 1)
  model = EmbeddingModel(config)
  optimizer, schedule = optimizer_lib.make_optimizer(
      optimizer_lib.OptimizerConfig(learning_rate=1e-5, warmup_steps=10), total_steps)
  state, _, state_shardings = state_lib.create_state(model, optimizer, mesh, rules, 0,
                                                     model_params=params)
  with partitioning.activate(mesh, rules):
    jitted, batch_sharding = step_lib.jit_train_step(
        model, optimizer, step_lib.LossConfig(), schedule, chunk, mesh, rules,
        state_shardings)
    data = {k: jax.device_put(v, batch_sharding) for k, v in batch.items()}
    compile_s, compiled = timing.timed(lambda: jitted.lower(state, data).compile())
  return compiled, state, data, compile_s


class Runner:
  """A compiled step that threads its donated state from call to call (time it with
  `timing.timed`)."""

  def __init__(self, compiled, state, data):
    self.compiled, self.state, self.data = compiled, state, data

  def __call__(self):
    self.state, metrics = self.compiled(self.state, self.data)
    return self.state, metrics
