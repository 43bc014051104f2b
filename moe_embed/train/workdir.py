"""What a run checks about its workdir before it writes there: its architecture, its lock.

  check_resume    a workdir with checkpoints was created with an architecture
                  (model.json); a config that changes a field that gives the
                  checkpoints their meaning is refused in one line naming each
                  field with its old and new value, before anything is written.
                  Runtime fields (encoder.RUNTIME_FIELDS) may change; other
                  changed settings (batch size, schedule) are logged.
  WorkdirLock     one run per workdir: WORKDIR/lock.json names the holder's
                  host and pid and carries a heartbeat; a second run stops in
                  one line naming the holder; a lock whose holder is gone (its
                  pid is dead on this host, or its heartbeat is older than
                  `stale_after_s`) is taken over with a line saying so.
  default_workdir where a run without --workdir writes: one folder per config.

Locks work on local disks and gs:// alike (an object store has no exclusive
create, so a lock there is written, then read back after a moment: of two runs
that wrote at once, the one whose write did not survive stops).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from typing import Any, Optional

from absl import logging
from etils import epath
import ml_collections

from moe_embed import storage
from moe_embed.model.config import RUNTIME_FIELDS, EncoderConfig
from moe_embed.train.config import ConfigError

LOCK_FILE = "lock.json"
HEARTBEAT_S = 30.0  # How often a running job rewrites its lock's heartbeat.
STALE_AFTER_S = 300.0  # A lock whose heartbeat is older than this is taken over.
DEFAULT_ROOT_ENV = "MOE_EMBED_WORKDIRS"  # Where default workdirs go; ~/moe_embed_runs else.


class WorkdirLocked(RuntimeError):
  """Another run holds the workdir's lock."""


def has_checkpoints(workdir: str) -> bool:
  from moe_embed.io import checkpoints
  folder = epath.Path(checkpoints.checkpoint_dir(workdir))
  return folder.is_dir() and any(p.name.isdigit() for p in folder.iterdir())


def architecture_changes(recorded: EncoderConfig, new: EncoderConfig) -> list[str]:
  """'encoder.FIELD OLD -> NEW' for every field outside RUNTIME_FIELDS that differs."""
  old, now = recorded.to_dict(), new.to_dict()
  return [f"encoder.{k} {old[k]!r} -> {now[k]!r}" for k in old
          if k not in RUNTIME_FIELDS and old[k] != now[k]]


def check_resume(workdir: str, encoder_config: EncoderConfig,
                 config: ml_collections.ConfigDict) -> None:
  """Refuses a changed architecture on a workdir with checkpoints; logs other changes.

  Reads only: call it before the run writes anything in `workdir`.
  """
  from moe_embed.io import model_folder
  if not (has_meta_safe(workdir) and has_checkpoints(workdir)):
    return
  recorded, _ = model_folder.read_meta(workdir)
  changes = architecture_changes(recorded, encoder_config)
  if changes:
    raise ConfigError(
        f"{workdir} holds checkpoints of another architecture: {', '.join(changes)}. Rerun "
        "with the recorded values, or give a new --workdir to train this one.")
  old_path = epath.Path(workdir) / "config.json"
  if old_path.exists():
    try:
      old = _flatten(json.loads(old_path.read_text()))
    except ValueError:
      return
    new = _flatten(json.loads(config.to_json_best_effort()))
    changed = [f"{k} {old[k]!r} -> {new[k]!r}" for k in sorted(set(old) & set(new))
               if old[k] != new[k]]
    if changed:
      logging.warning("Resuming %s with changed settings: %s.", workdir, ", ".join(changed))


def has_meta_safe(workdir: str) -> bool:
  from moe_embed.io import model_folder
  return epath.Path(workdir).is_dir() and model_folder.has_meta(workdir)


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  """{'a.b': leaf} of a nested dict."""
  if not isinstance(tree, dict):
    return {prefix: tree}
  out: dict[str, Any] = {}
  for key, value in tree.items():
    out.update(_flatten(value, f"{prefix}{key}.") if isinstance(value, dict)
               else {f"{prefix}{key}": value})
  return out


def default_workdir(config_path: str) -> str:
  """~/moe_embed_runs/<config name>[_<argument>] (or under $MOE_EMBED_WORKDIRS)."""
  path, _, arg = config_path.partition(":")
  name = os.path.splitext(os.path.basename(path))[0] + (f"_{arg}" if arg else "")
  name = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
  root = os.environ.get(DEFAULT_ROOT_ENV) or os.path.join(os.path.expanduser("~"),
                                                          "moe_embed_runs")
  return os.path.join(root, name)


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


class WorkdirLock:
  """WORKDIR/lock.json held by one run: acquire(), a heartbeat thread, release()."""

  def __init__(self, workdir: str, heartbeat_s: float = HEARTBEAT_S,
               stale_after_s: float = STALE_AFTER_S, settle_s: Optional[float] = None):
    self.workdir = workdir
    self.path = epath.Path(workdir) / LOCK_FILE
    self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
    # On an object store, how long to wait before reading the lock back.
    self.settle_s = (1.0 if storage.is_remote(workdir) else 0.0) if settle_s is None else settle_s
    self.token = uuid.uuid4().hex
    self.record = {"host": socket.gethostname(), "pid": os.getpid(), "token": self.token,
                   "started": time.time(), "heartbeat": time.time()}
    self._stop = threading.Event()
    self._thread: Optional[threading.Thread] = None

  def holder(self) -> Optional[dict]:
    try:
      return json.loads(self.path.read_text())
    except FileNotFoundError:
      return None
    except ValueError:  # A torn write: nobody can be shown to hold it.
      return {}

  def _stale(self, held: dict) -> Optional[str]:
    """Why the lock `held` is stale, or None when its holder may still be running."""
    if not held:
      return "it is unreadable"
    age = time.time() - float(held.get("heartbeat", 0))
    if held.get("host") == socket.gethostname() and not _pid_alive(int(held.get("pid", -1))):
      return f"pid {held.get('pid')} is no longer running"
    if age > self.stale_after_s:
      return f"its last heartbeat was {age:.0f} s ago"
    return None

  def acquire(self) -> "WorkdirLock":
    epath.Path(self.workdir).mkdir(parents=True, exist_ok=True)
    held = self.holder()
    if held is not None:
      why = self._stale(held)
      if why is None:
        raise WorkdirLocked(self._refusal(held))
      logging.warning("Taking over the lock of %s from host %s pid %s: %s.", self.workdir,
                      held.get("host", "?"), held.get("pid", "?"), why)
      self._write()
    elif not self._create():
      raise WorkdirLocked(self._refusal(self.holder() or {}))
    if self.settle_s:
      time.sleep(self.settle_s)
    now = self.holder() or {}
    if now.get("token") != self.token:
      raise WorkdirLocked(self._refusal(now))
    self._thread = threading.Thread(target=self._beat, name="workdir-lock", daemon=True)
    self._thread.start()
    return self

  def _refusal(self, held: dict) -> str:
    age = time.time() - float(held.get("heartbeat", time.time()))
    return (f"{self.workdir} is in use by another run: host {held.get('host', '?')} pid "
            f"{held.get('pid', '?')} (heartbeat {age:.0f} s ago, lock {self.path}). Wait for "
            "it to end or stop it, or give another --workdir.")

  def _create(self) -> bool:
    """Creates the lock file if none exists; False if another run created it first."""
    data = json.dumps(self.record)
    if storage.is_remote(self.workdir):
      self.path.write_text(data)
      return True
    try:
      fd = os.open(os.fspath(self.path), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, "w") as f:
      f.write(data)
    return True

  def _write(self) -> None:
    storage.write_atomic(self.path, json.dumps(self.record))

  def _beat(self) -> None:
    while not self._stop.wait(self.heartbeat_s):
      try:
        held = self.holder() or {}
        if held.get("token") != self.token:
          logging.error("The lock of %s was taken over by host %s pid %s.", self.workdir,
                        held.get("host", "?"), held.get("pid", "?"))
          return
        self.record["heartbeat"] = time.time()
        self._write()
      except Exception as e:  # pylint: disable=broad-except  (a heartbeat must not kill the run)
        logging.warning("Could not refresh the lock of %s: %s", self.workdir, e)

  def release(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=10)
      self._thread = None
    try:
      if (self.holder() or {}).get("token") == self.token:
        self.path.unlink()
    except FileNotFoundError:
      pass

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()
