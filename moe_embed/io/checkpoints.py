"""Training checkpoints with Orbax: the train state, the data iterator position, a digest.

A workdir holds `checkpoints/<step>/{state,data,digest}` (async, the last N
kept). `digest` holds two 32-bit checksums of every array of the state,
computed on device before the save and checked after every restore, so that a
data file changed on disk (bit rot, a partial overwrite) is found rather than
trained on. Checkpoints written before digests existed restore unchecked.

Every reader of a workdir restores through `_restore_newest`: the newest
checkpoint that reads and matches its digest; a damaged one is logged in one
line and the next older one is used. `restore` (training) also moves the damaged
ones aside to `<step>.damaged`, so that the step can be saved again;
`latest_params` (encode, eval, export, upcycle, filter, mine) only reads, onto
one device, whatever mesh saved it. The model metadata beside the checkpoints
is `model_folder`'s business.
"""

from __future__ import annotations

import functools
import gc
import logging as py_logging
import os
import sys
from typing import Any, Callable, Optional

from absl import logging
from etils import epath
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from moe_embed import storage

# Train-state fields that older checkpoints hold and the current state does not:
# restored (they must be read to match the saved tree) and then dropped.
RETIRED_STATE_FIELDS = ("rng",)


DIGEST_VERSION = 1


class CheckpointError(RuntimeError):
  """No checkpoint of a workdir could be restored, or a save failed."""


class DamagedCheckpoint(CheckpointError):
  """A checkpoint's arrays read back differ from the digest saved with them."""


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(storage.absolute(workdir), "checkpoints")


def _handlers() -> dict:
  return {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
          "digest": ocp.JsonCheckpointHandler()}


def _leaf_checksum(x: jax.Array) -> jax.Array:
  """[2] uint32: the sum of the array's 32-bit words and their position-weighted sum.

  Integer sums wrap mod 2**32 and are exact in any order, so the result does
  not depend on the mesh or device count; a change to any single word always
  changes the first sum (the weights 2i+1 are odd, so also the second), and
  the second also catches words moved to other positions.
  """
  x = jnp.asarray(x)
  if x.dtype == jnp.bool_:
    words = x.astype(jnp.uint32)
  elif x.dtype.itemsize == 4:
    words = jax.lax.bitcast_convert_type(x, jnp.uint32)
  elif x.dtype.itemsize in (1, 2):
    unsigned = jnp.uint8 if x.dtype.itemsize == 1 else jnp.uint16
    words = jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
  else:  # 8-byte values (x64): two words each, along a new last axis.
    words = jax.lax.bitcast_convert_type(x, jnp.uint32)
  # The flat position of each word, built from iotas so that no reshape (and
  # no re-layout of a sharded array) is needed.
  index = jnp.zeros(words.shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(words.ndim)):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, words.shape, axis) * jnp.uint32(stride)
    stride *= words.shape[axis]
  weighted = words * (index * jnp.uint32(2) + jnp.uint32(1))
  return jnp.stack([jnp.sum(words, dtype=jnp.uint32), jnp.sum(weighted, dtype=jnp.uint32)])


@functools.partial(jax.jit)
def _checksums(tree):
  return jax.tree.map(_leaf_checksum, tree)


def _as_tree(state: Any) -> Any:
  """A train state (a dataclass) as the dict of fields its checkpoint holds."""
  if hasattr(state, "__dataclass_fields__"):
    return {f: getattr(state, f) for f in state.__dataclass_fields__}
  return state


def array_digest(state: Any) -> dict[str, str]:
  """{leaf path: 16 hex digits} of every array of `state`, computed where the arrays are."""
  tree = _as_tree(state)
  sums = jax.device_get(_checksums(tree))
  flat, _ = jax.tree_util.tree_flatten_with_path(sums)
  return {_path_name(path): "%08x%08x" % tuple(int(v) for v in np.asarray(value))
          for path, value in flat}


def _path_name(path) -> str:
  parts = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return "/".join(parts)


def check_digest(state: Any, saved: dict, where: str) -> None:
  """Raises DamagedCheckpoint naming the arrays of `state` that differ from `saved`."""
  want = saved.get("arrays", {})
  got = array_digest(state)
  bad = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
  if bad:
    more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
    raise DamagedCheckpoint(f"{where}: its arrays do not match the digest saved with them "
                            f"({bad[0]}{more})")


def _drop_closed_loop_reports() -> None:
  """Keeps "RuntimeError: Event loop is closed" reports of TensorStore off stderr.

  When a save or read fails, TensorStore completes the other pending writes
  after Orbax closed their event loop, and each completion's callback prints
  that traceback through sys.excepthook (hundreds on a full disk). The failure
  itself is raised to the caller; other exceptions still reach the hook.
  """
  previous = sys.excepthook
  if getattr(previous, "_drops_closed_loops", False):
    return

  def hook(kind, value, tb):
    if isinstance(value, RuntimeError) and str(value) == "Event loop is closed":
      return
    previous(kind, value, tb)

  hook._drops_closed_loops = True
  sys.excepthook = hook


def make_manager(workdir: str, keep: int = 3, async_save: bool = True) -> ocp.CheckpointManager:
  # Step folders are made before save() returns, so a workdir that cannot be
  # written fails there and then, not in a background thread minutes later.
  _drop_closed_loop_reports()
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
      async_options=ocp.AsyncOptions(create_directories_asynchronously=False))
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                               item_handlers=_handlers())


# id(manager) -> the step of its last save started, named when that save fails later.
_LAST_SAVE: dict[int, int] = {}


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_state: dict) -> None:
  """Starts an (async) save of the train state, the iterator position and their digest.

  A failure of the previous save is raised first, naming that save's step.
  """
  try:
    with _quiet_readers():
      manager.wait_until_finished()  # What manager.save does first, but raising here
  except Exception as e:  # pylint: disable=broad-except  names the step that failed.
    raise _save_failed(manager, e, step) from e
  check_saves(manager, step)
  _LAST_SAVE[id(manager)] = step
  try:
    digest = {"version": DIGEST_VERSION, "arrays": array_digest(state)}
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
        digest=ocp.args.JsonSave(digest)), force=True)
  except Exception as e:  # pylint: disable=broad-except  (whatever the writer raised)
    raise CheckpointError(f"Saving the checkpoint of step {step} to {manager.directory} "
                          f"failed: {type(e).__name__}: {' '.join(str(e).split())[:300]}") from e


def _saved_tree(manager: ocp.CheckpointManager, step: int) -> Any:
  metadata = manager.item_metadata(step)["state"]
  return metadata.tree if hasattr(metadata, "tree") else metadata


def restore(manager: ocp.CheckpointManager, abstract_state: Any) -> tuple[Any, dict, int]:
  """Restores (state, data_state, step) from the newest checkpoint that reads.

  A damaged checkpoint (a truncated array file, missing metadata, arrays that
  differ from their digest) is logged in one line, moved aside to
  `<step>.damaged` so that the step can be saved again, and the next older one
  is tried; CheckpointError when none restores.
  """
  (state, data_state), step, damaged = _restore_newest(
      manager, lambda s: _restore_step(manager, abstract_state, s))
  for bad_step in damaged:
    _move_aside(manager, bad_step)
  if damaged:
    manager.reload()
  return state, data_state, step


def _restore_newest(manager: ocp.CheckpointManager, restore_step: Callable[[int], Any]
                    ) -> tuple[Any, int, list[int]]:
  """(restore_step(step), step, damaged steps) for the newest step that restores."""
  failures = []
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      with _quiet_readers():
        restored = restore_step(step)
    except Exception as e:  # pylint: disable=broad-except  (any failure to read a step)
      logging.warning("Checkpoint %d in %s is damaged (%s); %s", step, manager.directory,
                      _reason(e), "trying an older one.")
      failures.append((step, e))
      continue
    if failures:
      logging.warning("Restored checkpoint %d in %s in place of the damaged %s.", step,
                      manager.directory, [s for s, _ in failures])
    return restored, step, [s for s, _ in failures]
  if not failures:
    raise FileNotFoundError(f"No checkpoint under {manager.directory} yet.")
  raise CheckpointError(
      f"No checkpoint under {manager.directory} restores (tried steps "
      f"{[s for s, _ in failures]}; newest: {_reason(failures[0][1])}). Move the "
      "checkpoints folder aside to start afresh.")


def _reason(error: BaseException, limit: int = 300) -> str:
  """What went wrong reading a checkpoint, on one line."""
  if isinstance(error, DamagedCheckpoint):
    return str(error).split(": ", 1)[-1]
  return f"{type(error).__name__}: {' '.join(str(error).split())[:limit]}"


class _quiet_readers:
  """Silences Orbax's own reports while a step that may be damaged is read.

  A failed read is reported once by `_restore_newest`; Orbax would otherwise
  log it again and leave one coroutine per array whose exception Python prints
  as "Exception ignored in ..." with a TensorStore spec (tens of lines each).
  """

  _NAMES = ("orbax", "absl")

  def __enter__(self):
    self._loggers = [py_logging.getLogger(n) for n in self._NAMES]
    self._levels = [l.level for l in self._loggers]
    for l in self._loggers:
      l.setLevel(py_logging.CRITICAL)
    # TensorStore reports a read it finishes after Orbax closed its event loop
    # through sys.excepthook ("Event loop is closed"); nothing is lost by it.
    self._hooks = sys.unraisablehook, sys.excepthook
    sys.unraisablehook = lambda unraisable: None
    sys.excepthook = lambda *args: None
    return self

  def __exit__(self, *exc):
    gc.collect()  # The abandoned coroutines are reported when they are collected.
    sys.unraisablehook, sys.excepthook = self._hooks
    for l, level in zip(self._loggers, self._levels):
      l.setLevel(level)


def _move_aside(manager: ocp.CheckpointManager, step: int) -> None:
  path = epath.Path(manager.directory) / str(step)
  if jax.process_index() == 0 and path.is_dir():
    target = path.parent / f"{step}.damaged"
    if target.exists():
      target.rmtree()
    path.rename(target)
    logging.warning("Moved the damaged checkpoint %s to %s.", path, target)


def _has_digest(manager: ocp.CheckpointManager, step: int) -> bool:
  return (epath.Path(manager.directory) / str(step) / "digest").is_dir()


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
  items = dict(state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore())
  if _has_digest(manager, step):
    items["digest"] = ocp.args.JsonRestore()
  restored = manager.restore(step, args=ocp.args.Composite(**items))
  if "digest" in items:
    check_digest(restored["state"], restored["digest"], f"checkpoint {step}")
  fields = {f: restored["state"][f] for f in abstract_state.__dataclass_fields__}
  return abstract_state.replace(**fields), dict(restored["data"])


def check_saves(manager: ocp.CheckpointManager, step: Optional[int] = None) -> None:
  """Raises CheckpointError if an asynchronous save has failed since the last check.

  The trainer calls it after every step, so a run stops at the step where a
  failed save (a full disk, a lost bucket) is found, and the message names the
  step whose save failed and the one the run stopped at.
  """
  try:
    with _quiet_readers():
      manager.check_for_errors()
  except Exception as e:  # pylint: disable=broad-except  (whatever the writer raised)
    raise _save_failed(manager, e, step) from e


def _save_failed(manager: ocp.CheckpointManager, error: BaseException,
                 step: Optional[int]) -> CheckpointError:
  saved = _LAST_SAVE.get(id(manager))
  what = f"the checkpoint of step {saved}" if saved is not None else "a checkpoint"
  where = f"; the run stopped at step {step}" if step is not None else ""
  return CheckpointError(
      f"Saving {what} to {manager.directory} failed ({type(error).__name__}: "
      f"{' '.join(str(error).split())[:300]}){where}. Free space or fix the workdir, then "
      "rerun to resume from the newest checkpoint that restores.")


def latest_params(workdir: str) -> tuple[Any, int]:
  """(encoder params as numpy arrays, step) from a workdir's newest checkpoint that restores.

  The saved state is restored onto one device from an explicit target, whatever
  mesh and device count saved it, checked against its digest, and its encoder
  parameters are returned. A damaged newest checkpoint is reported in one line
  and the next older one is read; nothing in the workdir is changed.
  """
  manager = ocp.CheckpointManager(
      checkpoint_dir(workdir), options=ocp.CheckpointManagerOptions(read_only=True),
      item_handlers=_handlers())
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])

  def read(step):
    tree = _saved_tree(manager, step)
    if tree is None:
      raise FileNotFoundError("its state metadata is missing")
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                          tree)
    items = dict(state=ocp.args.StandardRestore(target))
    if _has_digest(manager, step):
      items["digest"] = ocp.args.JsonRestore()
    restored = manager.restore(step, args=ocp.args.Composite(**items))
    if "digest" in items:
      check_digest(restored["state"], restored["digest"], f"checkpoint {step}")
    return jax.device_get(restored["state"]["params"]["model"])

  try:
    params, step, _ = _restore_newest(manager, read)
  finally:
    manager.close()
  return params, int(step)
