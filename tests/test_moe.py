"""The MoE block against a NumPy per-token, per-expert loop, forward and gradients."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

from moe_embed.model import config as model_config
from moe_embed.model.moe_mlp import MoeMlp
from moe_embed.moe import grouped_matmul


def _np_gelu(x):
  return 0.5 * x * (1.0 + special.erf(x / np.sqrt(2.0)))


def _np_moe(params, x, mask, config, capacity=None):
  """Loop reference: y_t = sum_k w_k expert_{e_k}(x_t) + bias; capacity drops in rank order."""
  b, l, d = x.shape
  kernel = params["router"]["kernel"]
  out = np.zeros_like(x, dtype=np.float64)
  dropped = 0
  for bi in range(b):
    used = np.zeros(config.num_experts, int)
    choices = {}
    for ti in range(l):
      if not mask[bi, ti]:
        continue
      logits = x[bi, ti].astype(np.float64) @ kernel
      probs = np.exp(logits - logits.max())
      probs /= probs.sum()
      top = np.argsort(-probs, kind="stable")[:config.top_k]
      w = probs[top]
      if config.renormalize_topk:  # megablocks: divide by the p-norm (p = 1: the sum).
        p = float(config.renormalize_topk)
        w = w / np.sum(np.abs(w) ** p) ** (1 / p)
      choices[ti] = (top, w)
    keep = {}
    for rank in range(config.top_k):  # First choices of every token, then second choices.
      for ti, (top, _) in choices.items():
        e = top[rank]
        ok = capacity is None or used[e] < capacity
        used[e] += ok
        dropped += not ok
        keep[(ti, rank)] = ok
    for ti, (top, w) in choices.items():
      y = np.array(params["bias"], np.float64)
      for rank, (e, we) in enumerate(zip(top, w)):
        if not keep[(ti, rank)]:
          continue
        h = x[bi, ti] @ params["w1"][e]
        if "w1_bias" in params:
          h = h + params["w1_bias"][e]
        if "w3" in params:
          h = h / (1 + np.exp(-h)) * (x[bi, ti] @ params["w3"][e])
        else:
          h = _np_gelu(h)
        y = y + we * (h @ params["w2"][e])
      out[bi, ti] = y
  return out, dropped


def _make(overrides, seed=0, b=3, l=10):
  config = model_config.preset("tiny", hidden_size=16, mlp_dim=24, num_experts=4, top_k=2,
                               router_init_std=0.5, **overrides)
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(b, l, config.hidden_size)).astype(np.float32)
  mask = np.arange(l)[None, :] < rng.integers(3, l + 1, size=(b, 1))
  module = MoeMlp(config)
  params = nn.meta.unbox(module.init(jax.random.PRNGKey(seed), jnp.asarray(x), jnp.asarray(mask)))
  params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.PRNGKey(seed + 1), p.shape),
                        params)  # Non-zero biases too.
  return config, module, params, x, mask


def _apply(module, params, x, mask):
  y, metrics = module.apply(params, jnp.asarray(x), jnp.asarray(mask))
  return np.asarray(y), metrics


@pytest.mark.parametrize("overrides", [
    dict(moe_dispatch="dropless"),
    dict(moe_dispatch="dropless", grouped_matmul="ragged_dot"),
    dict(moe_dispatch="dropless", grouped_matmul="tiled"),
    dict(moe_dispatch="dropless", renormalize_topk=True, expert_w1_bias=True),
    dict(moe_dispatch="dropless", renormalize_topk=2),
    dict(moe_dispatch="dropless", mlp_activation="swiglu"),
    dict(moe_dispatch="capacity", capacity_factor=100.0),
    dict(moe_dispatch="capacity", capacity_factor=100.0, expert_w1_bias=True),
])
def test_forward_matches_numpy_loop(overrides):
  config, module, params, x, mask = _make(overrides)
  y, metrics = _apply(module, params, x, mask)
  p = jax.tree.map(np.asarray, params["params"])
  want, _ = _np_moe(p, x, mask, config)
  np.testing.assert_allclose(y[mask], want[mask], rtol=1e-5, atol=1e-5)
  assert float(metrics["dropped_fraction"]) == 0.0


@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
def test_gradients_match_numpy_finite_differences(dispatch):
  """Gradient of a random linear functional vs central differences of the NumPy reference."""
  config, module, params, x, mask = _make(dict(moe_dispatch=dispatch, capacity_factor=100.0),
                                          seed=3, b=2, l=6)
  probe = np.random.default_rng(7).normal(size=x.shape) * mask[..., None]

  def loss(params, x):
    y, _ = module.apply(params, x, jnp.asarray(mask))
    return jnp.sum(y * probe)

  gp, gx = jax.grad(loss, argnums=(0, 1))(params, jnp.asarray(x))
  p64 = jax.tree.map(lambda a: np.asarray(a, np.float64), params["params"])
  x64 = x.astype(np.float64)

  def ref(p, xx):
    return float(np.sum(_np_moe(p, xx, mask, config)[0] * probe))

  rng = np.random.default_rng(11)
  eps = 1e-5
  # Input gradient at a few real-token coordinates.
  real = np.argwhere(mask)
  for bi, ti in real[rng.choice(len(real), 4, replace=False)]:
    di = rng.integers(config.hidden_size)
    plus, minus = x64.copy(), x64.copy()
    plus[bi, ti, di] += eps
    minus[bi, ti, di] -= eps
    fd = (ref(p64, plus) - ref(p64, minus)) / (2 * eps)
    np.testing.assert_allclose(float(gx[bi, ti, di]), fd, rtol=2e-3, atol=2e-4)
  # Every parameter tensor, a few random coordinates each.
  for name in ("w1", "w2", "bias"):
    grad = np.asarray(gp["params"][name])
    for _ in range(3):
      idx = tuple(rng.integers(s) for s in grad.shape)
      plus = jax.tree.map(np.copy, p64)
      minus = jax.tree.map(np.copy, p64)
      plus[name][idx] += eps
      minus[name][idx] -= eps
      fd = (ref(plus, x64) - ref(minus, x64)) / (2 * eps)
      np.testing.assert_allclose(grad[idx], fd, rtol=2e-3, atol=2e-4, err_msg=f"{name}{idx}")
  router_grad = np.asarray(gp["params"]["router"]["kernel"])
  idx = (1, 2)
  plus, minus = jax.tree.map(np.copy, p64), jax.tree.map(np.copy, p64)
  plus["router"]["kernel"][idx] += eps
  minus["router"]["kernel"][idx] -= eps
  fd = (ref(plus, x64) - ref(minus, x64)) / (2 * eps)
  np.testing.assert_allclose(router_grad[idx], fd, rtol=2e-3, atol=2e-4)


def test_paths_agree_with_ample_capacity_forward_and_grad():
  config, module, params, x, mask = _make(dict(moe_dispatch="dropless"), seed=5)
  cap_module = MoeMlp(config.replace(moe_dispatch="capacity", capacity_factor=100.0))

  def loss(m):
    return lambda p: jnp.sum(jnp.sin(m.apply(p, jnp.asarray(x), jnp.asarray(mask))[0]) * mask[..., None])

  np.testing.assert_allclose(float(loss(module)(params)), float(loss(cap_module)(params)), rtol=1e-5)
  g1, g2 = jax.grad(loss(module))(params), jax.grad(loss(cap_module))(params)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_dropped_fraction_when_capacity_is_short():
  config, module, params, x, mask = _make(dict(moe_dispatch="capacity", capacity_factor=0.5),
                                          seed=2, l=12)
  y, metrics = _apply(module, params, x, mask)
  capacity = math.ceil(0.5 * x.shape[1] * config.top_k / config.num_experts)
  p = jax.tree.map(np.asarray, params["params"])
  want, dropped = _np_moe(p, x, mask, config, capacity=capacity)
  assert dropped > 0
  np.testing.assert_allclose(float(metrics["dropped_fraction"]),
                             dropped / (mask.sum() * config.top_k), rtol=1e-6)
  np.testing.assert_allclose(y[mask], want[mask], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel", grouped_matmul.KERNELS)
def test_grouped_matmul_kernels_match_per_group_reference(kernel):
  rng = np.random.default_rng(0)
  sizes = np.array([5, 0, 17, 1, 0, 9], np.int32)  # Includes empty groups.
  m, d, f = int(sizes.sum()), 8, 6
  rhs = rng.normal(size=(len(sizes), d, f)).astype(np.float32)
  rows = rng.normal(size=(m, d)).astype(np.float32)
  tile = 1 if kernel == "ragged_dot" else 4
  window = 8 if kernel == "windowed" else 0  # Groups of 17 rows overflow an 8-row window.
  layout = grouped_matmul.make_layout(jnp.asarray(sizes), m, tile, window)
  expert_ids = np.repeat(np.arange(len(sizes)), sizes)
  pos = grouped_matmul.row_positions(jnp.asarray(expert_ids), jnp.ones(m, bool), layout, len(sizes))
  probe = rng.normal(size=(m, f)).astype(np.float32)

  def run(rows, rhs):
    buf = jnp.zeros((layout.num_rows, d)).at[pos].set(rows)
    return grouped_matmul.gmm(buf, rhs, layout, kernel)[pos]

  out = np.asarray(run(jnp.asarray(rows), jnp.asarray(rhs)))
  want = np.einsum("md,mdf->mf", rows, rhs[expert_ids])
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
  g_rows, g_rhs = jax.grad(lambda a, b: jnp.sum(run(a, b) * probe), argnums=(0, 1))(
      jnp.asarray(rows), jnp.asarray(rhs))
  np.testing.assert_allclose(np.asarray(g_rows), np.einsum("mf,mdf->md", probe, rhs[expert_ids]),
                             rtol=1e-5, atol=1e-5)
  want_rhs = np.zeros_like(rhs)
  np.add.at(want_rhs, expert_ids, rows[:, :, None] * probe[:, None, :])
  np.testing.assert_allclose(np.asarray(g_rhs), want_rhs, rtol=1e-5, atol=1e-5)


def test_ragged_dot_in_row_blocks_equals_one_call_and_its_gradient():
  """Blocks of 5 rows cut through groups; rows past the last group stay 0."""
  from moe_embed.moe import grouped_matmul as gm
  rng = np.random.default_rng(0)
  lhs = jnp.asarray(rng.normal(size=(23, 6)), jnp.float32)
  rhs = jnp.asarray(rng.normal(size=(4, 6, 3)), jnp.float32)
  sizes = jnp.asarray([7, 0, 9, 4], jnp.int32)  # 20 of 23 rows.
  one = lambda a, b: jax.lax.ragged_dot(a, b, sizes)
  blocked = lambda a, b: gm.ragged_dot_blocked(a, b, sizes, max_rows=5)
  np.testing.assert_allclose(blocked(lhs, rhs), one(lhs, rhs), rtol=1e-6, atol=1e-6)
  assert not np.any(np.asarray(blocked(lhs, rhs))[20:])
  g = jnp.asarray(rng.normal(size=(23, 3)), jnp.float32)
  grads = lambda f: jax.grad(lambda a, b: jnp.vdot(f(a, b), g), argnums=(0, 1))(lhs, rhs)
  for x, y in zip(grads(blocked), grads(one)):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)
