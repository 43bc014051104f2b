"""Metrics to `metrics.jsonl` (one JSON object per logged step) and TensorBoard.

The workdir may be a gs:// folder: an object store cannot append, so the JSONL
file is rewritten whole at each write (one row per logged step keeps it small),
atomically, so that a crash leaves the previous version.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Mapping, Optional

from etils import epath
import numpy as np

from moe_embed import storage

METRICS_FILE = "metrics.jsonl"


class MetricWriter:
  """Appends scalar metrics to WORKDIR/metrics.jsonl and TensorBoard event files.

  Only process 0 writes; other processes get a writer that does nothing.
  """

  def __init__(self, workdir: str, enabled: bool = True, resume_step: Optional[int] = None):
    """`resume_step`: the step a run resumes from; rows after it are dropped."""
    self.enabled = enabled
    self._tb = None
    if not enabled:
      return
    self._path = epath.Path(workdir) / METRICS_FILE
    self._path.parent.mkdir(parents=True, exist_ok=True)
    self._lines, dropped = _read_lines(self._path, resume_step)
    if dropped:  # A torn last line or a lost run's rows: gone now, not at the next write.
      storage.write_atomic(self._path, "".join(self._lines))
    self._closed = False
    # Event files are appended to, which an object store cannot do: for a gs://
    # workdir they are written to a local folder and uploaded whole at each write.
    events = str(epath.Path(workdir) / "tensorboard")
    self._events_remote = events if storage.is_remote(events) else None
    if self._events_remote:
      events = tempfile.mkdtemp(prefix="moe_embed_events_")
    try:
      from tensorboardX import SummaryWriter
      # purge_step hides the events of steps >= it that an earlier run wrote.
      self._tb = SummaryWriter(
          events, purge_step=None if resume_step is None else resume_step + 1)
    except ImportError:  # TensorBoard is optional; the JSONL log is not.
      self._tb = None

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    row = {"step": int(step)}
    for key, value in metrics.items():
      value = np.asarray(value)
      if value.size == 1:
        row[key] = float(value)
    self._lines.append(json.dumps(row) + "\n")
    storage.write_atomic(self._path, "".join(self._lines))
    if self._tb is not None:
      for key, value in row.items():
        if key != "step":  # TensorBoard tags allow no '@'.
          self._tb.add_scalar(key.replace("@", "_at_"), value, step)
      self._tb.flush()
      self._upload_events()

  def close(self) -> None:
    if not self.enabled or self._closed:
      return
    self._closed = True
    if self._tb is not None:
      self._tb.close()
      self._upload_events()
      if self._events_remote:
        shutil.rmtree(self._tb.logdir, ignore_errors=True)

  def _upload_events(self) -> None:
    if not self._events_remote:
      return
    for name in os.listdir(self._tb.logdir):
      local = os.path.join(self._tb.logdir, name)
      (epath.Path(self._events_remote) / name).write_bytes(open(local, "rb").read())


def _read_lines(path: epath.Path, resume_step: Optional[int]) -> tuple[list[str], int]:
  """(rows already logged, how many lines were dropped): a line cut by a crash, and
  with `resume_step` the rows logged after it."""
  if not path.exists():
    return [], 0
  kept, dropped = [], 0
  for line in path.read_text().splitlines(keepends=True):
    try:
      row = json.loads(line)
    except ValueError:  # A line cut by a crash mid-write.
      dropped += 1
      continue
    if resume_step is not None and row.get("step", 0) > resume_step:
      dropped += 1
      continue
    kept.append(line if line.endswith("\n") else line + "\n")
  return kept, dropped
