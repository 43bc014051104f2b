"""Accelerator check: MoE correctness first, then train-step throughput and MFU.

  python benchmarks/accelerator_check.py --json=/tmp/accelerator_check.json
  JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=4 \
    python benchmarks/accelerator_check.py --cpu_smoke      # the same code, tiny sizes

Run by benchmarks/accelerator_check.sh on a GPU or TPU host. In order:
1. ragged_dot == capacity: one MoE block (nomic_v2_moe width) on the dropless
   path with `jax.lax.ragged_dot` against the capacity path with capacity for
   every token (capacity_factor = E / K, so C = S and nothing drops): outputs
   and gradients, float32 at 'highest' matmul precision.
2. EP == one device: the plain train step's loss and gradients with the experts
   sharded over all local devices (mesh data x expert, expert = the largest
   divisor of 8 that divides the device count) against one device, with each
   token exchange ('padded' all_to_all, 'ragged' ragged_all_to_all). Skipped,
   and said so, on a one-device host.
2b. The ragged exchange on the backend's own `jax.lax.ragged_all_to_all` (even
   over a single device) against `ragged_all_to_all_reference` and against
   local experts, on a nomic-width MoE block with random and with skewed
   routing: outputs and gradients. On CPU (no such collective) it runs the
   reference alone and says so.
3. The train step of nomic_v2_moe (12 layers, 768 wide, 8 experts top-2 on 6
   layers, vocabulary 250,048) at --seq tokens in --dtype, data-parallel over
   all local devices: step time, tokens/s and MFU against the bf16 matmul peak
   measured in the same process (the best of square matmuls of --peak_sizes).
   The batch is --batch or, when 0, the largest power of two per device whose
   compiled step fits --memory_fraction of the device memory, found from XLA's
   memory analysis (compiles only; the memory of a step is affine in the batch).
Correctness failures exit with status 1 after printing what differed; the
timing stage still runs so the numbers come back with the failure.
"""

from __future__ import annotations

import math
import os
import sys
import time

from absl import app
from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moe_embed import partitioning
from moe_embed.model import config as model_config
from moe_embed.model.encoder import EmbeddingModel, init_params
from moe_embed.model.moe_mlp import MoeMlp
from moe_embed.moe import expert_parallel, experts, grouped_matmul, routing
from moe_embed.train import step as step_lib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import report  # noqa: E402  (benchmarks/report.py)
import step_setup as ts  # noqa: E402  (benchmarks/step_setup.py)
import timing  # noqa: E402  (benchmarks/timing.py)

_JSON = flags.DEFINE_string("json", None, "Write the results as JSON to this file.")
_CPU_SMOKE = flags.DEFINE_bool("cpu_smoke", False,
                               "Tiny sizes on CPU: the same code path, to check the script.")
_SEQ = flags.DEFINE_integer("seq", 512, "Tokens per query and per document in stage 3.")
_DTYPE = flags.DEFINE_string("dtype", "bfloat16", "Compute dtype of stage 3.")
_BATCH = flags.DEFINE_integer("batch", 0, "Global queries per step; 0 = the largest that fits.")
_MAX_BATCH_PER_DEVICE = flags.DEFINE_integer("max_batch_per_device", 256,
                                             "Upper end of the batch search.")
_MEMORY_FRACTION = flags.DEFINE_float("memory_fraction", 0.85,
                                      "Share of device memory the step may plan to use.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed steps (median).")
_PEAK_SIZES = flags.DEFINE_list("peak_sizes", ["4096", "8192", "16384"],
                                "Square matmul sizes for the peak; the best counts.")
_MODELS = flags.DEFINE_list("models", ["moe"],
                            "Stage-3 models: moe, and optionally dense_active, dense_total.")


def _close(name, got, want, rtol, atol, failures):
  """Compares two trees; records the worst relative error and any failure."""
  worst = 0.0
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
    g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
    err = np.max(np.abs(g - w) / (atol + rtol * np.abs(w))) if g.size else 0.0
    worst = max(worst, float(err))
    if not np.allclose(g, w, rtol=rtol, atol=atol):
      failures.append(f"{name}: {jax.tree_util.keystr(path)} differs: max abs diff "
                      f"{np.max(np.abs(g - w)):.3g}")
  return worst


def check_ragged_dot_vs_capacity(smoke: bool, failures: list) -> dict:
  """Stage 1: the dropless ragged_dot block equals the capacity block with ample capacity."""
  width = "tiny" if smoke else "nomic_v2_moe"
  base = model_config.preset(width, dtype="float32")
  seq, groups = (32, 4) if smoke else (128, 32)
  dropless = MoeMlp(base.replace(moe_dispatch="dropless", grouped_matmul="ragged_dot"))
  capacity = MoeMlp(base.replace(moe_dispatch="capacity",
                                 capacity_factor=base.num_experts / base.top_k))
  x = jax.random.normal(jax.random.PRNGKey(0), (groups, seq, base.hidden_size))
  lengths = jax.random.randint(jax.random.PRNGKey(1), (groups,), seq // 2, seq + 1)
  mask = jnp.arange(seq)[None] < lengths[:, None]
  params = nn.meta.unbox(dropless.init(jax.random.PRNGKey(2), x, mask))
  probe = jax.random.normal(jax.random.PRNGKey(3), x.shape)

  def run(module):
    def loss(p, x):
      y, metrics = module.apply(p, x, mask)
      return jnp.sum(y * probe * mask[..., None]), (y, metrics["dropped"])

    (_, (y, dropped)), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1),
                                                          has_aux=True))(params, x)
    return y * mask[..., None], grads, dropped

  with jax.default_matmul_precision("highest"):
    y1, g1, _ = run(dropless)
    y2, g2, dropped = run(capacity)
  if float(dropped):
    failures.append(f"ragged_dot vs capacity: the capacity path dropped {float(dropped)} "
                    "assignments with capacity_factor = E / K")
  n = len(failures)
  err_y = _close("ragged_dot vs capacity, output", y1, y2, 1e-4, 1e-5, failures)
  err_g = _close("ragged_dot vs capacity, gradients", g1, g2, 1e-4, 1e-5, failures)
  ok = len(failures) == n
  print(f"[1] ragged_dot dropless == capacity (C = S): {'ok' if ok else 'FAILED'} "
        f"(worst error / tolerance: output {err_y:.2g}, gradients {err_g:.2g})", flush=True)
  return {"ok": ok, "output_error_ratio": err_y, "grad_error_ratio": err_g}


def check_expert_parallel(smoke: bool, failures: list) -> dict:
  """Stage 2: loss and gradients with experts over all local devices == one device."""
  devices = jax.local_devices()
  config = model_config.preset("tiny" if smoke else "nomic_v2_moe", vocab_size=1024,
                               num_layers=2, dtype="float32")
  ep = max([e for e in range(1, config.num_experts + 1)
            if config.num_experts % e == 0 and len(devices) % e == 0])
  if ep < 2:
    print(f"[2] EP == one device: skipped ({len(devices)} local device)", flush=True)
    return {"ok": None, "skipped": f"{len(devices)} local device"}
  params = {"model": nn.meta.unbox(init_params(config, jax.random.PRNGKey(0))),
            "log_temperature": jnp.asarray(math.log(0.05), jnp.float32)}
  cfg = step_lib.LossConfig(learn_temperature=True, load_balancing_coef=1.0, z_loss_coef=1e-3)
  rng = np.random.default_rng(0)
  b, length = 2 * len(devices), 32
  batch = {}
  for key in ("query", "doc"):
    ids = rng.integers(4, config.vocab_size, (b, length)).astype(np.int32)
    mask = np.arange(length) < rng.integers(4, length + 1, (b, 1))
    batch[f"{key}_ids"] = np.where(mask, ids, config.pad_token_id).astype(np.int32)
    batch[f"{key}_mask"] = mask.astype(np.int32)
  step = lambda config: jax.jit(lambda p, x: step_lib.plain_loss_and_grads(
      EmbeddingModel(config), config, cfg, p, x))
  out = {"expert": ep}
  with jax.default_matmul_precision("highest"):
    single = jax.device_put((params, batch), devices[0])
    loss1, _, grads1 = step(config)(*single)
    mesh = partitioning.make_mesh(-1, ep, devices)
    out["data"] = int(mesh.shape["data"])
    rules = partitioning.DEFAULT_RULES
    for exchange in expert_parallel.EXCHANGES:
      fn = step(config.replace(expert_exchange=exchange))
      with partitioning.activate(mesh, rules):
        boxed = jax.eval_shape(lambda: {"model": init_params(config, jax.random.PRNGKey(0)),
                                        "log_temperature": jnp.zeros(())})
        sharded = jax.device_put(params, partitioning.logical_shardings(boxed, mesh, rules))
        data = jax.device_put(batch, partitioning.batch_sharding(mesh, rules))
        loss2, _, grads2 = fn(sharded, data)
        exchanges = "all-to-all" in fn.lower(sharded, data).compile().as_text()
      n = len(failures)
      if not exchanges:
        failures.append(f"EP ({exchange}): the compiled step has no all-to-all")
      _close(f"EP ({exchange}) loss", loss2, loss1, 1e-4, 1e-6, failures)
      err = _close(f"EP ({exchange}) gradients", grads2["model"], grads1["model"], 1e-4, 1e-5,
                   failures)
      ok = len(failures) == n
      print(f"[2] EP ({mesh.shape['data']} data x {ep} expert, {exchange} exchange) == one "
            f"device: {'ok' if ok else 'FAILED'} (worst gradient error / tolerance {err:.2g})",
            flush=True)
      out[exchange] = {"ok": ok, "grad_error_ratio": err}
  out["ok"] = all(out[e]["ok"] for e in expert_parallel.EXCHANGES)
  return out


def check_ragged_exchange(smoke: bool, failures: list) -> dict:
  """Stage 2b: the native ragged_all_to_all exchange == its reference == local experts."""
  devices = jax.local_devices()
  native = jax.default_backend() in expert_parallel.NATIVE_RAGGED_BACKENDS
  e, k = 8, 2
  d, f = (64, 128) if smoke else (768, 3072)
  ep = max(n for n in range(1, e + 1) if e % n == 0 and len(devices) % n == 0)
  t = 64 * len(devices)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(t, d)), jnp.float32)
  valid = jnp.asarray(rng.random(t) > 0.1)
  w1, w2 = (jnp.asarray(rng.normal(size=s) / math.sqrt(s[1]), jnp.float32)
            for s in [(e, d, f), (e, f, d)])
  random_route = routing.route(x, jnp.asarray(rng.normal(size=(d, e)), jnp.float32), valid, k,
                               False)
  # Skewed: every token to experts 0 and 1, which live on one device.
  skewed_route = routing.Routing(jnp.tile(jnp.arange(k, dtype=jnp.int32), (t, 1)),
                                 random_route.weights, random_route.probs, random_route.logits,
                                 valid)
  kernel = grouped_matmul.kernel_for_backend("auto")
  mesh = partitioning.make_mesh(-1, ep, devices)
  where = expert_parallel.Placement(mesh, ("expert",), ("data", "expert"))
  n = len(failures)
  worst = 0.0
  with jax.default_matmul_precision("highest"), partitioning.mesh_context(mesh):
    for name, route in (("random", random_route), ("skewed", skewed_route)):
      def loss(fn):
        return jax.jit(jax.value_and_grad(
            lambda x, w1, w2: jnp.sum(jnp.sin(fn(x, w1, w2))), argnums=(0, 1, 2)))

      want = loss(lambda x, w1, w2: experts.dropless_experts(x, route, w1, w2,
                                                             kernel=kernel))(x, w1, w2)
      paths = {"reference": False} | ({"native": True} if native else {})
      for path, use_native in paths.items():
        got = loss(lambda x, w1, w2: expert_parallel.dropless(
            x, route, w1, w2, where=where, kernel=kernel, exchange="ragged",
            native_ragged=use_native))(x, w1, w2)
        worst = max(worst, _close(f"ragged exchange ({path}, {name} routing)", got, want,
                                  1e-4, 1e-5, failures))
  ok = len(failures) == n
  used = "ragged_all_to_all" if native else "the all_to_all reference only (no native collective)"
  print(f"[2b] ragged exchange over {ep} device(s), {used}, == local experts: "
        f"{'ok' if ok else 'FAILED'} (worst error / tolerance {worst:.2g})", flush=True)
  return {"ok": ok, "native": native, "expert": ep, "error_ratio": worst}


def _build(config, params, b, seq, mesh):
  built = ts.build_step(config, params, ts.make_batch(config, b, seq), 0, mesh=mesh)
  return built, timing.memory_gb(built[0])


def largest_batch(config, params, seq: int, smoke: bool, mesh):
  """(batch, why, built step): the largest power-of-two batch per device that fits."""
  n = jax.device_count()
  if _BATCH.value or smoke:
    b = _BATCH.value or 2 * n
    return b, "--batch" if _BATCH.value else "smoke", _build(config, params, b, seq, mesh)[0]
  stats = jax.local_devices()[0].memory_stats() or {}
  limit = stats.get("bytes_limit")
  if not limit:
    return 8 * n, "no memory_stats; 8 per device", _build(config, params, 8 * n, seq, mesh)[0]
  limit *= _MEMORY_FRACTION.value
  # Two compiles give the affine memory model; the pick is compiled once more and
  # halved while it does not fit.
  small, large = 4, 16
  _, gb_small = _build(config, params, small * n, seq, mesh)
  built, gb_large = _build(config, params, large * n, seq, mesh)
  slope = (gb_large - gb_small) / (large - small)
  per_device = large
  if slope > 0:
    best = (limit / 1e9 - gb_small) / slope + small
    per_device = 2 ** int(math.floor(math.log2(max(best, 1))))
  per_device = max(1, min(per_device, _MAX_BATCH_PER_DEVICE.value))
  if per_device != large:
    del built
    while True:
      built, gb = _build(config, params, per_device * n, seq, mesh)
      if gb * 1e9 <= limit or per_device == 1:
        break
      per_device //= 2
  why = (f"largest power of two per device within {_MEMORY_FRACTION.value:.0%} of "
         f"{limit / _MEMORY_FRACTION.value / 1e9:.0f} GB (memory at {small}/{large} per "
         f"device: {gb_small:.1f}/{gb_large:.1f} GB)")
  return per_device * n, why, built


def train_step_throughput(smoke: bool) -> list[dict]:
  """Stage 3: tokens/s and MFU of the train step against the measured matmul peak."""
  seq = 32 if smoke else _SEQ.value
  overrides = dict(vocab_size=1024, num_layers=2) if smoke else {}
  configs = ts.model_configs("tiny" if smoke else "nomic_v2_moe", _DTYPE.value, **overrides)
  peak_sizes = [256] if smoke else [int(s) for s in _PEAK_SIZES.value]
  peaks = [timing.peak_runner(s, _DTYPE.value) for s in peak_sizes]
  mesh = partitioning.make_mesh(-1, 1)
  rows = []
  for name in _MODELS.value:
    config = configs[name]
    params = ts.model_params(name, configs)
    b, why, (compiled, state, data, compile_s) = largest_batch(config, params, seq, smoke, mesh)
    batch = ts.make_batch(config, b, seq)
    del params
    run = ts.Runner(compiled, state, data)
    run()  # Two warm-up steps: the first compiles nothing but allocates.
    run()
    times = [timing.timed(run)[0] for _ in range(_REPEATS.value)]
    peak = timing.measure_peak(peaks, calls=5) * jax.device_count()
    ms = float(np.median(times)) * 1e3
    flops = ts.step_model_flops(config, b, seq)
    row = {"model": name, "batch": b, "seq": seq, "grad_cache": False, "step_ms": round(ms, 2),
           "tokens_per_s": round(ts.step_tokens(batch) / (ms / 1e3), 1),
           "mfu": round(flops / (ms / 1e3) / (peak * 1e9), 4), "peak_gflops": round(peak, 1),
           "dtype": _DTYPE.value, "devices": jax.device_count(), "batch_choice": why,
           "compile_s": round(compile_s, 1), "memory_gb": round(timing.memory_gb(compiled), 2),
           "step_ms_runs": [round(t * 1e3, 2) for t in times]}
    rows.append(row)
    print(f"[3] {name}: batch {b} ({why}) x {seq} tokens, {_DTYPE.value}: {ms:.1f} ms/step, "
          f"{row['tokens_per_s']:.0f} tokens/s, MFU {row['mfu']:.1%} of {peak / 1e3:.1f} "
          f"TFLOP/s measured peak ({jax.device_count()} device(s)); compile {compile_s:.0f} s,"
          f" {row['memory_gb']} GB", flush=True)
    del run, state, compiled
  return rows


def main(argv):
  del argv
  smoke = _CPU_SMOKE.value
  backend = jax.default_backend()
  print(f"jax {jax.__version__}, backend {backend}, {jax.device_count()} x "
        f"{jax.devices()[0].device_kind}{' (cpu smoke: tiny sizes)' if smoke else ''}",
        flush=True)
  if backend == "cpu" and not smoke:
    raise app.UsageError("No accelerator found; pass --cpu_smoke to dry-run on CPU.")
  start = time.perf_counter()
  failures: list[str] = []
  result = {"backend": backend, "device_kind": jax.devices()[0].device_kind,
            "devices": jax.device_count(), "jax": jax.__version__}
  result["ragged_dot_vs_capacity"] = check_ragged_dot_vs_capacity(smoke, failures)
  result["expert_parallel"] = check_expert_parallel(smoke, failures)
  result["ragged_exchange"] = check_ragged_exchange(smoke, failures)
  result["train_step"] = train_step_throughput(smoke)
  result["failures"] = failures
  result["seconds"] = round(time.perf_counter() - start, 1)
  report.write_json(_JSON.value, result)
  for failure in failures:
    print("FAILED:", failure)
  print(f"{'FAILED' if failures else 'ok'} in {result['seconds']:.0f} s")
  if failures:
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
