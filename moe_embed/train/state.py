"""The train state, created directly with its shardings."""

from __future__ import annotations

import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_embed import partitioning
from moe_embed.model.encoder import EmbeddingModel, init_params
from moe_embed.train.step import TrainState


def create_state(model: EmbeddingModel, optimizer, mesh, rules, seed: int,
                 model_params: Optional[Any] = None, temperature: float = 0.02
                 ) -> tuple[TrainState, TrainState, TrainState]:
  """(state, abstract state, shardings), the state created sharded from the start.

  Parameters are initialised (or, from a model folder, placed) directly with
  their NamedShardings: full parameters never sit on one host. Optimizer
  moments inherit their parameters' logical axes, since optax maps over the
  boxed tree. The abstract state (ShapeDtypeStructs with shardings) is the
  restore target of a checkpoint.
  """
  abstract, shardings, boxed, from_params = _abstract(model, optimizer, mesh, rules, seed,
                                                     temperature)
  rng = jax.random.PRNGKey(seed)
  if model_params is None:
    state = jax.jit(lambda r: nn.meta.unbox(boxed(r)), out_shardings=shardings)(rng)
  else:
    placed = jax.device_put(model_params, shardings.params["model"])
    state = jax.jit(from_params, out_shardings=shardings)(placed)
  return state, abstract, shardings


def abstract_state(model: EmbeddingModel, optimizer, mesh, rules, seed: int = 0,
                   temperature: float = 0.02) -> tuple[TrainState, TrainState]:
  """(abstract state, shardings): the shapes, dtypes and shardings of `create_state`'s
  state without allocating it (what an ahead-of-time compile needs)."""
  abstract, shardings, _, _ = _abstract(model, optimizer, mesh, rules, seed, temperature)
  return abstract, shardings


def _abstract(model, optimizer, mesh, rules, seed, temperature):
  log_temperature = lambda: jnp.asarray(math.log(temperature), jnp.float32)

  def from_params(params):
    full = {"model": params, "log_temperature": log_temperature()}
    return TrainState(step=jnp.zeros((), jnp.int32), params=full,
                      opt_state=optimizer.init(full))

  boxed = lambda r: from_params(init_params(model.config, r))
  abstract = jax.eval_shape(boxed, jax.random.PRNGKey(seed))
  shardings = partitioning.logical_shardings(abstract, mesh, rules)
  abstract = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      nn.meta.unbox(abstract), shardings)
  return abstract, shardings, boxed, from_params
