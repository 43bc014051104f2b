"""The training job: exact resume, bad-input errors, and an end-to-end run of launch/train.py."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from moe_embed.io import model_folder
from moe_embed.train import trainer
from tests.runs import losses, tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_interrupted_run_resumes_exactly(stdlib_data_dir, tmp_path):
  """6 steps in one run == 3 steps + restart + 3 steps: same parameters, same losses."""
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  config = tiny_config(stdlib_data_dir)  # Sharded over all 8 devices.
  trainer.train_and_evaluate(config, straight)
  out = trainer.train_and_evaluate(config, resumed, stop_at_step=3)
  assert out["step"] == 3 and out.get("preempted")
  trainer.train_and_evaluate(config, resumed)
  assert losses(straight) == losses(resumed)
  assert [step for step, _ in losses(straight)] == [1, 2, 3, 4, 5, 6]
  params_a, _, meta = model_folder.load_workdir(straight)
  params_b, _, _ = model_folder.load_workdir(resumed)
  assert meta["step"] == 6
  for a, b in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b)):
    np.testing.assert_array_equal(a, b)
  # The data position is in the checkpoint too.
  state = json.load(open(os.path.join(resumed, "checkpoints", "6", "data", "metadata")))
  assert state["step"] == 6


@pytest.mark.parametrize("overrides,message", [
    ({"data": "/nonexistent/pairs"}, "config.data='/nonexistent/pairs' does not exist"),
    ({"batch_size": 12}, "batch_size=12 is not divisible by the 8"),
    ({"loss.matryoshka_dims": (64, 128)},
     "loss.matryoshka_dims=128 must be between 1 and the embedding width 64"),
    ({"eval.dim": 65}, "eval.dim=65 must be between 1 and the embedding width 64"),
    ({"grad_cache_chunk": 24, "batch_size": 64}, "grad_cache_chunk=24 does not divide"),
    ({"eval.enabled": True, "eval.beir": "/nope"}, "eval.beir names folders"),
    ({"mesh.data": 3}, "mesh.data=3 x mesh.expert=1 = 3 devices, but 8"),
])
def test_bad_config_values_fail_before_compiling(stdlib_data_dir, tmp_path, overrides, message):
  config = tiny_config(stdlib_data_dir, **overrides)
  start = time.time()
  with pytest.raises(trainer.ConfigError, match=re.escape(message)):
    trainer.train_and_evaluate(config, str(tmp_path / "w"))
  assert time.time() - start < 30


def _run_train(args, env_extra=None, **kwargs):
  env = dict(os.environ, **(env_extra or {}))
  return subprocess.run([sys.executable, "launch/train.py", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, **kwargs)


def test_unknown_config_key_is_named(tmp_path):
  proc = _run_train(["--config=configs/finetune.py:tiny", f"--workdir={tmp_path}",
                     "--config.optimizer.learnig_rate=0.1"], timeout=120)
  assert proc.returncode != 0
  assert "learnig_rate" in proc.stderr


def test_launch_train_end_to_end_loss_falls(stdlib_data_dir, tmp_path):
  workdir = str(tmp_path / "run")
  proc = _run_train([
      "--config=configs/finetune.py:tiny", f"--workdir={workdir}",
      f"--config.data={stdlib_data_dir}", "--config.total_steps=60", "--config.batch_size=32",
      "--config.optimizer.warmup_steps=5", "--config.eval.every_steps=30",
      "--config.eval.at_start=False"], env_extra={"XLA_FLAGS": ""}, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Final nDCG@10 on the held-out split" in proc.stdout
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  train_rows = [r for r in rows if "loss" in r]
  for key in ("step", "loss", "lr", "temperature", "aux_loss", "tokens_per_s", "grad_norm",
              "layer_1/expert_fraction_min", "layer_3/expert_fraction_max"):
    assert key in train_rows[-1], key
  first, last = train_rows[0]["loss"], np.mean([r["loss"] for r in train_rows[-2:]])
  assert last < first - 0.5, (first, last)
  # Step 60 is both a periodic and the final evaluation: scored once.
  assert [r["step"] for r in rows if "eval/average/ndcg@10" in r] == [30, 60]
  config = json.load(open(os.path.join(workdir, "config.json")))
  assert config["total_steps"] == 60


@pytest.mark.slow
@pytest.mark.parametrize("signum,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_saves_a_checkpoint_then_resume(stdlib_data_dir, tmp_path, signum, code):
  workdir = str(tmp_path / "run")
  args = ["--config=configs/finetune.py:tiny", f"--workdir={workdir}",
          f"--config.data={stdlib_data_dir}", "--config.total_steps=100000",
          "--config.checkpoint_every_steps=100000", "--config.eval.enabled=False"]
  proc = subprocess.Popen([sys.executable, "launch/train.py", *args], cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  metrics = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 300
  while not (os.path.exists(metrics) and os.path.getsize(metrics)) and time.time() < deadline:
    time.sleep(1)
  proc.send_signal(signum)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == code, err[-2000:]  # Preempted: saved, rerun to resume.
  assert "rerun the same command to resume" in err
  saved = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())
  assert saved and saved[-1] >= 10


@pytest.mark.slow
def test_rows_by_source_compile_at_start_and_match_one_shape(stdlib_data_dir, tmp_path,
                                                            caplog):
  """input.pack_shapes=3: every row count compiles before step 1, and the run's losses
  are those of one shape for every source (the same texts, fewer empty rows)."""
  # At the tiny recipe's widths, code and modules need 6 rows per unit, the rest 5.
  overrides = {"total_steps": 4, "batch_size": 32, "input.pack_balance_steps": 2,
               "input.max_query_len": 32, "input.max_doc_len": 96}
  one, three = str(tmp_path / "one"), str(tmp_path / "three")
  trainer.train_and_evaluate(tiny_config(stdlib_data_dir, **overrides), one)
  caplog.set_level("INFO")
  trainer.train_and_evaluate(tiny_config(stdlib_data_dir, **overrides,
                                         **{"input.pack_shapes": 3}), three)
  compiled = re.findall(r"Compiled train step for (\d+) rows per packing unit", caplog.text)
  assert len(compiled) >= 2 and len(set(compiled)) == len(compiled)
  a, b = dict(losses(one)), dict(losses(three))
  assert sorted(a) == sorted(b) == [1, 2, 3, 4]
  np.testing.assert_allclose([b[s] for s in a], [a[s] for s in a], rtol=1e-5)
  share = lambda w: [json.loads(line).get("real_token_share")
                     for line in open(os.path.join(w, "metrics.jsonl"))]
  pairs = [(x, y) for x, y in zip(share(one), share(three)) if x is not None]
  assert len(pairs) == 4 and all(y >= x for x, y in pairs)


def test_packed_run_matches_padded_and_resumes_exactly(stdlib_data_dir, tmp_path):
  """input.packing with GradCache on 8 devices: the padded run's losses (float32, 1e-5);
  stopped at step 2 and resumed, the same losses and parameters bit for bit."""
  overrides = {"total_steps": 4, "grad_cache_chunk": 8}
  padded, straight, resumed = (str(tmp_path / n) for n in ("padded", "straight", "resumed"))
  trainer.train_and_evaluate(tiny_config(stdlib_data_dir, **overrides, **{"input.packing": False}),
                             padded)
  # Steps keep their own examples (no dealing between steps), so the texts are the padded run's.
  config = tiny_config(stdlib_data_dir, **overrides, **{"input.packing": True,
                                                        "input.pack_balance_steps": 1})
  trainer.train_and_evaluate(config, straight)
  assert trainer.train_and_evaluate(config, resumed, stop_at_step=2)["step"] == 2
  trainer.train_and_evaluate(config, resumed)
  assert losses(straight) == losses(resumed)
  # Dealt between blocks of 3 steps (the shipped configs deal 8): stopped mid-block at
  # step 2 and resumed, the same losses as straight through.
  dealt = tiny_config(stdlib_data_dir, **overrides, **{"input.packing": True,
                                                       "input.pack_balance_steps": 3})
  dealt_straight, dealt_resumed = str(tmp_path / "dealt"), str(tmp_path / "dealt_resumed")
  trainer.train_and_evaluate(dealt, dealt_straight)
  assert trainer.train_and_evaluate(dealt, dealt_resumed, stop_at_step=2)["step"] == 2
  trainer.train_and_evaluate(dealt, dealt_resumed)
  assert losses(dealt_straight) == losses(dealt_resumed)
  a, b = dict(losses(padded)), dict(losses(straight))
  assert sorted(a) == sorted(b) == [1, 2, 3, 4]
  np.testing.assert_allclose([b[s] for s in a], [a[s] for s in a], rtol=1e-5)
  for x, y in zip(jax.tree.leaves(model_folder.load_workdir(straight)[0]),
                  jax.tree.leaves(model_folder.load_workdir(resumed)[0])):
    np.testing.assert_array_equal(x, y)
  for workdir in (padded, straight):
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    share = [r["real_token_share"] for r in rows if "real_token_share" in r]
    assert len(share) == 4 and all(0 < s <= 1 for s in share)
