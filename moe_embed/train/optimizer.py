"""AdamW with warmup then linear, cosine or constant learning rate; no decay on norms and biases."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import optax

from moe_embed import validation

DECAYS = ("linear", "cosine", "constant")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """The fields of `config.optimizer`; the defaults are every run config's."""

  learning_rate: float = 2e-5  # Peak learning rate.
  warmup_steps: int = 400  # Linear warmup from 0.
  decay: str = "linear"  # 'linear', 'cosine' or 'constant' after warmup.
  end_lr_fraction: float = 0.0  # Final lr as a fraction of the peak.
  weight_decay: float = 0.01  # AdamW decay (matrices and tables only).
  b1: float = 0.9  # AdamW decay rate of the first moment (the gradient's mean).
  b2: float = 0.999  # AdamW decay rate of the second moment (its square).
  eps: float = 1e-8  # Added to the second moment's square root in the update.
  clip_grad_norm: float = 1.0  # Global-norm clipping; 0 disables.

  def __post_init__(self):
    if self.decay not in DECAYS:
      raise ValueError(f"optimizer.decay={self.decay!r} must be one of {DECAYS}.")
    checks = (("learning_rate", self.learning_rate > 0, "must be positive"),
              ("warmup_steps", self.warmup_steps >= 0, "must be >= 0"),
              ("end_lr_fraction", 0 <= self.end_lr_fraction <= 1, "must be in [0, 1]"),
              ("weight_decay", self.weight_decay >= 0, "must be >= 0"),
              ("b1", 0 <= self.b1 < 1, "must be in [0, 1)"),
              ("b2", 0 <= self.b2 < 1, "must be in [0, 1)"),
              ("eps", self.eps > 0, "must be positive"),
              ("clip_grad_norm", self.clip_grad_norm >= 0, "must be >= 0 (0 disables)"))
    for name, ok, rule in checks:
      if not ok:
        raise ValueError(f"optimizer.{name}={getattr(self, name)} {rule}.")

  @classmethod
  def from_mapping(cls, fields: Mapping[str, Any]) -> "OptimizerConfig":
    """From `config.optimizer`; an unknown field is named, with the closest known one."""
    validation.check_fields(fields, [f.name for f in dataclasses.fields(cls)],
                            "optimizer field")
    return cls(**dict(fields))


def make_optimizer(cfg: OptimizerConfig, total_steps: int
                   ) -> tuple[optax.GradientTransformation, Callable[[Any], Any]]:
  """(optimizer, learning-rate schedule) for a run of `total_steps`."""
  warmup_steps = min(cfg.warmup_steps, max(total_steps - 1, 0))
  decay_steps = max(total_steps - warmup_steps, 1)
  peak, end = cfg.learning_rate, cfg.learning_rate * cfg.end_lr_fraction
  if cfg.decay == "linear":
    tail = optax.linear_schedule(peak, end, decay_steps)
  elif cfg.decay == "cosine":
    tail = optax.cosine_decay_schedule(peak, decay_steps, alpha=cfg.end_lr_fraction)
  else:
    tail = optax.constant_schedule(peak)
  schedule = optax.join_schedules(
      [optax.linear_schedule(0.0, peak, warmup_steps), tail], [warmup_steps])

  def decay_mask(params):
    # Matrices and embedding tables decay; LayerNorm scales, biases and scalars do not.
    return jax.tree.map(lambda x: x.ndim >= 2, params)

  tx = optax.chain(
      optax.clip_by_global_norm(cfg.clip_grad_norm) if cfg.clip_grad_norm else optax.identity(),
      optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                  mask=decay_mask))
  return tx, schedule
