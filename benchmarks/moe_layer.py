"""Forward+backward time of one MoE block against a dense MLP of equal active FLOPs.

  python benchmarks/moe_layer.py --json=/tmp/moe_layer.json \
    [--tokens=4096,16384] [--widths=minilm,nomic_v2_moe] [--repeats=5]

What it measures: for each width (minilm: D=384, F=1536; nomic_v2_moe: D=768,
F=3072) and token count (batch tokens/128 x sequence 128, every token real), the
time of a jitted jax.grad of sum(y * probe) with respect to the parameters and
the input x, for
- one MoE block, `moe_mlp.MoeMlp`, with 8 experts and top-2 routing
  (`model_config.preset(width, num_experts=8, top_k=2, moe_every_n_layers=2,
  dtype=--dtype, float32 by default)`), once per path:
    dropless             sort + grouped matmul, the backend's default kernel
                         ('windowed' on CPU);
    dropless_tiled       the same with the 'tiled' kernel;
    capacity             one-hot einsum dispatch, capacity_factor 1.25;
    dropless_ragged_dot  the dropless path with `jax.lax.ragged_dot`;
- a dense `layers.Mlp` of the same config with mlp_dim = F * top_k and no MoE,
  which does the same expert matmul FLOPs per token (each token meets top_k
  experts of width F).
All runs share one process. Each function is compiled ahead of time, run once
to warm up, then timed (`jax.block_until_ready`) as the median of --repeats
runs; a configuration whose single run is slow gets fewer timed runs so that
it fits --budget_s, and the table says so. Before running, the memory of each
compiled function (arguments, outputs and temporaries, from XLA's memory
analysis) is checked against --max_gb; a configuration above it is skipped
with a printed reason.

How to read it: moe_ms and dense_ms are milliseconds per forward+backward step
of the one block; ratio = moe_ms / dense_ms. A ratio of 1.0 means routing,
sorting, dispatch and the combine cost nothing beyond the expert matmuls; the
excess over 1.0 is the price of sparsity on this backend. The dense time is
the same for every path of a (width, tokens) pair. Compare paths on one
backend only: the fastest grouped-matmul kernel differs between CPU and
GPU/TPU (`grouped_matmul='auto'`).
"""

import math
import os
import sys

from absl import app
from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moe_embed.model import config as model_config
from moe_embed.model import layers
from moe_embed.model import moe_mlp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import report  # noqa: E402  (benchmarks/report.py)
import timing  # noqa: E402  (benchmarks/timing.py)

PATHS = ("dropless", "dropless_tiled", "capacity", "dropless_ragged_dot")
SEQ = 128

_JSON = flags.DEFINE_string("json", None, "Write the rows as a JSON list to this file.")
_TOKENS = flags.DEFINE_list("tokens", ["4096", "16384"],
                            f"Token counts; each is batch (tokens / {SEQ}) x sequence {SEQ}.")
_WIDTHS = flags.DEFINE_list("widths", ["minilm", "nomic_v2_moe"],
                            "Model presets that give the widths D and F.")
_PATHS = flags.DEFINE_list("paths", list(PATHS), "MoE variants to time.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed runs per configuration (median).")
_MAX_GB = flags.DEFINE_float(
    "max_gb", 16.0, "Skip a configuration whose compiled step needs more memory (GB).")
_DTYPE = flags.DEFINE_string("dtype", "float32", "Compute dtype (float32 or bfloat16).")
_BUDGET_S = flags.DEFINE_float(
    "budget_s", 90.0, "Fewer timed runs (at least 1) when --repeats would exceed this.")


def _grad_fn(module: nn.Module, x: jax.Array, mask: jax.Array):
  """jit(grad of sum(y * probe)) with respect to (params, x)."""
  probe = jax.random.normal(jax.random.PRNGKey(2), x.shape, x.dtype)
  is_moe = isinstance(module, moe_mlp.MoeMlp)

  def loss(params, x):
    y = module.apply(params, x, mask)[0] if is_moe else module.apply(params, x)
    return jnp.sum(y * probe)

  return jax.jit(jax.grad(loss, argnums=(0, 1)))


def _time(compiled, *args) -> tuple[float, int]:
  """(median milliseconds, number of timed runs) after one warm-up run."""
  one_run, _ = timing.timed(lambda: compiled(*args))
  repeats = max(1, min(_REPEATS.value, math.floor(_BUDGET_S.value / max(one_run, 1e-9))))
  times = [timing.timed(lambda: compiled(*args))[0] for _ in range(repeats)]
  return float(np.median(times)) * 1e3, repeats


def _config(width: str, path: str) -> model_config.EncoderConfig:
  base = model_config.preset(width, num_experts=8, top_k=2, moe_every_n_layers=2,
                             dtype=_DTYPE.value, capacity_factor=1.25)
  if path == "dropless_ragged_dot":
    return base.replace(moe_dispatch="dropless", grouped_matmul="ragged_dot")
  if path == "dropless_tiled":
    return base.replace(moe_dispatch="dropless", grouped_matmul="tiled")
  # 'dropless' and 'capacity' with the backend's default kernel ('windowed' on CPU).
  return base.replace(moe_dispatch=path, grouped_matmul="auto")


def _measure(module: nn.Module, x: jax.Array, mask: jax.Array, label: str):
  """(ms, timed runs, GB), or None after printing why the configuration is skipped."""
  init_args = (x, mask) if isinstance(module, moe_mlp.MoeMlp) else (x,)
  params = nn.meta.unbox(module.init(jax.random.PRNGKey(1), *init_args))
  compiled = _grad_fn(module, x, mask).lower(params, x).compile()
  gb = timing.memory_gb(compiled)
  if gb > _MAX_GB.value:
    print(f"  skipped {label}: the compiled step needs {gb:.1f} GB > --max_gb="
          f"{_MAX_GB.value:g}", flush=True)
    return None
  ms, repeats = _time(compiled, params, x)
  return ms, repeats, gb


def main(argv):
  del argv
  unknown = sorted(set(_PATHS.value) - set(PATHS))
  if unknown:
    raise app.UsageError(f"Unknown --paths {unknown}; choose from {PATHS}.")
  device = jax.devices()[0]
  print(f"jax {jax.__version__}, backend {jax.default_backend()} "
        f"({device.device_kind}, {jax.device_count()} device(s)), {_DTYPE.value}, "
        f"median of {_REPEATS.value} runs")
  header = (f"{'width':>6s} {'tokens':>7s} {'path':>20s} {'moe_ms':>9s} {'dense_ms':>9s} "
            f"{'ratio':>6s}  notes")
  print(header)
  print("-" * len(header))
  rows = []
  for width in _WIDTHS.value:
    for tokens in map(int, _TOKENS.value):
      if tokens % SEQ:
        raise app.UsageError(f"--tokens={tokens} is not a multiple of {SEQ}.")
      base = _config(width, "dropless")
      d = base.hidden_size
      x = jax.random.normal(jax.random.PRNGKey(0), (tokens // SEQ, SEQ, d),
                            jnp.float32).astype(_DTYPE.value)
      mask = jnp.ones(x.shape[:2], bool)
      dense_cfg = base.replace(moe_every_n_layers=0, mlp_dim=base.mlp_dim * base.top_k)
      dense = _measure(layers.Mlp(dense_cfg), x, mask, f"dense D={d} T={tokens}")
      if dense is None:
        continue
      dense_ms, dense_runs, dense_gb = dense
      for path in _PATHS.value:
        result = _measure(moe_mlp.MoeMlp(_config(width, path)), x, mask,
                          f"{path} D={d} T={tokens}")
        if result is None:
          continue
        moe_ms, moe_runs, moe_gb = result
        row = {"width": d, "tokens": tokens, "path": path, "moe_ms": round(moe_ms, 2),
               "dense_ms": round(dense_ms, 2), "ratio": round(moe_ms / dense_ms, 3)}
        rows.append(row)
        notes = f"{moe_gb:.2f} GB vs {dense_gb:.2f} GB"
        if moe_runs < _REPEATS.value or dense_runs < _REPEATS.value:
          notes += f"; median of {moe_runs} (moe) / {dense_runs} (dense) runs"
        print(f"{d:6d} {tokens:7d} {path:>20s} {moe_ms:9.1f} {dense_ms:9.1f} "
              f"{row['ratio']:6.2f}  {notes}", flush=True)
        # After every row, so that an interrupted run keeps its rows.
        report.write_json(_JSON.value, rows, quiet=True)
  report.write_json(_JSON.value, rows)


if __name__ == "__main__":
  app.run(main)
