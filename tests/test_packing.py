"""Packed (padding-free) batches: layout, overflow, and exactness against unpacked encoding.

References: every text encoded alone without padding; the padded train step on
the same texts (loss, router statistics and gradients, plain and GradCache, on
1 and 8 devices); the padded iterator's texts.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from moe_embed import partitioning
from moe_embed.data import packing
from moe_embed.model import config as model_config
from moe_embed.model.encoder import EmbeddingModel, init_params
from moe_embed.train import step as step_lib
from tests.tree_asserts import assert_trees_close


def _texts(rng, lengths, vocab=500):
  return [[int(t) for t in rng.integers(4, vocab, size=n)] for n in lengths]


def test_pack_unit_layout_segments_and_positions():
  rng = np.random.default_rng(0)
  texts = _texts(rng, [5, 8, 1, 3, 8, 2])
  unit = packing.pack_unit(texts, num_rows=4, pack_length=8, pad_id=0)
  assert unit.ids.shape == (4, 8) and unit.capped == 0
  for i, text in enumerate(texts):
    where = unit.segment_ids == i + 1
    assert where.sum() == len(text) and np.sum(where.any(axis=1)) == 1  # One row only.
    np.testing.assert_array_equal(unit.ids[where], text)
    np.testing.assert_array_equal(unit.positions[where], np.arange(len(text)))
  assert np.all(unit.ids[unit.segment_ids == 0] == 0)
  np.testing.assert_array_equal(unit.lengths, [5, 8, 1, 3, 8, 2])


def test_overflow_caps_the_longest_texts_to_the_longest_length_that_fits():
  rng = np.random.default_rng(1)
  texts = _texts(rng, [8, 8, 8, 2])  # 26 tokens; 3 rows of 8 hold 24.
  unit = packing.pack_unit(texts, num_rows=3, pack_length=8, pad_id=0)
  # Capped at 7 the 2 finds no row (1 left in each); at 6 the rows are 6+2 | 6 | 6.
  assert unit.capped == 3
  np.testing.assert_array_equal(unit.lengths, [6, 6, 6, 2])
  for i, text in enumerate(texts):
    np.testing.assert_array_equal(unit.ids[unit.segment_ids == i + 1], text[:unit.lengths[i]])
  with pytest.raises(ValueError, match="pack_length"):
    packing.pack_unit(_texts(rng, [9]), 2, 8, 0)


def test_size_rows_covers_the_sampled_units():
  rng = np.random.default_rng(2)
  sample = rng.integers(2, 60, size=(500, 2))  # [examples, (query, document)]
  rows = packing.size_rows([sample], texts_per_unit=16, pack_length=64)
  for _ in range(20):
    pick = sample[rng.integers(0, 500, 16)].reshape(-1)
    assert packing.rows_needed(pick, 64) <= rows
  assert rows < 32  # Far fewer than one row per text.
  # Never more rows than texts at their full widths need (here one text per row).
  long = np.full((500, 2), 60)
  assert packing.size_rows([long], texts_per_unit=16, pack_length=64) == 34  # 32 x 1.05.
  assert packing.size_rows([long], texts_per_unit=16, pack_length=64, widths=[60, 60]) == 32
  assert (packing.size_rows([sample], 16, 64, widths=[60, 60]) == rows)  # Cap not reached.


def test_balanced_order_evens_the_units_and_keeps_each_chunk():
  rng = np.random.default_rng(5)
  tokens = np.sort(rng.integers(1, 200, size=64))[::-1]  # Drawn in order: the worst case.
  order = packing.balanced_order(tokens, units=4)
  assert sorted(order) == list(range(64))
  loads = tokens[order].reshape(4, 16).sum(1)
  drawn = tokens.reshape(4, 16).sum(1)
  # Greedy's bound: the heaviest unit is within one example of the mean.
  assert loads.max() <= tokens.sum() / 4 + tokens.max() and loads.max() < 0.6 * drawn.max()
  # Two shards x three chunks of 5 examples (step.split_chunks' layout): every example
  # stays in its chunk, and each chunk's two units come out even.
  tokens = rng.integers(1, 100, size=30)
  order = packing.chunk_balanced_order(tokens, shards=2, chunks=3)
  chunk_of = lambda i: (i % 15) // 5
  assert sorted(order) == list(range(30))
  assert [chunk_of(i) for i in order] == [chunk_of(i) for i in range(30)]
  units = tokens[order].reshape(2, 3, 5).sum(-1)  # [shard, chunk]
  drawn = tokens.reshape(2, 3, 5).sum(-1)
  assert (np.abs(units[0] - units[1]) <= tokens.max()).all()
  assert units.max(0).sum() <= drawn.max(0).sum()
  np.testing.assert_array_equal(packing.chunk_balanced_order(tokens, 1, 3), np.arange(30))


def test_balanced_units_need_fewer_rows():
  rng = np.random.default_rng(3)
  sample = np.stack([rng.integers(2, 30, 1000), rng.integers(2, 120, 1000)], 1)
  alone = packing.size_rows([sample], texts_per_unit=16, pack_length=128)
  balanced = packing.size_rows([sample], texts_per_unit=16, pack_length=128, balanced_units=4)
  assert balanced < alone
  for _ in range(10):  # Balanced units of 4 drawn alike fit the balanced rows.
    pick = sample[rng.integers(0, 1000, 64)]
    pick = pick[packing.balanced_order(pick.sum(1), 4)]
    assert max(packing.rows_needed(pick[u * 16:(u + 1) * 16].reshape(-1), 128)
               for u in range(4)) <= balanced


def test_rows_by_source_are_each_sources_own_sizing():
  """size_source_rows: each source sized alone from the same draws; the largest is
  size_rows, and a source of short texts gets fewer rows."""
  rng = np.random.default_rng(4)
  long = np.stack([rng.integers(2, 30, 800), rng.integers(60, 128, 800)], 1)
  short = np.stack([rng.integers(2, 30, 800), rng.integers(2, 40, 800)], 1)
  for units in (1, 4):
    per_source = packing.size_source_rows([long, short], 16, 128, balanced_units=units)
    assert max(per_source) == packing.size_rows([long, short], 16, 128, balanced_units=units)
    assert per_source[1] < per_source[0]
    assert per_source[0] == packing.size_rows([long], 16, 128, balanced_units=units)
    for sample, rows in zip((long, short), per_source):  # Every drawn unit fits its rows.
      for _ in range(10):
        pick = sample[rng.integers(0, 800, 16 * units)]
        pick = pick[packing.balanced_order(pick.sum(1), units)]
        assert max(packing.rows_needed(pick[u * 16:(u + 1) * 16].reshape(-1), 128)
                   for u in range(units)) <= rows


def _group_rows_by_search(rows, weights, shapes):
  """The least weighted rows per step, searching every set of at most `shapes` row
  counts (each source takes the fewest of the set that hold it)."""
  import itertools
  need = sorted(set(rows))
  best = float("inf")
  for k in range(1, shapes + 1):
    for chosen in itertools.combinations(need, k):
      if max(rows) not in chosen:
        continue
      best = min(best, sum(w * min(c for c in chosen if c >= r) for r, w in zip(rows, weights)))
  return best


def test_group_rows_wastes_the_fewest_rows():
  rng = np.random.default_rng(6)
  for _ in range(40):
    n = int(rng.integers(1, 8))
    rows = [int(r) for r in rng.integers(10, 40, n)]
    weights = list(rng.dirichlet(np.ones(n)))
    for shapes in (1, 2, 3, 9):
      got = packing.group_rows(rows, weights, shapes)
      assert len(set(got)) <= shapes and all(g >= r for g, r in zip(got, rows))
      assert set(got) <= set(rows)
      cost = sum(w * g for w, g in zip(weights, got))
      np.testing.assert_allclose(cost, _group_rows_by_search(rows, weights, shapes))
  assert packing.group_rows([30, 21, 25], [0.6, 0.3, 0.1], 1) == [30, 30, 30]
  assert packing.group_rows([30, 21, 25], [0.6, 0.3, 0.1], 2) == [30, 21, 30]
  assert packing.group_rows([30, 21, 25], [0.6, 0.3, 0.1], 3) == [30, 21, 25]
  with pytest.raises(ValueError, match="shapes=0 must be at least 1"):
    packing.group_rows([3], [1.0], 0)


def _small(name):
  if name == "minilm":  # Learned absolute positions, token types, dense.
    return model_config.preset("minilm", vocab_size=512, hidden_size=32, num_heads=4,
                               mlp_dim=64, num_layers=2)
  # Rotary positions, layer 1 of 2 an MoE.
  return model_config.preset("tiny", vocab_size=512, num_layers=2)


@pytest.mark.parametrize("name", ["minilm", "tiny"])
def test_packed_embeddings_equal_each_text_alone(name):
  config = _small(name)
  model = EmbeddingModel(config)
  params = nn.meta.unbox(init_params(config, jax.random.PRNGKey(0)))
  length = 16
  rng = np.random.default_rng(3)
  # Three distinct lengths (each compiles once alone), including 1 and pack_length.
  texts = _texts(rng, [1, length, 6, 1, 6, length, 6, 1])
  batch = packing.pack_unit(texts, 4, length, config.pad_token_id)
  e, aux = jax.jit(lambda p, i, s, q: model.apply(
      {"params": p}, i, s, q, 1, len(texts), method=EmbeddingModel.embed_packed))(
          params, batch.ids, batch.segment_ids, batch.positions)
  alone = jax.jit(lambda p, ids: model.apply({"params": p}, ids, jnp.ones_like(ids)))
  tokens = 0
  for i, text in enumerate(texts):
    ref, ref_aux = alone(params, jnp.asarray([text], jnp.int32))
    np.testing.assert_allclose(np.asarray(e[i]), np.asarray(ref[0]), rtol=1e-5, atol=1e-6)
    tokens += len(text)
  if config.moe_every_n_layers:
    assert float(aux["layer_1"]["num_tokens"]) == tokens  # The router saw the real ones only.


def _padded_batch(config, rng, b, n, lq, ld):
  """A padded batch and its token lists; lengths include 1 and the full width."""

  def texts(count, width):
    lengths = rng.integers(1, width + 1, size=count)
    lengths[:2] = [1, width][:count]
    return _texts(rng, lengths, config.vocab_size)

  q, d = texts(b, lq), texts(b, ld)
  negs = [texts(n, ld) for _ in range(b)]

  def pad(lists, width):
    ids = np.full((len(lists), width), config.pad_token_id, np.int32)
    mask = np.zeros((len(lists), width), bool)
    for i, t in enumerate(lists):
      ids[i, :len(t)], mask[i, :len(t)] = t, True
    return ids, mask

  batch = {}
  batch["query_ids"], batch["query_mask"] = pad(q, lq)
  batch["doc_ids"], batch["doc_mask"] = pad(d, ld)
  if n:
    ids, mask = pad([t for ns in negs for t in ns], ld)
    batch["neg_ids"], batch["neg_mask"] = ids.reshape(b, n, ld), mask.reshape(b, n, ld)
  return batch, (q, d, negs)


@pytest.mark.parametrize("shards,chunk,expert,exchange", [
    (1, 0, 1, "auto"), pytest.param(1, 4, 1, "auto", marks=pytest.mark.slow),
    pytest.param(8, 0, 1, "auto", marks=pytest.mark.slow), (8, 8, 1, "auto"),
    pytest.param(8, 0, 4, "padded", marks=pytest.mark.slow),
    pytest.param(8, 8, 4, "ragged", marks=pytest.mark.slow)])
def test_packed_step_equals_padded_step(shards, chunk, expert, exchange):
  """Loss, router statistics and gradients of the packed step == the padded step's; with
  `expert` > 1 the experts are split over that many devices (both token exchanges)."""
  config = _small("tiny").replace(expert_exchange=exchange)
  model = EmbeddingModel(config)
  params = {"model": nn.meta.unbox(init_params(config, jax.random.PRNGKey(0))),
            "log_temperature": jnp.asarray(np.log(0.05), jnp.float32)}
  cfg = step_lib.LossConfig(learn_temperature=True, matryoshka_dims=(64, 16),
                            matryoshka_weights=(1.0, 0.5), load_balancing_coef=1.0,
                            z_loss_coef=1e-3)
  b, n, lq, ld = 16, 1, 8, 12
  padded, (q, d, negs) = _padded_batch(config, np.random.default_rng(4), b, n, lq, ld)
  # Each chunk's units balanced, as the iterator packs them: the step is still the
  # padded one's, examples having moved only between the devices of their chunk.
  tokens = np.array([len(q[i]) + len(d[i]) + sum(map(len, negs[i])) for i in range(b)])
  order = packing.chunk_balanced_order(tokens, shards, b // chunk if chunk else 1)
  if shards > 1:
    assert (order != np.arange(b)).any()
  q, d, negs = ([x[i] for i in order] for x in (q, d, negs))
  units = shards * (b // chunk if chunk else 1)
  per = b // units
  rows = max(packing.rows_needed([len(t) for i in range(u * per, (u + 1) * per)
                                  for t in (q[i], d[i], *negs[i])], ld) for u in range(units))
  packed = packing.pack_batch(q, d, negs, units, rows, ld, config.pad_token_id)
  assert not packed["packed_capped"].any()
  if units == 1:
    assert packed["packed_ids"].size < sum(v.size for k, v in padded.items() if "ids" in k)

  mesh = partitioning.make_mesh(data=shards // expert, expert=expert,
                                devices=jax.devices()[:shards])
  rules = partitioning.DEFAULT_RULES
  sharding = partitioning.batch_sharding(mesh, rules)
  constrain = lambda t: jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, sharding), t)
  if chunk:
    fn = jax.jit(lambda p, x: step_lib.grad_cache_loss_and_grads(
        model, config, cfg, p, x, chunk, shards, constrain))
  else:
    fn = jax.jit(lambda p, x: step_lib.plain_loss_and_grads(model, config, cfg, p, x))
  results = []
  with partitioning.mesh_context(mesh), nn.logical_axis_rules(rules):
    for batch in (padded, packed):
      on_mesh = {k: jax.device_put(v, sharding) for k, v in batch.items()}
      results.append(fn(jax.device_put(params, NamedSharding(mesh, P())), on_mesh))
  (loss1, extras1, grads1), (loss2, extras2, grads2) = results
  np.testing.assert_allclose(float(loss2), float(loss1), rtol=1e-5)
  for key in ("contrastive_loss", "load_balancing_loss", "router_z_loss", "accuracy"):
    np.testing.assert_allclose(float(extras2[key]), float(extras1[key]), rtol=1e-5)
  assert_trees_close(extras2["stats"], extras1["stats"])
  assert float(extras1["stats"]["layer_1"]["num_tokens"]) == sum(
      map(len, q + d + [t for ns in negs for t in ns]))
  assert_trees_close(grads2, grads1)


def test_real_token_flops_count_each_text_over_its_own_tokens():
  from moe_embed.model import param_count
  config = model_config.preset("tiny", projection_dim=16)
  full = param_count.real_train_step_flops(config, np.full(8, 16), np.full((8, 3), 32))
  np.testing.assert_allclose(full, param_count.train_step_flops(config, 8, 16, 32, 2), rtol=1e-6)
  q, d = np.array([1, 5, 16]), np.array([[32, 0], [7, 2], [1, 9]])
  per_text = sum(param_count.forward_flops(config, n, n) for n in [*q, *d.ravel()] if n)
  logits = 2 * 3 * 3 * 2 * config.embedding_dim
  np.testing.assert_allclose(param_count.real_train_step_flops(config, q, d),
                             3 * (per_text + logits), rtol=1e-6)


def test_compile_report_mfu_on_real_tokens():
  from configs import finetune
  from moe_embed.model import param_count
  from moe_embed.train import aot
  config = finetune.get_config("tiny")
  result = {"topology": "v5p-8", "estimated_step_s": 0.01}
  full = aot.real_token_mfu(config, result, 1.0)
  encoder = model_config.preset("tiny", dtype=config.encoder.dtype)
  flops = param_count.train_step_flops(encoder, config.batch_size, config.input.max_query_len,
                                       config.input.max_doc_len, config.input.num_negatives)
  np.testing.assert_allclose(full["real_model_flops_per_step"], flops, rtol=1e-5)
  np.testing.assert_allclose(full["estimated_real_mfu"], aot.mfu(flops, 0.01, 4, 459e12),
                             rtol=1e-5)
  half = aot.real_token_mfu(config, result, 0.5)
  assert 0.25 * flops < half["real_model_flops_per_step"] < 0.5 * flops  # Attention: n^2.
  with pytest.raises(ValueError, match="real_token_share=0.0 must be in"):
    aot.real_token_mfu(config, result, 0.0)
