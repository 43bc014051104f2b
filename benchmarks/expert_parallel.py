"""Expert parallelism on fake CPU devices: step time at EP=1, 4, 8 and all_to_all bytes.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/expert_parallel.py \
    [--exchanges=padded,ragged]

Times a jitted forward+backward of the nomic_v2_moe encoder (width 768, MLP 3072,
8 experts, top-2; --layers of its 12 and a --vocab cut, because eight fake
devices on one host each hold a replica of the dense weights and all-reduce
their gradients) at a small batch on meshes data x expert = 8/1, 2/4, 1/8. Fake devices
share the host's cores, so times compare configurations, nothing more. From each
compiled module it reads the all-to-all operations and their operand shapes, and
reports bytes per token per all_to_all against the design estimate (T*K*D
values per device: 2 * 768 * 2 bytes, about 3 KB per token in bf16;
float32 by default here, since bf16 matmuls are slow on CPUs).

Each EP > 1 runs with every token exchange in --exchanges (encoder.expert_exchange).
A ragged-all-to-all's bytes are those of its send buffer, the most it can send:
[M, D] for the ragged exchange. XLA:CPU has no ragged_all_to_all, so there the
ragged exchange runs on its all_to_all stand-in, which moves the padded volume;
its rows show the bookkeeping's cost, and the bytes a GPU or TPU would send are
the design estimate printed at the end.
"""

import os
import re
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from moe_embed import partitioning  # noqa: E402
from moe_embed.model import config as model_config  # noqa: E402
from moe_embed.model.encoder import EmbeddingModel, init_params  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import timing  # noqa: E402  (benchmarks/timing.py)

_BATCH = flags.DEFINE_integer("batch", 8, "Sequences per step (global).")
_SEQ = flags.DEFINE_integer("seq", 64, "Tokens per sequence.")
_VOCAB = flags.DEFINE_integer("vocab", 1024, "Vocabulary size (the preset has 250,048).")
_LAYERS = flags.DEFINE_integer(
    "layers", 2, "Encoder layers (the preset has 12); layer 1 of every pair is MoE.")
_DTYPE = flags.DEFINE_string("dtype", "float32", "Compute dtype.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed steps (median).")
_EXCHANGES = flags.DEFINE_list("exchanges", ["padded", "ragged"],
                               "Token exchanges to time at EP > 1 (encoder.expert_exchange).")

_DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "pred": 1, "u32": 4}


def _type_bytes(type_text: str) -> int:
  """Bytes of an HLO result type such as `f32[12,8]{1,0}` or a tuple of them."""
  total = 0
  for dtype, dims in re.findall(r"([a-z]+[0-9]*)\[([0-9,]*)\]", type_text):
    count = int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
    total += count * _DTYPE_BYTES.get(dtype, 4)
  return total


def _definitions(hlo: str) -> dict[str, str]:
  """Instruction name -> its result type text, over the whole module."""
  types = {}
  for line in hlo.splitlines():
    line = line.strip()
    if line.startswith("ROOT "):
      line = line[5:]
    if " = " in line:
      name, rest = line.split(" = ", 1)
      types[name.lstrip("%")] = rest.split(" ", 1)[0]
  return types


def all_to_all_bytes(hlo: str) -> list[int]:
  """Bytes each all-to-all in an HLO module's text moves per device.

  XLA may split one exchange into a tuple with one [rows, D] piece per peer
  (all tuple elements are summed). A ragged-all-to-all moves data-dependent
  sizes; it counts as the smaller of its send and receive buffers ([M, D] for
  the ragged exchange, both ways), which is what it moves per device on
  average: every device sends each of its M assignments once.
  """
  types = None
  sizes = []
  for line in hlo.splitlines():
    if "all-to-all(" not in line or " = " not in line:
      continue
    result = line.split(" = ", 1)[1]
    if "ragged-all-to-all(" in result:
      types = types or _definitions(hlo)
      operand = result.split("ragged-all-to-all(", 1)[1].split(",", 1)[0].split()[-1]
      sizes.append(min(_type_bytes(result.split(" ", 1)[0]),
                       _type_bytes(types.get(operand.lstrip("%"), ""))))
    elif " all-to-all(" in result or result.startswith("all-to-all("):
      sizes.append(_type_bytes(result.split("all-to-all(", 1)[0]))
  return sizes


def main(argv):
  del argv
  config = model_config.preset("nomic_v2_moe", vocab_size=_VOCAB.value, dtype=_DTYPE.value,
                               num_layers=_LAYERS.value)
  params = nn.meta.unbox(init_params(config, jax.random.PRNGKey(0)))
  rng = np.random.default_rng(0)
  ids = rng.integers(4, _VOCAB.value, size=(_BATCH.value, _SEQ.value)).astype(np.int32)
  mask = np.ones_like(ids, bool)

  def grad_fn(exchange):
    model = EmbeddingModel(config.replace(expert_exchange=exchange))

    def loss(p, ids, mask):
      emb, _ = model.apply({"params": p}, ids, mask)
      return jnp.sum(emb[:, 0])

    return jax.jit(jax.grad(loss))

  rules = partitioning.DEFAULT_RULES
  boxed = jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))
  print(f"jax {jax.__version__}, {jax.device_count()} {jax.default_backend()} devices, "
        f"batch {_BATCH.value} x {_SEQ.value}, {_DTYPE.value}")
  print(f"{'EP':>3s} {'data':>4s} {'exchange':>8s} {'step_ms':>9s} {'a2a/layer':>9s} "
        f"{'bytes/token/a2a':>16s}")
  local_tokens = None
  runs = [(1, "padded")] + [(ep, ex) for ep in (4, 8) for ex in _EXCHANGES.value]
  for ep, exchange in runs:
    grad = grad_fn(exchange)
    mesh = partitioning.make_mesh(-1, ep)
    with partitioning.mesh_context(mesh), nn.logical_axis_rules(rules):
      shardings = partitioning.logical_shardings(boxed, mesh, rules)
      p = jax.device_put(params, shardings)
      bs = partitioning.batch_sharding(mesh, rules)
      args = (p, jax.device_put(ids, bs), jax.device_put(mask, bs))
      compiled = grad.lower(*args).compile()
      _, times, _ = timing.interleaved({"step": lambda: compiled(*args)}, _REPEATS.value)
      times = times["step"]
      sizes = all_to_all_bytes(compiled.as_text())
    local_tokens = _BATCH.value * _SEQ.value // jax.device_count()
    per_layer = len(sizes) / max(len(config.moe_layers), 1)
    # Token payloads are the [EP*M, D] operands; skip the int / bool id exchanges.
    payload = [s for s in sizes if s >= local_tokens * config.hidden_size]
    per_token = np.median(payload) / local_tokens if payload else 0.0
    shown = exchange if ep > 1 else "-"
    print(f"{ep:3d} {8 // ep:4d} {shown:>8s} {np.median(times) * 1e3:9.1f} {per_layer:9.1f} "
          f"{per_token:16.0f}", flush=True)
  value_bytes = 2 if _DTYPE.value == "bfloat16" else 4
  estimate = config.top_k * config.hidden_size * value_bytes
  print(f"Design estimate ({_DTYPE.value}, exact-size exchange): {estimate} bytes per token "
        f"per all_to_all; the padded buffers move EP times that. On {jax.default_backend()}, "
        f"'ragged' runs on "
        f"{'ragged_all_to_all' if jax.default_backend() != 'cpu' else 'its all_to_all stand-in'}.")


if __name__ == "__main__":
  app.run(main)
