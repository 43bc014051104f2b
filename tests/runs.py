"""Training configs, launcher calls and metrics reads shared by the tests that train.

  FIXTURE          tests/data/workdir_v0: a workdir stopped at step 2 of 4, its dataset
                   (FIXTURE_DATA), a native model folder and the losses of its resumption
  fixture_config   the config that workdir was trained with; SMALL: the same model and
                   batch as launch/train.py flags
  tiny_config      the finetune tiny preset shrunk to seconds per run on any dataset;
                   multiprocess_config: the run tests/test_multiprocess makes on 1 and 2 processes
  launch           a launch/ script as a user runs it; one_line_error: its expected failure
  losses           [(step, loss)] of a workdir's metrics.jsonl (local or gs://)
"""

import json
import os
import subprocess
import sys

from etils import epath

from configs import finetune
from moe_embed import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(REPO, "tests", "data", "workdir_v0")
FIXTURE_DATA = os.path.join(FIXTURE, "data")

# The fixture workdir's model size, so that a run takes seconds.
SMALL = ["--config.encoder.vocab_size=256", "--config.encoder.hidden_size=16",
         "--config.encoder.num_heads=2", "--config.encoder.mlp_dim=32",
         "--config.encoder.num_layers=2", "--config.encoder.num_experts=4",
         "--config.batch_size=8", "--config.input.max_query_len=16",
         "--config.input.max_doc_len=24", "--config.total_steps=4",
         "--config.log_every_steps=1", "--config.checkpoint_every_steps=2",
         "--config.optimizer.warmup_steps=1", "--config.eval.at_start=False",
         "--config.eval.batch_size=8", "--config.eval.max_length=24"]


def fixture_config(root=FIXTURE):
  """The config the fixture's workdir was trained with; its data under `root`/data."""
  c = finetune.get_config("tiny")
  c.data = os.path.join(root, "data")
  c.encoder.vocab_size = 256
  c.encoder.hidden_size = 16
  c.encoder.num_heads = 2
  c.encoder.mlp_dim = 32
  c.encoder.num_layers = 2
  c.encoder.num_experts = 4
  c.batch_size = 8
  c.input.max_query_len = 16
  c.input.max_doc_len = 24
  c.total_steps = 4
  c.log_every_steps = 1
  c.checkpoint_every_steps = 100
  c.keep_checkpoints = 1
  c.optimizer.warmup_steps = 1
  c.eval.enabled = False
  c.input.packing = False  # The fixture was trained padded.
  return c


def tiny_config(data_dir, **overrides):
  """The tiny preset on `data_dir`: batch 16, 6 steps, no evaluation; dotted-key overrides."""
  c = finetune.get_config("tiny")
  c.data = data_dir
  c.batch_size = 16
  c.input.max_query_len = 16
  c.input.max_doc_len = 32
  c.total_steps = 6
  c.log_every_steps = 1
  c.checkpoint_every_steps = 100
  c.optimizer.warmup_steps = 2
  c.eval.enabled = False
  for key, value in overrides.items():
    node = c
    *path, last = key.split(".")
    for part in path:
      node = node[part]
    node[last] = value
  return c


def multiprocess_config(data_dir):
  """tiny_config for 4 steps, experts split over 2 devices: one run of tests/test_multiprocess."""
  return tiny_config(data_dir, **{"total_steps": 4, "optimizer.warmup_steps": 1,
                                  "mesh.expert": 2})


def launch(script, *args, cwd=REPO, timeout=600):
  """Runs launch/`script` in a subprocess on 8 CPU devices, without tracebacks."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             PYTHONPATH=REPO)
  env.pop(cli.TRACEBACK_ENV, None)
  return subprocess.run([sys.executable, os.path.join(REPO, "launch", script), *args],
                        cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def one_line_error(proc, *needles):
  """The launcher failed with exit 1 and one error line, no traceback, holding `needles`."""
  assert proc.returncode == 1, proc.stderr[-2000:]
  lines = [l for l in proc.stderr.splitlines() if l.startswith(("Error", "Config error",
                                                                 "Flag error"))]
  assert len(lines) == 1, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  for needle in needles:
    assert needle in lines[0], lines[0]
  return lines[0]


def losses(workdir):
  """[(step, loss)] of the training rows of `workdir`/metrics.jsonl, in file order."""
  rows = [json.loads(line) for line in
          epath.Path(workdir, "metrics.jsonl").read_text().splitlines()]
  return [(r["step"], r["loss"]) for r in rows if "loss" in r]
