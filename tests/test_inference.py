"""Encoding: input order, batching, Matryoshka dims, prefixes, the encode launcher."""

import os
import subprocess
import sys

import numpy as np
import pytest

from moe_embed import inference
from tests.reference_models import TEXTS, minilm_folder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def embedder():
  return inference.load_embedder(minilm_folder())


def test_batched_sorted_encoding_equals_one_by_one(embedder):
  batched = embedder.encode(TEXTS, batch_size=4, show_progress=False)
  single = np.stack([embedder.encode([t], show_progress=False)[0] for t in TEXTS[:6]])
  np.testing.assert_allclose(batched[:6], single, atol=2e-6)
  np.testing.assert_allclose(np.linalg.norm(batched, axis=1), 1.0, rtol=1e-5)


def test_matryoshka_dim_and_prefixes(embedder):
  full = embedder.encode(TEXTS[:3], show_progress=False)
  short = embedder.encode(TEXTS[:3], dim=64, show_progress=False)
  want = full[:, :64] / np.linalg.norm(full[:, :64], axis=1, keepdims=True)
  np.testing.assert_allclose(short, want, atol=1e-6)
  literal = embedder.encode(["x"], prefix="query: ", show_progress=False)
  joined = embedder.encode(["query: x"], show_progress=False)
  np.testing.assert_allclose(literal, joined, atol=1e-6)
  with pytest.raises(ValueError, match="dim=1000"):
    embedder.encode(["x"], dim=1000)


def test_encode_launcher(tmp_path):
  texts = tmp_path / "texts.txt"
  texts.write_text("\n".join(["first text", "second, longer text about retrieval", "", "last"]))
  out = tmp_path / "emb.npy"
  proc = subprocess.run([sys.executable, "launch/encode.py", f"--model={minilm_folder()}",
                         f"--input={texts}", f"--output={out}", "--dim=128", "--batch_size=2"],
                        cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "1 empty lines (first: line 3)" in proc.stderr
  emb = np.load(out)
  assert emb.shape == (4, 128) and emb.dtype == np.float32
  missing = subprocess.run([sys.executable, "launch/encode.py", "--model=/no/model",
                            f"--input={texts}", f"--output={out}"], cwd=REPO,
                           capture_output=True, text=True, timeout=300)
  assert missing.returncode != 0 and "Model path /no/model does not exist" in missing.stderr


def test_training_workdir_loads_its_latest_checkpoint(tmp_path):
  """A workdir (checkpoints/ + model.json) serves as --model: the newest step's params."""
  import jax
  from flax import linen as nn

  from moe_embed.io import checkpoints, model_folder
  from moe_embed.model import config as model_config
  from moe_embed.model.encoder import init_params
  from moe_embed.tokenizers import load_tokenizer

  tokenizer_path = os.path.join(minilm_folder(), "tokenizer.json")
  config = model_config.preset("tiny", vocab_size=load_tokenizer(tokenizer_path).vocab_size,
                               pad_token_id=0)
  workdir = str(tmp_path / "run")
  os.makedirs(workdir)
  model_folder.write_meta(workdir, config, query_prefix="q: ", doc_prefix="d: ",
                          max_length=48, train_max_length=32, tokenizer=tokenizer_path)
  manager = checkpoints.make_manager(workdir, async_save=False)
  steps = {}
  for step, seed in ((10, 0), (20, 1)):
    steps[step] = nn.meta.unbox(init_params(config, jax.random.PRNGKey(seed)))
    checkpoints.save(manager, step, {"params": {"model": steps[step]}}, {"step": step})
  manager.wait_until_finished()
  manager.close()
  loaded = inference.load_embedder(workdir)
  assert (loaded.query_prefix, loaded.doc_prefix, loaded.max_length) == ("q: ", "d: ", 48)
  want = inference.Embedder(config, steps[20], load_tokenizer(tokenizer_path), max_length=48)
  texts = TEXTS[:5]
  np.testing.assert_allclose(loaded.encode(texts, prefix="query", show_progress=False),
                             want.encode(["q: " + t for t in texts], show_progress=False),
                             atol=1e-6)
  stale = inference.Embedder(config, steps[10], load_tokenizer(tokenizer_path), max_length=48)
  assert not np.allclose(loaded.encode(texts, show_progress=False),
                         stale.encode(texts, show_progress=False), atol=1e-3)


def test_sharded_embedder_equals_the_single_device_one(embedder):
  """The trainer's evaluation forward: params sharded over 8 devices, odd row counts."""
  import jax

  from moe_embed import partitioning
  from moe_embed.model.encoder import init_params

  mesh = partitioning.make_mesh(data=-1, expert=1)
  rules = partitioning.DEFAULT_RULES
  abstract = jax.eval_shape(lambda: init_params(embedder.config, jax.random.PRNGKey(0)))
  shardings = partitioning.logical_shardings(abstract, mesh, rules)
  params = jax.device_put(embedder.params, shardings)
  # As the trainer builds it: no parameters of its own, the current ones given per call.
  unbound = inference.Embedder(embedder.config, None, embedder.tokenizer,
                               max_length=embedder.max_length, mesh=mesh, rules=rules,
                               param_shardings=shardings)
  sharded = unbound.with_params(params)
  for texts, batch_size in ((TEXTS[:5], 64), (TEXTS, 6)):
    want = embedder.encode(texts, batch_size=batch_size, show_progress=False)
    got = sharded.encode(texts, batch_size=batch_size, show_progress=False)
    np.testing.assert_allclose(got, want, atol=2e-6)
  assert unbound.params is None and sharded._forward is unbound._forward  # One compile.
  with pytest.raises(ValueError, match="has no parameters"):
    unbound.encode(TEXTS[:1], show_progress=False)


def test_encode_with_routing_returns_the_embeddings_and_statistics(embedder):
  """encode always returns an array; the statistics have their own call ({} when dense)."""
  plain = embedder.encode(TEXTS[:4], dim=64, show_progress=False)
  assert isinstance(plain, np.ndarray) and plain.shape == (4, 64)
  emb, stats = embedder.encode_with_routing(TEXTS[:4], dim=64, show_progress=False)
  np.testing.assert_array_equal(emb, plain)
  assert stats == {}  # MiniLM is dense; MoE statistics: tests/test_eval_extra.py.
