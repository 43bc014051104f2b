"""Evaluation breadth: Matryoshka widths from one encoding, chunked search, unscorable folders,
MIRACL-style folders of languages, router statistics, the recorded token limit, MTEB through
the `mteb` package against our BEIR evaluator, and launch/eval.py's flags."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from moe_embed import evaluation, inference
from moe_embed.evaluation import beir
from moe_embed.io import model_folder
from tests.beir_folders import docstring_beir, write_beir
from tests.reference_models import minilm_folder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ("sort list key value file read write path string split join number float round "
         "date time zone parse json dump load socket send receive thread lock queue").split()


def _word_folder(folder, seed, num_docs=60, num_queries=20):
  """Documents of random words; each query shares words with its two judged documents."""
  rng = np.random.default_rng(seed)
  docs = [" ".join(rng.choice(WORDS, 8)) for _ in range(num_docs)]
  queries, qrels = [], []
  for i in range(num_queries):
    words = docs[i].split()[:2] + docs[i + num_queries].split()[:2]
    queries.append({"_id": f"q{i}", "text": " ".join(words)})
    qrels += [(f"q{i}", f"d{i}", 2), (f"q{i}", f"d{i + num_queries}", 1)]
  corpus = [{"_id": f"d{i}", "title": "", "text": t} for i, t in enumerate(docs)]
  return write_beir(folder, corpus, queries, qrels)


class BagEncoder:
  """Word counts plus a fixed per-text vector: deterministic, and its widths rank differently."""
  query_prefix, doc_prefix = "", ""

  def __init__(self):
    self.calls = []

  def encode(self, texts, *, prefix="", batch_size=64, show_progress=False, dim=None):
    self.calls.append(len(texts))
    counts = np.array([[t.split().count(w) for w in WORDS] for t in texts], np.float32)
    noise = np.stack([np.frombuffer(hashlib.sha256(t.encode()).digest(), np.uint8)[:8]
                      for t in texts]).astype(np.float32) / 255 if texts else np.zeros((0, 8))
    return np.concatenate([counts, noise], axis=1)


# --- Matryoshka widths, chunks, unscorable folders, folders of languages --------------------


def test_dims_from_one_encoding_equal_separate_runs_at_each_width(tmp_path):
  folder = _word_folder(tmp_path / "words", seed=0)
  encoder = BagEncoder()
  out = evaluation.evaluate_beir(encoder, [folder], dims=[32, 16, 8])
  assert encoder.calls == [20, 60]  # Queries once, documents once, for all widths.
  row = out["words"]
  assert set(row["dims"]) == {"32", "16", "8"}
  for width in (32, 16, 8):
    alone = evaluation.evaluate_beir(BagEncoder(), [folder], dim=width)["words"]
    assert row["dims"][str(width)] == alone, width
  # The usual metrics stay those of the full width; the widths really differ.
  assert {k: row[k] for k in alone} == evaluation.evaluate_beir(BagEncoder(), [folder])["words"]
  assert row["dims"]["8"]["ndcg@10"] != row["ndcg@10"]
  assert out["average"]["dims"]["16"]["ndcg@10"] == row["dims"]["16"]["ndcg@10"]
  table = evaluation.format_table(out)
  assert "words @16" in table and "average @8" in table


def test_chunked_documents_give_the_same_run_as_one_chunk(tmp_path):
  folder = _word_folder(tmp_path / "words", seed=1, num_docs=50)
  whole = evaluation.evaluate_beir(BagEncoder(), [folder], dims=[8])
  encoder = BagEncoder()
  chunked = evaluation.evaluate_beir(encoder, [folder], dims=[8], chunk_size=7)
  assert encoder.calls == [20] + [7] * 7 + [1]
  assert chunked == whole


def test_a_folder_without_a_scorable_query_is_reported_and_not_averaged(tmp_path):
  good = _word_folder(tmp_path / "good", seed=2)
  no_queries = write_beir(tmp_path / "no_queries", [{"_id": "d1", "text": "sort list"}], [],
                          [("q1", "d1", 1)])
  unknown = write_beir(tmp_path / "unknown", [{"_id": "d1", "text": "sort list"}],
                       [{"_id": "q1", "text": "sort"}], [("q9", "d1", 1), ("q1", "d9", 1)])
  out = evaluation.evaluate_beir(BagEncoder(), [good, no_queries, unknown])
  for name in ("no_queries", "unknown"):
    row = out[name]
    assert all(row[k] is None for k in evaluation.METRIC_KEYS), row
    assert row["num_queries"] == 0 and "unknown" in row["unscored"]
  assert out["average"]["ndcg@10"] == out["good"]["ndcg@10"]
  assert (out["average"]["num_folders"], out["average"]["unscored_folders"]) == (3, 2)
  assert out["average"]["num_queries"] == out["good"]["num_queries"] == 20
  table = evaluation.format_table(out)
  assert "n/a" in table and "not scored: all 2 qrels lines name unknown" in table
  json.dumps(out, allow_nan=False)  # None, never NaN, in the JSON.


def test_miracl_layout_gives_per_language_and_average_rows(tmp_path):
  root = tmp_path / "miracl"
  for seed, lang in enumerate(("sw", "ar", "te")):
    _word_folder(root / lang, seed=10 + seed)
  os.makedirs(root / "not_a_language")  # Ignored: no corpus.jsonl.
  single = _word_folder(tmp_path / "single", seed=3)
  pairs = beir.expand_folders([str(root), single])
  assert [n for n, _ in pairs] == ["miracl/ar", "miracl/sw", "miracl/te", "single"]
  datasets = [beir.load_beir(path, name=name) for name, path in pairs]
  out = evaluation.evaluate_beir(BagEncoder(), datasets)
  langs = [out[f"miracl/{lang}"]["ndcg@10"] for lang in ("ar", "sw", "te")]
  assert out["miracl/average"]["ndcg@10"] == pytest.approx(np.mean(langs))
  assert out["miracl/average"]["num_folders"] == 3
  assert out["average"]["ndcg@10"] == pytest.approx(np.mean(langs + [out["single"]["ndcg@10"]]))
  alone = evaluation.evaluate_beir(BagEncoder(), [str(root / "ar")])["ar"]
  assert out["miracl/ar"] == alone


# --- token limit recorded in the model folder ----------------------------------------------


def test_training_truncation_and_token_limit_are_both_recorded(tmp_path):
  from moe_embed.model import config as model_config
  tokenizer = os.path.join(minilm_folder(), "tokenizer.json")
  config = model_config.preset("minilm")
  model_folder.write_meta(str(tmp_path), config, tokenizer=tokenizer, max_length=256,
                          train_max_length=96)
  _, meta = model_folder.read_meta(str(tmp_path))
  assert (meta["max_length"], meta["train_max_length"]) == (256, 96)
  meta["step"] = 100  # As load_workdir adds it.
  length, source = model_folder.encode_length(config, meta)
  assert length == 256 and "trained truncated to 96" in source
  # A workdir written before both were recorded: its max_length was the truncation.
  assert model_folder.encode_length(config, {"max_length": 96, "step": 100})[0] == 512
  # The trainer records the start model's limit: the folder's own, else the position table.
  assert model_folder.token_limit(config, {"max_length": 256}) == 256
  assert model_folder.token_limit(config, {}) == config.max_position_embeddings == 512
  assert model_folder.token_limit(config, meta) == 256


# --- router statistics and MTEB on an upcycled all-MiniLM-L6-v2 -----------------------------


@pytest.fixture(scope="module")
def moe_embedder():
  """all-MiniLM-L6-v2 upcycled to 4 experts (top-2) in layers 1, 3, 5, with prefixes."""
  from moe_embed.model.upcycle import upcycle
  from moe_embed.tokenizers import load_tokenizer
  folder = minilm_folder()
  params, config, meta = model_folder.load_any(folder)
  params, config = upcycle(params, config, num_experts=4, top_k=2, moe_every_n_layers=2,
                           renormalize_topk=True, keep_biases=True, noise_std=0.02, seed=0)
  return inference.Embedder(config, params, load_tokenizer(meta["tokenizer"]), max_length=128,
                            query_prefix="query: ", doc_prefix="passage: ")


def test_routing_counts_equal_a_direct_model_apply(moe_embedder):
  import jax

  from moe_embed.model.encoder import EmbeddingModel
  texts = ["Return the square root of x.", "Sort a list in place, stably.",
           "Open a file and return a stream.", "a", "Parse a JSON document " * 5]
  _, stats = moe_embedder.encode_with_routing(texts, prefix="query", batch_size=2,
                                              show_progress=False)
  config = moe_embedder.config
  assert sorted(stats) == [f"layer_{i}" for i in config.moe_layers]
  # One direct call over all texts, padded to the longest (the Embedder batches 2 at a time,
  # sorted by length, with bucketed lengths).
  ids, _ = moe_embedder.tokenizer.encode(["query: " + t for t in texts], 128)
  arr, mask = moe_embedder.tokenizer.pad(ids, max(len(x) for x in ids))
  _, aux = jax.jit(EmbeddingModel(config).apply)({"params": moe_embedder.params}, arr, mask)
  want = {layer: {k: np.asarray(v, np.float64) for k, v in values.items()}
          for layer, values in aux.items()}
  num_tokens = sum(len(x) for x in moe_embedder.tokenizer.encode(
      ["query: " + t for t in texts], 128)[0])
  for layer, values in want.items():
    assert stats[layer]["num_tokens"] == values["num_tokens"] == num_tokens
    np.testing.assert_array_equal(stats[layer]["expert_counts"], values["expert_counts"])
    assert stats[layer]["expert_counts"].sum() == num_tokens * config.top_k
    np.testing.assert_allclose(stats[layer]["entropy_sum"], values["entropy_sum"], rtol=1e-4)
  summary = evaluation.summarize_routing(stats, config.top_k)
  layer = summary[f"layer_{config.moe_layers[0]}"]
  fraction = np.asarray(stats[f"layer_{config.moe_layers[0]}"]["expert_counts"]) / (
      num_tokens * config.top_k)
  np.testing.assert_allclose(layer["expert_fraction"], fraction, atol=1e-6)
  assert 0 < layer["usage_entropy"] <= np.log(config.num_experts) + 1e-9


def test_sharded_routing_statistics_equal_the_single_device_ones(moe_embedder):
  """Experts over 2 devices, rows over 4: the summed statistics do not change."""
  import jax

  from moe_embed import partitioning
  from moe_embed.model.encoder import init_params
  mesh = partitioning.make_mesh(data=-1, expert=2)
  rules = partitioning.DEFAULT_RULES
  abstract = jax.eval_shape(lambda: init_params(moe_embedder.config, jax.random.PRNGKey(0)))
  shardings = partitioning.logical_shardings(abstract, mesh, rules)
  sharded = inference.Embedder(
      moe_embedder.config, jax.device_put(moe_embedder.params, shardings),
      moe_embedder.tokenizer, max_length=moe_embedder.max_length, mesh=mesh, rules=rules,
      param_shardings=shardings)
  texts = ["Sort a list in place.", "Return the square root of x.", "a", "Open a file " * 6,
           "Parse a JSON document."]
  want_emb, want = moe_embedder.encode_with_routing(texts, batch_size=3, show_progress=False)
  got_emb, got = sharded.encode_with_routing(texts, batch_size=3, show_progress=False)
  np.testing.assert_allclose(got_emb, want_emb, atol=2e-5)
  for layer in want:
    assert got[layer]["num_tokens"] == want[layer]["num_tokens"]
    np.testing.assert_array_equal(got[layer]["expert_counts"], want[layer]["expert_counts"])


def test_routing_per_folder_sums_queries_and_documents(moe_embedder, tmp_path):
  folder = _word_folder(tmp_path / "words", seed=4, num_docs=24, num_queries=8)
  out = evaluation.evaluate_beir(moe_embedder, [folder], routing=True, chunk_size=10)
  data = beir.load_beir(folder)
  _, q_stats = moe_embedder.encode_with_routing(data.query_texts, prefix="query",
                                                show_progress=False)
  layer = f"layer_{moe_embedder.config.moe_layers[-1]}"
  routing = out["words"]["routing"]
  assert routing["queries"][layer] == evaluation.summarize_routing(
      q_stats, moe_embedder.config.top_k)[layer]
  doc_tokens = sum(len(x) for x in moe_embedder.tokenizer.encode(
      ["passage: " + t for t in data.doc_texts], 128)[0])
  assert routing["documents"][layer]["num_tokens"] == doc_tokens
  assert "documents" in evaluation.format_routing(out)


@pytest.fixture(scope="module")
def docstring_folder(tmp_path_factory):
  """A BEIR folder of standard-library docstrings: summary line -> rest of the docstring."""
  return docstring_beir(tmp_path_factory.mktemp("mteb") / "stdlib_docs", num_queries=80,
                        num_docs=90)


def test_mteb_retrieval_task_scores_equal_our_beir_evaluator(moe_embedder, docstring_folder):
  pytest.importorskip("mteb")
  from moe_embed.evaluation import mteb as mteb_eval
  ours = evaluation.evaluate_beir(moe_embedder, [docstring_folder], dims=[96])["stdlib_docs"]
  assert 0.2 < ours["ndcg@10"] < 0.99, ours
  encoder = mteb_eval.MtebEncoder(moe_embedder, batch_size=32)
  task = mteb_eval.beir_task(docstring_folder)
  scored = mteb_eval.run_tasks(encoder, [task], dims=[96], show_progress=False)["stdlib_docs"]
  for got, want in ((scored["scores"]["test"]["default"], ours),
                    (scored["dims"]["96"]["scores"]["test"]["default"], ours["dims"]["96"])):
    for key, theirs in (("ndcg@10", "ndcg_at_10"), ("recall@10", "recall_at_10"),
                        ("recall@100", "recall_at_100"), ("mrr@10", "mrr_at_10")):
      assert got[theirs] == pytest.approx(want[key], abs=2e-5), (key, got[theirs], want[key])
  assert scored["main_score"] == pytest.approx(ours["ndcg@10"], abs=2e-5)
  assert ours["dims"]["96"]["ndcg@10"] != ours["ndcg@10"]


def test_mteb_encoder_uses_the_prefix_of_each_prompt_type(moe_embedder):
  pytest.importorskip("mteb")
  from mteb.types import PromptType
  from moe_embed.evaluation import mteb as mteb_eval
  encoder = mteb_eval.MtebEncoder(moe_embedder, dim=64)
  texts = ["Sort a list in place.", "Return the square root of x."]
  batches = [{"text": texts[:1]}, {"text": texts[1:]}]  # What mteb's DataLoader yields.
  for prompt_type, prefix in ((PromptType.query, "query: "), (PromptType.document, "passage: "),
                              (None, "query: ")):
    got = encoder.encode(batches, task_metadata=None, hf_split="test", hf_subset="default",
                         prompt_type=prompt_type)
    want = moe_embedder.encode([prefix + t for t in texts], dim=64, show_progress=False)
    np.testing.assert_allclose(got, want, atol=1e-6)
  assert encoder.mteb_model_meta.embed_dim == 64


# --- launch/eval.py -------------------------------------------------------------------------


def _eval(*args, timeout=600):
  return subprocess.run([sys.executable, "launch/eval.py", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=timeout,
                        env=dict(os.environ, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu"))


def test_launcher_rejects_an_unwritable_output_before_any_work(tmp_path):
  folder = _word_folder(tmp_path / "words", seed=5)
  blocker = tmp_path / "a_file"
  blocker.write_text("x")
  for output, message in ((tmp_path / "missing" / "r.json", "does not exist"),
                          (blocker / "r.json", "does not exist"),
                          (tmp_path, "is a folder")):
    # The model does not exist either: the output is checked first, in well under a second
    # of work, so the error is about the output.
    proc = _eval(f"--model={tmp_path / 'no_model'}", f"--beir={folder}", f"--output={output}")
    assert proc.returncode != 0
    lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
    assert lines[-1].startswith("Error: --output=") and message in lines[-1], proc.stderr[-800:]
  assert not (tmp_path / "missing").exists()


def test_launcher_dims_routing_and_languages(moe_embedder, tmp_path):
  """--dims and --routing on a folder of two languages, against evaluate_beir in process."""
  model = str(tmp_path / "moe_model")
  model_folder.save_model_folder(
      model, moe_embedder.params, moe_embedder.config,
      tokenizer_path=os.path.join(minilm_folder(), "tokenizer.json"),
      query_prefix=moe_embedder.query_prefix, doc_prefix=moe_embedder.doc_prefix,
      max_length=moe_embedder.max_length)
  root = tmp_path / "langs"
  for seed, lang in enumerate(("de", "en")):
    _word_folder(root / lang, seed=20 + seed, num_docs=30, num_queries=10)
  empty = write_beir(tmp_path / "empty", [{"_id": "d1", "text": "sort list"}], [],
                     [("q1", "d1", 1)])
  out = tmp_path / "r.json"
  proc = _eval(f"--model={model}", "--dims=768", f"--beir={root}")
  assert proc.returncode != 0 and "Matryoshka width dims=768 must be" in proc.stderr
  proc = _eval(f"--model={model}", f"--beir={root},{empty}", "--dims=384,64", "--routing",
               f"--output={out}", "--chunk_size=16")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "langs/average @64" in proc.stdout and "expert share" in proc.stdout
  assert "not scored: all 1 qrels lines name unknown" in proc.stdout
  written = json.loads(out.read_text())
  assert set(written) == {"langs/de", "langs/en", "langs/average", "empty", "average"}
  assert written["empty"]["ndcg@10"] is None and written["average"]["unscored_folders"] == 1
  assert written["average"]["ndcg@10"] == pytest.approx(written["langs/average"]["ndcg@10"])
  want = evaluation.evaluate_beir(moe_embedder, [str(root / "de")], dims=[384, 64],
                                  routing=True)["de"]
  got = written["langs/de"]
  assert set(got["dims"]) == {"384", "64"}
  for key in evaluation.METRIC_KEYS:
    assert got[key] == pytest.approx(want[key], abs=1e-6)
    assert got["dims"]["64"][key] == pytest.approx(want["dims"]["64"][key], abs=1e-6)
    assert got["dims"]["384"][key] == pytest.approx(got[key], abs=1e-9)
  layer = f"layer_{moe_embedder.config.moe_layers[0]}"
  assert got["routing"]["documents"][layer]["num_tokens"] == (
      want["routing"]["documents"][layer]["num_tokens"])
  np.testing.assert_allclose(got["routing"]["queries"][layer]["expert_fraction"],
                             want["routing"]["queries"][layer]["expert_fraction"], atol=1e-5)
