"""Train step: sharded vs single-device loss and gradients, GradCache vs plain step."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from moe_embed import partitioning
from moe_embed.train import optimizer as optimizer_lib
from moe_embed.train import step as step_lib
from tests.step_inputs import plain_step, random_batch, tiny_setup
from tests.tree_asserts import assert_trees_close


def test_sharded_loss_and_grads_equal_single_device_with_hard_negatives():
  config, model, params, cfg = tiny_setup(learn_temperature=True, load_balancing_coef=1.0,
                                          z_loss_coef=1e-3)
  batch = random_batch(config, n=2)
  loss1, extras1, grads1 = plain_step(model, config, cfg, params, batch)

  mesh = partitioning.make_mesh(data=8, expert=1)
  rules = partitioning.DEFAULT_RULES
  batch_sharding = partitioning.batch_sharding(mesh, rules)
  sharded_batch = {k: jax.device_put(v, batch_sharding) for k, v in batch.items()}
  sharded_params = jax.device_put(params, NamedSharding(mesh, P()))
  with partitioning.mesh_context(mesh), nn.logical_axis_rules(rules):
    loss8, extras8, grads8 = plain_step(model, config, cfg, sharded_params, sharded_batch)
  assert len(sharded_batch["query_ids"].sharding.device_set) == 8
  np.testing.assert_allclose(float(loss8), float(loss1), rtol=1e-5)
  np.testing.assert_allclose(float(extras8["load_balancing_loss"]),
                             float(extras1["load_balancing_loss"]), rtol=1e-5)
  assert_trees_close(grads8, grads1)


@pytest.mark.parametrize("shards,chunk", [(1, 4), (8, 8)])
def test_grad_cache_gradients_equal_plain_step(shards, chunk):
  """GradCache with Matryoshka, router losses and a learned temperature == plain step."""
  config, model, params, cfg = tiny_setup(
      learn_temperature=True, symmetric=True, matryoshka_dims=(64, 16),
      matryoshka_weights=(1.0, 0.5), load_balancing_coef=1.0, z_loss_coef=1e-3)
  batch = random_batch(config, n=2, seed=3)
  loss1, extras1, grads1 = plain_step(model, config, cfg, params, batch)
  mesh = partitioning.make_mesh(data=shards, expert=1, devices=jax.devices()[:shards])
  rules = partitioning.DEFAULT_RULES
  sharding = partitioning.batch_sharding(mesh, rules)
  constrain = step_lib.batch_constraint(sharding)
  fn = jax.jit(lambda p, b: step_lib.grad_cache_loss_and_grads(
      model, config, cfg, p, b, chunk, shards, constrain))
  with partitioning.mesh_context(mesh), nn.logical_axis_rules(rules):
    batch_dev = {k: jax.device_put(v, sharding) for k, v in batch.items()}
    loss2, extras2, grads2 = fn(jax.device_put(params, NamedSharding(mesh, P())), batch_dev)
  np.testing.assert_allclose(float(loss2), float(loss1), rtol=1e-5)
  for key in ("contrastive_loss", "load_balancing_loss", "router_z_loss"):
    np.testing.assert_allclose(float(extras2[key]), float(extras1[key]), rtol=1e-5)
  assert float(extras1["load_balancing_loss"]) > 0.5  # The router losses are really present.
  assert np.any(np.asarray(grads1["model"]["encoder"]["layer_1"]["mlp"]["router"]["kernel"]))
  assert_trees_close(grads2["model"], grads1["model"])
  # d loss / d log(temperature) sums B * (B + B*N) logits over 2 Matryoshka widths and both
  # directions: float32 summation order shows (jax 0.12 on 8 devices: 1.45e-5 relative).
  np.testing.assert_allclose(float(grads2["log_temperature"]), float(grads1["log_temperature"]),
                             rtol=1e-4)


def test_split_chunks_takes_every_shard():
  x = np.arange(16)
  chunks = np.asarray(step_lib.split_chunks(jnp.asarray(x), num_chunks=2, shards=4))
  # 4 shards of 4 rows; chunk 0 takes the first 2 rows of each shard.
  np.testing.assert_array_equal(chunks[0], [0, 1, 4, 5, 8, 9, 12, 13])
  np.testing.assert_array_equal(np.sort(chunks.ravel()), x)


def test_optimizer_decays_matrices_only_and_warms_up():
  tx, schedule = optimizer_lib.make_optimizer(
      optimizer_lib.OptimizerConfig(learning_rate=1e-3, warmup_steps=10, weight_decay=0.5),
      total_steps=100)
  assert float(schedule(0)) == 0.0
  np.testing.assert_allclose(float(schedule(10)), 1e-3, rtol=1e-6)
  np.testing.assert_allclose(float(schedule(55)), 0.5e-3, rtol=1e-6)
  params = {"w": jnp.ones((2, 2)), "b": jnp.ones((2,))}
  zero = jax.tree.map(jnp.zeros_like, params)
  state = tx.init(params)
  for _ in range(11):
    updates, state = tx.update(zero, state, params)
  assert np.all(np.asarray(updates["w"]) < 0) and np.all(np.asarray(updates["b"]) == 0)

