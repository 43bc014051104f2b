"""Contrastive training: losses, optimizer, the pure train step, and the job around it.

  losses         InfoNCE over in-batch and hard negatives, Matryoshka
  optimizer      OptimizerConfig and AdamW with warmup and decay
  step           TrainState, LossConfig, the plain and GradCache train steps
  state          the train state created with its shardings
  config         ml_collections run config -> checked, structured values
  metric_writer  metrics.jsonl and TensorBoard
  trainer        train_and_evaluate: setup, loop, evaluation, checkpoints

Imports: every other package; nothing imports this one.
"""
