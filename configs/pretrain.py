"""Weakly supervised contrastive pretraining (stage 1 of the recipe).

  python launch/train.py --config=configs/pretrain.py:tiny --workdir=/tmp/pt

The recipe: batch 16,384 from one source per batch, sequence length 128,
lr 8e-5, 1,000 warmup steps, temperature 0.02, load-balancing coefficient 1,
in-batch negatives only (the lengths, temperature, coefficient and negatives are
configs/common.py's defaults). `grad_cache_chunk` (512 queries) fits the batch
in memory. Texts are packed into rows (input.packing) rather than padded.

What it gives (measured): with nomic_v2_moe the step compiles for a v5p-64 slice
(32 chips, mesh.data=32) at 53.3 GiB per chip of its 95 GiB HBM when the packed rows
are sized for texts at full width (5.3 GiB parameters and AdamW moments, 48.0 GiB
temporaries): the most any data can ask for, so the recipe passes tpu_pod.sh's
compile check whatever its lengths. For the embedded corpus's 38% real tokens: 36.0
GiB, XLA's estimate 10.0 s per step, 4,984 real tokens/s/chip; padded
(input.packing=false) 13.9 s, 3,584 real tokens/s/chip. Data that short also fits
--config.grad_cache_chunk=1024 (55.9 GiB, 6.6 s, 7,596 real tokens/s/chip), whose
full-width bound (95.7 GiB) does not (`python launch/compile.py
--config=configs/pretrain.py:nomic_v2_moe --topology=v5p-64 --real_token_share=0.38`,
jax 0.10.2, libtpu 0.0.42; 3-5 min to compile on 2 CPU cores). On 32 GiB chips the
shipped chunk does not fit; `--fit` gives --config.grad_cache_chunk=128: 22.1 GiB per
chip on a v4-32 slice (16 chips), 22.4 GiB on a v6e-8 (8 chips), with roofline step
estimates of 29.7 s and 23.7 s (XLA's cost model gives none there). The scores of a
pretraining run are not measured yet.
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
  # 87-90% real, 2.3-3.4x the real tokens/s of padded steps (benchmarks/packing.py).
  c.input.packing = True
  # Each block of 8 batches of a source is dealt among them by tokens before packing,
  # so rows sized for the heaviest step sit closer to the mean (fill 0.81 -> 0.85 at
  # batch 64 on the embedded corpus, 0.74 -> 0.82 at 32).
  c.input.pack_balance_steps = 8
  # Rows per step by source, in at most 3 row counts (input.pack_shapes), each compiled
  # at start-up: light sources stop running the heaviest one's rows.
  c.input.pack_shapes = 3
  if args.model == "tiny":
    common.apply_tiny(c)
  else:
    c.grad_cache_chunk = 512
  if args.steps:
    c.total_steps = args.steps
  return c
