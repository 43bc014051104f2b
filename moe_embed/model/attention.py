"""Attention kernels of the encoder: XLA's masked attention, and TPU splash attention.

q, k, v are [B, L, H, Dh]; `mask` bool [B, L] marks real tokens; packed rows add
`segment_ids` int [B, L] (a query sees the keys of its own text only). Every
kernel gives the same outputs at real tokens; outputs at padding are unspecified.

- 'xla': `jax.nn.dot_product_attention` with a [B, 1, L, L] boolean mask (block
  diagonal for packed rows). XLA materialises the [B, H, L, L] scores and
  probabilities: on a TPU pod slice this was most of the step's memory traffic.
- 'splash': the Pallas splash attention kernel of TPUs, which takes segment ids
  and never forms the [L, L] scores (blocks of 128-512 keys, an online softmax).
  Padding gets segment 0 and real tokens their segment + 1, so real queries never
  see padding and no row of the mask is empty. L is padded to a multiple of 128.
  Under a mesh, each device runs its own rows (`jax.shard_map` over the batch axes).
  Off TPU it runs only in Pallas' interpreter (`interpret=True`, for tests).
'auto' is 'splash' on TPU and 'xla' elsewhere (`kernel_for_platform`).
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

KERNELS = ("xla", "splash")
_LANES = 128  # Splash attention's key blocks are multiples of this.


def kernel_for_platform(name: str, platform: str) -> str:
  """Resolves 'auto': 'splash' on TPU, 'xla' elsewhere; a named kernel stays as it is."""
  if name == "auto":
    return "splash" if platform == "tpu" else "xla"
  if name not in KERNELS:
    raise ValueError(f"attention={name!r} is not one of {('auto',) + KERNELS}.")
  return name


def attention_mask(mask: jax.Array, segment_ids: Optional[jax.Array] = None) -> jax.Array:
  """bool [B, 1, L or 1, L]: every query sees the real keys, or (packed rows, segment_ids
  int [B, L], 0 = padding) only those of its own segment: a block-diagonal mask."""
  if segment_ids is None:
    return mask[:, None, None, :]
  same = segment_ids[:, :, None] == segment_ids[:, None, :]  # [B, L, L]
  return (same & mask[:, None, :])[:, None]


def xla_attention(q, k, v, mask, segment_ids=None) -> jax.Array:
  """[B, L, H, Dh] through XLA with a boolean mask (`attention_mask`)."""
  return jax.nn.dot_product_attention(q, k, v, mask=attention_mask(mask, segment_ids))


def _block(length: int) -> int:
  """The largest of 512, 256, 128 that divides `length` (a multiple of 128)."""
  return next(b for b in (512, 256, _LANES) if length % b == 0)


@functools.lru_cache(maxsize=None)
def _splash_kernel(heads: int, length: int, interpret: bool):
  """A splash attention kernel for [H, L, Dh] inputs, every key visible (segments mask)."""
  from jax.experimental.pallas.ops.tpu import splash_attention as splash
  block = _block(length)
  sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                            block_q_dkv=block, block_kv_dkv=block,
                            block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
  mask = splash.MultiHeadMask([splash.FullMask((length, length))] * heads)
  return splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                interpret=interpret)


def _splash_rows(q, k, v, ids, *, interpret: bool) -> jax.Array:
  """Splash attention on rows already padded to a multiple of 128: [B, L, H, Dh]."""
  from jax.experimental.pallas.ops.tpu import splash_attention as splash
  b, length, heads, _ = q.shape
  kernel = _splash_kernel(heads, length, interpret)
  heads_first = lambda a: jnp.swapaxes(a, 1, 2)  # [B, H, L, Dh]
  run = jax.vmap(lambda q, k, v, ids: kernel(q, k, v, segment_ids=splash.SegmentIds(ids, ids)))
  return jnp.swapaxes(run(heads_first(q), heads_first(k), heads_first(v), ids), 1, 2)


def splash_attention(q, k, v, mask, segment_ids=None, *, mesh=None, batch_axes=(),
                     interpret: bool = False) -> jax.Array:
  """[B, L, H, Dh] through TPU splash attention with segment ids; equal to
  `xla_attention` at real tokens. With `mesh`, rows split over `batch_axes`."""
  b, length, _, head_dim = q.shape
  ids = jnp.ones(mask.shape, jnp.int32) if segment_ids is None else segment_ids + 1
  ids = jnp.where(mask, ids, 0).astype(jnp.int32)  # [B, L]; 0 = padding.
  padded = -(-length // _LANES) * _LANES
  if padded != length:
    pad = lambda a: jnp.pad(a, [(0, 0), (0, padded - length)] + [(0, 0)] * (a.ndim - 2))
    q, k, v, ids = pad(q), pad(k), pad(v), pad(ids)
  q = q * jnp.asarray(1.0 / math.sqrt(head_dim), q.dtype)  # The kernel does not scale.
  rows = functools.partial(_splash_rows, interpret=interpret)
  shards = math.prod(dict(zip(mesh.axis_names, mesh.axis_sizes))[a] for a in batch_axes) \
      if mesh is not None else 1
  if shards > 1 and b % shards == 0:
    spec = P(batch_axes)
    rows = jax.shard_map(rows, mesh=mesh, in_specs=(spec,) * 4, out_specs=spec,
                         check_vma=False)
  return rows(q, k, v, ids)[:, :length]
