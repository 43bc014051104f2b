"""Two processes on JAX's distributed runtime train exactly like one process."""

import os
import socket
import subprocess
import sys

import pytest

from moe_embed.train import trainer
from tests.runs import REPO, losses, multiprocess_config


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one(stdlib_data_dir, tmp_path):
  trainer.train_and_evaluate(multiprocess_config(stdlib_data_dir), str(tmp_path / "single"))
  port = _free_port()
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  procs = [subprocess.Popen(
      [sys.executable, "tests/distributed_worker.py", str(port), str(i), "2", stdlib_data_dir,
       str(tmp_path / "multi")], cwd=REPO, env=env, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True) for i in range(2)]
  outputs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-3000:]
  single = [loss for _, loss in losses(tmp_path / "single")]
  multi = [loss for _, loss in losses(tmp_path / "multi")]
  assert len(single) == len(multi) == 4
  for a, b in zip(single, multi):
    assert abs(a - b) <= 1e-5 * max(1.0, abs(a)), (single, multi)
