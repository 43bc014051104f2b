"""Training checkpoints with Orbax: train state plus the data iterator position.

A workdir holds `checkpoints/<step>/{state,data}` (async, the last N kept),
`config.json` (the resolved training config) and `model.json` (the encoder
architecture, tokenizer and prefixes), so any command that takes `--model` can
load the latest parameters from a workdir.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

from moe_embed.model_config import EncoderConfig

MODEL_META = "model.json"


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def make_manager(workdir: str, keep: int = 3, async_save: bool = True) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                               item_names=("state", "data"))


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_state: dict) -> None:
  """Starts an (async) save of the train state and the iterator position."""
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)), force=True)


def restore(manager: ocp.CheckpointManager, abstract_state: Any,
            step: Optional[int] = None) -> tuple[Any, dict, int]:
  """Restores (state, data_state, step) onto the shardings of `abstract_state`."""
  step = manager.latest_step() if step is None else step
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
  return restored["state"], dict(restored["data"]), step


def write_model_meta(workdir: str, config: EncoderConfig, **meta: Any) -> None:
  """Writes model.json: what is needed to rebuild the encoder from a checkpoint."""
  with open(os.path.join(workdir, MODEL_META), "w") as f:
    json.dump({"encoder": config.to_dict(), **meta}, f, indent=2)


def is_workdir(path: str) -> bool:
  return os.path.isdir(checkpoint_dir(path)) and os.path.exists(os.path.join(path, MODEL_META))


def latest_params(workdir: str) -> tuple[Any, EncoderConfig, dict]:
  """(encoder params as numpy arrays, EncoderConfig, meta) from a workdir's latest checkpoint.

  meta has 'query_prefix', 'doc_prefix', 'max_length', 'tokenizer' and 'step'.
  """
  meta_path = os.path.join(workdir, MODEL_META)
  if not os.path.exists(meta_path):
    raise FileNotFoundError(f"{workdir} is not a training workdir: {meta_path} is missing.")
  with open(meta_path) as f:
    meta = json.load(f)
  config = EncoderConfig.from_dict(meta.pop("encoder"))
  manager = ocp.CheckpointManager(
      checkpoint_dir(workdir), options=ocp.CheckpointManagerOptions(read_only=True),
      item_handlers={"state": ocp.StandardCheckpointHandler(),
                     "data": ocp.JsonCheckpointHandler()})
  step = manager.latest_step()
  if step is None:
    raise FileNotFoundError(f"No checkpoint under {checkpoint_dir(workdir)} yet.")
  # Onto one device, whatever mesh and device count saved it.
  metadata = manager.item_metadata(step)["state"]
  tree = metadata.tree if hasattr(metadata, "tree") else metadata
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), tree)
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
  params = jax.device_get(restored["state"]["params"]["model"])
  manager.close()
  meta["step"] = int(step)
  return params, config, meta
