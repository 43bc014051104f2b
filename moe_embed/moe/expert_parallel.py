"""Expert parallelism for the dropless path: tokens travel to their experts' devices.

Where experts and tokens live comes from the logical-axis rules, as for every
other array: experts over the mesh axes of the logical name 'exp', tokens over
those of 'batch' (`placement`). With EP devices along the expert axes (E/EP
experts each), inside `jax.shard_map` each device
1. sorts its T*K (token, expert) assignments by destination device into a
   send buffer [EP, T*K, D] (`grouped_matmul.rank_in_group`; sized for the
   worst case so no assignment is ever dropped),
2. exchanges the buffers with one `all_to_all` over the expert axes,
3. runs the received rows through its local experts (`experts.expert_rows`),
4. returns the results with a second `all_to_all` and combines the k outputs of
   each token with its router weights.
Router statistics are computed outside, on the global token array, so losses and
usage metrics see every token. XLA:CPU has no `ragged_all_to_all`, hence the
padded buffers: each all_to_all moves EP x T*K*D values per device where a
ragged exchange would move about T*K*D.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from moe_embed.moe import experts as experts_lib
from moe_embed.moe import grouped_matmul
from moe_embed.moe.routing import Routing


def _axes(spec_entry: Any) -> tuple[str, ...]:
  """One PartitionSpec entry (None, a name or a tuple of names) as a tuple of names."""
  if spec_entry is None:
    return ()
  return tuple(spec_entry) if isinstance(spec_entry, (tuple, list)) else (spec_entry,)


@dataclasses.dataclass(frozen=True)
class Placement:
  """The mesh, and the mesh axes that hold experts and tokens."""

  mesh: Any  # jax.sharding.Mesh or AbstractMesh
  expert_axes: tuple[str, ...]
  token_axes: tuple[str, ...]

  def size(self, axes: tuple[str, ...]) -> int:
    sizes = dict(zip(self.mesh.axis_names, self.mesh.axis_sizes))
    return math.prod(sizes[a] for a in axes)

  @property
  def num_expert_shards(self) -> int:
    """EP: devices the experts are split over."""
    return self.size(self.expert_axes)

  def applies(self, num_tokens: int) -> bool:
    """Whether to exchange tokens: experts split over > 1 device, tokens that split evenly.

    Otherwise (e.g. encoding an odd-sized batch under a training mesh) the local
    dropless path runs and the compiler gathers the expert weights it needs.
    """
    return self.num_expert_shards > 1 and num_tokens % self.size(self.token_axes) == 0


def current_mesh():
  """The mesh set with `jax.set_mesh` (an AbstractMesh under jit), or None."""
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh is None or mesh.empty else mesh


def placement(expert_spec: Any, token_spec: Any, mesh=None) -> Optional[Placement]:
  """A Placement from the mesh axes of the logical names 'exp' and 'batch'.

  `expert_spec` and `token_spec` are PartitionSpec entries, e.g. from
  `flax.linen.logical_to_mesh_axes(('exp',))[0]`. None when there is no mesh.
  """
  mesh = current_mesh() if mesh is None else mesh
  if mesh is None:
    return None
  return Placement(mesh, _axes(expert_spec), _axes(token_spec))


def dropless(x: jax.Array, route: Routing, w1, w2, w3=None, w1_bias=None, *,
             where: Placement, kernel: str = "windowed") -> jax.Array:
  """Dropless MoE (no shared bias) with experts sharded over `where.expert_axes`.

  x [T, D] -> [T, D]; T must split evenly over `where.token_axes`.
  """
  ep = where.num_expert_shards
  if w1.shape[0] % ep:
    raise ValueError(f"num_experts={w1.shape[0]} is not divisible by the {ep} devices of "
                     f"the expert mesh axes {where.expert_axes}.")
  mesh = where.mesh
  tok = P(where.token_axes or None)
  exp = P(where.expert_axes)
  expert_axis_name = where.expert_axes if len(where.expert_axes) > 1 else where.expert_axes[0]
  constrain = lambda a: jax.lax.with_sharding_constraint(a, jax.sharding.NamedSharding(mesh, tok))
  args = [constrain(x), constrain(route.experts), constrain(route.weights),
          constrain(route.valid), w1, w2]
  specs = [tok, tok, tok, tok, exp, exp]
  optional = {"w3": w3, "w1_bias": w1_bias}
  names = [k for k, v in optional.items() if v is not None]
  args += [optional[k] for k in names]
  specs += [exp] * len(names)

  def local(x, expert_ids, weights, valid, w1, w2, *rest):
    extra = dict(zip(names, rest))
    t, k = expert_ids.shape
    m = t * k
    local_experts = w1.shape[0]
    flat = expert_ids.reshape(m)
    ok = jnp.repeat(valid, k)
    dest = flat // local_experts  # Device holding the expert.
    rank = grouped_matmul.rank_in_group(dest, ok, ep)
    slot = jnp.where(ok, dest * m + rank, ep * m)  # Row of the send buffer [EP * M].
    rows = jnp.repeat(x, k, axis=0)
    send = jnp.zeros((ep * m, x.shape[1]), x.dtype).at[slot].set(rows, mode="drop")
    send_expert = jnp.zeros((ep * m,), jnp.int32).at[slot].set(flat % local_experts, mode="drop")
    send_ok = jnp.zeros((ep * m,), bool).at[slot].set(True, mode="drop")
    exchange = functools.partial(jax.lax.all_to_all, axis_name=expert_axis_name, split_axis=0,
                                 concat_axis=0, tiled=True)
    recv, recv_expert, recv_ok = exchange(send), exchange(send_expert), exchange(send_ok)
    # About M of the EP * M received rows are real on average.
    out = experts_lib.expert_rows(recv, recv_expert, recv_ok, w1, w2, extra.get("w3"),
                                  extra.get("w1_bias"), kernel, expected_rows=m)
    back = exchange(out)  # [EP * M, D], in this device's send order.
    per_assignment = back.at[slot].get(mode="fill", fill_value=0)  # [M, D]
    return experts_lib.combine(per_assignment, weights)

  return jax.shard_map(local, mesh=mesh, in_specs=tuple(specs), out_specs=tok,
                       check_vma=False)(*args)
