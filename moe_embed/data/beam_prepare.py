"""Dataset preparation as Apache Beam pipelines: the path for corpora of any size.

`prepare(..., runner=...)` writes the same dataset folder as the in-process
`dataset.build_dataset` (same examples in the same order per split, the same
negatives counts and report), on one machine (DirectRunner) or on Dataflow,
Spark or Flink through Beam's standard pipeline options. The driver holds
nothing that grows with the number of pairs, only with the number of input
files and sources. Two pipelines:

  scan   each file is read by one task and every line checked with
         `jsonl.read_records` (the in-process reader): valid records per
         source, malformed lines and the first few of them. TFDS builds its
         pipeline from the split names, so the sources must be known first;
         the counts also give every record its key.
  build  the TFDS builder's own Beam pipeline. The i-th valid record of source
         s in file f gets key = offset(s, f) + i, offset(s, f) being the valid
         records of s in the files before f. Pairs are deduplicated by SHA-1,
         keeping the earliest (file, line) like the in-process reader, split by
         source and written by TFDS's BeamWriter, which with disable_shuffling
         orders a split by key: the files' order. Keys are dense but for the
         dropped duplicates, so TFDS's key-range shards are balanced. The
         negatives counts are grouped by key range (CHUNK keys), each range is
         written in key order as a piece, and one task per source joins the
         pieces into negatives-<source>.npy.

Parallelism is per input file (a gzip stream cannot be split): give a large
corpus as many files. Workers run this module, so they need moe_embed
installed (on Dataflow: --setup_file=./setup.py). One difference from the
in-process path: a source every pair of which also came earlier under another
source is an error here (TFDS refuses an empty split), where in-process it is
left out.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
from typing import Mapping, Optional, Sequence

from absl import logging
import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from moe_embed.data import builder, dataset, jsonl
from moe_embed.data.jsonl import ReadReport

DEFAULT_RUNNER = "DirectRunner"
CHUNK = 1 << 18  # Keys per negatives piece: 1 MiB of int32 counts.
WORK = ".beam"  # Scratch folder inside the dataset folder, removed before the commit.
_LOCAL_RUNNERS = ("DirectRunner", "BundleBasedDirectRunner", "SwitchingDirectRunner",
                  "PrismRunner")


def pipeline_options(runner: Optional[str], flags: str | Sequence[str] | None
                     ) -> PipelineOptions:
  """Beam options from --runner and --beam_pipeline_options ("a=1,--b=2" or a list)."""
  if isinstance(flags, str):
    flags = flags.split(",")
  args = [f"--{flag.strip().lstrip('-')}" for flag in flags or () if flag.strip()]
  options = PipelineOptions(args)
  standard = options.view_as(StandardOptions)
  if runner and standard.runner and standard.runner != runner:
    raise ValueError(f"--runner={runner} and --beam_pipeline_options runner="
                     f"{standard.runner} disagree; give the runner once.")
  standard.runner = runner or standard.runner or DEFAULT_RUNNER
  return options


@dataclasses.dataclass(frozen=True)
class _Plan:
  """What the build pipeline needs: inputs, sources in split order, where to write."""

  files: Sequence[str]
  sources: Sequence[str]
  plan_path: str  # JSON with the sources and per-file key offsets, read by the workers.
  folder: str  # The dataset folder being built.
  work: str  # Scratch folder for the negatives pieces.


def build_dataset(files: Sequence[str], folder: epath.Path, report: ReadReport,
                  options: PipelineOptions,
                  source_options: Optional[Mapping[str, dict]] = None) -> dict:
  """Writes the dataset (all but dataset_info.json) into `folder`; returns dataset_info."""
  runner = options.view_as(StandardOptions).runner
  if dataset.is_local(folder) and runner not in _LOCAL_RUNNERS:
    message = (f"--runner={runner} runs on other machines: --output must be on storage they "
               f"share (gs://...), not the local {folder}.")
    if runner == "DataflowRunner":
      raise ValueError(message)
    logging.warning("%s Going on: the cluster may share this path.", message)
  work = folder / WORK
  work.mkdir(parents=True, exist_ok=True)
  scans = _scan(files, work, options)
  totals, offsets = collections.Counter(), {}
  for scan in scans:
    report.read += scan["read"]
    report.malformed += scan["malformed"]
    report.examples += scan["examples"][:jsonl.MAX_REPORTED - len(report.examples)]
    for source, count in sorted(scan["counts"].items()):
      offsets.setdefault(str(scan["file"]), {})[source] = [totals[source], count]
      totals[source] += count
  if not totals:
    raise report.none_valid()
  sources = sorted(totals)
  dataset.check_split_names(sources)
  dataset.check_sources(source_options or {}, sources)
  plan_path = work / "plan.json"
  plan_path.write_text(json.dumps({"sources": sources, "offsets": offsets}))
  plan = _Plan(files=list(files), sources=sources, plan_path=os.fspath(plan_path),
               folder=os.fspath(folder), work=os.fspath(work))
  pairs = _BeamPairs(plan=plan, data_dir=os.fspath(folder / dataset.TFDS_DIR),
                     file_format=tfds.core.FileFormat.ARRAY_RECORD)
  _run(lambda: pairs.download_and_prepare(download_config=tfds.download.DownloadConfig(
      try_download_gcs=False, beam_options=options)))
  num_examples = {}
  for source in sources:
    num_examples[source] = pairs.info.splits[dataset.split_name(source)].num_examples
    counted = _npy_length(folder / dataset.negatives_file(source))
    if counted != num_examples[source]:
      raise RuntimeError(f"Split {source!r} has {num_examples[source]} examples but "
                         f"{counted} negatives counts; the pipeline is inconsistent.")
  report.duplicates = report.read - sum(num_examples.values())
  work.rmtree()
  return dataset.make_info(num_examples, report, source_options)


# -- The scan ---------------------------------------------------------------------------
def _scan(files: Sequence[str], work: epath.Path, options: PipelineOptions) -> list[dict]:
  """Per input file, in order: {"file", "read", "malformed", "examples", "counts"}."""
  path = os.fspath(work / "scan.json")

  def pipeline():
    with beam.Pipeline(options=options) as p:
      _ = (p
           | "Files" >> beam.Create(list(enumerate(files)))
           | "Spread" >> beam.Reshuffle()
           | "Scan" >> beam.Map(_scan_file)
           | "Collect" >> beam.combiners.ToList()
           | "Write" >> beam.Map(_write_json, path))

  _run(pipeline)
  return sorted(json.loads(epath.Path(path).read_text()), key=lambda s: s["file"])


def _scan_file(indexed: tuple[int, str]) -> dict:
  index, path = indexed
  report, counts = ReadReport(), collections.Counter()
  for record in jsonl.read_records([path], report):
    counts[record["source"]] += 1
  beam.metrics.Metrics.counter("prepare", "valid_records").inc(report.read)
  beam.metrics.Metrics.counter("prepare", "malformed_lines").inc(report.malformed)
  return {"file": index, "read": report.read, "malformed": report.malformed,
          "examples": report.examples, "counts": dict(counts)}


def _write_json(value, path: str) -> None:
  epath.Path(path).write_text(json.dumps(value))


# -- The build --------------------------------------------------------------------------
class _BeamPairs(builder.ContrastivePairs, skip_registration=True):
  """The ContrastivePairs builder with its splits generated by a Beam pipeline."""

  name = builder.NAME

  def __init__(self, *, plan: _Plan, **kwargs):
    self._plan = plan
    super().__init__(**kwargs)

  def _split_generators(self, dl_manager, pipeline):
    del dl_manager
    return _split_examples(pipeline, self._plan)


def _split_examples(pipeline: beam.Pipeline, plan: _Plan) -> dict:
  """Split name -> PCollection of (key, example); also writes the negatives files."""
  unique = (pipeline
            | "Files" >> beam.Create(list(enumerate(plan.files)))
            | "Spread" >> beam.Reshuffle()
            | "Read" >> beam.ParDo(_KeyedRecords(plan.plan_path))
            | "Dedup" >> beam.CombinePerKey(min))  # The earliest (file, line) of each pair.
  parts = unique | "BySource" >> beam.Partition(_source_of, len(plan.sources))
  splits = {}
  for part, source in zip(parts, plan.sources):
    split = dataset.split_name(source)
    pieces = os.fspath(epath.Path(plan.work) / "negatives" / split)
    target = os.fspath(epath.Path(plan.folder) / dataset.negatives_file(source))
    splits[split] = part | f"Examples_{split}" >> beam.Map(_example)
    _ = (part
         | f"NegativesByRange_{split}" >> beam.Map(_negatives_entry)
         | f"GroupRanges_{split}" >> beam.GroupByKey()
         | f"WritePieces_{split}" >> beam.Map(_write_piece, pieces)
         | f"CollectPieces_{split}" >> beam.combiners.ToList()
         | f"JoinPieces_{split}" >> beam.Map(_join_pieces, pieces, target))
  return splits


class _KeyedRecords(beam.DoFn):
  """(file index, path) -> (SHA-1, (file, line, source index, key, query, document, negatives))."""

  def __init__(self, plan_path: str):
    self._plan_path = plan_path

  def setup(self):
    plan = json.loads(epath.Path(self._plan_path).read_text())
    self._source_index = {s: i for i, s in enumerate(plan["sources"])}
    self._offsets = plan["offsets"]

  def process(self, indexed: tuple[int, str]):
    index, path = indexed
    offsets = self._offsets.get(str(index), {})
    seen = collections.Counter()
    for lineno, raw_line in enumerate(jsonl.read_lines(path), 1):
      record, _ = jsonl.parse_line(raw_line)
      if record is None:
        continue
      source = record["source"]
      start, count = offsets.get(source, (0, 0))
      if seen[source] == count:
        raise _changed(path)
      key = start + seen[source]
      seen[source] += 1
      yield jsonl.pair_key(record), (index, lineno, self._source_index[source], key,
                                     record["query"], record["document"],
                                     tuple(record["negatives"]))
    if seen != collections.Counter({s: c for s, (_, c) in offsets.items()}):
      raise _changed(path)


def _changed(path: str) -> ValueError:
  return ValueError(f"{path} changed while it was being prepared; prepare the dataset again "
                    "from inputs that do not change.")


def _source_of(kv, num_sources: int) -> int:
  del num_sources
  return kv[1][2]


def _example(kv):
  _, (_, _, _, key, query, document, negatives) = kv
  return key, {"query": query, "document": document, "negatives": list(negatives)}


def _negatives_entry(kv):
  _, (_, _, _, key, _, _, negatives) = kv
  return key // CHUNK, (key % CHUNK, len(negatives))


def _write_piece(group, folder: str) -> tuple[int, int]:
  """One key range's negatives counts, in key order, as an .npy piece; (range, length)."""
  chunk, entries = group
  entries = sorted(entries)
  epath.Path(folder).mkdir(parents=True, exist_ok=True)
  with (epath.Path(folder) / f"{chunk:010d}.npy").open("wb") as f:
    np.save(f, np.asarray([n for _, n in entries], np.int32))
  return chunk, len(entries)


def _join_pieces(pieces: list[tuple[int, int]], folder: str, target: str) -> None:
  """Streams the pieces, in key order, into one int32 .npy file (memory: one piece)."""
  with epath.Path(target).open("wb") as out:
    np.lib.format.write_array_header_1_0(out, {
        "descr": np.dtype(np.int32).str, "fortran_order": False,
        "shape": (sum(n for _, n in pieces),)})
    for chunk, _ in sorted(pieces):
      with (epath.Path(folder) / f"{chunk:010d}.npy").open("rb") as f:
        out.write(np.load(f).astype(np.int32).tobytes())


def _npy_length(path: epath.Path) -> int:
  with path.open("rb") as f:
    np.lib.format.read_magic(f)
    shape, _, _ = np.lib.format.read_array_header_1_0(f)
  return shape[0]


def _run(fn):
  """Runs a pipeline; a failure on a worker ends in that error's own line, not a log dump.

  Runners re-raise a worker's exception as its type where they can (a ValueError
  stays one), else as an error whose text holds the worker's traceback.
  """
  try:
    return fn()
  except (ValueError, KeyError):
    raise
  except Exception as e:  # pylint: disable=broad-except  (re-raised)
    found = re.findall(r"^\s*(?:\w+\.)*(\w+Error): (.+)$", str(e), re.MULTILINE)
    if not found:
      raise
    kind, message = found[-1]
    while (inner := re.match(r"(\w+Error): (.+)$", message)):
      kind, message = inner.groups()
    error = {"ValueError": ValueError, "FileNotFoundError": FileNotFoundError}.get(
        kind, RuntimeError)
    raise error(message) from e
