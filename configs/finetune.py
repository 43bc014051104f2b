"""Finetuning with hard negatives (stage 2 of the recipe).

  python launch/train.py --config=configs/finetune.py:tiny --workdir=/tmp/ft
  python launch/train.py --config=configs/finetune.py:model=/path/to/upcycled \
      --config.data=/path/to/triplets --workdir=gs://bucket/ft

Arguments: a preset ('tiny', 'minilm', 'nomic_v2_moe') or `model=PATH`, plus
`steps=N`. The recipe: batch 256, lr 2e-5, 400 warmup steps, linear decay
(configs/common.py's defaults), 10 hard negatives per query, sequence length 512,
no load-balancing loss, 2,000 steps.

What it gives (measured):
- Texts are packed into rows (input.packing) rather than padded.
- `tiny` reaches held-out nDCG@10 0.2640 (0.0587 untrained) on the embedded
  corpus in 300 steps, 3 min 13 s of training on a 2-core CPU (padded: 0.2661;
  README, Start here).
- Beyond `tiny`, the step runs with GradCache (32 queries per chunk) and remat:
  with nomic_v2_moe it then compiles for a v5p-8 slice (4 chips) at 30.4 GiB per
  chip of its 95 GiB HBM with rows sized for texts at full width (the most any data
  can ask for: 5.3 GiB parameters and AdamW moments, 25.1 GiB temporaries), XLA's
  estimate 9.7 s per step; for texts at 11% of the width (the embedded corpus at
  512 tokens) 13.4 GiB and 1.5 s, 28,516 real tokens/s/chip, against 8.9 s and
  4,850 padded (input.packing=false: 34.2 GiB). Without GradCache and remat it needs
  97 GiB padded, without the negatives (`python launch/compile.py
  --config=configs/finetune.py:nomic_v2_moe --topology=v5p-8 [--real_token_share=0.11]`,
  jax 0.10.2, libtpu 0.0.42; 3-8 min to compile on a 2-core CPU, 45 min padded). At
  full width it also fits v4-32 (29.1 of 32 GiB, roofline estimate 9.3 s) and v6e-8
  (27.6 of 32 GiB, 8.4 s), where XLA's cost model gives no time. Its step time and
  scores on TPU are not measured yet.
"""

from configs import common


def get_config(arg=None):
  args = common.parse_arg(arg, model="tiny", steps=0)
  c = common.base_config(args.model)
  c.input.max_query_len = 512
  c.input.max_doc_len = 512
  c.input.num_negatives = 10
  c.total_steps = 2000
  c.loss.load_balancing_coef = 0.0
  # Padding-free: at 512 tokens the embedded corpus is 11% real tokens padded, 39%
  # packed, 2.7-2.9x the real tokens/s of padded steps (benchmarks/packing.py).
  c.input.packing = True
  # Each block of 8 batches of a source is dealt among them by tokens before packing
  # (input.pack_balance_steps), so the rows, sized for the heaviest step, fill better.
  c.input.pack_balance_steps = 8
  # Rows per step by source, in at most 3 row counts (input.pack_shapes), each compiled
  # at start-up: light sources stop running the heaviest one's rows.
  c.input.pack_shapes = 3
  if args.model == "tiny":
    # Hard negatives stay on where the data has them (--config.data); the embedded
    # corpus has none and trains with in-batch negatives (apply_tiny).
    common.apply_tiny(c)
  else:
    c.grad_cache_chunk = 32  # 32 queries with their 352 documents per chunk.
    c.encoder.remat = True
  if args.steps:
    c.total_steps = args.steps
  return c
