"""A moe-embed encoder in plain PyTorch: dense and Mixture-of-Experts layers, no custom kernels.

This file stands alone (torch and transformers only): `launch/export.py` copies
it verbatim into an exported folder, and `AutoModel.from_pretrained(folder,
trust_remote_code=True)` or `SentenceTransformer(folder, trust_remote_code=True)`
load it. Config names and weight names follow nomic-bert (fused `Wqkv`,
`fc1/fc2` or gated `fc11/fc12`, `emb_ln`, `norm1/norm2`, and in MoE layers
`mlp.router.layer` with experts stacked as `mlp.experts.mlp.w1/w2`
[experts * mlp, width] and one shared `mlp.experts.bias`); the model_type is
our own so that a transformers release with a built-in dense nomic_bert class
cannot load these weights into it.

Axis letters: B batch, L sequence, D width, H heads, Dh head dim, F expert
hidden width, E experts, K experts per token, T = B * L tokens.
The forward pass returns the last hidden states [B, L, D] (projected per token
when `projection_dim`, which commutes with mean pooling); pooling and L2
normalisation are sentence-transformers modules.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput


class MoeEmbedConfig(PretrainedConfig):
  """nomic-bert's config names, plus learned positions, expert w1 bias and projection."""

  model_type = "moe_embed"

  def __init__(self, vocab_size=30528, n_embd=768, n_layer=12, n_head=12, n_inner=3072,
               type_vocab_size=2, pad_token_id=1, rotary_emb_base=10_000.0,
               rotary_emb_fraction=1.0, max_trained_positions=512, position_offset=0,
               prenorm=False, layer_norm_epsilon=1e-5, activation_function="gelu",
               qkv_proj_bias=True, mlp_fc1_bias=True, mlp_fc2_bias=True, moe_every_n_layers=0,
               num_experts=8, moe_top_k=2, moe_normalize_expert_weights=False,
               moe_expert_w1_bias=False, projection_dim=0, moe_layer_offset=-1, **kwargs):
    self.vocab_size, self.n_embd, self.n_layer, self.n_head = vocab_size, n_embd, n_layer, n_head
    self.n_inner, self.type_vocab_size = n_inner, type_vocab_size
    # rotary_emb_fraction <= 0 means a learned position table (BERT, XLM-R).
    self.rotary_emb_base, self.rotary_emb_fraction = rotary_emb_base, rotary_emb_fraction
    self.max_trained_positions, self.position_offset = max_trained_positions, position_offset
    self.prenorm, self.layer_norm_epsilon = prenorm, layer_norm_epsilon
    self.activation_function = activation_function  # 'gelu' (exact erf) or 'swiglu'.
    self.qkv_proj_bias, self.mlp_fc1_bias, self.mlp_fc2_bias = qkv_proj_bias, mlp_fc1_bias, mlp_fc2_bias
    # Layer i is MoE when i % n == moe_layer_offset mod n (-1: n - 1; nomic-bert: 1).
    self.moe_every_n_layers, self.num_experts, self.moe_top_k = moe_every_n_layers, num_experts, moe_top_k
    self.moe_layer_offset = moe_layer_offset
    # Top-k weights divided by their p-norm, p = this value (True: 1, their sum); False: off.
    self.moe_normalize_expert_weights = moe_normalize_expert_weights
    self.moe_expert_w1_bias, self.projection_dim = moe_expert_w1_bias, projection_dim
    super().__init__(pad_token_id=pad_token_id, **kwargs)

  @property
  def hidden_size(self):  # The name sentence-transformers reads.
    return self.n_embd


def rotate(x: torch.Tensor, rot_dim: int, base: float) -> torch.Tensor:
  """GPT-NeoX (half-split) rotary on the first rot_dim dims of x [B, L, H, Dh], in float32."""
  length = x.shape[1]
  inv_freq = 1.0 / base ** (torch.arange(0, rot_dim, 2, device=x.device, dtype=torch.float32) / rot_dim)
  angles = torch.arange(length, device=x.device, dtype=torch.float32)[:, None] * inv_freq
  angles = torch.cat([angles, angles], dim=-1)[None, :, None, :]  # [1, L, 1, rot]
  xr, rest = x[..., :rot_dim].float(), x[..., rot_dim:]
  half = rot_dim // 2
  rotated = torch.cat([-xr[..., half:], xr[..., :half]], dim=-1)
  out = (xr * angles.cos() + rotated * angles.sin()).to(x.dtype)
  return torch.cat([out, rest], dim=-1)


class Embeddings(nn.Module):
  """Word + token-type (+ learned position) embeddings; `emb_ln` is the model's."""

  def __init__(self, c: MoeEmbedConfig):
    super().__init__()
    self.word_embeddings = nn.Embedding(c.vocab_size, c.n_embd)
    self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.n_embd) if c.type_vocab_size else None
    self.position_embeddings = (nn.Embedding(c.max_trained_positions, c.n_embd)
                                if c.rotary_emb_fraction <= 0 else None)
    self.offset = c.position_offset

  def forward(self, ids, token_type_ids=None):
    x = self.word_embeddings(ids)  # [B, L, D]
    if self.token_type_embeddings is not None:
      if token_type_ids is None:
        token_type_ids = torch.zeros_like(ids)
      x = x + self.token_type_embeddings(token_type_ids)
    if self.position_embeddings is not None:
      # Right padding: real tokens sit at positions offset, offset + 1, ...
      x = x + self.position_embeddings(torch.arange(ids.shape[1], device=ids.device) + self.offset)
    return x


class Attention(nn.Module):
  """Bidirectional self-attention with a key padding mask and optional rotary positions."""

  def __init__(self, c: MoeEmbedConfig):
    super().__init__()
    self.h, self.dh = c.n_head, c.n_embd // c.n_head
    self.rot_dim = int(self.dh * c.rotary_emb_fraction) if c.rotary_emb_fraction > 0 else 0
    self.base = c.rotary_emb_base
    self.Wqkv = nn.Linear(c.n_embd, 3 * c.n_embd, bias=c.qkv_proj_bias)
    self.out_proj = nn.Linear(c.n_embd, c.n_embd)

  def forward(self, x, mask):
    b, length, d = x.shape
    q, k, v = self.Wqkv(x).view(b, length, 3, self.h, self.dh).unbind(2)  # [B, L, H, Dh] each
    if self.rot_dim:
      q, k = rotate(q, self.rot_dim, self.base), rotate(k, self.rot_dim, self.base)
    out = F.scaled_dot_product_attention(  # [B, H, L, Dh]
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask[:, None, None, :])
    return self.out_proj(out.transpose(1, 2).reshape(b, length, d))


class Mlp(nn.Module):
  """Dense MLP: fc2(gelu(fc1 x)), or fc2(silu(fc12 x) * fc11 x) for SwiGLU."""

  def __init__(self, c: MoeEmbedConfig):
    super().__init__()
    self.gated = c.activation_function == "swiglu"
    if self.gated:
      self.fc11 = nn.Linear(c.n_embd, c.n_inner, bias=c.mlp_fc1_bias)
      self.fc12 = nn.Linear(c.n_embd, c.n_inner, bias=c.mlp_fc1_bias)
    else:
      self.fc1 = nn.Linear(c.n_embd, c.n_inner, bias=c.mlp_fc1_bias)
    self.fc2 = nn.Linear(c.n_inner, c.n_embd, bias=c.mlp_fc2_bias)

  def forward(self, x, mask=None):
    h = F.silu(self.fc12(x)) * self.fc11(x) if self.gated else F.gelu(self.fc1(x))
    return self.fc2(h)


class Router(nn.Module):
  def __init__(self, c: MoeEmbedConfig):
    super().__init__()
    self.layer = nn.Linear(c.n_embd, c.num_experts, bias=False)


class ExpertWeights(nn.Module):
  """Expert matrices stacked as megablocks does: rows e*F:(e+1)*F belong to expert e."""

  def __init__(self, c: MoeEmbedConfig):
    super().__init__()
    e, f, d = c.num_experts, c.n_inner, c.n_embd
    self.w1 = nn.Parameter(torch.empty(e * f, d))
    self.w2 = nn.Parameter(torch.empty(e * f, d))
    self.v1 = nn.Parameter(torch.empty(e * f, d)) if c.activation_function == "swiglu" else None
    self.w1_bias = nn.Parameter(torch.zeros(e, f)) if c.moe_expert_w1_bias else None


class Experts(nn.Module):
  def __init__(self, c: MoeEmbedConfig):
    super().__init__()
    self.mlp = ExpertWeights(c)
    self.bias = nn.Parameter(torch.zeros(c.n_embd))  # Shared, added after the weighted sum.


class MoeMlp(nn.Module):
  """Token-choice top-k experts in place of the dense MLP (dropless: no token is dropped)."""

  def __init__(self, c: MoeEmbedConfig):
    super().__init__()
    self.e, self.f, self.k = c.num_experts, c.n_inner, c.moe_top_k
    self.renormalize = c.moe_normalize_expert_weights
    self.router, self.experts = Router(c), Experts(c)

  def forward(self, x, mask):
    """x [B, L, D], mask bool [B, L] -> [B, L, D]; padding tokens get only the shared bias."""
    shape, d = x.shape, x.shape[-1]
    x = x.reshape(-1, d)  # [T, D]
    probs = F.linear(x.float(), self.router.layer.weight.float()).softmax(-1)  # [T, E] float32
    weights, chosen = probs.topk(self.k, dim=-1)  # [T, K]
    if self.renormalize:
      p = float(self.renormalize)
      weights = weights / (weights.sum(-1, keepdim=True) if p == 1 else
                           weights.norm(p=p, dim=-1, keepdim=True))
    token = torch.arange(x.shape[0], device=x.device).repeat_interleave(self.k)  # [T*K]
    keep = mask.reshape(-1).repeat_interleave(self.k)  # Padding is not routed.
    token, expert, weight = token[keep], chosen.reshape(-1)[keep], weights.reshape(-1)[keep]
    order = torch.argsort(expert, stable=True)  # Group the (token, expert) pairs by expert.
    counts = torch.bincount(expert, minlength=self.e).tolist()
    w = self.experts.mlp
    w1, w2 = w.w1.view(self.e, self.f, d), w.w2.view(self.e, self.f, d)  # [E, F, D]
    acc = torch.promote_types(x.dtype, torch.float32)  # Sum the k outputs in float32 or wider.
    out = torch.zeros(x.shape, dtype=acc, device=x.device)  # [T, D]
    for e, rows in enumerate(torch.split(order, counts)):
      if rows.numel() == 0:
        continue
      xe = x[token[rows]]  # [n, D]
      h = xe @ w1[e].T  # [n, F]
      if w.w1_bias is not None:
        h = h + w.w1_bias[e].to(h.dtype)
      h = F.silu(h) * (xe @ w.v1.view(self.e, self.f, d)[e].T) if w.v1 is not None else F.gelu(h)
      out.index_add_(0, token[rows], (h @ w2[e]).to(acc) * weight[rows, None].to(acc))
    return (out.to(x.dtype) + self.experts.bias.to(x.dtype)).view(shape)


class Block(nn.Module):
  """One layer: post-norm LN(x + Attn(x)), LN(h + MLP(h)), or the pre-norm order."""

  def __init__(self, c: MoeEmbedConfig, moe: bool):
    super().__init__()
    self.prenorm = c.prenorm
    self.attn = Attention(c)
    self.mlp = MoeMlp(c) if moe else Mlp(c)
    self.norm1 = nn.LayerNorm(c.n_embd, eps=c.layer_norm_epsilon)
    self.norm2 = nn.LayerNorm(c.n_embd, eps=c.layer_norm_epsilon)

  def forward(self, x, mask):
    if self.prenorm:
      h = x + self.attn(self.norm1(x), mask)
      return h + self.mlp(self.norm2(h), mask)
    h = self.norm1(x + self.attn(x, mask))
    return self.norm2(h + self.mlp(h, mask))


class Encoder(nn.Module):
  def __init__(self, c: MoeEmbedConfig):
    super().__init__()
    n = c.moe_every_n_layers
    self.layers = nn.ModuleList(Block(c, bool(n) and i % n == c.moe_layer_offset % n)
                                for i in range(c.n_layer))


class MoeEmbedModel(PreTrainedModel):
  """input_ids [B, L], attention_mask [B, L] -> last_hidden_state [B, L, D or projection_dim]."""

  config_class = MoeEmbedConfig
  base_model_prefix = "model"
  _no_split_modules = ["Block"]

  def __init__(self, config: MoeEmbedConfig):
    super().__init__(config)
    self.embeddings = Embeddings(config)
    self.emb_ln = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
    self.encoder = Encoder(config)
    self.final_ln = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon) if config.prenorm else None
    self.projection = (nn.Linear(config.n_embd, config.projection_dim, bias=False)
                       if config.projection_dim else None)
    self.post_init()

  def _init_weights(self, module):
    std = 0.02
    if isinstance(module, (nn.Linear, nn.Embedding)):
      nn.init.normal_(module.weight, std=std)
      if getattr(module, "bias", None) is not None:
        nn.init.zeros_(module.bias)
    elif isinstance(module, ExpertWeights):
      for p in (module.w1, module.w2, module.v1):
        if p is not None:
          nn.init.normal_(p, std=std)

  def get_input_embeddings(self):
    return self.embeddings.word_embeddings

  def forward(self, input_ids, attention_mask=None, token_type_ids=None, return_dict=None, **kwargs):
    if attention_mask is None:
      attention_mask = torch.ones_like(input_ids)
    mask = attention_mask.bool()  # [B, L]
    x = self.emb_ln(self.embeddings(input_ids, token_type_ids))
    for layer in self.encoder.layers:
      x = layer(x, mask)
    if self.final_ln is not None:
      x = self.final_ln(x)
    if self.projection is not None:
      x = self.projection(x)
    if return_dict is False:
      return (x,)
    return BaseModelOutput(last_hidden_state=x)
