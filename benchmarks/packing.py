"""Padding-free training: real tokens per second of the whole train step, packed vs padded.

  python benchmarks/packing.py --json=/tmp/packing.json [--batch=32] [--repeats=3] \
    [--models=tiny,tiny_moe,minilm,minilm_moe] [--widths=128/128,32/96]

What it measures: the jitted train step (`step_setup.build_step`, as the trainer
runs it) on the embedded stdlib corpus, tokenised by its own tokenizer with the
default prompts, for each model and each pair of query / document widths, once
with the texts padded to the widths and once packed (`input.packing`, rows of
the longer width, as many rows as the iterator sizes from the data at start-up).
A step's time is fixed by its shapes, so each mode times the first batch of each
shape among --share_batches batches from the same data position, and counts the
real tokens its steps average over those batches: with --balance_steps
(input.pack_balance_steps) the packed steps deal each block of that many batches
of a source among themselves, so their batches hold other texts than the padded
ones, the same texts over whole blocks. With --pack_shapes (input.pack_shapes)
the packed steps of different sources have different rows; the packed step time
is the mean of each shape's time weighted by its steps in the sample.
Models: `tiny` and `minilm` dense, and each with MoE layers (`tiny_moe` is the
tiny preset: 8 experts, top-2, every 2nd layer; `minilm_moe` upcycles minilm the
same way).

Every round times each (model, widths) padded then packed, round after round in
one process, so the ratios are robust on a shared machine; each number is the
median over --repeats rounds. real_tokens_per_s counts only real tokens (no
padding, no packing slack), averaged per step as above; real_token_share is real
tokens / token slots the step computes, over the same batches; mfu is the model FLOPs of
the real tokens (`param_count.real_train_step_flops`: each text attends over
its own tokens) per second over the matmul peak measured in the same rounds.

JSON rows: {model, widths, mode, real_tokens_per_s, step_ms, real_token_share,
mfu, batch, rows, pack_length, balance_steps, pack_shapes, step_ms_runs}; mode is
'padded' or 'packed'; packed rows add step_ms_by_rows and steps_by_rows (rows ->
median step ms, steps of the sample); rows is the most rows a step has.

Before the timings it prints, for each width pair and each --layouts entry QxU
(Q queries per packing unit, U units of a GradCache chunk on one process: its
devices), the rows `packing.size_rows` gives with and without balancing the U
units (input.pack_balance) and the real-token share they imply on this corpus:
the fill a pod slice's step would get (v5p-64 pretraining: 16 queries per unit,
4 chips per host). This step runs on one device, so its own units are not
balanced.
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
from step_setup import Runner, build_step, model_configs, model_params  # noqa: E402
from timing import interleaved, measure_peak, peak_runner  # noqa: E402

from moe_embed import data as data_lib  # noqa: E402
from moe_embed.model import param_count  # noqa: E402
from moe_embed.tokenizers import load_tokenizer  # noqa: E402
from moe_embed.train import step as step_lib  # noqa: E402

MODELS = ("tiny", "tiny_moe", "minilm", "minilm_moe")

_JSON = flags.DEFINE_string("json", None, "Write the rows as a JSON list to this file.")
_BATCH = flags.DEFINE_integer("batch", 32, "Queries per global batch (as many documents).")
_MODELS = flags.DEFINE_list("models", list(MODELS), "Models to time.")
_WIDTHS = flags.DEFINE_list("widths", ["128/128", "32/96"],
                            "Query/document widths: 128/128 pretrain, 32/96 tiny.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed rounds (median).")
_SHARE_BATCHES = flags.DEFINE_integer(
    "share_batches", 64, "Batches whose real tokens per step and share are averaged.")
_BALANCE_STEPS = flags.DEFINE_integer(
    "balance_steps", 8, "input.pack_balance_steps of the packed batches (the configs' "
    "value; 1 = each step packs its own examples).")
_PACK_SHAPES = flags.DEFINE_integer(
    "pack_shapes", 3, "input.pack_shapes of the packed batches (the configs' value): "
    "distinct rows per step, by source; each is compiled and timed, and the packed step "
    "time is their mean weighted by how many of the --share_batches batches have each.")
_PEAK_SIZES = flags.DEFINE_list("peak_sizes", ["1024"], "Square matmul sizes for the peak.")
_LAYOUTS = flags.DEFINE_list("layouts", ["16x4", "16x8", "32x4", "64x4"],
                             "QxU: queries per packing unit x units balanced together.")


def _config(name: str):
  base = "tiny" if name.startswith("tiny") else "minilm"
  configs = model_configs(base, "float32", vocab_size=4096)
  if name.endswith("_moe"):
    return "moe", configs
  configs["dense"] = configs["moe"].replace(moe_every_n_layers=0)
  return "dense", configs


def _iterators(data_dir: str, tokenizer, widths: str, batch: int, balance_steps: int,
               pack_shapes: int):
  lq, ld = (int(w) for w in widths.split("/"))
  out = {}
  for mode in ("padded", "packed"):
    packed = mode == "packed"
    inputs = data_lib.InputConfig(max_query_len=lq, max_doc_len=ld, packing=packed,
                                  pack_balance_steps=balance_steps if packed else 1,
                                  pack_shapes=pack_shapes if packed else 1)
    out[mode] = data_lib.make_train_iterator(data_dir, inputs=inputs, tokenizer=tokenizer,
                                             global_batch_size=batch, seed=0, prefetch=0)
  return out


def _rows(batch) -> int:
  """Rows of a packed batch (its shape: one compile each), 0 for a padded one."""
  return int(batch["packed_ids"].shape[0]) if "packed_ids" in batch else 0


def _real_per_step(batches) -> tuple[float, float]:
  """(real tokens per step, real tokens / token slots) averaged over `batches`."""
  real = slots = 0
  for b in batches:
    r, s = step_lib.token_counts(b)
    real, slots = real + int(r), slots + int(s)
  return real / len(batches), real / slots


def _fill_by_layout(lengths: np.ndarray, widths: str, layouts: list[str]) -> None:
  """Rows per unit and real-token share for each QxU layout, units balanced or not."""
  from moe_embed.data import packing
  lq, ld = (int(w) for w in widths.split("/"))
  pack_length = max(lq, ld)
  per_example = lengths.sum(1).mean()
  for layout in layouts:
    q, u = (int(x) for x in layout.split("x"))
    rows = {g: packing.size_rows([lengths], q, pack_length, widths=[lq, ld], balanced_units=g)
            for g in (1, u)}
    share = {g: q * per_example / (r * pack_length) for g, r in rows.items()}
    print(f"  {widths} {q} queries per unit: {rows[1]} rows (share {share[1]:.3f}) as drawn, "
          f"{rows[u]} rows (share {share[u]:.3f}) with {u} units balanced", flush=True)


def main(argv):
  del argv
  unknown = sorted(set(_MODELS.value) - set(MODELS))
  if unknown:
    raise app.UsageError(f"Unknown --models {unknown}; choose from {MODELS}.")
  data_dir = data_lib.ensure_default_data()
  tokenizer = load_tokenizer(data_lib.dataset_tokenizer_path(data_dir))
  b = _BATCH.value
  print(f"jax {jax.__version__}, backend {jax.default_backend()}, 1 device, float32; "
        f"embedded corpus, batch {b} queries + {b} documents; median of {_REPEATS.value} "
        f"interleaved rounds; packed steps balanced over {_BALANCE_STEPS.value} batches; "
        f"real tokens per step over {_SHARE_BATCHES.value} batches")

  batches, meta = {}, {}
  for widths in _WIDTHS.value:
    its = _iterators(data_dir, tokenizer, widths, b, _BALANCE_STEPS.value, _PACK_SHAPES.value)
    for mode, it in its.items():
      sample = [next(it) for _ in range(_SHARE_BATCHES.value)]
      # Each shape's first batch, and how many of the sample have that shape.
      shape_of = [_rows(x) for x in sample]
      counts = {r: shape_of.count(r) for r in sorted(set(shape_of))}
      batches[(widths, mode)] = {r: sample[shape_of.index(r)] for r in counts}
      real_per_step, mean_share = _real_per_step(sample)
      meta[(widths, mode)] = dict(
          mean_share=mean_share, real_per_step=real_per_step, sample=sample,
          counts=counts, pack_length=getattr(it, "pack_length", 0))
      print(f"  {widths} {mode}: mean real_token_share {mean_share:.3f}"
            + (f", rows of {it.pack_length} (steps of the sample): "
               + ", ".join(f"{r} ({n})" for r, n in counts.items())
               if mode == "packed" else ""), flush=True)
      if mode == "padded" and _LAYOUTS.value:
        per_batch = [step_lib.text_lengths(b) for b in sample]
        lengths = np.concatenate([np.stack([np.asarray(q), np.asarray(d)[:, 0]], 1)
                                  for q, d in per_batch])  # [examples, (query, document)]
        _fill_by_layout(lengths, widths, _LAYOUTS.value)

  runs, info = {}, {}
  for name in _MODELS.value:
    kind, configs = _config(name)
    config = configs[kind]
    params = model_params(kind, configs)
    for widths in _WIDTHS.value:
      for mode in ("padded", "packed"):
        for rows, batch in batches[(widths, mode)].items():
          compiled, state, on_device, compile_s = build_step(config, params, batch, 0)
          runs[(name, widths, mode, rows)] = Runner(compiled, state, on_device)
          print(f"  compiled {name} {widths} {mode}"
                + (f" ({rows} rows)" if rows else "") + f" in {compile_s:.1f} s", flush=True)
        m = meta[(widths, mode)]
        flops = np.mean([float(param_count.real_train_step_flops(config, *(
            np.asarray(x) for x in step_lib.text_lengths(s)))) for s in m["sample"]])
        info[(name, widths, mode)] = dict(real=m["real_per_step"], share=m["mean_share"],
                                          flops=flops)
    del params

  peaks = [peak_runner(int(n), "float32") for n in _PEAK_SIZES.value]
  peak_values = []

  def after_round(r, times):
    peak_values.append(measure_peak(peaks))
    print(f"  round {r + 1}: peak {peak_values[-1]:.0f} GFLOP/s", flush=True)

  _, shape_times, _ = interleaved(runs, _REPEATS.value, after_round)
  peak = float(np.median(peak_values)) * 1e9
  # A mode's step time in each round: its shapes' times weighted by their steps.
  times = {}
  for (name, widths, mode, rows), values in shape_times.items():
    counts = meta[(widths, mode)]["counts"]
    share = counts[rows] / sum(counts.values())
    acc = times.setdefault((name, widths, mode), [0.0] * len(values))
    for r, t in enumerate(values):
      acc[r] += share * t

  header = (f"{'model':>10s} {'widths':>7s} {'mode':>6s} {'step_ms':>8s} {'real tok/s':>10s} "
            f"{'share':>6s} {'mfu':>6s} {'packed/padded':>13s}")
  print(header)
  print("-" * len(header))
  rows = []
  for (name, widths, mode), values in times.items():
    s = float(np.median(values))
    m, i = meta[(widths, mode)], info[(name, widths, mode)]
    row = {"model": name, "widths": widths, "mode": mode,
           "real_tokens_per_s": round(i["real"] / s, 1), "step_ms": round(s * 1e3, 1),
           "real_token_share": round(i["share"], 4), "mfu": round(i["flops"] / s / peak, 4),
           "batch": b, "rows": max(m["counts"]), "pack_length": m["pack_length"],
           "balance_steps": _BALANCE_STEPS.value if mode == "packed" else 1,
           "pack_shapes": _PACK_SHAPES.value if mode == "packed" else 1,
           "step_ms_runs": [round(t * 1e3, 1) for t in values]}
    if mode == "packed":
      row["step_ms_by_rows"] = {str(r): round(float(np.median(
          shape_times[(name, widths, mode, r)])) * 1e3, 1) for r in m["counts"]}
      row["steps_by_rows"] = {str(r): n for r, n in m["counts"].items()}
    rows.append(row)
  by = {(r["model"], r["widths"], r["mode"]): r for r in rows}
  for r in rows:
    ratio = ""
    if r["mode"] == "packed":
      ratio = f"{r['real_tokens_per_s'] / by[(r['model'], r['widths'], 'padded')]['real_tokens_per_s']:.2f}x"
    print(f"{r['model']:>10s} {r['widths']:>7s} {r['mode']:>6s} {r['step_ms']:8.1f} "
          f"{r['real_tokens_per_s']:10.0f} {r['real_token_share']:6.3f} {r['mfu']:6.1%} "
          f"{ratio:>13s}")
  print("target: packed >= 2x padded real tokens/s at 128/128")
  report.write_json(_JSON.value, rows)


if __name__ == "__main__":
  app.run(main)
