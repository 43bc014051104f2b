"""Runs an exported folder's ONNX graph in onnxruntime: sessions and text embeddings.

  embedder = OnnxEmbedder("/tmp/exported")                  # onnx/model.onnx
  embedder = OnnxEmbedder("/tmp/exported", "model_qint8.onnx")
  vectors = embedder.encode(["how to sort a list"], prefix="query")

What `SentenceTransformer(folder, backend="onnx")` would do, without optimum:
the folder's tokenizer.json, the graph, then the folder's pooling (masked mean)
and L2 normalisation in NumPy. Texts are sorted by length and each batch is
padded to its longest text, so little compute goes to padding.
"""

from __future__ import annotations

import json
import os
from typing import Optional, Sequence

import numpy as np

from moe_embed.io import onnx_export


def providers() -> list[str]:
  """The CUDA execution provider where onnxruntime has one, then the CPU provider."""
  import onnxruntime as ort
  available = ort.get_available_providers()
  return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def session(path: str, *, threads: int = 0, provider_list: Optional[list[str]] = None):
  """An onnxruntime InferenceSession of the graph at `path` (threads 0: onnxruntime's default)."""
  import onnxruntime as ort
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} does not exist; export with launch/export.py --format=onnx.")
  options = ort.SessionOptions()
  if threads:
    options.intra_op_num_threads = threads
  return ort.InferenceSession(path, options, providers=provider_list or providers())


def feeds(sess, ids: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
  """The graph's inputs for ids, mask [B, L]: int64, zero token types where it takes them."""
  names = {i.name for i in sess.get_inputs()}
  out = {"input_ids": ids.astype(np.int64), "attention_mask": mask.astype(np.int64)}
  if "token_type_ids" in names:
    out["token_type_ids"] = np.zeros_like(out["input_ids"])
  return out


def mean_pool_normalize(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """hidden [B, L, D], mask [B, L] -> unit-norm float32 [B, D] (the folder's modules 1 and 2)."""
  weights = mask.astype(np.float32)[..., None]
  pooled = (hidden * weights).sum(1) / np.maximum(weights.sum(1), 1.0)
  return pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)


class OnnxEmbedder:
  """Embeddings from an exported folder's ONNX graph (float32 or int8)."""

  def __init__(self, folder: str, file_name: str = onnx_export.MODEL_FILE, *, threads: int = 0,
               max_length: Optional[int] = None):
    from moe_embed.tokenizers import load_tokenizer
    self.session = session(os.path.join(folder, onnx_export.SUBFOLDER, file_name),
                           threads=threads)
    self.tokenizer = load_tokenizer(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "sentence_bert_config.json")) as f:
      self.max_length = max_length or int(json.load(f)["max_seq_length"])
    with open(os.path.join(folder, "config_sentence_transformers.json")) as f:
      self.prompts = json.load(f).get("prompts", {})

  def hidden(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """last_hidden_state float32 [B, L, D] of padded ids, mask [B, L]."""
    return self.session.run(["last_hidden_state"], feeds(self.session, ids, mask))[0]

  def encode(self, texts: Sequence[str], *, prefix: str = "", batch_size: int = 64
             ) -> np.ndarray:
    """float32 [n, D] unit-norm embeddings in input order; prefix: a prompt name or text."""
    prefix = self.prompts.get(prefix, prefix)
    ids, _ = self.tokenizer.encode([prefix + t for t in texts], self.max_length)
    order = np.argsort([len(x) for x in ids], kind="stable")[::-1]
    out = None
    for start in range(0, len(texts), batch_size):
      rows = order[start:start + batch_size]
      arr, mask = self.tokenizer.pad([ids[i] for i in rows])
      emb = mean_pool_normalize(self.hidden(arr, mask), mask)
      if out is None:
        out = np.zeros((len(texts), emb.shape[1]), np.float32)
      out[rows] = emb
    return out if out is not None else np.zeros((0, 0), np.float32)
