"""Weakly supervised contrastive pretraining (stage 1 of the recipe).

  python launch/train.py --config=configs/pretrain.py:tiny --workdir=/tmp/pt

The recipe: batch 16,384 from one source per batch, sequence length 128,
lr 8e-5, 1,000 warmup steps, temperature 0.02, load-balancing coefficient 1,
in-batch negatives only (the lengths, temperature, coefficient and negatives are
configs/common.py's defaults). `grad_cache_chunk` (1,024 queries) fits the batch
in memory. Texts are packed into rows (input.packing) rather than padded.

What it gives (measured): with nomic_v2_moe the step compiles for a v5p-64 slice
(32 chips, mesh.data=32) at 74.3 GiB per chip of its 95 GiB HBM: 5.3 GiB parameters
and AdamW moments, 69.0 GiB temporaries (`python launch/compile.py
--config=configs/pretrain.py:nomic_v2_moe --topology=v5p-64`, jax 0.10.2, libtpu
0.0.42; 25 min to compile on a shared 2-core CPU). The step time and scores of a
pretraining run, `tiny` or nomic_v2_moe, are not measured yet.
"""

from configs import common


def get_config(arg=None):
  args = common.parse_arg(arg, model="tiny", steps=0)
  c = common.base_config(args.model)
  c.batch_size = 16_384
  c.total_steps = 100_000
  c.optimizer.learning_rate = 8e-5
  c.optimizer.warmup_steps = 1000
  # Padding-free: the embedded corpus is 38% real tokens at 128/128; packed rows are
  # 73-80% real, 1.7-2.9x the real tokens/s of padded steps (benchmarks/packing.py).
  c.input.packing = True
  if args.model == "tiny":
    common.apply_tiny(c)
  else:
    c.grad_cache_chunk = 1024
  if args.steps:
    c.total_steps = args.steps
  return c
