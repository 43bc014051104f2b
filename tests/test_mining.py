"""Hard-negative mining against a plain-NumPy reference: margins, ranks, sampling, corpora, launcher."""

import gzip
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from moe_embed.data import jsonl, mining
from tests.beir_folders import write_beir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _TableEmbedder:
  """Embeds texts by a fixed table: lets the test know every score exactly."""

  def __init__(self, table):
    self.table = table

  def encode(self, texts, prefix="", batch_size=64, show_progress=False):
    x = np.asarray([self.table[t] for t in texts], np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _reference(records, embedder, *, k, margin=None, abs_margin=None, corpus=(),
               rank_range=None, sampling="top", seed=0, window=None):
  """Mining written out per query in NumPy, following mining.py's documented rules."""
  pool = sorted(({r["document"].strip() for r in records} | {t.strip() for t in corpus}) - {""})
  docs = embedder.encode(pool)
  positives = {}
  for r in records:
    positives.setdefault(r["query"], set()).add(r["document"].strip())
  lo, hi = rank_range or (0, None)
  if window is None:
    window = (hi if hi is not None else 3 * k) + max(len(p) for p in positives.values())
  out = []
  for i, r in enumerate(records):
    q = embedder.encode([r["query"]])[0]
    s_pos = float(q @ embedder.encode([r["document"].strip()])[0])
    if abs_margin is not None:
      limit = s_pos - abs_margin
    elif s_pos > 0:
      limit = margin * s_pos
    else:  # Never above the positive: (1 - margin) x |s_pos| below it.
      limit = s_pos - (1 - margin) * abs(s_pos)
    scores = docs @ q
    ranked = np.argsort(-scores, kind="stable")[:window]
    survivors = [pool[j] for j in ranked
                 if pool[j] not in positives[r["query"]] and scores[j] < limit]
    chosen = survivors[lo:hi]
    if sampling == "random" and len(chosen) > k:
      pick = np.sort(np.random.default_rng([seed, i]).choice(len(chosen), k, replace=False))
      chosen = [chosen[p] for p in pick]
    out.append(chosen[:k])
  return out


def _setup(n=30, negative_positives=False, corpus_size=0, seed=0):
  """Records whose positive is near the query (or, for half of them, scores below 0)."""
  rng = np.random.default_rng(seed)
  table, records = {}, []
  for i in range(n):
    q, d = f"query {i}", f"doc {i}"
    table[q] = rng.normal(size=8)
    sign = -0.3 if negative_positives and i % 2 else 1.0
    table[d] = sign * table[q] + (1.0 if negative_positives else 0.3) * rng.normal(size=8)
    records.append({"query": q, "document": d, "negatives": [], "source": "s"})
  corpus = [f"corpus {j}" for j in range(corpus_size)]
  for text in corpus:
    table[text] = rng.normal(size=8)
  return table, records, corpus


def _score(embedder, a, b):
  return float(embedder.encode([a])[0] @ embedder.encode([b])[0])


@pytest.mark.parametrize("options", [
    dict(k=3, margin=0.9),
    dict(k=2, margin=None, abs_margin=0.3),
    dict(k=3, margin=0.95, rank_range=(4, 15)),
    dict(k=4, margin=0.9, rank_range=(2, 20), sampling="random", seed=5),
    dict(k=5, margin=0.95, sampling="random", seed=1),
], ids=["margin", "abs_margin", "rank_range", "range_and_sample", "sample"])
def test_mined_negatives_equal_the_numpy_reference(options):
  table, records, corpus = _setup(corpus_size=40)
  embedder = _TableEmbedder(table)
  want = _reference(records, embedder, corpus=corpus, **options)
  for block in (7, 1000):  # The query blocking changes nothing, sampling included.
    mined, report = mining.mine(records, embedder, corpus=corpus, query_block=block,
                                show_progress=False, **options)
    assert [m["negatives"] for m in mined] == want
  assert report.kept == sum(len(w) for w in want) > 0
  assert report.short == sum(len(w) < options["k"] for w in want)
  assert report.pool == 70 and report.dropped_positive == 30
  assert all(m["query"] == r["query"] and m["document"] == r["document"]
             for m, r in zip(mined, records))


def test_negative_positive_scores_never_admit_a_candidate_above_the_positive():
  table, records, corpus = _setup(n=40, negative_positives=True, corpus_size=60)
  embedder = _TableEmbedder(table)
  s_pos = np.array([_score(embedder, r["query"], r["document"]) for r in records])
  assert (s_pos < 0).sum() >= 10 and (s_pos > 0).sum() >= 10
  mined, report = mining.mine(records, embedder, k=4, margin=0.5, corpus=corpus,
                              candidates=200, show_progress=False)
  assert [m["negatives"] for m in mined] == _reference(records, embedder, k=4, margin=0.5,
                                                       corpus=corpus, window=200)
  above = 0
  for rec, out, s in zip(records, mined, s_pos):
    scores = [_score(embedder, rec["query"], n) for n in out["negatives"]]
    assert all(x < s for x in scores)  # Never above the positive.
    assert all(x < s - 0.5 * abs(s) + 1e-6 for x in scores)
    if s < 0:  # What `score < margin * s_pos` alone would have kept above the positive:
      pool = corpus + [r["document"] for r in records if r is not rec]
      above += sum(s < _score(embedder, rec["query"], t) < 0.5 * s for t in pool)
  assert above > 20 and report.kept > 40


def test_margin_limit_and_a_zero_positive_score():
  limit = mining.margin_limit(np.array([0.8, 0.0, -0.4], np.float32), margin=0.95)
  np.testing.assert_allclose(limit, [0.76, 0.0, -0.42], rtol=1e-6)
  np.testing.assert_allclose(mining.margin_limit(np.array([0.8, -0.4]), abs_margin=0.1),
                             [0.7, -0.5], rtol=1e-6)
  e = np.eye(5)
  table = {"q": e[0], "d": e[1], "zero": e[2], "neg": -e[0] + e[3], "pos": e[0] + e[4]}
  records = [{"query": "q", "document": "d", "negatives": [], "source": "s"}]
  mined, report = mining.mine(records, _TableEmbedder(table), k=3, margin=0.95,
                              corpus=["zero", "neg", "pos"], show_progress=False)
  assert mined[0]["negatives"] == ["neg"]  # s_pos = 0: only scores below 0.
  assert (report.dropped_margin, report.dropped_positive, report.short) == (2, 1, 1)


def test_positives_of_the_query_are_never_negatives_even_from_the_corpus():
  table, records, corpus = _setup(n=12, corpus_size=10)
  # A second positive for query 0, and the positives again in the corpus with extra spaces.
  table["doc 0b"] = table["query 0"] + 0.01
  records.append({"query": "query 0", "document": "doc 0b", "negatives": [], "source": "s"})
  corpus += [f"  doc {i}\n" for i in range(12)] + ["", "doc 0b "]
  embedder = _TableEmbedder(table)
  mined, report = mining.mine(records, embedder, k=5, margin=1.0, corpus=corpus,
                              show_progress=False)
  assert [m["negatives"] for m in mined] == _reference(records, embedder, k=5, margin=1.0,
                                                       corpus=corpus)
  for m in mined:
    assert not {"doc 0", "doc 0b"} & set(m["negatives"]) or m["query"] != "query 0"
    assert m["document"].strip() not in m["negatives"]
  assert report.pool == 23  # 13 positives and 10 corpus documents; copies merged.


def test_random_sampling_is_seeded_and_stays_in_the_rank_range():
  table, records, corpus = _setup(corpus_size=60)
  embedder = _TableEmbedder(table)
  run = lambda seed: [m["negatives"] for m in mining.mine(
      records, embedder, k=3, margin=0.95, corpus=corpus, rank_range=(5, 25),
      sampling="random", seed=seed, show_progress=False)[0]]
  a, b, c = run(0), run(0), run(1)
  assert a == b and a != c
  ranked = _reference(records, embedder, k=20, margin=0.95, corpus=corpus, rank_range=(5, 25),
                      window=26)
  for negs, allowed in zip(a, ranked):
    assert len(negs) == 3 and set(negs) <= set(allowed)
    assert negs == [t for t in allowed if t in negs]  # Hardest first.


@pytest.mark.parametrize("kwargs,message", [
    (dict(k=0), "k=0 must be positive"),
    (dict(k=2, margin=0.9, abs_margin=0.1), "exactly one of margin"),
    (dict(k=2, margin=1.5), r"margin=1.5 must be in \[0, 1\]"),
    (dict(k=2, margin=None, abs_margin=-0.1), "abs_margin=-0.1 must be >= 0"),
    (dict(k=5, rank_range=(3, 6)), r"rank_range=\(3, 6\) holds 3 ranks, fewer than k=5"),
    (dict(k=2, rank_range=(6, 6)), "needs 0 <= min < max"),
    (dict(k=2, sampling="hardest"), "sampling='hardest' must be one of"),
])
def test_argument_errors(kwargs, message):
  table, records, _ = _setup(n=4)
  with pytest.raises(ValueError, match=message):
    mining.mine(records, _TableEmbedder(table), show_progress=False, **kwargs)


def _write_beir(folder, docs):
  """A BEIR folder of (title, text) documents and one query that is none of them."""
  write_beir(folder, [{"_id": f"d{i}", "title": title, "text": text}
                      for i, (title, text) in enumerate(docs)],
             [{"_id": "q0", "text": "never a document"}], [("q0", "d0", 1)])


def test_read_corpus_from_jsonl_lines_and_beir_folders(tmp_path):
  with open(tmp_path / "docs.jsonl", "w") as f:
    for row in [{"text": "plain text"}, {"_id": "7", "title": "Title", "text": "body"},
                {"document": "from a pair", "query": "q"}, {"text": "  spaced  ", "title": None},
                {"text": "wins", "document": "loses"}, {"query": "no document"},
                {"text": ""}, [1, 2]]:
      f.write(json.dumps(row) + "\n")
    f.write("{broken\n")
  with gzip.open(tmp_path / "more.jsonl.gz", "wt") as f:
    f.write(json.dumps({"text": "zipped"}) + "\n")
  _write_beir(tmp_path / "beir", [("A title", "first"), ("", "second")])
  _write_beir(tmp_path / "miracl" / "fr", [("", "troisième")])
  report = jsonl.ReadReport()
  texts = mining.read_corpus(f"{tmp_path}/docs.jsonl,{tmp_path}/more.jsonl.gz,"
                             f"{tmp_path}/beir,{tmp_path}/miracl", report)
  assert texts == ["plain text", "Title body", "from a pair", "spaced", "wins", "zipped",
                   "A title first", "second", "troisième"]
  assert report.read == 6 and report.malformed == 4
  assert report.examples[-1].endswith("docs.jsonl:9: invalid JSON (Expecting property name "
                                      "enclosed in double quotes)")
  assert "docs.jsonl:6: no non-empty 'text' or 'document' string" in report.examples[0]


PAIRS = [("sort a list", "Use sorted() or list.sort()."),
         ("read a file", "open() returns a file object."),
         ("square root", "math.sqrt returns the square root."),
         ("current time", "time.time returns seconds since the epoch."),
         ("random number", "random.random returns a float in [0, 1)."),
         ("join paths", "os.path.join joins path components.")]


def _mine_cli(*args):
  return subprocess.run([sys.executable, "launch/mine_negatives.py", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=300)


def _write_pairs(path, pairs, extra=()):
  with open(path, "w") as f:
    for q, d in pairs:
      f.write(json.dumps({"query": q, "document": d}) + "\n")
    for line in extra:
      f.write(line + "\n")


def test_mine_negatives_launcher_feeds_prepare_data(tmp_path):
  from tests.reference_models import minilm_folder
  folder = minilm_folder()
  pairs = tmp_path / "pairs.jsonl"
  _write_pairs(pairs, PAIRS, extra=["not json"])
  out = tmp_path / "triplets.jsonl"
  proc = _mine_cli(f"--model={folder}", f"--data={pairs}", f"--output={out}", "--k=2",
                   "--margin=0.95")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "Skipped 1 malformed" in proc.stdout
  rows = [json.loads(l) for l in open(out)]
  assert len(rows) == 6 and all(len(r["negatives"]) == 2 for r in rows)
  assert all(r["document"] not in r["negatives"] for r in rows)
  from moe_embed import data
  info, _ = data.prepare(str(out), str(tmp_path / "ds"))
  assert info["num_examples"] == 6


def test_launcher_draws_from_a_corpus_with_rank_range_and_sample(tmp_path):
  from tests.reference_models import minilm_folder
  folder = minilm_folder()
  pairs = tmp_path / "pairs.jsonl"
  _write_pairs(pairs, PAIRS)
  docs = [("Python", f"Function number {i} of the standard library does task {i}.")
          for i in range(30)] + [("", PAIRS[0][1])]  # A positive inside the corpus.
  _write_beir(tmp_path / "beir", docs)
  args = [f"--model={folder}", f"--data={pairs}", f"--corpus={tmp_path}/beir",
          "--rank_range=2,12", "--sample=3", "--margin=0.95"]
  one = _mine_cli(*args, f"--output={tmp_path}/a.jsonl", "--seed=4")
  assert one.returncode == 0, one.stderr[-2000:]
  assert "ranked 2..11 of 13 candidates from a pool of 36 documents" in one.stdout
  again = _mine_cli(*args, f"--output={tmp_path}/b.jsonl", "--seed=4")
  assert again.returncode == 0, again.stderr[-2000:]
  rows = [json.loads(l) for l in open(tmp_path / "a.jsonl")]
  assert rows == [json.loads(l) for l in open(tmp_path / "b.jsonl")]
  pool = {d for _, d in PAIRS} | {t.strip() if not title else f"{title} {t}"
                                  for title, t in docs}
  for r in rows:
    assert len(r["negatives"]) == 3 and set(r["negatives"]) <= pool
    assert r["document"] not in r["negatives"]
  assert any(n.startswith("Python Function") for r in rows for n in r["negatives"])
  both = _mine_cli(*args, f"--output={tmp_path}/c.jsonl", "--k=3")
  assert both.returncode == 1 and "give --k (the hardest) or --sample" in both.stderr
  bad = _mine_cli(f"--model={folder}", f"--data={pairs}", f"--output={tmp_path}/d.jsonl",
                  "--rank_range=30")
  assert bad.returncode == 1 and "--rank_range='30' must be MIN,MAX" in bad.stderr
  assert not os.path.exists(tmp_path / "c.jsonl") and not os.path.exists(tmp_path / "d.jsonl")


def test_mined_triplets_prepare_and_train_end_to_end(tmp_path):
  """Mine with a real model over a JSONL corpus, prepare, then a few finetuning steps."""
  from tests.reference_models import minilm_folder
  folder = minilm_folder()
  topics = ["sorting", "files", "math", "time", "random numbers", "paths", "strings", "json",
            "regular expressions", "dates", "threads", "sockets"]
  pairs = [(f"how do I use {t} number {i} in python",
            f"The {t} module, case {i}, explains how {t} work in the standard library.")
           for t in topics for i in range(2)]
  _write_pairs(tmp_path / "pairs.jsonl", pairs)
  with open(tmp_path / "corpus.jsonl", "w") as f:
    for t in topics:
      f.write(json.dumps({"text": f"A tutorial about {t} with many examples."}) + "\n")
  mined = _mine_cli(f"--model={folder}", f"--data={tmp_path}/pairs.jsonl",
                    f"--corpus={tmp_path}/corpus.jsonl", f"--output={tmp_path}/triplets.jsonl",
                    "--k=2")
  assert mined.returncode == 0, mined.stderr[-2000:]
  rows = [json.loads(l) for l in open(tmp_path / "triplets.jsonl")]
  assert sum(len(r["negatives"]) == 2 for r in rows) >= 16
  assert any(n.startswith("A tutorial") for r in rows for n in r["negatives"])
  env = dict(os.environ, XLA_FLAGS="")  # One CPU device.
  prep = subprocess.run([sys.executable, "launch/prepare_data.py",
                         f"--input={tmp_path}/triplets.jsonl", f"--output={tmp_path}/ds",
                         "--train_tokenizer_vocab=150"],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert prep.returncode == 0, prep.stderr[-2000:]
  assert "Wrote 24 examples" in prep.stdout
  workdir = tmp_path / "run"
  train = subprocess.run([
      sys.executable, "launch/train.py", "--config=configs/finetune.py:tiny",
      f"--workdir={workdir}", f"--config.data={tmp_path}/ds", "--config.total_steps=3",
      "--config.batch_size=8", "--config.input.num_negatives=2",
      "--config.input.negatives_required=True", "--config.input.max_query_len=24",
      "--config.input.max_doc_len=32", "--config.log_every_steps=1",
      "--config.eval.enabled=False"], cwd=REPO, env=env, capture_output=True, text=True,
      timeout=600)
  assert train.returncode == 0, train.stderr[-3000:]
  metrics = [json.loads(l) for l in open(workdir / "metrics.jsonl")]
  losses = [r["loss"] for r in metrics if "loss" in r]
  assert len(losses) == 3 and all(np.isfinite(losses))
