"""Training checkpoints with Orbax: the train state and the data iterator position.

A workdir holds `checkpoints/<step>/{state,data}` (async, the last N kept).
`restore` puts a state back onto the shardings of a target; `latest_params`
reads only the encoder parameters, onto one device, whatever mesh saved them.
The model metadata beside the checkpoints is `model_folder`'s business.
"""

from __future__ import annotations

import os
from typing import Any, Optional

from absl import logging
from etils import epath
import jax
import orbax.checkpoint as ocp

from moe_embed import storage

# Train-state fields that older checkpoints hold and the current state does not:
# restored (they must be read to match the saved tree) and then dropped.
RETIRED_STATE_FIELDS = ("rng",)


class CheckpointError(RuntimeError):
  """No checkpoint of a workdir could be restored, or a save failed."""


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(storage.absolute(workdir), "checkpoints")


def _handlers() -> dict:
  return {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler()}


def make_manager(workdir: str, keep: int = 3, async_save: bool = True) -> ocp.CheckpointManager:
  # Step folders are made before save() returns, so a workdir that cannot be
  # written fails there and then, not in a background thread minutes later.
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
      async_options=ocp.AsyncOptions(create_directories_asynchronously=False))
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                               item_handlers=_handlers())


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_state: dict) -> None:
  """Starts an (async) save of the train state and the iterator position."""
  try:
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)), force=True)
  except Exception as e:  # pylint: disable=broad-except  (whatever the writer raised)
    raise CheckpointError(f"Saving the checkpoint of step {step} to {manager.directory} "
                          f"failed: {type(e).__name__}: {' '.join(str(e).split())[:300]}") from e


def _saved_tree(manager: ocp.CheckpointManager, step: int) -> Any:
  metadata = manager.item_metadata(step)["state"]
  return metadata.tree if hasattr(metadata, "tree") else metadata


def restore(manager: ocp.CheckpointManager, abstract_state: Any) -> tuple[Any, dict, int]:
  """Restores (state, data_state, step) from the newest checkpoint that reads.

  A damaged checkpoint (a truncated array file, missing metadata) is logged,
  moved aside to `<step>.damaged` so that the step can be saved again, and the
  next older one is tried; CheckpointError when none restores.
  """
  failures = []
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      state, data_state = _restore_step(manager, abstract_state, step)
    except Exception as e:  # pylint: disable=broad-except  (any failure to read a step)
      reason = " ".join(str(e).split())[:300]
      logging.warning("Checkpoint %d in %s does not restore (%s: %s); trying an older one.",
                      step, manager.directory, type(e).__name__, reason)
      failures.append((step, e))
      continue
    for bad_step, _ in failures:
      _move_aside(manager, bad_step)
    if failures:
      manager.reload()
    return state, data_state, step
  raise CheckpointError(
      f"No checkpoint under {manager.directory} restores (tried steps "
      f"{[s for s, _ in failures]}; newest: {type(failures[0][1]).__name__}: "
      f"{' '.join(str(failures[0][1]).split())[:200]}). Move the checkpoints folder aside to "
      "start afresh.")


def _move_aside(manager: ocp.CheckpointManager, step: int) -> None:
  path = epath.Path(manager.directory) / str(step)
  if jax.process_index() == 0 and path.is_dir():
    target = path.parent / f"{step}.damaged"
    if target.exists():
      target.rmtree()
    path.rename(target)
    logging.warning("Moved the damaged checkpoint %s to %s.", path, target)


def _restore_step(manager: ocp.CheckpointManager, abstract_state: Any, step: int):
  saved = _saved_tree(manager, step)
  if saved is None:
    raise FileNotFoundError("its state metadata is missing")
  target = {f: getattr(abstract_state, f) for f in abstract_state.__dataclass_fields__}
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  for name in RETIRED_STATE_FIELDS:
    if isinstance(saved, dict) and name in saved and name not in target:
      target[name] = jax.tree.map(
          lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), saved[name])
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
  fields = {f: restored["state"][f] for f in abstract_state.__dataclass_fields__}
  return abstract_state.replace(**fields), dict(restored["data"])


def check_saves(manager: ocp.CheckpointManager) -> None:
  """Raises CheckpointError if an asynchronous save has failed since the last check."""
  try:
    manager.check_for_errors()
  except Exception as e:  # pylint: disable=broad-except  (whatever the writer raised)
    raise CheckpointError(f"Saving a checkpoint to {manager.directory} failed: "
                          f"{type(e).__name__}: {' '.join(str(e).split())[:300]}") from e


def latest_params(workdir: str) -> tuple[Any, int]:
  """(encoder params as numpy arrays, step) from a workdir's newest checkpoint.

  The saved state is restored onto one device from an explicit target, whatever
  mesh and device count saved it, and its encoder parameters are returned.
  """
  manager = ocp.CheckpointManager(
      checkpoint_dir(workdir), options=ocp.CheckpointManagerOptions(read_only=True),
      item_handlers=_handlers())
  step = manager.latest_step()
  if step is None:
    raise FileNotFoundError(f"No checkpoint under {checkpoint_dir(workdir)} yet.")
  tree = _saved_tree(manager, step)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), tree)
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
  params = jax.device_get(restored["state"]["params"]["model"])
  manager.close()
  return params, int(step)
