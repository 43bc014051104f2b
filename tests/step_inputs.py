"""The tiny model, random batches and the plain (unsharded) step of the train-step tests."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moe_embed.model import config as model_config
from moe_embed.model.encoder import EmbeddingModel, init_params
from moe_embed.train import step as step_lib


def random_batch(config, b=16, n=2, lq=8, ld=12, seed=0):
  """Random ids of random lengths: query_* [b, lq], doc_* [b, ld], with n: neg_* [b, n, ld]."""
  rng = np.random.default_rng(seed)

  def texts(shape, length):
    ids = rng.integers(4, config.vocab_size, size=(*shape, length)).astype(np.int32)
    lengths = rng.integers(2, length + 1, size=shape)
    mask = np.arange(length) < lengths[..., None]
    return np.where(mask, ids, config.pad_token_id).astype(np.int32), mask

  batch = {}
  batch["query_ids"], batch["query_mask"] = texts((b,), lq)
  batch["doc_ids"], batch["doc_mask"] = texts((b,), ld)
  if n:
    batch["neg_ids"], batch["neg_mask"] = texts((b, n), ld)
  return batch


def tiny_setup(**loss_kwargs):
  """(encoder config, model, params {"model", "log_temperature"}, LossConfig(**loss_kwargs))."""
  config = model_config.preset("tiny", vocab_size=512)
  model = EmbeddingModel(config)
  params = {"model": nn.meta.unbox(init_params(config, jax.random.PRNGKey(0))),
            "log_temperature": jnp.asarray(np.log(0.05), jnp.float32)}
  cfg = step_lib.LossConfig(**loss_kwargs)
  return config, model, params, cfg


def plain_step(model, config, cfg, params, batch):
  """(loss, extras, grads) of the plain step, jitted: the reference the other steps match."""
  fn = jax.jit(lambda p, b: step_lib.plain_loss_and_grads(model, config, cfg, p, b))
  return fn(params, batch)
