"""The training job: config checks, sharded state, the loop, checkpoints, logs, eval.

`train_and_evaluate(config, workdir)` is everything `launch/train.py` does, so
tests and colabs call the same code. Rerunning on the same workdir resumes from
the latest checkpoint (parameters, optimizer, step, RNG and data position).
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from typing import Any, Optional

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from moe_embed import checkpoints
from moe_embed import model_config
from moe_embed import partitioning
from moe_embed import train_step as step_lib
from moe_embed.encoder import EmbeddingModel, init_params
from moe_embed.metric_writer import MetricWriter


class ConfigError(ValueError):
  """A config value that cannot work; raised before anything compiles."""


def resolve_encoder(config: ml_collections.ConfigDict) -> tuple[model_config.EncoderConfig, Any, dict]:
  """(EncoderConfig, initial params or None, model meta) from `config.model`."""
  model = config.model
  overrides = dict(config.encoder)
  if model in model_config.PRESETS:
    return model_config.EncoderConfig.from_dict(overrides), None, {}
  if not os.path.exists(model):
    raise ConfigError(
        f"config.model={model!r} is neither a preset {sorted(model_config.PRESETS)} nor an "
        "existing model folder.")
  from moe_embed import model_io  # Imported lazily: pulls in checkpoint importers.
  params, loaded, meta = model_io.load_any(model)
  runtime = {k: v for k, v in overrides.items() if k in model_config.RUNTIME_FIELDS}
  ignored = sorted(k for k, v in overrides.items()
                   if k not in runtime and getattr(loaded, k, v) != v)
  if ignored:
    logging.warning("config.model is a folder; its architecture wins over config.encoder "
                    "fields %s.", ignored)
  return loaded.replace(**runtime), params, meta


def loss_config(config: ml_collections.ConfigDict, embedding_dim: int) -> step_lib.LossConfig:
  dims = tuple(int(d) for d in config.loss.matryoshka_dims)
  weights = tuple(float(w) for w in config.loss.matryoshka_weights) or (1.0,) * len(dims)
  if len(weights) != len(dims):
    raise ConfigError(
        f"loss.matryoshka_weights has {len(weights)} entries but loss.matryoshka_dims "
        f"has {len(dims)}.")
  for d in dims:
    if not 0 < d <= embedding_dim:
      raise ConfigError(
          f"loss.matryoshka_dims contains {d}, but the embedding has {embedding_dim} "
          "dimensions.")
  return step_lib.LossConfig(
      temperature=float(config.loss.temperature),
      learn_temperature=bool(config.loss.learn_temperature),
      symmetric=bool(config.loss.symmetric), matryoshka_dims=dims,
      matryoshka_weights=weights,
      load_balancing_coef=float(config.loss.load_balancing_coef),
      z_loss_coef=float(config.loss.z_loss_coef),
      grad_cache_chunk=int(config.grad_cache_chunk))


def check_batch(config: ml_collections.ConfigDict, shards: int) -> None:
  """Batch divisibility checks, with the values named."""
  b = config.batch_size
  if b <= 0 or b % shards:
    raise ConfigError(
        f"batch_size={b} is not divisible by the {shards} data-parallel shards of the mesh "
        f"(mesh.data x mesh.expert); use a multiple of {shards}.")
  if b % jax.process_count():
    raise ConfigError(f"batch_size={b} is not divisible by {jax.process_count()} processes.")
  chunk = config.grad_cache_chunk
  if chunk:
    if chunk < 0 or b % chunk:
      raise ConfigError(f"grad_cache_chunk={chunk} does not divide batch_size={b}.")
    if chunk % shards:
      raise ConfigError(
          f"grad_cache_chunk={chunk} is not divisible by the {shards} data-parallel shards; "
          "each chunk is spread over every device.")


def create_state(model: EmbeddingModel, optimizer, mesh, rules, seed: int,
                 model_params: Optional[Any] = None, temperature: float = 0.02):
  """The train state and its shardings, created sharded from the start.

  Parameters are initialised (or, from a model folder, placed) directly with
  their NamedShardings: full parameters never sit on one host. Optimizer
  moments inherit their parameters' logical axes, since optax maps over the
  boxed tree.
  """

  def boxed_state(rng):
    params = {"model": init_params(model.config, rng),
              "log_temperature": jnp.asarray(math.log(temperature), jnp.float32)}
    return step_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                               opt_state=optimizer.init(params), rng=jax.random.fold_in(rng, 1))

  rng = jax.random.PRNGKey(seed)
  abstract = jax.eval_shape(boxed_state, rng)
  shardings = partitioning.logical_shardings(abstract, mesh, rules)
  abstract = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      nn.meta.unbox(abstract), shardings)
  if model_params is None:
    state = jax.jit(lambda r: nn.meta.unbox(boxed_state(r)), out_shardings=shardings)(rng)
  else:
    placed = jax.device_put(model_params, shardings.params["model"])

    def from_params(r, params):
      full = {"model": params, "log_temperature": jnp.asarray(math.log(temperature), jnp.float32)}
      return step_lib.TrainState(step=jnp.zeros((), jnp.int32), params=full,
                                 opt_state=optimizer.init(full), rng=jax.random.fold_in(r, 1))

    state = jax.jit(from_params, out_shardings=shardings)(rng, placed)
  return state, abstract, shardings


def _make_embedder(model: EmbeddingModel, tokenizer, config: ml_collections.ConfigDict):
  """An Embedder for evaluation during training; its params are swapped per evaluation."""
  from moe_embed import inference  # Lazy: inference pulls in checkpoint importers.
  return inference.Embedder(model.config, None, tokenizer, max_length=config.eval.max_length,
                            query_prefix=config.input.query_prefix,
                            doc_prefix=config.input.doc_prefix)


def _global_batch(local: dict[str, np.ndarray], sharding) -> dict[str, jax.Array]:
  """Per-process numpy rows -> global jax arrays sharded over the batch axis."""
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


class _Preemption:
  """Turns SIGTERM into a flag the loop checks, so it can checkpoint and exit."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # Not the main thread (e.g. some notebook runners).
      self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: saving a checkpoint, then exiting.")
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def check_config(config: ml_collections.ConfigDict) -> None:
  """Value checks that need no data or devices."""
  for name in ("total_steps", "log_every_steps", "checkpoint_every_steps", "batch_size"):
    if int(config[name]) <= 0:
      raise ConfigError(f"{name}={config[name]} must be positive.")
  if config.data and not os.path.exists(config.data):
    raise ConfigError(f"config.data={config.data!r} does not exist; build it with "
                      "launch/prepare_data.py or leave it empty for the embedded corpus.")
  if config.loss.temperature <= 0:
    raise ConfigError(f"loss.temperature={config.loss.temperature} must be positive.")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       stop_at_step: Optional[int] = None) -> dict[str, Any]:
  """Trains (or resumes) in `workdir`; returns the final evaluation and last metrics.

  `stop_at_step` ends the run early as a preemption would (checkpoint, return),
  leaving the schedule of `config.total_steps` intact for the resumed run.
  """
  from moe_embed import data as data_lib  # Lazy: keeps `import trainer` light.
  from moe_embed.tokenizers import load_tokenizer

  check_config(config)
  encoder_config, start_params, model_meta = resolve_encoder(config)
  loss_cfg = loss_config(config, encoder_config.embedding_dim)
  try:
    mesh = partitioning.make_mesh(config.mesh.data, config.mesh.expert)
    rules = partitioning.rules_from_config(config.mesh.rules)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  shards = partitioning.batch_shards(mesh, rules)
  check_batch(config, shards)

  data_dir = config.data or data_lib.ensure_default_data()
  tokenizer_path = (config.tokenizer or model_meta.get("tokenizer")
                    or data_lib.dataset_tokenizer_path(data_dir))
  tokenizer = load_tokenizer(tokenizer_path)
  if tokenizer.vocab_size > encoder_config.vocab_size:
    raise ConfigError(
        f"The tokenizer at {tokenizer_path} has {tokenizer.vocab_size} tokens but the model "
        f"only {encoder_config.vocab_size}; raise encoder.vocab_size or use another tokenizer.")
  if tokenizer.pad_id != encoder_config.pad_token_id:
    logging.warning("Tokenizer pad id %d differs from encoder.pad_token_id %d.",
                    tokenizer.pad_id, encoder_config.pad_token_id)

  os.makedirs(workdir, exist_ok=True)
  is_chief = jax.process_index() == 0
  if is_chief:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
    checkpoints.write_model_meta(
        workdir, encoder_config, tokenizer=os.path.abspath(tokenizer_path),
        query_prefix=config.input.query_prefix, doc_prefix=config.input.doc_prefix,
        max_length=int(max(config.input.max_query_len, config.input.max_doc_len)))

  model = EmbeddingModel(encoder_config)
  optimizer, schedule = step_lib.make_optimizer(
      config.total_steps, config.optimizer.learning_rate, config.optimizer.warmup_steps,
      config.optimizer.decay, config.optimizer.end_lr_fraction,
      config.optimizer.weight_decay, config.optimizer.b1, config.optimizer.b2,
      config.optimizer.eps, config.optimizer.clip_grad_norm)
  state, abstract_state, state_shardings = create_state(
      model, optimizer, mesh, rules, config.seed, start_params, config.loss.temperature)

  manager = checkpoints.make_manager(workdir, config.keep_checkpoints)
  data_state = None
  if manager.latest_step() is not None:
    state, data_state, step = checkpoints.restore(manager, abstract_state)
    logging.info("Resumed from step %d in %s.", step, workdir)
  start_step = int(state.step)

  batches = data_lib.make_train_iterator(
      data_dir, global_batch_size=config.batch_size,
      max_query_len=config.input.max_query_len, max_doc_len=config.input.max_doc_len,
      num_negatives=config.input.num_negatives, query_prefix=config.input.query_prefix,
      doc_prefix=config.input.doc_prefix, source_weights=config.input.source_weights,
      seed=config.seed, process_index=jax.process_index(),
      process_count=jax.process_count(), state=data_state, tokenizer=tokenizer)

  batch_sharding = partitioning.batch_sharding(mesh, rules)
  constrain = lambda tree: jax.tree.map(
      lambda x: jax.lax.with_sharding_constraint(x, batch_sharding), tree)
  step_fn = step_lib.make_train_step(model, optimizer, loss_cfg, schedule, shards, constrain)
  jitted = jax.jit(step_fn, in_shardings=(state_shardings, batch_sharding),
                   out_shardings=(state_shardings, None), donate_argnums=(0,))

  beir_dirs = []
  if config.eval.enabled:
    beir_dirs = ([d for d in config.eval.beir.split(",") if d]
                 or data_lib.heldout_beir_dirs(data_dir))
    missing = [d for d in beir_dirs if not os.path.isdir(d)]
    if missing:
      raise ConfigError(f"eval.beir names folders that do not exist: {missing}.")
  embedder = _make_embedder(model, tokenizer, config)
  writer = MetricWriter(workdir, enabled=is_chief)

  def evaluate(step: int) -> dict[str, float]:
    if not beir_dirs:
      return {}
    from moe_embed.evaluation import evaluate_beir
    embedder.params = jax.device_get(state.params["model"])
    encode = lambda texts, prefix: embedder.encode(
        texts, prefix=prefix, batch_size=config.eval.batch_size, show_progress=False)
    results = evaluate_beir(encode, beir_dirs, dim=config.eval.dim or None,
                            query_prefix=config.input.query_prefix,
                            doc_prefix=config.input.doc_prefix)
    flat = {f"eval/{name}/{k}": v for name, r in results.items() for k, v in r.items()
            if isinstance(v, (int, float))}
    writer.write(step, flat)
    return results

  initial_eval = None
  if config.eval.at_start and start_step == 0 and beir_dirs:
    initial_eval = evaluate(0)
    logging.info("Untrained model: nDCG@10 %.4f", initial_eval["average"]["ndcg@10"])

  with partitioning.mesh_context(mesh), nn.logical_axis_rules(rules), \
      _Preemption() as preemption:
    first = next(batches)
    compile_start = time.time()
    compiled = jitted.lower(state, _global_batch(first, batch_sharding)).compile()
    _log_compiled(compiled, time.time() - compile_start)
    pending = first
    bar = tqdm.tqdm(total=config.total_steps, initial=start_step, desc="train",
                    disable=not is_chief, dynamic_ncols=True)
    last_metrics: dict[str, float] = {}
    window: list[dict[str, Any]] = []
    window_start = time.time()
    step = start_step
    while step < config.total_steps:
      local = pending if pending is not None else next(batches)
      pending = None
      state, metrics = compiled(state, _global_batch(local, batch_sharding))
      window.append(metrics)
      step += 1
      bar.update(1)
      if step % config.log_every_steps == 0 or step == config.total_steps:
        fetched = jax.device_get(window)
        elapsed = max(time.time() - window_start, 1e-9)
        last_metrics = _summarise(fetched, elapsed)
        writer.write(step, last_metrics)
        bar.set_postfix(loss=f"{last_metrics['loss']:.4f}",
                        tok_s=f"{last_metrics['tokens_per_s']:.0f}")
        window, window_start = [], time.time()
      if stop_at_step is not None and step >= stop_at_step:
        preemption.requested = True
      if step % config.checkpoint_every_steps == 0 or preemption.requested:
        checkpoints.save(manager, step, state, batches.get_state())
      if preemption.requested:
        manager.wait_until_finished()
        bar.close()
        writer.close()
        batches.close()
        logging.warning("Stopped at step %d; rerun the same command to resume.", step)
        return {"preempted": True, "step": step, "metrics": last_metrics}
      if config.eval.every_steps and step % config.eval.every_steps == 0:
        evaluate(step)
    bar.close()
  if manager.latest_step() != step:
    checkpoints.save(manager, step, state, batches.get_state())
  manager.wait_until_finished()
  batches.close()
  final_eval = evaluate(step)
  writer.close()
  result = {"step": step, "metrics": last_metrics, "eval": final_eval,
            "initial_eval": initial_eval}
  if final_eval:
    avg = final_eval["average"]
    line = f"Final nDCG@10 on the held-out split: {avg['ndcg@10']:.4f}"
    if initial_eval:
      line += f" (untrained: {initial_eval['average']['ndcg@10']:.4f})"
    print(line, flush=True)
  return result


def _summarise(window: list[dict[str, Any]], elapsed: float) -> dict[str, float]:
  """Means over the logging window; tokens per second over its wall time."""
  out = {}
  for key in window[-1]:
    values = [np.asarray(m[key], np.float64) for m in window]
    out[key] = float(np.mean(values))
  out["tokens_per_s"] = float(sum(float(m["tokens"]) for m in window) / elapsed)
  out["steps_per_s"] = len(window) / elapsed
  out.pop("tokens", None)
  out["lr"] = float(window[-1]["lr"])
  return out


def _log_compiled(compiled, seconds: float) -> None:
  flops = None
  try:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = cost.get("flops") if cost else None
  except Exception:  # pylint: disable=broad-except  (not every backend reports costs)
    pass
  if flops:
    logging.info("Compiled train step in %.1fs: %.3g FLOPs per step per device.", seconds, flops)
  else:
    logging.info("Compiled train step in %.1fs.", seconds)
