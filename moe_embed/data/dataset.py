"""The prepared contrastive dataset: one ArrayRecord split of examples per source.

Layout of a dataset folder:
  dataset_info.json             sources, their sizes, splits and options, the tokenizer
  tfds/contrastive_pairs/1.0.0/ TFDS dataset (ArrayRecord), one split per source
  negatives-<source>.npy        int32 [n]: hard negatives per example, in split order
  tokenizer.model               SentencePiece model, when one was trained or copied
  heldout/                      optional BEIR folder for evaluation
`tfds.data_source` gives random access to ArrayRecord files without TensorFlow,
so any process can read any slice of any batch. All I/O goes through
`etils.epath`, so a dataset folder may be `gs://...`.

Writing is all-or-nothing (`commit`): dataset_info.json is the last file written
and a folder without it is not a dataset. It lists every other file with its
size (`files`), and `read_info` checks them when a dataset is opened, so a
deleted or truncated ArrayRecord file is one line before any training work
(datasets written before `files` existed: the TFDS shards must exist).

TensorFlow Datasets (`builder`) is imported by the two functions that write or
open the ArrayRecord splits, so reading dataset_info.json, or importing the
trainer, does not load it.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Callable, Iterable, Mapping, Optional

from etils import epath
import numpy as np
from tqdm import tqdm

from moe_embed import storage, validation
from moe_embed.data import jsonl
from moe_embed.data.jsonl import ReadReport

INFO = "dataset_info.json"
FORMAT = "moe_embed.pairs.v2"
TFDS_DIR = "tfds"
# Optional per-source keys of info["sources"][source], read by the batch iterator.
SOURCE_OPTIONS = ("query_prefix", "doc_prefix", "max_query_len", "max_doc_len")
MIN_LEN = 3  # A length keeps <s>, one token and </s>.


def split_name(source: str) -> str:
  """A TFDS split name for a source name (letters, digits and underscores)."""
  return re.sub(r"\W", "_", source)


def negatives_file(source: str) -> str:
  return f"negatives-{re.sub(r'[^A-Za-z0-9_.-]', '_', source)}.npy"


def is_local(path: os.PathLike | str) -> bool:
  """Whether `path` is on a local disk, where renaming a folder is atomic (not gs://, s3://)."""
  return not storage.is_remote(path)


def check_output(out_dir: str, overwrite: bool) -> None:
  out = epath.Path(out_dir)
  if out.exists() and any(out.iterdir()) and not overwrite:
    raise FileExistsError(f"{out_dir} already exists and is not empty; pass --overwrite to "
                          "replace it, or choose another --output.")


def commit(out_dir: str, build: Callable[[epath.Path], dict], overwrite: bool = False) -> dict:
  """Runs `build(folder)`, which writes a dataset but its info and returns the info.

  On a local disk the dataset is built in `<out_dir>.tmp` and renamed into place,
  so an interrupted run leaves no half-written dataset and an existing one is
  replaced (with `overwrite`) only by a complete one. An object store has no
  atomic folder rename: there the dataset is built in place and dataset_info.json,
  written last, is the commit marker; `overwrite` first deletes the old marker,
  then the old files, so readers never see a mix of two datasets.
  """
  check_output(out_dir, overwrite)
  out = epath.Path(out_dir)
  folder = out.parent / f"{out.name}.tmp" if is_local(out) else out
  if folder.exists():
    (folder / INFO).unlink(missing_ok=True)
    folder.rmtree()
  folder.mkdir(parents=True, exist_ok=True)
  try:
    info = build(folder)
    info["files"] = file_sizes(folder)
    write_info(folder, info)
  except BaseException:
    folder.rmtree(missing_ok=True)
    raise
  if folder != out:
    if out.exists():
      old = out.parent / f"{out.name}.old"
      old.rmtree(missing_ok=True)
      out.rename(old)
      folder.rename(out)
      old.rmtree()
    else:
      folder.rename(out)
  return info


def write_info(folder: os.PathLike | str, info: dict) -> None:
  """Writes dataset_info.json whole: through a renamed temporary file on a local disk."""
  path = epath.Path(folder) / INFO
  text = json.dumps(info, indent=2)
  if is_local(path):
    tmp = path.parent / f"{INFO}.tmp"
    tmp.write_text(text)
    tmp.rename(path)
  else:
    path.write_text(text)  # An object is replaced whole on upload.


def build_dataset(records: Iterable[dict], folder: epath.Path, report: ReadReport,
                  source_options: Optional[Mapping[str, dict]] = None) -> dict:
  """The in-process engine: deduplicates `records` into `folder`; returns dataset_info.

  Records are staged as one JSONL file per source, then written as ArrayRecord
  splits by the TFDS builder; a set of every pair's SHA-1 stays in memory (fine
  for small data; `beam_prepare` is the path for large corpora).
  """
  from moe_embed.data import builder  # TensorFlow Datasets: only to write the splits.
  stage = folder / "staged"
  stage.mkdir()
  writers, staged, negatives, seen = {}, {}, {}, set()
  for record in tqdm(records, desc="Reading records", unit=" records", mininterval=2):
    key = jsonl.pair_key(record)
    if key in seen:
      report.duplicates += 1
      continue
    seen.add(key)
    source = record["source"]
    if source not in writers:
      check_split_names([*writers, source])
      staged[source] = stage / f"{split_name(source)}.jsonl"
      writers[source] = staged[source].open("w", encoding="utf-8")
      negatives[source] = []
    writers[source].write(json.dumps(
        {"query": record["query"], "document": record["document"],
         "negatives": record["negatives"]}) + "\n")
    negatives[source].append(len(record["negatives"]))
  for writer in writers.values():
    writer.close()
  if not writers:
    raise report.none_valid()
  check_sources(source_options or {}, list(writers))
  builder.build({split_name(s): os.fspath(p) for s, p in staged.items()},
                os.fspath(folder / TFDS_DIR))
  stage.rmtree()
  for source, counts in negatives.items():
    with (folder / negatives_file(source)).open("wb") as f:
      np.save(f, np.asarray(counts, np.int32))
  return make_info({s: len(c) for s, c in negatives.items()}, report, source_options)


def check_split_names(sources: Iterable[str]) -> None:
  """Two sources whose TFDS split names would collide are an error naming both."""
  seen = {}
  for source in sources:
    split = split_name(source)
    if split in seen:
      raise ValueError(f"Sources {source!r} and {seen[split]!r} map to the same split name "
                       f"{split!r}; rename one of them.")
    seen[split] = source


def make_info(num_examples: Mapping[str, int], report: ReadReport,
              source_options: Optional[Mapping[str, dict]] = None) -> dict:
  """dataset_info for the given examples per source (both engines write this)."""
  sources = {}
  for source in sorted(num_examples):
    sources[source] = {"split": split_name(source),
                       "negatives_file": negatives_file(source),
                       "num_examples": int(num_examples[source]),
                       **(source_options or {}).get(source, {})}
  return {"format": FORMAT, "sources": sources,
          "num_examples": sum(s["num_examples"] for s in sources.values()),
          "duplicates_dropped": report.duplicates, "malformed_skipped": report.malformed}


def parse_source_options(value: str | Mapping | None) -> dict[str, dict]:
  """--source_prefixes: a JSON object, or a path to a JSON file, of source -> options.

  Options are some of SOURCE_OPTIONS, e.g. {"clf": {"query_prefix": "classification: ",
  "max_query_len": 64}}; an unknown key or a value of the wrong type is an error.
  """
  if not value:
    return {}
  if isinstance(value, str):
    text = value if value.lstrip().startswith("{") else _read_options_file(value)
    try:
      value = json.loads(text)
    except json.JSONDecodeError as e:
      raise ValueError(f"--source_prefixes is not valid JSON ({e}).") from None
  if not isinstance(value, Mapping):
    raise ValueError("--source_prefixes must be a JSON object of source -> options.")
  out = {}
  for source, options in value.items():
    check_source_entry(f"--source_prefixes[{source!r}]", options)
    out[source] = dict(options)
  return out


def check_source_entry(where: str, options: Any) -> None:
  """One source's options (--source_prefixes or input.source_prefixes, named `where`):
  a mapping of some of SOURCE_OPTIONS, each value checked by check_option."""
  if not isinstance(options, Mapping):
    raise ValueError(f"{where} must map some of {list(SOURCE_OPTIONS)} to values, got "
                     f"{type(options).__name__}.")
  validation.check_fields(options, SOURCE_OPTIONS, f"{where} key", ValueError)
  for key, option in options.items():
    check_option(f"{where}.{key}", key, option)


def _read_options_file(path: str) -> str:
  try:
    return epath.Path(path).read_text()
  except FileNotFoundError:
    raise FileNotFoundError(f"--source_prefixes={path} is neither a JSON object nor an "
                            "existing file.") from None


def check_option(where: str, key: str, value: Any) -> None:
  """One per-source value: a string prefix or an integer length of at least MIN_LEN."""
  if key.endswith("_prefix"):
    if not isinstance(value, str):
      raise ValueError(f"{where} must be a string, got {type(value).__name__}.")
  elif isinstance(value, bool) or not isinstance(value, int) or value < MIN_LEN:
    raise ValueError(f"{where}={value!r} must be an integer >= {MIN_LEN}.")


def check_sources(named: Iterable[str], sources: Iterable[str], what: str = "--source_prefixes",
                  where: str = "the data") -> None:
  """Sources named by `what` (per-source options or weights) that `where` does not have
  are an error naming them and the sources it has."""
  sources = sorted(sources)
  unknown = sorted(set(named) - set(sources))
  if unknown:
    raise ValueError(f"{what} names unknown sources {unknown}; {where} has {sources}.")


def store_tokenizer(folder: epath.Path, tokenizer_path: str, info: dict) -> None:
  epath.Path(tokenizer_path).copy(folder / "tokenizer.model", overwrite=True)
  info["tokenizer"] = "tokenizer.model"


def file_sizes(folder: os.PathLike | str) -> dict[str, int]:
  """{path relative to `folder`: bytes} of every file of a dataset but its info."""
  root = os.fspath(epath.Path(folder))
  return {os.path.relpath(os.fspath(path), root): path.stat().length
          for path in storage.walk_files(folder) if path.name != INFO}


def check_files(data_dir: str, info: dict) -> None:
  """ValueError naming the first file of the dataset that is missing or has another size."""
  root = epath.Path(data_dir)
  expected = info.get("files")
  if expected is None:  # Written before sizes were recorded: the shards must exist.
    expected = {name: None for name in _tfds_shards(root)}
  for name, size in sorted(expected.items()):
    path = root / name
    if not path.exists():
      problem = "is missing"
    elif size is not None and path.stat().length != size:
      problem = f"has {path.stat().length} bytes where {INFO} records {size}"
    else:
      continue
    raise ValueError(f"Dataset {data_dir} is damaged: {name} {problem}; rebuild it with "
                     "launch/prepare_data.py (--overwrite).")


def _tfds_shards(root: epath.Path) -> list[str]:
  """ArrayRecord shard paths (relative to `root`) that the TFDS dataset_info.json lists."""
  names = []
  for info_path in (root / TFDS_DIR).glob("*/*/dataset_info.json"):
    tfds_info = json.loads(info_path.read_text())
    dataset = info_path.parent.parent.name
    for split in tfds_info.get("splits", []):
      count = len(split.get("shardLengths", []))
      for i in range(count):
        name = f"{dataset}-{split['name']}.array_record-{i:05d}-of-{count:05d}"
        names.append(os.path.relpath(os.fspath(info_path.parent / name), os.fspath(root)))
  return names


def read_info(data_dir: str, check: bool = True) -> dict:
  """dataset_info.json of a dataset; with `check`, its files are checked too (check_files)."""
  path = epath.Path(data_dir) / INFO
  if not path.exists():
    raise FileNotFoundError(
        f"{data_dir} is not a prepared dataset ({INFO} is missing); build it with "
        f"`python launch/prepare_data.py --input=... --output={data_dir}`.")
  info = json.loads(path.read_text())
  if info.get("format") != FORMAT:
    raise ValueError(f"{path} has format {info.get('format')!r}; expected {FORMAT!r}.")
  if check:
    check_files(data_dir, info)
  return info


def open_splits(data_dir: str) -> dict:
  """Split name -> random-access data source of the dataset's TFDS folder."""
  from moe_embed.data import builder  # TensorFlow Datasets: only to open the splits.
  return builder.data_sources(os.fspath(epath.Path(data_dir) / TFDS_DIR))


def dataset_tokenizer_path(data_dir: str) -> str:
  """Path of the tokenizer a dataset carries (tokenizer.model); an error if it has none."""
  info = read_info(data_dir)
  if "tokenizer" not in info:
    raise FileNotFoundError(
        f"{data_dir} carries no tokenizer; set config.tokenizer or start from a model folder.")
  return os.fspath(epath.Path(data_dir) / info["tokenizer"])


def heldout_beir_dirs(data_dir: str) -> list[str]:
  """[the dataset's heldout/ BEIR folder] when it has one, else []."""
  path = epath.Path(data_dir) / "heldout"
  return [os.fspath(path)] if (path / "queries.jsonl").exists() else []


class SourceReader:
  """Random access to one source's examples (a split of the TFDS dataset)."""

  def __init__(self, data_dir: str, entry: dict, sources: Optional[dict] = None):
    sources = sources if sources is not None else open_splits(data_dir)
    self.source = sources[entry["split"]]
    with (epath.Path(data_dir) / entry["negatives_file"]).open("rb") as f:
      self.num_negatives = np.load(f)
    if len(self.source) != len(self.num_negatives):
      raise ValueError(f"{data_dir}: split {entry['split']!r} holds {len(self.source)} examples "
                       f"but {entry['negatives_file']} counts {len(self.num_negatives)}; "
                       "rebuild the dataset with launch/prepare_data.py.")

  def __len__(self) -> int:
    return len(self.num_negatives)

  def read(self, indices: list[int]) -> list[dict]:
    rows = self.source.__getitems__([int(i) for i in indices])
    return [{"query": r["query"].decode(), "document": r["document"].decode(),
             "negatives": [n.decode() for n in r["negatives"]]} for r in rows]
