"""Retrieval evaluation: metrics by hand and against pytrec_eval, chunked search against
NumPy, BEIR loading errors, and all-MiniLM-L6-v2's nDCG@10 against sentence-transformers."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from moe_embed import evaluation, inference
from moe_embed.data import corpus_stdlib
from moe_embed.evaluation import beir, metrics, search
from tests.reference_models import minilm_folder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_metrics_on_hand_computed_cases():
  qrels = {"q1": {"a": 2, "b": 1, "z": 0}, "q2": {"c": 1}, "q3": {"d": 0}}
  run = {"q1": {"x": 0.9, "b": 0.8, "a": 0.7, "z": 0.6}, "q2": {"y": 0.5, "c": 0.5}}
  out = metrics.evaluate_run(run, qrels)
  dcg1 = 1 / math.log2(3) + 2 / math.log2(4)
  idcg1 = 2 / math.log2(2) + 1 / math.log2(3)
  # q2: tie at 0.5 is broken by descending doc id, so "y" ranks before "c".
  ndcg2 = (1 / math.log2(3)) / 1.0
  assert out["skipped_queries"] == 1 and out["num_queries"] == 2
  np.testing.assert_allclose(out["ndcg@10"], (dcg1 / idcg1 + ndcg2) / 2)
  np.testing.assert_allclose(out["mrr@10"], (1 / 2 + 1 / 2) / 2)
  np.testing.assert_allclose(out["recall@10"], 1.0)
  assert metrics.recall_at(["a"], {"a": 1, "b": 1, "c": 0}, 10) == 0.5


def test_metrics_match_pytrec_eval_on_random_runs():
  pytrec_eval = pytest.importorskip("pytrec_eval")
  rng = np.random.default_rng(0)
  docs = [f"d{i}" for i in range(60)]
  qrels, run = {}, {}
  for q in range(40):
    judged = rng.choice(docs, size=rng.integers(1, 6), replace=False)
    qrels[f"q{q}"] = {d: int(rng.integers(0, 3)) for d in judged}
    run[f"q{q}"] = {d: float(np.round(rng.normal(), 2)) for d in rng.choice(docs, 30, replace=False)}
  ours = metrics.evaluate_run(run, qrels)
  kept = {q: j for q, j in qrels.items() if any(g > 0 for g in j.values())}
  ref = pytrec_eval.RelevanceEvaluator(kept, {"ndcg_cut.10", "recall.10", "recall.100"})
  scores = ref.evaluate(run)
  np.testing.assert_allclose(ours["ndcg@10"], np.mean([s["ndcg_cut_10"] for s in scores.values()]),
                             atol=1e-9)
  np.testing.assert_allclose(ours["recall@10"], np.mean([s["recall_10"] for s in scores.values()]),
                             atol=1e-9)
  np.testing.assert_allclose(ours["recall@100"],
                             np.mean([s["recall_100"] for s in scores.values()]), atol=1e-9)


@pytest.mark.parametrize("nq,nd,k,qc,dc", [(7, 50, 5, 3, 16), (5, 4, 10, 8, 3), (33, 100, 100, 10, 7)])
def test_chunked_search_equals_full_argsort(nq, nd, k, qc, dc):
  rng = np.random.default_rng(nq)
  q = rng.normal(size=(nq, 8)).astype(np.float32)
  d = rng.normal(size=(nd, 8)).astype(np.float32)
  scores, ids = search.top_k(q, d, k, query_chunk=qc, doc_chunk=dc)
  full = q @ d.T
  want = np.argsort(-full, axis=1, kind="stable")[:, :min(k, nd)]
  np.testing.assert_array_equal(ids, want)
  np.testing.assert_allclose(scores, np.take_along_axis(full, want, 1), rtol=1e-5, atol=1e-5)


def _write_beir(folder, corpus, queries, qrels_lines):
  os.makedirs(os.path.join(folder, "qrels"), exist_ok=True)
  with open(os.path.join(folder, "corpus.jsonl"), "w") as f:
    for row in corpus:
      f.write(json.dumps(row) + "\n")
  with open(os.path.join(folder, "queries.jsonl"), "w") as f:
    for row in queries:
      f.write(json.dumps(row) + "\n")
  with open(os.path.join(folder, "qrels", "test.tsv"), "w") as f:
    f.write("query-id\tcorpus-id\tscore\n" + "".join(l + "\n" for l in qrels_lines))


def test_beir_loading_counts_unknown_ids_and_joins_titles(tmp_path):
  _write_beir(str(tmp_path), [{"_id": "d1", "title": "Title", "text": "body"},
                              {"_id": "d2", "title": "", "text": "other"}],
              [{"_id": "q1", "text": "question"}, {"_id": "q2", "text": "unjudged"}],
              ["q1\td1\t1", "q1\tnope\t1", "qx\td2\t1"])
  data = beir.load_beir(str(tmp_path))
  assert data.doc_texts == ["Title body", "other"]
  assert data.query_ids == ["q1"]
  assert any("2 qrels lines name unknown" in w for w in data.warnings)
  os.remove(tmp_path / "queries.jsonl")
  with pytest.raises(FileNotFoundError, match="queries.jsonl is missing"):
    beir.load_beir(str(tmp_path))


def test_beir_malformed_line_names_it(tmp_path):
  _write_beir(str(tmp_path), [{"_id": "d1", "text": "x"}], [{"_id": "q1", "text": "y"}], ["q1\td1\t1"])
  with open(tmp_path / "corpus.jsonl", "a") as f:
    f.write("{broken\n")
  with pytest.raises(ValueError, match="corpus.jsonl:2: invalid JSON"):
    beir.load_beir(str(tmp_path))


@pytest.fixture(scope="module")
def small_beir(tmp_path_factory):
  out = tmp_path_factory.mktemp("beir")
  corpus_stdlib.build_pairs(str(out), heldout_fraction=0.05, num_distractors=400)
  return str(out / "heldout")


@pytest.mark.torch
def test_minilm_ndcg_matches_sentence_transformers_evaluator(small_beir, tmp_path):
  pytest.importorskip("torch")
  st = pytest.importorskip("sentence_transformers")
  from sentence_transformers.evaluation import InformationRetrievalEvaluator
  folder = minilm_folder()
  data = beir.load_beir(small_beir)
  evaluator = InformationRetrievalEvaluator(
      queries=dict(zip(data.query_ids, data.query_texts)),
      corpus=dict(zip(data.doc_ids, data.doc_texts)),
      relevant_docs={q: {d for d, g in j.items() if g > 0} for q, j in data.qrels.items()},
      ndcg_at_k=[10], mrr_at_k=[10], accuracy_at_k=[1], precision_recall_at_k=[10, 100],
      map_at_k=[10], show_progress_bar=False, batch_size=32)
  reference = evaluator(st.SentenceTransformer(folder, device="cpu"))
  ref_ndcg = next(v for k, v in reference.items() if k.endswith("cosine_ndcg@10"))
  out = tmp_path / "res.json"
  proc = subprocess.run([sys.executable, "launch/eval.py", f"--model={folder}",
                         f"--beir={small_beir}", f"--output={out}"], cwd=REPO,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  ours = json.load(open(out))
  assert set(ours["heldout"]) >= {"ndcg@10", "recall@10", "recall@100", "mrr@10",
                                  "num_queries", "num_docs"}
  assert ours["heldout"]["num_queries"] == len(data.query_ids)
  assert abs(ours["heldout"]["ndcg@10"] - ref_ndcg) <= 0.002, (ours["heldout"]["ndcg@10"], ref_ndcg)
  assert ours["average"]["ndcg@10"] == ours["heldout"]["ndcg@10"]


def test_matryoshka_dim_in_evaluation(small_beir):
  rng = np.random.default_rng(0)
  table = {}

  def encode(texts, prefix):
    out = []
    for t in texts:
      if t not in table:
        table[t] = rng.normal(size=16)
      out.append(table[t])
    x = np.asarray(out, np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)

  full = evaluation.evaluate_beir(encode, [small_beir])
  short = evaluation.evaluate_beir(encode, [small_beir], dim=4)
  assert full["heldout"]["num_docs"] == short["heldout"]["num_docs"]
  assert full["heldout"]["ndcg@10"] != short["heldout"]["ndcg@10"]
  with pytest.raises(ValueError, match="dim=32"):
    evaluation.evaluate_beir(encode, [small_beir], dim=32)
