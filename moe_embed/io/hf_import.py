"""Hugging Face checkpoint folders -> our parameter tree (the inverse is `hf_export`).

Layouts read: BERT (all-MiniLM-L6-v2; with or without a `bert.` prefix),
XLM-RoBERTa (`roberta.` prefix, positions offset by pad_token_id + 1) and
nomic-bert (model_type `nomic_bert`, or `moe_embed` as `st_export` writes it:
fused `Wqkv`, `fc1/fc2` or gated `fc11/fc12`, rotary, and in MoE layers `mlp.router.layer.weight`,
`mlp.experts.mlp.w1` / `w2` stacked as [experts * mlp, width] with a shared
`mlp.experts.bias`), so a released nomic-embed-text-v2-moe folder loads as is.
A missing or mis-shaped tensor fails with its name and both shapes.
"""

from __future__ import annotations

import json
from typing import Any, Callable

from etils import epath
import numpy as np

from moe_embed.model.config import EncoderConfig

IGNORED_SUFFIXES = ("position_ids", "pooler.dense.weight", "pooler.dense.bias")


class CheckpointError(ValueError):
  """A checkpoint that does not match its config or our encoder."""


def read_config(folder: str) -> dict:
  path = epath.Path(folder) / "config.json"
  if not path.exists():
    raise FileNotFoundError(f"{folder} has no config.json: not a Hugging Face model folder.")
  return json.loads(path.read_text())


def read_state_dict(folder: str) -> dict[str, np.ndarray]:
  """float32 numpy arrays from model.safetensors (sharded or not) or pytorch_model.bin."""
  root = epath.Path(folder)
  single, index = root / "model.safetensors", root / "model.safetensors.index.json"
  if single.exists() or index.exists():
    from safetensors.numpy import load
    files = [single] if single.exists() else sorted(
        {root / f for f in json.loads(index.read_text())["weight_map"].values()})
    out = {}
    for path in files:
      data = path.read_bytes()
      try:
        out.update(load(data))
      except TypeError:  # bfloat16 tensors: numpy cannot hold them, torch can.
        out.update(_torch_safetensors(data))
    return {k: np.asarray(v, np.float32) if v.dtype != np.float32 else v for k, v in out.items()}
  bin_path = root / "pytorch_model.bin"
  if bin_path.exists():
    try:
      import torch
    except ImportError:
      raise ImportError(f"{bin_path} is a PyTorch pickle; install torch to read it, or convert "
                        "the folder to model.safetensors.") from None
    with bin_path.open("rb") as f:
      state = torch.load(f, map_location="cpu", weights_only=True)
    return {k: v.float().numpy() for k, v in state.items()}
  raise FileNotFoundError(f"{folder} has neither model.safetensors nor pytorch_model.bin.")


def _torch_safetensors(data: bytes) -> dict[str, np.ndarray]:
  from safetensors.torch import load
  return {k: v.float().numpy() for k, v in load(data).items()}


def config_from_hf(hf: dict) -> EncoderConfig:
  """EncoderConfig for a BERT, XLM-RoBERTa or nomic-bert config.json."""
  kind = hf.get("model_type")
  if kind in ("bert", "xlm-roberta", "roberta"):
    if hf.get("position_embedding_type", "absolute") != "absolute":
      raise CheckpointError(f"position_embedding_type={hf['position_embedding_type']!r} "
                            "is not supported (only 'absolute').")
    if hf.get("hidden_act", "gelu") != "gelu":
      raise CheckpointError(f"hidden_act={hf['hidden_act']!r} is not supported (only 'gelu').")
    pad = int(hf.get("pad_token_id", 0))
    return EncoderConfig(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
        mlp_dim=hf["intermediate_size"], type_vocab_size=hf.get("type_vocab_size", 2),
        pad_token_id=pad, position_embedding="learned",
        max_position_embeddings=hf["max_position_embeddings"],
        position_offset=pad + 1 if kind != "bert" else 0,
        layer_norm_eps=hf.get("layer_norm_eps", 1e-12), norm="post", mlp_activation="gelu",
        moe_every_n_layers=0)
  if kind in ("nomic_bert", "moe_embed"):
    act = hf.get("activation_function", "gelu")
    if act not in ("gelu", "swiglu"):
      raise CheckpointError(f"nomic_bert activation_function={act!r} is not supported.")
    if hf.get("rotary_emb_interleaved"):
      raise CheckpointError("Interleaved rotary embeddings are not supported.")
    # Options of the nomic-bert code our encoder does not implement: fail instead of
    # silently computing a different function.
    for key, supported in (("parallel_block", False), ("causal", False),
                           ("num_shared_experts", 0), ("expert_choice_router", False),
                           ("rotary_scaling_factor", None), ("rotary_emb_scale_base", None)):
      if hf.get(key, supported) not in (supported, None):
        raise CheckpointError(f"nomic_bert config.json has {key}={hf[key]!r}; only "
                              f"{supported!r} is supported.")
    if int(hf.get("ffn_div", 1) or 1) != 1:
      raise CheckpointError(f"nomic_bert config.json has ffn_div={hf['ffn_div']!r}; only 1 "
                            "(experts as wide as n_inner) is supported.")
    if bool(hf.get("mlp_fc1_bias", True)) != bool(hf.get("mlp_fc2_bias", True)):
      raise CheckpointError(
          f"mlp_fc1_bias={hf.get('mlp_fc1_bias')} and mlp_fc2_bias={hf.get('mlp_fc2_bias')} "
          "differ; the encoder has one mlp_bias switch for both.")
    moe_every = int(hf.get("moe_every_n_layers", 0) or 0)
    # nomic-bert makes layer i MoE when i % n == 1 (none at all for n = 1); folders we
    # exported record another placement as moe_layer_offset.
    offset = int(hf.get("moe_layer_offset", 1))
    if moe_every == 1 and "moe_layer_offset" not in hf:
      moe_every = 0
    if not moe_every or offset % moe_every == moe_every - 1:
      offset = -1  # The same layers as our default placement (all n = 2 checkpoints).
    fraction = float(hf.get("rotary_emb_fraction", 1.0))
    # rotary_emb_fraction <= 0: a learned position table (exported BERT / XLM-R models).
    # A rotary model has no table; n_positions is the context it was built for
    # (8192 for nomic-embed-text-v1), its token limit when encoding.
    positions = (dict(position_embedding="rotary", rotary_fraction=fraction,
                      max_position_embeddings=int(hf.get("n_positions") or 2048))
                 if fraction > 0 else
                 dict(position_embedding="learned",
                      max_position_embeddings=int(hf["max_trained_positions"]),
                      position_offset=int(hf.get("position_offset", 0))))
    return EncoderConfig(
        vocab_size=hf["vocab_size"], hidden_size=hf["n_embd"], num_layers=hf["n_layer"],
        num_heads=hf["n_head"], mlp_dim=hf.get("n_inner") or 4 * hf["n_embd"],
        type_vocab_size=hf.get("type_vocab_size", 2), pad_token_id=int(hf.get("pad_token_id", 1)),
        rotary_base=float(hf.get("rotary_emb_base", 10_000)), **positions,
        norm="pre" if hf.get("prenorm") else "post",
        layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        mlp_activation="swiglu" if act == "swiglu" else "gelu",
        qkv_bias=bool(hf.get("qkv_proj_bias", True)),
        mlp_bias=bool(hf.get("mlp_fc1_bias", True)),
        moe_every_n_layers=moe_every, num_experts=int(hf.get("num_experts", 8) or 8),
        moe_layer_offset=offset, top_k=int(hf.get("moe_top_k", 2) or 2),
        renormalize_topk=_normalize_p(hf.get("moe_normalize_expert_weights")),
        expert_w1_bias=bool(hf.get("moe_expert_w1_bias", False)),
        projection_dim=int(hf.get("projection_dim", 0) or 0))
  raise CheckpointError(f"model_type={kind!r} is not supported; expected 'bert', 'xlm-roberta', "
                        "'nomic_bert' or 'moe_embed'.")


def _normalize_p(value: Any) -> float:
  """megablocks' moe_normalize_expert_weights -> renormalize_topk: None/False off, True 1, p."""
  if value is None or value is False:
    return False
  if value is True:
    return True
  try:
    p = float(value)
  except (TypeError, ValueError):
    raise CheckpointError(f"moe_normalize_expert_weights={value!r} is not a number (the p of "
                          "the p-norm the top-k weights are divided by).") from None
  if p < 0:
    raise CheckpointError(f"moe_normalize_expert_weights={value!r} must be >= 0.")
  return p if p != int(p) else int(p) if p else False


class _Taker:
  """Pops tensors from a state dict by name, checking shapes, naming what is wrong."""

  def __init__(self, state: dict[str, np.ndarray], prefix: str):
    self.state = dict(state)
    self.prefix = prefix

  def has(self, name: str) -> bool:
    return self.prefix + name in self.state

  def __call__(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
    key = self.prefix + name
    if key not in self.state:
      raise CheckpointError(f"Checkpoint is missing tensor {key!r} (expected shape {shape}).")
    value = self.state.pop(key)
    if tuple(value.shape) != tuple(shape):
      raise CheckpointError(
          f"Tensor {key!r} has shape {tuple(value.shape)}, expected {tuple(shape)}.")
    return value

  def leftovers(self) -> list[str]:
    return sorted(k for k in self.state if not k.endswith(IGNORED_SUFFIXES)
                  and not k.startswith(("cls.", "lm_head.")))


def _prefix_of(state: dict, marker: str) -> str:
  for key in state:
    if key.endswith(marker):
      return key[:-len(marker)]
  raise CheckpointError(f"No tensor ending in {marker!r}: not a checkpoint of this layout.")


def _ln(take: _Taker, name: str, d: int) -> dict:
  return {"scale": take(f"{name}.weight", (d,)), "bias": take(f"{name}.bias", (d,))}


def params_from_bert(state: dict, config: EncoderConfig) -> dict:
  """Our params from a BERT / XLM-R state dict (torch Linear weights are [out, in])."""
  take = _Taker(state, _prefix_of(state, "embeddings.word_embeddings.weight"))
  d, h, hd, f = config.hidden_size, config.num_heads, config.head_dim, config.mlp_dim
  emb = {"word_embeddings": {"embedding": take("embeddings.word_embeddings.weight",
                                               (config.vocab_size, d))},
         "position_embeddings": {"embedding": take("embeddings.position_embeddings.weight",
                                                   (config.max_position_embeddings, d))},
         "layer_norm": _ln(take, "embeddings.LayerNorm", d)}
  if config.type_vocab_size:
    emb["token_type_embeddings"] = {"embedding": take(
        "embeddings.token_type_embeddings.weight", (config.type_vocab_size, d))}
  encoder = {"embeddings": emb}
  for i in range(config.num_layers):
    p = f"encoder.layer.{i}."
    attn = {n: {"kernel": take(f"{p}attention.self.{n}.weight", (d, d)).T.reshape(d, h, hd),
                "bias": take(f"{p}attention.self.{n}.bias", (d,)).reshape(h, hd)}
            for n in ("query", "key", "value")}
    attn["out"] = {"kernel": take(f"{p}attention.output.dense.weight", (d, d)).T.reshape(h, hd, d),
                   "bias": take(f"{p}attention.output.dense.bias", (d,))}
    encoder[f"layer_{i}"] = {
        "attention": attn,
        "attention_norm": _ln(take, f"{p}attention.output.LayerNorm", d),
        "mlp": {"fc1": {"kernel": take(f"{p}intermediate.dense.weight", (f, d)).T,
                        "bias": take(f"{p}intermediate.dense.bias", (f,))},
                "fc2": {"kernel": take(f"{p}output.dense.weight", (d, f)).T,
                        "bias": take(f"{p}output.dense.bias", (d,))}},
        "mlp_norm": _ln(take, f"{p}output.LayerNorm", d)}
  _report_leftovers(take)
  return {"encoder": encoder}


def params_from_nomic(state: dict, config: EncoderConfig) -> dict:
  """Our params from a nomic-bert state dict (dense or MoE)."""
  take = _Taker(state, _prefix_of(state, "embeddings.word_embeddings.weight"))
  d, h, hd, f, e = (config.hidden_size, config.num_heads, config.head_dim, config.mlp_dim,
                    config.num_experts)
  emb = {"word_embeddings": {"embedding": take("embeddings.word_embeddings.weight",
                                               (config.vocab_size, d))},
         "layer_norm": _ln(take, "emb_ln", d)}
  if config.type_vocab_size:
    emb["token_type_embeddings"] = {"embedding": take(
        "embeddings.token_type_embeddings.weight", (config.type_vocab_size, d))}
  if config.position_embedding == "learned":
    emb["position_embeddings"] = {"embedding": take(
        "embeddings.position_embeddings.weight", (config.max_position_embeddings, d))}
  encoder = {"embeddings": emb}
  if config.norm == "pre":
    encoder["final_norm"] = _ln(take, "final_ln", d)
  zeros = lambda *s: np.zeros(s, np.float32)
  for i in range(config.num_layers):
    p = f"encoder.layers.{i}."
    wqkv = take(f"{p}attn.Wqkv.weight", (3 * d, d)).reshape(3, h, hd, d)
    bqkv = (take(f"{p}attn.Wqkv.bias", (3 * d,)).reshape(3, h, hd) if config.qkv_bias
            else None)
    attn = {}
    for j, n in enumerate(("query", "key", "value")):
      attn[n] = {"kernel": np.transpose(wqkv[j], (2, 0, 1))}
      if bqkv is not None:
        attn[n]["bias"] = bqkv[j]
    attn["out"] = {"kernel": take(f"{p}attn.out_proj.weight", (d, d)).T.reshape(h, hd, d),
                   "bias": (take(f"{p}attn.out_proj.bias", (d,)) if take.has(f"{p}attn.out_proj.bias")
                            else zeros(d))}
    layer = {"attention": attn, "attention_norm": _ln(take, f"{p}norm1", d),
             "mlp_norm": _ln(take, f"{p}norm2", d)}
    if config.is_moe_layer(i):
      if not take.has(f"{p}mlp.router.layer.weight"):
        raise CheckpointError(
            f"config.json declares MoE every {config.moe_every_n_layers} layers but the "
            f"checkpoint has no {take.prefix}{p}mlp.router.layer.weight: a dense checkpoint "
            "with an MoE config.")
      w1 = take(f"{p}mlp.experts.mlp.w1", (e * f, d)).reshape(e, f, d)
      w2 = take(f"{p}mlp.experts.mlp.w2", (e * f, d)).reshape(e, f, d)
      layer["mlp"] = {"router": {"kernel": take(f"{p}mlp.router.layer.weight", (e, d)).T},
                      "w1": np.transpose(w1, (0, 2, 1)), "w2": w2,
                      "bias": take(f"{p}mlp.experts.bias", (d,))}
      if config.mlp_activation == "swiglu":  # megablocks' v1: the gate of SwiGLU experts.
        w3 = take(f"{p}mlp.experts.mlp.v1", (e * f, d)).reshape(e, f, d)
        layer["mlp"]["w3"] = np.transpose(w3, (0, 2, 1))
      if config.expert_w1_bias:
        layer["mlp"]["w1_bias"] = take(f"{p}mlp.experts.mlp.w1_bias", (e, f))
    else:
      if take.has(f"{p}mlp.router.layer.weight"):
        raise CheckpointError(f"Layer {i} has router weights but config.json makes it dense "
                              "(check moe_every_n_layers).")
      mlp = {}
      if config.mlp_activation == "swiglu":  # y = fc11(x) * silu(fc12(x)).
        names = (("fc1", "fc12", (f, d)), ("gate", "fc11", (f, d)), ("fc2", "fc2", (d, f)))
      else:
        names = (("fc1", "fc1", (f, d)), ("fc2", "fc2", (d, f)))
      for ours, theirs, shape in names:
        mlp[ours] = {"kernel": take(f"{p}mlp.{theirs}.weight", shape).T}
        if config.mlp_bias:
          mlp[ours]["bias"] = take(f"{p}mlp.{theirs}.bias", shape[:1])
      layer["mlp"] = mlp
    encoder[f"layer_{i}"] = layer
  out = {"encoder": encoder}
  if config.projection_dim:
    out["projection"] = {"kernel": take("projection.weight", (config.projection_dim, d)).T}
  _report_leftovers(take)
  return out


def _report_leftovers(take: _Taker) -> None:
  extra = take.leftovers()
  if extra:
    raise CheckpointError(f"Checkpoint has {len(extra)} tensors the encoder does not use, "
                          f"e.g. {extra[:5]}; is config.json the one for these weights?")


LOADERS: dict[str, Callable[[dict, EncoderConfig], dict]] = {
    "bert": params_from_bert, "xlm-roberta": params_from_bert, "roberta": params_from_bert,
    "nomic_bert": params_from_nomic, "moe_embed": params_from_nomic}


def load_hf_folder(folder: str) -> tuple[dict, EncoderConfig, dict[str, Any]]:
  """(params, EncoderConfig, meta) of a Hugging Face model folder."""
  hf = read_config(folder)
  config = config_from_hf(hf)
  params = LOADERS[hf["model_type"]](read_state_dict(folder), config)
  meta: dict[str, Any] = {"tokenizer": folder, "query_prefix": "", "doc_prefix": ""}
  st_config = epath.Path(folder) / "sentence_bert_config.json"
  if st_config.exists():
    meta["max_length"] = int(json.loads(st_config.read_text()).get("max_seq_length", 512))
  else:  # The position table's size, or a rotary model's n_positions.
    meta["max_length"] = config.max_position_embeddings - config.position_offset
  if hf["model_type"] == "nomic_bert":
    meta["query_prefix"], meta["doc_prefix"] = "search_query: ", "search_document: "
  prompts_path = epath.Path(folder) / "config_sentence_transformers.json"
  if prompts_path.exists():  # An exported folder: its prompts are the prefixes.
    prompts = json.loads(prompts_path.read_text()).get("prompts") or {}
    meta["query_prefix"] = prompts.get("query", meta["query_prefix"])
    meta["doc_prefix"] = prompts.get("document", meta["doc_prefix"])
  return params, config, meta
