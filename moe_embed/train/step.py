"""The contrastive train step: embeddings, loss, GradCache, optimizer update.

A batch is a dict of global arrays (leading axis B, sharded over the mesh):
'query_ids'/'query_mask' [B, Lq], 'doc_ids'/'doc_mask' [B, Ld] and, with hard
negatives, 'neg_ids'/'neg_mask' [B, N, Ld]. Queries are embedded in one
forward call, positives and negatives together in a second one. A packed
batch (`moe_embed.data.packing`, input.packing) has instead 'packed_ids',
'packed_segment_ids', 'packed_positions' [U * R, P] and 'query_lengths' [U, q],
'doc_lengths' [U, q, 1 + N], 'packed_capped' [U] for U packing units of q
queries: every text is embedded in one forward call over the rows, and the
embeddings come back in the padded batch's order, so the loss is unchanged.

`train_step` is pure: (state, batch) -> (state, metrics). With a
`grad_cache_chunk` it runs GradCache: embed every chunk without gradients,
take the loss gradient with respect to the embeddings, then re-embed each
chunk with gradients and back-propagate the cached embedding gradients, so
the negatives span the whole global batch while activations are held for one
chunk at a time. The router losses are added in the re-forward pass through
their additive statistics (`router_stats`), so its gradients equal the plain
step's.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax

from moe_embed import partitioning
from moe_embed.model.config import EncoderConfig
from moe_embed.model import param_count
from moe_embed.model.encoder import EmbeddingModel
from moe_embed.moe import router_stats
from moe_embed.train import losses

Batch = dict[str, jax.Array]


@flax.struct.dataclass
class TrainState:
  """Everything a checkpoint restores besides the data position."""

  step: jax.Array  # int32 scalar
  params: Any  # {'model': encoder params, 'log_temperature': float32 scalar}
  opt_state: Any


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """What the loss needs to know: the fields of `config.loss`, whose defaults these are."""

  temperature: float = 0.02  # InfoNCE temperature (initial value if learned).
  learn_temperature: bool = False  # Learn log(temperature).
  symmetric: bool = False  # Add the document -> query term.
  matryoshka_dims: tuple[int, ...] = ()  # e.g. (768, 256); () = full embedding only.
  matryoshka_weights: tuple[float, ...] = ()  # One per dim; () = equal weights.
  load_balancing_coef: float = 1.0  # Switch load-balancing loss weight.
  z_loss_coef: float = 0.0  # Router z-loss weight (1e-3 is common).


def is_packed(batch: Batch) -> bool:
  return "packed_ids" in batch


def embed_packed(model: EmbeddingModel, model_params: Any, batch: Batch):
  """embed_batch of a packed batch: one forward call over every unit's rows."""
  units, per = batch["query_lengths"].shape
  group = batch["doc_lengths"].shape[-1]
  e, aux = model.apply({"params": model_params}, batch["packed_ids"],
                       batch["packed_segment_ids"], batch["packed_positions"], units,
                       per * (1 + group), method=EmbeddingModel.embed_packed)
  e = e.reshape(units, per * (1 + group), -1)  # Per unit: queries, then [query, group].
  q = e[:, :per].reshape(units * per, -1)
  d = e[:, per:].reshape(units * per, group, -1)
  return q, d[:, 0], (d[:, 1:] if group > 1 else None), router_stats.add_stats([aux])


def token_counts(batch: Batch) -> tuple[jax.Array, int]:
  """(real tokens, token slots the step computes) of a padded or packed batch."""
  if is_packed(batch):
    seg = batch["packed_segment_ids"]
    return jnp.sum(seg > 0), seg.size
  masks = [batch[k] for k in ("query_mask", "doc_mask", "neg_mask") if k in batch]
  return sum(jnp.sum(m.astype(jnp.int32)) for m in masks), sum(m.size for m in masks)


def text_lengths(batch: Batch) -> tuple[jax.Array, jax.Array]:
  """Real tokens of each text: (queries [B], documents [B, 1 + N], the positive first)."""
  if is_packed(batch):
    return batch["query_lengths"].reshape(-1), batch["doc_lengths"].reshape(
        -1, batch["doc_lengths"].shape[-1])
  count = lambda m: jnp.sum(m.astype(jnp.int32), axis=-1)
  docs = count(batch["doc_mask"])[:, None]
  if "neg_mask" in batch:
    docs = jnp.concatenate([docs, count(batch["neg_mask"])], axis=1)
  return count(batch["query_mask"]), docs


def embed_batch(model: EmbeddingModel, model_params: Any, batch: Batch):
  """-> (q [B, d], p [B, d], negatives [B, N, d] or None, router stats)."""
  if is_packed(batch):
    return embed_packed(model, model_params, batch)
  q, aux_q = model.apply({"params": model_params}, batch["query_ids"], batch["query_mask"])
  doc_ids, doc_mask = batch["doc_ids"][:, None], batch["doc_mask"][:, None]
  num_neg = 0
  if "neg_ids" in batch:
    num_neg = batch["neg_ids"].shape[1]
    doc_ids = jnp.concatenate([doc_ids, batch["neg_ids"]], axis=1)  # [B, 1+N, Ld]
    doc_mask = jnp.concatenate([doc_mask, batch["neg_mask"]], axis=1)
  b, group, length = doc_ids.shape
  d, aux_d = model.apply(
      {"params": model_params}, doc_ids.reshape(b * group, length),
      doc_mask.reshape(b * group, length))
  d = d.reshape(b, group, -1)
  negatives = d[:, 1:] if num_neg else None
  return q, d[:, 0], negatives, router_stats.add_stats([aux_q, aux_d])


def temperature_of(params: Any, cfg: LossConfig) -> jax.Array:
  if cfg.learn_temperature:
    return jnp.exp(params["log_temperature"])
  return jnp.asarray(cfg.temperature, jnp.float32)


def contrastive_loss(q, p, negatives, temperature, cfg: LossConfig) -> jax.Array:
  return losses.matryoshka_info_nce(
      q, p, negatives, temperature, cfg.matryoshka_dims, cfg.matryoshka_weights,
      cfg.symmetric)


def _in_batch_accuracy(q, p) -> jax.Array:
  """Share of queries whose positive scores highest among all positives."""
  return jnp.mean(jnp.argmax(q @ p.T, axis=-1) == jnp.arange(q.shape[0]))


def _aux_loss(stats, total, cfg: LossConfig, top_k: int):
  lb, z = router_stats.router_losses(stats, total, top_k)
  return cfg.load_balancing_coef * lb + cfg.z_loss_coef * z, (lb, z)


def plain_loss_and_grads(model, config: EncoderConfig, cfg: LossConfig, params, batch):
  """Loss, metrics and gradients of the whole global batch in one pass."""

  def loss_fn(params):
    q, p, n, stats = embed_batch(model, params["model"], batch)
    temperature = temperature_of(params, cfg)
    contrastive = contrastive_loss(q, p, n, temperature, cfg)
    aux, (lb, z) = _aux_loss(stats, None, cfg, config.top_k)
    extras = dict(contrastive_loss=contrastive, load_balancing_loss=lb, router_z_loss=z,
                  aux_loss=aux, accuracy=_in_batch_accuracy(q, p), stats=stats)
    return contrastive + aux, extras

  (loss, extras), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  return loss, extras, grads


def split_chunks(x: jax.Array, num_chunks: int, shards: int) -> jax.Array:
  """[B, ...] -> [num_chunks, B / num_chunks, ...], each chunk drawn from every shard.

  The batch is sharded in `shards` contiguous blocks; chunk j takes the j-th
  slice of every block, so each device embeds its own rows. The resulting
  order is a consistent permutation of the batch, which InfoNCE is invariant to.
  """
  b = x.shape[0]
  per_shard_chunk = b // (shards * num_chunks)
  x = x.reshape(shards, num_chunks, per_shard_chunk, *x.shape[1:])
  x = jnp.swapaxes(x, 0, 1)
  return x.reshape(num_chunks, shards * per_shard_chunk, *x.shape[3:])


def grad_cache_loss_and_grads(model, config: EncoderConfig, cfg: LossConfig, params,
                              batch, chunk_size: int, shards: int,
                              constrain: Callable[[Any], Any]):
  """GradCache: the same loss and gradients as the plain step, `chunk_size` queries at a time."""
  b = (batch["query_lengths"].size if is_packed(batch) else batch["query_ids"].shape[0])
  num_chunks = b // chunk_size
  chunks = jax.tree.map(lambda x: split_chunks(x, num_chunks, shards), batch)

  # Pass 1: embeddings of every chunk, no gradients kept.
  def embed_chunk(chunk):
    q, p, n, stats = embed_batch(model, params["model"], constrain(chunk))
    return q, p, n, stats

  q, p, n, stats = jax.lax.map(embed_chunk, chunks)
  total_stats = jax.tree.map(lambda s: jnp.sum(s, axis=0), stats)
  flat = lambda x: None if x is None else x.reshape(-1, *x.shape[2:])

  def embedding_loss(embeddings, log_temperature):
    q_, p_, n_ = embeddings
    temperature = temperature_of({"log_temperature": log_temperature}, cfg)
    return contrastive_loss(flat(q_), flat(p_), flat(n_), temperature, cfg)

  contrastive, (emb_grads, temp_grad) = jax.value_and_grad(embedding_loss, argnums=(0, 1))(
      (q, p, n), params["log_temperature"])

  # Pass 2: re-embed each chunk with gradients; push the cached embedding
  # gradients through it, plus the chunk's share of the router losses.
  def chunk_grads(acc, xs):
    chunk, gq, gp, gn = xs

    def surrogate(model_params):
      cq, cp, cn, cstats = embed_batch(model, model_params, constrain(chunk))
      value = jnp.vdot(cq, gq) + jnp.vdot(cp, gp)
      if cn is not None:
        value += jnp.vdot(cn, gn)
      aux, _ = _aux_loss(cstats, total_stats, cfg, config.top_k)
      return value + aux

    g = jax.grad(surrogate)(params["model"])
    return jax.tree.map(jnp.add, acc, g), None

  zeros = jax.tree.map(jnp.zeros_like, params["model"])
  gq, gp, gn = emb_grads
  model_grads, _ = jax.lax.scan(chunk_grads, zeros, (chunks, gq, gp, gn))
  grads = {"model": model_grads, "log_temperature": temp_grad}

  aux, (lb, z) = _aux_loss(total_stats, None, cfg, config.top_k)
  extras = dict(contrastive_loss=contrastive, load_balancing_loss=lb, router_z_loss=z,
                aux_loss=aux, accuracy=_in_batch_accuracy(flat(q), flat(p)),
                stats=total_stats)
  return contrastive + aux, extras, grads


def make_train_step(model: EmbeddingModel, optimizer: optax.GradientTransformation,
                    cfg: LossConfig, schedule: Callable[[jax.Array], jax.Array],
                    grad_cache_chunk: int = 0, shards: int = 1,
                    constrain: Callable[[Any], Any] = lambda x: x):
  """Returns the pure train_step(state, batch) -> (state, metrics).

  grad_cache_chunk: queries per GradCache chunk (0 = the plain step); shards:
  pieces the batch is split into on the mesh; constrain: puts a chunk back on
  the batch sharding.
  """
  config = model.config

  def train_step(state: TrainState, batch: Batch):
    params = state.params
    if not cfg.learn_temperature:
      params = {**params, "log_temperature": jax.lax.stop_gradient(params["log_temperature"])}
    if grad_cache_chunk:
      loss, extras, grads = grad_cache_loss_and_grads(
          model, config, cfg, params, batch, grad_cache_chunk, shards, constrain)
    else:
      loss, extras, grads = plain_loss_and_grads(model, config, cfg, params, batch)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    stats = extras.pop("stats")
    real, slots = token_counts(batch)
    if is_packed(batch):
      extras["capped_texts"] = jnp.sum(batch["packed_capped"])
    metrics = dict(
        loss=loss, **extras, grad_norm=optax.tree.norm(grads),
        lr=schedule(state.step), temperature=temperature_of(new_params, cfg),
        tokens=real, real_token_share=real / slots,
        model_flops=param_count.real_train_step_flops(config, *text_lengths(batch)),
        **router_stats.usage_metrics(stats, config.top_k))
    new_state = state.replace(step=state.step + 1, params=new_params, opt_state=opt_state)
    return new_state, metrics

  return train_step


def batch_constraint(batch_sharding) -> Callable[[Any], Any]:
  """tree -> tree with every array constrained to `batch_sharding` (GradCache's chunks)."""
  return lambda tree: jax.tree.map(
      lambda x: jax.lax.with_sharding_constraint(x, batch_sharding), tree)


def jit_train_step(model: EmbeddingModel, optimizer: optax.GradientTransformation,
                   cfg: LossConfig, schedule: Callable[[jax.Array], jax.Array],
                   grad_cache_chunk: int, mesh, rules, state_shardings: TrainState):
  """(jitted train_step, batch sharding): the step every caller runs on `mesh`.

  The trainer, `launch/compile.py`, the benchmarks and the tests build the step
  here, so they compile the same program: the batch sharded over the mesh axes
  of 'batch', GradCache chunks put back on that sharding, the state donated.
  Lower it under `partitioning.activate(mesh, rules)`: the sharding constraints
  and the expert placement read the current mesh and rules while tracing.
  """
  batch_sharding = partitioning.batch_sharding(mesh, rules)
  step_fn = make_train_step(model, optimizer, cfg, schedule, grad_cache_chunk,
                            partitioning.batch_shards(mesh, rules),
                            batch_constraint(batch_sharding))
  jitted = jax.jit(step_fn, in_shardings=(state_shardings, batch_sharding),
                   out_shardings=(state_shardings, None), donate_argnums=(0,))
  return jitted, batch_sharding
