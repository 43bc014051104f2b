"""Our parameter tree -> an ONNX graph of the encoder whose MoE layers stay sparse.

The graph is built node by node from the parameters (not traced from PyTorch),
so that each MoE layer computes only what routing chose: the router (float32
MatMul, Softmax over all E experts, TopK) picks k experts per real token, and
expert e then runs on the rows routed to it alone: `Compress` gathers them
[n_e, D], two MatMuls [n_e, D] x [D, F] x [F, D] compute the expert, and one
`ScatterND(reduction='add')` per layer adds the weighted outputs back to their
tokens [T, D]. Padding tokens are never routed (they get only the shared output
bias, as in JAX). Expert matmul work is sum_e n_e = k * (real tokens), not
E * (all tokens).

Inputs, as sentence-transformers' ONNX backend feeds them: `input_ids`,
`attention_mask` (and `token_type_ids` when the model has a token-type table),
int64 [batch, sequence], both axes dynamic. Output: `last_hidden_state` float32
[batch, sequence, D] (projected per token when the model has a projection head,
which commutes with mean pooling); pooling and L2 normalisation stay in the
folder's sentence-transformers modules.

`quantize_int8` writes the int8 copy: every weight MatMul becomes an int8
MatMulInteger with symmetric weights per output column and activations ranged
per token as the graph runs (a dynamic quantization finer than onnxruntime's
one range per tensor). The router MatMuls stay float32 so that int8 rounding
does not move tokens between experts (`FLOAT_MATMULS`). Padding rows of the
normalised activations are zeroed.

Node names: expert matmuls are `layer_{i}/mlp/expert_{e}/w1` (and `/w3` for the
SwiGLU gate, `/w2`), router matmuls `layer_{i}/mlp/router`.
"""

from __future__ import annotations

import math
import os
from typing import Any, Optional

import numpy as np

from moe_embed.model.config import EncoderConfig

OPSET = 17  # LayerNormalization; ScatterND reduction='add' (16).
SUBFOLDER = "onnx"
MODEL_FILE = "model.onnx"  # Where sentence-transformers' ONNX backend looks.
INT8_FILE = "model_qint8.onnx"
EXTERNAL_DATA_BYTES = 1_800_000_000  # Past this, weights go to `<file>_data` (2 GB limit).
_NEG = -1e30  # Additive attention bias of a padding key: exp() is exactly 0.


class _Graph:
  """Collects nodes and initializers; `op` returns the output name of one node."""

  def __init__(self, prefix: str = ""):
    self.nodes, self.initializers, self._count, self._prefix = [], [], 0, prefix

  def name(self, hint: str) -> str:
    self._count += 1
    return f"{self._prefix}{hint}_{self._count}"

  def const(self, value, name: Optional[str] = None, dtype=np.float32) -> str:
    from onnx import numpy_helper
    name = name or self.name("const")
    self.initializers.append(numpy_helper.from_array(
        np.ascontiguousarray(np.asarray(value, dtype)), name))
    return name

  def op(self, op_type: str, *inputs: str, outputs: int = 1, name: Optional[str] = None,
         **attrs) -> Any:
    from onnx import helper
    node_name = name or self.name(op_type.lower())
    outs = [f"{node_name}:{i}" for i in range(outputs)]
    self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=node_name, **attrs))
    return outs[0] if outputs == 1 else outs


def _np(x) -> np.ndarray:
  return np.asarray(x, np.float32)


def _layer_norm(g: _Graph, x: str, p: dict, eps: float, name: str) -> str:
  return g.op("LayerNormalization", x, g.const(p["scale"], f"{name}/scale"),
              g.const(p["bias"], f"{name}/bias"), axis=-1, epsilon=float(eps), name=name)


def _dense(g: _Graph, x: str, kernel, bias, name: str) -> str:
  """x [..., in] @ kernel [in, out] (+ bias [out])."""
  y = g.op("MatMul", x, g.const(kernel, f"{name}/kernel"), name=name)
  if bias is not None:
    y = g.op("Add", y, g.const(bias, f"{name}/bias"))
  return y


def _gelu(g: _Graph, x: str) -> str:
  """Exact (erf) GELU: 0.5 x (1 + erf(x / sqrt 2)); onnxruntime fuses it into one kernel."""
  erf = g.op("Erf", g.op("Div", x, g.const(math.sqrt(2.0))))
  return g.op("Mul", g.op("Mul", x, g.const(0.5)), g.op("Add", erf, g.const(1.0)))


def _silu(g: _Graph, x: str) -> str:
  return g.op("Mul", x, g.op("Sigmoid", x))


def _rotary(g: _Graph, x: str, cos: str, sin: str, rot: int, head_dim: int) -> str:
  """GPT-NeoX (half-split) rotary on the first `rot` dims of x [B, H, L, Dh]."""
  axis = g.const([3], dtype=np.int64)
  cut = lambda a, b: g.op("Slice", x, g.const([a], dtype=np.int64),
                          g.const([b], dtype=np.int64), axis)
  half = rot // 2
  rotated = g.op("Concat", g.op("Neg", cut(half, rot)), cut(0, half), axis=-1)
  out = g.op("Add", g.op("Mul", cut(0, rot), cos), g.op("Mul", rotated, sin))
  return g.op("Concat", out, cut(rot, head_dim), axis=-1) if rot < head_dim else out


def _attention(g: _Graph, x: str, p: dict, cfg: EncoderConfig, bias: str,
               rope: Optional[tuple[str, str]], name: str) -> str:
  """x [B, L, D], bias [B, 1, 1, L] (0 or _NEG per key) -> [B, L, D]."""
  d, h, dh = cfg.hidden_size, cfg.num_heads, cfg.head_dim
  kernel = np.concatenate([_np(p[n]["kernel"]).reshape(d, d) for n in ("query", "key", "value")],
                          axis=1)  # [D, 3D]: q | k | v, each [D, H * Dh].
  qkv_bias = (np.concatenate([_np(p[n]["bias"]).reshape(d) for n in ("query", "key", "value")])
              if cfg.qkv_bias else None)
  qkv = _dense(g, x, kernel, qkv_bias, f"{name}/qkv")  # [B, L, 3D]
  qkv = g.op("Reshape", qkv, g.const([0, 0, 3, h, dh], dtype=np.int64))  # [B, L, 3, H, Dh]
  qkv = g.op("Transpose", qkv, perm=[2, 0, 3, 1, 4])  # [3, B, H, L, Dh]
  q, k, v = _split3(g, qkv)  # [B, H, L, Dh] each
  if rope is not None:
    rot = int(dh * cfg.rotary_fraction)
    q, k = (_rotary(g, t, *rope, rot, dh) for t in (q, k))
  scores = g.op("MatMul", g.op("Mul", q, g.const(1.0 / math.sqrt(dh))),
                g.op("Transpose", k, perm=[0, 1, 3, 2]))  # [B, H, L, L]
  probs = g.op("Softmax", g.op("Add", scores, bias), axis=-1)
  out = g.op("Transpose", g.op("MatMul", probs, v), perm=[0, 2, 1, 3])  # [B, L, H, Dh]
  out = g.op("Reshape", out, g.const([0, 0, d], dtype=np.int64))
  return _dense(g, out, _np(p["out"]["kernel"]).reshape(d, d), p["out"]["bias"], f"{name}/out")


def _split3(g: _Graph, qkv: str) -> tuple[str, str, str]:
  """[3, ...] -> three [...] tensors."""
  parts = g.op("Split", qkv, g.const([1, 1, 1], dtype=np.int64), axis=0, outputs=3)
  axes = g.const([0], dtype=np.int64)
  return tuple(g.op("Squeeze", part, axes) for part in parts)


def _mlp(g: _Graph, x: str, p: dict, cfg: EncoderConfig, name: str) -> str:
  bias = lambda layer: p[layer]["bias"] if cfg.mlp_bias else None
  h = _dense(g, x, p["fc1"]["kernel"], bias("fc1"), f"{name}/fc1")
  if cfg.mlp_activation == "swiglu":
    h = g.op("Mul", _silu(g, h), _dense(g, x, p["gate"]["kernel"], bias("gate"), f"{name}/gate"))
  else:
    h = _gelu(g, h)
  return _dense(g, h, p["fc2"]["kernel"], bias("fc2"), f"{name}/fc2")


def _moe(g: _Graph, x: str, p: dict, cfg: EncoderConfig, valid: str, name: str,
         routing_outputs: Optional[list]) -> str:
  """Token-choice top-k MoE on x [B, L, D]; valid bool [B*L, 1] -> [B, L, D].

  Only routed rows reach the experts: expert e multiplies its n_e rows.
  """
  d, k = cfg.hidden_size, cfg.top_k
  flat = g.op("Reshape", x, g.const([-1, d], dtype=np.int64))  # [T, D]
  logits = g.op("MatMul", flat, g.const(p["router"]["kernel"], f"{name}/router/kernel"),
                name=f"{name}/router")  # [T, E] float32
  probs = g.op("Softmax", logits, axis=-1)
  weights, experts = g.op("TopK", probs, g.const([k], dtype=np.int64), axis=-1, largest=1,
                          sorted=1, outputs=2)  # [T, K] float32, int64
  if cfg.renormalize_topk:
    power = float(cfg.renormalize_topk)
    if power == 1:
      norm = g.op("ReduceSum", weights, g.const([1], dtype=np.int64), keepdims=1)
    else:  # (sum w^p)^(1/p), as routing.topk_norm.
      powered = g.op("Pow", weights, g.const(power))
      norm = g.op("Pow", g.op("ReduceSum", powered, g.const([1], dtype=np.int64), keepdims=1),
                  g.const(1.0 / power))
    weights = g.op("Div", weights, norm)
  if routing_outputs is not None:
    routing_outputs.append((f"{name}/experts", experts))
  # Padding tokens pick no expert: their slots become -1.
  experts = g.op("Where", valid, experts, g.const(-1, dtype=np.int64))
  rows_out, index_out = [], []
  for e in range(cfg.num_experts):
    hit = g.op("Equal", experts, g.const(e, dtype=np.int64))  # [T, K]
    weight = g.op("ReduceSum", g.op("Mul", weights, g.op("Cast", hit, to=1)),
                  g.const([1], dtype=np.int64), keepdims=1)  # [T, 1]
    routed = g.op("Cast", g.op("ReduceMax", g.op("Cast", hit, to=6), axes=[1], keepdims=0),
                  to=9)  # bool [T]
    xe = g.op("Compress", flat, routed, axis=0)  # [n_e, D]
    hidden = g.op("MatMul", xe, g.const(p["w1"][e], f"{name}/expert_{e}/w1/kernel"),
                  name=f"{name}/expert_{e}/w1")  # [n_e, F]
    if "w1_bias" in p:
      hidden = g.op("Add", hidden, g.const(p["w1_bias"][e]))
    if "w3" in p:
      gate = g.op("MatMul", xe, g.const(p["w3"][e], f"{name}/expert_{e}/w3/kernel"),
                  name=f"{name}/expert_{e}/w3")
      hidden = g.op("Mul", _silu(g, hidden), gate)
    else:
      hidden = _gelu(g, hidden)
    ye = g.op("MatMul", hidden, g.const(p["w2"][e], f"{name}/expert_{e}/w2/kernel"),
              name=f"{name}/expert_{e}/w2")  # [n_e, D]
    rows_out.append(g.op("Mul", ye, g.op("Compress", weight, routed, axis=0)))
    index_out.append(g.op("Transpose", g.op("NonZero", routed), perm=[1, 0]))  # [n_e, 1]
  zeros = g.op("ConstantOfShape", g.op("Shape", flat),
               value=_tensor(np.zeros(1, np.float32)))  # [T, D]
  y = g.op("ScatterND", zeros, g.op("Concat", *index_out, axis=0),
           g.op("Concat", *rows_out, axis=0), reduction="add")  # [T, D]
  y = g.op("Add", y, g.const(p["bias"], f"{name}/bias"))
  return g.op("Reshape", y, g.op("Shape", x))


def _tensor(array: np.ndarray):
  from onnx import numpy_helper
  return numpy_helper.from_array(array)


def build_model(params: dict, config: EncoderConfig, *, routing_outputs: bool = False):
  """The encoder as an onnx.ModelProto: (input_ids, attention_mask[, token_type_ids]) ->
  last_hidden_state.

  With routing_outputs, every MoE layer also outputs its chosen experts
  `layer_{i}/experts` int64 [B*L, K] (padding rows included), for tests.
  """
  from onnx import TensorProto, helper
  cfg = config
  if cfg.dtype != "float32":
    cfg = cfg.replace(dtype="float32")  # The graph computes in float32 whatever trained.
  enc = params["encoder"]
  g = _Graph()
  dims = ["batch", "sequence"]
  inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, dims),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, dims)]
  emb = enc["embeddings"]
  x = g.op("Gather", g.const(emb["word_embeddings"]["embedding"], "word_embeddings"),
           "input_ids", axis=0)  # [B, L, D]
  if cfg.type_vocab_size:
    inputs.append(helper.make_tensor_value_info("token_type_ids", TensorProto.INT64, dims))
    x = g.op("Add", x, g.op("Gather", g.const(emb["token_type_embeddings"]["embedding"],
                                              "token_type_embeddings"), "token_type_ids", axis=0))
  length = g.op("Shape", "input_ids", start=1, end=2)  # [1]: L
  rope = None
  if cfg.position_embedding == "learned":
    # Right padding: real tokens sit at positions offset, offset + 1, ...
    offset = g.const([cfg.position_offset], dtype=np.int64)
    table = g.const(emb["position_embeddings"]["embedding"], "position_embeddings")
    x = g.op("Add", x, g.op("Slice", table, offset, g.op("Add", length, offset),
                            g.const([0], dtype=np.int64)))  # [L, D]
  else:
    positions = g.op("Range", g.const(0, dtype=np.int64),
                     g.op("Squeeze", length, g.const([0], dtype=np.int64)),
                     g.const(1, dtype=np.int64))  # [L]
    rot = int(cfg.head_dim * cfg.rotary_fraction)
    inv_freq = 1.0 / (np.float32(cfg.rotary_base) ** (np.arange(0, rot, 2, dtype=np.float32)
                                                       / np.float32(rot)))
    angles = g.op("Mul", g.op("Unsqueeze", g.op("Cast", positions, to=1),
                              g.const([1], dtype=np.int64)), g.const(inv_freq))  # [L, rot/2]
    angles = g.op("Concat", angles, angles, axis=-1)  # [L, rot]
    rope = (g.op("Cos", angles), g.op("Sin", angles))  # Broadcast over [B, H, L, rot].
  mask = g.op("Cast", "attention_mask", to=1)  # float [B, L]
  # Padding rows of every normalised activation are zeroed: they never reach a real
  # token's output, and zeros keep them out of int8 activation ranges.
  keep = g.op("Unsqueeze", mask, g.const([2], dtype=np.int64))  # [B, L, 1]
  x = g.op("Mul", _layer_norm(g, x, emb["layer_norm"], cfg.layer_norm_eps,
                              "embeddings/layer_norm"), keep)
  bias = g.op("Mul", g.op("Sub", g.const(1.0), mask), g.const(_NEG))
  bias = g.op("Unsqueeze", bias, g.const([1, 2], dtype=np.int64))  # [B, 1, 1, L]
  valid = g.op("Cast", g.op("Reshape", "attention_mask", g.const([-1, 1], dtype=np.int64)),
               to=9)  # bool [T, 1]
  routing = [] if routing_outputs else None
  for i in range(cfg.num_layers):
    p, name = enc[f"layer_{i}"], f"layer_{i}"
    eps = cfg.layer_norm_eps
    if cfg.is_moe_layer(i):
      run_mlp = lambda h: _moe(g, h, p["mlp"], cfg, valid, f"{name}/mlp", routing)
    else:
      run_mlp = lambda h: _mlp(g, h, p["mlp"], cfg, f"{name}/mlp")
    attn = lambda h: _attention(g, h, p["attention"], cfg, bias, rope, f"{name}/attention")
    norm = lambda h, which: g.op("Mul", _layer_norm(g, h, p[which], eps, f"{name}/{which}"),
                                 keep)
    if cfg.norm == "post":
      h = norm(g.op("Add", x, attn(x)), "attention_norm")
      x = norm(g.op("Add", h, run_mlp(h)), "mlp_norm")
    else:
      h = g.op("Add", x, attn(norm(x, "attention_norm")))
      x = g.op("Add", h, run_mlp(norm(h, "mlp_norm")))
  if cfg.norm == "pre":
    x = _layer_norm(g, x, enc["final_norm"], cfg.layer_norm_eps, "final_norm")
  if cfg.projection_dim:
    x = g.op("MatMul", x, g.const(params["projection"]["kernel"], "projection/kernel"))
  g.nodes.append(helper.make_node("Identity", [x], ["last_hidden_state"], name="output"))
  width = cfg.embedding_dim
  outputs = [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT,
                                           dims + [width])]
  for out_name, value in routing or []:
    g.nodes.append(helper.make_node("Identity", [value], [out_name]))
    outputs.append(helper.make_tensor_value_info(out_name, TensorProto.INT64,
                                                 ["tokens", cfg.top_k]))
  graph = helper.make_graph(g.nodes, "moe_embed_encoder", inputs, outputs, g.initializers)
  model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                            producer_name="moe_embed")
  model.ir_version = 8  # Readable by onnxruntime >= 1.10.
  return model


def save(model, path: str) -> None:
  """Writes `model`; weights past EXTERNAL_DATA_BYTES go to `<file>_data` beside it."""
  import onnx
  os.makedirs(os.path.dirname(path), exist_ok=True)
  size = sum(t.ByteSize() for t in model.graph.initializer)
  if size > EXTERNAL_DATA_BYTES:
    onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location=os.path.basename(path) + "_data", size_threshold=1024)
  else:
    onnx.save_model(model, path)


# MatMuls left in float32 by quantize_int8: the routers, so that int8 rounding
# cannot move a token to other experts.
FLOAT_MATMULS = ("/router",)
_INT8_MAX = 127.0


def _quantize_columns(kernel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Symmetric int8 per output column: kernel [in, out] ~ q [in, out] int8 * scale [out]."""
  scale = np.abs(kernel).max(axis=0) / _INT8_MAX
  scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
  q = np.clip(np.rint(kernel / scale), -_INT8_MAX, _INT8_MAX).astype(np.int8)
  return q, scale


def _int8_matmul(g: _Graph, x: str, kernel: np.ndarray, name: str, out: str) -> None:
  """out = x [..., in] @ kernel [in, out] in 8 bits, with one range per token and per column.

  Each token (row of x) is rounded to uint8 over its own range [min(x_row, 0),
  max(x_row, 0)], so a batch's long texts and outliers cannot coarsen its other
  texts' rounding (onnxruntime's dynamic quantization takes one range per tensor:
  the worst text of a padded MiniLM batch fell to cosine 0.981 with it). Kernels
  are int8 symmetric per output column. MatMulInteger (uint8 x int8, the fast
  path of onnxruntime's CPU kernels) accumulates in int32; each token's zero point
  comes out through the kernel's column sums, exactly in int32 (|sums| <= 255 *
  127 * in < 2^31), before one scale per token and one per column.
  """
  from onnx import helper
  q, col_scale = _quantize_columns(kernel)
  width = kernel.shape[0]
  rows = g.op("Reshape", x, g.const([-1, width], dtype=np.int64))  # [T, in]
  low = g.op("Min", g.op("ReduceMin", rows, axes=[-1], keepdims=0), g.const(0.0))  # [T]
  high = g.op("Max", g.op("ReduceMax", rows, axes=[-1], keepdims=0), g.const(0.0))
  # An all-zero row (a padding token) gets a tiny scale: it quantizes to zeros exactly.
  scale = g.op("Div", g.op("Max", g.op("Sub", high, low), g.const(1e-30)), g.const(255.0))
  zero = g.op("Cast", g.op("Round", g.op("Div", g.op("Neg", low), scale)), to=2)  # uint8 [T]
  xq = g.op("QuantizeLinear", rows, scale, zero, axis=0)  # uint8 [T, in]
  acc = g.op("MatMulInteger", xq, g.const(q, f"{name}/kernel_int8", dtype=np.int8),
             name=f"{name}/int8")  # int32 [T, out]: sum_i xq_ti q_ij
  column_sums = g.const(q.astype(np.int32).sum(0), f"{name}/kernel_sums", dtype=np.int32)
  zero_rows = g.op("Unsqueeze", g.op("Cast", zero, to=6), g.const([1], dtype=np.int64))
  centred = g.op("Sub", acc, g.op("Mul", zero_rows, column_sums))  # sum_i (xq - zero) q
  y = g.op("DequantizeLinear", centred, scale, axis=0)  # [T, out] float32
  y = g.op("Mul", y, g.const(col_scale, f"{name}/kernel_scale"))
  shape = g.op("Concat", g.op("Shape", x, start=0, end=-1),
               g.const([kernel.shape[1]], dtype=np.int64), axis=0)
  # The float MatMul's output name, so that its consumers read the int8 result.
  g.nodes.append(helper.make_node("Reshape", [y, shape], [out], name=f"{name}/dequantize"))


def quantize_int8(src: str, dst: str) -> None:
  """Rewrites every weight MatMul of the graph at src but FLOAT_MATMULS into int8 (dst).

  Weights: symmetric int8 per output column. Activations: uint8 with one range
  per token, taken when the graph runs (`_int8_matmul`). Everything else, including
  the routers' float32 top-k, is unchanged.
  """
  import onnx
  from onnx import numpy_helper
  model = onnx.load(src)
  weights = {t.name: t for t in model.graph.initializer}
  g = _Graph(prefix="int8/")  # Apart from the float graph's generated names.
  used = set()
  for node in model.graph.node:
    if (node.op_type == "MatMul" and node.input[1] in weights
        and not node.name.endswith(FLOAT_MATMULS)):
      kernel = numpy_helper.to_array(weights[node.input[1]]).astype(np.float32)
      _int8_matmul(g, node.input[0], kernel, node.name, node.output[0])
    else:
      g.nodes.append(node)
      used.update(node.input)
  keep = [t for name, t in weights.items() if name in used]
  del model.graph.node[:]
  model.graph.node.extend(g.nodes)
  del model.graph.initializer[:]
  model.graph.initializer.extend(keep + g.initializers)
  save(model, dst)


def write_onnx(folder: str, params: dict, config: EncoderConfig, *,
               quantize: Optional[str] = None) -> list[str]:
  """Writes onnx/model.onnx (and onnx/model_qint8.onnx with quantize='int8') into folder.

  Returns the written paths relative to folder.
  """
  path = os.path.join(folder, SUBFOLDER, MODEL_FILE)
  save(build_model(params, config), path)
  written = [os.path.join(SUBFOLDER, MODEL_FILE)]
  if quantize == "int8":
    quantize_int8(path, os.path.join(folder, SUBFOLDER, INT8_FILE))
    written.append(os.path.join(SUBFOLDER, INT8_FILE))
  elif quantize is not None:
    raise ValueError(f"quantize={quantize!r} is not one of (None, 'int8').")
  return written
