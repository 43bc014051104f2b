"""Consistency filtering: pools, the ranking against NumPy, ties, a real model, the launcher."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from moe_embed.data import consistency, jsonl
from tests.records import pair_records

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (query, document) pairs on clearly different topics.
PAIRS = [
    ("how do I bake sourdough bread", "Mix flour, water and starter, let the dough rise "
     "overnight, then bake it in a hot oven."),
    ("symptoms of the flu", "Influenza causes fever, cough, sore throat, muscle aches and "
     "fatigue."),
    ("how to change a flat tyre", "Loosen the wheel nuts, jack up the car, swap the wheel for "
     "the spare and tighten the nuts."),
    ("capital city of Japan", "Tokyo is the capital and largest city of Japan."),
    ("how do plants make food", "Photosynthesis turns sunlight, water and carbon dioxide into "
     "glucose and oxygen in the leaves."),
    ("rules of chess castling", "Castling moves the king two squares towards a rook, which "
     "jumps over to the other side of the king."),
    ("python sort a list", "sorted() returns a new sorted list; list.sort() sorts the list in "
     "place."),
    ("why is the sky blue", "Air molecules scatter short blue wavelengths of sunlight more "
     "than red ones (Rayleigh scattering)."),
    ("how to train a puppy to sit", "Hold a treat above the puppy's nose, move it back until "
     "the puppy sits, then reward it."),
    ("best time to plant tomatoes", "Plant tomato seedlings outdoors after the last spring "
     "frost, when the soil is warm."),
    ("what causes earthquakes", "Earthquakes happen when tectonic plates slip suddenly along "
     "a fault and release energy."),
    ("how to brew green tea", "Steep green tea leaves in water at about 80 degrees Celsius "
     "for two to three minutes."),
]
SWAPPED = (1, 4, 7, 10)  # Each of these queries gets the next one's document.


def _pooled_records():
  """Three sources of different sizes sharing 40 documents, and one below the pool size."""
  return (pair_records({"big": 40, "mid": 10, "small": 10}, documents=40)
          + pair_records({"tiny": 2}))


def _reference_kept(records, queries, documents, pools, k):
  """Indices kept by a plain loop: rank = 1 + other pool documents scoring >= the positive."""
  row_of = {}
  for i, r in enumerate(records):
    row_of.setdefault(r["document"], i)
  kept = set()
  for pool in pools:
    for i in pool.pairs:
      q = queries[i].astype(np.float64)
      scores = [float(q @ documents[row_of[t]].astype(np.float64)) for t in pool.documents]
      own = float(q @ documents[row_of[records[i]["document"]]].astype(np.float64))
      others = sum(s >= own for t, s in zip(pool.documents, scores)
                   if t != records[i]["document"])
      if others < k:
        kept.add(i)
  return kept


def test_pools_hold_the_own_document_and_random_distinct_documents_of_its_source():
  records = _pooled_records()
  pools = consistency.plan_pools(records, pool_size=6, seed=0)
  seen = sorted(i for pool in pools for i in pool.pairs)
  assert seen == list(range(len(records)))  # Every pair ranked exactly once.
  for pool in pools:
    source_docs = {r["document"] for r in records if r["source"] == pool.source}
    assert len(set(pool.documents)) == len(pool.documents) == min(6, len(source_docs))
    assert set(pool.documents) <= source_docs
    for i, pos in zip(pool.pairs, pool.positives):
      assert pool.documents[pos] == records[i]["document"] and pos < pool.own
  assert [p.documents for p in consistency.plan_pools(records, 6, seed=0)] == \
      [p.documents for p in pools]
  assert [p.documents for p in consistency.plan_pools(records, 6, seed=1)] != \
      [p.documents for p in pools]
  # A source's pools do not depend on the other sources.
  big = [r for r in records if r["source"] == "big"]
  assert [p.documents for p in consistency.plan_pools(big, 6, seed=0)] == \
      [p.documents for p in pools if p.source == "big"]


def test_kept_pairs_equal_a_numpy_ranking_with_ties_against_the_pair():
  records = _pooled_records()
  rng = np.random.default_rng(1)
  # Small integers: exact scores, so ties are frequent and compare exactly.
  queries = rng.integers(-2, 3, (len(records), 4)).astype(np.float32)
  documents = rng.integers(-2, 3, (len(records), 4)).astype(np.float32)
  for i, r in enumerate(records):  # Rows of a repeated document must agree.
    documents[i] = documents[[r2["document"] for r2 in records].index(r["document"])]
  pools = consistency.plan_pools(records, 6, seed=3)
  for k in (1, 2, 3):
    kept, reports = consistency.filter_embedded(records, queries, documents, k=k,
                                                pool_size=6, seed=3)
    expected = _reference_kept(records, queries, documents, pools, k)
    assert {records.index(r) for r in kept} == expected
    assert 0 < len(expected) < len(records) - 2
    assert sum(r.kept for r in reports.values()) == len(kept)
  assert reports["tiny"].pool_size == 2 and reports["tiny"].kept == 2  # All 2 documents.
  assert reports["big"].pool_size == 6 and reports["big"].pairs == 40


def test_ties_count_against_the_positive():
  queries = np.asarray([[1.0, 0.0]], np.float32)
  pool = np.asarray([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], np.float32)
  positives = np.asarray([0])
  assert not consistency.keep_mask(queries, pool, positives, k=1)[0]
  assert consistency.keep_mask(queries, pool, positives, k=2)[0]


def test_shards_together_equal_one_process_and_the_embedder_path_agrees():
  records = _pooled_records()
  rng = np.random.default_rng(2)
  table = {}
  for r in records:
    table.setdefault(r["query"], rng.normal(size=8))
    table.setdefault(r["document"], rng.normal(size=8))

  class TableEmbedder:
    def encode(self, texts, prefix="", batch_size=64, show_progress=False):
      assert prefix in ("query", "document") and len(set(texts)) == len(texts)
      return np.asarray([table[t] for t in texts], np.float32)

  queries = np.asarray([table[r["query"]] for r in records], np.float32)
  documents = np.asarray([table[r["document"]] for r in records], np.float32)
  whole, _ = consistency.filter_embedded(records, queries, documents, k=2, pool_size=6)
  via_embedder, _ = consistency.filter_pairs(records, TableEmbedder(), k=2, pool_size=6,
                                             show_progress=False)
  assert via_embedder == whole
  shards = [consistency.filter_pairs(records, TableEmbedder(), k=2, pool_size=6,
                                     process_index=p, process_count=3, show_progress=False)
            for p in range(3)]
  union = [r for kept, _ in shards for r in kept]
  assert sorted(map(records.index, union)) == sorted(map(records.index, whole))
  assert sum(rep["big"].pairs for _, rep in shards) == 40


def test_argument_and_embedding_errors():
  records = _pooled_records()
  x = np.zeros((len(records), 4), np.float32)
  with pytest.raises(ValueError, match="below pool_size"):
    consistency.filter_embedded(records, x, x, k=6, pool_size=6)
  with pytest.raises(ValueError, match="must be"):
    consistency.filter_embedded(records, x[:3], x, k=2, pool_size=6)
  bad = x.copy()
  bad[5, 0] = np.nan
  with pytest.raises(ValueError, match="NaN or Inf"):
    consistency.filter_embedded(records, x, bad, k=2, pool_size=6)
  assert consistency.shard_path("/d/kept.jsonl", 1, 4) == "/d/kept-0001-of-0004.jsonl"
  assert consistency.shard_path("/d/kept.jsonl", 0, 1) == "/d/kept.jsonl"


def _pair_records():
  """PAIRS with the documents of SWAPPED rotated one step: those pairs are wrong."""
  docs = [d for _, d in PAIRS]
  for a, b in zip(SWAPPED, SWAPPED[1:] + SWAPPED[:1]):
    docs[a] = PAIRS[b][1]
  return [{"query": q, "document": d, "negatives": [], "source": "web"}
          for (q, _), d in zip(PAIRS, docs)]


def test_a_real_model_removes_swapped_pairs_and_keeps_true_ones():
  from moe_embed import inference
  from tests.reference_models import minilm_folder
  embedder = inference.load_embedder(minilm_folder(), max_length=64)
  records = _pair_records()
  kept, reports = consistency.filter_pairs(records, embedder, k=1, pool_size=len(records),
                                           batch_size=16, show_progress=False)
  assert {records.index(r) for r in kept} == set(range(len(records))) - set(SWAPPED)
  assert reports["web"].pool_size == len(records)


def _launch(*args):
  return subprocess.run([sys.executable, "launch/filter_consistency.py", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=300)


def test_launcher_writes_kept_pairs_and_a_report(tmp_path):
  from tests.reference_models import minilm_folder
  pairs = tmp_path / "pairs.jsonl"
  records = _pair_records() + [  # A second source with two documents: below the pool size.
      {"query": "who wrote Hamlet", "document": "Hamlet is a tragedy by William Shakespeare.",
       "negatives": [], "source": "other"},
      {"query": "boiling point of water", "document": "Water boils at 100 degrees Celsius "
       "at sea level.", "negatives": [], "source": "other"}]
  with open(pairs, "w") as f:
    for r in records:
      f.write(json.dumps(r) + "\n")
    f.write("not json\n")
  out = tmp_path / "out" / "kept.jsonl"
  proc = _launch(f"--model={minilm_folder()}", f"--data={pairs}", f"--output={out}", "--k=1",
                 f"--pool_size={len(PAIRS)}", "--batch_size=8", "--max_length=64")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "Skipped 1 malformed" in proc.stdout and "fewer than 12" in proc.stdout
  report = json.load(open(f"{out}.report.json"))
  kept = list(jsonl.read_records([str(out)], jsonl.ReadReport()))
  assert kept == [r for i, r in enumerate(records) if i not in SWAPPED]  # Fields and order.
  assert report["total"] == {"pairs": 14, "kept": 10, "kept_fraction": round(10 / 14, 6)}
  assert report["sources"]["other"] == {"pairs": 2, "kept": 2, "kept_fraction": 1.0,
                                        "pool_size": 2, "documents": 2}
  assert report["sources"]["web"]["pool_size"] == 12 and report["k"] == 1
  assert sorted(os.listdir(out.parent)) == ["kept.jsonl", "kept.jsonl.report.json"]


def test_launcher_missing_input_is_one_line(tmp_path):
  proc = _launch("--model=unused", f"--data={tmp_path}/missing.jsonl",
                 f"--output={tmp_path}/kept.jsonl", "--pool_size=4")
  assert proc.returncode == 1
  assert proc.stderr.strip().count("\n") == 0, proc.stderr
  assert "missing.jsonl does not exist" in proc.stderr
  assert not os.path.exists(tmp_path / "kept.jsonl")
