"""Test setup: 8 fake CPU devices, set before jax is imported anywhere; shared fixtures.

XLA programs are cached on disk for the session (jax's persistent compilation
cache, in a fresh temporary folder that subprocesses share through the
environment): the trainer tests compile the same tiny step several times, and
the resume test took 262 s without the cache against 153 s with it.

  stdlib_data_dir  the embedded stdlib corpus, built once per session
  workdir_v0       a copy of tests/data/workdir_v0 to change
  gcs_emulator     a GCS emulator on 127.0.0.1; gcs_bucket(name) makes a bucket in it

Helpers that are not fixtures live in plain modules beside the tests (runs.py,
records.py, beir_folders.py, step_inputs.py, hlo_ops.py, tree_asserts.py,
reference_models.py); no test module imports another.
"""

import atexit
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import pytest

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _CACHE = tempfile.mkdtemp(prefix="moe_embed_test_xla_cache_")
  atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
  os.environ.update(JAX_COMPILATION_CACHE_DIR=_CACHE,
                    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")

import jax  # noqa: E402  (must follow the XLA_FLAGS line above)

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: takes more than ~30 s on 2 CPU cores")
  config.addinivalue_line("markers", "torch: needs PyTorch and the reference packages")
  config.addinivalue_line("markers", "colab: executes the notebooks in colabs/ (the [colab] extra)")


@pytest.fixture(scope="session")
def stdlib_data_dir(tmp_path_factory):
  """The embedded stdlib corpus (`data.ensure_default_data`), built once per test session."""
  from moe_embed import data
  return data.ensure_default_data(str(tmp_path_factory.mktemp("cache") / "stdlib_pairs"))


@pytest.fixture
def workdir_v0(tmp_path):
  """A copy of tests/data/workdir_v0 (a workdir stopped at step 2 of 4, its data, ...)."""
  from tests.runs import FIXTURE
  root = str(tmp_path / "v0")
  shutil.copytree(FIXTURE, root)
  return root


@pytest.fixture(scope="session")
def gcs_emulator():
  """A GCS emulator on 127.0.0.1 (the `gcp-storage-emulator` package of the [test] extra).

  Yields its endpoint, with STORAGE_EMULATOR_HOST set in this process (and so in
  the subprocesses the tests start); stopped and the variable restored afterwards.
  Buckets live in memory: a test makes its own with `gcs_bucket`.
  """
  pytest.importorskip("gcp_storage_emulator")
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  # Its request log goes to a file: a pipe nobody reads would fill and stall it.
  log = tempfile.TemporaryFile()
  proc = subprocess.Popen(
      [sys.executable, "-m", "tests.gcs_emulator", "start", "--host=127.0.0.1",
       f"--port={port}", "--in-memory"],
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
      stdout=log, stderr=subprocess.STDOUT)
  endpoint = f"http://127.0.0.1:{port}"
  deadline = time.time() + 30
  while True:
    try:
      urllib.request.urlopen(endpoint + "/storage/v1/b", timeout=1).read()
      break
    except OSError:
      if proc.poll() is not None or time.time() > deadline:
        proc.kill()
        log.seek(0)
        raise RuntimeError("The GCS emulator did not start: "
                           + log.read().decode(errors="replace")[-2000:])
      time.sleep(0.2)
  saved = {k: os.environ.get(k) for k in _EMULATOR_VARIABLES}
  os.environ["STORAGE_EMULATOR_HOST"] = endpoint
  for name in _EMULATOR_VARIABLES[1:]:
    os.environ.pop(name, None)
  from moe_embed import storage
  storage.use_emulator()
  try:
    yield endpoint
  finally:
    proc.terminate()
    try:
      proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
      proc.kill()
    log.close()
    for name, value in saved.items():
      if value is None:
        os.environ.pop(name, None)
      else:
        os.environ[name] = value


_EMULATOR_VARIABLES = ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL",
                       "CLOUD_STORAGE_EMULATOR_ENDPOINT", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT")


@pytest.fixture(scope="session")
def gcs_bucket(gcs_emulator):
  """make(name) creates bucket `name` in the emulator and returns "gs://name"."""

  def make(name: str) -> str:
    request = urllib.request.Request(
        gcs_emulator + "/storage/v1/b", data=json.dumps({"name": name}).encode(),
        headers={"Content-Type": "application/json"}, method="POST")
    urllib.request.urlopen(request, timeout=10).read()
    return f"gs://{name}"

  return make
