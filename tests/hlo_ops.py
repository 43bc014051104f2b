"""The operations of a lowered or compiled program, read from its structure, not its text.

`compiled_ops` walks the instructions of XLA's HLO modules (every computation,
fusions included) and counts their opcodes by name ("all-to-all"); `lowered_ops`
walks the StableHLO module and counts its operations, a custom call under its
target ("stablehlo.custom_call @ragged_all_to_all"). `compiled_result_bytes` and
`lowered_operand_shapes` read the sizes of chosen instructions and operations.
"""

import collections
import math
import re

from jaxlib.mlir import ir


def compiled_ops(compiled) -> collections.Counter:
  """HLO opcode name ("all-to-all", "ragged-dot", ...) -> instructions of it."""
  counts = collections.Counter()
  for module in compiled.runtime_executable().hlo_modules():
    for computation in module.computations():
      for instruction in computation.instructions():
        counts[_opcode_name(instruction.opcode)] += 1
  return counts


def _opcode_name(opcode) -> str:
  """HloOpcode.kAllToAll -> "all-to-all", the spelling of the HLO text."""
  return re.sub(r"(?<!^)(?=[A-Z])", "-", opcode.name.removeprefix("k")).lower()


def lowered_ops(lowered) -> collections.Counter:
  """StableHLO operation name -> operations of it (custom calls: "... @target")."""
  counts = collections.Counter()

  def visit(op):
    name = op.name
    if name == "stablehlo.custom_call":
      name += " @" + ir.StringAttr(op.attributes["call_target_name"]).value
    counts[name] += 1
    return ir.WalkResult.ADVANCE

  lowered.compiler_ir("stablehlo").operation.walk(visit)
  return counts


_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2,
                "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}
_RESULT = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(\(.*?\)|[a-z0-9]+\[[0-9,]*\])")
_ARRAY = re.compile(r"([a-z0-9]+)\[([0-9,]*)\]")


def compiled_result_bytes(compiled, opcodes) -> list[int]:
  """Result bytes of every instruction whose opcode name is in `opcodes` ("all-gather"),
  asynchronous "-start" halves left out (their "-done" carries the result)."""
  sizes = []
  for module in compiled.runtime_executable().hlo_modules():
    for computation in module.computations():
      for instruction in computation.instructions():
        if _opcode_name(instruction.opcode).removesuffix("-done") not in opcodes:
          continue
        result = _RESULT.match(instruction.to_string())
        if result is None:
          raise ValueError(f"No result shape in {instruction.to_string()[:200]!r}")
        sizes.append(sum(_DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
                         for dtype, dims in _ARRAY.findall(result.group(1))))
  return sizes


def lowered_operand_shapes(lowered, name: str) -> list[tuple[tuple[int, ...], ...]]:
  """The operand shapes of every StableHLO/CHLO operation called `name` ("chlo.ragged_dot").

  Inside `jax.shard_map` these are one device's shapes."""
  found = []

  def visit(op):
    if op.name == name:
      found.append(tuple(tuple(ir.RankedTensorType(v.type).shape) for v in op.operands))
    return ir.WalkResult.ADVANCE

  lowered.compiler_ir("stablehlo").operation.walk(visit)
  return found
