"""Attention kernels: TPU splash attention (Pallas' interpreter on CPU) equals XLA's
masked attention at real tokens, on padded rows and on packed rows with texts of one
token and of the whole row; values and gradients, float32."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_embed import partitioning
from moe_embed.model import attention
from moe_embed.model.encoder import Encoder
from tests.step_inputs import tiny_setup


def _rows(kind: str, b: int = 4, length: int = 200):
  """(mask bool [B, L], segment_ids int [B, L] or None) of padded or packed rows."""
  rng = np.random.default_rng(1)
  if kind == "padded":
    lengths = np.array([1, length, 37, 150][:b] + list(rng.integers(1, length, b - 4)))
    return np.arange(length)[None] < lengths[:, None], None
  segments = np.zeros((b, length), np.int32)
  segments[0, :length] = 1  # One text fills the row.
  segments[1, 0], segments[1, 1:60], segments[1, 60] = 1, 2, 3  # One-token texts around one.
  for row in range(2, b):  # Random texts, some padding at the end.
    end, segment = 0, 1
    while end < length - 20:
      n = int(rng.integers(1, 40))
      segments[row, end:end + n], end, segment = segment, end + n, segment + 1
  return segments > 0, segments


@pytest.mark.parametrize("kind", ["padded", "packed"])
def test_splash_attention_equals_xla_attention_at_real_tokens(kind):
  mask, segments = _rows(kind)
  b, length = mask.shape
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=(b, length, 2, 32)), jnp.float32) for _ in range(3))
  real = jnp.asarray(mask)[..., None, None]
  seg = None if segments is None else jnp.asarray(segments)

  def loss(fn, q, k, v):  # A weighted sum over real tokens only.
    out = fn(q, k, v, jnp.asarray(mask), seg)
    return jnp.sum(jnp.where(real, out, 0.0) * jnp.cos(jnp.arange(out.size).reshape(out.shape)))

  splash = lambda *a: attention.splash_attention(*a, interpret=True)
  want = attention.xla_attention(q, k, v, jnp.asarray(mask), seg)
  got = splash(q, k, v, jnp.asarray(mask), seg)
  np.testing.assert_allclose(np.asarray(got)[mask], np.asarray(want)[mask], rtol=1e-5, atol=1e-5)
  grads_want = jax.grad(lambda *a: loss(attention.xla_attention, *a), argnums=(0, 1, 2))(q, k, v)
  grads_got = jax.grad(lambda *a: loss(splash, *a), argnums=(0, 1, 2))(q, k, v)
  for g, w in zip(grads_got, grads_want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5)


def test_splash_attention_under_a_mesh_runs_each_devices_rows():
  mask, segments = _rows("packed", b=8, length=128)
  rng = np.random.default_rng(2)
  q, k, v = (jnp.asarray(rng.normal(size=(8, 128, 2, 16)), jnp.float32) for _ in range(3))
  want = attention.splash_attention(q, k, v, jnp.asarray(mask), jnp.asarray(segments),
                                    interpret=True)
  mesh = partitioning.make_mesh(data=8, expert=1)
  fn = jax.jit(lambda *a: attention.splash_attention(*a, mesh=mesh, batch_axes=("data",),
                                                     interpret=True))
  got = fn(q, k, v, jnp.asarray(mask), jnp.asarray(segments))
  text = fn.lower(q, k, v, jnp.asarray(mask), jnp.asarray(segments)).as_text()
  assert "sdy.manual_computation" in text or "shard_map" in text  # One device's rows each.
  np.testing.assert_allclose(np.asarray(got)[mask], np.asarray(want)[mask], rtol=1e-6, atol=1e-6)


def test_encoder_with_splash_attention_embeds_packed_rows_as_xla_does():
  config, _, params, _ = tiny_setup()
  mask, segments = _rows("packed", b=2, length=64)
  ids = np.where(mask, np.random.default_rng(3).integers(4, config.vocab_size, mask.shape),
                 config.pad_token_id).astype(np.int32)
  positions = np.zeros_like(segments)
  for row in range(len(segments)):
    for s in np.unique(segments[row][segments[row] > 0]):
      where = np.flatnonzero(segments[row] == s)
      positions[row, where] = np.arange(len(where))
  outputs = {}
  for kernel in ("xla", "splash"):
    encoder = Encoder(config.replace(attention=kernel))
    hidden, _ = encoder.apply({"params": params["model"]["encoder"]}, ids, mask,
                              segment_ids=segments, positions=positions)
    outputs[kernel] = np.asarray(hidden)
  np.testing.assert_allclose(outputs["splash"][mask], outputs["xla"][mask], rtol=1e-5, atol=1e-5)


def test_auto_is_splash_on_tpu_only_and_names_are_checked():
  assert attention.kernel_for_platform("auto", "tpu") == "splash"
  assert attention.kernel_for_platform("auto", "gpu") == "xla"
  assert attention.kernel_for_platform("auto", "cpu") == "xla"
  assert attention.kernel_for_platform("xla", "tpu") == "xla"
  with pytest.raises(ValueError, match="attention='flash' is not one of"):
    attention.kernel_for_platform("flash", "tpu")
  config, _, _, _ = tiny_setup()
  with pytest.raises(ValueError, match="attention='splsh' is not one of"):
    config.replace(attention="splsh")
