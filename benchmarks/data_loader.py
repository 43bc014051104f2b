"""Loader throughput next to the tiny train step's consumption.

  python benchmarks/data_loader.py [--batch_size=256] [--length=128] [--batches=50]

Measures batches/s of tokenised pairs from the embedded stdlib dataset at batch
256, length 128 (tokenised in the loader, one background thread), then the train
steps/s of configs/finetune.py:tiny on this machine's devices, so the two rates
can be compared: the loader must not be the bottleneck. It also splits a batch's
time into reading (tfds.data_source) and tokenising, the numbers behind
tokenising in the loader rather than storing token ids in the dataset.
"""

from __future__ import annotations

import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from moe_embed import data  # noqa: E402
from moe_embed.tokenizers import load_tokenizer  # noqa: E402
import timing  # noqa: E402  (benchmarks/timing.py)

_BATCH = flags.DEFINE_integer("batch_size", 256, "Global batch size.")
_LENGTH = flags.DEFINE_integer("length", 128, "Query and document length.")
_BATCHES = flags.DEFINE_integer("batches", 50, "Batches to time.")
_STEPS = flags.DEFINE_integer("train_steps", 30, "Tiny train steps to time (0 skips).")


def main(argv):
  del argv
  data_dir = data.ensure_default_data()
  tokenizer = load_tokenizer(data.dataset_tokenizer_path(data_dir))
  # Where a batch's time goes: random reads through tfds.data_source vs tokenising.
  inputs = data.InputConfig(max_query_len=_LENGTH.value, max_doc_len=_LENGTH.value)
  it = data.make_train_iterator(data_dir, inputs=inputs, tokenizer=tokenizer,
                                global_batch_size=_BATCH.value, seed=0, prefetch=0)
  read_s = tok_s = 0.0
  state = it.get_state()
  for _ in range(_BATCHES.value):
    seconds, (source, records) = timing.timed(lambda: it.records_at(state))
    read_s += seconds
    tok_s += timing.timed(lambda: it.tokenize(records, source))[0]
    state["cursors"][source] += _BATCH.value
    state["step"] += 1
  print(f"per batch: read {1e3 * read_s / _BATCHES.value:.1f} ms, "
        f"tokenise {1e3 * tok_s / _BATCHES.value:.1f} ms")
  for prefetch in (0, 2):
    it = data.make_train_iterator(data_dir, inputs=inputs, tokenizer=tokenizer,
                                  global_batch_size=_BATCH.value, seed=0, prefetch=prefetch)
    next(it)
    seconds, _ = timing.timed(lambda: [next(it) for _ in range(_BATCHES.value)])
    rate = _BATCHES.value / seconds
    it.close()
    print(f"loader (prefetch={prefetch}): {rate:.1f} batches/s of {_BATCH.value} pairs "
          f"at length {_LENGTH.value} ({rate * _BATCH.value:.0f} pairs/s)")
  if _STEPS.value:
    from configs import finetune
    from moe_embed.train import trainer
    config = finetune.get_config("tiny")
    config.total_steps = _STEPS.value
    config.log_every_steps = _STEPS.value
    config.eval.enabled = False
    with tempfile.TemporaryDirectory() as workdir:
      result = trainer.train_and_evaluate(config, workdir)
    steps_per_s = result["metrics"]["steps_per_s"]
    print(f"tiny train step (batch {config.batch_size}): {steps_per_s:.1f} steps/s "
          f"= {steps_per_s * config.batch_size:.0f} pairs/s consumed")


if __name__ == "__main__":
  app.run(main)
