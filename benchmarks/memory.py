"""Peak memory of the train step against the global batch, with and without GradCache.

  python benchmarks/memory.py --json=/tmp/memory.json \
    [--preset=minilm] [--model=moe] [--batch=8] [--multiples=1,4,16] [--seq=128]

What it measures: for global batches of --batch x each of --multiples queries
(as many documents, --seq tokens each), the memory XLA's buffer assignment
gives the compiled train step (`compiled.memory_analysis()`): arguments (train
state and batch) + outputs + temporaries - the donated state that outputs
reuse. That is the peak the program needs on the device, known before it runs
and identical from run to run (no timing, no noise from other processes); it is
not the process RSS, which adds the compiler, the Python heap and allocator
slack. GradCache runs with a fixed chunk of --batch queries, so 1x is one
chunk and 16x is sixteen; the plain step holds the activations of the whole
batch at once. Only compiles, never runs, so large multiples are cheap to ask
for.

How to read it: temp_gb is what grows with the batch (activations, the
embeddings of every chunk, the loss logits); state_gb is the train state
(parameters, AdamW moments; the gradients are temporaries); vs_1x is total_gb
over the 1x value of the same setting. GradCache's promise is vs_1x near 1.
"""

from __future__ import annotations

import os
import sys

from absl import app
from absl import flags
import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import report  # noqa: E402  (benchmarks/report.py)
import step_setup as ts  # noqa: E402  (benchmarks/step_setup.py)
import timing  # noqa: E402  (benchmarks/timing.py)

_JSON = flags.DEFINE_string("json", None, "Write the rows as a JSON list to this file.")
_PRESET = flags.DEFINE_string("preset", "minilm", "Model preset that gives the width.")
_MODEL = flags.DEFINE_enum("model", "moe", ts.MODELS, "Which of the train_step.py models.")
_BATCH = flags.DEFINE_integer("batch", 8, "Queries of the 1x global batch; the GradCache chunk.")
_MULTIPLES = flags.DEFINE_list("multiples", ["1", "4", "16"], "Global batch multiples.")
_SEQ = flags.DEFINE_integer("seq", 128, "Tokens per query and per document.")
_NEGATIVES = flags.DEFINE_integer("negatives", 0, "Hard negatives per query.")
_DTYPE = flags.DEFINE_string("dtype", "float32", "Compute dtype.")
_REMAT = flags.DEFINE_bool("remat", False, "Rematerialise each block (encoder.remat).")


def main(argv):
  del argv
  config = ts.model_configs(_PRESET.value, _DTYPE.value)[_MODEL.value].replace(
      remat=_REMAT.value)
  configs = {_MODEL.value: config}
  params = ts.model_params(_MODEL.value, configs)
  print(f"jax {jax.__version__}, backend {jax.default_backend()}; {_PRESET.value} "
        f"{_MODEL.value}, {_DTYPE.value}, seq {_SEQ.value}, remat {_REMAT.value}; memory "
        "from XLA's buffer assignment of the compiled step (not process RSS)")
  header = (f"{'gc':>3s} {'batch':>6s} {'chunk':>5s} {'state_gb':>8s} {'temp_gb':>8s} "
            f"{'total_gb':>8s} {'vs_1x':>6s}")
  print(header)
  print("-" * len(header))
  rows = []
  for gc in ("off", "on"):
    base = None
    for mult in map(int, _MULTIPLES.value):
      b = _BATCH.value * mult
      chunk = _BATCH.value if gc == "on" else 0
      batch = ts.make_batch(config, b, _SEQ.value, _NEGATIVES.value)
      compiled, state, _, _ = ts.build_step(config, params, batch, chunk)
      stats = compiled.memory_analysis()
      state_gb = sum(x.nbytes for x in jax.tree.leaves(state)) / 1e9
      total = timing.memory_gb(compiled)
      base = base or total
      row = {"model": _MODEL.value, "preset": _PRESET.value, "grad_cache": gc == "on",
             "batch": b, "multiple": mult, "chunk": chunk, "seq": _SEQ.value,
             "state_gb": round(state_gb, 4),
             "argument_gb": round(stats.argument_size_in_bytes / 1e9, 4),
             "temp_gb": round(stats.temp_size_in_bytes / 1e9, 4),
             "total_gb": round(total, 4), "vs_1x": round(total / base, 3),
             "source": "compiled.memory_analysis"}
      rows.append(row)
      print(f"{gc:>3s} {b:6d} {chunk:5d} {state_gb:8.3f} {row['temp_gb']:8.3f} "
            f"{total:8.3f} {row['vs_1x']:6.2f}", flush=True)
      del compiled, state
  on = {r["multiple"]: r for r in rows if r["grad_cache"]}
  if 1 in on and 4 in on:
    print(f"GradCache peak at 4x / 1x = {on[4]['total_gb'] / on[1]['total_gb']:.3f} "
          "(target <= 1.15)")
  report.write_json(_JSON.value, rows)


if __name__ == "__main__":
  app.run(main)
