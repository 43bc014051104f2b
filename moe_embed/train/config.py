"""From an ml_collections run config to checked, structured values: model, loss, optimizer, input.

Everything here runs before any data is read or anything compiles, so a
config that cannot work fails in seconds with the field and value named.
"""

from __future__ import annotations

import os
from typing import Any

from absl import logging
from etils import epath
import jax
import ml_collections

from moe_embed import partitioning, validation
from moe_embed.data.pipeline import InputConfig
from moe_embed.model import config as model_config
from moe_embed.train.optimizer import OptimizerConfig
from moe_embed.train.step import LossConfig


class ConfigError(ValueError):
  """A config value that cannot work; raised before anything compiles."""


def check_config(config: ml_collections.ConfigDict) -> None:
  """Value checks that need no data or devices."""
  for name in ("total_steps", "log_every_steps", "checkpoint_every_steps", "batch_size"):
    if int(config[name]) <= 0:
      raise ConfigError(f"{name}={config[name]} must be positive.")
  if config.data and not epath.Path(config.data).exists():
    raise ConfigError(f"config.data={config.data!r} does not exist; build it with "
                      "launch/prepare_data.py or leave it empty for the embedded corpus.")
  if config.loss.temperature <= 0:
    raise ConfigError(f"loss.temperature={config.loss.temperature} must be positive.")


def resolve_encoder(config: ml_collections.ConfigDict
                    ) -> tuple[model_config.EncoderConfig, Any, dict]:
  """(EncoderConfig, initial params or None, model meta) from `config.model`."""
  model = config.model
  overrides = dict(config.encoder)
  if model in model_config.PRESETS:
    return model_config.EncoderConfig.from_dict(overrides), None, {}
  if not epath.Path(model).exists():
    raise ConfigError(
        f"config.model={model!r} is neither a preset {sorted(model_config.PRESETS)} nor an "
        "existing model folder.")
  from moe_embed.io import model_folder  # Checkpoint importers: only for a model folder.
  params, loaded, meta = model_folder.load_any(model)
  runtime = {k: v for k, v in overrides.items() if k in model_config.RUNTIME_FIELDS}
  ignored = sorted(k for k, v in overrides.items()
                   if k not in runtime and getattr(loaded, k, v) != v)
  if ignored:
    logging.warning("config.model is a folder; its architecture wins over config.encoder "
                    "fields %s.", ignored)
  return loaded.replace(**runtime), params, meta


def loss_config(config: ml_collections.ConfigDict, embedding_dim: int) -> LossConfig:
  """`config.loss` checked against the embedding width."""
  dims = tuple(int(d) for d in config.loss.matryoshka_dims)
  weights = tuple(float(w) for w in config.loss.matryoshka_weights) or (1.0,) * len(dims)
  if len(weights) != len(dims):
    raise ConfigError(
        f"loss.matryoshka_weights has {len(weights)} entries but loss.matryoshka_dims "
        f"has {len(dims)}.")
  _check_widths(dims, embedding_dim, "loss.matryoshka_dims")
  return LossConfig(
      temperature=float(config.loss.temperature),
      learn_temperature=bool(config.loss.learn_temperature),
      symmetric=bool(config.loss.symmetric), matryoshka_dims=dims,
      matryoshka_weights=weights,
      load_balancing_coef=float(config.loss.load_balancing_coef),
      z_loss_coef=float(config.loss.z_loss_coef))


def check_eval(config: ml_collections.ConfigDict, embedding_dim: int) -> None:
  """`config.eval.dim` (0: the full width) fits the embedding, before any training step."""
  if config.eval.dim:
    _check_widths([int(config.eval.dim)], embedding_dim, "eval.dim")


def _check_widths(widths, embedding_dim: int, name: str) -> None:
  try:
    validation.check_widths(widths, embedding_dim, name)
  except ValueError as e:
    raise ConfigError(str(e)) from None


def optimizer_config(config: ml_collections.ConfigDict) -> OptimizerConfig:
  try:
    return OptimizerConfig.from_mapping(config.optimizer.to_dict())
  except (KeyError, ValueError) as e:
    raise ConfigError(str(e).strip("'\"")) from None


def input_config(config: ml_collections.ConfigDict) -> InputConfig:
  """`config.input` as the data pipeline's InputConfig.

  `input.source_prefixes` (source -> any of query_prefix, doc_prefix,
  max_query_len, max_doc_len) wins over the dataset's per-source values, which
  win over the global input fields; its keys and lengths are checked here, and
  with `config.data` set its source names against the dataset's.
  """
  try:
    inputs = InputConfig.from_mapping(config.input.to_dict())
    if config.data and inputs.source_prefixes:
      from moe_embed.data import dataset  # Reads only dataset_info.json.
      info_path = os.path.join(config.data, dataset.INFO)
      inputs.check_sources(list(dataset.read_info(config.data)["sources"]), info_path)
    return inputs
  except (KeyError, ValueError) as e:
    raise ConfigError(str(e).strip("'\"")) from None


def mesh_and_rules(config: ml_collections.ConfigDict, devices=None):
  """(mesh, logical-axis rules) of `config.mesh` over `devices` (default: all devices)."""
  try:
    return (partitioning.make_mesh(config.mesh.data, config.mesh.expert, devices),
            partitioning.rules_from_config(config.mesh.rules))
  except ValueError as e:
    raise ConfigError(str(e)) from None


def check_batch(config: ml_collections.ConfigDict, shards: int) -> None:
  """Batch divisibility checks, with the values named."""
  b = config.batch_size
  if b <= 0 or b % shards:
    raise ConfigError(
        f"batch_size={b} is not divisible by the {shards} data-parallel shards of the mesh "
        f"(mesh.data x mesh.expert); use a multiple of {shards}.")
  if b % jax.process_count():
    raise ConfigError(f"batch_size={b} is not divisible by {jax.process_count()} processes.")
  chunk = config.grad_cache_chunk
  if chunk:
    if chunk < 0 or b % chunk:
      raise ConfigError(f"grad_cache_chunk={chunk} does not divide batch_size={b}.")
    if chunk % shards:
      raise ConfigError(
          f"grad_cache_chunk={chunk} is not divisible by the {shards} data-parallel shards; "
          "each chunk is spread over every device.")


def check_experts(encoder: model_config.EncoderConfig, expert_axis: int) -> None:
  """The experts split evenly over the mesh's expert axis, with both fields named."""
  if encoder.moe_every_n_layers and encoder.num_experts % expert_axis:
    raise ConfigError(
        f"encoder.num_experts={encoder.num_experts} does not split over mesh.expert="
        f"{expert_axis} devices; set mesh.expert to a divisor of {encoder.num_experts} or "
        f"encoder.num_experts to a multiple of {expert_axis}.")
