"""Device meshes and the mapping of logical axis names onto them.

The mesh has named axes 'data' (batch, data parallelism) and 'expert' (expert
parallelism). Parameters and activations carry logical names ('batch', 'exp',
'embed', ...); `logical_axis_rules` maps them to mesh axes. The rules are data
in the config (`config.mesh.rules`), as in vmoe and MaxText. Expert
parallelism reads the same rules: experts live on the mesh axes of 'exp',
tokens on those of 'batch'.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "expert")
Rules = tuple[tuple[str, Any], ...]  # (logical axis name, mesh axis or axes or None) pairs.

# Logical name -> mesh axes. The batch is split over every device (an expert
# group also holds data); experts over 'expert'; everything else replicated.
DEFAULT_RULES: Rules = (
    ("batch", ("data", "expert")),
    ("exp", "expert"),
    ("vocab", None),
    ("embed", None),
    ("mlp", None),
    ("heads", None),
    ("kv", None),
    ("length", None),
)


def resolve_mesh_shape(data: int, expert: int, num_devices: int) -> tuple[int, int]:
  """Fills a -1 axis with the remaining devices and checks the product."""
  if data == -1 and expert == -1:
    raise ValueError("Only one of mesh.data and mesh.expert may be -1.")
  for name, size in (("mesh.data", data), ("mesh.expert", expert)):
    if size == 0 or size < -1:
      raise ValueError(f"{name}={size} must be a positive size or -1.")
  if data == -1:
    if num_devices % expert:
      raise ValueError(
          f"mesh.expert={expert} does not divide the {num_devices} devices.")
    data = num_devices // expert
  if expert == -1:
    if num_devices % data:
      raise ValueError(f"mesh.data={data} does not divide the {num_devices} devices.")
    expert = num_devices // data
  if data * expert != num_devices:
    raise ValueError(
        f"mesh.data={data} x mesh.expert={expert} = {data * expert} devices, but "
        f"{num_devices} are available; set one of them to -1 to fill the rest.")
  return data, expert


def make_mesh(data: int = -1, expert: int = 1,
              devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A ('data', 'expert') mesh over `devices` (default: all devices)."""
  devices = list(jax.devices() if devices is None else devices)
  data, expert = resolve_mesh_shape(data, expert, len(devices))
  grid = np.asarray(devices).reshape(data, expert)
  return Mesh(grid, MESH_AXES)


def rules_from_config(rules: Optional[Sequence[Sequence[Any]]]) -> Rules:
  """Normalises config rules (lists from JSON/ConfigDict) into tuples."""
  if not rules:
    return DEFAULT_RULES
  out = []
  for rule in rules:
    if len(rule) != 2:
      raise ValueError(f"A logical axis rule is (name, mesh_axes); got {rule!r}.")
    name, axes = rule
    if isinstance(axes, list):
      axes = tuple(axes)
    for axis in (axes if isinstance(axes, tuple) else (axes,)):
      if axis is not None and axis not in MESH_AXES:
        raise ValueError(f"Rule {rule!r} names mesh axis {axis!r}; mesh axes are {MESH_AXES}.")
    out.append((name, axes))
  return tuple(out)


def logical_shardings(boxed_tree: Any, mesh: Mesh, rules) -> Any:
  """NamedShardings for a tree whose leaves may be `nn.Partitioned` boxes."""
  specs = nn.get_partition_spec(boxed_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def batch_sharding(mesh: Mesh, rules) -> NamedSharding:
  """Sharding of arrays whose leading axis is the global batch."""
  spec = nn.logical_to_mesh_axes(("batch",), rules)
  return NamedSharding(mesh, P(*spec))


def batch_shards(mesh: Mesh, rules) -> int:
  """Number of pieces the global batch is split into on this mesh."""
  spec = nn.logical_to_mesh_axes(("batch",), rules)[0]
  axes = spec if isinstance(spec, tuple) else (() if spec is None else (spec,))
  return math.prod(mesh.shape[a] for a in axes)


def mesh_context(mesh: Mesh):
  """Context that makes `mesh` current for sharding constraints under jit."""
  return jax.set_mesh(mesh)


@contextlib.contextmanager
def activate(mesh: Mesh, rules):
  """Makes `mesh` current and `rules` the logical-axis rules: how every sharded call runs."""
  with mesh_context(mesh), nn.logical_axis_rules(rules):
    yield
