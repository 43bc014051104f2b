"""Metrics to `metrics.jsonl` (one JSON object per logged step) and TensorBoard."""

from __future__ import annotations

import json
import os
from typing import Mapping, Optional

import numpy as np


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
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "metrics.jsonl")
    if resume_step is not None and os.path.exists(path):
      _truncate_after(path, resume_step)
    self._jsonl = open(path, "a")
    try:
      from tensorboardX import SummaryWriter
      # purge_step hides the events of steps >= it that an earlier run wrote.
      self._tb = SummaryWriter(
          os.path.join(workdir, "tensorboard"),
          purge_step=None if resume_step is None else resume_step + 1)
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
    self._jsonl.write(json.dumps(row) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for key, value in row.items():
        if key != "step":  # TensorBoard tags allow no '@'.
          self._tb.add_scalar(key.replace("@", "_at_"), value, step)
      self._tb.flush()

  def close(self) -> None:
    if not self.enabled or self._jsonl.closed:
      return
    self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


def _truncate_after(path: str, step: int) -> None:
  """Rewrites metrics.jsonl without the rows logged after `step` (atomically)."""
  with open(path) as f:
    lines = f.readlines()
  kept = []
  for line in lines:
    try:
      if json.loads(line).get("step", 0) > step:
        continue
    except ValueError:  # A line cut by a crash mid-write.
      continue
    kept.append(line)
  if len(kept) != len(lines):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(kept)
    os.replace(tmp, path)
