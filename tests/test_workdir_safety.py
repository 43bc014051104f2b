"""A workdir is not lost or silently changed: digests, a changed config, two runs, resource faults."""

import glob
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_embed.io import checkpoints
from moe_embed.train.step import TrainState
from tests.runs import (FIXTURE, FIXTURE_DATA, REPO, SMALL, fixture_config, launch,
                        one_line_error)


def _state(step, seed):
  rng = np.random.default_rng(seed)
  model = {"w": jnp.asarray(rng.normal(size=(64, 256)), jnp.float32),
           "b": jnp.asarray(rng.normal(size=(256,)), jnp.bfloat16)}
  return TrainState(step=jnp.asarray(step, jnp.int32), params={"model": model},
                    opt_state={"mu": jax.tree.map(lambda x: x * 0.1, model)})


def test_random_bytes_in_a_checkpoint_are_detected_and_the_older_one_restores(tmp_path, caplog):
  workdir = str(tmp_path / "w")
  manager = checkpoints.make_manager(workdir, keep=5)
  for step in (1, 2):
    checkpoints.save(manager, step, _state(step, seed=step), {"step": step})
  manager.wait_until_finished()
  newest, _ = checkpoints.latest_params(workdir)
  older = jax.device_get(_state(1, seed=1).params["model"])
  step2 = os.path.join(checkpoints.checkpoint_dir(workdir), "2")
  pristine = str(tmp_path / "pristine")
  shutil.copytree(step2, pristine)
  # The array data is the largest file; its bytes hold the (zstd-compressed) chunks.
  data_file = max(glob.glob(os.path.join(step2, "state", "**", "d", "*"), recursive=True),
                  key=os.path.getsize)
  metadata = os.path.join(step2, "state", "_METADATA")
  rng = np.random.default_rng(0)
  places = [(data_file, f) for f in (0.05, 0.3, 0.5, 0.7, 0.95)] + [(metadata, 0.5)]
  for path, where in places:
    shutil.rmtree(step2)
    shutil.copytree(pristine, step2)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
      f.seek(int(size * where))
      f.write(rng.bytes(min(64, size - int(size * where))))
    caplog.clear()
    params, step = checkpoints.latest_params(workdir)
    assert step == 1, (path, where)  # Detected, and the older checkpoint was read instead.
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(older)):
      np.testing.assert_array_equal(got, want)
    damaged = [r for r in caplog.records if "Checkpoint 2" in r.getMessage()]
    assert len(damaged) == 1 and "is damaged" in damaged[0].getMessage(), caplog.text
    assert "\n" not in damaged[0].getMessage()
  assert os.path.isdir(step2)  # Readers do not change the workdir.
  # Training moves the damaged step aside and resumes from the older one.
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _state(0, seed=0))
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                     sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])),
      abstract)
  state, data_state, step = checkpoints.restore(checkpoints.make_manager(workdir), abstract)
  assert step == 1 and data_state == {"step": 1} and int(state.step) == 1
  assert os.path.isdir(step2 + ".damaged") and not os.path.exists(step2)
  # The untouched checkpoint restored the same arrays as before damage was done.
  shutil.copytree(pristine, step2)
  params, step = checkpoints.latest_params(workdir)
  assert step == 2
  for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(newest)):
    np.testing.assert_array_equal(got, want)


def test_digest_does_not_depend_on_the_sharding():
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  state = _state(3, seed=3)
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "expert"))
  sharded = jax.device_put(state, NamedSharding(mesh, P()))
  sharded = sharded.replace(params={"model": {
      "w": jax.device_put(state.params["model"]["w"], NamedSharding(mesh, P("data", "expert"))),
      "b": jax.device_put(state.params["model"]["b"], NamedSharding(mesh, P("expert")))}})
  assert checkpoints.array_digest(state) == checkpoints.array_digest(sharded)
  flipped = np.array(state.params["model"]["w"])
  flipped.view(np.uint32)[5, 7] ^= 1 << 3  # One bit of one word.
  changed = state.replace(params={"model": {**state.params["model"], "w": jnp.asarray(flipped)}})
  a, b = checkpoints.array_digest(state), checkpoints.array_digest(changed)
  assert [k for k in a if a[k] != b[k]] == ["params/model/w"]


def _snapshot(workdir):
  return {name: open(os.path.join(workdir, name), "rb").read()
          for name in ("config.json", "model.json", "metrics.jsonl")}


def test_a_changed_architecture_is_refused_before_anything_is_written(workdir_v0, caplog):
  from moe_embed.io import model_folder
  from moe_embed.train import trainer, workdir as workdir_lib
  workdir = os.path.join(workdir_v0, "workdir")
  before, files = model_folder.load_workdir(workdir)[0], _snapshot(workdir)
  for changes, needles in (
      ({"num_layers": 3, "top_k": 1}, ["encoder.num_layers 2 -> 3", "encoder.top_k 2 -> 1"]),
      ({"num_experts": 8}, ["encoder.num_experts 4 -> 8"])):
    c = fixture_config(workdir_v0)
    for key, value in changes.items():
      c.encoder[key] = value
    with pytest.raises(trainer.ConfigError) as e:
      trainer.train_and_evaluate(c, workdir)
    message = str(e.value)
    assert "\n" not in message and "another architecture" in message, message
    for needle in needles:
      assert needle in message, message
    assert _snapshot(workdir) == files
    assert not os.path.exists(os.path.join(workdir, workdir_lib.LOCK_FILE))
  after = model_folder.load_workdir(workdir)[0]  # The old model still comes out of it.
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
    np.testing.assert_array_equal(a, b)
  # Runtime fields may change; a changed batch size and schedule are logged.
  c = fixture_config(workdir_v0)
  c.encoder.dtype, c.encoder.remat, c.encoder.expert_exchange = "bfloat16", True, "padded"
  c.batch_size, c.total_steps = 16, 8
  recorded, _ = model_folder.read_meta(workdir)
  caplog.clear()
  workdir_lib.check_resume(workdir, recorded.replace(dtype="bfloat16", remat=True), c)
  lines = [r.getMessage() for r in caplog.records if "changed settings" in r.getMessage()]
  assert len(lines) == 1 and "batch_size 8 -> 16" in lines[0] and "total_steps 4 -> 8" in lines[0]
  assert "encoder.dtype 'float32' -> 'bfloat16'" in lines[0], lines


def test_one_run_per_workdir_and_a_stale_lock_is_taken_over(tmp_path, caplog):
  import json
  import socket
  import subprocess
  import sys
  import time
  from moe_embed.train import trainer, workdir as workdir_lib
  workdir = str(tmp_path / "w")
  first = workdir_lib.WorkdirLock(workdir, heartbeat_s=0.05).acquire()
  held = json.loads(open(os.path.join(workdir, workdir_lib.LOCK_FILE)).read())
  assert held["host"] == socket.gethostname() and held["pid"] == os.getpid()
  time.sleep(0.3)
  beat = json.loads(open(os.path.join(workdir, workdir_lib.LOCK_FILE)).read())["heartbeat"]
  assert beat > held["heartbeat"]  # The heartbeat moves while the run holds the lock.
  with pytest.raises(workdir_lib.WorkdirLocked,
                     match=f"in use by another run: host {socket.gethostname()} pid {os.getpid()}"):
    trainer.train_and_evaluate(fixture_config(FIXTURE), workdir)
  first.release()
  assert not os.path.exists(os.path.join(workdir, workdir_lib.LOCK_FILE))
  # A holder that is gone: a pid that ended on this host, or a heartbeat from long ago.
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True).stdout.strip()
  for record, why in (({"host": socket.gethostname(), "pid": int(dead)}, "no longer running"),
                      ({"host": "elsewhere", "pid": 1, "heartbeat": time.time() - 3600},
                       "last heartbeat was")):
    with open(os.path.join(workdir, workdir_lib.LOCK_FILE), "w") as f:
      json.dump({"heartbeat": time.time(), "token": "x", **record}, f)
    caplog.clear()
    lock = workdir_lib.WorkdirLock(workdir).acquire()
    lines = [r.getMessage() for r in caplog.records if "Taking over" in r.getMessage()]
    assert len(lines) == 1 and why in lines[0] and str(record["pid"]) in lines[0], lines
    lock.release()


def test_the_lock_holds_on_gcs(gcs_bucket):
  from moe_embed.train import workdir as workdir_lib
  workdir = gcs_bucket("locks") + "/run"
  first = workdir_lib.WorkdirLock(workdir, settle_s=0.1).acquire()
  with pytest.raises(workdir_lib.WorkdirLocked, match=f"pid {os.getpid()}"):
    workdir_lib.WorkdirLock(workdir, settle_s=0.1).acquire()
  first.release()
  assert workdir_lib.WorkdirLock(workdir).holder() is None
  workdir_lib.WorkdirLock(workdir, settle_s=0.1).acquire().release()


@pytest.mark.slow
def test_ctrl_c_saves_and_a_resume_keeps_the_first_runs_metrics(tmp_path, monkeypatch):
  import json
  import signal
  from moe_embed.train import trainer, metric_writer, workdir as workdir_lib
  workdir = str(tmp_path / "w")
  c = fixture_config(FIXTURE)
  c.log_every_steps, c.checkpoint_every_steps, c.keep_checkpoints = 2, 100, 3
  batches = []
  real = trainer._global_batch

  def global_batch(local, sharding):  # The compile takes batch 1; step s takes batch s + 1.
    batches.append(1)
    if len(batches) == 4:
      signal.raise_signal(signal.SIGINT)  # Ctrl-C during step 3.
    return real(local, sharding)

  monkeypatch.setattr(trainer, "_global_batch", global_batch)
  out = trainer.train_and_evaluate(c, workdir)
  monkeypatch.setattr(trainer, "_global_batch", real)
  assert out["preempted"] and out["signal"] == "SIGINT" and out["step"] == 3
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3"]
  assert not os.path.exists(os.path.join(workdir, workdir_lib.LOCK_FILE))
  metrics = os.path.join(workdir, metric_writer.METRICS_FILE)
  first = [json.loads(l) for l in open(metrics)]
  assert [r["step"] for r in first] == [2] and "window_steps" not in first[0]
  with open(metrics, "a") as f:
    f.write('{"step": 3, "loss": 2.0')  # A crash in the middle of a write.
  out = trainer.train_and_evaluate(c, workdir)
  assert out["step"] == 4 and not out.get("preempted")
  rows = [json.loads(l) for l in open(metrics)]
  assert [r["step"] for r in rows] == [2, 4]
  assert rows[0] == first[0]  # The first run's row survives, untouched.
  assert rows[1]["window_steps"] == 1  # Steps 4 only: the window is marked partial.
  # Rerunning a finished run repairs a torn last line before anything else.
  with open(metrics, "a") as f:
    f.write('{"step": 5, "lo')
  metric_writer.MetricWriter(workdir, resume_step=4).close()
  assert [json.loads(l)["step"] for l in open(metrics)] == [2, 4]


def test_sigint_and_sigterm_request_a_save_and_a_second_ctrl_c_stops_at_once():
  import signal
  from moe_embed.train import trainer
  # As in a launched run; a test runner's worker may ignore SIGINT.
  outer = signal.signal(signal.SIGINT, signal.default_int_handler)
  try:
    for signum in (signal.SIGTERM, signal.SIGINT):
      with trainer._Preemption() as preemption:
        signal.raise_signal(signum)
        assert preemption.requested and preemption.signal_name == signum.name
        if signum == signal.SIGINT:
          with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
  finally:
    signal.signal(signal.SIGINT, outer)


def test_a_torn_last_metrics_line_is_repaired_when_the_writer_opens(tmp_path):
  import json
  from moe_embed.train import metric_writer
  path = tmp_path / metric_writer.METRICS_FILE
  path.write_text('{"step": 1, "loss": 2.5}\n{"step": 2, "loss": 2.4}\n{"step": 3, "lo')
  metric_writer.MetricWriter(str(tmp_path)).close()  # A rerun of a finished run.
  assert [json.loads(l) for l in path.read_text().splitlines()] == [
      {"step": 1, "loss": 2.5}, {"step": 2, "loss": 2.4}]


def test_train_without_workdir_uses_one_per_config_and_a_second_run_names_the_holder(tmp_path):
  import socket
  from moe_embed import cli
  from moe_embed.train import workdir as workdir_lib
  root = tmp_path / "runs"
  os.environ[workdir_lib.DEFAULT_ROOT_ENV] = str(root)
  try:
    expected = workdir_lib.default_workdir("configs/finetune.py")
    lock = workdir_lib.WorkdirLock(expected).acquire()  # A first run holds it.
    proc = launch("train.py", "--config=configs/finetune.py")
    lock.release()
  finally:
    del os.environ[workdir_lib.DEFAULT_ROOT_ENV]
  assert expected == str(root / "finetune")
  assert f"Workdir: {expected}" in proc.stdout, proc.stdout + proc.stderr[-2000:]
  one_line_error(proc, "in use by another run", f"host {socket.gethostname()}",
                 f"pid {os.getpid()}")
  assert "--workdir" in proc.stderr and proc.returncode == 1 != cli.EXIT_PREEMPTED


def test_outputs_follow_the_umask(tmp_path):
  import stat
  from moe_embed import cli
  from moe_embed.io import model_folder, st_export
  previous = os.umask(0o027)
  try:
    with cli.atomic_path(str(tmp_path / "e.npy")) as tmp, open(tmp, "wb") as f:
      np.save(f, np.zeros(3))
    params, config, meta = model_folder.load_any(os.path.join(FIXTURE, "native"))
    st_export.export(params, config, meta, str(tmp_path / "exported"))
  finally:
    os.umask(previous)
  assert stat.S_IMODE(os.stat(tmp_path / "e.npy").st_mode) == 0o640
  assert stat.S_IMODE(os.stat(tmp_path / "exported").st_mode) == 0o750
  modes = {name: stat.S_IMODE(os.stat(tmp_path / "exported" / name).st_mode)
           for name in os.listdir(tmp_path / "exported")
           if os.path.isfile(tmp_path / "exported" / name)}
  assert modes["model.safetensors"] == 0o640 and set(modes.values()) == {0o640}, modes


def test_a_deleted_or_truncated_dataset_file_is_one_line_when_the_dataset_opens(tmp_path):
  import json
  from moe_embed import data
  from moe_embed.data import dataset
  from moe_embed.train import trainer
  pairs = tmp_path / "pairs.jsonl"
  pairs.write_text("".join(json.dumps({"query": f"q {i}", "document": f"d {i}"}) + "\n"
                           for i in range(12)))
  out = str(tmp_path / "ds")
  info, _ = data.prepare(str(pairs), out)
  shard = [n for n in info["files"] if ".array_record-" in n]
  assert len(shard) == 1 and dataset.read_info(out)["num_examples"] == 12
  path = os.path.join(out, shard[0])
  size = os.path.getsize(path)
  with open(path, "r+b") as f:
    f.truncate(size // 2)
  with pytest.raises(ValueError, match=f"is damaged: {shard[0]} has {size // 2} bytes where "
                     f"dataset_info.json records {size}"):
    dataset.read_info(out)
  # A dataset written before file sizes were recorded: its ArrayRecord shards must exist.
  old = str(tmp_path / "old")
  shutil.copytree(os.path.join(FIXTURE, "data"), old)
  [name] = glob.glob(os.path.join(old, "tfds", "*", "*", "*.array_record-*"))
  os.remove(name)
  c = fixture_config(FIXTURE)
  c.data = old
  with pytest.raises(ValueError, match=f"Dataset {old} is damaged: .*"
                     f"{os.path.basename(name)} is missing; rebuild it"):
    trainer.train_and_evaluate(c, str(tmp_path / "w"))
  assert not os.path.exists(tmp_path / "w" / "checkpoints")


def test_an_unreachable_bucket_fails_in_seconds_naming_the_path():
  import subprocess
  import sys
  import time
  code = ("from moe_embed import storage\n"
          "try:\n  storage.check_bucket('gs://nobucket/run', timeout_s=3)\n"
          "except FileNotFoundError as e:\n  print(e)\n")
  # Nothing listens on port 9 of this host: the client retries for minutes.
  env = dict(os.environ, STORAGE_EMULATOR_HOST="http://127.0.0.1:9")
  for name in ("TENSORSTORE_GCS_HTTP_URL", "CLOUD_STORAGE_EMULATOR_ENDPOINT"):
    env.pop(name, None)
  start = time.time()
  proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                        timeout=120, cwd=os.path.dirname(os.path.dirname(__file__)))
  assert time.time() - start < 30, proc.stderr[-2000:]
  assert "gs://nobucket/run" in proc.stdout and "within 3 s" in proc.stdout, proc.stdout
  assert "Traceback" not in proc.stderr, proc.stderr[-2000:]


def test_experts_that_do_not_split_over_the_expert_axis_name_both_fields():
  from moe_embed.model.config import preset
  from moe_embed.train import config as run_config
  with pytest.raises(run_config.ConfigError,
                     match=r"encoder.num_experts=6 does not split over mesh.expert=4 .*divisor"):
    run_config.check_experts(preset("tiny", num_experts=6), 4)
  run_config.check_experts(preset("tiny", num_experts=8), 4)


def test_export_without_transformers_is_one_line(tmp_path, monkeypatch):
  import sys
  from moe_embed.io import model_folder, st_export
  params, config, meta = model_folder.load_any(os.path.join(FIXTURE, "native"))
  monkeypatch.setitem(sys.modules, "transformers", None)  # As if it were not installed.
  monkeypatch.setitem(sys.modules, "transformers.convert_slow_tokenizer", None)
  with pytest.raises(ValueError, match="needs the transformers package.*pip install"):
    st_export.export(params, config, meta, str(tmp_path / "out"))
  assert not os.path.exists(tmp_path / "out")


def test_out_of_memory_names_the_batch_the_bytes_and_the_fields():
  from moe_embed.train import trainer
  c = fixture_config(FIXTURE)
  c.batch_size, c.grad_cache_chunk = 4096, 0
  error = jax.errors.JaxRuntimeError(
      "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 12.50GiB.\n"
      "BufferAssignment OOM Debugging.\n" + "allocation 0: size 4096\n" * 40)
  message = str(trainer._out_of_memory(error, c, planned=int(3.25 * 2**30)))
  assert "\n" not in message
  for needle in ("batch_size=4096 x 24 tokens", "the step plans 3.25 GiB per device",
                 "an allocation of 12.50GiB failed", "grad_cache_chunk (now 0)",
                 "encoder.remat=True (now False)", "Lower batch_size"):
    assert needle in message, message


FULL_DISK = """
import resource, runpy, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # Writes past the limit fail with EFBIG.
from moe_embed.io import checkpoints
real, calls = checkpoints.save, []

def save(manager, step, state, data_state):
  calls.append(step)
  if len(calls) == 1:  # The disk fills up while the first checkpoint is written.
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
  return real(manager, step, state, data_state)

checkpoints.save = save
runpy.run_path("launch/train.py", run_name="__main__")
"""


@pytest.mark.slow
def test_a_full_disk_stops_the_run_at_the_failed_save_in_one_line(tmp_path):
  import subprocess
  import sys
  workdir = str(tmp_path / "w")
  args = ["--config=configs/finetune.py:tiny", f"--workdir={workdir}",
          f"--config.data={FIXTURE_DATA}",
          *[a for a in SMALL if "total_steps" not in a], "--config.total_steps=40",
          "--config.eval.enabled=False"]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", PYTHONPATH=REPO)
  env.pop("MOE_EMBED_TRACEBACK", None)
  # stderr through a pipe: the file size limit applies to the files the run writes.
  proc = subprocess.run([sys.executable, "-c", FULL_DISK, *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)
  line = one_line_error(proc, "Saving the checkpoint of step 2 ", "failed", "stopped at step")
  stopped = int(line.split("stopped at step ")[1].split(".")[0])
  assert 2 < stopped < 40, line  # It did not train on past the failed save.
