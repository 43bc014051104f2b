"""Faults and bad inputs: each ends in one clear line, and nothing good is lost or overwritten."""

import gzip
import json
import os

import jax
import numpy as np
import pytest

from moe_embed import data
from moe_embed.io import checkpoints, model_folder
from moe_embed.train import trainer
from tests.beir_folders import one_pair_beir
from tests.runs import FIXTURE, FIXTURE_DATA, fixture_config, launch, losses, one_line_error


def test_divergence_stops_without_saving_a_non_finite_state(tmp_path):
  c = fixture_config(FIXTURE)
  c.optimizer.learning_rate = 1e4
  c.total_steps, c.checkpoint_every_steps, c.keep_checkpoints = 12, 2, 10
  workdir = str(tmp_path / "w")
  with pytest.raises(trainer.TrainingDiverged, match=r"diverged at step \d+: loss=nan.*"
                     r"last good checkpoint is step \d+"):
    trainer.train_and_evaluate(c, workdir)
  params, _, meta = model_folder.load_workdir(workdir)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))
  assert all(np.isfinite(loss) for _, loss in losses(workdir))
  assert meta["step"] < 12


def test_negative_learning_rate_is_a_config_error(tmp_path):
  proc = launch("train.py", "--config=configs/finetune.py:tiny", f"--workdir={tmp_path}",
                 "--config.optimizer.learning_rate=-1e-3", f"--config.data={FIXTURE_DATA}")
  one_line_error(proc, "optimizer.learning_rate=-0.001 must be positive")


def test_misspelt_config_field_and_argument_are_one_line(tmp_path):
  proc = launch("train.py", "--config=configs/finetune.py:tiny", f"--workdir={tmp_path}",
                 "--config.batch_szie=3")
  one_line_error(proc, 'Did you mean "batch_size"')
  proc = launch("train.py", "--config=configs/finetune.py:tiny,stpes=5", f"--workdir={tmp_path}")
  one_line_error(proc, "Unknown config argument 'stpes'")


def _train(workdir, steps, **overrides):
  c = fixture_config(FIXTURE)
  c.total_steps = steps
  c.checkpoint_every_steps = 2
  c.keep_checkpoints = 5
  for key, value in overrides.items():
    c[key] = value
  return trainer.train_and_evaluate(c, workdir)


def test_damaged_newest_checkpoint_falls_back_and_the_log_matches_the_state(tmp_path):
  straight, damaged = str(tmp_path / "straight"), str(tmp_path / "damaged")
  _train(straight, 6)
  _train(damaged, 6)
  # Step 6 loses its array data (a crash while it was written), step 4 its metadata.
  step6 = os.path.join(damaged, "checkpoints", "6", "state")
  for folder, _, files in os.walk(step6):
    for name in files:
      if "ocdbt" in folder or name == "manifest.ocdbt":
        open(os.path.join(folder, name), "wb").close()
  os.remove(os.path.join(damaged, "checkpoints", "4", "state", "_METADATA"))
  out = _train(damaged, 6)  # Resumes from step 2 and trains steps 3-6 again.
  assert out["step"] == 6
  got, want = losses(damaged), losses(straight)
  assert [s for s, _ in got] == [1, 2, 3, 4, 5, 6]  # No duplicate rows for replayed steps.
  np.testing.assert_allclose([l for _, l in got], [l for _, l in want], rtol=1e-5)
  assert os.path.isdir(os.path.join(damaged, "checkpoints", "6.damaged"))
  a, _, meta = model_folder.load_workdir(damaged)
  b, _, _ = model_folder.load_workdir(straight)
  assert meta["step"] == 6
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)


def test_no_restorable_checkpoint_is_one_line(tmp_path):
  workdir = str(tmp_path / "w")
  _train(workdir, 2)
  os.remove(os.path.join(workdir, "checkpoints", "2", "state", "_METADATA"))
  with pytest.raises(checkpoints.CheckpointError, match="No checkpoint under .* restores"):
    _train(workdir, 4)


def test_prepare_data_refuses_to_overwrite_and_replaces_whole_with_overwrite(tmp_path):
  src = tmp_path / "pairs.jsonl"
  rows = [{"query": f"q{i}", "document": f"d{i}"} for i in range(20)]
  src.write_bytes(b"\n".join(json.dumps(r).encode() for r in rows)
                  + b'\n{"query": "caf\xe9", "document": "latin-1 bytes"}\n')
  out = str(tmp_path / "ds")
  proc = launch("prepare_data.py", f"--input={src}", f"--output={out}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "skipped 1 malformed" in proc.stdout and "not valid UTF-8" in proc.stdout
  os.makedirs(os.path.join(out, "heldout"))
  proc = launch("prepare_data.py", f"--input={src}", f"--output={out}")
  one_line_error(proc, f"{out} already exists", "--overwrite")
  assert data.dataset.read_info(out)["num_examples"] == 20  # The old dataset still reads.
  proc = launch("prepare_data.py", f"--input={src}", f"--output={out}", "--overwrite")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert not os.path.exists(os.path.join(out, "heldout"))
  assert not os.path.exists(out + ".tmp") and not os.path.exists(out + ".old")


def test_truncated_gzip_input_is_one_line(tmp_path):
  src = tmp_path / "pairs.jsonl.gz"
  payload = gzip.compress(b"".join(
      json.dumps({"query": f"q{i}", "document": f"d{i} " * 50}).encode() + b"\n"
      for i in range(200)))
  src.write_bytes(payload[:len(payload) // 2])
  proc = launch("prepare_data.py", f"--input={src}", f"--output={tmp_path / 'ds'}")
  one_line_error(proc, f"{src} is truncated")
  assert not os.path.exists(tmp_path / "ds") and not os.path.exists(tmp_path / "ds.tmp")


def test_encode_checks_its_input_and_output_before_the_work(tmp_path):
  model = os.path.join(FIXTURE, "native")
  texts = tmp_path / "texts.txt"
  texts.write_bytes(b"fine\ncaf\xe9\n")
  proc = launch("encode.py", f"--model={model}", f"--input={texts}",
                 f"--output={tmp_path / 'e.npy'}")
  one_line_error(proc, f"{texts}:2 is not valid UTF-8")
  texts.write_text("fine\nalso fine\n")
  blocker = tmp_path / "file"
  blocker.write_text("")
  proc = launch("encode.py", f"--model={model}", f"--input={texts}",
                 f"--output={blocker}/sub/e.npy")
  one_line_error(proc, "Cannot create the output folder")
  broken = tmp_path / "broken"
  os.makedirs(broken)
  for name in os.listdir(model):
    data_bytes = open(os.path.join(model, name), "rb").read()
    if name.endswith(".safetensors"):
      data_bytes = data_bytes[:len(data_bytes) // 3]
    (broken / name).write_bytes(data_bytes)
  proc = launch("encode.py", f"--model={broken}", f"--input={texts}",
                 f"--output={tmp_path / 'e.npy'}")
  one_line_error(proc)
  assert not os.path.exists(tmp_path / "e.npy")


def test_a_failed_checkpoint_save_is_an_error_at_once(tmp_path):
  import jax.numpy as jnp
  import shutil
  import time
  from moe_embed.train.step import TrainState
  manager = checkpoints.make_manager(str(tmp_path))
  state = TrainState(step=jnp.zeros((), jnp.int32), params={"w": jnp.ones(4)}, opt_state={})
  checkpoints.save(manager, 1, state, {"step": 1})
  manager.wait_until_finished()
  # The workdir's checkpoint folder is gone (a deleted or unmounted disk).
  shutil.rmtree(checkpoints.checkpoint_dir(str(tmp_path)))
  open(checkpoints.checkpoint_dir(str(tmp_path)), "w").close()
  start = time.time()
  with pytest.raises(checkpoints.CheckpointError, match="Saving the checkpoint of step 2 .* failed"):
    checkpoints.save(manager, 2, state, {"step": 2})
  # Not after Orbax's 300 s signal timeout (a loaded 2-core CI machine once took 34 s).
  assert time.time() - start < 120


def test_unusable_workdir_and_dataset_are_one_line(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("")
  proc = launch("train.py", "--config=configs/finetune.py:tiny", f"--workdir={blocker}/w",
                 f"--config.data={FIXTURE_DATA}")
  one_line_error(proc, str(blocker))
  empty = tmp_path / "empty"
  empty.mkdir()
  proc = launch("train.py", "--config=configs/finetune.py:tiny", f"--workdir={tmp_path}/w",
                 f"--config.data={empty}")
  one_line_error(proc, str(empty))


def test_export_refuses_non_finite_parameters_and_writes_nothing(tmp_path):
  from moe_embed.io import st_export
  params, config, meta = model_folder.load_any(os.path.join(FIXTURE, "native"))
  params["encoder"]["layer_0"]["mlp"]["fc1"]["kernel"][0, 0] = np.nan
  out = str(tmp_path / "exported")
  with pytest.raises(ValueError, match=r"1 parameter tensors hold non-finite values .*layer_0"):
    st_export.export(params, config, meta, out)
  assert not os.path.exists(out) and os.listdir(tmp_path) == []


def test_eval_and_encode_refuse_a_model_with_non_finite_parameters(tmp_path):
  params, config, meta = model_folder.load_any(os.path.join(FIXTURE, "native"))
  params["encoder"]["embeddings"]["layer_norm"]["scale"][:] = np.nan
  broken = str(tmp_path / "nan_model")
  model_folder.save_model_folder(broken, params, config, tokenizer_path=meta["tokenizer"])
  folder = tmp_path / "beir"
  one_pair_beir(folder)
  out = tmp_path / "scores.json"
  proc = launch("eval.py", f"--model={broken}", f"--beir={folder}", f"--output={out}")
  one_line_error(proc, "NaN or Inf")
  assert not os.path.exists(out)
  texts = tmp_path / "t.txt"
  texts.write_text("one\ntwo\n")
  proc = launch("encode.py", f"--model={broken}", f"--input={texts}",
                 f"--output={tmp_path / 'e.npy'}")
  one_line_error(proc, "embeddings hold NaN or Inf")
  assert not os.path.exists(tmp_path / "e.npy")
