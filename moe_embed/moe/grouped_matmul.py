"""Grouped matrix multiplication for the dropless MoE path.

Rows of `lhs` are grouped by expert: group e occupies rows
[tile_start[e] * tile, tile_end[e] * tile) of a buffer whose groups are padded
to a multiple of `tile` rows (zeros in the padding), and is multiplied by
`rhs[e]`. Axis letters: P buffer rows, D input width, F output width, E experts.

Three kernels, selectable by name (`encoder.grouped_matmul`); `kernel_for_backend`
resolves 'auto':
- 'windowed' (auto on CPU): expert e does one large matmul over a static
  window of W rows (about the average group) starting at its group, keeps the
  rows that are its own, and covers a longer group with a loop over row tiles.
  Custom VJP of the same form. With balanced routing nearly all FLOPs are in E
  large matmuls.
- 'tiled': the same kernel without the window (W = 0): the tile loop alone, one
  matmul of `tile` rows per step with that expert's weights.
- 'ragged_dot' (auto on GPU and TPU, which lower it to grouped kernels):
  `jax.lax.ragged_dot` on unpadded groups (tile = 1), in blocks of at most
  RAGGED_DOT_MAX_ROWS rows (TPU's kernel fails to compile above). On CPU it is
  several times slower than the windowed kernel (the measured figure and its
  command: README, Performance notes).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

KERNELS = ("windowed", "tiled", "ragged_dot")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GroupLayout:
  """Where each expert's rows live in the grouped buffer."""

  tile_start: jax.Array  # int32 [E], first tile of group e.
  tile_end: jax.Array  # int32 [E], one past its last tile.
  group_sizes: jax.Array  # int32 [E], real rows (before tile padding).
  num_rows: int = dataclasses.field(metadata=dict(static=True))  # P, static.
  tile: int = dataclasses.field(metadata=dict(static=True))
  window: int = dataclasses.field(default=0, metadata=dict(static=True))  # W rows, static.


def kernel_for_backend(name: str, backend: str | None = None) -> str:
  """Resolves 'auto' to the kernel measured fastest on the backend.

  'ragged_dot' where XLA has grouped-matmul kernels for it (GPU, TPU); 'windowed'
  on CPU, where ragged_dot is slow. Never 'tiled': the choice is made when tracing,
  before the group sizes are known, and the tiled kernel does the windowed kernel's
  work in smaller matmuls; on CPU it measured 1.3-1.4x the windowed block's time from
  1,024 tokens up (README, Performance notes). It stays as the tile loop alone, to
  compare against.

  backend: a platform name ('cpu', 'gpu', 'tpu'); the caller passes that of the
  devices it builds for (`expert_parallel.mesh_platform`). Default: the host's.
  """
  if name == "auto":
    backend = backend or jax.default_backend()
    return "windowed" if backend == "cpu" else "ragged_dot"
  if name not in KERNELS:
    raise ValueError(f"grouped_matmul={name!r} is not one of {('auto',) + KERNELS}.")
  return name


def default_window(num_assignments: int, num_experts: int, tile: int, kernel: str) -> int:
  """Rows each expert multiplies in one matmul: its average group, in whole tiles."""
  if kernel != "windowed":
    return 0
  return -(-num_assignments // (num_experts * tile)) * tile


def default_tile(num_assignments: int, num_experts: int, kernel: str) -> int:
  """Rows per tile: ~1/8 of an average group, between 64 and 512 (1 for ragged_dot)."""
  if kernel == "ragged_dot":
    return 1
  target = max(num_assignments // (num_experts * 8), 1)
  return int(min(512, max(64, 2 ** round(math.log2(target)))))


def make_layout(group_sizes: jax.Array, num_assignments: int, tile: int,
                window: int = 0) -> GroupLayout:
  """Layout for `num_assignments` rows split into groups of `group_sizes` [E].

  `window` > 0 reserves room after the last group so that a window of that many
  rows can start at any group (the 'windowed' kernel).
  """
  num_experts = group_sizes.shape[0]
  tiles = (group_sizes + tile - 1) // tile
  tile_end = jnp.cumsum(tiles).astype(jnp.int32)
  num_rows = (-(-num_assignments // tile) + (num_experts if tile > 1 else 0)) * tile + window
  return GroupLayout(tile_end - tiles.astype(jnp.int32), tile_end,
                     group_sizes.astype(jnp.int32), num_rows, tile, window)


def rank_in_group(group_ids: jax.Array, valid: jax.Array, num_groups: int) -> jax.Array:
  """int32 [M]: how many valid entries of the same group come before each entry.

  The rank of a stable counting sort: group_ids, valid [M]; entries keep their
  order within a group. Used to place rows in expert groups and, for expert
  parallelism, in per-device send buffers.
  """
  one_hot = jax.nn.one_hot(group_ids, num_groups, dtype=jnp.int32) * valid[:, None]
  return jnp.sum((jnp.cumsum(one_hot, axis=0) - one_hot) * one_hot, axis=-1)


def row_positions(expert_ids: jax.Array, valid: jax.Array, layout: GroupLayout,
                  num_experts: int) -> jax.Array:
  """Buffer row of each assignment (a counting sort by expert); invalid -> num_rows.

  expert_ids, valid: [M]. Assignments keep their order within an expert.
  """
  rank = rank_in_group(expert_ids, valid, num_experts)  # [M]
  start = layout.tile_start[expert_ids] * layout.tile
  return jnp.where(valid, start + rank, layout.num_rows)


def expert_of_row(layout: GroupLayout) -> jax.Array:
  """int32 [P]: the expert whose group holds each buffer row (clipped to E-1)."""
  tile_of_row = jnp.arange(layout.num_rows) // layout.tile
  e = jnp.searchsorted(layout.tile_end, tile_of_row, side="right")
  return jnp.minimum(e, layout.tile_end.shape[0] - 1).astype(jnp.int32)


def gmm(lhs: jax.Array, rhs: jax.Array, layout: GroupLayout, kernel: str) -> jax.Array:
  """lhs [P, D] grouped rows, rhs [E, D, F] -> [P, F]; rows outside groups give 0."""
  if kernel == "ragged_dot":
    return ragged_dot_blocked(lhs, rhs, layout.group_sizes)
  if kernel in ("windowed", "tiled"):
    if kernel == "windowed" and not layout.window:
      raise ValueError("The 'windowed' kernel needs a layout made with window > 0.")
    window = layout.window if kernel == "windowed" else 0
    return _grouped_gmm(lhs, rhs, layout.tile_start, layout.tile_end, layout.tile, window)
  raise ValueError(f"Unknown grouped matmul kernel {kernel!r}; choose from {KERNELS}.")


# Rows per `jax.lax.ragged_dot` call. libtpu 0.0.42 cannot compile ragged_dot for
# bf16 [32768, 768] x [8, 768, 3072] (nomic_v2_moe's MLP): its kernel's scoped VMEM
# (21.5 MiB) exceeds the 16 MiB limit; 16,384 rows compile.
RAGGED_DOT_MAX_ROWS = 16_384


def ragged_dot_blocked(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array,
                       max_rows: int = RAGGED_DOT_MAX_ROWS) -> jax.Array:
  """`jax.lax.ragged_dot` over blocks of `max_rows` rows (one `lax.map`), concatenated.

  lhs [P, D] with groups of `group_sizes` [E] from row 0, rhs [E, D, F] -> [P, F].
  Each block gets the part of every group that falls in its rows; rows past the
  last group give 0, as in one call.
  """
  p = lhs.shape[0]
  if p <= max_rows:
    return jax.lax.ragged_dot(lhs, rhs, group_sizes)
  blocks = -(-p // max_rows)
  padded = jnp.pad(lhs, ((0, blocks * max_rows - p), (0, 0)))
  ends = jnp.cumsum(group_sizes)
  starts = ends - group_sizes
  first = (jnp.arange(blocks) * max_rows)[:, None]  # [blocks, 1]
  clip = lambda x: jnp.clip(x[None, :] - first, 0, max_rows)
  sizes = (clip(ends) - clip(starts)).astype(group_sizes.dtype)  # [blocks, E]
  out = jax.lax.map(lambda xs: jax.lax.ragged_dot(xs[0], rhs, xs[1]),
                    (padded.reshape(blocks, max_rows, -1), sizes))
  return out.reshape(blocks * max_rows, -1)[:p]


# The 'windowed' and 'tiled' kernels are one kernel. Expert e first multiplies one
# static window of W rows starting at its group (a single large matmul) and keeps
# the rows that belong to it; the tile loop then covers the tiles of its group past
# the window. 'tiled' is the same with W = 0: the tile loop covers every tile. With
# balanced routing and W the average group, nearly all work is in the E large
# matmuls, forward and backward.


def _cover_group(e: int, tile_start, tile_end, tile: int, window: int, visit, carry):
  """Folds `visit(first_row, num_rows, keep, carry)` over the rows of expert e's group.

  First its window (when `window` > 0: rows [start, start + window), `keep`
  [window, 1] marks those inside the group), then each tile past the window
  (`tile` rows, keep None). The one tile loop of the forward and backward passes.
  """
  start = tile_start[e] * tile
  if window:
    keep = jnp.arange(window)[:, None] < (tile_end[e] - tile_start[e]) * tile
    carry = visit(start, window, keep, carry)
  first = jnp.minimum(tile_start[e] + window // tile, tile_end[e])
  return jax.lax.fori_loop(first, tile_end[e],
                           lambda t, c: visit(t * tile, tile, None, c), carry)


def _products(lhs, rhs, tile_start, tile_end, tile, window):
  """lhs [P, D] x rhs [E, D, F] -> [P, F]: each group's rows times its expert's matrix."""
  out = jnp.zeros((lhs.shape[0], rhs.shape[-1]), lhs.dtype)
  for e in range(rhs.shape[0]):

    def visit(row, n, keep, out, w_e=rhs[e]):
      res = jnp.dot(jax.lax.dynamic_slice_in_dim(lhs, row, n), w_e,
                    preferred_element_type=jnp.float32).astype(out.dtype)
      if keep is not None:
        res = jnp.where(keep, res, jax.lax.dynamic_slice_in_dim(out, row, n))
      return jax.lax.dynamic_update_slice_in_dim(out, res, row, 0)

    out = _cover_group(e, tile_start, tile_end, tile, window, visit, out)
  return out


def _weight_grads(lhs, g, tile_start, tile_end, tile, window):
  """float32 [E, D, F]: per expert, the sum over its group's rows of lhs [P, D]^T g [P, F]."""
  grads = []
  for e in range(tile_start.shape[0]):

    def visit(row, n, keep, acc):
      g_rows = jax.lax.dynamic_slice_in_dim(g, row, n)
      if keep is not None:
        g_rows = jnp.where(keep, g_rows, 0)
      return acc + jnp.dot(jax.lax.dynamic_slice_in_dim(lhs, row, n).T, g_rows,
                           preferred_element_type=jnp.float32)

    zeros = jnp.zeros((lhs.shape[1], g.shape[1]), jnp.float32)
    grads.append(_cover_group(e, tile_start, tile_end, tile, window, visit, zeros))
  return jnp.stack(grads)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _grouped_gmm(lhs, rhs, tile_start, tile_end, tile, window):
  return _products(lhs, rhs, tile_start, tile_end, tile, window)


def _grouped_fwd(lhs, rhs, tile_start, tile_end, tile, window):
  out = _products(lhs, rhs, tile_start, tile_end, tile, window)
  return out, (lhs, rhs, tile_start, tile_end)


def _grouped_bwd(tile, window, residuals, g):
  lhs, rhs, tile_start, tile_end = residuals
  d_lhs = _products(g, jnp.swapaxes(rhs, 1, 2), tile_start, tile_end, tile, window)
  d_rhs = _weight_grads(lhs, g, tile_start, tile_end, tile, window).astype(rhs.dtype)
  zero_index = lambda x: jnp.zeros(x.shape, jax.dtypes.float0)
  return d_lhs, d_rhs, zero_index(tile_start), zero_index(tile_end)


_grouped_gmm.defvjp(_grouped_fwd, _grouped_bwd)
