"""Dataset preparation: pairs/s and driver memory of the in-process and the Beam path.

  python benchmarks/prepare_data.py --json=/tmp/prepare_data.json \
    [--sizes=10000,100000,1000000] [--paths=in_process,beam_direct,beam_portable] [--files=8]

What it measures: for each size, a synthetic corpus (four sources, one with
three hard negatives per pair, 1% duplicate pairs, 0.1% malformed lines, about
0.5 KB a line) in --files JSONL files is prepared by launch/prepare_data.py in
a fresh process per path:
  in_process     no --runner: one process holding a SHA-1 of every pair.
  beam_direct    --runner=DirectRunner: Beam's local runner executes in the
                 launcher's own process, its in-memory shuffle included.
  beam_portable  the same pipeline submitted (PortableRunner) to a Beam job
                 service and worker pool in other processes, the way Dataflow,
                 Spark or Flink run it: the launcher only plans and submits.
seconds is the launcher's wall time (start-up included); pairs_per_s is input
lines over it. driver_rss_mb is the launcher's peak RSS (ru_maxrss from wait4);
runner_rss_mb is the peak of the job service and workers together, sampled
every 0.2 s (beam_portable only).

How to read it: driver_rss_mb of in_process and beam_direct grows with the
corpus; that of beam_portable must stay flat: nothing on the driver grows with
the number of pairs. On one machine the runner's memory still grows (the local
job service shuffles in memory); on a cluster it is spread over workers.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

from absl import app
from absl import flags
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import report  # noqa: E402  (benchmarks/report.py)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATHS = ["in_process", "beam_direct", "beam_portable"]

_JSON = flags.DEFINE_string("json", None, "Write the rows as a JSON list to this file.")
_SIZES = flags.DEFINE_list("sizes", ["10000", "100000"], "Corpus sizes in pairs.")
_PATHS = flags.DEFINE_list("paths", PATHS, f"Which of {PATHS} to time.")
_FILES = flags.DEFINE_integer("files", 8, "Input files per corpus.")
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Folder for corpora and datasets (default: a temporary one, removed).")

SOURCES = ("web", "qa", "clf", "hard")  # "hard" carries three hard negatives per pair.


def write_corpus(folder: str, pairs: int, files: int, seed: int = 0) -> None:
  """`pairs` JSONL lines in `files` files: 1% repeat an earlier pair, 0.1% are malformed."""
  rng = np.random.default_rng(seed)
  vocab = np.array([f"w{i}" for i in range(4000)])

  def text(low, high):
    return " ".join(vocab[rng.integers(0, len(vocab), rng.integers(low, high))])

  os.makedirs(folder, exist_ok=True)
  kept = []
  bounds = np.linspace(0, pairs, files + 1).astype(int)
  for f in range(files):
    with open(os.path.join(folder, f"part-{f:05d}.jsonl"), "w") as out:
      for i in range(bounds[f], bounds[f + 1]):
        roll = rng.random()
        if roll < 0.001:
          out.write('{"query": "cut off\n')
          continue
        if roll < 0.011 and kept:
          out.write(kept[rng.integers(len(kept))])
          continue
        source = SOURCES[i % len(SOURCES)]
        record = {"query": text(8, 16), "document": text(40, 80), "source": source}
        if source == "hard":
          record["negatives"] = [text(40, 80) for _ in range(3)]
        line = json.dumps(record) + "\n"
        if len(kept) < 10_000:
          kept.append(line)
        out.write(line)


class _Servers:
  """A Beam job service and an external worker pool, in their own processes."""

  def __init__(self, workdir: str):
    self.job_port, self.worker_port = _free_port(), _free_port()
    log = open(os.path.join(workdir, "beam_servers.log"), "w")
    self.procs = [
        subprocess.Popen([sys.executable, "-m",
                          "apache_beam.runners.portability.local_job_service_main",
                          f"--port={self.job_port}"], stdout=log, stderr=log),
        subprocess.Popen([sys.executable, "-m", "apache_beam.runners.worker.worker_pool_main",
                          f"--service_port={self.worker_port}"], stdout=log, stderr=log)]
    for port in (self.job_port, self.worker_port):
      _wait_for_port(port)
    self.peak_mb = 0.0
    self._stop = threading.Event()

  def options(self) -> str:
    return (f"job_endpoint=localhost:{self.job_port},environment_type=EXTERNAL,"
            f"environment_config=localhost:{self.worker_port}")

  def sample(self) -> None:
    """Tracks the peak RSS of both servers and their children until `stop`."""
    import psutil
    self.peak_mb, self._stop = 0.0, threading.Event()
    roots = [psutil.Process(p.pid) for p in self.procs]
    while not self._stop.wait(0.2):
      rss = 0
      for root in roots:
        for proc in [root, *root.children(recursive=True)]:
          try:
            rss += proc.memory_info().rss
          except psutil.Error:
            pass
      self.peak_mb = max(self.peak_mb, rss / 2**20)

  def stop_sampling(self) -> None:
    self._stop.set()

  def close(self) -> None:
    import psutil
    for p in self.procs:
      for child in psutil.Process(p.pid).children(recursive=True):
        child.terminate()
      p.terminate()
      p.wait(timeout=30)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _wait_for_port(port: int, timeout: float = 120) -> None:
  deadline = time.time() + timeout
  while time.time() < deadline:
    with socket.socket() as s:
      if s.connect_ex(("localhost", port)) == 0:
        return
    time.sleep(0.5)
  raise TimeoutError(f"A Beam server did not listen on port {port} within {timeout} s.")


def run_launcher(args: list[str], log_prefix: str) -> tuple[float, float, str]:
  """(seconds, peak RSS in MiB, stdout) of one launch/prepare_data.py process."""
  with open(log_prefix + ".out", "w") as out, open(log_prefix + ".err", "w") as err:
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "launch/prepare_data.py", *args], cwd=REPO,
                            stdout=out, stderr=err)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
  if os.waitstatus_to_exitcode(status):
    raise RuntimeError(f"prepare_data.py {' '.join(args)} failed; see {log_prefix}.err: "
                       + open(log_prefix + ".err").read()[-500:])
  return seconds, usage.ru_maxrss / 1024, open(log_prefix + ".out").read()


def main(argv):
  del argv
  unknown = sorted(set(_PATHS.value) - set(PATHS))
  if unknown:
    raise app.UsageError(f"--paths has unknown {unknown}; choose from {PATHS}.")
  workdir = _WORKDIR.value or tempfile.mkdtemp(prefix="prepare_bench-")
  servers = _Servers(workdir) if "beam_portable" in _PATHS.value else None
  header = (f"{'path':>14s} {'pairs':>9s} {'seconds':>8s} {'pairs/s':>9s} "
            f"{'driver_mb':>9s} {'runner_mb':>9s} {'examples':>9s}")
  print(f"{os.cpu_count()} CPUs; {_FILES.value} input files per corpus; workdir {workdir}")
  print(header)
  print("-" * len(header))
  rows = []
  try:
    for size in map(int, _SIZES.value):
      corpus = os.path.join(workdir, f"corpus-{size}")
      if not os.path.exists(os.path.join(corpus, "done")):
        write_corpus(corpus, size, _FILES.value)
        open(os.path.join(corpus, "done"), "w").close()
      for path in _PATHS.value:
        out = os.path.join(workdir, f"ds-{path}-{size}")
        args = [f"--input={corpus}/part-*.jsonl", f"--output={out}", "--overwrite"]
        if path == "beam_direct":
          args += ["--runner=DirectRunner", "--beam_pipeline_options=direct_num_workers=1"]
        elif path == "beam_portable":
          args += ["--runner=PortableRunner", f"--beam_pipeline_options={servers.options()}"]
          sampler = threading.Thread(target=servers.sample, daemon=True)
          sampler.start()
        seconds, rss_mb, stdout = run_launcher(args, out)
        runner_mb = None
        if path == "beam_portable":
          servers.stop_sampling()
          sampler.join()
          runner_mb = servers.peak_mb
        examples = int(stdout.split("Wrote ")[1].split()[0])
        row = {"path": path, "pairs": size, "files": _FILES.value, "seconds": seconds,
               "pairs_per_s": size / seconds, "driver_rss_mb": rss_mb,
               "runner_rss_mb": runner_mb, "examples": examples}
        rows.append(row)
        runner = f"{runner_mb:9.0f}" if runner_mb is not None else f"{'-':>9s}"
        print(f"{path:>14s} {size:9d} {seconds:8.1f} {size / seconds:9.0f} "
              f"{rss_mb:9.0f} {runner} {examples:9d}", flush=True)
  finally:
    if servers:
      servers.close()
    if not _WORKDIR.value:
      shutil.rmtree(workdir, ignore_errors=True)
  report.write_json(_JSON.value, rows)


if __name__ == "__main__":
  app.run(main)
