"""The operations of a lowered or compiled program, read from its structure, not its text.

`compiled_ops` walks the instructions of XLA's HLO modules (every computation,
fusions included) and counts their opcodes by name ("all-to-all"); `lowered_ops`
walks the StableHLO module and counts its operations, a custom call under its
target ("stablehlo.custom_call @ragged_all_to_all").
"""

import collections
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
