"""Per-source prompts and lengths in the batch iterator: metadata, config overrides, shapes."""

import json
import os

import numpy as np
import pytest

from configs import finetune
from moe_embed import data
from moe_embed.data import dataset
from moe_embed.tokenizers import train_sentencepiece
from moe_embed.train import config as run_config
from tests.records import pair_records, write_jsonl

GLOBAL = dict(max_query_len=24, max_doc_len=32, query_prefix="q: ", doc_prefix="d: ")
CLF = {"query_prefix": "classification: ", "doc_prefix": "classification: ",
       "max_query_len": 10, "max_doc_len": 14}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  rows = pair_records({"search": 40, "clf": 40}, 2) + pair_records({"plain": 40})
  texts = [t for r in rows for t in (r["query"], r["document"], *r["negatives"])]
  texts += ["classification: search_query: search_document: q: d: override: "] * 20
  return train_sentencepiece(texts * 2, 150, str(tmp_path_factory.mktemp("tok") / "spm"))


def _prepare(folder, rows, meta):
  """A prepared dataset whose dataset_info.json carries `meta` per source."""
  os.makedirs(folder, exist_ok=True)
  write_jsonl(folder / "in.jsonl", rows)
  out = str(folder / "ds")
  data.prepare(str(folder / "in.jsonl"), out)
  path = os.path.join(out, dataset.INFO)
  info = json.load(open(path))
  for source, fields in meta.items():
    info["sources"][source].update(fields)
  with open(path, "w") as f:
    json.dump(info, f, indent=2)
  return out


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
  """Sources 'search' (its own prefixes), 'clf' (prefixes and lengths), 'plain' (none)."""
  rows = pair_records({"search": 40, "clf": 40}, 2) + pair_records({"plain": 40})
  return _prepare(tmp_path_factory.mktemp("ds"), rows, {
      "search": {"query_prefix": "search_query: ", "doc_prefix": "search_document: "},
      "clf": CLF})


def _iterator(ds, tokenizer, inputs=None, **kw):
  inputs = inputs or data.InputConfig(**GLOBAL)
  args = dict(tokenizer=tokenizer, global_batch_size=8, seed=1, prefetch=0)
  args.update(kw)
  return data.make_train_iterator(ds, inputs=inputs, **args)


def _reference(tokenizer, texts, prefix, length, width):
  """Token ids and mask by a direct SentencePiece call: <s> piece ids[:length - 2] </s>, padded."""
  sp = tokenizer.sp
  ids = np.full((len(texts), width), sp.pad_id(), np.int32)
  for i, text in enumerate(texts):
    row = [sp.bos_id(), *sp.encode(prefix + text)[:length - 2], sp.eos_id()]
    ids[i, :len(row)] = row
  return ids, ids != sp.pad_id()


def _check_batch(tokenizer, batch, records, want, num_negatives=0):
  q_ids, q_mask = _reference(tokenizer, [r["query"] for r in records], want["query_prefix"],
                             want["max_query_len"], GLOBAL["max_query_len"])
  d_ids, d_mask = _reference(tokenizer, [r["document"] for r in records], want["doc_prefix"],
                             want["max_doc_len"], GLOBAL["max_doc_len"])
  np.testing.assert_array_equal(batch["query_ids"], q_ids)
  np.testing.assert_array_equal(batch["query_mask"], q_mask)
  np.testing.assert_array_equal(batch["doc_ids"], d_ids)
  np.testing.assert_array_equal(batch["doc_mask"], d_mask)
  if num_negatives:
    negs = [r["negatives"][j % len(r["negatives"])] for r in records
            for j in range(num_negatives)]
    n_ids, _ = _reference(tokenizer, negs, want["doc_prefix"], want["max_doc_len"],
                          GLOBAL["max_doc_len"])
    np.testing.assert_array_equal(batch["neg_ids"].reshape(n_ids.shape), n_ids)


def _expected(source, **overrides):
  """The settings a source should get from the `ds` fixture's metadata and GLOBAL."""
  want = {k: GLOBAL[k] for k in ("query_prefix", "doc_prefix", "max_query_len", "max_doc_len")}
  if source == "search":
    want.update(query_prefix="search_query: ", doc_prefix="search_document: ")
  if source == "clf":
    want.update(CLF)
  want.update(overrides.get(source, {}))
  return want


def test_each_batch_uses_its_sources_prompts_and_lengths(ds, tokenizer):
  it = _iterator(ds, tokenizer)
  seen = set()
  for _ in range(12):
    state = it.get_state()
    source, records = it.records_at(state)
    batch = next(it)
    assert batch["query_ids"].shape == (8, 24) and batch["doc_ids"].shape == (8, 32)
    _check_batch(tokenizer, batch, records, _expected(source))
    seen.add(source)
  assert seen == {"search", "clf", "plain"}
  # The clf texts are cut at the source's lengths, below the global width.
  clf = it.tokenize(it.readers["clf"].read([0, 1]), "clf")
  assert clf["query_mask"].sum(1).max() == 10 and clf["doc_mask"].sum(1).max() == 14


def test_hard_negatives_use_the_sources_document_prompt(ds, tokenizer):
  it = _iterator(ds, tokenizer, data.InputConfig(**GLOBAL, num_negatives=3))
  seen = set()
  for _ in range(6):
    source, records = it.records_at(it.get_state())
    batch = next(it)
    assert batch["neg_ids"].shape == (8, 3, 32)
    _check_batch(tokenizer, batch, records, _expected(source), num_negatives=3)
    seen.add(source)
  assert seen == {"search", "clf"}  # 'plain' has no negatives.


def test_config_override_wins_over_metadata_and_global(ds, tokenizer):
  override = {"clf": {"query_prefix": "override: ", "max_doc_len": 20},
              "plain": {"doc_prefix": "search_document: "}}
  it = _iterator(ds, tokenizer, data.InputConfig(**GLOBAL, source_prefixes=override))
  for source in ("search", "clf", "plain"):
    assert it.source_inputs[source] == data.pipeline.SourceInputs(**_expected(source, **override))
  assert it.source_inputs["clf"] == data.pipeline.SourceInputs(
      query_prefix="override: ", doc_prefix="classification: ", max_query_len=10,
      max_doc_len=20)
  for _ in range(8):
    source, records = it.records_at(it.get_state())
    _check_batch(tokenizer, next(it), records, _expected(source, **override))


def test_config_input_source_prefixes_reach_the_iterator(ds, tokenizer):
  c = finetune.get_config("tiny")
  c.data = ds
  c.input.update(GLOBAL)
  c.input.num_negatives = 0
  c.input.source_prefixes = {"search": {"query_prefix": "override: "}}
  inputs = run_config.input_config(c)
  it = _iterator(ds, tokenizer, inputs)
  assert it.source_inputs["search"].query_prefix == "override: "
  assert it.source_inputs["search"].doc_prefix == "search_document: "
  assert it.source_inputs["clf"] == data.pipeline.SourceInputs(**CLF)


@pytest.mark.parametrize("override,message", [
    ({"clf": {"query_prefx": "x"}}, "Unknown input.source_prefixes['clf'] key 'query_prefx'. "
                                    "Did you mean 'query_prefix'?"),
    ({"nope": {"query_prefix": "x"}, "zz": {}}, "names unknown sources ['nope', 'zz']"),
    ({"clf": {"max_doc_len": 64}}, "input.source_prefixes['clf'].max_doc_len=64 exceeds "
                                   "input.max_doc_len=32"),
    ({"clf": {"max_query_len": 2}}, "max_query_len=2 must be an integer >= 3"),
    ({"clf": {"doc_prefix": 3}}, "input.source_prefixes['clf'].doc_prefix must be a string"),
    ({"clf": "classification: "}, "input.source_prefixes['clf'] must map some of"),
])
def test_bad_overrides_are_one_line_config_errors(ds, override, message):
  c = finetune.get_config("tiny")
  c.data = ds
  c.input.update(GLOBAL)
  c.input.source_prefixes = override
  with pytest.raises(run_config.ConfigError, match=message.replace("[", r"\[").replace(
      "(", r"\(")) as e:
    run_config.input_config(c)
  assert "\n" not in str(e.value)


def test_unknown_source_without_config_data_fails_in_the_iterator(ds, tokenizer):
  inputs = data.InputConfig(**GLOBAL, source_prefixes={"nope": {"doc_prefix": "x"}})
  with pytest.raises(ValueError, match=r"names unknown sources \['nope'\]; .*dataset_info.json "
                                       r"has \['clf', 'plain', 'search'\]"):
    _iterator(ds, tokenizer, inputs)


def test_bad_metadata_is_named_and_long_metadata_lengths_are_capped(tmp_path, tokenizer,
                                                                    caplog):
  rows = pair_records({"a": 10, "b": 10})
  bad = _prepare(tmp_path / "bad", rows, {"a": {"max_doc_len": "long"}})
  with pytest.raises(ValueError, match=r"dataset_info.json sources\['a'\].max_doc_len='long' "
                                       r"must be an integer"):
    _iterator(bad, tokenizer)
  long = _prepare(tmp_path / "long", rows, {"b": {"max_doc_len": 512, "doc_prefix": None}})
  it = _iterator(long, tokenizer)
  assert it.source_inputs["b"] == data.pipeline.SourceInputs("q: ", "d: ", 24, 32)
  assert "capped at input.max_doc_len=32" in caplog.text


def test_resume_is_exact_with_per_source_prompts(ds, tokenizer):
  inputs = data.InputConfig(**GLOBAL, source_prefixes={"plain": {"max_query_len": 6}})
  straight = _iterator(ds, tokenizer, inputs, prefetch=2)
  batches = [next(straight) for _ in range(16)]
  straight.close()
  first = _iterator(ds, tokenizer, inputs, prefetch=2)
  for _ in range(9):
    next(first)
  state = json.loads(json.dumps(first.get_state()))
  first.close()
  resumed = [_iterator(ds, tokenizer, inputs, state=state, process_index=i, process_count=2)
             for i in range(2)]
  for want in batches[9:]:
    got = [next(r) for r in resumed]
    for key in want:
      np.testing.assert_array_equal(want[key], np.concatenate([g[key] for g in got]))
