"""Hard-negative mining: exact candidates, margin filtering, the launcher."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from moe_embed.data import mining

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _TableEmbedder:
  """Embeds texts by a fixed table: lets the test know every score exactly."""

  def __init__(self, table):
    self.table = table

  def encode(self, texts, prefix="", batch_size=64, show_progress=False):
    x = np.asarray([self.table[t] for t in texts], np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _setup():
  rng = np.random.default_rng(0)
  table, records = {}, []
  for i in range(30):
    q, d = f"query {i}", f"doc {i}"
    table[q] = rng.normal(size=8)
    table[d] = table[q] + 0.3 * rng.normal(size=8)
    records.append({"query": q, "document": d, "negatives": [], "source": "s"})
  return table, records


def test_mined_negatives_follow_the_numpy_ranking_and_margin():
  table, records = _setup()
  embedder = _TableEmbedder(table)
  mined, report = mining.mine(records, embedder, k=3, margin=0.9, candidates=29,
                              show_progress=False)
  docs = sorted({r["document"] for r in records})
  d = embedder.encode(docs)
  for rec, out in zip(records, mined):
    q = embedder.encode([rec["query"]])[0]
    s_pos = float(q @ embedder.encode([rec["document"]])[0])
    scores = d @ q
    order = [docs[j] for j in np.argsort(-scores, kind="stable")
             if docs[j] != rec["document"] and scores[j] < 0.9 * s_pos]
    assert out["negatives"] == order[:3]
  assert report.kept == sum(len(m["negatives"]) for m in mined)
  assert report.dropped_same_text <= 30 and report.dropped_margin > 0


def test_absolute_margin_and_argument_errors():
  table, records = _setup()
  embedder = _TableEmbedder(table)
  mined, _ = mining.mine(records, embedder, k=2, margin=None, abs_margin=0.5,
                         show_progress=False)
  for rec, out in zip(records, mined):
    q = embedder.encode([rec["query"]])[0]
    s_pos = float(q @ embedder.encode([rec["document"]])[0])
    for neg in out["negatives"]:
      assert float(q @ embedder.encode([neg])[0]) < s_pos - 0.5
  with pytest.raises(ValueError, match="exactly one of margin"):
    mining.mine(records, embedder, k=2, margin=0.9, abs_margin=0.1)


def test_mine_negatives_launcher_feeds_prepare_data(tmp_path):
  from tests.reference_models import minilm_folder
  folder = minilm_folder()
  pairs = tmp_path / "pairs.jsonl"
  with open(pairs, "w") as f:
    for i, (q, d) in enumerate([("sort a list", "Use sorted() or list.sort()."),
                                ("read a file", "open() returns a file object."),
                                ("square root", "math.sqrt returns the square root."),
                                ("current time", "time.time returns seconds since the epoch."),
                                ("random number", "random.random returns a float in [0, 1)."),
                                ("join paths", "os.path.join joins path components.")]):
      f.write(json.dumps({"query": q, "document": d}) + "\n")
    f.write("not json\n")
  out = tmp_path / "triplets.jsonl"
  proc = subprocess.run([sys.executable, "launch/mine_negatives.py", f"--model={folder}",
                         f"--data={pairs}", f"--output={out}", "--k=2", "--margin=0.95"],
                        cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "Skipped 1 malformed" in proc.stdout
  rows = [json.loads(l) for l in open(out)]
  assert len(rows) == 6 and all(len(r["negatives"]) == 2 for r in rows)
  assert all(r["document"] not in r["negatives"] for r in rows)
  from moe_embed import data
  info, _ = data.prepare(str(out), str(tmp_path / "ds"))
  assert info["num_examples"] == 6
