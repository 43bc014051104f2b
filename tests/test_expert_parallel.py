"""Expert parallelism: sharded experts and all_to_all token exchange equal one device."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import finetune
from moe_embed import partitioning
from moe_embed.model import config as model_config
from moe_embed.model.encoder import EmbeddingModel, init_params
from moe_embed.train import optimizer as optimizer_lib
from moe_embed.train import state as state_lib
from moe_embed.train import step as step_lib
from tests.test_train_step import _assert_trees_close, _batch, _plain, _setup


@pytest.mark.parametrize("expert", [4, 8])
def test_expert_parallel_loss_and_grads_equal_single_device(expert):
  config, model, params, cfg = _setup(learn_temperature=True, load_balancing_coef=1.0,
                                      z_loss_coef=1e-3)
  batch = _batch(config, n=2, seed=5)
  loss1, extras1, grads1 = _plain(model, config, cfg, params, batch)
  emb1, _ = jax.jit(lambda p: model.apply({"params": p["model"]}, batch["query_ids"],
                                          batch["query_mask"]))(params)

  mesh = partitioning.make_mesh(data=-1, expert=expert)
  rules = partitioning.DEFAULT_RULES
  with partitioning.mesh_context(mesh), nn.logical_axis_rules(rules):
    boxed = jax.eval_shape(lambda: {"model": init_params(
        config, jax.random.PRNGKey(0)), "log_temperature": jnp.zeros(())})
    shardings = partitioning.logical_shardings(boxed, mesh, rules)
    sharded = jax.device_put(params, shardings)
    data = {k: jax.device_put(v, partitioning.batch_sharding(mesh, rules)) for k, v in batch.items()}
    fn = jax.jit(lambda p, b: step_lib.plain_loss_and_grads(model, config, cfg, p, b))
    loss2, extras2, grads2 = fn(sharded, data)
    hlo = fn.lower(sharded, data).compile().as_text()
    emb2, _ = jax.jit(lambda p: model.apply({"params": p["model"]}, data["query_ids"],
                                            data["query_mask"]))(sharded)
  assert "all-to-all" in hlo
  w1 = sharded["model"]["encoder"]["layer_1"]["mlp"]["w1"]
  assert w1.addressable_shards[0].data.shape[0] == config.num_experts // expert
  np.testing.assert_allclose(np.asarray(emb2), np.asarray(emb1), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(float(loss2), float(loss1), rtol=1e-5)
  np.testing.assert_allclose(float(extras2["load_balancing_loss"]),
                             float(extras1["load_balancing_loss"]), rtol=1e-5)
  _assert_trees_close(grads2["model"], grads1["model"])
  # d loss / d log(temperature) sums B * (B + B*N) logits: float32 summation order shows.
  np.testing.assert_allclose(float(grads2["log_temperature"]), float(grads1["log_temperature"]),
                             rtol=1e-4)


def test_train_state_holds_one_expert_shard_per_device():
  """--config.mesh.expert=4 on 8 devices: data=2 x expert=4, params and moments sharded."""
  c = finetune.get_config("tiny")
  mesh = partitioning.make_mesh(c.mesh.data, 4)
  assert dict(mesh.shape) == {"data": 2, "expert": 4}
  config = model_config.EncoderConfig.from_dict(dict(c.encoder))
  optimizer, _ = optimizer_lib.make_optimizer(
      optimizer_lib.OptimizerConfig(learning_rate=1e-3, warmup_steps=1), total_steps=10)
  state, _, _ = state_lib.create_state(EmbeddingModel(config), optimizer, mesh,
                                     partitioning.DEFAULT_RULES, seed=0)
  expert_leaves = [
      state.params["model"]["encoder"]["layer_1"]["mlp"]["w1"],
      state.params["model"]["encoder"]["layer_3"]["mlp"]["w2"],
      state.opt_state[1][0].mu["model"]["encoder"]["layer_1"]["mlp"]["w1"],
  ]
  for leaf in expert_leaves:
    assert len(leaf.sharding.device_set) == 8
    for shard in leaf.addressable_shards:
      assert shard.data.shape[0] == config.num_experts // 4
  dense = state.params["model"]["encoder"]["layer_0"]["mlp"]["fc1"]["kernel"]
  assert dense.addressable_shards[0].data.shape == dense.shape  # Replicated.


@pytest.mark.parametrize("rules,exchanges", [
    # Experts replicated: every device runs all experts locally, no token exchange.
    ((("batch", ("data", "expert")), ("exp", None)), False),
    # Tokens split over 'data' only (replicated along 'expert'): still exact.
    ((("batch", "data"), ("exp", "expert")), True),
])
def test_expert_parallelism_follows_the_logical_axis_rules(rules, exchanges):
  config, model, params, _ = _setup()
  batch = _batch(config, n=0, seed=9)
  want, _ = jax.jit(lambda p: model.apply({"params": p["model"]}, batch["query_ids"],
                                          batch["query_mask"]))(params)
  mesh = partitioning.make_mesh(data=2, expert=4)
  with partitioning.activate(mesh, rules):
    boxed = jax.eval_shape(lambda: {"model": init_params(config, jax.random.PRNGKey(0)),
                                    "log_temperature": jnp.zeros(())})
    sharded = jax.device_put(params, partitioning.logical_shardings(boxed, mesh, rules))
    rows = partitioning.batch_sharding(mesh, rules)
    ids, mask = jax.device_put(batch["query_ids"], rows), jax.device_put(batch["query_mask"], rows)
    fn = jax.jit(lambda p, i, m: model.apply({"params": p["model"]}, i, m)[0])
    got = fn(sharded, ids, mask)
    hlo = fn.lower(sharded, ids, mask).compile().as_text()
  assert ("all-to-all" in hlo) == exchanges
  w1 = sharded["model"]["encoder"]["layer_1"]["mlp"]["w1"]
  assert w1.addressable_shards[0].data.shape[0] == config.num_experts // (4 if exchanges else 1)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
