"""Our parameter tree -> an ONNX graph of the encoder that computes real tokens only.

The graph is built node by node from the parameters (not traced from PyTorch).

- Padding is dropped after the embedding lookup: projections, MLPs, experts and
  norms run on the T real tokens [T, D]. Attention alone sees padding, in
  ATTENTION_GROUPS slices of the batch's rows, each cut to its own longest text
  (onnxruntime's fused `com.microsoft.MultiHeadAttention`, on CPU and CUDA).
- Each MoE layer computes only what routing chose: the router (float32 MatMul,
  Softmax over all E experts, TopK) picks k experts per token; expert e runs on
  its n_e rows alone (`Compress`, then [n_e, D] x [D, F] x [F, D]); each token
  gathers its k output rows and sums them, weighted. Expert matmul work is
  sum_e n_e = k * (real tokens), not E * (all tokens).

Inputs, as sentence-transformers' ONNX backend feeds them: `input_ids`,
`attention_mask` (and `token_type_ids` when the model has a token-type table),
int64 [batch, sequence], both axes dynamic, texts right-padded. Output:
`last_hidden_state` float32 [batch, sequence, D] (projected per token when the
model has a projection head, which commutes with mean pooling), zero at padding;
pooling and L2 normalisation stay in the folder's sentence-transformers modules.

`quantize_int8` writes the int8 copy: every weight MatMul becomes an int8
MatMulInteger with symmetric weights per output column and activations ranged
per token as the graph runs (a dynamic quantization finer than onnxruntime's
one range per tensor). The router MatMuls stay float32 so that int8 rounding
does not move tokens between experts (`FLOAT_MATMULS`).

Node names: expert matmuls are `layer_{i}/mlp/expert_{e}/w1` (and `/w3` for the
SwiGLU gate, `/w2`), router matmuls `layer_{i}/mlp/router`.
"""

from __future__ import annotations

import itertools
import math
import os
from typing import Any, Optional

import numpy as np

from moe_embed.model.config import EncoderConfig

OPSET = 17  # LayerNormalization.
SUBFOLDER = "onnx"
MODEL_FILE = "model.onnx"  # Where sentence-transformers' ONNX backend looks.
INT8_FILE = "model_qint8.onnx"
EXTERNAL_DATA_BYTES = 1_800_000_000  # Past this, weights go to `<file>_data` (2 GB limit).
_NEG = -1e30  # Attention score of a padding key: exp() is exactly 0.
CONTRIB_DOMAIN = "com.microsoft"  # onnxruntime's fused MultiHeadAttention (CPU and CUDA).


class _Graph:
  """Collects nodes and initializers; `op` returns the output name of one node."""

  def __init__(self, prefix: str = ""):
    self.nodes, self.initializers, self._prefix = [], [], prefix
    self._numbers = itertools.count(1)

  def branch(self) -> "_Graph":
    """A graph for an If branch: its own nodes; names and initializers shared with self."""
    child = _Graph(self._prefix)
    child.initializers, child._numbers = self.initializers, self._numbers
    return child

  def name(self, hint: str) -> str:
    return f"{self._prefix}{hint}_{next(self._numbers)}"

  def const(self, value, name: Optional[str] = None, dtype=np.float32) -> str:
    from onnx import numpy_helper
    name = name or self.name("const")
    # np.array keeps a scalar 0-d (np.ascontiguousarray would make it [1]).
    self.initializers.append(numpy_helper.from_array(np.array(value, dtype, order="C"), name))
    return name

  def int64(self, value) -> str:
    """An int64 constant: shapes, axes, indices."""
    return self.const(value, dtype=np.int64)

  def op(self, op_type: str, *inputs: str, outputs: int = 1, name: Optional[str] = None,
         **attrs) -> Any:
    from onnx import helper
    node_name = name or self.name(op_type.lower())
    outs = [f"{node_name}:{i}" for i in range(outputs)]
    self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=node_name, **attrs))
    return outs[0] if outputs == 1 else outs

  def subgraph(self, output: str, width: int):
    """This branch's nodes as a GraphProto whose one output is `output`, float [T, width]."""
    from onnx import TensorProto, helper
    value = helper.make_tensor_value_info(output, TensorProto.FLOAT, ["tokens", width])
    return helper.make_graph(self.nodes, self.name("branch"), [], [value])


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
  """GPT-NeoX (half-split) rotary on the first `rot` dims of x [..., Dh]; cos, sin broadcast."""
  axis = g.int64([-1])
  cut = lambda a, b: g.op("Slice", x, g.int64([a]),
                          g.int64([b]), axis)
  half = rot // 2
  rotated = g.op("Concat", g.op("Neg", cut(half, rot)), cut(0, half), axis=-1)
  out = g.op("Add", g.op("Mul", cut(0, rot), cos), g.op("Mul", rotated, sin))
  return g.op("Concat", out, cut(rot, head_dim), axis=-1) if rot < head_dim else out


class _Tokens:
  """Where the real tokens of a right-padded [B, L] batch sit, and their layouts for attention.

  flat [T] int64: the real tokens' slots among the B * L, in row-major order;
  positions [T]: their positions in their text. `whole` lays them out as the
  batch [B, L]; `sliced` as ATTENTION_GROUPS row slices, each cut to its own
  longest text (`_Layout`). One row (B = 1) takes `whole` (an If).
  """

  def __init__(self, g: _Graph):
    self.g = g
    i64 = g.int64
    scalar = lambda t: g.op("Squeeze", t, i64([0]))
    mask = g.op("Reshape", "attention_mask", i64([-1]))  # [B*L]
    self.flat = g.op("Squeeze", g.op("NonZero", mask), i64([0]))  # [T]
    count = scalar(g.op("Shape", self.flat))  # []: T, also the index of a zero row.
    batch = scalar(g.op("Shape", "input_ids", start=0, end=1))  # []: B
    length = scalar(g.op("Shape", "input_ids", start=1, end=2))  # []: L
    row, self.positions = g.op("Div", self.flat, length), g.op("Mod", self.flat, length)  # [T]
    lengths = g.op("ReduceSum", "attention_mask", i64([1]), keepdims=0)  # [B]
    offsets = g.op("CumSum", lengths, i64(0), exclusive=1)  # [B]: each text's first token.
    layout = lambda groups, width: _Layout(g, groups, batch, lengths, offsets, count, row,
                                           self.positions, width)
    self.whole = layout(1, length)
    self.sliced = layout(ATTENTION_GROUPS, None)
    self.several_rows = g.op("Greater", batch, i64(1))  # bool []

  def real(self, padded: str) -> str:
    """[B, L] -> [T]: the real tokens' entries."""
    g = self.g
    return g.op("Gather", g.op("Reshape", padded, g.int64([-1])), self.flat,
                axis=0)

  def pad(self, x: str, width: int) -> str:
    """[T, width] -> [B, L, width], zeros at padding."""
    return self.g.op("Gather", _with_zero_row(self.g, x, width), self.whole.index[0], axis=0)


def _with_zero_row(g: _Graph, x: str, width: int) -> str:
  """[T, width] -> [T + 1, width]: row T, where layouts put padding, is zero."""
  return g.op("Concat", x, g.const(np.zeros((1, width))), axis=0)


# Attention runs on this many slices of a batch's rows, each padded only to its own
# longest text: callers that sort texts by length (sentence-transformers' encode,
# OnnxEmbedder) then spend little attention on padding. At batch 64 on the
# benchmark's texts 16 slices measured 0-9% faster than 8 (within this machine's noise
# for the MoE); a batch of one row takes one slice (an If), as the slices past B cost
# a few percent there.
ATTENTION_GROUPS = 16


class _Layout:
  """The real tokens as `groups` row slices for attention, built once per batch.

  Slice i holds rows [i * r, (i + 1) * r), r = ceil(B / groups), and is cut to
  `width` (or to the longest text among them, m). index[i] int64 [rows, m]: each
  slot's token (T, a zero row, at padding); key_mask[i] int32 [rows, m]; back
  [T]: each token's row in the slices' outputs [sum rows * m, ...], concatenated.
  Slices past B are empty.
  """

  def __init__(self, g: _Graph, groups: int, batch: str, lengths: str, offsets: str,
               count: str, row: str, position: str, width: Optional[str]):
    i64 = g.int64
    unsqueeze = lambda t, axis: g.op("Unsqueeze", t, i64([axis]))
    rows = g.op("Div", g.op("Add", batch, i64(groups - 1)), i64(groups))  # []: r
    self.index, self.key_mask, longest, sizes = [], [], [], []
    for i in range(groups):
      start, end = (g.op("Min", g.op("Mul", rows, i64(j)), batch) for j in (i, i + 1))
      texts = g.op("Range", start, end, i64(1))  # [rows]
      length = g.op("Gather", lengths, texts, axis=0)  # [rows]
      # With a 1 among them, an empty slice's longest length is still defined.
      m = width or g.op("ReduceMax", g.op("Concat", length, i64([1]), axis=0), keepdims=0)
      column = unsqueeze(g.op("Range", i64(0), m, i64(1)), 0)  # [1, m]
      real = g.op("Less", column, unsqueeze(length, 1))  # bool [rows, m]
      token = g.op("Add", unsqueeze(g.op("Gather", offsets, texts, axis=0), 1), column)
      self.index.append(g.op("Where", real, token, count))  # [rows, m]
      self.key_mask.append(g.op("Cast", real, to=6))
      longest.append(unsqueeze(m, 0))
      sizes.append(unsqueeze(g.op("Mul", g.op("Sub", end, start), m), 0))
    group = g.op("Div", row, rows)  # [T]: each token's slice.
    base = g.op("CumSum", g.op("Concat", *sizes, axis=0), i64(0), exclusive=1)  # [groups]
    within = g.op("Sub", row, g.op("Mul", group, rows))  # [T]: its row within the slice.
    self.back = g.op("Add", g.op("Add", g.op("Gather", base, group, axis=0), position),
                     g.op("Mul", within, g.op("Gather", g.op("Concat", *longest, axis=0),
                                                 group, axis=0)))  # [T]

  def attend(self, g: _Graph, qkv: str, cfg: EncoderConfig) -> str:
    """qkv [T + 1, 3D] (zero last row) -> attention output [T, D], slice by slice."""
    outs = [g.op("Reshape", _multi_head(g, g.op("Gather", qkv, index, axis=0), key_mask, cfg),
                 g.int64([-1, cfg.hidden_size]))
            for index, key_mask in zip(self.index, self.key_mask)]  # [rows * m, D] each
    return g.op("Gather", g.op("Concat", *outs, axis=0) if len(outs) > 1 else outs[0],
                self.back, axis=0)


def _multi_head(g: _Graph, qkv: str, key_mask: str, cfg: EncoderConfig) -> str:
  """qkv [rows, m, 3D], key_mask int32 [rows, m] -> [rows, m, D] (onnxruntime's fused kernel)."""
  d = cfg.hidden_size
  q, k, v = g.op("Split", qkv, g.int64([d, d, d]), axis=-1, outputs=3)
  return g.op("MultiHeadAttention", q, k, v, "", key_mask, domain=CONTRIB_DOMAIN,
              num_heads=cfg.num_heads, mask_filter_value=_NEG)


def _attention(g: _Graph, x: str, p: dict, cfg: EncoderConfig, tokens: _Tokens,
               rope: Optional[tuple[str, str]], name: str) -> str:
  """x [T, D] (real tokens) -> [T, D].

  The projections run on the real tokens; only attention itself sees padding,
  in `tokens.sliced`'s row slices (a batch of one row: `tokens.whole`).
  """
  d, h, dh = cfg.hidden_size, cfg.num_heads, cfg.head_dim
  kernel = np.concatenate([_np(p[n]["kernel"]).reshape(d, d) for n in ("query", "key", "value")],
                          axis=1)  # [D, 3D]: q | k | v, each [D, H * Dh].
  qkv_bias = (np.concatenate([_np(p[n]["bias"]).reshape(d) for n in ("query", "key", "value")])
              if cfg.qkv_bias else None)
  qkv = _dense(g, x, kernel, qkv_bias, f"{name}/qkv")  # [T, 3D]
  if rope is not None:
    rot = int(dh * cfg.rotary_fraction)
    q, k, v = g.op("Split", qkv, g.int64([d, d, d]), axis=-1, outputs=3)
    heads, flat = g.int64([0, h, dh]), g.int64([0, d])
    q, k = (g.op("Reshape", _rotary(g, g.op("Reshape", t, heads), *rope, rot, dh), flat)
            for t in (q, k))  # Rotated per head, [T, H, Dh].
    qkv = g.op("Concat", q, k, v, axis=-1)
  qkv = _with_zero_row(g, qkv, 3 * d)  # [T + 1, 3D]
  sliced, whole = g.branch(), g.branch()
  out = g.op("If", tokens.several_rows,
             then_branch=sliced.subgraph(tokens.sliced.attend(sliced, qkv, cfg), d),
             else_branch=whole.subgraph(tokens.whole.attend(whole, qkv, cfg), d))  # [T, D]
  return _dense(g, out, _np(p["out"]["kernel"]).reshape(d, d), p["out"]["bias"], f"{name}/out")


def _mlp(g: _Graph, x: str, p: dict, cfg: EncoderConfig, name: str) -> str:
  bias = lambda layer: p[layer]["bias"] if cfg.mlp_bias else None
  h = _dense(g, x, p["fc1"]["kernel"], bias("fc1"), f"{name}/fc1")
  if cfg.mlp_activation == "swiglu":
    h = g.op("Mul", _silu(g, h), _dense(g, x, p["gate"]["kernel"], bias("gate"), f"{name}/gate"))
  else:
    h = _gelu(g, h)
  return _dense(g, h, p["fc2"]["kernel"], bias("fc2"), f"{name}/fc2")


def _moe(g: _Graph, flat: str, p: dict, cfg: EncoderConfig, name: str,
         routing_outputs: Optional[list]) -> str:
  """Token-choice top-k MoE on the real tokens flat [T, D] -> [T, D].

  Only routed rows reach the experts: expert e multiplies its n_e rows.
  """
  k = cfg.top_k
  logits = g.op("MatMul", flat, g.const(p["router"]["kernel"], f"{name}/router/kernel"),
                name=f"{name}/router")  # [T, E] float32
  probs = g.op("Softmax", logits, axis=-1)
  weights, experts = g.op("TopK", probs, g.int64([k]), axis=-1, largest=1,
                          sorted=1, outputs=2)  # [T, K] float32, int64
  if cfg.renormalize_topk:
    power = float(cfg.renormalize_topk)
    if power == 1:
      norm = g.op("ReduceSum", weights, g.int64([1]), keepdims=1)
    else:  # (sum w^p)^(1/p), as routing.topk_norm.
      powered = g.op("Pow", weights, g.const(power))
      norm = g.op("Pow", g.op("ReduceSum", powered, g.int64([1]), keepdims=1),
                  g.const(1.0 / power))
    weights = g.op("Div", weights, norm)
  if routing_outputs is not None:
    routing_outputs.append((f"{name}/experts", experts))
  i64 = g.int64
  chose = g.op("Equal", g.op("Unsqueeze", experts, i64([2])),
               i64(np.arange(cfg.num_experts)))  # bool [T, K, E]
  routed = g.op("ReduceMax", g.op("Cast", chose, to=6), axes=[1], keepdims=0)  # int32 [T, E]
  # Expert outputs are concatenated in expert order, [k * T, D]; row_of[t, e] is
  # token t's row among them (an exclusive count of expert e's earlier rows).
  counts = g.op("ReduceSum", routed, i64([0]), keepdims=0)  # [E]
  row_of = g.op("Add", g.op("Sub", g.op("CumSum", routed, i64(0)), g.const(1, dtype=np.int32)),
                g.op("Sub", g.op("CumSum", counts, i64(0)), counts))  # int32 [T, E]
  outputs = []
  for e in range(cfg.num_experts):
    rows = g.op("Cast", g.op("Gather", routed, i64(e), axis=1), to=9)  # bool [T]
    xe = g.op("Compress", flat, rows, axis=0)  # [n_e, D]
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
    outputs.append(g.op("MatMul", hidden, g.const(p["w2"][e], f"{name}/expert_{e}/w2/kernel"),
                        name=f"{name}/expert_{e}/w2"))  # [n_e, D]
  # The combine gathers each token's k rows (a scatter-add of the rows onto their
  # tokens would be shorter, but onnxruntime's ScatterND adds duplicate indices
  # from several threads at once: measured run-to-run differences up to 4).
  picked = g.op("Gather", g.op("Concat", *outputs, axis=0),
                g.op("GatherElements", row_of, experts, axis=1), axis=0)  # [T, K, D]
  y = g.op("ReduceSum", g.op("Mul", picked, g.op("Unsqueeze", weights, i64([2]))), i64([1]),
           keepdims=0)  # [T, D]
  return g.op("Add", y, g.const(p["bias"], f"{name}/bias"))


def build_model(params: dict, config: EncoderConfig, *, routing_outputs: bool = False):
  """The encoder as an onnx.ModelProto: (input_ids, attention_mask[, token_type_ids]) ->
  last_hidden_state.

  Padding is dropped after the embedding lookup: every per-token op (projections,
  MLPs, experts, norms) runs on the T real tokens [T, D], and attention on row
  slices each padded to its own longest text (`_Tokens`). At batch 64 on text of
  mixed length most of a padded batch's slots are padding. Padding rows of
  last_hidden_state are zero. With routing_outputs, every MoE layer also outputs its chosen experts
  `layer_{i}/experts` int64 [T, K], real tokens in row-major order, for tests.
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
  tokens = _Tokens(g)
  emb = enc["embeddings"]
  lookup = lambda table, name, ids: g.op("Gather", g.const(table, name), ids, axis=0)
  x = lookup(emb["word_embeddings"]["embedding"], "word_embeddings",
             tokens.real("input_ids"))  # [T, D]
  if cfg.type_vocab_size:
    inputs.append(helper.make_tensor_value_info("token_type_ids", TensorProto.INT64, dims))
    x = g.op("Add", x, lookup(emb["token_type_embeddings"]["embedding"], "token_type_embeddings",
                              tokens.real("token_type_ids")))
  rope = None
  if cfg.position_embedding == "learned":
    positions = g.op("Add", tokens.positions, g.int64(cfg.position_offset))
    x = g.op("Add", x, lookup(emb["position_embeddings"]["embedding"], "position_embeddings",
                              positions))
  else:
    rot = int(cfg.head_dim * cfg.rotary_fraction)
    inv_freq = 1.0 / (np.float32(cfg.rotary_base) ** (np.arange(0, rot, 2, dtype=np.float32)
                                                       / np.float32(rot)))
    angles = g.op("Mul", g.op("Unsqueeze", g.op("Cast", tokens.positions, to=1),
                              g.int64([1])), g.const(inv_freq))  # [T, rot/2]
    angles = g.op("Unsqueeze", g.op("Concat", angles, angles, axis=-1),
                  g.int64([1]))  # [T, 1, rot]: broadcast over heads.
    rope = (g.op("Cos", angles), g.op("Sin", angles))
  x = _layer_norm(g, x, emb["layer_norm"], cfg.layer_norm_eps, "embeddings/layer_norm")
  routing = [] if routing_outputs else None
  for i in range(cfg.num_layers):
    p, name = enc[f"layer_{i}"], f"layer_{i}"
    eps = cfg.layer_norm_eps
    if cfg.is_moe_layer(i):
      run_mlp = lambda h: _moe(g, h, p["mlp"], cfg, f"{name}/mlp", routing)
    else:
      run_mlp = lambda h: _mlp(g, h, p["mlp"], cfg, f"{name}/mlp")
    attn = lambda h: _attention(g, h, p["attention"], cfg, tokens, rope, f"{name}/attention")
    norm = lambda h, which: _layer_norm(g, h, p[which], eps, f"{name}/{which}")
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
  width = cfg.embedding_dim
  g.nodes.append(helper.make_node("Identity", [tokens.pad(x, width)], ["last_hidden_state"],
                                  name="output"))
  outputs = [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT,
                                           dims + [width])]
  for out_name, value in routing or []:
    g.nodes.append(helper.make_node("Identity", [value], [out_name]))
    outputs.append(helper.make_tensor_value_info(out_name, TensorProto.INT64,
                                                 ["tokens", cfg.top_k]))
  graph = helper.make_graph(g.nodes, "moe_embed_encoder", inputs, outputs, g.initializers)
  opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid(CONTRIB_DOMAIN, 1)]
  model = helper.make_model(graph, opset_imports=opsets, producer_name="moe_embed")
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
# The weights' zero point: int8 q is stored as uint8 q + 128 (see `_int8_matmul`).
_WEIGHT_ZERO = 128


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
  are int8 symmetric per output column, stored as uint8 q + 128 with the weight
  zero point 128, so MatMulInteger multiplies uint8 x uint8: onnxruntime's x86
  uint8 x int8 kernel for AVX2 without VNNI (vpmaddubsw) saturates each pair of
  products at int16 (2 x 255 x 127 > 32767), which gave sums off by up to 80%
  on such CPUs; its uint8 x uint8 kernels widen to int16 first and are exact on
  every CPU. The product accumulates in int32; each token's zero point comes out
  through the kernel's column sums, exactly in int32 (|sums| <= 255 * 127 * in <
  2^31), before one scale per token and one per column.
  """
  from onnx import helper
  q, col_scale = _quantize_columns(kernel)
  width = kernel.shape[0]
  rows = g.op("Reshape", x, g.int64([-1, width]))  # [T, in]
  low = g.op("Min", g.op("ReduceMin", rows, axes=[-1], keepdims=0), g.const(0.0))  # [T]
  high = g.op("Max", g.op("ReduceMax", rows, axes=[-1], keepdims=0), g.const(0.0))
  # An all-zero row (a padding token) gets a tiny scale: it quantizes to zeros exactly.
  scale = g.op("Div", g.op("Max", g.op("Sub", high, low), g.const(1e-30)), g.const(255.0))
  zero = g.op("Cast", g.op("Round", g.op("Div", g.op("Neg", low), scale)), to=2)  # uint8 [T]
  xq = g.op("QuantizeLinear", rows, scale, zero, axis=0)  # uint8 [T, in]
  kernel_u8 = g.const(q.astype(np.int16) + _WEIGHT_ZERO, f"{name}/kernel_uint8",
                      dtype=np.uint8)  # [in, out]: q + 128
  acc = g.op("MatMulInteger", xq, kernel_u8, "", g.const(_WEIGHT_ZERO, dtype=np.uint8),
             name=f"{name}/int8")  # int32 [T, out]: sum_i xq_ti q_ij
  column_sums = g.const(q.astype(np.int32).sum(0), f"{name}/kernel_sums", dtype=np.int32)
  zero_rows = g.op("Unsqueeze", g.op("Cast", zero, to=6), g.int64([1]))
  centred = g.op("Sub", acc, g.op("Mul", zero_rows, column_sums))  # sum_i (xq - zero) q
  y = g.op("DequantizeLinear", centred, scale, axis=0)  # [T, out] float32
  y = g.op("Mul", y, g.const(col_scale, f"{name}/kernel_scale"))
  shape = g.op("Concat", g.op("Shape", x, start=0, end=-1),
               g.int64([kernel.shape[1]]), axis=0)
  # The float MatMul's output name, so that its consumers read the int8 result.
  g.nodes.append(helper.make_node("Reshape", [y, shape], [out], name=f"{name}/dequantize"))


def _inputs(node) -> set[str]:
  """The names a node reads, those of its If branches included."""
  from onnx import AttributeProto
  names = set(node.input)
  for attr in node.attribute:
    if attr.type == AttributeProto.GRAPH:
      for inner in attr.g.node:
        names |= _inputs(inner)
  return names


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
      used.update(_inputs(node))
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
