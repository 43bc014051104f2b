"""Ahead-of-time compilation of the train step for a TPU slice, on a machine without one.

`compile_step(config, topology)` builds the step `launch/train.py` would run
for `config` (mesh and rules, GradCache chunk, remat, dtype, expert exchange,
hard negatives, batch shapes) on the chips of a TPU topology described by
libtpu (`jax.experimental.topologies`), from abstract state: no weights, no
data, no TPU. It returns XLA's per-chip memory, the model FLOPs, the
compiler's estimated step time and the bytes of each collective in the
compiled program. `fit` searches the fastest GradCache chunk / remat setting
that makes the step fit the chip's HBM. `launch/compile.py` is the command.

Chips are named as Cloud TPU accelerator types (`v5p-8`, `v6e-8`: TensorCores
for v4 and v5p, chips for v5e and v6e) or as libtpu topology strings
(`v5p:2x2x1`).
"""

from __future__ import annotations

import collections
import dataclasses
import math
import os
import re
import time
from typing import Any, Optional

import jax
import ml_collections
import numpy as np

from moe_embed import partitioning
from moe_embed.data import pipeline
from moe_embed.model import param_count
from moe_embed.model.config import EncoderConfig
from moe_embed.model.encoder import EmbeddingModel
from moe_embed.train import config as run_config
from moe_embed.train import optimizer as optimizer_lib
from moe_embed.train import state as state_lib
from moe_embed.train import step as step_lib

GiB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Chip:
  """One TPU generation: memory and peak compute per chip, and how slices are named."""

  name: str  # libtpu's name, the prefix of a topology string ('v5p').
  hbm_bytes: int  # HBM per chip.
  peak_bf16_flops: float  # Peak bfloat16 FLOP/s per chip.
  hbm_bytes_per_s: float  # HBM bandwidth per chip (published figures).
  cores_per_chip: int  # TensorCores counted per chip by the accelerator type ('v5p-8').
  dims: int  # Torus dimensions of a slice: 3 (v4, v5p) or 2 (v5e, v6e).
  chip_config: Optional[str] = None  # libtpu chip_config_name ('megacore': 1 device/chip).


CHIPS = {
    "v4": Chip("v4", 32 * GiB, 275e12, 1228e9, 2, 3, chip_config="megacore"),
    "v5e": Chip("v5e", 16 * GiB, 197e12, 819e9, 1, 2),
    "v5p": Chip("v5p", 95 * GiB, 459e12, 2765e9, 2, 3),
    "v6e": Chip("v6e", 32 * GiB, 918e12, 1640e9, 1, 2),
}
# Accelerator-type prefixes of Cloud TPU (gcloud --accelerator-type) -> chip.
_ALIASES = {"v4": "v4", "v5p": "v5p", "v5e": "v5e", "v5litepod": "v5e", "v6e": "v6e"}
# Chips of the accelerator types accepted: powers of two from one host's 4 chips.
_SLICE_CHIPS = {3: [2 ** i for i in range(2, 11)], 2: [2 ** i for i in range(2, 9)]}
# The collectives counted in `collective_bytes`, by HLO opcode.
COLLECTIVES = ("all-reduce", "all-gather", "all-to-all", "ragged-all-to-all", "reduce-scatter")


class TopologyError(ValueError):
  """A topology name that is not a TPU slice libtpu knows."""


class CompileError(RuntimeError):
  """XLA refused the step for another reason than HBM (its message, on one line)."""


@dataclasses.dataclass(frozen=True)
class Topology:
  name: str  # As given: 'v5p-8' or 'v5p:2x2x1'.
  chip: Chip
  shape: tuple[int, ...]  # Chips along each torus axis.

  @property
  def chips(self) -> int:
    return math.prod(self.shape)

  @property
  def libtpu_name(self) -> str:
    return f"{self.chip.name}:{'x'.join(map(str, self.shape))}"


def slice_shape(chips: int, dims: int) -> tuple[int, ...]:
  """The torus shape of a Cloud TPU slice of `chips` chips: 4 -> 2x2x1, 8 -> 2x2x2,
  16 -> 2x2x4, 32 -> 2x4x4, 64 -> 4x4x4 (3D); 4 -> 2x2, 8 -> 2x4, 16 -> 4x4 (2D)."""
  shape = [2, 2, 1] if dims == 3 else [2, 2]
  while math.prod(shape) < chips:
    smallest = min(shape)
    i = max(j for j, s in enumerate(shape) if s == smallest)
    shape[i] *= 2
  if math.prod(shape) != chips:
    raise ValueError(f"No slice shape has {chips} chips.")
  return tuple(shape)


def accelerator_types() -> list[str]:
  """Every accelerator type `parse_topology` accepts, e.g. 'v5p-8', 'v6e-8'."""
  out = []
  for alias, name in _ALIASES.items():
    chip = CHIPS[name]
    if alias == "v5litepod" or alias == name:
      out += [f"{alias}-{n * chip.cores_per_chip}" for n in _SLICE_CHIPS[chip.dims]]
  return out


def _valid_names() -> str:
  return (f"accelerator types {', '.join(accelerator_types())}, or topology strings such as "
          "v5p:2x2x1, v4:2x2x4, v5e:2x4, v6e:4x4")


def parse_topology(name: str) -> Topology:
  """'v5p-8' (an accelerator type) or 'v5p:2x2x1' (libtpu) -> Topology; TopologyError else."""
  text = name.strip().lower()
  if match := re.fullmatch(r"([a-z0-9]+)-(\d+)", text):
    prefix, count = match.group(1), int(match.group(2))
    chip = CHIPS.get(_ALIASES.get(prefix, ""))
    if chip is not None and count % chip.cores_per_chip == 0 \
        and count // chip.cores_per_chip in _SLICE_CHIPS[chip.dims]:
      return Topology(name, chip, slice_shape(count // chip.cores_per_chip, chip.dims))
  elif match := re.fullmatch(r"([a-z0-9]+):(\d+(?:x\d+)*)", text):
    chip = CHIPS.get(_ALIASES.get(match.group(1), ""))
    shape = tuple(int(s) for s in match.group(2).split("x"))
    if chip is not None and len(shape) in (chip.dims, 2) and all(s > 0 for s in shape):
      return Topology(name, chip, shape)
  raise TopologyError(f"Unknown TPU topology {name!r}; use one of the {_valid_names()}.")


def topology_devices(topology: Topology) -> list[Any]:
  """The TPU devices of the slice as libtpu describes them (compile-only: no chip is opened)."""
  # libtpu locks /tmp/libtpu_lockfile for the process that drives the chips; a
  # description needs no chip, so it may be made beside a process holding them.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  # Off a TPU VM libtpu would ask the GCE metadata server what it runs on, and warn.
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("TPU_ACCELERATOR_TYPE",
                        f"{topology.chip.name}-{topology.chips * topology.chip.cores_per_chip}")
  try:
    from jax.experimental import topologies
  except ImportError as e:
    raise TopologyError(f"jax.experimental.topologies is unavailable ({e}).") from None
  kwargs = {}
  if topology.chip.chip_config:
    kwargs["chip_config_name"] = topology.chip.chip_config
  if topology.chip.dims == 2 and topology.chips <= 8:
    kwargs["chips_per_host_bounds"] = (*topology.shape, 1)  # One host, as v5e-8 / v6e-8.
  try:
    desc = topologies.get_topology_desc(topology.libtpu_name, "tpu", **kwargs)
  except Exception as e:  # pylint: disable=broad-except  (libtpu's errors are RuntimeErrors)
    message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if "tpu" in message.lower() and ("plugin" in message.lower() or "libtpu" in message.lower()):
      raise TopologyError(f"libtpu is not installed or failed to load ({message}); "
                          "pip install -e '.[tpu]'.") from None
    raise TopologyError(f"libtpu rejects topology {topology.libtpu_name!r} ({message}); "
                        f"use one of the {_valid_names()}.") from None
  return list(desc.devices)


# --- The step ----------------------------------------------------------------


@dataclasses.dataclass
class Step:
  """The jitted step and its abstract arguments, as the trainer would build them."""

  encoder: EncoderConfig
  mesh: Any
  rules: Any
  jitted: Any
  state: Any  # TrainState of ShapeDtypeStructs with shardings.
  batch: dict[str, jax.ShapeDtypeStruct]


def _encoder_config(config: ml_collections.ConfigDict) -> EncoderConfig:
  """The architecture of `config.model`, without loading weights."""
  from moe_embed.model import config as model_config
  if config.model in model_config.PRESETS:
    return run_config.resolve_encoder(config)[0]
  from moe_embed.io import model_folder
  if not model_folder.has_meta(config.model):
    return run_config.resolve_encoder(config)[0]  # Imported folders: read as the trainer does.
  loaded, _ = model_folder.read_meta(config.model)
  runtime = {k: v for k, v in dict(config.encoder).items() if k in model_config.RUNTIME_FIELDS}
  return loaded.replace(**runtime)


def pack_rows_for_share(config: ml_collections.ConfigDict, batch_shards: int,
                        real_token_share: float) -> int:
  """Rows per packing unit for texts that each fill `real_token_share` of their width.

  The trainer sizes its rows from the data's lengths at start-up (and logs them);
  an ahead-of-time compile has no data, so it packs this uniform length mix the
  way `packing.size_rows` packs a sample. Texts of equal length pack worse than a
  real mix (no short text fills a row's tail), so the rows are, if anything, too many.
  """
  from moe_embed.data import packing
  inputs = run_config.input_config(config)
  units = pipeline.pack_units(config.batch_size, config.grad_cache_chunk, batch_shards)
  width = inputs.pack_length or max(inputs.max_query_len, inputs.max_doc_len)
  per_text = [max(1, round(real_token_share * inputs.max_query_len))] + \
      [max(1, round(real_token_share * inputs.max_doc_len))] * (1 + inputs.num_negatives)
  lengths = np.tile(np.array(per_text, np.int64), (64, 1))
  widths = [inputs.max_query_len] + [inputs.max_doc_len] * (1 + inputs.num_negatives)
  return packing.size_rows([lengths], config.batch_size // units, width, widths=widths)


def build_step(config: ml_collections.ConfigDict, devices: list[Any], pack_rows: int = 0,
               real_token_share: Optional[float] = None) -> Step:
  """The train step of `config` on `devices`, with abstract state and batch (ConfigError).

  With input.packing, `pack_rows` rows per packing unit (the trainer logs its own),
  else rows sized for texts that fill `real_token_share` of their widths, else for
  texts at their full widths: the most rows the trainer can size (as many token
  slots as the padded step), so the memory figure is an upper bound.
  """
  run_config.check_config(config)
  encoder = _encoder_config(config)
  loss_cfg = run_config.loss_config(config, encoder.embedding_dim)
  opt_cfg = run_config.optimizer_config(config)
  inputs = run_config.input_config(config)
  mesh, rules = run_config.mesh_and_rules(config, devices)
  shards = partitioning.batch_shards(mesh, rules)
  run_config.check_batch(config, shards)
  if inputs.packing and pack_rows <= 0:
    pack_rows = pack_rows_for_share(config, shards, real_token_share or 1.0)
  model = EmbeddingModel(encoder)
  optimizer, schedule = optimizer_lib.make_optimizer(opt_cfg, config.total_steps)
  state, shardings = state_lib.abstract_state(model, optimizer, mesh, rules, config.seed,
                                              loss_cfg.temperature)
  jitted, batch_sharding = step_lib.jit_train_step(
      model, optimizer, loss_cfg, schedule, config.grad_cache_chunk, mesh, rules, shardings)
  units = pipeline.pack_units(config.batch_size, config.grad_cache_chunk, shards)
  shapes = pipeline.batch_shapes(inputs, config.batch_size, units, pack_rows)
  batch = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding)
           for k, (shape, dtype) in shapes.items()}
  return Step(encoder, mesh, rules, jitted, state, batch)


def per_chip_bytes(tree: Any) -> int:
  """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the largest shard)."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
    total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
  return total


# --- The report --------------------------------------------------------------


def mfu(model_flops: float, step_s: float, chips: int, peak_flops_per_chip: float) -> float:
  """Model FLOPs utilisation: model FLOPs per step / (step time x chips x peak FLOP/s).

  `model_flops` from `param_count.train_step_flops` (or `forward_flops` for a
  given count of real tokens); recomputation (remat, GradCache) is not counted.
  """
  return model_flops / (step_s * chips * peak_flops_per_chip)


def _model_flops(config: ml_collections.ConfigDict, encoder: EncoderConfig,
                 real_token_share: Optional[float] = None) -> float:
  """Model FLOPs per step: of the padded texts, or (a packed step) of their real tokens
  for texts that fill `real_token_share` of their widths."""
  if real_token_share is None:
    return param_count.train_step_flops(encoder, config.batch_size, config.input.max_query_len,
                                        config.input.max_doc_len, config.input.num_negatives)
  b, n = config.batch_size, config.input.num_negatives
  return float(param_count.real_train_step_flops(
      encoder, np.full(b, real_token_share * config.input.max_query_len, np.float32),
      np.full((b, 1 + n), real_token_share * config.input.max_doc_len, np.float32)))


def _tokens(config: ml_collections.ConfigDict, real_token_share: Optional[float] = None) -> int:
  """Token slots per step: queries, positives and hard negatives at their padded lengths
  (times `real_token_share`: the real tokens a packed step computes)."""
  slots = config.batch_size * (config.input.max_query_len
                               + (1 + config.input.num_negatives) * config.input.max_doc_len)
  return slots if real_token_share is None else round(slots * real_token_share)


def real_token_mfu(config: ml_collections.ConfigDict, result: dict[str, Any],
                   real_token_share: float) -> dict[str, Any]:
  """MFU on real tokens for a length mix: every text `real_token_share` of its width.

  `result` is a `report` of the padded step; the step time is its estimate, the
  FLOPs those of the real tokens only (`param_count.real_train_step_flops`, each
  text attending over its own tokens). The embedded corpus is 38% real at 128/128
  (benchmarks/packing.py). -> {real_token_share, real_model_flops_per_step,
  estimated_real_mfu}; estimated_real_mfu is None without an estimated step time.
  """
  if not 0 < real_token_share <= 1:
    raise run_config.ConfigError(
        f"real_token_share={real_token_share} must be in (0, 1].")
  flops = _model_flops(config, _encoder_config(config), real_token_share)
  topology = parse_topology(result["topology"])
  step_s = result["estimated_step_s"]
  return {"real_token_share": real_token_share, "real_model_flops_per_step": flops,
          "estimated_real_mfu": step_s and mfu(flops, step_s, topology.chips,
                                               topology.chip.peak_bf16_flops),
          "estimated_real_tokens_per_s_per_chip":
              step_s and _tokens(config, real_token_share) / step_s / topology.chips}


def roofline_seconds(cost: dict[str, float], chip: Chip) -> float:
  """Lower bound on a compiled program's time from XLA's cost analysis (each loop
  body once): its FLOPs at the chip's bf16 peak or its HBM bytes at the chip's
  bandwidth, whichever takes longer. 0.0 where the analysis has neither."""
  flops = float(cost.get("flops", 0.0))
  moved = float(cost.get("bytes accessed", 0.0))
  return max(flops / chip.peak_bf16_flops, moved / chip.hbm_bytes_per_s, 0.0)


def report(config: ml_collections.ConfigDict, topology: Topology, step: Step, compiled,
           compile_s: float, lowered_hlo: str = "",
           real_token_share: Optional[float] = None) -> dict[str, Any]:
  """The JSON report of a compiled step (see launch/compile.py for the keys).

  The step time is XLA's TPU cost model (`optimal_seconds`), which counts each
  while-loop body once, times `loop_flop_ratio` of the lowered program, so each
  GradCache chunk counts: a compiler estimate, not a measurement. Where the cost
  model gives no positive time (v4 and v5e often answer -3 s), it is the roofline
  of XLA's own cost analysis instead (`roofline_seconds`), scaled the same way;
  `step_estimate` says which. A packed step's
  model FLOPs and tokens are those of its real tokens, for texts that fill
  `real_token_share` of their widths.
  """
  stats = compiled.memory_analysis()
  params = per_chip_bytes(step.state)
  total = (stats.argument_size_in_bytes + stats.output_size_in_bytes
           + stats.temp_size_in_bytes - stats.alias_size_in_bytes)
  cost = compiled.cost_analysis()
  cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
  # XLA's cost model for the compiled program, else the roofline of its cost analysis.
  xla_s = float(cost.get("optimal_seconds", 0.0))
  roofline_s = roofline_seconds(cost, topology.chip)
  ratio = loop_flop_ratio(lowered_hlo) if lowered_hlo else 1.0
  if xla_s > 0:
    source, body_s = "xla_cost_model", xla_s
  elif roofline_s > 0:
    source, body_s = "roofline", roofline_s
  else:
    source, body_s = None, 0.0
  step_s = body_s * ratio if body_s else None
  packed = "packed_ids" in step.batch
  share = real_token_share if packed else None
  flops, tokens = _model_flops(config, step.encoder, share), _tokens(config, share)
  hbm = topology.chip.hbm_bytes
  return {
      "topology": topology.name,
      "libtpu_topology": topology.libtpu_name,
      "chips": topology.chips,
      "hbm_bytes_per_chip": hbm,
      "fits": bool(total <= hbm),
      "memory_bytes_per_chip": {
          "params_and_optimizer": params,
          "temporaries": int(stats.temp_size_in_bytes),
          "total": int(total),
      },
      "model_flops_per_step": flops,
      "estimated_step_s": step_s,
      "estimated_mfu": step_s and mfu(flops, step_s, topology.chips,
                                      topology.chip.peak_bf16_flops),
      "step_estimate": source,  # 'xla_cost_model', 'roofline' or None.
      "xla_optimal_seconds": xla_s,  # Each loop body once; negative: XLA cannot time it.
      "roofline_seconds": roofline_s,  # Each loop body once, from XLA's flops and bytes.
      "loop_flop_ratio": ratio,
      "tokens_per_step": tokens,
      "estimated_tokens_per_s_per_chip": step_s and tokens / step_s / topology.chips,
      "collective_bytes": collective_bytes(compiled.as_text()),
      "compile_s": compile_s,
      "grad_cache_chunk": int(config.grad_cache_chunk),
      "remat": bool(config.encoder.remat),
      "packed_rows": int(step.batch["packed_ids"].shape[0]) if packed else 0,
  }


_SIZE = r"([0-9.]+)([KMGT]?)i?B?"
_UNITS = {"": 1, "K": 1024, "M": 1024 ** 2, "G": GiB, "T": 1024 ** 4}


def _oom_bytes(message: str) -> Optional[tuple[str, int]]:
  """('temporaries' or 'total', bytes) from XLA's out-of-HBM compile error, else None."""
  if m := re.search(r"required for HLO temporaries \(" + _SIZE + r"\)", message):
    return "temporaries", int(float(m.group(1)) * _UNITS[m.group(2)])
  if m := re.search(r"Used " + _SIZE + r" of " + _SIZE + r" hbm", message):
    return "total", int(float(m.group(1)) * _UNITS[m.group(2)])
  return None


def _oom_report(config, topology: Topology, step: Step, message: str, compile_s: float):
  """The report of a step XLA refused to compile for lack of HBM: its memory figure only."""
  kind, value = _oom_bytes(message)
  params = per_chip_bytes(step.state)
  arguments = params + per_chip_bytes(step.batch)
  result = {
      "topology": topology.name, "libtpu_topology": topology.libtpu_name,
      "chips": topology.chips, "hbm_bytes_per_chip": topology.chip.hbm_bytes, "fits": False,
      "memory_bytes_per_chip": {
          "params_and_optimizer": params,
          "temporaries": value if kind == "temporaries" else value - arguments,
          "total": value + arguments if kind == "temporaries" else value},
      "model_flops_per_step": _model_flops(config, step.encoder),
      "estimated_step_s": None, "estimated_mfu": None, "step_estimate": None,
      "tokens_per_step": _tokens(config), "estimated_tokens_per_s_per_chip": None,
      "collective_bytes": None, "compile_s": compile_s,
      "grad_cache_chunk": int(config.grad_cache_chunk), "remat": bool(config.encoder.remat),
      "compiler_error": " ".join(message.split())[:500],
  }
  return result


def lower_step(config: ml_collections.ConfigDict, topology: Topology,
               devices: Optional[list[Any]] = None, pack_rows: int = 0,
               real_token_share: Optional[float] = None):
  """(Step, jax Lowered) for `config` on `topology`: the traced program, before XLA."""
  devices = topology_devices(topology) if devices is None else devices
  step = build_step(config, devices, pack_rows, real_token_share)
  with partitioning.activate(step.mesh, step.rules):
    return step, step.jitted.lower(step.state, step.batch)


def compile_step(config: ml_collections.ConfigDict, topology: Topology,
                 devices: Optional[list[Any]] = None, pack_rows: int = 0,
                 real_token_share: Optional[float] = None):
  """(report dict, compiled or None) for `config` on `topology`; ConfigError on a bad config.

  A step XLA refuses for lack of HBM comes back with fits=False, its memory from
  the compiler's message, and no compiled program.
  """
  start = time.perf_counter()
  step, lowered = lower_step(config, topology, devices, pack_rows, real_token_share)
  with partitioning.activate(step.mesh, step.rules):
    try:
      compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
      if "RESOURCE_EXHAUSTED" in str(e) and _oom_bytes(str(e)) is not None:
        return _oom_report(config, topology, step, str(e), time.perf_counter() - start), None
      raise CompileError(
          f"XLA cannot compile the train step for {topology.name}: "
          f"{' '.join(str(e).split())[:600]}") from None
  return report(config, topology, step, compiled, time.perf_counter() - start,
                lowered.compiler_ir("hlo").as_hlo_text(), real_token_share), compiled


def shortfall_line(config: ml_collections.ConfigDict, result: dict[str, Any]) -> str:
  """One line: how far the step is over HBM per chip, and the fields that change it."""
  need = result["memory_bytes_per_chip"]["total"]
  hbm = result["hbm_bytes_per_chip"]
  return (f"The train step needs {need / GiB:.1f} GiB per chip on {result['topology']}, "
          f"{(need - hbm) / GiB:.1f} GiB more than its {hbm / GiB:.0f} GiB HBM; lower "
          f"grad_cache_chunk (now {config.grad_cache_chunk}; 0 = off), set encoder.remat=true "
          f"(now {str(bool(config.encoder.remat)).lower()}), or lower batch_size "
          f"({config.batch_size}), input.num_negatives ({config.input.num_negatives}) or "
          f"input.max_doc_len ({config.input.max_doc_len}); --fit finds the fastest setting that fits.")


# --- Collectives in the compiled HLO ------------------------------------------

_DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2,
                "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8,
                "f64": 8, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b([a-z]+[0-9]*(?:e[0-9]m[0-9][a-z]*)?)\[([0-9,]*)\]")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s+([a-z][a-z0-9\-]*)\((.*)$")


def _shape_bytes(text: str) -> int:
  """Bytes of the arrays in an HLO result shape ('bf16[8,128]{1,0}' or a tuple of them)."""
  total = 0.0
  for dtype, dims in _ARRAY.findall(text):
    size = _DTYPE_BYTES.get(dtype, 1 if dtype.startswith("f8") else None)
    if size is None:
      continue
    total += size * math.prod(int(d) for d in dims.split(",") if d)
  return int(total)


def _loop_weighted(hlo_text: str, measure) -> tuple[collections.Counter, collections.Counter]:
  """(per step, each loop body once) sums of `measure` over the instructions of HLO text.

  `measure(opcode, shape, rest, shapes)` -> iterable of (kind, value) for one
  instruction; `shapes` maps the names seen so far to their result shapes. An
  instruction inside a while loop counts once per iteration: the trip count is
  XLA's known_trip_count, else the bound of the loop condition's `i < N` (the
  form lax.scan / lax.map lower to).
  """
  per_computation: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
  calls: dict[str, list[tuple[str, Any]]] = collections.defaultdict(list)
  bounds: dict[str, list[int]] = collections.defaultdict(list)  # s32 scalar constants.
  shapes: dict[str, str] = {}  # Instruction name -> its result shape.
  entry, current = None, None
  for line in hlo_text.splitlines():
    if (m := _COMPUTATION.match(line)) and "=" not in line.split("{")[0].split("(")[0]:
      current = m.group(1)
      if line.startswith("ENTRY"):
        entry = current
      continue
    m = _INSTRUCTION.match(line)
    if current is None or m is None:
      continue
    name, shape, opcode, rest = m.groups()
    shapes[name] = shape
    if opcode == "constant" and re.match(r"\s*[su]32\[\][^ ]*\s*$", shape + " ") \
        and (v := re.match(r"(\d+)\)", rest)):
      bounds[current].append(int(v.group(1)))
    for kind, value in measure(opcode, shape, rest, shapes):
      per_computation[current][kind] += value
    trips: Any = 1
    if opcode == "while":
      t = re.search(r'"known_trip_count":\{"n":"(\d+)"', rest)
      cond = re.search(r"\bcondition=%?([\w.\-]+)", rest)
      trips = int(t.group(1)) if t else ("bound", cond.group(1) if cond else None)
    for attr, names in re.findall(
        r"\b(body|condition|calls|to_apply|branch_computations)=(\{[^}]*\}|%?[\w.\-]+)", rest):
      for callee in re.findall(r"%?([\w.\-]+)", names):
        calls[current].append((callee, trips if attr == "body" else 1))

  def loop_trips(trips) -> int:
    if isinstance(trips, int):
      return trips
    found = bounds.get(trips[1] or "", [])
    return max(found) if len(found) == 1 else 1

  def visit(name: str, times: int, totals: collections.Counter, looped: bool, depth: int = 0):
    if depth > 64:
      return
    for kind, count in per_computation.get(name, {}).items():
      totals[kind] += count * times
    for callee, trips in calls.get(name, ()):
      visit(callee, times * (loop_trips(trips) if looped else 1), totals, looped, depth + 1)

  per_step, once = collections.Counter(), collections.Counter()
  if entry is not None:
    visit(entry, 1, per_step, True)
    visit(entry, 1, once, False)
  return per_step, once


_OPERAND = re.compile(r"\s*((?:[a-z0-9]+\[[0-9,]*\](?:\{[^}]*\})?\s+)?)%?([\w.\-]+)")


def _first_operand_shape(rest: str, shapes: dict[str, str]) -> str:
  """The shape of an instruction's first operand, written '[shape ]%name' or 'name'."""
  m = _OPERAND.match(rest)
  if m is None:
    return ""
  inline = _ARRAY.search(m.group(1))
  return inline.group(0) if inline else shapes.get(m.group(2), "")


def _collectives(opcode: str, shape: str, rest: str, shapes: dict[str, str]):
  kind = opcode.removesuffix("-done")
  if kind not in COLLECTIVES or opcode.endswith("-start"):
    return ()
  if kind == "ragged-all-to-all":
    sent = _first_operand_shape(rest, shapes)
    return ((kind, min(_shape_bytes(sent), _shape_bytes(shape))),)
  return ((kind, _shape_bytes(shape)),)


def collective_bytes(hlo_text: str) -> dict[str, int]:
  """Kind -> bytes per step of that collective on one device, from the compiled HLO text.

  Asynchronous pairs count once (at '-done', whose result is the collective's). A
  ragged-all-to-all counts the smaller of its send and receive buffers: the
  receive buffer of the dispatch is sized for every device sending all its rows
  here, the send buffer of the return is that buffer, while each moves one
  device's M assignments when every token is real. An op inside a while loop
  counts once per iteration (`_loop_weighted`), so a GradCache loop's
  collectives count per chunk.
  """
  totals, _ = _loop_weighted(hlo_text, _collectives)
  return {kind: int(totals.get(kind, 0)) for kind in COLLECTIVES}


def _dims(shape: str) -> list[int]:
  m = _ARRAY.search(shape)
  return [int(d) for d in m.group(2).split(",") if d] if m else []


def _dot_flops(opcode: str, shape: str, rest: str, shapes: dict[str, str]):
  """2 x result elements x contracted size, for dot and ragged-dot."""
  if opcode not in ("dot", "ragged-dot"):
    return ()
  lhs = _first_operand_shape(rest, shapes)
  contracting = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", rest)
  dims = _dims(lhs)
  if not dims or contracting is None:
    return ()
  k = math.prod(dims[int(i)] for i in contracting.group(1).split(",") if i)
  return (("flops", 2 * math.prod(_dims(shape)) * k),)


def loop_flop_ratio(hlo_text: str) -> float:
  """Dot FLOPs per step over dot FLOPs with each while-loop body counted once.

  XLA's cost analysis counts a loop body once; scaling its time by this ratio
  counts each GradCache chunk (and each block of a blocked ragged_dot). 1.0
  for a program without loops or without dots.
  """
  per_step, once = _loop_weighted(hlo_text, _dot_flops)
  return per_step["flops"] / once["flops"] if once["flops"] else 1.0


# --- Finding a change that fits ----------------------------------------------


def _chunks(config: ml_collections.ConfigDict, shards: int) -> list[int]:
  """GradCache settings valid for the config, largest first: 0 (no GradCache, the whole
  batch at once), then each chunk below the batch that divides it and is a multiple of
  the batch shards."""
  b = config.batch_size
  return [0] + [c for c in range(b - 1, 0, -1) if b % c == 0 and c % shards == 0]


def _with(config: ml_collections.ConfigDict, chunk: int, remat: bool):
  c = ml_collections.ConfigDict(config.to_dict())
  c.grad_cache_chunk = chunk
  c.encoder.remat = remat
  return c


def overrides(config: ml_collections.ConfigDict, base: ml_collections.ConfigDict) -> list[str]:
  """The `--config.` flags that turn `base` into `config` (GradCache chunk, remat)."""
  out = []
  if config.grad_cache_chunk != base.grad_cache_chunk:
    out.append(f"--config.grad_cache_chunk={config.grad_cache_chunk}")
  if bool(config.encoder.remat) != bool(base.encoder.remat):
    out.append(f"--config.encoder.remat={str(bool(config.encoder.remat)).lower()}")
  return out


def _step_s(result: dict[str, Any]) -> float:
  """The estimated step time of a report; infinite where there is none."""
  return result.get("estimated_step_s") or math.inf


def fit(config: ml_collections.ConfigDict, topology: Topology, first: dict[str, Any],
        devices: list[Any], log=print, real_token_share: Optional[float] = None,
        pack_rows: int = 0):
  """The fastest (config, report) that fits by the step estimate, or None.

  `first` is the report of `config`. Candidates: every GradCache setting (none, then
  chunks from the largest, `_chunks`) with and without remat. Memory falls with the
  chunk, so for each remat setting the search finds the largest chunk that fits
  (starting at the chunk its memory predicts: temporaries in proportion to the rows of
  a chunk, from the step compiled last) and then compiles the next smaller one too,
  since a smaller chunk is rarely faster. Each compiled candidate is logged with its
  memory and estimate; the fastest that fits wins (ties: the first tried).
  """
  shards = partitioning.batch_shards(*run_config.mesh_and_rules(config, devices))
  hbm = topology.chip.hbm_bytes
  tried: dict[tuple[int, bool], dict[str, Any]] = {
      (int(config.grad_cache_chunk), bool(config.encoder.remat)): first}

  def describe(chunk: int, remat: bool, result: dict[str, Any]) -> None:
    mem = result["memory_bytes_per_chip"]["total"]
    step = f"est. {result['estimated_step_s']:.4g} s" if result["estimated_step_s"] \
        else "no estimate"
    log(f"  --config.grad_cache_chunk={chunk} --config.encoder.remat={str(remat).lower()}: "
        f"{mem / GiB:.1f} GiB per chip ({'fits' if result['fits'] else 'does not fit'}), "
        f"{step} (compiled in {result['compile_s']:.0f} s)")

  def attempt(chunk: int, remat: bool) -> dict[str, Any]:
    if (chunk, remat) not in tried:
      result, _ = compile_step(_with(config, chunk, remat), topology, devices, pack_rows,
                               real_token_share)
      tried[(chunk, remat)] = result
      describe(chunk, remat, result)
    return tried[(chunk, remat)]

  describe(int(config.grad_cache_chunk), bool(config.encoder.remat), first)

  def rows_of(chunk: int) -> int:
    return chunk or config.batch_size

  def predicted_start(chunks: list[int], reference: tuple[int, dict[str, Any]]) -> int:
    rows, report_ = reference
    mem = report_["memory_bytes_per_chip"]
    fixed = mem["total"] - mem["temporaries"]
    per_row = mem["temporaries"] / rows
    for i, chunk in enumerate(chunks):
      if fixed + per_row * rows_of(chunk) <= hbm:
        return i
    return len(chunks) - 1

  chunks = _chunks(config, shards)
  reference = (rows_of(int(config.grad_cache_chunk)), first)
  for remat in (bool(config.encoder.remat), not config.encoder.remat):
    same_remat = [(c, r) for (c, r) in tried if r == remat]
    if same_remat:
      c = same_remat[0][0]
      reference = (rows_of(c), tried[(c, remat)])
    i = predicted_start(chunks, reference)
    if attempt(chunks[i], remat)["fits"]:
      while i > 0 and attempt(chunks[i - 1], remat)["fits"]:
        i -= 1
    else:
      while i + 1 < len(chunks) and not attempt(chunks[i + 1], remat)["fits"]:
        i += 1
      i += 1
    if i + 1 < len(chunks):  # The next smaller chunk, in case it is faster.
      attempt(chunks[i + 1], remat)
  fitting = [(k, r) for k, r in tried.items() if r["fits"]]
  if not fitting:
    return None
  (chunk, remat), best = min(fitting, key=lambda item: _step_s(item[1]))
  return _with(config, chunk, remat), best
