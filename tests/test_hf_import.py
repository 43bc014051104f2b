"""Checkpoint import: all-MiniLM-L6-v2 vs sentence-transformers, XLM-R vs transformers,
and the nomic-bert MoE layout round trip."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from moe_embed import inference
from moe_embed.io import hf_export, hf_import
from moe_embed.io import model_folder
from moe_embed.model import config as model_config
from moe_embed.model.encoder import EmbeddingModel, init_params
from tests.reference_models import TEXTS, minilm_folder


@pytest.mark.torch
def test_minilm_matches_sentence_transformers():
  pytest.importorskip("torch")
  st = pytest.importorskip("sentence_transformers")
  folder = minilm_folder()
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  reference = st.SentenceTransformer(folder, device="cpu")
  want = reference.encode(TEXTS, batch_size=8, normalize_embeddings=True)
  embedder = inference.load_embedder(folder)
  assert embedder.max_length == 256
  got = embedder.encode(TEXTS, batch_size=5, show_progress=False)
  assert embedder.last_truncated == 2
  cosine = np.sum(got * want, axis=1)
  assert cosine.min() >= 0.99999, cosine
  assert np.abs(got - want).max() <= 1e-4


@pytest.mark.torch
def test_xlm_roberta_layout_matches_transformers(tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  cfg = transformers.XLMRobertaConfig(
      vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
      intermediate_size=64, max_position_embeddings=40, type_vocab_size=1, pad_token_id=1,
      layer_norm_eps=1e-5)
  torch.manual_seed(0)
  model = transformers.XLMRobertaModel(cfg, add_pooling_layer=True).eval()
  model.save_pretrained(tmp_path)
  params, config, _ = hf_import.load_hf_folder(str(tmp_path))
  assert config.position_offset == 2 and config.pad_token_id == 1
  rng = np.random.default_rng(0)
  ids = rng.integers(3, 300, size=(3, 12))
  mask = np.arange(12)[None, :] < np.array([[12], [7], [3]])
  ids = np.where(mask, ids, 1)
  with torch.no_grad():
    hidden = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask.astype(int)))[0]
  pooled = (hidden.numpy() * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
  want = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
  got, _ = EmbeddingModel(config).apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
  np.testing.assert_allclose(np.asarray(got), want, atol=2e-5)


def _tiny_moe(**overrides):
  config = model_config.preset("tiny", vocab_size=300, **overrides)
  params = nn.meta.unbox(init_params(config, jax.random.PRNGKey(3)))
  params = jax.tree.map(lambda p: np.asarray(p) + 0.05 * np.random.default_rng(1).normal(
      size=p.shape).astype(np.float32), params)
  return config, params


def _write_nomic(folder, config, params, drop=None, reshape=None):
  from safetensors.numpy import save_file
  state = hf_export.to_nomic_state_dict(params, config)
  if drop:
    del state[drop]
  if reshape:
    state[reshape] = state[reshape][:-1]
  os.makedirs(folder, exist_ok=True)
  save_file(state, os.path.join(folder, "model.safetensors"))
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(hf_export.nomic_config_json(config), f)


@pytest.mark.parametrize("overrides", [dict(), dict(mlp_activation="swiglu", moe_every_n_layers=0),
                                       dict(qkv_bias=False, type_vocab_size=0),
                                       # nomic-bert's placement (i % n == 1) and p-norm.
                                       dict(num_layers=6, moe_every_n_layers=3,
                                            moe_layer_offset=1, renormalize_topk=2),
                                       dict(num_layers=6, moe_every_n_layers=3)])
def test_nomic_layout_round_trip(tmp_path, overrides):
  config, params = _tiny_moe(**overrides)
  _write_nomic(str(tmp_path), config, params)
  hf = json.load(open(os.path.join(tmp_path, "config.json")))
  loaded, loaded_config, meta = hf_import.load_hf_folder(str(tmp_path))
  assert loaded_config == config.replace(rotary_base=float(config.rotary_base))
  if overrides.get("moe_layer_offset") == 1:  # As nomic-bert writes it: no offset recorded.
    assert "moe_layer_offset" not in hf and hf["moe_normalize_expert_weights"] == 2
    assert loaded_config.moe_layers == (1, 4)
  elif overrides.get("moe_every_n_layers") == 3:
    assert hf["moe_layer_offset"] == -1 and loaded_config.moe_layers == (2, 5)
  assert meta["query_prefix"] == "search_query: "
  flat_a = jax.tree_util.tree_leaves_with_path(params)
  flat_b = dict(jax.tree_util.tree_leaves_with_path(loaded))
  for path, value in flat_a:
    if path in flat_b:
      np.testing.assert_array_equal(flat_b[path], value, err_msg=jax.tree_util.keystr(path))
  ids = jnp.asarray(np.random.default_rng(0).integers(4, 300, size=(2, 9)))
  mask = jnp.ones((2, 9), bool)
  a, _ = EmbeddingModel(config).apply({"params": params}, ids, mask)
  b, _ = EmbeddingModel(loaded_config).apply({"params": loaded}, ids, mask)
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_nomic_megablocks_expert_layout(tmp_path):
  """w1 / w2 are stacked [experts * mlp, width]; expert e is rows e*F:(e+1)*F."""
  config, params = _tiny_moe()
  state = hf_export.to_nomic_state_dict(params, config)
  w1 = state["encoder.layers.1.mlp.experts.mlp.w1"]
  f = config.mlp_dim
  np.testing.assert_array_equal(w1[2 * f:3 * f], np.asarray(params["encoder"]["layer_1"]["mlp"]["w1"][2]).T)
  np.testing.assert_array_equal(state["encoder.layers.1.mlp.experts.mlp.w2"][f:2 * f],
                                params["encoder"]["layer_1"]["mlp"]["w2"][1])


def test_bad_checkpoints_name_the_tensor(tmp_path):
  config, params = _tiny_moe()
  _write_nomic(str(tmp_path / "a"), config, params, drop="encoder.layers.2.attn.out_proj.weight")
  with pytest.raises(hf_import.CheckpointError,
                     match=r"missing tensor 'encoder.layers.2.attn.out_proj.weight' \(expected shape \(64, 64\)\)"):
    hf_import.load_hf_folder(str(tmp_path / "a"))
  _write_nomic(str(tmp_path / "b"), config, params, reshape="encoder.layers.3.mlp.experts.mlp.w2")
  with pytest.raises(hf_import.CheckpointError,
                     match=r"'encoder.layers.3.mlp.experts.mlp.w2' has shape \(1023, 64\), expected \(1024, 64\)"):
    hf_import.load_hf_folder(str(tmp_path / "b"))
  # A dense checkpoint under an MoE config.json: the silent-wrong-output trap.
  dense_config, dense_params = _tiny_moe(moe_every_n_layers=0)
  _write_nomic(str(tmp_path / "c"), dense_config, dense_params)
  hf = json.load(open(tmp_path / "c" / "config.json"))
  hf["moe_every_n_layers"] = 2
  json.dump(hf, open(tmp_path / "c" / "config.json", "w"))
  with pytest.raises(hf_import.CheckpointError, match="no encoder.layers.1.mlp.router.layer.weight"):
    hf_import.load_hf_folder(str(tmp_path / "c"))
  # Options of the reference code the encoder does not implement are refused by name.
  for key, value in (("num_shared_experts", 1), ("parallel_block", True), ("ffn_div", 2)):
    hf = json.load(open(tmp_path / "b" / "config.json"))
    hf[key] = value
    json.dump(hf, open(tmp_path / "b" / "config.json", "w"))
    with pytest.raises(hf_import.CheckpointError, match=f"{key}={value!r}"):
      hf_import.load_hf_folder(str(tmp_path / "b"))
    del hf[key]
    json.dump(hf, open(tmp_path / "b" / "config.json", "w"))
  with pytest.raises(FileNotFoundError, match="is not a model"):
    model_folder.load_any(str(tmp_path))


def test_native_folder_round_trip(tmp_path):
  config, params = _tiny_moe()
  spm = tmp_path / "tok.model"
  spm.write_bytes(b"not a real model")
  model_folder.save_model_folder(str(tmp_path / "m"), params, config, tokenizer_path=str(spm),
                             query_prefix="q: ", max_length=77)
  loaded, loaded_config, meta = model_folder.load_any(str(tmp_path / "m"))
  assert loaded_config == config and meta["max_length"] == 77 and meta["query_prefix"] == "q: "
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(loaded)):
    np.testing.assert_array_equal(a, b)


def test_nomic_token_limit_is_its_context_not_512():
  """A rotary nomic-bert model encodes up to n_positions tokens (8192 for v1)."""
  config = model_config.preset("tiny")
  hf = {**hf_export.nomic_config_json(config), "n_positions": 8192}
  loaded = hf_import.config_from_hf(hf)
  assert loaded.max_position_embeddings == 8192
  assert loaded.replace(max_position_embeddings=512) == config
  from moe_embed.io import model_folder
  assert model_folder.token_limit(loaded) == 8192
