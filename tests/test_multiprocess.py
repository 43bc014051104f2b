"""Two processes on JAX's distributed runtime train exactly like one process."""

import json
import os
import socket
import subprocess
import sys

import pytest

from moe_embed import data
from moe_embed.train import trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(data_dir):
  """The trainer tests' tiny config, 4 steps, experts split over 2 devices."""
  from tests.test_trainer import _tiny
  return _tiny(data_dir, **{"total_steps": 4, "optimizer.warmup_steps": 1, "mesh.expert": 2})


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line)["loss"] for line in f]


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
  data_dir = data.ensure_default_data(str(tmp_path / "cache"))
  trainer.train_and_evaluate(tiny_config(data_dir), str(tmp_path / "single"))
  port = _free_port()
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  procs = [subprocess.Popen(
      [sys.executable, "tests/distributed_worker.py", str(port), str(i), "2", data_dir,
       str(tmp_path / "multi")], cwd=REPO, env=env, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True) for i in range(2)]
  outputs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-3000:]
  single, multi = _losses(tmp_path / "single"), _losses(tmp_path / "multi")
  assert len(single) == len(multi) == 4
  for a, b in zip(single, multi):
    assert abs(a - b) <= 1e-5 * max(1.0, abs(a)), (single, multi)
