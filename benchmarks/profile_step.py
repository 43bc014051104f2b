"""Where the train step's time goes: its parts timed alone against the whole step.

  python benchmarks/profile_step.py --json=/tmp/profile.json \
    [--preset=minilm] [--model=moe] [--batch=8] [--seq=128] [--trace_dir=DIR]

What it measures: the step of benchmarks/train_step.py (plain, no GradCache)
and, compiled on their own at the step's shapes (2 x batch sequences of seq
tokens: queries and documents), forward + backward of each part:
  embeddings       word (+ type, position) embeddings and their LayerNorm
  attention        one attention half-block: QKV, rotary or not, softmax
                   attention, output projection, residual, LayerNorm (x layers)
  dense_mlp        one dense MLP half-block with residual and LayerNorm
                   (x dense layers)
  moe_layer        one MoE half-block (x MoE layers), split into
    routing          router logits, softmax, top-k and the router statistics
    experts          the grouped matmuls and the activation on an already
                     sorted buffer (the backend's kernel)
    sort_dispatch    the rest: counting sort, scatter into the buffer, gather
                     back, weighted combine, residual and LayerNorm
                     (= moe_layer - routing - experts; a difference of
                     medians, so on a busy machine it can come out below
                     zero when it is smaller than the noise)
  loss             InfoNCE over the global batch on the pooled embeddings
  optimizer        gradient clipping and the AdamW update of every parameter
  other            step - the sum of the parts: pooling, the casts between
                   the parts, and what fusing them in one program saves or costs
A reference row times the experts' FLOPs as two plain dense matmuls
([T*K, D] @ [D, F], [T*K, F] @ [F, D]), the floor for the experts row.

Parts and the step are timed in interleaved rounds (median of --repeats), so a
load change on a shared machine hits all of them alike; shares are of the
measured step. --trace_dir also writes a `jax.profiler` trace of three steps
for TensorBoard / Perfetto: on GPU and TPU it names every kernel; XLA:CPU only
labels its thunks by kind (e.g. one 'ynn_fusion'), which is why the parts are
timed on their own here.
"""

from __future__ import annotations

import os
import sys

from absl import app
from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from moe_embed.model import layers
from moe_embed.model.moe_mlp import MoeMlp
from moe_embed.moe import experts as experts_lib
from moe_embed.moe import grouped_matmul, router_stats, routing
from moe_embed.train import optimizer as optimizer_lib
from moe_embed.train import step as step_lib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import report  # noqa: E402  (benchmarks/report.py)
import step_setup as ts  # noqa: E402  (benchmarks/step_setup.py)
from timing import interleaved  # noqa: E402

_JSON = flags.DEFINE_string("json", None, "Write the rows as a JSON list to this file.")
_PRESET = flags.DEFINE_string("preset", "minilm", "Model preset that gives the width.")
_MODEL = flags.DEFINE_enum("model", "moe", ts.MODELS, "Which of the train_step.py models.")
_BATCH = flags.DEFINE_integer("batch", 8, "Queries per global batch (as many documents).")
_SEQ = flags.DEFINE_integer("seq", 128, "Tokens per query and per document.")
_DTYPE = flags.DEFINE_string("dtype", "float32", "Compute dtype.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed rounds (median).")
_TRACE_DIR = flags.DEFINE_string("trace_dir", None, "Write a jax.profiler trace here.")


class _AttentionHalf(nn.Module):
  config: object

  @nn.compact
  def __call__(self, x, mask):
    return layers.layer_norm(self.config, "norm")(
        x + layers.SelfAttention(self.config, name="attention")(x, mask))


class _MlpHalf(nn.Module):
  config: object
  moe: bool

  @nn.compact
  def __call__(self, x, mask):
    y = (MoeMlp(self.config, name="mlp")(x, mask)[0] if self.moe
         else layers.Mlp(self.config, name="mlp")(x))
    return layers.layer_norm(self.config, "norm")(x + y)


class _Embed(nn.Module):
  config: object

  @nn.compact
  def __call__(self, ids):
    return layers.Embeddings(self.config, name="embeddings")(ids)


def _compiled_grad(loss, *args):
  """Compiled jax.grad of `loss` with respect to every argument, and a runner."""
  fn = jax.jit(jax.grad(loss, argnums=tuple(range(len(args))))).lower(*args).compile()
  return lambda: fn(*args)


def _module_part(module, inputs, diff_input: bool):
  """Forward + backward of a Flax module: grad of sum(out * probe) w.r.t. params (and x)."""
  params = nn.meta.unbox(module.init(jax.random.PRNGKey(1), *inputs))
  out = jax.eval_shape(lambda p: module.apply(p, *inputs), params)
  probe = jax.random.normal(jax.random.PRNGKey(2), out.shape, jnp.float32).astype(out.dtype)
  if diff_input:
    x, rest = inputs[0], inputs[1:]
    return _compiled_grad(lambda p, x: jnp.sum(module.apply(p, x, *rest) * probe), params, x)
  return _compiled_grad(lambda p: jnp.sum(module.apply(p, *inputs) * probe), params)


def build_parts(config, batch: int, seq: int) -> dict:
  """{part name: callable running its compiled forward + backward once}."""
  dtype = jnp.dtype(config.dtype)
  s, d = 2 * batch, config.hidden_size
  rng = np.random.default_rng(0)
  ids = jnp.asarray(rng.integers(4, config.vocab_size, (s, seq)), jnp.int32)
  mask = jnp.ones((s, seq), bool)
  x = jax.random.normal(jax.random.PRNGKey(0), (s, seq, d), jnp.float32).astype(dtype)
  parts = {"embeddings": _module_part(_Embed(config), (ids,), False),
           "attention": _module_part(_AttentionHalf(config), (x, mask), True)}
  if len(config.moe_layers) < config.num_layers:
    parts["dense_mlp"] = _module_part(_MlpHalf(config, moe=False), (x, mask), True)
  if config.moe_layers:
    parts["moe_layer"] = _module_part(_MlpHalf(config, moe=True), (x, mask), True)
    t, k, e, f = s * seq, config.top_k, config.num_experts, config.mlp_dim
    flat = x.reshape(t, d)
    kernel = jax.random.normal(jax.random.PRNGKey(3), (d, e), jnp.float32) * 0.02
    valid = jnp.ones((t,), bool)
    probe_w = jax.random.normal(jax.random.PRNGKey(4), (t, k), jnp.float32)

    def routing_loss(flat, kernel):
      route = routing.route(flat, kernel, valid, k, config.renormalize_topk)
      stats = router_stats.statistics(route)
      return jnp.sum(route.weights * probe_w) + jnp.sum(stats["prob_sum"]) + stats["z_sum"]

    parts["routing"] = _compiled_grad(routing_loss, flat, kernel)
    # The experts alone on a buffer already sorted by a real routing of x.
    name = grouped_matmul.kernel_for_backend(config.grouped_matmul)
    route = routing.route(flat, kernel, valid, k, config.renormalize_topk)
    m = t * k
    expert_ids = route.experts.reshape(m)
    group_sizes = jnp.sum(jax.nn.one_hot(expert_ids, e, dtype=jnp.int32), axis=0)
    tile = grouped_matmul.default_tile(m, e, name)
    layout = grouped_matmul.make_layout(group_sizes, m, tile,
                                        grouped_matmul.default_window(m, e, tile, name))
    positions = grouped_matmul.row_positions(expert_ids, jnp.ones((m,), bool), layout, e)
    buffer = jnp.zeros((layout.num_rows, d), dtype).at[positions].set(
        jnp.repeat(flat, k, axis=0), mode="drop")
    w1 = (jax.random.normal(jax.random.PRNGKey(5), (e, d, f)) * 0.02).astype(dtype)
    w2 = (jax.random.normal(jax.random.PRNGKey(6), (e, f, d)) * 0.02).astype(dtype)
    probe_b = jax.random.normal(jax.random.PRNGKey(7), (layout.num_rows, d)).astype(dtype)

    def experts_loss(buffer, w1, w2):
      h = experts_lib.expert_activation(grouped_matmul.gmm(buffer, w1, layout, name), None)
      return jnp.sum(grouped_matmul.gmm(h, w2, layout, name) * probe_b)

    parts["experts"] = _compiled_grad(experts_loss, buffer, w1, w2)
    rows = buffer[:m]
    probe_m = probe_b[:m]
    parts["experts_as_dense_matmuls"] = _compiled_grad(
        lambda r, a, b: jnp.sum(jax.nn.gelu(r @ a, approximate=False) @ b * probe_m),
        rows, w1[0], w2[0])
  emb = jax.random.normal(jax.random.PRNGKey(8), (2, batch, config.embedding_dim))
  emb = emb / jnp.linalg.norm(emb, axis=-1, keepdims=True)
  loss_cfg = step_lib.LossConfig()
  parts["loss"] = _compiled_grad(
      lambda q, p: step_lib.contrastive_loss(q, p, None, 0.02, loss_cfg), emb[0], emb[1])
  configs = {_MODEL.value: config}
  params = jax.device_put(ts.model_params(_MODEL.value, configs))
  full = {"model": params, "log_temperature": jnp.zeros((), jnp.float32)}
  optimizer, _ = optimizer_lib.make_optimizer(optimizer_lib.OptimizerConfig(warmup_steps=10), 100)
  opt_state = optimizer.init(full)
  grads = jax.tree.map(lambda p: p * 1e-3, full)

  def update(grads, opt_state, params):
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  opt_fn = jax.jit(update).lower(grads, opt_state, full).compile()
  parts["optimizer"] = lambda: opt_fn(grads, opt_state, full)
  return parts


def main(argv):
  del argv
  config = ts.model_configs(_PRESET.value, _DTYPE.value)[_MODEL.value]
  b, seq = _BATCH.value, _SEQ.value
  print(f"jax {jax.__version__}, backend {jax.default_backend()}; {_PRESET.value} "
        f"{_MODEL.value} ({config.num_layers} layers, {len(config.moe_layers)} MoE), "
        f"{_DTYPE.value}, batch {b} + {b} x {seq} tokens; median of {_REPEATS.value} "
        "interleaved rounds")
  params = ts.model_params(_MODEL.value, {_MODEL.value: config})
  compiled, state, data, _ = ts.build_step(config, params, ts.make_batch(config, b, seq), 0)
  step = ts.Runner(compiled, state, data)
  parts = build_parts(config, b, seq)

  _, times, _ = interleaved({"step": step, **parts}, _REPEATS.value)
  ms = {name: float(np.median(v)) * 1e3 for name, v in times.items()}
  n_moe = len(config.moe_layers)
  n_dense = config.num_layers - n_moe
  count = {"embeddings": 1, "attention": config.num_layers, "dense_mlp": n_dense,
           "moe_layer": n_moe, "routing": n_moe, "experts": n_moe,
           "experts_as_dense_matmuls": n_moe, "loss": 1, "optimizer": 1}
  rows = []
  if n_moe:
    ms["sort_dispatch"] = ms["moe_layer"] - ms["routing"] - ms["experts"]
    count["sort_dispatch"] = n_moe
  top = ["embeddings", "attention", "dense_mlp", "moe_layer", "loss", "optimizer"]
  accounted = sum(ms[p] * count[p] for p in top if p in ms)
  ms["other"] = ms["step"] - accounted
  count["other"] = 1
  order = ["embeddings", "attention", "dense_mlp", "moe_layer", "routing", "experts",
           "sort_dispatch", "loss", "optimizer", "other", "experts_as_dense_matmuls"]
  print(f"whole step: {ms['step']:.1f} ms")
  header = f"{'part':>26s} {'ms_each':>9s} {'times':>5s} {'ms_total':>9s} {'share':>6s}"
  print(header)
  print("-" * len(header))
  for name in order:
    if name not in ms:
      continue
    total = ms[name] * count[name]
    label = ("  " + name) if name in ("routing", "experts", "sort_dispatch") else name
    if name == "experts_as_dense_matmuls":
      label = "(reference) " + name
    print(f"{label:>26s} {ms[name]:9.1f} {count[name]:5d} {total:9.1f} "
          f"{total / ms['step']:6.1%}")
    rows.append({"part": name, "ms_each": round(ms[name], 2), "count": count[name],
                 "ms_total": round(total, 2), "share": round(total / ms["step"], 4)})
  rows.append({"part": "step", "ms_each": round(ms["step"], 2), "count": 1,
               "ms_total": round(ms["step"], 2), "share": 1.0})
  if _TRACE_DIR.value:
    jax.profiler.start_trace(_TRACE_DIR.value)
    for _ in range(3):
      step()
    jax.profiler.stop_trace()
    print(f"Wrote a profiler trace of 3 steps to {_TRACE_DIR.value}")
  report.write_json(_JSON.value, rows)


if __name__ == "__main__":
  app.run(main)
