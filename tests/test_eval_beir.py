"""BEIR folders: loading conventions, bad-input errors and warnings, and evaluate_beir end to end
on hand-built folders whose metrics are computed by hand."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from moe_embed import evaluation
from moe_embed.evaluation import beir
from tests.beir_folders import one_pair_beir, write_beir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# --- loading -----------------------------------------------------------------------------


def test_document_text_joins_title_and_text_as_beir_does(tmp_path):
  folder = write_beir(tmp_path, [
      {"_id": "d1", "title": "Title", "text": "body"},
      {"_id": "d2", "title": "", "text": "no title"},
      {"_id": "d3", "text": "  missing title  "},
      {"_id": "d4", "title": None, "text": "null title"},
      {"_id": 5, "title": " spaced ", "text": " text "},
  ], [{"_id": "q1", "text": "  query kept as written "}], ["q1\td1\t1"])
  data = beir.load_beir(folder)
  assert data.doc_ids == ["d1", "d2", "d3", "d4", "5"]
  assert data.doc_texts == ["Title body", "no title", "missing title", "null title",
                            "spaced   text"]
  assert data.query_texts == ["  query kept as written "]
  assert data.name == os.path.basename(str(tmp_path))


def test_only_queries_with_a_relevant_document_are_encoded(tmp_path):
  folder = write_beir(tmp_path, [{"_id": "d1", "text": "a"}, {"_id": "d2", "text": "b"}],
                      [{"_id": "q1", "text": "x"}, {"_id": "q2", "text": "y"},
                   {"_id": "q3", "text": "unjudged"}],
                      ["q1\td1\t1", "q2\td2\t0", "q2\td1\t-1"])
  data = beir.load_beir(folder)
  assert data.query_ids == ["q1"]
  assert data.qrels == {"q1": {"d1": 1}, "q2": {"d2": 0, "d1": -1}}
  assert data.counts["queries_without_relevant"] == 1
  assert data.counts["unjudged_queries"] == 1
  assert any("1 judged queries have no relevant document" in w for w in data.warnings)


def test_qrels_header_is_optional(tmp_path):
  folder = write_beir(tmp_path, [{"_id": "d1", "text": "a"}], [{"_id": "q1", "text": "x"}],
                      ["q1\td1\t2"], header="")
  assert beir.load_beir(folder).qrels == {"q1": {"d1": 2}}


def test_missing_folder_and_files_are_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="BEIR folder .*nope does not exist"):
    beir.load_beir(str(tmp_path / "nope"))
  for name in ("corpus.jsonl", "queries.jsonl", os.path.join("qrels", "test.tsv")):
    folder = one_pair_beir(tmp_path / name.replace(os.sep, "_"))
    os.remove(os.path.join(folder, name))
    with pytest.raises(FileNotFoundError, match=f"{name} is missing"):
      beir.load_beir(folder)
  with pytest.raises(FileNotFoundError, match="dev.tsv is missing"):
    beir.load_beir(one_pair_beir(tmp_path / "split"), split="dev")


@pytest.mark.parametrize("file,lines,message", [
    ("corpus", ['{"_id": "d1", "text": "x"}', "", '{broken'], r"corpus.jsonl:3: invalid JSON"),
    ("corpus", ['{"_id": "d1", "text": "x"}', '["a", "list"]'],
     r"corpus.jsonl:2: expected a JSON object"),
    ("corpus", ['{"_id": "d1", "title": "t"}'], r"corpus.jsonl:1: missing field 'text'"),
    ("corpus", ['{"_id": "d1", "text": 3}'], r"corpus.jsonl:1: field 'text' must be a string"),
    ("corpus", ['{"_id": "d1", "text": "x", "title": ["t"]}'],
     r"corpus.jsonl:1: field 'title' must be a string"),
    ("queries", ['{"_id": "q1", "text": "x"}', '{"text": "y"}'],
     r"queries.jsonl:2: missing field '_id'"),
    ("queries", ['{"_id": 1.5, "text": "x"}'], r"queries.jsonl:1: field '_id' must be a string"),
    ("qrels", ["q1\td1\t1", "q1\td1"], r"test.tsv:3: expected 'query-id<TAB>corpus-id<TAB>"),
    ("qrels", ["q1\td1\t1", "q1 d1 1"], r"test.tsv:3: .*1 tab-separated fields"),
    ("qrels", ["q1\td1\t0.5"], r"test.tsv:2: expected"),
])
def test_malformed_lines_are_named_with_their_line_number(tmp_path, file, lines, message):
  corpus = [{"_id": "d1", "text": "x"}]
  queries = [{"_id": "q1", "text": "y"}]
  qrels = ["q1\td1\t1"]
  if file == "corpus":
    corpus = lines
  elif file == "queries":
    queries = lines
  else:
    qrels = lines
  folder = write_beir(tmp_path, corpus, queries, qrels)
  with pytest.raises(beir.BeirFormatError, match=message):
    beir.load_beir(folder)


def test_unknown_ids_empty_texts_and_repeats_are_counted_and_reported(tmp_path):
  folder = write_beir(tmp_path, [
      {"_id": "d1", "text": "a"}, {"_id": "d2", "text": "  "}, {"_id": "d1", "text": "a2"}],
      [{"_id": "q1", "text": ""}, {"_id": "q2", "text": "y"}],
      ["q1\td1\t1", "q1\tghost\t1", "qx\td2\t1", "qy\tghost\t1", "q2\td2\t1", "q2\td2\t2"])
  data = beir.load_beir(folder)
  c = data.counts
  assert (c["unknown_qrels_queries"], c["unknown_qrels_docs"]) == (2, 1)
  assert (c["empty_docs"], c["empty_queries"]) == (1, 1)
  assert (c["repeated_doc_ids"], c["repeated_qrels_pairs"]) == (1, 1)
  assert data.doc_ids == ["d1", "d2"] and data.doc_texts == ["a2", ""]  # The last line wins.
  assert data.qrels == {"q1": {"d1": 1}, "q2": {"d2": 2}}
  text = "\n".join(data.warnings)
  assert "3 qrels lines name unknown query or document ids" in text
  assert "line 3: 'q1' -> 'ghost'" in text
  assert "1 documents have empty text" in text
  assert "1 evaluated queries have empty text" in text


# --- evaluate_beir end to end -------------------------------------------------------------


class TableEncoder:
  """Looks each (prefix + text) up in a fixed table; records the calls it gets."""

  query_prefix = "search_query: "
  doc_prefix = "search_document: "

  def __init__(self, table):
    self.table = table
    self.calls = []

  def __call__(self, texts, prefix):
    self.calls.append((prefix, len(texts)))
    return np.array([self.table[t] for t in texts], np.float32)

  def encode(self, texts, *, prefix="", batch_size=64, show_progress=True):
    self.calls.append((prefix, len(texts)))
    return np.array([self.table[t.removeprefix(prefix)] for t in texts], np.float32)


def _toy_folder(path):
  """3 queries over 4 documents with graded judgements and one identical id."""
  corpus = [{"_id": "d1", "title": "Cats", "text": "purr"},  # "Cats purr"
            {"_id": "d2", "text": "dogs bark"},
            {"_id": "q3", "text": "fish swim"},  # Same id as query q3: BEIR ignores it.
            {"_id": "d4", "text": "birds sing"}]
  queries = [{"_id": "q1", "text": "cat"}, {"_id": "q2", "text": "dog"},
             {"_id": "q3", "text": "fish"}, {"_id": "q4", "text": "no relevant"}]
  qrels = ["q1\td1\t2", "q1\td4\t1", "q2\td2\t1", "q3\td4\t1", "q4\td1\t0"]
  return write_beir(path, corpus, queries, qrels)


TABLE = {  # Encoder outputs; evaluate_beir normalises them.
    "Cats purr": [1.0, 0.0, 0.0], "dogs bark": [0.0, 1.0, 0.0],
    "fish swim": [0.0, 0.0, 1.0], "birds sing": [0.5, 0.5, 0.8],  # Norm sqrt(1.14).
    "cat": [0.8, 0.0, 0.6],  # Cosines: d1 0.8, d2 0, q3 0.6, d4 0.824.
    "dog": [0.6, 0.8, 0.0],  # d1 0.6, d2 0.8, q3 0, d4 0.656.
    "fish": [0.0, 0.0, 1.0],  # d1 0, d2 0, q3 1 (dropped: same id), d4 0.749.
    "no relevant": [1.0, 0.0, 0.0],
}


def test_evaluate_beir_metrics_by_hand(tmp_path):
  folder = _toy_folder(tmp_path / "toy")
  encoder = TableEncoder(TABLE)
  out = evaluation.evaluate_beir(encoder.__call__, [folder])
  r = out["toy"]
  # q1 ranks d4 (grade 1), d1 (grade 2), q3, d2: DCG = 1 + 2/log2(3); ideal = 2 + 1/log2(3).
  ndcg1 = (1 + 2 / math.log2(3)) / (2 + 1 / math.log2(3))
  # q2 ranks d2 first: 1. q3 ranks d4 first once its own id is dropped: 1.
  assert r["ndcg@10"] == pytest.approx((ndcg1 + 1 + 1) / 3, abs=1e-6)
  assert r["mrr@10"] == pytest.approx(1.0)
  assert r["recall@10"] == r["recall@100"] == pytest.approx(1.0)
  assert (r["num_queries"], r["skipped_queries"], r["num_docs"]) == (3, 1, 4)
  assert out["average"]["ndcg@10"] == pytest.approx(r["ndcg@10"])
  # A plain function gets no prefixes: the 3 scored queries once (first: the documents
  # are searched chunk by chunk against them), then the documents once.
  assert encoder.calls == [("", 3), ("", 4)]


def test_prefixes_default_to_the_encoders_own_and_can_be_overridden(tmp_path):
  folder = _toy_folder(tmp_path / "toy")
  encoder = TableEncoder(TABLE)
  plain = evaluation.evaluate_beir(TableEncoder(TABLE), [folder])
  via_object = evaluation.evaluate_beir(encoder, [folder], batch_size=2)
  assert encoder.calls == [("search_query: ", 3), ("search_document: ", 4)]
  assert via_object["toy"] == plain["toy"]
  encoder.calls.clear()
  evaluation.evaluate_beir(encoder, [folder], query_prefix="", doc_prefix="doc: ")
  assert encoder.calls == [("", 3), ("doc: ", 4)]


def test_matryoshka_dim_keeps_leading_dims_and_renormalises(tmp_path):
  folder = _toy_folder(tmp_path / "toy")
  full = evaluation.evaluate_beir(TableEncoder(TABLE), [folder])["toy"]
  out = evaluation.evaluate_beir(TableEncoder(TABLE), [folder], dim=2)["toy"]
  # Leading 2 dims, re-normalised: documents d1 (1,0), d2 (0,1), q3 (0,0),
  # d4 (0.707,0.707); queries cat (1,0), dog (0.6,0.8), fish (0,0).
  # q1: d1 1 > d4 0.707: the ideal order, 1. q2: d4 0.99 > d2 0.8: d2 second.
  # q3: all scores 0; ties by descending id put d4 first: 1.
  assert out["ndcg@10"] == pytest.approx((1 + 1 / math.log2(3) + 1) / 3, abs=1e-6)
  assert out["mrr@10"] == pytest.approx((1 + 0.5 + 1) / 3, abs=1e-6)
  ndcg1 = (1 + 2 / math.log2(3)) / (2 + 1 / math.log2(3))
  assert full["ndcg@10"] == pytest.approx((ndcg1 + 1 + 1) / 3, abs=1e-6)
  with pytest.raises(ValueError, match="dim=4 must be between 1 and the embedding width 3"):
    evaluation.evaluate_beir(TableEncoder(TABLE), [folder], dim=4)


def test_average_is_the_unweighted_mean_over_folders(tmp_path):
  good = _toy_folder(tmp_path / "good")
  other = _toy_folder(tmp_path / "other")
  table = dict(TABLE, cat=[0.0, 1.0, 0.0])
  # In "other", q1 = (0,1,0) ranks d2 (1), d4 (0.468), then q3 and d1 tie at 0:
  # by descending id q3 before d1. d4 (grade 1) at rank 2, d1 (grade 2) at 4.
  ndcg1 = (1 / math.log2(3) + 2 / math.log2(5)) / (2 + 1 / math.log2(3))

  class PerFolder(TableEncoder):
    def __call__(self, texts, prefix):
      self.calls.append((prefix, len(texts)))
      folder_table = table if len(self.calls) > 2 else TABLE  # good first, then other.
      return np.array([folder_table[t] for t in texts], np.float32)

  out = evaluation.evaluate_beir(PerFolder(TABLE).__call__, [good, other])
  assert list(out) == ["good", "other", "average"]
  assert out["other"]["ndcg@10"] == pytest.approx((ndcg1 + 1 + 1) / 3, abs=1e-6)
  assert out["other"]["mrr@10"] == pytest.approx((0.5 + 1 + 1) / 3, abs=1e-6)
  assert out["good"]["mrr@10"] == pytest.approx(1.0)
  for key in evaluation.METRIC_KEYS:
    assert out["average"][key] == pytest.approx((out["good"][key] + out["other"][key]) / 2)
  assert out["average"]["num_queries"] == 6 and out["average"]["num_docs"] == 8
  assert out["average"]["skipped_queries"] == 2
  json.dumps(out)  # Plain Python numbers: the launcher writes this as JSON.


def test_bad_folder_fails_before_anything_is_encoded(tmp_path):
  good = _toy_folder(tmp_path / "good")
  bad = one_pair_beir(tmp_path / "bad")
  with open(os.path.join(bad, "queries.jsonl"), "a") as f:
    f.write("{not json\n")
  encoder = TableEncoder(TABLE)
  with pytest.raises(beir.BeirFormatError, match="queries.jsonl:2"):
    evaluation.evaluate_beir(encoder, [good, bad])
  assert encoder.calls == []
  os.makedirs(tmp_path / "x" / "good")
  with pytest.raises(ValueError, match="share the name 'good'"):
    evaluation.evaluate_beir(encoder, [good, str(tmp_path / "x" / "good")])


def test_encoder_returning_wrong_shapes_or_nan_is_reported(tmp_path):
  folder = _toy_folder(tmp_path / "toy")
  with pytest.raises(ValueError, match="returned shape .* for 3 texts"):
    evaluation.evaluate_beir(lambda texts, prefix: np.zeros((1, 3)), [folder])
  with pytest.raises(ValueError, match="NaN or Inf"):
    evaluation.evaluate_beir(lambda texts, prefix: np.full((len(texts), 3), np.nan), [folder])


def test_launcher_reports_a_malformed_folder_before_loading_the_model(tmp_path):
  bad = one_pair_beir(tmp_path / "bad")
  with open(os.path.join(bad, "qrels", "test.tsv"), "a") as f:
    f.write("q1\td1\n")
  proc = subprocess.run(
      [sys.executable, "launch/eval.py", f"--model={tmp_path / 'no_model'}", f"--beir={bad}"],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0
  assert "test.tsv:3: expected 'query-id<TAB>corpus-id<TAB>integer score'" in proc.stderr
  proc = subprocess.run(
      [sys.executable, "launch/eval.py", f"--model={tmp_path / 'no_model'}",
       f"--beir={_toy_folder(tmp_path / 'toy')}"],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0 and "no_model does not exist" in proc.stderr
