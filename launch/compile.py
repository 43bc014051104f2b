"""Compiles the train step of a config for a TPU slice ahead of time, on this machine.

  python launch/compile.py --config=configs/finetune.py:nomic_v2_moe --topology=v5p-8
  python launch/compile.py --config=configs/pretrain.py:nomic_v2_moe --topology=v5p-64 \
      --json=/tmp/pt_v5p64.json
  python launch/compile.py --config=configs/finetune.py:nomic_v2_moe --topology=v4-32 --fit

The step is exactly the one `launch/train.py` runs for the same --config and
--config.* flags (mesh and rules, GradCache chunk, remat, dtype, expert exchange,
hard negatives, batch shapes), compiled by libtpu (the [tpu] extra) for the
chips of --topology from abstract state: no weights, no data, no TPU needed.
--topology takes Cloud TPU accelerator types (v5p-8, v5p-64, v4-32, v6e-8,
v5litepod-16, ...: TensorCores for v4/v5p, chips for v5e/v6e) or libtpu
topology strings (v5p:2x2x1, v6e:2x4).

It prints, and with --json writes: per-chip memory (parameters and optimizer
state, temporaries, total) against the chip's HBM; the model FLOPs per step;
XLA's estimated step time and the MFU it implies (the compiler's cost model,
not a measurement); the bytes per step each collective moves per chip; the
compile time. JSON keys: topology, chips, hbm_bytes_per_chip, fits,
memory_bytes_per_chip {params_and_optimizer, temporaries, total},
model_flops_per_step, estimated_step_s, estimated_mfu, collective_bytes
{kind: bytes}, compile_s (and libtpu_topology, tokens_per_step,
estimated_tokens_per_s_per_chip, grad_cache_chunk, remat). --real_token_share=S adds
MFU on real tokens for texts that fill S of their width (`aot.real_token_mfu`):
real_token_share, real_model_flops_per_step, estimated_real_mfu,
estimated_real_tokens_per_s_per_chip. With --config.input.packing=true the packed step
is compiled: its rows per packing unit are --pack_rows (what the trainer logs at
start-up for its data) or, without it, sized for texts that each fill
--real_token_share of their widths, or without that for texts at their full widths
(the most rows the trainer can size: an upper bound on memory); its model FLOPs and tokens are those of the real
tokens, and packed_rows gives its rows per step. estimated_step_s is XLA's TPU cost
model (xla_optimal_seconds, which counts each while-loop body once) times
loop_flop_ratio (dot FLOPs per step over those with each loop body once). Where
the cost model gives no positive time (v4 and v5e often do not), it is instead the
roofline of XLA's cost analysis (roofline_seconds: its FLOPs at the chip's bf16
peak or its bytes accessed at the chip's HBM bandwidth, whichever is longer),
times the same ratio; step_estimate names the source ('xla_cost_model',
'roofline'). Where both exist, the roofline came to 0.85x (v5p) and 1.0x (v6e)
XLA's time for the tiny step, and 0.69x for the pretrain recipe on v5p-64: it
leaves out collectives, so it is the optimistic one.

Exit codes: 0 the step fits; 1 it does not (one line on stderr: the per-chip
shortfall and the fields that change it), or a bad config or topology. With
--fit, the step is compiled again with other GradCache chunks (none included)
with and without remat, each candidate printed with its memory and estimate,
and the fastest that fits by the estimate is printed as --config. overrides
("Fits with: ...", exit 0; its report is the one --json writes), or exit 1 if
none fits.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The compile needs no local accelerator: keep jax on the CPU (a TPU VM's chips stay
# free for a running job) and let libtpu describe the slice beside a process that
# holds the chips.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from moe_embed import cli  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config file, as for launch/train.py.", lock_config=True)
_TOPOLOGY = flags.DEFINE_string(
    "topology", None, "TPU accelerator type (v5p-8, v6e-8, ...) or libtpu topology (v5p:2x2x1).")
_JSON = flags.DEFINE_string("json", None, "Also write the report to this JSON file.")
_FIT = flags.DEFINE_bool(
    "fit", False, "Compile other GradCache chunks (none included) with and without remat and "
    "print the fastest that fits, by the step estimate, as --config. overrides.")
_REAL_SHARE = flags.DEFINE_float(
    "real_token_share", 0.0, "Also report MFU on real tokens for this share of real tokens "
    "per padded text (0.38: the embedded corpus at 128/128, benchmarks/packing.py), and with "
    "input.packing the length mix its rows are sized for; 0 = not.")
_PACK_ROWS = flags.DEFINE_integer(
    "pack_rows", 0, "With input.packing: rows per packing unit, as the trainer logs them for "
    "its data (with input.pack_shapes > 1, the largest: the memory bound); 0 = sized for "
    "--real_token_share (or, without it, for texts at full width).")
flags.mark_flags_as_required(["config", "topology"])

GiB = 1024 ** 3


def _print_report(result: dict) -> None:
  mem = result["memory_bytes_per_chip"]
  if result.get("compiler_error"):
    print(f"{result['topology']} ({result['libtpu_topology']}, {result['chips']} chips), "
          f"grad_cache_chunk={result['grad_cache_chunk']}, remat={str(result['remat']).lower()}: "
          f"XLA refused the step in {result['compile_s']:.0f} s: {result['compiler_error']}")
    return
  hbm = result["hbm_bytes_per_chip"]
  print(f"{result['topology']} ({result['libtpu_topology']}, {result['chips']} chips), "
        f"grad_cache_chunk={result['grad_cache_chunk']}, remat={str(result['remat']).lower()}: "
        f"compiled in {result['compile_s']:.0f} s")
  print(f"  memory per chip: {mem['total'] / GiB:.2f} GiB of {hbm / GiB:.0f} GiB HBM "
        f"({'fits' if result['fits'] else 'DOES NOT FIT'}): parameters + optimizer "
        f"{mem['params_and_optimizer'] / GiB:.2f} GiB, temporaries {mem['temporaries'] / GiB:.2f} GiB")
  estimate = "none given"
  if result["estimated_step_s"]:
    estimate = (f"{result['estimated_step_s']:.3f} s per step, MFU "
                f"{result['estimated_mfu']:.1%}, "
                f"{result['estimated_tokens_per_s_per_chip']:,.0f} tokens/s/chip")
  source = {"roofline": "roofline of XLA's cost analysis, its cost model giving no time"}.get(
      result.get("step_estimate"), "XLA cost model")
  print(f"  model FLOPs per step: {result['model_flops_per_step']:.4g}; compiler's estimate "
        f"({source}; not a measurement): {estimate}")
  if "real_token_share" in result:
    real = result["estimated_real_mfu"]
    print(f"  real tokens {result['real_token_share']:.0%} of each text's width: "
          f"{result['real_model_flops_per_step']:.4g} model FLOPs of real tokens per step"
          + (f", MFU on real tokens {real:.1%}, "
             f"{result['estimated_real_tokens_per_s_per_chip']:,.0f} real tokens/s/chip"
             if real else ""))
  if result.get("packed_rows"):
    print(f"  packed: {result['packed_rows']} rows per step")
  moved = ", ".join(f"{k} {v / 1e9:.3g} GB" for k, v in result["collective_bytes"].items())
  print(f"  collectives per step per chip: {moved}")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from moe_embed.train import aot
  from moe_embed.train.config import ConfigError
  config = _CONFIG.value
  if _JSON.value:
    cli.check_output_file(_JSON.value)
  try:
    topology = aot.parse_topology(_TOPOLOGY.value)
    devices = aot.topology_devices(topology)
    result, _ = aot.compile_step(config, topology, devices, _PACK_ROWS.value,
                                 _REAL_SHARE.value or None)
  except aot.TopologyError as e:
    print(f"Topology error: {cli.one_line(e)}", file=sys.stderr)
    sys.exit(1)
  except ConfigError as e:
    print(f"Config error: {cli.one_line(e)}", file=sys.stderr)
    sys.exit(1)
  except aot.CompileError as e:
    print(f"Error: {cli.one_line(e)}", file=sys.stderr)
    sys.exit(1)
  if _REAL_SHARE.value:
    try:
      result.update(aot.real_token_mfu(config, result, _REAL_SHARE.value))
    except ConfigError as e:
      print(f"Config error: {cli.one_line(e)}", file=sys.stderr)
      sys.exit(1)
  _print_report(result)
  final = result
  if _FIT.value:
    print("Searching for the fastest GradCache chunk and remat that fit (each candidate: "
          "memory per chip, the compiler's step estimate):", flush=True)
    try:
      found = aot.fit(config, topology, result, devices,
                      log=lambda line: print(line, flush=True),
                      real_token_share=_REAL_SHARE.value or None, pack_rows=_PACK_ROWS.value)
    except aot.CompileError as e:
      print(f"Error: {cli.one_line(e)}", file=sys.stderr)
      sys.exit(1)
    if found is not None:
      fitted, final = found
      if final is not result and "real_token_share" in result:
        final.update(aot.real_token_mfu(fitted, final, _REAL_SHARE.value))
      print("Fits with: " + (" ".join(aot.overrides(fitted, config)) or "the config as it is"))
      _print_report(final)
  if _JSON.value:
    with cli.atomic_path(_JSON.value) as tmp, open(tmp, "w") as f:
      json.dump(final, f, indent=2)
  if not final["fits"]:
    print(f"Error: {aot.shortfall_line(config, result)}"
          + (" No GradCache chunk or remat setting fits." if _FIT.value else ""),
          file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  sys.argv = cli.resolve_config_path(sys.argv)
  cli.run(main)
