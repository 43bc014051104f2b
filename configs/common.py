"""Fields shared by the pretraining and finetuning configs, each with its meaning.

Config files call `base_config(arg)`: `arg` is the one string after the colon in
`--config=configs/finetune.py:ARG`, e.g. `tiny` or `model=nomic_v2_moe,steps=2000`.

Each default is written once. The run's own fields are set and commented here; the
sections the trainer turns into dataclasses (encoder, input, optimizer, loss) take
their fields, defaults and comments from those dataclasses (`section`), and this
file states only where a run differs from them. The stage configs state only where
they differ from this file.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import typing

import ml_collections

from moe_embed import validation
from moe_embed.data.pipeline import InputConfig
from moe_embed.model import config as model_config
from moe_embed.train.optimizer import OptimizerConfig
from moe_embed.train.step import LossConfig

_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


def _parse_value(key: str, text: str, default):
  """`text` as the type of `default`; booleans strictly, numbers with a clear error."""
  if default is None or isinstance(default, str):
    return text
  if isinstance(default, bool):
    if text.lower() in _TRUE:
      return True
    if text.lower() in _FALSE:
      return False
    raise ValueError(f"Config argument {key}={text!r} is not a boolean; use true or false.")
  try:
    return type(default)(text)
  except ValueError:
    raise ValueError(f"Config argument {key}={text!r} is not a {type(default).__name__}.") from None


def parse_arg(arg: str | None, **defaults):
  """Parses 'a,b=c' into a ConfigDict over `defaults`; a bare word sets `model`."""
  out = ml_collections.ConfigDict(defaults)
  for part in filter(None, (arg or "").split(",")):
    key, _, value = part.partition("=")
    if not value:
      key, value = "model", key
    validation.check_fields([key], out.keys(), "config argument")
    out[key] = _parse_value(key, value, defaults[key])
  return out


def section(cls) -> ml_collections.ConfigDict:
  """The fields of dataclass `cls` at their defaults, as a config section.

  A field whose default is None and whose type is an optional mapping becomes a
  dict placeholder, so that a config file can set a dict there.
  """
  hints = typing.get_type_hints(cls)
  out = ml_collections.ConfigDict()
  for field in dataclasses.fields(cls):
    if field.default is dataclasses.MISSING:
      raise TypeError(f"{cls.__name__}.{field.name} has no default to take.")
    if field.default is None:
      kinds = [typing.get_origin(t) or t for t in typing.get_args(hints[field.name])]
      if not any(isinstance(k, type) and issubclass(k, collections.abc.Mapping)
                 for k in kinds):
        raise TypeError(f"{cls.__name__}.{field.name}: a None default must be an "
                        "optional mapping.")
      out[field.name] = ml_collections.config_dict.placeholder(dict)
    else:
      out[field.name] = field.default
  return out


def encoder_fields(model: str) -> ml_collections.ConfigDict:
  """Architecture fields of a preset; only the runtime ones for a model folder."""
  if model in model_config.PRESETS:
    fields = model_config.preset(model).to_dict()
  else:
    defaults = model_config.EncoderConfig().to_dict()
    fields = {k: defaults[k] for k in model_config.RUNTIME_FIELDS}
  return ml_collections.ConfigDict(fields)


def base_config(model: str) -> ml_collections.ConfigDict:
  """Defaults for every field; the stage configs change what differs."""
  c = ml_collections.ConfigDict()
  # What to train: a preset name ('tiny', 'minilm', 'nomic_v2_moe') for fresh
  # weights, or a model folder (imported, upcycled) to start from.
  c.model = model
  # Architecture (see moe_embed/model/config.py). For a model folder, only the
  # runtime fields (dtype, remat, moe_dispatch, capacity_factor, grouped_matmul,
  # expert_exchange, attention) apply.
  c.encoder = encoder_fields(model)
  c.encoder.dtype = "bfloat16"  # Compute dtype; params, router and loss stay float32.
  # Tokenizer: '' = the model folder's, else the dataset's SentencePiece model.
  c.tokenizer = ""
  # Dataset folder made by launch/prepare_data.py; '' = the embedded stdlib corpus
  # (built and cached on first use).
  c.data = ""

  # What a batch holds: lengths, hard negatives, prompts, source mix, packing
  # (InputConfig in moe_embed/data/pipeline.py: each field's default and meaning).
  c.input = section(InputConfig)

  c.seed = 0  # Parameter init, data order.
  c.batch_size = 256  # Global batch (queries per step), split over the mesh.
  c.total_steps = 1000  # Train steps; the learning-rate schedule spans them.
  c.log_every_steps = 10  # Metrics to metrics.jsonl and TensorBoard.
  # Peak FLOP/s of one device, for mfu (model FLOPs of the real tokens / peak) in
  # metrics.jsonl; 0 = a TPU's bfloat16 peak from its generation, no mfu elsewhere.
  c.peak_flops_per_device = 0.0
  c.checkpoint_every_steps = 500  # Save a checkpoint every N steps (and at the end).
  c.keep_checkpoints = 3  # Most recent checkpoints kept.
  # GradCache chunk (queries per chunk); 0 = plain step. Must divide batch_size.
  c.grad_cache_chunk = 0

  # AdamW and its schedule (OptimizerConfig in moe_embed/train/optimizer.py).
  c.optimizer = section(OptimizerConfig)
  # Contrastive loss, Matryoshka widths, router losses (LossConfig in
  # moe_embed/train/step.py).
  c.loss = section(LossConfig)

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # Data-parallel size; -1 = all devices not used by 'expert'.
  c.mesh.expert = 1  # Expert-parallel size.
  # Logical axis -> mesh axes rules; None = moe_embed.partitioning.DEFAULT_RULES.
  c.mesh.rules = ml_collections.config_dict.placeholder(tuple)

  c.eval = ml_collections.ConfigDict()
  c.eval.enabled = True  # Score retrieval at the end (and every_steps).
  # BEIR folders (comma-separated); '' = the dataset's held-out split if it has one.
  c.eval.beir = ""
  c.eval.every_steps = 0  # Evaluate during training every N steps; 0 = only at the end.
  c.eval.batch_size = 128  # Texts per encoding batch.
  c.eval.dim = 0  # Matryoshka dim to evaluate; 0 = full.
  c.eval.max_length = 256  # Tokens per text when encoding for evaluation.
  c.eval.at_start = True  # Also score the untrained model, to compare.
  return c


def apply_tiny(c: ml_collections.ConfigDict) -> None:
  """Shrinks a config to train on a laptop CPU in a few minutes."""
  c.encoder.dtype = "float32"  # bf16 matmuls are slow on most CPUs.
  c.input.max_query_len = 32
  c.input.max_doc_len = 96
  c.batch_size = 64
  c.total_steps = 300
  c.checkpoint_every_steps = 100
  c.optimizer.learning_rate = 2e-3
  c.optimizer.warmup_steps = 30
  c.loss.temperature = 0.05
  c.eval.batch_size = 256
  c.eval.max_length = 128
  # Hard negatives where the data has them; the embedded corpus has none.
  c.input.negatives_required = False
