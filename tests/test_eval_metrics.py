"""Retrieval metrics against hand-computed cases and pytrec_eval; chunked search against NumPy."""

from __future__ import annotations

import math

import numpy as np
import pytest

from moe_embed.evaluation import beir, evaluator, metrics, search


def _log2(x):
  return math.log2(x)


# --- metrics: hand-computed cases ---------------------------------------------------------


def test_ndcg_graded_gains_hand_case():
  # Ranking x(0), b(1), a(2), z(0): gains 0, 1, 2, 0 at ranks 1..4.
  judged = {"a": 2, "b": 1, "z": 0}
  ranked = ["x", "b", "a", "z"]
  dcg = 1 / _log2(3) + 2 / _log2(4)
  ideal = 2 / _log2(2) + 1 / _log2(3)
  assert metrics.ndcg_at(ranked, judged, 10) == pytest.approx(dcg / ideal, abs=1e-12)
  # Cut at 2: only b counts; the ideal list is cut at 2 too.
  assert metrics.ndcg_at(ranked, judged, 2) == pytest.approx((1 / _log2(3)) / ideal, abs=1e-12)
  # Cut at 1: nothing relevant at rank 1.
  assert metrics.ndcg_at(ranked, judged, 1) == 0.0
  # Perfect order.
  assert metrics.ndcg_at(["a", "b"], judged, 10) == pytest.approx(1.0)


def test_negative_grades_gain_nothing():
  # trec_eval: a negative judgement counts as non-relevant, not as a penalty.
  judged = {"a": -1, "b": 1}
  assert metrics.ndcg_at(["a", "b"], judged, 2) == pytest.approx(1 / _log2(3))
  assert metrics.recall_at(["a"], judged, 1) == 0.0
  assert metrics.mrr_at(["a", "b"], judged, 10) == 0.5


def test_recall_and_mrr_hand_cases():
  judged = {"a": 1, "b": 3, "c": 0}
  ranked = [f"n{i}" for i in range(9)] + ["b"] + ["a"]  # b at rank 10, a at rank 11.
  assert metrics.recall_at(ranked, judged, 10) == 0.5  # c (grade 0) is not relevant.
  assert metrics.recall_at(ranked, judged, 100) == 1.0
  assert metrics.mrr_at(ranked, judged, 10) == pytest.approx(0.1)
  assert metrics.mrr_at(ranked, judged, 9) == 0.0
  assert metrics.mrr_at(["c", "a"], judged, 10) == 0.5


def test_ties_broken_by_descending_doc_id_whatever_the_run_order():
  # trec_eval orders equal scores by doc id, descending ("d2" > "d10" as strings).
  for order in (["d10", "d2", "d1"], ["d1", "d2", "d10"], ["d2", "d10", "d1"]):
    run = {d: 0.5 for d in order}
    assert metrics.rank(run) == ["d2", "d10", "d1"]
  judged = {"d10": 1}
  out = metrics.evaluate_run({"q": {"d10": 0.5, "d2": 0.5, "d1": 0.9}}, {"q": judged})
  assert out["mrr@10"] == pytest.approx(1 / 3)
  assert out["ndcg@10"] == pytest.approx(1 / _log2(4))


def test_evaluate_run_skips_and_counts_queries_without_relevant_documents():
  qrels = {"q1": {"a": 2, "b": 1, "z": 0}, "q2": {"c": 1}, "q3": {"d": 0}, "q4": {"e": 1}}
  run = {"q1": {"x": 0.9, "b": 0.8, "a": 0.7, "z": 0.6}, "q2": {"y": 0.5, "c": 0.5},
         "q3": {"d": 1.0}}  # q4 is judged but missing from the run: it scores 0.
  out = metrics.evaluate_run(run, qrels)
  assert out["num_queries"] == 3 and out["skipped_queries"] == 1
  ndcg1 = (1 / _log2(3) + 2 / _log2(4)) / (2 + 1 / _log2(3))
  ndcg2 = 1 / _log2(3)  # Tie at 0.5: "y" > "c", so c is second.
  assert out["ndcg@10"] == pytest.approx((ndcg1 + ndcg2 + 0) / 3)
  assert out["mrr@10"] == pytest.approx((1 / 2 + 1 / 2 + 0) / 3)
  assert out["recall@10"] == pytest.approx((1 + 1 + 0) / 3)
  assert out["recall@100"] == pytest.approx(2 / 3)


def test_empty_qrels_give_zero_queries():
  out = metrics.evaluate_run({}, {"q": {"d": 0}})
  assert out["num_queries"] == 0 and out["skipped_queries"] == 1 and out["ndcg@10"] == 0.0


# --- metrics: against pytrec_eval (trec_eval itself) ----------------------------------------


def test_metrics_match_pytrec_eval_on_random_runs():
  pytrec_eval = pytest.importorskip("pytrec_eval")
  rng = np.random.default_rng(0)
  docs = [f"d{i}" for i in range(150)]
  qrels, run = {}, {}
  for q in range(60):
    judged = rng.choice(docs, size=int(rng.integers(1, 12)), replace=False)
    grades = rng.integers(-1, 4, size=len(judged))
    grades[0] = max(int(grades[0]), 1)  # At least one relevant document per query.
    qrels[f"q{q}"] = {d: int(g) for d, g in zip(judged, grades)}
    retrieved = rng.choice(docs, size=120, replace=False)
    # Scores rounded to one decimal: many ties, resolved by trec_eval's doc-id order.
    run[f"q{q}"] = {d: float(np.round(rng.normal(), 1)) for d in retrieved}
  ours = metrics.per_query(run, qrels)
  reference = pytrec_eval.RelevanceEvaluator(
      qrels, {"ndcg_cut.10", "recall.10", "recall.100"}).evaluate(run)
  # MRR@10: trec_eval's reciprocal rank on the run cut to its own top 10.
  top10 = {q: {d: s for d, s in run[q].items() if d in metrics.rank(run[q])[:10]} for q in run}
  rr = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(top10)
  assert set(ours) == set(reference) == set(qrels)
  for q in qrels:
    assert ours[q]["ndcg@10"] == pytest.approx(reference[q]["ndcg_cut_10"], abs=1e-9), q
    assert ours[q]["recall@10"] == pytest.approx(reference[q]["recall_10"], abs=1e-9), q
    assert ours[q]["recall@100"] == pytest.approx(reference[q]["recall_100"], abs=1e-9), q
    assert ours[q]["mrr@10"] == pytest.approx(rr[q]["recip_rank"], abs=1e-9), q


# --- search: chunked top-k against a full similarity matrix --------------------------------


def _reference_topk(q, d, k):
  full = q.astype(np.float64) @ d.astype(np.float64).T
  ids = np.argsort(-full, axis=1, kind="stable")[:, :min(k, len(d))]
  return np.take_along_axis(full, ids, 1), ids


@pytest.mark.parametrize("nq,nd,k,query_chunk,doc_chunk", [
    (7, 50, 5, 3, 16),     # Ragged last chunks on both axes.
    (33, 100, 100, 10, 7),  # k == num_docs, k much larger than a doc chunk.
    (5, 4, 10, 8, 3),      # k > num_docs: clipped.
    (40, 257, 12, 40, 256),  # One doc in the last chunk.
    (1, 1, 1, 1, 1),
])
def test_chunked_search_equals_full_argsort(nq, nd, k, query_chunk, doc_chunk):
  rng = np.random.default_rng(nq * 1000 + nd)
  q = rng.normal(size=(nq, 8)).astype(np.float32)
  d = rng.normal(size=(nd, 8)).astype(np.float32)
  scores, ids = search.top_k(q, d, k, query_chunk=query_chunk, doc_chunk=doc_chunk)
  want_scores, want_ids = _reference_topk(q, d, k)
  assert ids.shape == (nq, min(k, nd)) and ids.dtype == np.int64
  np.testing.assert_array_equal(ids, want_ids)
  np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-5)


def test_chunked_search_ties_keep_lower_document_index_across_chunks():
  # Small integer vectors: dot products are exact, so ties are real ties.
  rng = np.random.default_rng(1)
  q = rng.integers(-1, 2, size=(23, 3)).astype(np.float32)
  d = rng.integers(-1, 2, size=(61, 3)).astype(np.float32)
  for query_chunk, doc_chunk in ((5, 7), (23, 61), (1, 1), (8, 32)):
    scores, ids = search.top_k(q, d, 20, query_chunk=query_chunk, doc_chunk=doc_chunk)
    want_scores, want_ids = _reference_topk(q, d, 20)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_array_equal(scores, want_scores)


def test_search_rejects_bad_inputs():
  q = np.ones((2, 4), np.float32)
  with pytest.raises(ValueError, match="dim 4 but docs have dim 3"):
    search.top_k(q, np.ones((5, 3), np.float32), 2)
  bad = np.ones((5, 4), np.float32)
  bad[3, 1] = np.nan
  with pytest.raises(ValueError, match="docs has 1 rows with NaN or Inf .*row 3"):
    search.top_k(q, bad, 2)
  with pytest.raises(ValueError, match="2-D"):
    search.top_k(q[0], bad, 2)
  scores, ids = search.top_k(q, np.zeros((0, 4), np.float32), 10)
  assert scores.shape == ids.shape == (2, 0)


def test_retrieve_drops_documents_with_the_query_id_as_beir_does():
  q = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
  d = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.5, 0.5]], np.float32)
  doc_ids = ["q1", "a", "b", "c"]
  run = evaluator.retrieve(q, d, ["q1", "q2"], doc_ids, top=2, query_chunk=1, doc_chunk=3)
  assert list(run["q1"]) == ["a", "c"]  # "q1" itself (score 1.0) is dropped; still 2 hits.
  assert run["q1"]["a"] == pytest.approx(0.9)
  assert list(run["q2"]) == ["b", "c"]
  kept = evaluator.retrieve(q, d, ["q1", "q2"], doc_ids, top=2, ignore_identical_ids=False)
  assert list(kept["q1"]) == ["q1", "a"]


def test_evaluate_data_drops_the_query_id_and_keeps_100_other_hits():
  """The path every evaluation takes: document "q1" is dropped for query q1 only, and one
  extra hit is searched for, so q1's relevant document at raw rank 101 is still in its top
  100 (recall@100 1, mrr@10 0); for q2, document "q1" is an ordinary, relevant first hit."""
  near = [0.9, float(np.sqrt(1 - 0.81))]
  docs = {"q1": [1.0, 0.0], **{f"f{i:02d}": near for i in range(99)}, "a": [0.5, 0.866],
          **{f"z{i}": [0.1, 0.995] for i in range(10)}}
  table = {"query one": [1.0, 0.0], "query two": [1.0, 0.0],
           **{f"text of {d}": v for d, v in docs.items()}}
  data = beir.BeirData(
      name="ids", doc_ids=list(docs), doc_texts=[f"text of {d}" for d in docs],
      query_ids=["q1", "q2"], query_texts=["query one", "query two"],
      qrels={"q1": {"a": 1}, "q2": {"q1": 1}}, warnings=[], counts={})
  encode = lambda texts, prefix: np.array([table[t] for t in texts], np.float32)
  for chunk_size in (7, 1000):  # The two hits in different chunks, and in one.
    got = evaluator.evaluate_data(encode, data, chunk_size=chunk_size)
    assert got["num_queries"] == 2
    assert got["recall@100"] == pytest.approx(1.0)
    assert got["mrr@10"] == pytest.approx(0.5)
    assert got["ndcg@10"] == pytest.approx(0.5)
