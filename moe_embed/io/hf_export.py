"""Our parameter tree -> a nomic-bert state dict and config.json (the inverse of `hf_import`).

The layout is nomic-bert's: fused `Wqkv`, `fc1/fc2` or gated `fc11/fc12`, and in
MoE layers `mlp.router.layer.weight` and `mlp.experts.mlp.w1` / `w2` (/ `v1`
for SwiGLU) stacked as [experts * mlp, width] with a shared `mlp.experts.bias`;
learned positions, a pre-norm `final_ln` and a `projection` head where the
model has them, so that
`hf_import.load_hf_folder` reads back what is written here.
"""

from __future__ import annotations

import numpy as np

from moe_embed.model.config import EncoderConfig


def to_nomic_state_dict(params: dict, config: EncoderConfig) -> dict[str, np.ndarray]:
  """Exports our params in the nomic-bert layout (the inverse of params_from_nomic)."""
  enc = params["encoder"]
  d = config.hidden_size
  out = {"embeddings.word_embeddings.weight": enc["embeddings"]["word_embeddings"]["embedding"],
         "emb_ln.weight": enc["embeddings"]["layer_norm"]["scale"],
         "emb_ln.bias": enc["embeddings"]["layer_norm"]["bias"]}
  if config.type_vocab_size:
    out["embeddings.token_type_embeddings.weight"] = (
        enc["embeddings"]["token_type_embeddings"]["embedding"])
  if config.position_embedding == "learned":
    out["embeddings.position_embeddings.weight"] = (
        enc["embeddings"]["position_embeddings"]["embedding"])
  if config.norm == "pre":
    out["final_ln.weight"] = enc["final_norm"]["scale"]
    out["final_ln.bias"] = enc["final_norm"]["bias"]
  if config.projection_dim:
    out["projection.weight"] = np.asarray(params["projection"]["kernel"]).T
  for i in range(config.num_layers):
    layer, p = enc[f"layer_{i}"], f"encoder.layers.{i}."
    attn = layer["attention"]
    out[f"{p}attn.Wqkv.weight"] = np.concatenate(
        [np.transpose(np.asarray(attn[n]["kernel"]), (1, 2, 0)).reshape(d, d)
         for n in ("query", "key", "value")])
    if config.qkv_bias:
      out[f"{p}attn.Wqkv.bias"] = np.concatenate(
          [np.asarray(attn[n]["bias"]).reshape(d) for n in ("query", "key", "value")])
    out[f"{p}attn.out_proj.weight"] = np.asarray(attn["out"]["kernel"]).reshape(d, d).T
    out[f"{p}attn.out_proj.bias"] = attn["out"]["bias"]
    for ours, theirs in (("attention_norm", "norm1"), ("mlp_norm", "norm2")):
      out[f"{p}{theirs}.weight"] = layer[ours]["scale"]
      out[f"{p}{theirs}.bias"] = layer[ours]["bias"]
    mlp = layer["mlp"]
    if config.is_moe_layer(i):
      e, f = config.num_experts, config.mlp_dim
      out[f"{p}mlp.router.layer.weight"] = np.asarray(mlp["router"]["kernel"]).T
      out[f"{p}mlp.experts.mlp.w1"] = np.transpose(np.asarray(mlp["w1"]), (0, 2, 1)).reshape(e * f, d)
      out[f"{p}mlp.experts.mlp.w2"] = np.asarray(mlp["w2"]).reshape(e * f, d)
      if "w3" in mlp:  # SwiGLU experts: megablocks' name for the gate matrix.
        out[f"{p}mlp.experts.mlp.v1"] = np.transpose(np.asarray(mlp["w3"]), (0, 2, 1)).reshape(e * f, d)
      if "w1_bias" in mlp:
        out[f"{p}mlp.experts.mlp.w1_bias"] = mlp["w1_bias"]
      out[f"{p}mlp.experts.bias"] = mlp["bias"]
    else:
      pairs = ((("fc1", "fc12"), ("gate", "fc11"), ("fc2", "fc2"))
               if config.mlp_activation == "swiglu" else (("fc1", "fc1"), ("fc2", "fc2")))
      for ours, theirs in pairs:
        out[f"{p}mlp.{theirs}.weight"] = np.asarray(mlp[ours]["kernel"]).T
        if config.mlp_bias:
          out[f"{p}mlp.{theirs}.bias"] = mlp[ours]["bias"]
  return {k: np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in out.items()}


def nomic_config_json(config: EncoderConfig) -> dict:
  """A nomic-bert config.json for `config` (the keys params_from_nomic reads).

  Beyond nomic-bert: a learned position table (rotary_emb_fraction 0, with
  max_trained_positions and position_offset), per-expert w1 biases and a
  projection head; written only when the model has them.
  """
  extra = {"n_positions": config.max_position_embeddings}
  if config.position_embedding == "learned":
    extra = {"rotary_emb_fraction": 0.0, "max_trained_positions": config.max_position_embeddings,
             "position_offset": config.position_offset}
  if config.expert_w1_bias:
    extra["moe_expert_w1_bias"] = True
  if config.projection_dim:
    extra["projection_dim"] = config.projection_dim
  if config.moe_every_n_layers and config.moe_layer_offset % config.moe_every_n_layers != 1:
    extra["moe_layer_offset"] = config.moe_layer_offset  # nomic-bert's own placement is 1.
  return {"model_type": "nomic_bert", "vocab_size": config.vocab_size, "n_embd": config.hidden_size,
          "n_layer": config.num_layers, "n_head": config.num_heads, "n_inner": config.mlp_dim,
          "type_vocab_size": config.type_vocab_size, "pad_token_id": config.pad_token_id,
          "rotary_emb_base": config.rotary_base, "rotary_emb_fraction": config.rotary_fraction,
          "rotary_emb_interleaved": False, "prenorm": config.norm == "pre",
          "layer_norm_epsilon": config.layer_norm_eps,
          "activation_function": config.mlp_activation, "qkv_proj_bias": config.qkv_bias,
          "mlp_fc1_bias": config.mlp_bias, "mlp_fc2_bias": config.mlp_bias,
          "moe_every_n_layers": config.moe_every_n_layers, "num_experts": config.num_experts,
          "moe_top_k": config.top_k, "moe_normalize_expert_weights": config.renormalize_topk, **extra}
