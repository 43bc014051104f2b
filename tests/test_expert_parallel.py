"""Expert parallelism: sharded experts and all_to_all token exchange equal one device.

Both token exchanges are checked: 'padded' (worst-case all_to_all buffers) and
'ragged' (exact-size slices). XLA:CPU has no ragged_all_to_all, so the ragged
exchange runs here on `ragged_all_to_all_reference`, which is itself checked
against a NumPy loop over the collective's documented semantics; the native
collective is checked to lower, forward and backward.
"""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import finetune
from moe_embed import partitioning
from moe_embed.model import config as model_config
from moe_embed.model.encoder import EmbeddingModel, init_params
from moe_embed.moe import expert_parallel, experts, routing
from moe_embed.train import optimizer as optimizer_lib
from moe_embed.train import state as state_lib
from moe_embed.train import step as step_lib
from tests.hlo_ops import compiled_ops, lowered_ops
from tests.step_inputs import plain_step, random_batch, tiny_setup
from tests.tree_asserts import assert_trees_close


# EP=4 with the padded exchange adds little to EP=8 padded and EP=4 ragged: slow.
@pytest.mark.parametrize("expert,exchange", [
    pytest.param(4, "padded", marks=pytest.mark.slow), (8, "padded"), (4, "ragged")])
def test_expert_parallel_loss_and_grads_equal_single_device(expert, exchange):
  config, model, params, cfg = tiny_setup(learn_temperature=True, load_balancing_coef=1.0,
                                          z_loss_coef=1e-3)
  config = config.replace(expert_exchange=exchange)
  model = EmbeddingModel(config)
  batch = random_batch(config, n=2, seed=5)
  loss1, extras1, grads1 = plain_step(model, config, cfg, params, batch)
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
    ops = compiled_ops(fn.lower(sharded, data).compile())
    emb2, _ = jax.jit(lambda p: model.apply({"params": p["model"]}, data["query_ids"],
                                            data["query_mask"]))(sharded)
  assert ops["all-to-all"] > 0
  w1 = sharded["model"]["encoder"]["layer_1"]["mlp"]["w1"]
  assert w1.addressable_shards[0].data.shape[0] == config.num_experts // expert
  np.testing.assert_allclose(np.asarray(emb2), np.asarray(emb1), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(float(loss2), float(loss1), rtol=1e-5)
  np.testing.assert_allclose(float(extras2["load_balancing_loss"]),
                             float(extras1["load_balancing_loss"]), rtol=1e-5)
  assert_trees_close(grads2["model"], grads1["model"])
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
  adam_mu = optax.tree_utils.tree_get(state.opt_state, "mu")  # AdamW's first moment.
  expert_leaves = [
      state.params["model"]["encoder"]["layer_1"]["mlp"]["w1"],
      state.params["model"]["encoder"]["layer_3"]["mlp"]["w2"],
      adam_mu["model"]["encoder"]["layer_1"]["mlp"]["w1"],
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
  config, model, params, _ = tiny_setup()
  batch = random_batch(config, n=0, seed=9)
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
    ops = compiled_ops(fn.lower(sharded, ids, mask).compile())
  assert (ops["all-to-all"] > 0) == exchanges
  w1 = sharded["model"]["encoder"]["layer_1"]["mlp"]["w1"]
  assert w1.addressable_shards[0].data.shape[0] == config.num_experts // (4 if exchanges else 1)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


def _ragged_all_to_all_numpy(per_device):
  """The documented semantics of ragged_all_to_all, one device after another.

  per_device: a list over devices of (operand, output, input_offsets, send_sizes,
  output_offsets, recv_sizes) NumPy arrays -> the list of results.
  """
  results = [np.array(args[1]) for args in per_device]
  for src, (operand, _, input_offsets, send_sizes, output_offsets, _) in enumerate(per_device):
    for dst in range(len(per_device)):
      size = send_sizes[dst]
      piece = operand[input_offsets[dst]:input_offsets[dst] + size]
      results[dst][output_offsets[dst]:output_offsets[dst] + size] = piece
  return results


def _run_reference(per_device, mesh_axis="expert"):
  """ragged_all_to_all_reference under shard_map on len(per_device) devices."""
  n = len(per_device)
  mesh = jax.make_mesh((n,), (mesh_axis,), devices=jax.devices()[:n],
                       axis_types=(jax.sharding.AxisType.Explicit,))
  stacked = [np.concatenate([np.asarray(d[i]) for d in per_device]) for i in range(6)]
  spec = jax.sharding.PartitionSpec(mesh_axis)

  def local(*args):
    return expert_parallel.ragged_all_to_all_reference(*args, axis_name=mesh_axis)

  fn = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(spec,) * 6, out_specs=spec))
  with jax.set_mesh(mesh):
    args = [jax.device_put(a, jax.NamedSharding(mesh, spec)) for a in stacked]
    out = np.asarray(fn(*args))
    # d sum(out * c) / d operand: each sent row gets the c of the row it lands on.
    c = np.random.default_rng(1).normal(size=out.shape).astype(np.float32)
    grads = jax.grad(lambda op, o: jnp.sum(fn(op, o, *args[2:]) * c), argnums=(0, 1))(*args[:2])
  return np.split(out, n), [np.split(np.asarray(g), n) for g in grads], np.split(c, n)


def test_ragged_all_to_all_reference_matches_the_documented_example():
  """The two-device example of jax.lax.ragged_all_to_all's docstring."""
  i32 = lambda *v: np.asarray(v, np.int32)
  f32 = lambda *v: np.asarray(v, np.float32)
  per_device = [
      (f32(1, 2, 2), f32(0, 0, 0, 0), i32(0, 1), i32(1, 2), i32(0, 0), i32(1, 1)),
      (f32(3, 4, 0), f32(0, 0, 0, 0), i32(0, 1), i32(1, 1), i32(1, 2), i32(2, 1)),
  ]
  got, _, _ = _run_reference(per_device)
  np.testing.assert_array_equal(got[0], [1, 3, 0, 0])
  np.testing.assert_array_equal(got[1], [2, 2, 4, 0])


def test_ragged_all_to_all_reference_matches_numpy_and_its_gradient():
  """Random ragged slices on 4 devices, output rows pre-filled; values and gradients."""
  n, rows, width, capacity = 4, 6, 3, 20
  rng = np.random.default_rng(0)
  sizes = rng.integers(0, 3, size=(n, n)).astype(np.int32)  # sizes[src, dst]
  sizes[0, 1] = 0  # An empty slice.
  per_device = []
  for src in range(n):
    gaps = rng.integers(0, 2, size=n)  # Padding between slices in the operand.
    input_offsets = np.cumsum(gaps + sizes[src]) - sizes[src]
    # On each destination, sources land in order after a gap of 1 row.
    output_offsets = np.asarray([1 + sizes[:src, dst].sum() + src for dst in range(n)])
    recv_sizes = sizes[:, src]
    per_device.append((rng.normal(size=(rows + 2 * n, width)).astype(np.float32),
                       np.full((capacity, width), -7, np.float32),
                       input_offsets.astype(np.int32), sizes[src].copy(),
                       output_offsets.astype(np.int32), recv_sizes.astype(np.int32)))
  got, (d_operand, d_output), c = _run_reference(per_device)
  want = _ragged_all_to_all_numpy(per_device)
  for dev in range(n):
    np.testing.assert_array_equal(got[dev], want[dev])
  # Gradients from the same semantics: rows written are overwritten in `output`,
  # and each sent operand row receives the cotangent of the row it was written to.
  for src in range(n):
    operand, output, input_offsets, send_sizes, output_offsets, _ = per_device[src]
    want_d_operand = np.zeros_like(operand)
    for dst in range(n):
      for r in range(send_sizes[dst]):
        want_d_operand[input_offsets[dst] + r] = c[dst][output_offsets[dst] + r]
    np.testing.assert_allclose(d_operand[src], want_d_operand, rtol=1e-6)
    written = want[src] != output
    np.testing.assert_allclose(d_output[src], np.where(written, 0, c[src]), rtol=1e-6)


def _routing_problem(skewed: bool, seed: int = 0, t=48, d=8, f=16, e=8, k=2):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(t, d)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(d, e)), jnp.float32)
  valid = jnp.asarray(rng.random(t) > 0.25)
  route = routing.route(x, kernel, valid, k, False)
  if skewed:  # Every assignment to the first two experts: the worst case for one device.
    choice = np.tile(np.arange(k, dtype=np.int32), (t, 1))
    route = routing.Routing(jnp.asarray(choice), route.weights, route.probs, route.logits,
                            route.valid)
  weights = [jnp.asarray(rng.normal(size=s) * 0.2, jnp.float32)
             for s in [(e, d, f), (e, f, d), (e, d, f), (e, f)]]
  return x, route, weights


@pytest.mark.parametrize("expert", [2, 8])
@pytest.mark.parametrize("skewed", [False, True])
def test_ragged_exchange_equals_padded_and_one_device(expert, skewed):
  """SwiGLU experts with a w1 bias, padding tokens; forward and gradients."""
  x, route, (w1, w2, w3, bias) = _routing_problem(skewed)

  def loss(fn):
    return lambda x, w1, w2, w3, bias: jnp.sum(jnp.sin(fn(x, w1, w2, w3, bias)))

  local = lambda x, w1, w2, w3, bias: experts.dropless_experts(x, route, w1, w2, w3, bias)
  want = local(x, w1, w2, w3, bias)
  want_grads = jax.grad(loss(local), argnums=range(5))(x, w1, w2, w3, bias)
  mesh = partitioning.make_mesh(data=-1, expert=expert)
  where = expert_parallel.Placement(mesh, ("expert",), ("data", "expert"))
  with partitioning.mesh_context(mesh):
    for exchange in expert_parallel.EXCHANGES:
      sharded = lambda x, w1, w2, w3, bias: expert_parallel.dropless(
          x, route, w1, w2, w3, bias, where=where, exchange=exchange)
      got = jax.jit(sharded)(x, w1, w2, w3, bias)
      grads = jax.jit(jax.grad(loss(sharded), argnums=range(5)))(x, w1, w2, w3, bias)
      np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6,
                                 err_msg=exchange)
      for g, w in zip(grads, want_grads):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-6,
                                   err_msg=exchange)


def test_native_ragged_all_to_all_lowers_forward_and_backward():
  """What a GPU or TPU runs: the exchange through jax.lax.ragged_all_to_all itself."""
  x, route, (w1, w2, _, _) = _routing_problem(False)
  mesh = partitioning.make_mesh(data=-1, expert=4)
  where = expert_parallel.Placement(mesh, ("expert",), ("data", "expert"))
  fn = lambda x, w1, w2: jnp.sum(expert_parallel.dropless(
      x, route, w1, w2, where=where, exchange="ragged", native_ragged=True) ** 2)
  with partitioning.mesh_context(mesh):
    forward = lowered_ops(jax.jit(fn).lower(x, w1, w2))
    backward = lowered_ops(jax.jit(jax.grad(fn, argnums=(0, 1, 2))).lower(x, w1, w2))
  # Two exchanges forward (there and back), and their two transposes backward.
  assert forward["stablehlo.custom_call @ragged_all_to_all"] == 2
  assert backward["stablehlo.custom_call @ragged_all_to_all"] == 4


def test_exchange_choice_by_backend_and_bad_names():
  assert expert_parallel.exchange_for_backend("auto", "cpu") == "padded"
  assert expert_parallel.exchange_for_backend("auto", "gpu") == "ragged"
  assert expert_parallel.exchange_for_backend("auto", "tpu") == "ragged"
  assert expert_parallel.exchange_for_backend("padded", "tpu") == "padded"
  with pytest.raises(ValueError, match="expert_exchange='raged'"):
    expert_parallel.exchange_for_backend("raged")
  with pytest.raises(ValueError, match="expert_exchange='raged' is not one of"):
    model_config.preset("tiny", expert_exchange="raged")


def test_platform_comes_from_the_mesh_devices_not_the_host():
  cpu_mesh = partitioning.make_mesh(-1, 1)
  assert expert_parallel.mesh_platform(cpu_mesh) == "cpu"
  seen = []
  with partitioning.mesh_context(cpu_mesh):
    jax.jit(lambda x: seen.append(expert_parallel.mesh_platform()) or x).lower(
        jnp.ones(8)).compile()
  assert seen == ["cpu"]
  pytest.importorskip("libtpu")
  from jax.experimental import topologies
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # Beside other jax processes.
  tpu = topologies.get_topology_desc("v5p:2x2x1", "tpu").devices
  tpu_mesh = partitioning.make_mesh(1, 4, devices=tpu)
  assert jax.default_backend() == "cpu"
  assert expert_parallel.mesh_platform(tpu_mesh) == "tpu"
  assert expert_parallel.mesh_platform(tpu_mesh.abstract_mesh) == "tpu"
  with partitioning.mesh_context(tpu_mesh):
    assert expert_parallel.exchange_for_backend("auto") == "ragged"
