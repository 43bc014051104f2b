"""Encoder: parameter counts, padding invariance, rotary positions, config errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_embed.model import config as model_config
from moe_embed.model import layers, param_count
from moe_embed.moe import router_stats
from moe_embed.model.encoder import EmbeddingModel, init_params


def test_nomic_v2_moe_parameter_counts_from_tree():
  """The released model's counts: 475,292,928 total, 305,423,616 active at top-2."""
  config = model_config.preset("nomic_v2_moe")
  params = param_count.abstract_params(config)
  assert param_count.count_params(params) == 475_292_928
  assert param_count.count_active_params(params, config) == 305_423_616


def test_minilm_parameter_count():
  # all-MiniLM-L6-v2 has 22,713,216 parameters with its 384x384 pooler, which
  # sentence embeddings do not use (147,840 parameters).
  config = model_config.preset("minilm")
  params = param_count.abstract_params(config)
  assert param_count.count_params(params) == 22_713_216 - 147_840
  assert param_count.count_active_params(params, config) == param_count.count_params(params)


def test_every_parameter_has_logical_axis_names():
  config = model_config.preset("tiny")
  params = param_count.abstract_params(config)
  leaves = jax.tree_util.tree_leaves(params, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
  for leaf in leaves:
    assert len(leaf.names) == len(leaf.value.shape)
  expert_leaves = [x for x in leaves if x.names[0] == "exp"]
  assert len(expert_leaves) == 2 * len(config.moe_layers)  # w1 and w2 of each MoE layer.


def _embed(config, params, ids, mask):
  return EmbeddingModel(config).apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask))


@pytest.mark.parametrize("overrides", [
    dict(),
    dict(moe_dispatch="capacity", capacity_factor=8.0),
    dict(norm="pre", position_embedding="learned", position_offset=2),
    dict(mlp_activation="swiglu", renormalize_topk=True),
])
def test_padding_changes_neither_embeddings_nor_router_statistics(overrides):
  config = model_config.preset("tiny", **overrides)
  params = nn.meta.unbox(init_params(config, jax.random.PRNGKey(1)))
  rng = np.random.default_rng(0)
  lengths = np.array([9, 4, 12])
  ids = rng.integers(4, config.vocab_size, size=(3, 12))
  mask = np.arange(12)[None, :] < lengths[:, None]
  ids = np.where(mask, ids, config.pad_token_id)
  emb, aux = _embed(config, params, ids, mask)
  # The same texts with 20 more padding tokens, and padding filled with junk ids.
  ids_long = np.concatenate([ids, rng.integers(4, 100, size=(3, 20))], axis=1)
  mask_long = np.concatenate([mask, np.zeros((3, 20), bool)], axis=1)
  emb_long, aux_long = _embed(config, params, ids_long, mask_long)
  np.testing.assert_allclose(np.asarray(emb_long), np.asarray(emb), atol=2e-6)
  stats, stats_long = router_stats.add_stats([aux]), router_stats.add_stats([aux_long])
  assert set(stats) == {f"layer_{i}" for i in config.moe_layers}
  for layer in stats:
    for key in router_stats.STAT_KEYS:
      np.testing.assert_allclose(np.asarray(stats_long[layer][key]),
                                 np.asarray(stats[layer][key]), rtol=1e-5, atol=1e-5)
    assert float(stats[layer]["num_tokens"]) == lengths.sum()
  np.testing.assert_allclose(np.linalg.norm(np.asarray(emb), axis=-1), 1.0, rtol=1e-5)


def test_rotary_matches_numpy_and_is_relative():
  rng = np.random.default_rng(0)
  length, heads, dim = 7, 2, 8
  x = rng.normal(size=(1, length, heads, dim)).astype(np.float32)
  cos, sin = layers.rotary_tables(length, dim, 10_000.0)
  got = np.asarray(layers.apply_rotary(jnp.asarray(x), cos, sin))
  # NumPy reference: rotate pairs (i, i + dim/2) by angle pos * base^(-2i/dim).
  want = np.empty_like(x)
  half = dim // 2
  for pos in range(length):
    for i in range(half):
      theta = pos * 10_000.0 ** (-2 * i / dim)
      a, b = x[0, pos, :, i], x[0, pos, :, i + half]
      want[0, pos, :, i] = a * np.cos(theta) - b * np.sin(theta)
      want[0, pos, :, i + half] = b * np.cos(theta) + a * np.sin(theta)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # q.k after rotation depends only on the distance between positions.
  q = np.broadcast_to(x[:, :1], x.shape)
  rq = np.asarray(layers.apply_rotary(jnp.asarray(q), cos, sin))
  dots = np.einsum("hd,hd->h", rq[0, 3], rq[0, 1]), np.einsum("hd,hd->h", rq[0, 5], rq[0, 3])
  np.testing.assert_allclose(dots[0], dots[1], rtol=1e-5)


def test_partial_rotary_leaves_other_dims():
  x = jnp.asarray(np.random.default_rng(1).normal(size=(1, 5, 1, 8)), jnp.float32)
  cos, sin = layers.rotary_tables(5, 4, 10_000.0)
  out = layers.apply_rotary(x, cos, sin)
  np.testing.assert_array_equal(np.asarray(out[..., 4:]), np.asarray(x[..., 4:]))


def test_learned_positions_too_long_is_a_clear_error():
  config = model_config.preset("minilm", num_layers=1, max_position_embeddings=8)
  with pytest.raises(ValueError, match="max_position_embeddings=8"):
    init_params(config, jax.random.PRNGKey(0), seq_len=12)


def test_unknown_config_field_is_named():
  with pytest.raises(KeyError, match="'num_expert'.*num_experts"):
    model_config.preset("tiny", num_expert=4)
  with pytest.raises(ValueError, match="hidden_size=65"):
    model_config.preset("tiny", hidden_size=65)
  with pytest.raises(KeyError, match="Unknown model preset 'bert'"):
    model_config.preset("bert")
