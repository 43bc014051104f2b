"""Weakly supervised contrastive pretraining (stage 1 of the recipe).

  python launch/train.py --config=configs/pretrain.py:tiny --workdir=/tmp/pt

The recipe: batch 16,384 from one source per batch, sequence length 128,
lr 8e-5, 1,000 warmup steps, temperature 0.02, load-balancing coefficient 1,
in-batch negatives only. Use `grad_cache_chunk` to fit the batch in memory.

With nomic_v2_moe the step compiles for a v5p-64 slice (32 chips, mesh.data=32) at
74.3 GiB per chip of its 95 GiB HBM: 5.3 GiB parameters and AdamW moments, 69.0 GiB
temporaries (`python launch/compile.py --config=configs/pretrain.py:nomic_v2_moe
--topology=v5p-64`, jax 0.10.2, libtpu 0.0.42).
"""

from configs import common


def get_config(arg=None):
  args = common.parse_arg(arg, model="tiny", steps=0)
  c = common.base_config(args.model)
  c.input.max_query_len = 128
  c.input.max_doc_len = 128
  c.input.num_negatives = 0
  c.batch_size = 16_384
  c.total_steps = 100_000
  c.grad_cache_chunk = 1024
  c.optimizer.learning_rate = 8e-5
  c.optimizer.warmup_steps = 1000
  c.optimizer.decay = "linear"
  c.loss.temperature = 0.02
  c.loss.load_balancing_coef = 1.0
  if args.model == "tiny":
    common.apply_tiny(c)
    c.grad_cache_chunk = 0
  if args.steps:
    c.total_steps = args.steps
  return c
