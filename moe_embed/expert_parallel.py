"""Expert parallelism for the dropless path: tokens travel to their experts' devices.

Experts are sharded over the mesh axis 'expert' (EP devices, E/EP experts each)
and tokens over every mesh axis. Inside `jax.shard_map`, each device
1. sorts its T*K (token, expert) assignments by destination device into a
   send buffer [EP, T*K, D] (a counting sort; sized for the worst case so no
   assignment is ever dropped),
2. exchanges the buffers with one `all_to_all` over 'expert',
3. runs the received rows through its local experts (`moe.expert_rows`),
4. returns the results with a second `all_to_all` and combines the k outputs of
   each token with its router weights.
Router statistics are computed outside, on the global token array, so losses and
usage metrics see every token. XLA:CPU has no `ragged_all_to_all`, hence the
padded buffers: each all_to_all moves EP x T*K*D values per device where a
ragged exchange would move about T*K*D.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

EXPERT_AXIS = "expert"


def current_mesh():
  """The mesh set with `jax.set_mesh` (an AbstractMesh under jit), or None."""
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh is None or mesh.empty else mesh


def expert_axis_size(mesh) -> int:
  if mesh is None or EXPERT_AXIS not in mesh.axis_names:
    return 1
  return dict(zip(mesh.axis_names, mesh.axis_sizes))[EXPERT_AXIS]


def applies(mesh, num_tokens: int) -> bool:
  """Whether to exchange tokens: an 'expert' axis > 1 and tokens that split evenly.

  Otherwise (e.g. encoding an odd-sized batch under a training mesh) the local
  dropless path runs and the compiler gathers the expert weights it needs.
  """
  if expert_axis_size(mesh) <= 1:
    return False
  return num_tokens % mesh.size == 0


def dropless(x: jax.Array, route, w1, w2, w3=None, w1_bias=None, *, mesh,
             kernel: str = "windowed") -> jax.Array:
  """Dropless MoE (no shared bias) with experts sharded over 'expert': x [T, D] -> [T, D]."""
  from moe_embed import moe  # moe imports this module.
  token_axes = tuple(a for a in mesh.axis_names)
  ep = expert_axis_size(mesh)
  if w1.shape[0] % ep:
    raise ValueError(f"num_experts={w1.shape[0]} is not divisible by mesh.expert={ep}.")
  tok, exp = P(token_axes), P(EXPERT_AXIS)
  constrain = lambda a, spec: jax.lax.with_sharding_constraint(a, jax.sharding.NamedSharding(mesh, spec))
  args = [constrain(x, tok), constrain(route.experts, tok), constrain(route.weights, tok),
          constrain(route.valid, tok), w1, w2]
  specs = [tok, tok, tok, tok, exp, exp]
  optional = {"w3": w3, "w1_bias": w1_bias}
  names = [k for k, v in optional.items() if v is not None]
  args += [optional[k] for k in names]
  specs += [exp] * len(names)

  def local(x, experts, weights, valid, w1, w2, *rest):
    extra = dict(zip(names, rest))
    t, k = experts.shape
    m = t * k
    local_experts = w1.shape[0]
    flat = experts.reshape(m)
    ok = jnp.repeat(valid, k)
    dest = flat // local_experts  # Device holding the expert.
    one_hot = jax.nn.one_hot(dest, ep, dtype=jnp.int32) * ok[:, None]
    rank = jnp.sum((jnp.cumsum(one_hot, axis=0) - one_hot) * one_hot, axis=-1)
    slot = jnp.where(ok, dest * m + rank, ep * m)  # Row of the send buffer [EP * M].
    rows = jnp.repeat(x, k, axis=0)
    send = jnp.zeros((ep * m, x.shape[1]), x.dtype).at[slot].set(rows, mode="drop")
    send_expert = jnp.zeros((ep * m,), jnp.int32).at[slot].set(flat % local_experts, mode="drop")
    send_ok = jnp.zeros((ep * m,), bool).at[slot].set(True, mode="drop")
    exchange = functools.partial(jax.lax.all_to_all, axis_name=EXPERT_AXIS, split_axis=0,
                                 concat_axis=0, tiled=True)
    recv, recv_expert, recv_ok = exchange(send), exchange(send_expert), exchange(send_ok)
    # About M of the EP * M received rows are real on average.
    out = moe.expert_rows(recv, recv_expert, recv_ok, w1, w2, extra.get("w3"),
                          extra.get("w1_bias"), kernel, expected_rows=m)
    back = exchange(out)  # [EP * M, D], in this device's send order.
    per_assignment = back.at[slot].get(mode="fill", fill_value=0)  # [M, D]
    return moe.combine(per_assignment, weights)

  return jax.shard_map(local, mesh=mesh, in_specs=tuple(specs), out_specs=tok,
                       check_vma=False)(*args)
