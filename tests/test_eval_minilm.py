"""all-MiniLM-L6-v2 on a small BEIR folder built from Python standard-library docstrings:
our pipeline's metrics against sentence-transformers' InformationRetrievalEvaluator and
pytrec_eval, then the same folder through moe_embed.inference and launch/eval.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from moe_embed import evaluation
from moe_embed.evaluation import beir, metrics
from tests.beir_folders import docstring_beir
from tests.reference_models import minilm_folder

pytestmark = pytest.mark.torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_DOCS = 200  # Documents with a query; a few unjudged distractors follow.


@pytest.fixture(scope="module")
def stdlib_beir(tmp_path_factory):
  """A BEIR folder: summary line -> the rest of its docstring (title = module on odd docs)."""
  folder = docstring_beir(tmp_path_factory.mktemp("beir") / "stdlib_docs",
                          num_queries=NUM_DOCS, num_docs=NUM_DOCS + 20)
  expected_texts = {}
  with open(os.path.join(folder, "corpus.jsonl")) as f:
    for line in f:
      doc = json.loads(line)
      expected_texts[doc["_id"]] = f"{doc['title']} {doc['text']}" if doc["title"] else doc["text"]
  return folder, expected_texts


@pytest.fixture(scope="module")
def minilm():
  pytest.importorskip("torch")
  st = pytest.importorskip("sentence_transformers")
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  folder = minilm_folder()
  return folder, st.SentenceTransformer(folder, device="cpu")


@pytest.fixture(scope="module")
def st_encode(stdlib_beir, minilm):
  """encode(texts, prefix) from sentence-transformers embeddings computed once per text."""
  folder, _ = stdlib_beir
  _, model = minilm
  data = beir.load_beir(folder)
  texts = sorted(set(data.doc_texts) | set(data.query_texts))
  vectors = model.encode(texts, batch_size=64, normalize_embeddings=True,
                         convert_to_numpy=True, show_progress_bar=False)
  table = dict(zip(texts, vectors))

  def encode(texts, prefix):
    assert prefix == "", prefix  # MiniLM was trained without prefixes.
    return np.stack([table[t] for t in texts])
  return encode


def _ir_evaluator():
  try:
    from sentence_transformers.sentence_transformer.evaluation import (
        InformationRetrievalEvaluator)
  except ImportError:
    from sentence_transformers.evaluation import InformationRetrievalEvaluator
  return InformationRetrievalEvaluator


@pytest.fixture(scope="module")
def reference(stdlib_beir, minilm):
  """sentence-transformers' own scores: it encodes the texts and ranks by cosine itself."""
  folder, expected_texts = stdlib_beir
  _, model = minilm
  queries = {}
  with open(os.path.join(folder, "queries.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      queries[row["_id"]] = row["text"]
  relevant = {q: {"doc" + q.removeprefix("query")} for q in queries}
  evaluator = _ir_evaluator()(
      queries=queries, corpus=expected_texts, relevant_docs=relevant, ndcg_at_k=[10],
      mrr_at_k=[10], accuracy_at_k=[1], precision_recall_at_k=[10, 100], map_at_k=[10],
      show_progress_bar=False, batch_size=64, write_csv=False)
  scores = evaluator(model)
  pick = lambda suffix: next(v for k, v in scores.items() if k.endswith("cosine_" + suffix))
  return {"ndcg@10": pick("ndcg@10"), "mrr@10": pick("mrr@10"),
          "recall@10": pick("recall@10"), "recall@100": pick("recall@100")}


def test_minilm_metrics_match_sentence_transformers(stdlib_beir, st_encode, reference):
  folder, expected_texts = stdlib_beir
  data = beir.load_beir(folder)
  assert dict(zip(data.doc_ids, data.doc_texts)) == expected_texts  # BEIR's title join.
  ours = evaluation.evaluate_beir(st_encode, [data])["stdlib_docs"]
  assert ours["num_queries"] == NUM_DOCS and ours["num_docs"] == NUM_DOCS + 20
  # A real retrieval task, neither trivial nor hopeless.
  assert 0.3 < ours["ndcg@10"] < 0.99, ours
  for key, value in reference.items():
    assert abs(ours[key] - value) <= 0.002, (key, ours[key], value)


def test_minilm_metrics_match_pytrec_eval_on_a_full_similarity_run(stdlib_beir, st_encode):
  pytrec_eval = pytest.importorskip("pytrec_eval")
  folder, _ = stdlib_beir
  data = beir.load_beir(folder)
  encode = st_encode
  docs, queries = encode(data.doc_texts, ""), encode(data.query_texts, "")
  full = queries.astype(np.float64) @ docs.astype(np.float64).T  # [queries, docs]
  run = {}
  for qi, qid in enumerate(data.query_ids):
    best = np.argsort(-full[qi], kind="stable")[:100]
    run[qid] = {data.doc_ids[j]: float(full[qi, j]) for j in best}
  per_query = pytrec_eval.RelevanceEvaluator(
      data.qrels, {"ndcg_cut.10", "recall.10", "recall.100"}).evaluate(run)
  ours = evaluation.evaluate_beir(encode, [data])["stdlib_docs"]
  for key, ref_key in (("ndcg@10", "ndcg_cut_10"), ("recall@10", "recall_10"),
                       ("recall@100", "recall_100")):
    ref = float(np.mean([s[ref_key] for s in per_query.values()]))
    assert abs(ours[key] - ref) <= 0.002, (key, ours[key], ref)
  # The same run through our metrics agrees to rounding: only the search differs above.
  assert metrics.evaluate_run(run, data.qrels)["ndcg@10"] == pytest.approx(
      float(np.mean([s["ndcg_cut_10"] for s in per_query.values()])), abs=1e-9)


def test_minilm_through_the_inference_embedder(stdlib_beir, minilm, reference):
  inference = pytest.importorskip("moe_embed.inference")
  folder, _ = stdlib_beir
  embedder = inference.load_embedder(minilm[0])
  assert (embedder.query_prefix, embedder.doc_prefix) == ("", "")
  ours = evaluation.evaluate_beir(embedder, [folder], batch_size=32)["stdlib_docs"]
  for key, value in reference.items():
    assert abs(ours[key] - value) <= 0.002, (key, ours[key], value)


def test_launcher_at_a_matryoshka_width(stdlib_beir, minilm, st_encode, tmp_path):
  """launch/eval.py --dim=128 against the sentence-transformers embeddings cut to 128."""
  folder, _ = stdlib_beir
  out = tmp_path / "scores.json"
  proc = subprocess.run(
      [sys.executable, "launch/eval.py", f"--model={minilm[0]}", f"--beir={folder}",
       f"--output={out}", "--dim=128", "--batch_size=32"],
      cwd=REPO, capture_output=True, text=True, timeout=600,
      env=dict(os.environ, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "stdlib_docs" in proc.stdout and "ndcg@10" in proc.stdout
  with open(out) as f:
    written = json.load(f)
  assert set(written) == {"stdlib_docs", "average"}
  assert set(written["stdlib_docs"]) >= {"ndcg@10", "recall@10", "recall@100", "mrr@10",
                                         "num_queries", "num_docs"}
  cut = evaluation.evaluate_beir(st_encode, [folder], dim=128)["stdlib_docs"]
  full = evaluation.evaluate_beir(st_encode, [folder])["stdlib_docs"]
  assert cut["ndcg@10"] != full["ndcg@10"]  # The width really changes the ranking.
  for key in evaluation.METRIC_KEYS:
    assert abs(written["stdlib_docs"][key] - cut[key]) <= 0.002, (key, written, cut)
  assert written["average"]["ndcg@10"] == written["stdlib_docs"]["ndcg@10"]
