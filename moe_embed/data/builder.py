"""TFDS builder for contrastive pairs: one split per source, ArrayRecord files.

The examples are staged as one JSONL file per source (already validated and
deduplicated by `dataset.build_dataset`); the builder turns each into a split of
ArrayRecord shards that `tfds.data_source` reads with random access and without
TensorFlow. Example order within a split is the staging order (no shuffling), so
a record's index is stable and the batch iterator's permutations are
reproducible. `beam_prepare` subclasses the builder to generate the splits with
Apache Beam instead; the files written are the same.

The ArrayRecord writer of the array_record wheel opens local files only (its
reader reads gs:// too), so a shard bound for an object store is written to a
local temporary file and then copied there.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Mapping

import tensorflow_datasets as tfds
from etils import epath
from tensorflow_datasets.core import writer as tfds_writer
from tensorflow_datasets.core.utils import py_utils

NAME = "contrastive_pairs"
DATASET_VERSION = "1.0.0"


class ContrastivePairs(tfds.core.GeneratorBasedBuilder):
  """{"query", "document", "negatives": [...]} examples, one split per source."""

  name = NAME
  VERSION = tfds.core.Version(DATASET_VERSION)
  RELEASE_NOTES = {DATASET_VERSION: "Query, document and hard negatives per source."}

  @py_utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS's default looks the file up through package resources, which needs the
    # optional `importlib_resources` package for a builder outside TFDS.
    return epath.Path(__file__)

  def __init__(self, *, staged: Mapping[str, str] | None = None, **kwargs):
    # staged: split name -> JSONL file of that split's examples (building only).
    self._staged = dict(staged or {})
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="Contrastive (query, document, hard negatives) pairs per source.",
        features=tfds.features.FeaturesDict({
            "query": tfds.features.Text(),
            "document": tfds.features.Text(),
            "negatives": tfds.features.Sequence(tfds.features.Text()),
        }),
        disable_shuffling=True,
    )

  def _example_writer(self) -> tfds_writer.ExampleWriter:
    return _ExampleWriter(file_format=self.info.file_format)

  def _split_generators(self, dl_manager):
    del dl_manager
    if not self._staged:
      raise ValueError("ContrastivePairs is built by moe_embed.data.prepare from JSONL files.")
    return {split: self._generate_examples(path) for split, path in self._staged.items()}

  def _generate_examples(self, path: str):
    with epath.Path(path).open(encoding="utf-8") as f:
      for index, line in enumerate(f):
        yield index, json.loads(line)


class _ExampleWriter(tfds_writer.ExampleWriter):
  """TFDS's shard writer; a shard for an object store is written locally, then copied."""

  def write(self, path, examples):
    if "://" not in os.fspath(path):
      return super().write(path, examples)
    with tempfile.TemporaryDirectory() as tmp:
      local = os.path.join(tmp, "shard")
      positions = super().write(local, examples)
      with open(local, "rb") as src, epath.Path(path).open("wb") as dst:
        shutil.copyfileobj(src, dst, 16 << 20)
    return positions


def build(staged: Mapping[str, str], tfds_dir: str) -> None:
  """Builds the ArrayRecord splits under tfds_dir/contrastive_pairs/1.0.0."""
  builder = ContrastivePairs(staged=staged, data_dir=tfds_dir,
                             file_format=tfds.core.FileFormat.ARRAY_RECORD)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(try_download_gcs=False))


def data_sources(tfds_dir: str) -> dict:
  """Split name -> random-access source of decoded examples (bytes values)."""
  return tfds.data_source(NAME, data_dir=tfds_dir, try_gcs=False)


def dataset_path(tfds_dir: str) -> str:
  return os.fspath(epath.Path(tfds_dir) / NAME / DATASET_VERSION)
