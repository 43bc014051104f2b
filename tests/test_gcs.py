"""Every path may be gs://: the pod flow end to end against a GCS emulator on 127.0.0.1.

The emulator (tests/gcs_emulator.py, from the [test] extra) is started once per
session by the `gcs_emulator` fixture; the launchers run as subprocesses with
STORAGE_EMULATOR_HOST set, as a user would run them, and in a scratch working
folder that must hold nothing named `gs:` afterwards.
"""

import json
import os
import subprocess

from etils import epath
import numpy as np
import pytest

from moe_embed import cli, storage
from tests.beir_folders import write_beir
from tests.runs import FIXTURE_DATA, REPO, SMALL, launch, losses, one_line_error

TOKENIZER = os.path.join(FIXTURE_DATA, "tokenizer.model")
TOPICS = ["python lists", "tensor shapes", "bucket storage", "expert routing", "sparse models",
          "unit tests", "file paths", "random seeds"]


def _ok(proc):
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def _no_local_gs(*roots):
  for root in roots:
    for folder, dirs, files in os.walk(root):
      bad = [n for n in dirs + files if n.startswith("gs:")]
      assert not bad, f"{folder} holds {bad}: a gs:// path was written to the local disk"


def _pairs(n=48):
  return [{"query": f"what about {TOPICS[i % 8]} number {i}",
           "document": f"notes on {TOPICS[i % 8]}, item {i}: how {TOPICS[(i + 3) % 8]} relate",
           "source": "ab"[i % 2]} for i in range(n)]


def _upload(local: str, remote: str) -> None:
  for folder, _, files in os.walk(local):
    for name in files:
      target = epath.Path(remote) / os.path.relpath(os.path.join(folder, name), local)
      target.parent.mkdir(parents=True, exist_ok=True)
      target.write_bytes(open(os.path.join(folder, name), "rb").read())


def _beir(root: str) -> None:
  """A small BEIR folder under `root` (local or gs://)."""
  pairs = _pairs(16)
  write_beir(root, [{"_id": f"d{i}", "text": p["document"]} for i, p in enumerate(pairs)],
             [{"_id": f"q{i}", "text": p["query"]} for i, p in enumerate(pairs)],
             [(f"q{i}", f"d{i}", 1) for i in range(16)])


@pytest.fixture(scope="module")
def pod(gcs_bucket, tmp_path_factory):
  """A bucket with a dataset prepared into it and a run trained, stopped and resumed there."""
  bucket = gcs_bucket("pod-flow")
  scratch = tmp_path_factory.mktemp("pod")
  pairs = scratch / "pairs.jsonl"
  pairs.write_text("".join(json.dumps(p) + "\n" for p in _pairs()) + "not json\n")
  data = f"{bucket}/data"
  prep = _ok(launch("prepare_data.py", f"--input={pairs}", f"--output={data}",
                     f"--tokenizer={TOKENIZER}", cwd=scratch))
  _beir(f"{bucket}/beir")
  run = f"{bucket}/runs/ft"
  args = ["--config=configs/finetune.py:tiny", f"--config.data={data}",
          f"--config.eval.beir={bucket}/beir", *SMALL]
  first = launch("train.py", *args, f"--workdir={run}", "--stop_at_step=2", cwd=scratch)
  second = _ok(launch("train.py", *args, f"--workdir={run}", cwd=scratch))
  straight = _ok(launch("train.py", *args, f"--workdir={scratch / 'local_run'}", cwd=scratch))
  return dict(bucket=bucket, scratch=scratch, data=data, run=run, prep=prep, first=first,
              second=second, straight=straight)


def test_prepare_writes_the_dataset_to_the_bucket(pod):
  info = json.loads(epath.Path(pod["data"], "dataset_info.json").read_text())
  assert info["num_examples"] == 48 and info["malformed_skipped"] == 1
  assert sorted(info["sources"]) == ["a", "b"]
  assert epath.Path(pod["data"], info["tokenizer"]).exists()


def test_train_stopped_and_resumed_on_gcs_equals_an_uninterrupted_local_run(pod):
  assert pod["first"].returncode == cli.EXIT_PREEMPTED, pod["first"].stderr[-3000:]
  got, want = losses(pod["run"]), losses(pod["scratch"] / "local_run")
  assert [s for s, _ in got] == [1, 2, 3, 4]
  np.testing.assert_allclose([l for _, l in got], [l for _, l in want], rtol=1e-5)
  run = epath.Path(pod["run"])
  names = {p.name for p in run.iterdir()}
  assert {"checkpoints", "metrics.jsonl", "config.json", "model.json", "tensorboard"} <= names
  assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["2", "4"]
  assert len(list((run / "tensorboard").iterdir())) == 2  # One events file per run.
  assert "Final nDCG@10" in pod["second"].stdout
  _no_local_gs(pod["scratch"], REPO)


def test_eval_encode_upcycle_and_export_read_and_write_the_bucket(pod):
  bucket, scratch, run = pod["bucket"], pod["scratch"], pod["run"]
  _ok(launch("eval.py", f"--model={run}", f"--beir={bucket}/beir",
              f"--output={bucket}/eval/results.json", "--batch_size=8", cwd=scratch))
  _ok(launch("eval.py", f"--model={scratch / 'local_run'}", f"--beir={bucket}/beir",
              f"--output={scratch / 'results.json'}", "--batch_size=8", cwd=scratch))
  got = json.loads(epath.Path(bucket, "eval", "results.json").read_text())
  want = json.loads((scratch / "results.json").read_text())
  assert got["beir"]["ndcg@10"] == pytest.approx(want["beir"]["ndcg@10"], rel=1e-5)

  texts = epath.Path(bucket, "texts.txt")
  texts.write_text("bucket storage notes\nexpert routing\n")
  _ok(launch("encode.py", f"--model={run}", f"--input={texts}",
              f"--output={bucket}/emb.npy", cwd=scratch))
  with epath.Path(bucket, "emb.npy").open("rb") as f:
    vectors = np.load(f)
  assert vectors.shape[0] == 2 and np.isfinite(vectors).all()

  import jax
  from moe_embed.io import model_folder
  from moe_embed.model.config import EncoderConfig
  from moe_embed.model.encoder import init_params
  dense = EncoderConfig(vocab_size=256, hidden_size=16, num_heads=2, mlp_dim=32, num_layers=2)
  from flax import linen as nn
  model_folder.save_model_folder(
      f"{bucket}/dense", nn.meta.unbox(init_params(dense, jax.random.key(0))), dense,
      tokenizer_path=TOKENIZER)
  _ok(launch("upcycle.py", f"--model={bucket}/dense", f"--out={bucket}/upcycled",
              "--num_experts=2", cwd=scratch))
  _ok(launch("upcycle.py", f"--model={bucket}/dense", f"--out={scratch / 'upcycled'}",
              "--num_experts=2", cwd=scratch))
  a, config, _ = model_folder.load_any(f"{bucket}/upcycled")
  b, _, _ = model_folder.load_any(str(scratch / "upcycled"))
  assert config.num_experts == 2
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)

  _ok(launch("export.py", f"--model={run}", f"--out={bucket}/exported", cwd=scratch))
  assert epath.Path(bucket, "exported", "model.safetensors").exists()
  _no_local_gs(scratch, REPO)


def test_missing_bucket_or_object_is_one_line_naming_the_path(pod):
  scratch = pod["scratch"]
  proc = launch("train.py", "--config=configs/finetune.py:tiny", *SMALL,
                 f"--config.data={pod['data']}", "--workdir=gs://no-such-bucket/run",
                 cwd=scratch)
  one_line_error(proc, "gs://no-such-bucket")
  proc = launch("eval.py", f"--model={pod['bucket']}/no/such/model",
                 f"--beir={pod['bucket']}/beir", cwd=scratch)
  one_line_error(proc, f"{pod['bucket']}/no/such/model")
  proc = launch("train.py", "--config=configs/finetune.py:tiny", *SMALL,
                 f"--config.data={pod['bucket']}/no-such-data", "--workdir=/unused",
                 cwd=scratch)
  one_line_error(proc, f"{pod['bucket']}/no-such-data")
  proc = launch("encode.py", f"--model={pod['run']}", f"--input={pod['bucket']}/nothing.txt",
                 f"--output={pod['bucket']}/x.npy", cwd=scratch)
  one_line_error(proc, f"{pod['bucket']}/nothing.txt")
  _no_local_gs(scratch, REPO)


def test_model_folder_and_metrics_round_trip_in_process(gcs_bucket, tmp_path):
  from moe_embed.io import model_folder
  from moe_embed.model.config import EncoderConfig
  from moe_embed.train.metric_writer import MetricWriter
  bucket = gcs_bucket("in-process")
  config = EncoderConfig(vocab_size=256, hidden_size=8, num_heads=2, mlp_dim=16, num_layers=1)
  params = {"layer": {"kernel": np.arange(12, dtype=np.float32).reshape(3, 4)}}
  model_folder.save_model_folder(f"{bucket}/m", params, config, tokenizer_path=TOKENIZER,
                                 query_prefix="q: ", max_length=64)
  loaded, got_config, meta = model_folder.load_any(f"{bucket}/m")
  np.testing.assert_array_equal(loaded["layer"]["kernel"], params["layer"]["kernel"])
  assert got_config == config and meta["query_prefix"] == "q: "
  assert meta["tokenizer"] == f"{bucket}/m/tokenizer.model"

  writer = MetricWriter(f"{bucket}/w")
  for step in (1, 2, 3):
    writer.write(step, {"loss": float(step)})
  writer.close()
  writer = MetricWriter(f"{bucket}/w", resume_step=2)  # Rows after step 2 are dropped.
  writer.write(3, {"loss": 30.0})
  writer.close()
  assert losses(f"{bucket}/w") == [(1, 1.0), (2, 2.0), (3, 30.0)]

  with pytest.raises(cli.UserError, match="gs://no-such-bucket"):
    cli.check_output_file("gs://no-such-bucket/out.npy")
  with cli.atomic_path(f"{bucket}/atomic.txt") as tmp:
    open(tmp, "w").write("whole")
  assert epath.Path(bucket, "atomic.txt").read_text() == "whole"
  assert storage.absolute(f"{bucket}/x") == f"{bucket}/x"
  _no_local_gs(tmp_path, REPO)


def test_tpu_pod_dry_run_prints_the_gcloud_commands_in_order_and_runs_none(tmp_path):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  marker = tmp_path / "gcloud_ran"
  (bin_dir / "gcloud").write_text(f"#!/bin/sh\ntouch {marker}\n")
  (bin_dir / "gcloud").chmod(0o755)
  env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", TPU_NAME="moe-pod",
             ZONE="us-east5-a", ACCELERATOR_TYPE="v5p-64", REPO_URL="https://example.org/m.git",
             WORKDIR="gs://bucket/runs/ft1")
  proc = subprocess.run(
      ["bash", "launch/tpu_pod.sh", "--dry_run", "--config=configs/finetune.py:tiny",
       "--config.batch_size=4096"], cwd=REPO, env=env, capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr
  assert not marker.exists()
  commands = [l for l in proc.stdout.splitlines() if l.startswith("gcloud ")]
  assert [c.split()[1:5] for c in commands] == [["compute", "tpus", "tpu-vm", "describe"],
                                                ["compute", "tpus", "tpu-vm", "create"],
                                                ["compute", "tpus", "tpu-vm", "ssh"]]
  assert "--accelerator-type=v5p-64" in commands[1]
  assert "--worker=all" in commands[2]
  # The compile check comes first, printed (not run) with the --config flags only.
  lines = proc.stdout.splitlines()
  check = lines[lines.index(next(l for l in lines if l.startswith("# compile check"))) + 1]
  assert lines.index(check) < lines.index(commands[0])
  assert check.split()[1:] == ["launch/compile.py", "--topology=v5p-64",
                               "--config=configs/finetune.py:tiny", "--config.batch_size=4096"]
  skipped = subprocess.run(
      ["bash", "launch/tpu_pod.sh", "--dry_run", "--skip_compile_check",
       "--config=configs/finetune.py:tiny"], cwd=REPO, env=env, capture_output=True, text=True)
  assert skipped.returncode == 0 and "compile.py" not in skipped.stdout.split("ssh")[0]
  for needle in ("launch/train.py --distributed --workdir=gs://bucket/runs/ft1",
                 "--config=configs/finetune.py:tiny --config.batch_size=4096",
                 "https://example.org/m.git"):
    assert needle in commands[2]

  env["WORKDIR"] = str(tmp_path / "run")
  proc = subprocess.run(["bash", "launch/tpu_pod.sh", "--dry_run"], cwd=REPO, env=env,
                        capture_output=True, text=True)
  assert proc.returncode == 1 and not marker.exists()
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and "is not a gs:// path" in lines[0]


def test_array_record_files_larger_than_the_readers_first_read_load_from_the_bucket(
    gcs_bucket, tmp_path):
  """ArrayRecord's reader starts with the last MiB of a file (a suffix range)."""
  from array_record.python import array_record_module as ar
  bucket = gcs_bucket("records")
  local = str(tmp_path / "big.array_record")
  writer = ar.ArrayRecordWriter(local, "group_size:1")
  rng = np.random.default_rng(0)
  records = [rng.bytes(3000) for _ in range(800)]  # About 2.4 MB: past the first read.
  for record in records:
    writer.write(record)
  writer.close()
  _upload(str(tmp_path), f"{bucket}/r")
  reader = ar.ArrayRecordReader(f"{bucket}/r/big.array_record")
  assert reader.num_records() == len(records)
  assert reader.read(list(range(len(records)))) == records
