"""Expert parallelism for the dropless path: tokens travel to their experts' devices.

Where experts and tokens live comes from the logical-axis rules, as for every
other array: experts over the mesh axes of the logical name 'exp', tokens over
those of 'batch' (`placement`). With EP devices along the expert axes (E/EP
experts each), inside `jax.shard_map` each device
1. orders its M = T*K (token, expert) assignments by destination device,
2. sends them to the devices holding their experts,
3. runs the received rows through its local experts (`experts.expert_rows`),
4. sends the results back and combines the k outputs of each token with its
   router weights.
Two exchanges do steps 2 and 4 (`EXCHANGES`):
- 'ragged': the assignments sorted by expert, exact-size slices sent with
  `jax.lax.ragged_all_to_all`: about M*D values leave each device per exchange.
  GPUs and TPUs have the collective; elsewhere `ragged_all_to_all_reference`
  (the same semantics built from `all_to_all`) stands in, for tests. Which one
  runs follows the platform of the mesh's devices (`mesh_platform`), not the
  host's, so a TPU program compiled on a CPU host has the TPU collective.
- 'padded' (the fallback, XLA:CPU has no ragged_all_to_all): one `all_to_all`
  of a send buffer [EP, M, D] sized for the worst case (every assignment to one
  device), so EP*M*D values leave each device.
Either way a device may receive up to EP*M rows, so its receive buffer has that
many and no assignment is ever dropped. Router statistics are computed outside,
on the global token array, so losses and usage metrics see every token.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from moe_embed.moe import experts as experts_lib
from moe_embed.moe import grouped_matmul
from moe_embed.moe.routing import Routing


EXCHANGES = ("padded", "ragged")
# Platforms whose XLA lowers `ragged_all_to_all` (jax.Device.platform names).
NATIVE_RAGGED_BACKENDS = ("gpu", "cuda", "rocm", "tpu")


def mesh_platform(mesh=None) -> str:
  """The platform ('cpu', 'gpu', 'tpu') of the devices the program is built for.

  Read from `mesh` (a Mesh or AbstractMesh; default: the current mesh), so a
  program compiled ahead of time for TPU devices from a CPU host gets the TPU
  kernels and collectives. Without a mesh (or one that names no devices):
  the host's default backend.
  """
  mesh = current_mesh() if mesh is None else mesh
  device = getattr(getattr(mesh, "abstract_mesh", mesh), "abstract_device", None)
  platform = getattr(device, "platform", None)
  return platform or jax.default_backend()


def exchange_for_backend(name: str, backend: str | None = None) -> str:
  """Resolves 'auto': 'ragged' where the backend has ragged_all_to_all, else 'padded'.

  backend: a platform name; default: that of the current mesh (`mesh_platform`).
  """
  if name == "auto":
    backend = backend or mesh_platform()
    return "ragged" if backend in NATIVE_RAGGED_BACKENDS else "padded"
  if name not in EXCHANGES:
    raise ValueError(f"expert_exchange={name!r} is not one of {('auto',) + EXCHANGES}.")
  return name


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

  @property
  def num_token_shards(self) -> int:
    """Devices the tokens are split over."""
    return self.size(self.token_axes)

  def applies(self, num_tokens: int) -> bool:
    """Whether to exchange tokens: experts split over > 1 device, tokens that split evenly.

    Otherwise (e.g. encoding an odd-sized batch under a training mesh) the local
    dropless path runs and the compiler gathers the expert weights it needs.
    """
    return self.num_expert_shards > 1 and num_tokens % self.num_token_shards == 0

  def applies_per_device(self, num_tokens: int) -> bool:
    """Whether each device should run its own tokens through all experts (`per_device`).

    Experts on every device (not split), tokens split evenly over > 1 device.
    """
    return (self.num_expert_shards == 1 and self.num_token_shards > 1
            and num_tokens % self.num_token_shards == 0)


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
             where: Placement, kernel: str = "windowed", exchange: str = "padded",
             native_ragged: Optional[bool] = None) -> jax.Array:
  """Dropless MoE (no shared bias) with experts sharded over `where.expert_axes`.

  x [T, D] -> [T, D]; T must split evenly over `where.token_axes`. `exchange` is
  'padded' or 'ragged' (`EXCHANGES`); `native_ragged` forces (True) or avoids
  (False) `jax.lax.ragged_all_to_all` for the ragged exchange, default: by the
  platform of the mesh's devices.
  """
  ep = where.num_expert_shards
  if w1.shape[0] % ep:
    raise ValueError(f"num_experts={w1.shape[0]} is not divisible by the {ep} devices of "
                     f"the expert mesh axes {where.expert_axes}.")
  if exchange not in EXCHANGES:
    raise ValueError(f"exchange={exchange!r} is not one of {EXCHANGES}.")
  mesh = where.mesh
  tok = P(where.token_axes or None)
  exp = P(where.expert_axes)
  axis = where.expert_axes if len(where.expert_axes) > 1 else where.expert_axes[0]
  constrain = lambda a: jax.lax.with_sharding_constraint(a, jax.sharding.NamedSharding(mesh, tok))
  args = [constrain(x), constrain(route.experts), constrain(route.weights),
          constrain(route.valid), w1, w2]
  specs = [tok, tok, tok, tok, exp, exp]
  optional = {"w3": w3, "w1_bias": w1_bias}
  names = [k for k, v in optional.items() if v is not None]
  args += [optional[k] for k in names]
  specs += [exp] * len(names)
  if exchange == "ragged":
    if native_ragged is None:
      native_ragged = mesh_platform(mesh) in NATIVE_RAGGED_BACKENDS
    collective = jax.lax.ragged_all_to_all if native_ragged else ragged_all_to_all_reference
    per_device = functools.partial(_ragged_local, ep=ep, axis=axis, kernel=kernel,
                                   collective=collective)
  else:
    per_device = functools.partial(_padded_local, ep=ep, axis=axis, kernel=kernel)

  def local(x, expert_ids, weights, valid, w1, w2, *rest):
    extra = dict(zip(names, rest))
    per_assignment = per_device(x, expert_ids, valid, w1, w2, extra.get("w3"),
                                extra.get("w1_bias"))
    return experts_lib.combine(per_assignment, weights)

  return jax.shard_map(local, mesh=mesh, in_specs=tuple(specs), out_specs=tok,
                       check_vma=False)(*args)


def per_device(x: jax.Array, route: Routing, w1, w2, w3=None, w1_bias=None, *,
               where: Placement, kernel: str = "windowed") -> jax.Array:
  """Dropless MoE (no shared bias) with every expert on every device: x [T, D] -> [T, D].

  Each device sorts and multiplies only its own T / devices tokens (tokens split
  over `where.token_axes`). Run on the global token array instead, the dispatch
  scatter's positions are global and data dependent, so the SPMD partitioner
  gathers every token's assignments [T*K, D] onto every device and each device
  runs the experts of the whole batch.
  """
  mesh = where.mesh
  tok = P(where.token_axes or None)
  constrain = lambda a: jax.lax.with_sharding_constraint(a, jax.sharding.NamedSharding(mesh, tok))
  weights = {"w1": w1, "w2": w2, "w3": w3, "w1_bias": w1_bias}
  names = [k for k, v in weights.items() if v is not None]

  def local(x, expert_ids, route_weights, valid, *rest):
    w = dict(zip(names, rest))
    rows = jnp.repeat(x, expert_ids.shape[1], axis=0)  # [T_local*K, D]
    out = experts_lib.expert_rows(rows, expert_ids.reshape(-1),
                                  jnp.repeat(valid, expert_ids.shape[1]), w["w1"], w["w2"],
                                  w.get("w3"), w.get("w1_bias"), kernel)
    return experts_lib.combine(out, route_weights)

  args = [constrain(x), constrain(route.experts), constrain(route.weights),
          constrain(route.valid)] + [weights[k] for k in names]
  specs = (tok,) * 4 + (P(),) * len(names)
  return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=tok,
                       check_vma=False)(*args)


def _padded_local(x, expert_ids, valid, w1, w2, w3, w1_bias, *, ep, axis, kernel):
  """Per device: worst-case buffers, one all_to_all each way -> expert outputs [M, D].

  x [T, D], expert_ids [T, K] (global ids), valid [T]; w* hold the E/EP local experts.
  """
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
  exchange = functools.partial(jax.lax.all_to_all, axis_name=axis, split_axis=0,
                               concat_axis=0, tiled=True)
  recv, recv_expert, recv_ok = exchange(send), exchange(send_expert), exchange(send_ok)
  # About M of the EP * M received rows are real on average.
  out = experts_lib.expert_rows(recv, recv_expert, recv_ok, w1, w2, w3, w1_bias, kernel,
                                expected_rows=m)
  back = exchange(out)  # [EP * M, D], in this device's send order.
  return back.at[slot].get(mode="fill", fill_value=0)  # [M, D]


def _exclusive_cumsum(a: jax.Array) -> jax.Array:
  return jnp.cumsum(a) - a


def _ragged_local(x, expert_ids, valid, w1, w2, w3, w1_bias, *, ep, axis, kernel,
                  collective: Callable):
  """Per device: assignments sorted by expert, exact-size slices each way -> [M, D].

  The send buffer [M, D] holds the assignments ordered by global expert, so each
  destination's slice is contiguous and ordered by its local experts. Slice
  sizes and offsets come from two small all_to_alls of counts; the receiver lays
  sources out one after another and knows each row's expert from the counts.
  """
  t, k = expert_ids.shape
  m = t * k
  local_experts = w1.shape[0]
  num_experts = local_experts * ep
  flat = expert_ids.reshape(m)
  ok = jnp.repeat(valid, k)
  counts = jnp.sum(jax.nn.one_hot(flat, num_experts, dtype=jnp.int32) * ok[:, None], axis=0)
  rank = grouped_matmul.rank_in_group(flat, ok, num_experts)
  slot = jnp.where(ok, _exclusive_cumsum(counts)[flat] + rank, m)  # Row of the send buffer.
  send = jnp.zeros((m, x.shape[1]), x.dtype).at[slot].set(
      jnp.repeat(x, k, axis=0), mode="drop")  # [M, D]

  all_to_all = functools.partial(jax.lax.all_to_all, axis_name=axis, split_axis=0,
                                 concat_axis=0, tiled=True)
  send_counts = counts.reshape(ep, local_experts)  # [EP (destination), E/EP]
  recv_counts = all_to_all(send_counts)  # [EP (source), E/EP]
  send_sizes = jnp.sum(send_counts, axis=1)
  recv_sizes = jnp.sum(recv_counts, axis=1)
  send_offsets = _exclusive_cumsum(send_sizes)  # Where each destination's slice starts.
  recv_offsets = _exclusive_cumsum(recv_sizes)  # Where each source's rows land here.
  # Where this device's slice lands on each destination, and the reverse.
  offsets_there = all_to_all(recv_offsets)
  offsets_back = all_to_all(send_offsets)

  capacity = ep * m  # Worst case: every device sends all its assignments here.
  recv = collective(send, jnp.zeros((capacity, x.shape[1]), x.dtype), send_offsets,
                    send_sizes, offsets_there, recv_sizes, axis_name=axis)
  # Rows arrive source by source, each source's ordered by local expert.
  segment_end = jnp.cumsum(recv_counts.reshape(-1))  # [EP * E/EP]
  row = jnp.arange(capacity)
  recv_expert = (jnp.searchsorted(segment_end, row, side="right") % local_experts
                 ).astype(jnp.int32)
  recv_ok = row < segment_end[-1]
  out = experts_lib.expert_rows(recv, recv_expert, recv_ok, w1, w2, w3, w1_bias, kernel,
                                expected_rows=m)  # [EP * M, D]
  back = collective(out, jnp.zeros((m, x.shape[1]), out.dtype), recv_offsets, recv_sizes,
                    offsets_back, send_sizes, axis_name=axis)  # [M, D], send order.
  return back.at[slot].get(mode="fill", fill_value=0)


def ragged_all_to_all_reference(operand, output, input_offsets, send_sizes, output_offsets,
                                recv_sizes, *, axis_name):
  """`jax.lax.ragged_all_to_all`'s semantics from `all_to_all`, for backends without it.

  operand [N, ...]; output [R, ...]; the four index arrays [EP]. Slice j of
  `operand` (input_offsets[j], send_sizes[j] rows) is written on device j at
  output_offsets[j]; rows of `output` that receive nothing keep their values.
  Each device sends a padded [EP, N, ...] block, so it moves EP*N rows: a
  stand-in for correctness, not for speed. Differentiable.
  """
  n = operand.shape[0]
  r = output.shape[0]
  all_to_all = functools.partial(jax.lax.all_to_all, axis_name=axis_name, split_axis=0,
                                 concat_axis=0, tiled=True)
  ep = input_offsets.shape[0]
  within = jnp.arange(n)
  take = input_offsets[:, None] + within[None, :]  # [EP, N]
  chunks = operand.at[take].get(mode="fill", fill_value=0)  # [EP, N, ...]
  received = all_to_all(chunks.reshape((ep * n,) + operand.shape[1:]))  # From each source.
  starts = all_to_all(output_offsets)  # [EP]: where source i's slice goes here.
  rows = jnp.where(within[None, :] < recv_sizes[:, None], starts[:, None] + within[None, :], r)
  return output.at[rows.reshape(-1)].set(received, mode="drop")
