"""Router losses and statistics against their definitions."""

import jax
import jax.numpy as jnp
import numpy as np
from scipy import special

from moe_embed.moe import router_stats, routing


def _routing_from(probs, experts, valid):
  logits = np.log(probs)
  weights = np.take_along_axis(probs, experts, axis=1) * valid[:, None]
  return routing.Routing(jnp.asarray(experts, jnp.int32), jnp.asarray(weights, jnp.float32),
                         jnp.asarray(probs, jnp.float32), jnp.asarray(logits, jnp.float32),
                         jnp.asarray(valid))


def test_load_balancing_loss_on_hand_made_routing():
  # 4 real tokens, 4 experts, top-1; expert 0 takes 3 tokens, expert 2 takes 1.
  probs = np.array([[0.7, 0.1, 0.1, 0.1], [0.4, 0.2, 0.2, 0.2], [0.1, 0.1, 0.7, 0.1],
                    [0.5, 0.3, 0.1, 0.1], [0.05, 0.05, 0.05, 0.85]])
  experts = np.array([[0], [0], [2], [0], [3]])
  valid = np.array([True, True, True, True, False])  # The last token is padding.
  stats = router_stats.statistics(_routing_from(probs, experts, valid))
  f = np.array([3, 0, 1, 0]) / 4
  p = probs[:4].mean(axis=0)
  want = 4 * np.sum(f * p)
  np.testing.assert_allclose(float(router_stats.load_balancing_loss(stats, 1)), want, rtol=1e-6)
  lb, z = router_stats.router_losses({"layer_1": stats}, top_k=1)
  np.testing.assert_allclose(float(lb), want, rtol=1e-6)
  np.testing.assert_allclose(float(z), np.mean(special.logsumexp(np.log(probs[:4]), axis=1) ** 2),
                             rtol=1e-5, atol=1e-7)


def test_load_balancing_loss_is_one_for_uniform_routing():
  e, k = 8, 2
  probs = np.full((16, e), 1 / e)
  experts = np.array([[(2 * t) % e, (2 * t + 1) % e] for t in range(16)])
  stats = router_stats.statistics(_routing_from(probs, experts, np.ones(16, bool)))
  assert float(router_stats.load_balancing_loss(stats, k)) == 1.0


def test_route_topk_entropy_and_padding():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(6, 5)).astype(np.float32)
  kernel = rng.normal(size=(5, 4)).astype(np.float32)
  valid = np.array([1, 1, 0, 1, 1, 0], bool)
  r = routing.route(jnp.asarray(x), jnp.asarray(kernel), jnp.asarray(valid), 2, False)
  logits = x.astype(np.float64) @ kernel
  probs = special.softmax(logits, axis=-1)
  top = np.argsort(-probs, axis=-1)[:, :2]
  np.testing.assert_array_equal(np.asarray(r.experts), top)
  np.testing.assert_allclose(np.asarray(r.weights),
                             np.take_along_axis(probs, top, 1) * valid[:, None], rtol=1e-5)
  stats = router_stats.statistics(r)
  entropy = -np.sum(probs * np.log(probs), axis=-1)
  np.testing.assert_allclose(float(stats["entropy_sum"]), entropy[valid].sum(), rtol=1e-5)
  np.testing.assert_allclose(float(stats["z_sum"]),
                             np.sum(special.logsumexp(logits, axis=-1)[valid] ** 2), rtol=1e-5)
  assert float(stats["num_tokens"]) == 4
  assert float(np.asarray(stats["expert_counts"]).sum()) == 8
  r2 = routing.route(jnp.asarray(x), jnp.asarray(kernel), jnp.asarray(valid), 2, True)
  np.testing.assert_allclose(np.asarray(r2.weights).sum(-1), valid.astype(float), rtol=1e-6)


def test_topk_weights_and_their_gradient_equal_top_k_values_exactly():
  """The one-hot read of the top-k weights (no scatter in the backward) changes no bit
  of the weights and matches the gradient through jax.lax.top_k's own values."""
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(64, 16)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(16, 8)), jnp.float32)
  valid = jnp.asarray(rng.random(64) > 0.2)
  cotangent = jnp.asarray(rng.normal(size=(64, 2)), jnp.float32)

  def ours(x):
    return jnp.sum(routing.route(x, kernel, valid, 2, False).weights * cotangent)

  def through_top_k(x):
    probs = jax.nn.softmax(jnp.dot(x, kernel, precision=jax.lax.Precision.HIGHEST), axis=-1)
    return jnp.sum(jax.lax.top_k(probs, 2)[0] * valid[:, None] * cotangent)

  r = routing.route(x, kernel, valid, 2, False)
  np.testing.assert_array_equal(np.asarray(r.weights),
                                np.asarray(jax.lax.top_k(r.probs, 2)[0] * valid[:, None]))
  np.testing.assert_allclose(np.asarray(jax.grad(ours)(x)), np.asarray(jax.grad(through_top_k)(x)),
                             rtol=1e-6, atol=1e-7)


def test_chunk_shares_add_up_to_the_full_loss():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(10, 5)).astype(np.float32)
  kernel = rng.normal(size=(5, 4)).astype(np.float32)
  valid = np.ones(10, bool)
  full = router_stats.statistics(routing.route(jnp.asarray(x), jnp.asarray(kernel), jnp.asarray(valid), 2, False))
  parts = [router_stats.statistics(routing.route(jnp.asarray(x[s]), jnp.asarray(kernel),
                                            jnp.asarray(valid[s]), 2, False))
           for s in (slice(0, 3), slice(3, 10))]
  total = router_stats.add_stats([{"l": p} for p in parts])
  shares = [router_stats.router_losses({"l": p}, total, 2)[0] for p in parts]
  np.testing.assert_allclose(float(sum(shares)), float(router_stats.load_balancing_loss(full, 2)),
                             rtol=1e-6)
