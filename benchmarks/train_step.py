"""The whole train step against dense models: tokens/s and model-FLOPs utilisation.

  python benchmarks/train_step.py --json=/tmp/train_step.json \
    [--preset=minilm] [--batch=8] [--seq=128] [--grad_cache=off,on] [--repeats=3]

What it measures: the jitted train step of `moe_embed.train.step` (both
forward passes, the InfoNCE loss over the global batch, backward, gradient
clipping and AdamW), compiled ahead of time with donated state as the trainer
runs it, for three models of one preset's width (D, F, layers, heads):
  moe           the preset upcycled to an MoE (`model.upcycle`): 8 experts,
                top-2, every 2nd layer, the dropless path with the backend's
                default grouped-matmul kernel;
  dense_active  dense, every MLP of width F * (n_dense + K n_moe) / layers, so
                that its matmul parameters per token equal the MoE's active
                ones (minilm: 2304 = 1.5 x 1536);
  dense_total   dense, MLP width F * (n_dense + E n_moe) / layers, so that its
                parameters equal the MoE's total (minilm: 6912 = 4.5 x 1536);
each without GradCache and with --grad_cache_chunk queries per chunk. A batch
is `batch` queries and `batch` documents of `seq` real tokens each (plus
--negatives hard negatives per query).

The matmul peak is measured in the same process: the best GFLOP/s of square
[n, n] @ [n, n] matmuls in the compute dtype (--peak_sizes). On a machine shared
with other work, absolute times drift, so every round times the peak and then
one step of every configuration in turn (A B C ... A B C ...), and each number
is the median over --repeats rounds; the ratios between configurations are the
robust result.

How to read it: mfu = model FLOPs per step / step time / peak, where model
FLOPs are the matmul FLOPs of forward and backward (3 x forward: the QKV, output
and MLP or top-k expert projections, the attention scores and values, the
router and the loss logits); GradCache's extra forward pass is not counted, so
its mfu shows what the recomputation costs. ratio is step_ms / the
dense_active step_ms with the same GradCache setting.
"""

from __future__ import annotations

import os
import sys

from absl import app
from absl import flags
import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import report  # noqa: E402  (benchmarks/report.py)
from step_setup import (MODELS, Runner, build_step, make_batch, model_configs,  # noqa: E402
                        model_params, param_counts, step_model_flops, step_tokens)
from timing import interleaved, measure_peak, memory_gb, peak_runner  # noqa: E402

_JSON = flags.DEFINE_string("json", None, "Write the rows as a JSON list to this file.")
_PRESET = flags.DEFINE_string("preset", "minilm", "Model preset that gives the width.")
_BATCH = flags.DEFINE_integer("batch", 8, "Queries per global batch (as many documents).")
_SEQ = flags.DEFINE_integer("seq", 128, "Tokens per query and per document.")
_NEGATIVES = flags.DEFINE_integer("negatives", 0, "Hard negatives per query.")
_GRAD_CACHE = flags.DEFINE_list("grad_cache", ["off", "on"], "GradCache settings to time.")
_CHUNK = flags.DEFINE_integer("grad_cache_chunk", 0,
                              "Queries per GradCache chunk; 0 = a quarter of --batch.")
_MODELS = flags.DEFINE_list("models", list(MODELS), "Models to time.")
_DTYPE = flags.DEFINE_string("dtype", "float32", "Compute dtype (float32 or bfloat16).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed rounds (median).")
_PEAK_SIZES = flags.DEFINE_list("peak_sizes", ["1024", "2048"],
                                "Square matmul sizes for the peak; the best counts.")
_VOCAB = flags.DEFINE_integer("vocab", 0, "Vocabulary size; 0 keeps the preset's.")
_LAYERS = flags.DEFINE_integer("layers", 0, "Encoder layers; 0 keeps the preset's.")


def main(argv):
  del argv
  unknown = sorted(set(_MODELS.value) - set(MODELS))
  if unknown:
    raise app.UsageError(f"Unknown --models {unknown}; choose from {MODELS}.")
  overrides = {}
  if _VOCAB.value:
    overrides["vocab_size"] = _VOCAB.value
  if _LAYERS.value:
    overrides["num_layers"] = _LAYERS.value
  configs = model_configs(_PRESET.value, _DTYPE.value, **overrides)
  b, seq, negatives = _BATCH.value, _SEQ.value, _NEGATIVES.value
  chunk = _CHUNK.value or max(b // 4, 1)
  device = jax.devices()[0]
  print(f"jax {jax.__version__}, backend {jax.default_backend()} ({device.device_kind}, "
        f"{jax.device_count()} device(s)), {_DTYPE.value}; preset {_PRESET.value}: batch {b} "
        f"queries + {b * (1 + negatives)} documents x {seq} tokens; GradCache chunk {chunk}; "
        f"median of {_REPEATS.value} interleaved rounds; every token is real (no padding: "
        "real data pads, see benchmarks/packing.py)")

  runs, info = {}, {}
  for name in _MODELS.value:
    config = configs[name]
    params = model_params(name, configs)
    batch = make_batch(config, b, seq, negatives)
    total, active = param_counts(config)
    for gc in _GRAD_CACHE.value:
      compiled, state, data, compile_s = build_step(config, params, batch,
                                                    chunk if gc == "on" else 0)
      runs[(name, gc)] = Runner(compiled, state, data)
      info[(name, gc)] = dict(compile_s=compile_s, gb=memory_gb(compiled), total=total,
                              active=active, tokens=step_tokens(batch),
                              flops=step_model_flops(config, b, seq, negatives))
      print(f"  compiled {name:12s} grad_cache={gc:3s} in {compile_s:5.1f} s "
            f"({info[(name, gc)]['gb']:.2f} GB; {total / 1e6:.1f}M params, "
            f"{active / 1e6:.1f}M active)", flush=True)
    del params

  peaks = [peak_runner(int(n), _DTYPE.value) for n in _PEAK_SIZES.value]
  peak_values = []

  def after_round(r, times):
    peak_values.append(measure_peak(peaks))
    print(f"  round {r + 1}: peak {peak_values[-1]:.0f} GFLOP/s; " + ", ".join(
        f"{name}/{gc} {times[(name, gc)][-1] * 1e3:.0f} ms" for name, gc in runs), flush=True)

  first, times, _ = interleaved(runs, _REPEATS.value, after_round)
  print("  warm-up calls (before round 1): " + ", ".join(
      f"{name}/{gc} {s * 1e3:.0f} ms" for (name, gc), s in first.items()), flush=True)
  peak = float(np.median(peak_values))
  print(f"matmul peak: {peak:.1f} GFLOP/s ({_DTYPE.value}, median of rounds: "
        f"{', '.join(f'{p:.0f}' for p in peak_values)})")

  header = (f"{'model':>12s} {'batch':>5s} {'seq':>4s} {'gc':>3s} {'step_ms':>9s} "
            f"{'tokens/s':>9s} {'mfu':>6s} {'ratio':>6s} {'GB':>6s}")
  print(header)
  print("-" * len(header))
  rows = []
  for (name, gc), values in times.items():
    ms = float(np.median(values)) * 1e3
    meta = info[(name, gc)]
    base = times.get(("dense_active", gc))
    ratio = ms / (float(np.median(base)) * 1e3) if base else float("nan")
    mfu = meta["flops"] / (ms / 1e3) / (peak * 1e9)
    row = {"model": name, "batch": b, "seq": seq, "grad_cache": gc == "on",
           "step_ms": round(ms, 1), "tokens_per_s": round(meta["tokens"] / (ms / 1e3), 1),
           "mfu": round(mfu, 4), "peak_gflops": round(peak, 1),
           "ratio_vs_dense_active": round(ratio, 3), "grad_cache_chunk": chunk if gc == "on"
           else 0, "negatives": negatives, "dtype": _DTYPE.value, "preset": _PRESET.value,
           "params_total": meta["total"], "params_active": meta["active"],
           "model_gflop_per_step": round(meta["flops"] / 1e9, 2),
           "memory_gb": round(meta["gb"], 3), "step_ms_runs": [round(t * 1e3, 1) for t in values]}
    rows.append(row)
    print(f"{name:>12s} {b:5d} {seq:4d} {gc:>3s} {ms:9.1f} {row['tokens_per_s']:9.0f} "
          f"{mfu:6.1%} {ratio:6.2f} {meta['gb']:6.2f}")
  _report_targets(rows)
  report.write_json(_JSON.value, rows)


def _report_targets(rows: list[dict]) -> None:
  """Prints the issue's CPU targets against this run's numbers (nothing is asserted)."""
  by = {(r["model"], r["grad_cache"]): r for r in rows}
  for gc in (False, True):
    moe, active, total = (by.get((m, gc)) for m in MODELS)
    if moe and active:
      print(f"grad_cache={'on' if gc else 'off'}: moe / dense_active = "
            f"{moe['step_ms'] / active['step_ms']:.2f} (target <= 1.35)", end="")
      if total:
        print(f"; moe / dense_total = {moe['step_ms'] / total['step_ms']:.2f} (target < 1)",
              end="")
      print()
  plain = [r for r in rows if not r["grad_cache"]]
  if plain:
    print("mfu without GradCache: " + ", ".join(f"{r['model']} {r['mfu']:.1%}" for r in plain)
          + " (target for moe >= 30% of the measured peak)")


if __name__ == "__main__":
  app.run(main)
