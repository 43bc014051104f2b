"""The Beam preparation path: the same dataset as the in-process path, from one file or shards.

Beam's DirectRunner takes seconds to start, so the runs are few, small and
shared by the tests through module-scoped fixtures.
"""

import functools
import gzip
import json
import os
import subprocess
import sys

import numpy as np
import pytest

beam_prepare = pytest.importorskip("moe_embed.data.beam_prepare")

from moe_embed import data  # noqa: E402
from moe_embed.data import dataset  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEAM = dict(runner="DirectRunner", beam_options="direct_num_workers=1")
OPTIONS = {"clf": {"query_prefix": "classification: ", "doc_prefix": "classification: ",
                   "max_query_len": 64}}
BAD_LINES = ["{not json", json.dumps({"query": "only a query"}), "[1, 2]",
             json.dumps({"query": "q", "document": "d", "negatives": "not a list"})]


def _lines():
  """JSONL lines of three sources with duplicates (also across sources) and bad lines."""
  rows = []
  for source, n in {"web": 40, "clf": 25, "q-a": 30}.items():
    for i in range(n):
      rows.append({"query": f"{source} question {i}", "document": f"{source} answer {i}",
                   "negatives": [f"{source} wrong {i}-{j}" for j in range(i % 4)],
                   "source": source})
  order = np.random.default_rng(0).permutation(len(rows))
  rows = [rows[i] for i in order]
  rows[60:60] = rows[5:15]  # Duplicates within a source.
  rows[80:80] = [dict(r, source="q-a") for r in rows[20:24]]  # Duplicates across sources.
  lines = [json.dumps(r) for r in rows]
  for i, bad in enumerate(BAD_LINES):
    lines.insert(7 + 29 * i, bad)
  lines.insert(50, "")
  return lines


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """(folder, lines): the lines as all.jsonl and as four shards, one gzipped."""
  folder = tmp_path_factory.mktemp("corpus")
  lines = _lines()
  (folder / "all.jsonl").write_text("\n".join(lines) + "\n")
  bounds = np.linspace(0, len(lines), 5).astype(int)
  for i in range(4):
    text = "\n".join(lines[bounds[i]:bounds[i + 1]]) + "\n"
    if i == 2:
      with gzip.open(folder / f"part-{i}.jsonl.gz", "wt") as f:
        f.write(text)
    else:
      (folder / f"part-{i}.jsonl").write_text(text)
  return folder, lines


def _prepare(inputs, out, **kw):
  info, report = data.prepare(str(inputs), str(out), source_prefixes=OPTIONS, **kw)
  return str(out), info, report


@pytest.fixture(scope="module")
def in_process(corpus, tmp_path_factory):
  return _prepare(corpus[0] / "all.jsonl", tmp_path_factory.mktemp("in") / "ds")


@pytest.fixture(scope="module")
def beam_file(corpus, tmp_path_factory):
  return _prepare(corpus[0] / "all.jsonl", tmp_path_factory.mktemp("beam") / "ds", **BEAM)


@pytest.fixture(scope="module")
def beam_shards(corpus, tmp_path_factory):
  """From the glob of shards, with 3 TFDS shards per split and 8-key negatives pieces."""
  import tensorflow_datasets as tfds
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(beam_prepare, "CHUNK", 8)
    patch.setattr(beam_prepare.tfds.download, "DownloadConfig",
                  functools.partial(tfds.download.DownloadConfig, num_shards=3))
    return _prepare(corpus[0] / "part-*", tmp_path_factory.mktemp("shards") / "ds", **BEAM)


def _contents(data_dir, info):
  """Source -> (its examples in split order, its negatives counts)."""
  out = {}
  for source, entry in info["sources"].items():
    reader = dataset.SourceReader(data_dir, entry)
    out[source] = (reader.read(list(range(len(reader)))), reader.num_negatives)
  return out


def _assert_same(a, b):
  assert a.keys() == b.keys()
  for source in a:
    assert a[source][0] == b[source][0], source
    np.testing.assert_array_equal(a[source][1], b[source][1])


def test_beam_writes_what_the_in_process_path_writes(in_process, beam_file):
  (ref_dir, ref_info, ref_report), (got_dir, got_info, got_report) = in_process, beam_file
  assert got_info == ref_info and got_report == ref_report
  assert (ref_info["duplicates_dropped"], ref_info["malformed_skipped"]) == (14, 4)
  assert sorted(ref_info["sources"]) == ["clf", "q-a", "web"]
  contents = _contents(got_dir, got_info)
  _assert_same(contents, _contents(ref_dir, ref_info))
  assert contents["web"][1].tolist() == [len(r["negatives"]) for r in contents["web"][0]]
  for folder in ("", os.path.join("tfds", "contrastive_pairs", "1.0.0")):
    assert (sorted(os.listdir(os.path.join(got_dir, folder)))
            == sorted(os.listdir(os.path.join(ref_dir, folder))))
  assert not os.path.exists(got_dir + ".tmp")


def test_a_glob_of_shards_equals_the_concatenated_file(beam_shards, beam_file):
  (shard_dir, shard_info, report), (file_dir, file_info, file_report) = beam_shards, beam_file
  # The file listing names the shards, and 3 inputs give 3 shards per split, so it differs;
  # each listing is checked against its own folder.
  assert {k: v for k, v in shard_info.items() if k != "files"} == {
      k: v for k, v in file_info.items() if k != "files"}
  for folder, info in ((shard_dir, shard_info), (file_dir, file_info)):
    assert info["files"] == dataset.file_sizes(folder)
  assert (report.read, report.duplicates, report.malformed) == (
      file_report.read, file_report.duplicates, file_report.malformed)
  assert report.examples[0].endswith("part-0.jsonl:8: invalid JSON (Expecting property name "
                                     "enclosed in double quotes)")
  assert any("part-2.jsonl.gz" in e for e in report.examples)
  _assert_same(_contents(shard_dir, shard_info), _contents(file_dir, file_info))
  tfds_files = os.listdir(os.path.join(shard_dir, "tfds", "contrastive_pairs", "1.0.0"))
  assert sum(".array_record-" in f and "-of-00003" in f for f in tfds_files) == 9


def test_source_prefixes_are_stored_and_checked(in_process, corpus, tmp_path):
  _, info, _ = in_process
  assert info["sources"]["clf"] == {"split": "clf", "negatives_file": "negatives-clf.npy",
                                    "num_examples": 25, **OPTIONS["clf"]}
  assert "query_prefix" not in info["sources"]["web"]
  src = str(corpus[0] / "all.jsonl")
  path = tmp_path / "prefixes.json"
  path.write_text(json.dumps({"web": {"doc_prefix": "search_document: "}}))
  info, _ = data.prepare(src, str(tmp_path / "from_file"), source_prefixes=str(path))
  assert info["sources"]["web"]["doc_prefix"] == "search_document: "
  bad = {'{"clf": {"query_prefx": "x"}}': r"key 'query_prefx'\. Did you mean 'query_prefix'\?",
         '{"clf": {"max_doc_len": "64"}}': r"max_doc_len='64' must be an integer >= 3",
         '{"clf": ': "not valid JSON", str(tmp_path / "none.json"): "neither a JSON object"}
  for value, message in bad.items():
    with pytest.raises((ValueError, FileNotFoundError), match=message):
      data.prepare(src, str(tmp_path / "bad"), source_prefixes=value)
  for kw in ({}, BEAM):  # Unknown sources: after reading, before anything is written.
    with pytest.raises(ValueError, match=r"unknown sources \['zz'\]; the data has \['clf', "):
      data.prepare(src, str(tmp_path / "bad"), source_prefixes={"zz": {}}, **kw)
  assert not os.path.exists(tmp_path / "bad") and not os.path.exists(tmp_path / "bad.tmp")


def test_prepare_data_launcher_with_a_runner(corpus, tmp_path):
  options = tmp_path / "prefixes.json"
  options.write_text(json.dumps(OPTIONS))
  proc = subprocess.run(
      [sys.executable, "launch/prepare_data.py", f"--input={corpus[0]}/part-*",
       f"--output={tmp_path}/ds", "--runner=DirectRunner",
       "--beam_pipeline_options=--direct_num_workers=1", f"--source_prefixes={options}"],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Wrote 95 examples" in proc.stdout
  assert "dropped 14 duplicate pairs; skipped 4 malformed lines" in proc.stdout
  assert "part-0.jsonl:8: invalid JSON" in proc.stdout
  assert dataset.read_info(str(tmp_path / "ds"))["sources"]["clf"]["max_query_len"] == 64
