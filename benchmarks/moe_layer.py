"""Forward+backward time of one MoE block against a dense MLP of equal active FLOPs.

  python benchmarks/moe_layer.py --json=/tmp/moe_layer.json

For each width (minilm: D=384, F=1536; nomic_v2_moe: D=768, F=3072) and token
count, times jax.grad of sum(y * probe) with respect to the parameters and the
input for: the MoE block (8 experts, top-2) with each dispatch path, and a
dense MLP of width F * top_k, which does the same matmul FLOPs per token. All
runs share one process; each is compiled, warmed up, then timed as the median
of --repeats runs. ratio = moe_ms / dense_ms: 1.0 means the routing, sorting
and grouping cost nothing beyond the expert matmuls.
"""

import json
import time

from absl import app
from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moe_embed import layers, model_config, moe

_JSON = flags.DEFINE_string("json", None, "Write the rows as a JSON list here.")
_TOKENS = flags.DEFINE_list("tokens", ["4096", "16384"], "Token counts (batch x 128).")
_WIDTHS = flags.DEFINE_list("widths", ["minilm", "nomic_v2_moe"], "Model presets for D and F.")
_PATHS = flags.DEFINE_list("paths", ["dropless", "capacity", "dropless_ragged_dot"],
                           "MoE variants to time.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed runs per configuration (median).")
SEQ = 128


def _time(fn, *args) -> float:
  jax.block_until_ready(fn(*args))  # Compile and warm up.
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(_REPEATS.value):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times)) * 1e3


def _grad_fn(module, x, mask):
  probe = jax.random.normal(jax.random.PRNGKey(2), x.shape, x.dtype)

  def loss(params, x):
    out = module.apply(params, x, mask) if isinstance(module, moe.MoeMlp) else (
        module.apply(params, x), None)
    return jnp.sum(out[0] * probe)

  return jax.jit(jax.grad(loss, argnums=(0, 1)))


def _config(width: str, path: str) -> model_config.EncoderConfig:
  base = model_config.preset(width, num_experts=8, top_k=2, moe_every_n_layers=2,
                             dtype="float32", capacity_factor=1.25)
  if path == "dropless_ragged_dot":
    return base.replace(moe_dispatch="dropless", grouped_matmul="ragged_dot")
  return base.replace(moe_dispatch=path, grouped_matmul="tiled")


def main(argv):
  del argv
  print(f"jax {jax.__version__} on {jax.default_backend()} "
        f"({jax.devices()[0].device_kind}), float32")
  rows = []
  header = f"{'width':>6s} {'tokens':>7s} {'path':>20s} {'moe_ms':>9s} {'dense_ms':>9s} {'ratio':>6s}"
  print(header)
  for width in _WIDTHS.value:
    for tokens in map(int, _TOKENS.value):
      base = _config(width, "dropless")
      x = jax.random.normal(jax.random.PRNGKey(0), (tokens // SEQ, SEQ, base.hidden_size))
      mask = jnp.ones(x.shape[:2], bool)
      dense_cfg = base.replace(moe_every_n_layers=0, mlp_dim=base.mlp_dim * base.top_k)
      dense = layers.Mlp(dense_cfg)
      dense_params = nn.meta.unbox(dense.init(jax.random.PRNGKey(1), x))
      dense_ms = _time(_grad_fn(dense, x, mask), dense_params, x)
      for path in _PATHS.value:
        cfg = _config(width, path)
        module = moe.MoeMlp(cfg)
        params = nn.meta.unbox(module.init(jax.random.PRNGKey(1), x, mask))
        moe_ms = _time(_grad_fn(module, x, mask), params, x)
        row = {"width": base.hidden_size, "tokens": tokens, "path": path,
               "moe_ms": round(moe_ms, 2), "dense_ms": round(dense_ms, 2),
               "ratio": round(moe_ms / dense_ms, 3)}
        rows.append(row)
        print(f"{row['width']:6d} {tokens:7d} {path:>20s} {moe_ms:9.1f} {dense_ms:9.1f} "
              f"{row['ratio']:6.2f}", flush=True)
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(rows, f, indent=2)


if __name__ == "__main__":
  app.run(main)
