"""Data: JSONL validation, dataset round trip, per-source batches, exact multi-host resume."""

import json
import os
import subprocess
import sys

from etils import epath
import numpy as np
import pytest

from moe_embed import data
from moe_embed.data import corpus_stdlib, dataset, jsonl, packing
from moe_embed.tokenizers import train_sentencepiece
from tests.records import pair_records, write_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  texts = [t for r in pair_records({"a": 200, "b": 200}, 2) for t in (r["query"], r["document"])]
  return train_sentencepiece(texts * 3, 200, str(tmp_path_factory.mktemp("tok") / "spm"))


def test_prepare_counts_duplicates_and_malformed_lines(tmp_path):
  rows = pair_records({"a": 30, "b": 20}, negatives=2)
  write_jsonl(tmp_path / "one.jsonl", rows[:25] + rows[:5],
              extra_lines=["{not json", json.dumps({"query": "only a query"}), "[1, 2]"])
  write_jsonl(tmp_path / "two.jsonl.gz", rows[25:])
  (tmp_path / "notes.txt").write_text("not an input\n")
  info, report = data.prepare(str(tmp_path), str(tmp_path / "out"))
  assert report.skipped_files == [str(tmp_path / "notes.txt")]  # Reported, not read.
  assert info["num_examples"] == 50
  assert info["sources"]["a"]["num_examples"] == 30
  assert info["sources"]["b"]["num_examples"] == 20
  assert report.duplicates == 5 and report.malformed == 3
  assert report.examples[0].endswith("one.jsonl:31: invalid JSON (Expecting property name "
                                     "enclosed in double quotes)")
  assert "one.jsonl:32: missing or empty 'document'" in report.examples[1]
  # Round trip: what was written is what is read.
  reader = dataset.SourceReader(str(tmp_path / "out"), info["sources"]["b"])
  got = reader.read(list(range(len(reader))))
  assert [r["query"] for r in got] == [r["query"] for r in rows[30:]]
  assert got[3]["negatives"] == rows[33]["negatives"]


def test_dataset_is_a_tfds_dataset_and_empty_input_is_an_error(tmp_path):
  import tensorflow_datasets as tfds
  rows = pair_records({"p": 6, "q-r": 4}, negatives=1)
  write_jsonl(tmp_path / "in.jsonl", rows)
  info, _ = data.prepare(str(tmp_path / "in.jsonl"), str(tmp_path / "out"))
  assert {s: e["split"] for s, e in info["sources"].items()} == {"p": "p", "q-r": "q_r"}
  splits = tfds.data_source("contrastive_pairs", data_dir=str(tmp_path / "out" / "tfds"))
  assert {k: len(v) for k, v in splits.items()} == {"p": 6, "q_r": 4}
  assert splits["q_r"][2] == {"query": rows[8]["query"].encode(),
                              "document": rows[8]["document"].encode(),
                              "negatives": [rows[8]["negatives"][0].encode()]}
  write_jsonl(tmp_path / "bad.jsonl", [], extra_lines=["{", '{"query": "q"}'])
  with pytest.raises(ValueError, match=r"No valid records.*first: .*bad.jsonl:1: invalid JSON"):
    data.prepare(str(tmp_path / "bad.jsonl"), str(tmp_path / "empty"))


def test_prepare_data_launcher(tmp_path):
  write_jsonl(tmp_path / "in.jsonl", pair_records({"x": 40, "y": 30}),
              extra_lines=['{"query": 1}'])
  proc = subprocess.run([sys.executable, "launch/prepare_data.py", f"--input={tmp_path}/in.jsonl",
                         f"--output={tmp_path}/ds", "--train_tokenizer_vocab=120",
                         "--max_query_len=4", "--max_doc_len=512",
                         '--source_prefixes={"y": {"max_query_len": 256}}'],
                        cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "Wrote 70 examples" in proc.stdout and "skipped 1 malformed" in proc.stdout
  assert "in.jsonl:71: missing or empty 'query'" in proc.stdout
  assert os.path.exists(tmp_path / "ds" / "tokenizer.model")
  # Every query is longer than 2 pieces; no document reaches 510; y's own length cuts none.
  assert "truncated of the first 40: 40 queries (> 4), 0 documents (> 512)" in proc.stdout
  assert "truncated of the first 30: 0 queries (> 256), 0 documents (> 512)" in proc.stdout
  info = dataset.read_info(str(tmp_path / "ds"))
  assert info["truncated"] == {
      "x": {"sampled": 40, "queries": 40, "documents": 0, "max_query_len": 4,
            "max_doc_len": 512},
      "y": {"sampled": 30, "queries": 0, "documents": 0, "max_query_len": 256,
            "max_doc_len": 512}}
  missing = subprocess.run([sys.executable, "launch/prepare_data.py", "--input=/no/such.jsonl",
                            f"--output={tmp_path}/x"], cwd=REPO, capture_output=True, text=True)
  assert missing.returncode != 0 and "/no/such.jsonl does not exist" in missing.stderr


def test_inputs_are_files_globs_and_folders(tmp_path):
  for name in ("a/x.jsonl", "a/b/y.jsonl.gz", "c/z.jsonl", "c/notes.txt"):
    os.makedirs(os.path.dirname(tmp_path / name), exist_ok=True)
    (tmp_path / name).write_text("")
  assert jsonl.expand_inputs(f"{tmp_path}/*/*.jsonl") == [f"{tmp_path}/a/x.jsonl",
                                                          f"{tmp_path}/c/z.jsonl"]
  assert jsonl.expand_inputs(f"{tmp_path}/a,{tmp_path}/c/z.jsonl") == [
      f"{tmp_path}/a/b/y.jsonl.gz", f"{tmp_path}/a/x.jsonl", f"{tmp_path}/c/z.jsonl"]
  with pytest.raises(ValueError, match="'\\*\\*' is not supported in globs; give the folder"):
    jsonl.expand_inputs(f"{tmp_path}/**/*.jsonl")
  with pytest.raises(FileNotFoundError, match="No files match"):
    jsonl.expand_inputs(f"{tmp_path}/*/*.parquet")


def test_on_an_object_store_dataset_info_is_written_last(tmp_path, monkeypatch):
  """No atomic folder rename there (gs://): the dataset is built in place, the info commits it."""
  monkeypatch.setattr(dataset, "is_local", lambda path: False)
  out = tmp_path / "ds"
  info = {"format": dataset.FORMAT, "sources": {}}

  def build(folder):
    assert folder == epath.Path(out) and not (folder / dataset.INFO).exists()
    (folder / "part").write_text("x")
    return info

  assert dataset.commit(str(out), build) == info
  assert dataset.read_info(str(out)) == info
  with pytest.raises(FileExistsError, match="pass --overwrite"):
    dataset.commit(str(out), build)

  def fail(folder):
    assert not (folder / dataset.INFO).exists() and not (folder / "part").exists()
    raise RuntimeError("preemption")

  with pytest.raises(RuntimeError, match="preemption"):
    dataset.commit(str(out), fail, overwrite=True)
  assert not out.exists()


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("ds")
  rows = pair_records({"a": 90, "b": 45, "c": 30}, negatives=0)
  rows += pair_records({"hard": 40}, negatives=3)
  rows[-1]["negatives"] = rows[-1]["negatives"][:1]
  write_jsonl(tmp / "in.jsonl", rows)
  data.prepare(str(tmp / "in.jsonl"), str(tmp / "out"))
  return str(tmp / "out")


def _iterator(ds, tokenizer, **kw):
  fields = {f: kw.pop(f) for f in list(kw) if f in data.InputConfig.__dataclass_fields__}
  inputs = data.InputConfig(**{**dict(max_query_len=40, max_doc_len=48, query_prefix="q: ",
                                      doc_prefix="d: "), **fields})
  args = dict(tokenizer=tokenizer, global_batch_size=8, seed=3)
  args.update(kw)
  return data.make_train_iterator(ds, inputs=inputs, **args)


def _decode(tokenizer, ids):
  return tokenizer.sp.decode([int(i) for i in ids if i > 3])


def test_every_batch_comes_from_one_source_in_proportion(ds, tokenizer):
  it = _iterator(ds, tokenizer, prefetch=0)
  counts = {}
  for _ in range(200):
    batch = next(it)
    sources = {_decode(tokenizer, q).split()[1] for q in batch["query_ids"]}
    assert len(sources) == 1
    source = sources.pop()
    counts[source] = counts.get(source, 0) + 1
  state = it.get_state()
  drawn = {s: c // 8 for s, c in state["cursors"].items()}
  assert counts == {s: n for s, n in drawn.items() if n}
  assert sum(drawn.values()) == 200
  # Proportional to size: 90 : 45 : 30 : 40.
  np.testing.assert_allclose(drawn["a"] / 200, 90 / 205, atol=0.08)
  assert drawn["c"] > 0 and drawn["hard"] > 0


def test_source_weights_and_prefixes(ds, tokenizer):
  it = _iterator(ds, tokenizer, source_weights={"b": 1.0}, prefetch=0)
  batch = next(it)
  assert batch["query_ids"].shape == (8, 40) and batch["doc_mask"].shape == (8, 48)
  q = _decode(tokenizer, batch["query_ids"][0])
  assert q.startswith("q: b question")
  assert _decode(tokenizer, batch["doc_ids"][0]).startswith("d: b answer")
  with pytest.raises(ValueError, match="unknown sources \\['zz'\\]"):
    _iterator(ds, tokenizer, source_weights={"zz": 1.0})


def test_hard_negatives_only_from_sources_that_have_them(ds, tokenizer):
  it = _iterator(ds, tokenizer, num_negatives=2, prefetch=0)
  for _ in range(5):
    batch = next(it)
    assert batch["neg_ids"].shape == (8, 2, 48)
    first = _decode(tokenizer, batch["query_ids"][0])
    neg = _decode(tokenizer, batch["neg_ids"][0, 0])
    assert first.split()[1] == "hard" and "wrong answer" in neg
    i = first.split()[3]
    assert neg.startswith(f"d: hard wrong answer {i}")  # Its own negatives, first first.


def test_optional_negatives_are_used_where_the_data_has_them(ds, tokenizer, tmp_path):
  """negatives_required=False (the tiny configs): negatives if any source has them, else none."""
  it = _iterator(ds, tokenizer, num_negatives=2, negatives_required=False, prefetch=0)
  assert next(it)["neg_ids"].shape == (8, 2, 48)
  rows = pair_records({"a": 20}, negatives=0)
  write_jsonl(tmp_path / "pairs.jsonl", rows)
  data.prepare(str(tmp_path / "pairs.jsonl"), str(tmp_path / "pairs"))
  plain = _iterator(str(tmp_path / "pairs"), tokenizer, num_negatives=2,
                    negatives_required=False, prefetch=0)
  assert "neg_ids" not in next(plain)
  with pytest.raises(ValueError, match="with hard negatives"):
    _iterator(str(tmp_path / "pairs"), tokenizer, num_negatives=2)


def test_process_slices_concatenate_to_the_global_batch(ds, tokenizer):
  whole = _iterator(ds, tokenizer, prefetch=0)
  parts = [_iterator(ds, tokenizer, process_index=i, process_count=2, prefetch=0)
           for i in range(2)]
  for _ in range(7):
    b = next(whole)
    halves = [next(p) for p in parts]
    for key in b:
      np.testing.assert_array_equal(b[key], np.concatenate([h[key] for h in halves]))
  assert whole.get_state() == parts[0].get_state() == parts[1].get_state()


def test_resume_gives_the_same_batches_also_on_other_process_counts(ds, tokenizer):
  straight = _iterator(ds, tokenizer)
  batches = [next(straight) for _ in range(40)]  # Past an epoch of the small sources.
  first = _iterator(ds, tokenizer)
  for _ in range(25):
    next(first)
  state = json.loads(json.dumps(first.get_state()))
  first.close()
  resumed = [_iterator(ds, tokenizer, process_index=i, process_count=4, state=state)
             for i in range(4)]
  for want in batches[25:]:
    got = [next(r) for r in resumed]
    for key in want:
      np.testing.assert_array_equal(want[key], np.concatenate([g[key] for g in got]))
  straight.close()


def test_batch_larger_than_a_source_is_a_clear_error(ds, tokenizer):
  with pytest.raises(ValueError, match="Source 'b' .* has 45 examples, fewer than batch_size=64"):
    _iterator(ds, tokenizer, global_batch_size=64)
  with pytest.raises(FileNotFoundError, match="is not a prepared dataset"):
    _iterator("/tmp", tokenizer)


def test_stdlib_corpus(tmp_path):
  counts = corpus_stdlib.build_pairs(str(tmp_path))
  assert counts["train"] >= 5000 and counts["heldout_queries"] >= 100
  train_queries = {json.loads(l)["query"] for l in open(tmp_path / "train.jsonl")}
  heldout = [json.loads(l) for l in open(tmp_path / "heldout" / "queries.jsonl")]
  assert not train_queries & {q["text"] for q in heldout}
  corpus_ids = {json.loads(l)["_id"] for l in open(tmp_path / "heldout" / "corpus.jsonl")}
  lines = open(tmp_path / "heldout" / "qrels" / "test.tsv").read().splitlines()
  assert lines[0] == "query-id\tcorpus-id\tscore"
  assert all(line.split("\t")[1] in corpus_ids for line in lines[1:])
  assert len(corpus_ids) == counts["heldout_docs"]


@pytest.mark.parametrize("process_index", [0, 1])
def test_packed_batches_hold_the_padded_batches_texts(ds, tokenizer, process_index):
  """Each process packs its own rows: the texts of its padded batch, unit by unit, with
  fixed shapes, and a restored state gives the same packed batch."""
  kw = dict(num_negatives=2, source_weights={"hard": 1.0}, prefetch=0, process_count=2,
            process_index=process_index)
  padded_it = _iterator(ds, tokenizer, **kw)
  packed_it = _iterator(ds, tokenizer, packing=True, pack_length=64, pack_units=4, **kw)
  assert packed_it.pack_rows == _iterator(ds, tokenizer, packing=True, pack_length=64,
                                          pack_units=4, **{**kw, "process_index": 0}).pack_rows
  shapes = set()
  for _ in range(3):
    state = packed_it.get_state()
    padded, packed = next(padded_it), next(packed_it)
    assert packed_it.get_state() == padded_it.get_state()
    units, per = packed["query_lengths"].shape
    assert (units, per) == (2, 2)  # 4 units of 2 queries over 2 processes.
    rows = packed["packed_ids"].reshape(units, -1)
    segments = packed["packed_segment_ids"].reshape(units, -1)
    positions = packed["packed_positions"].reshape(units, -1)
    # The process's two units (one chunk, two devices) are balanced first: which padded
    # example each unit's query slot holds is read back from the packed query's tokens.
    queries = [tuple(padded["query_ids"][i][padded["query_mask"][i]]) for i in range(4)]
    order = []
    for u in range(units):
      for s in range(per):
        text = tuple(rows[u][segments[u] == s + 1])
        order.append(next(i for i in range(4) if queries[i] == text and i not in order))
    assert sorted(order) == [0, 1, 2, 3]
    tokens = sum(padded[k].reshape(4, -1).sum(1) for k in ("query_mask", "doc_mask", "neg_mask"))
    loads = tokens[order].reshape(2, 2).sum(1)
    assert loads.max() <= tokens.reshape(2, 2).sum(1).max()  # No worse than batch order.
    assert loads.max() - loads.min() <= tokens.max()  # Greedy's bound.
    for u in range(units):
      texts = []
      for i in order[u * per:(u + 1) * per]:
        texts.append(padded["query_ids"][i][padded["query_mask"][i]])
      for i in order[u * per:(u + 1) * per]:
        texts.append(padded["doc_ids"][i][padded["doc_mask"][i]])
        texts += [padded["neg_ids"][i, j][padded["neg_mask"][i, j]] for j in range(2)]
      for s, text in enumerate(texts):
        np.testing.assert_array_equal(rows[u][segments[u] == s + 1], text)
        np.testing.assert_array_equal(positions[u][segments[u] == s + 1], np.arange(len(text)))
    shapes.add(tuple(v.shape for v in packed.values()))
    again, _ = packed_it.batch_at(state)
    for key in packed:
      np.testing.assert_array_equal(again[key], packed[key])
  assert len(shapes) == 1


def _packed_pairs(batch):
  """[(query tokens, document tokens)] of a packed batch without negatives, unit by unit."""
  units, per = batch["query_lengths"].shape
  rows = batch["packed_ids"].reshape(units, -1)
  segments = batch["packed_segment_ids"].reshape(units, -1)
  return [(tuple(rows[u][segments[u] == s + 1]), tuple(rows[u][segments[u] == per + s + 1]))
          for u in range(units) for s in range(per)]


def _padded_pairs(batch):
  return [(tuple(q[m]), tuple(d[n])) for q, m, d, n in zip(
      batch["query_ids"], batch["query_mask"], batch["doc_ids"], batch["doc_mask"])]


def test_balancing_across_steps_deals_each_block_once_and_resumes(ds, tokenizer):
  """input.pack_balance_steps=4: the examples of 4 consecutive batches are dealt among
  their units by tokens. Every example of the block is trained on once, steps come out
  about even, the global batch is the same on 1 and 2 processes, and a run restored
  mid-block gets the same batches."""
  kw = dict(source_weights={"a": 1.0}, prefetch=0, max_query_len=24, max_doc_len=32)
  steps, block = 8, 4

  def run(process_count, process_index, **extra):
    it = _iterator(ds, tokenizer, process_count=process_count, process_index=process_index,
                   **kw, **extra)
    return it, [next(it) for _ in range(steps)]

  packed_kw = dict(packing=True, pack_units=2)
  padded_runs = [run(2, p) for p in (0, 1)]
  padded = [batches for _, batches in padded_runs]  # [process][step]
  dealt = [run(2, p, pack_balance_steps=block, **packed_kw) for p in (0, 1)]
  single_it, single = run(1, 0, pack_balance_steps=block, **packed_kw)
  drawn_rows = _iterator(ds, tokenizer, **kw, **packed_kw).pack_rows
  assert single_it.pack_rows == dealt[0][0].pack_rows <= drawn_rows
  assert dealt[0][0].get_state() == padded_runs[0][0].get_state()
  for i in range(steps):  # One global batch, split over 2 processes or not.
    assert _packed_pairs(single[i]) == _packed_pairs(dealt[0][1][i]) + _packed_pairs(
        dealt[1][1][i])
  tokens = lambda pairs: sum(len(q) + len(d) for q, d in pairs)
  for start in range(0, steps, block):
    want = [pair for i in range(start, start + block)
            for pair in _padded_pairs(padded[0][i]) + _padded_pairs(padded[1][i])]
    got = [_packed_pairs(b) for b in single[start:start + block]]
    assert sorted(sum(got, [])) == sorted(want)  # The block's examples, each once.
    # Dealt as packing.balanced_order deals the block's examples among its 8 units.
    order = packing.balanced_order(np.array([len(q) + len(d) for q, d in want]), block * 2)
    assert sum(got, []) == [want[k] for k in order]
    per_step = [tokens(pairs) for pairs in got]
    drawn = [tokens(want[j * 8:(j + 1) * 8]) for j in range(block)]
    assert max(per_step) <= max(drawn)
    assert max(per_step) - min(per_step) <= max(len(q) + len(d) for q, d in want)
  assert all(b["packed_capped"].sum() == 0 for b in single)
  # Restored mid-block (step 5 of blocks of 4): the same batches as the run that went on.
  for p in (0, 1):
    it, batches = dealt[p]
    state = {"step": 5, "cursors": {**it.get_state()["cursors"], "a": 5 * 8}}
    resumed = _iterator(ds, tokenizer, process_count=2, process_index=p, state=state,
                        pack_balance_steps=block, **kw, **packed_kw)
    for want_batch in batches[5:]:
      got_batch = next(resumed)
      for key in want_batch:
        np.testing.assert_array_equal(got_batch[key], want_batch[key])


def test_rows_by_source_pack_the_same_texts_in_fewer_rows(ds, tokenizer):
  """input.pack_shapes=2: a source of short texts packs its steps in fewer rows than
  the others; every step holds the same texts in the same places as with one shape
  (first-fit never reaches the rows it drops), and row_shapes lists every shape."""
  kw = dict(source_weights={"a": 2.0, "b": 1.0, "c": 1.0}, prefetch=0, max_query_len=24,
            max_doc_len=32, packing=True, pack_units=2, pack_balance_steps=2,
            source_prefixes={"b": {"max_doc_len": 6, "max_query_len": 6}})
  one = _iterator(ds, tokenizer, **kw)
  two = _iterator(ds, tokenizer, pack_shapes=2, **kw)
  assert one.row_shapes == [one.pack_rows] and one.pack_rows == two.pack_rows
  assert len(two.row_shapes) == 2 and two.source_rows["b"] < two.source_rows["a"]
  seen = set()
  for step in range(12):
    source = two.source_of_step(step)
    a, b = next(one), next(two)
    rows = two.source_rows[source]
    seen.add(rows)
    assert b["packed_ids"].shape == (2 * rows, one.pack_length)
    for key in ("packed_ids", "packed_segment_ids", "packed_positions"):
      units_a = a[key].reshape(2, one.pack_rows, -1)
      np.testing.assert_array_equal(b[key].reshape(2, rows, -1), units_a[:, :rows])
      assert not units_a[:, rows:].any()  # The dropped rows held nothing.
    for key in ("query_lengths", "doc_lengths", "packed_capped"):
      np.testing.assert_array_equal(a[key], b[key])
    assert b["packed_capped"].sum() == 0
  assert seen == set(two.row_shapes)


@pytest.mark.parametrize("fields, message", [
    (dict(pack_shapes=0), "input.pack_shapes=0 must be a whole number of row counts"),
    (dict(pack_balance_steps=0), "input.pack_balance_steps=0 must be a whole number"),
    (dict(pack_balance_steps=4, pack_balance=False), "pack_balance=False asks for no"),
])
def test_bad_pack_balance_steps_is_named(fields, message):
  with pytest.raises(ValueError, match=message):
    data.InputConfig(packing=True, **fields)


def test_pack_length_shorter_than_a_text_width_is_named():
  with pytest.raises(ValueError, match="input.pack_length=32 is shorter than the longest"):
    data.InputConfig(max_query_len=16, max_doc_len=48, packing=True, pack_length=32)


@pytest.mark.parametrize("negatives", [0, 3])
def test_batch_shapes_are_those_the_iterator_yields(ds, tokenizer, negatives):
  """What an ahead-of-time compile takes in place of data (moe_embed/train/aot.py)."""
  it = _iterator(ds, tokenizer, num_negatives=negatives, max_query_len=24, max_doc_len=40)
  try:
    batch = next(it)
  finally:
    it.close()
  inputs = data.InputConfig(max_query_len=24, max_doc_len=40, num_negatives=negatives)
  expected = data.pipeline.batch_shapes(inputs, 8)
  assert {k: (v.shape, v.dtype) for k, v in batch.items()} == expected
