"""The training job: set up, train, evaluate; checkpoints, logs and resumption.

`train_and_evaluate(config, workdir)` is everything `launch/train.py` does, so
tests and colabs call the same code. Rerunning on the same workdir resumes from
the latest checkpoint (parameters, optimizer, step and data position).
"""

from __future__ import annotations

import dataclasses
import signal
import time
from typing import TYPE_CHECKING, Any, Optional, Sequence

from absl import logging
from etils import epath
import jax
import ml_collections
import numpy as np
import tqdm

from moe_embed import data as data_lib  # TFDS: imported only when a run opens the data.
from moe_embed import partitioning, storage
from moe_embed.io import checkpoints, model_folder
from moe_embed.model.encoder import EmbeddingModel
from moe_embed.train import config as run_config
from moe_embed.train import optimizer as optimizer_lib
from moe_embed.train import state as state_lib
from moe_embed.train import step as step_lib
from moe_embed.train import workdir as workdir_lib
from moe_embed.train.config import ConfigError
from moe_embed.train.metric_writer import MetricWriter

if TYPE_CHECKING:  # Types of the annotations only (never evaluated at run time).
  from moe_embed.inference import Embedder
  import orbax.checkpoint as ocp

__all__ = ["ConfigError", "OutOfMemory", "TrainingDiverged", "train_and_evaluate"]


class TrainingDiverged(RuntimeError):
  """The loss or gradient norm became non-finite; nothing after the last good step was saved."""


class OutOfMemory(RuntimeError):
  """The train step does not fit in device memory (XLA RESOURCE_EXHAUSTED)."""


@dataclasses.dataclass
class _Run:
  """Everything a run holds between setup and the end.

  `state` advances every step, and `planned_bytes` / `signal_received` are
  filled in by the loop; the other fields are set once by `_setup`.
  """

  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  rules: partitioning.Rules
  state: step_lib.TrainState
  start_step: int
  step_fn: jax.stages.Wrapped  # jitted (state, batch) -> (state, metrics), state donated
  batch_sharding: jax.sharding.NamedSharding
  batches: data_lib.TrainIterator
  manager: ocp.CheckpointManager
  writer: MetricWriter
  evaluator: _Evaluator
  is_chief: bool
  planned_bytes: Optional[int] = None  # Per device, from the compiled step's memory analysis.
  signal_received: Optional[str] = None  # 'SIGTERM' or 'SIGINT' once one stopped the run.


class _Evaluator:
  """Retrieval on BEIR folders with one sharded forward, built once for the whole run.

  The forward takes the train state's parameters where they are (sharded, on
  device) and runs under the run's mesh and rules, so the evaluations at the
  start, during and at the end are the same program. Parameters are passed to
  each `run` and bound for that call only (Embedder.with_params): nothing keeps
  them once it returns, so the next train step may donate their buffers.
  """

  def __init__(self, config: ml_collections.ConfigDict, embedder: Embedder,
               beir_dirs: Sequence[str], writer: MetricWriter):
    self.config, self.embedder, self.beir_dirs, self.writer = config, embedder, beir_dirs, writer
    self._last: tuple[int, dict[str, Any]] | None = None  # (step, results)

  def run(self, step: int, model_params: Any) -> dict[str, Any]:
    """Scores the model parameters of `step`; a step already scored (the last periodic
    evaluation is also the final one) returns its results again."""
    if not self.beir_dirs:
      return {}
    if self._last is not None and self._last[0] == step:
      return self._last[1]
    from moe_embed.evaluation import evaluate_beir
    results = evaluate_beir(self.embedder.with_params(model_params), self.beir_dirs,
                            dim=self.config.eval.dim or None,
                            batch_size=self.config.eval.batch_size)
    self.writer.write(step, {f"eval/{name}/{k}": v for name, r in results.items()
                             for k, v in r.items() if isinstance(v, (int, float))})
    self._last = (step, results)
    return results


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       stop_at_step: Optional[int] = None) -> dict[str, Any]:
  """Trains (or resumes) in `workdir`; returns the final evaluation and last metrics.

  `stop_at_step` ends the run early as a preemption would (checkpoint, return),
  leaving the schedule of `config.total_steps` intact for the resumed run.
  The run holds the workdir's lock throughout (workdir.WorkdirLock).
  """
  storage.check_bucket(workdir)  # Before any work, not at the first checkpoint.
  lock = workdir_lib.WorkdirLock(workdir) if jax.process_index() == 0 else None
  if lock is not None:
    lock.acquire()
  try:
    return _train_and_evaluate(config, workdir, stop_at_step)
  finally:
    if lock is not None:
      lock.release()


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                        stop_at_step: Optional[int]) -> dict[str, Any]:
  run = _setup(config, workdir)
  initial_eval = None
  if config.eval.at_start and run.start_step == 0 and run.evaluator.beir_dirs:
    initial_eval = run.evaluator.run(0, run.state.params["model"])
    logging.info("Untrained model: nDCG@10 %.4f", initial_eval["average"]["ndcg@10"])
  try:
    step, last_metrics, preempted = _train(run, stop_at_step)
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    raise _out_of_memory(e, config, run.planned_bytes) from None
  if preempted:
    logging.warning("Stopped at step %d; rerun the same command to resume.", step)
    return {"preempted": True, "step": step, "metrics": last_metrics,
            "signal": run.signal_received}
  final_eval = run.evaluator.run(step, run.state.params["model"])
  run.writer.close()
  if final_eval:
    line = f"Final nDCG@10 on the held-out split: {final_eval['average']['ndcg@10']:.4f}"
    if initial_eval:
      line += f" (untrained: {initial_eval['average']['ndcg@10']:.4f})"
    print(line, flush=True)
  return {"step": step, "metrics": last_metrics, "eval": final_eval,
          "initial_eval": initial_eval}


def _setup(config: ml_collections.ConfigDict, workdir: str) -> _Run:
  """Checks the config, then builds the model, state, data, step and evaluator."""
  from moe_embed.tokenizers import load_tokenizer

  run_config.check_config(config)
  encoder_config, start_params, model_meta = run_config.resolve_encoder(config)
  # A changed architecture stops here, before config.json and model.json are rewritten.
  workdir_lib.check_resume(workdir, encoder_config, config)
  loss_cfg = run_config.loss_config(config, encoder_config.embedding_dim)
  run_config.check_eval(config, encoder_config.embedding_dim)
  opt_cfg = run_config.optimizer_config(config)
  inputs = run_config.input_config(config)
  mesh, rules = run_config.mesh_and_rules(config)
  shards = partitioning.batch_shards(mesh, rules)
  run_config.check_batch(config, shards)
  run_config.check_experts(encoder_config, mesh.shape["expert"])

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
  beir_dirs = _beir_dirs(config, data_dir)

  is_chief = jax.process_index() == 0
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  if is_chief:
    (epath.Path(workdir) / "config.json").write_text(config.to_json_best_effort(indent=2))
    model_folder.write_meta(
        workdir, encoder_config, tokenizer=tokenizer_path,
        query_prefix=inputs.query_prefix, doc_prefix=inputs.doc_prefix,
        max_length=model_folder.token_limit(encoder_config, model_meta),
        train_max_length=int(max(inputs.max_query_len, inputs.max_doc_len)))

  model = EmbeddingModel(encoder_config)
  optimizer, schedule = optimizer_lib.make_optimizer(opt_cfg, config.total_steps)
  state, abstract_state, state_shardings = state_lib.create_state(
      model, optimizer, mesh, rules, config.seed, start_params, loss_cfg.temperature)
  manager = checkpoints.make_manager(workdir, config.keep_checkpoints)
  data_state = None
  if manager.latest_step() is not None:
    state, data_state, step = checkpoints.restore(manager, abstract_state)
    logging.info("Resumed from step %d in %s.", step, workdir)

  batches = data_lib.make_train_iterator(
      data_dir, inputs=inputs, tokenizer=tokenizer, global_batch_size=config.batch_size,
      seed=config.seed, process_index=jax.process_index(),
      process_count=jax.process_count(), state=data_state,
      pack_units=data_lib.pipeline.pack_units(config.batch_size, config.grad_cache_chunk,
                                              shards),
      pack_chunks=data_lib.pipeline.pack_chunks(config.batch_size, config.grad_cache_chunk))
  jitted, batch_sharding = step_lib.jit_train_step(
      model, optimizer, loss_cfg, schedule, config.grad_cache_chunk, mesh, rules,
      state_shardings)
  # Rows logged after the restored step belong to a run that was lost: drop them.
  writer = MetricWriter(workdir, enabled=is_chief,
                        resume_step=int(state.step) if data_state is not None else None)
  evaluator = _Evaluator(config, _eval_embedder(config, encoder_config, tokenizer, mesh, rules,
                                               state_shardings.params["model"]),
                         beir_dirs, writer)
  return _Run(config=config, mesh=mesh, rules=rules, state=state, start_step=int(state.step),
              step_fn=jitted, batch_sharding=batch_sharding, batches=batches, manager=manager,
              writer=writer, evaluator=evaluator, is_chief=is_chief)


def _eval_embedder(config: ml_collections.ConfigDict, encoder_config, tokenizer,
                   mesh: jax.sharding.Mesh, rules: partitioning.Rules,
                   param_shardings: Any) -> Embedder:
  """The evaluations' Embedder: sharded like the train state, parameters given per run."""
  from moe_embed import inference
  return inference.Embedder(
      encoder_config, None, tokenizer, max_length=config.eval.max_length,
      query_prefix=config.input.query_prefix, doc_prefix=config.input.doc_prefix,
      mesh=mesh, rules=rules, param_shardings=param_shardings)


def _beir_dirs(config: ml_collections.ConfigDict, data_dir: str) -> list[str]:
  if not config.eval.enabled:
    return []
  dirs = [d for d in config.eval.beir.split(",") if d] or data_lib.heldout_beir_dirs(data_dir)
  missing = [d for d in dirs if not epath.Path(d).is_dir()]
  if missing:
    raise ConfigError(f"eval.beir names folders that do not exist: {missing}.")
  return dirs


def _train(run: _Run, stop_at_step: Optional[int]) -> tuple[int, dict[str, float], bool]:
  """The loop: steps, logs, checkpoints, evaluations. -> (step, last metrics, preempted)."""
  config = run.config
  with partitioning.activate(run.mesh, run.rules), _Preemption() as preemption:
    first = next(run.batches)
    steps = _compile_steps(run, first)
    pending = first
    bar = tqdm.tqdm(total=config.total_steps, initial=run.start_step, desc="train",
                    disable=not run.is_chief, dynamic_ncols=True)
    last_metrics: dict[str, float] = {}
    window: list[dict[str, Any]] = []
    window_start = time.time()
    step = run.start_step
    peak = peak_flops(config)
    while step < config.total_steps:
      local = pending if pending is not None else next(run.batches)
      pending = None
      compiled = steps.get(_shape_key(local))
      if compiled is None:
        raise RuntimeError(f"Step {step + 1}'s batch has shapes {_shape_key(local)}, none of "
                           f"the {len(steps)} compiled at start-up; the iterator's "
                           "row_shapes must list every packed shape it yields.")
      run.state, metrics = compiled(run.state, _global_batch(local, run.batch_sharding))
      window.append(metrics)
      step += 1
      bar.update(1)
      checkpoints.check_saves(run.manager, step)  # A failed save stops the run here.
      if step % config.log_every_steps == 0 or step == config.total_steps:
        fetched = jax.device_get(window)
        _check_finite(run, fetched, step)
        last_metrics = _summarise(fetched, max(time.time() - window_start, 1e-9), peak)
        if len(fetched) < config.log_every_steps:  # After a resume, or the last window.
          last_metrics["window_steps"] = len(fetched)
        run.writer.write(step, last_metrics)
        bar.set_postfix(loss=f"{last_metrics['loss']:.4f}",
                        tok_s=f"{last_metrics['tokens_per_s']:.0f}")
        window, window_start = [], time.time()
        checkpoints.check_saves(run.manager, step)
      if stop_at_step is not None and step >= stop_at_step:
        preemption.requested = True
      if step % config.checkpoint_every_steps == 0 or preemption.requested:
        _check_finite(run, jax.device_get(window), step)  # Never save a diverged state.
        checkpoints.check_saves(run.manager, step)
        checkpoints.save(run.manager, step, run.state, run.batches.get_state())
      if preemption.requested:
        break
      if config.eval.every_steps and step % config.eval.every_steps == 0:
        run.evaluator.run(step, run.state.params["model"])
    bar.close()
  if not preemption.requested and run.manager.latest_step() != step:
    checkpoints.save(run.manager, step, run.state, run.batches.get_state())
  run.manager.wait_until_finished()
  checkpoints.check_saves(run.manager, step)
  run.batches.close()
  if preemption.requested:
    run.writer.close()
  run.signal_received = preemption.signal_name
  return step, last_metrics, preemption.requested


def _check_finite(run: _Run, window: list[dict[str, Any]], step: int) -> None:
  """Raises TrainingDiverged if a step of the window has a non-finite loss or gradient norm."""
  first = step - len(window) + 1
  for offset, metrics in enumerate(window):
    loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
    if np.isfinite(loss) and np.isfinite(grad_norm):
      continue
    run.manager.wait_until_finished()
    good = run.manager.latest_step()
    where = (f"the last good checkpoint is step {good} in {run.manager.directory}, and a "
             "rerun resumes from it" if good is not None else "no checkpoint was saved")
    raise TrainingDiverged(
        f"Training diverged at step {first + offset}: loss={loss}, grad_norm={grad_norm}. "
        f"Nothing after it was saved; {where}. Lower optimizer.learning_rate (now "
        f"{run.config.optimizer.learning_rate}) or raise optimizer.warmup_steps.")


def _shape_key(batch: dict[str, np.ndarray]) -> tuple:
  """What tells one compiled step from another: the shapes of the batch's arrays."""
  return tuple(sorted((k, v.shape) for k, v in batch.items()))


def _compile_steps(run: _Run, first: dict[str, np.ndarray]) -> dict[tuple, Any]:
  """The train step compiled for every batch shape the iterator yields, keyed by
  `_shape_key`: one, or with input.pack_shapes one per row count, all at start-up
  so that no step compiles midway. Sets `run.planned_bytes` to the largest plan."""
  shapes = {_shape_key(first): first}
  packed = run.batches.packing
  units = run.batches.local_units if packed else 0
  rows_shaped = ("packed_ids", "packed_segment_ids", "packed_positions")  # [units * rows, L]
  for rows in run.batches.row_shapes if packed else []:
    # Stand-in batch of that shape (only lowered, never run).
    batch = {k: np.zeros((units * rows,) + v.shape[1:], v.dtype) if k in rows_shaped else v
             for k, v in first.items()}
    shapes.setdefault(_shape_key(batch), batch)
  steps, planned = {}, []
  for key, batch in shapes.items():
    start = time.time()
    compiled = run.step_fn.lower(run.state, _global_batch(batch, run.batch_sharding)).compile()
    rows = (f" for {batch['packed_ids'].shape[0] // units} rows per packing unit"
            if len(shapes) > 1 else "")
    _log_compiled(compiled, time.time() - start, rows)
    steps[key] = compiled
    planned.append(_planned_bytes(compiled))
  run.planned_bytes = max((p for p in planned if p is not None), default=None)
  return steps


def _global_batch(local: dict[str, np.ndarray], sharding) -> dict[str, jax.Array]:
  """Per-process numpy rows -> global jax arrays sharded over the batch axis."""
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


class _Preemption:
  """Turns SIGTERM and SIGINT (Ctrl-C) into a flag the loop checks, so it can checkpoint
  and exit; a second Ctrl-C stops at once."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.requested = False
    self.signal_name: Optional[str] = None
    self._previous: dict[int, Any] = {}

  def __enter__(self):
    for signum in self.SIGNALS:
      try:
        self._previous[signum] = signal.signal(signum, self._handle)
      except ValueError:  # Not the main thread (e.g. some notebook runners).
        pass
    return self

  def _handle(self, signum, frame):
    del frame
    name = signal.Signals(signum).name
    logging.warning("%s received: saving a checkpoint, then exiting.", name)
    self.requested = True
    self.signal_name = self.signal_name or name
    if signum == signal.SIGINT:  # A second Ctrl-C is a KeyboardInterrupt again.
      signal.signal(signal.SIGINT, self._previous.get(signum, signal.default_int_handler))

  def __exit__(self, *exc):
    for signum, previous in self._previous.items():
      if previous is not None:
        signal.signal(signum, previous)


def peak_flops(config: ml_collections.ConfigDict) -> float:
  """Peak FLOP/s of all devices: config.peak_flops_per_device, else a TPU generation's
  (moe_embed.train.aot.CHIPS, bfloat16), else 0 (unknown: no mfu is reported)."""
  devices = jax.devices()
  per_device = float(config.get("peak_flops_per_device", 0.0) or 0.0)
  if not per_device and devices[0].platform == "tpu":
    from moe_embed.train import aot
    kind = devices[0].device_kind.lower().replace("tpu", "").replace(" ", "")  # 'v5lite'
    name = {"v5": "v5p", "v5lite": "v5e", "v6lite": "v6e"}.get(kind, kind)
    chip = aot.CHIPS.get(name)
    per_device = chip.peak_bf16_flops if chip else 0.0
  return per_device * len(devices)


def _summarise(window: list[dict[str, Any]], elapsed: float, peak: float = 0.0
               ) -> dict[str, float]:
  """Means over the logging window; tokens (real ones) and model FLOPs of the real tokens
  per second over its wall time, and mfu = those FLOPs / `peak` where it is known."""
  out = {}
  for key in window[-1]:
    values = [np.asarray(m[key], np.float64) for m in window]
    out[key] = float(np.mean(values))
  out["tokens_per_s"] = float(sum(float(m["tokens"]) for m in window) / elapsed)
  out["steps_per_s"] = len(window) / elapsed
  out.pop("tokens", None)
  if "model_flops" in out:
    out["model_flops_per_s"] = float(sum(float(m["model_flops"]) for m in window) / elapsed)
    out.pop("model_flops")
    if peak:
      out["mfu"] = out["model_flops_per_s"] / peak
  out["lr"] = float(window[-1]["lr"])
  return out


def _planned_bytes(compiled) -> Optional[int]:
  """Bytes per device the compiled step needs: arguments, outputs and temporaries."""
  try:
    m = compiled.memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
               + m.temp_size_in_bytes + m.generated_code_size_in_bytes)
  except Exception:  # pylint: disable=broad-except  (not every backend reports memory)
    return None


def _out_of_memory(error: Exception, config: ml_collections.ConfigDict,
                   planned: Optional[int]) -> OutOfMemory:
  """One line: the batch, the bytes planned and asked for, and the fields that lower them."""
  import re
  asked = re.search(r"allocate ([0-9.]+\s*[KMGT]?i?B|[0-9]+ bytes)", str(error))
  limit = None
  try:
    limit = (jax.local_devices()[0].memory_stats() or {}).get("bytes_limit")
  except Exception:  # pylint: disable=broad-except  (CPU devices report no memory stats)
    pass
  gib = lambda n: f"{n / 2**30:.2f} GiB"
  sizes = []
  if planned:
    sizes.append(f"the step plans {gib(planned)} per device")
  if asked:
    sizes.append(f"an allocation of {asked.group(1)} failed")
  if limit:
    sizes.append(f"the device has {gib(limit)}")
  tokens = max(int(config.input.max_query_len), int(config.input.max_doc_len))
  return OutOfMemory(
      f"Out of device memory for a batch of batch_size={config.batch_size} x {tokens} tokens"
      f" ({'; '.join(sizes) or 'XLA RESOURCE_EXHAUSTED'}). Lower batch_size, set "
      f"grad_cache_chunk (now {config.grad_cache_chunk}) to a divisor of batch_size, or set "
      f"encoder.remat=True (now {config.encoder.get('remat', False)}).")


def _log_compiled(compiled, seconds: float, what: str = "") -> None:
  flops = None
  try:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = cost.get("flops") if cost else None
  except Exception:  # pylint: disable=broad-except  (not every backend reports costs)
    pass
  if flops:
    logging.info("Compiled train step%s in %.1fs: %.3g FLOPs per step per device.", what,
                 seconds, flops)
  else:
    logging.info("Compiled train step%s in %.1fs.", what, seconds)
