"""Architecture of the encoder: one frozen dataclass and the named presets.

Every variant of the BERT / XLM-RoBERTa / nomic-bert family that we support is a
field here, not a copy of a module. `EncoderConfig.from_dict` rejects unknown
keys by name, with the nearest field, and every choice field is checked when the
config is made, so a misspelt field or value in a config file fails loudly
before anything is traced.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

from moe_embed import validation
from moe_embed.moe import grouped_matmul


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
  """Fields of the bidirectional MoE text encoder."""

  vocab_size: int = 1024  # Rows of the token embedding table.
  hidden_size: int = 64  # D, the model width.
  num_layers: int = 2  # Transformer blocks.
  num_heads: int = 4  # Attention heads; must divide hidden_size.
  mlp_dim: int = 256  # F, hidden width of the dense MLP and of each expert.
  type_vocab_size: int = 1  # Token-type rows; 0 drops the table.
  pad_token_id: int = 1  # XLM-R: <pad>=1; BERT: [PAD]=0.
  # Positions: 'learned' absolute table or 'rotary' (no table).
  position_embedding: str = "rotary"
  max_position_embeddings: int = 512  # Size of the learned table.
  # XLM-R numbers positions from pad_token_id + 1; BERT from 0.
  position_offset: int = 0
  rotary_base: float = 10_000.0  # Base of the rotary frequencies (theta).
  rotary_fraction: float = 1.0  # Share of each head's dims that rotate.
  norm: str = "post"  # 'post' (BERT, nomic-bert) or 'pre'.
  layer_norm_eps: float = 1e-5  # BERT: 1e-12; XLM-R and nomic: 1e-5.
  mlp_activation: str = "gelu"  # Exact-erf 'gelu' or gated 'swiglu'.
  qkv_bias: bool = True  # Biases on the query, key and value projections.
  mlp_bias: bool = True  # Biases on the dense MLP's two layers.
  # Mixture of experts: layer i is MoE when i % n == moe_layer_offset mod n; 0 means dense.
  moe_every_n_layers: int = 0
  # -1: layers n-1, 2n-1, ... (ours); 1: layers 1, n+1, ... (nomic-bert's placement).
  # The same layers for n = 2; imports of nomic checkpoints record 1 when n > 2.
  moe_layer_offset: int = -1
  num_experts: int = 8  # E
  top_k: int = 2  # K
  # Top-k weights divided by their p-norm, p = this value (megablocks'
  # moe_normalize_expert_weights): 0/False off (the released model), 1/True their sum.
  renormalize_topk: float = False
  # Per-expert bias on w1 (upcycling a dense MLP with its biases kept).
  expert_w1_bias: bool = False
  moe_dispatch: str = "dropless"  # 'dropless' (sort + grouped matmul) or 'capacity'.
  capacity_factor: float = 1.25  # Only for moe_dispatch='capacity'.
  # Grouped-matmul kernel of the dropless path; 'auto' picks per backend.
  grouped_matmul: str = "auto"
  # Token exchange under expert parallelism: 'ragged' (exact-size slices with
  # ragged_all_to_all), 'padded' (worst-case all_to_all buffers) or 'auto'
  # (ragged on GPU and TPU, padded on CPU, which lacks the collective).
  expert_exchange: str = "auto"
  # Attention kernel: 'xla' (masked, forms [B, H, L, L] scores), 'splash' (TPU Pallas
  # kernel with segment ids, no [L, L] tensor) or 'auto' (splash on TPU, else xla).
  attention: str = "auto"
  router_init_std: float = 0.02  # Std of the router's normal init.
  initializer_range: float = 0.02  # Std of the other weights' normal init.
  projection_dim: int = 0  # Optional linear head after pooling; 0 = none.
  dtype: str = "float32"  # Compute dtype: 'float32' or 'bfloat16'.
  # Rematerialise each block in the backward pass (less memory, ~1/3 more compute).
  remat: bool = False

  def __post_init__(self):
    _check_choice("position_embedding", self.position_embedding, ("learned", "rotary"))
    _check_choice("norm", self.norm, ("post", "pre"))
    _check_choice("mlp_activation", self.mlp_activation, ("gelu", "swiglu"))
    _check_choice("moe_dispatch", self.moe_dispatch, ("dropless", "capacity"))
    _check_choice("grouped_matmul", self.grouped_matmul, ("auto",) + grouped_matmul.KERNELS)
    _check_choice("expert_exchange", self.expert_exchange, ("auto", "padded", "ragged"))
    _check_choice("attention", self.attention, ("auto", "xla", "splash"))
    _check_choice("dtype", self.dtype, ("float32", "bfloat16"))
    if self.hidden_size % self.num_heads:
      raise ValueError(
          f"hidden_size={self.hidden_size} is not divisible by "
          f"num_heads={self.num_heads}.")
    if self.moe_every_n_layers < 0:
      raise ValueError(f"moe_every_n_layers={self.moe_every_n_layers} must be >= 0.")
    if self.renormalize_topk < 0:
      raise ValueError(f"renormalize_topk={self.renormalize_topk} must be >= 0 (0: off, p: "
                       "divide the top-k weights by their p-norm).")
    if self.moe_every_n_layers and not 1 <= self.top_k <= self.num_experts:
      raise ValueError(
          f"top_k={self.top_k} must be between 1 and num_experts={self.num_experts}.")
    if self.position_embedding == "rotary":
      rot = int(self.head_dim * self.rotary_fraction)
      if rot % 2 or rot <= 0:
        raise ValueError(
            f"rotary_fraction={self.rotary_fraction} of head_dim={self.head_dim} "
            f"gives {rot} rotary dims; it must be a positive even number.")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def embedding_dim(self) -> int:
    """Width of the pooled embedding (before any Matryoshka truncation)."""
    return self.projection_dim or self.hidden_size

  def is_moe_layer(self, i: int) -> bool:
    n = self.moe_every_n_layers
    return bool(n) and i % n == self.moe_layer_offset % n

  @property
  def moe_layers(self) -> tuple[int, ...]:
    return tuple(i for i in range(self.num_layers) if self.is_moe_layer(i))

  def replace(self, **changes: Any) -> "EncoderConfig":
    _check_keys(changes)
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, fields: Mapping[str, Any]) -> "EncoderConfig":
    fields = dict(fields)
    _check_keys(fields)
    return cls(**fields)


# Fields that change how the model runs, not what it computes; they may be
# overridden when training starts from a model folder.
RUNTIME_FIELDS = ("dtype", "remat", "moe_dispatch", "capacity_factor", "grouped_matmul",
                  "expert_exchange", "attention")


def _field_names() -> list[str]:
  return [f.name for f in dataclasses.fields(EncoderConfig)]


def _check_keys(fields: Mapping[str, Any]) -> None:
  validation.check_fields(fields, _field_names(), "encoder config field")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
  if value not in choices:
    raise ValueError(f"{name}={value!r} is not one of {choices}.")


# Named architectures. `tiny` trains on a laptop CPU in seconds; `minilm` has the
# dimensions of all-MiniLM-L6-v2; `nomic_v2_moe` is nomic-embed-text-v2-moe.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        vocab_size=4096, hidden_size=64, num_layers=4, num_heads=4, mlp_dim=128,
        type_vocab_size=1, pad_token_id=0, position_embedding="rotary",
        layer_norm_eps=1e-5, moe_every_n_layers=2, num_experts=8, top_k=2,
    ),
    "minilm": dict(
        vocab_size=30522, hidden_size=384, num_layers=6, num_heads=12, mlp_dim=1536,
        type_vocab_size=2, pad_token_id=0, position_embedding="learned",
        max_position_embeddings=512, position_offset=0, layer_norm_eps=1e-12,
        moe_every_n_layers=0,
    ),
    "nomic_v2_moe": dict(
        vocab_size=250_048, hidden_size=768, num_layers=12, num_heads=12, mlp_dim=3072,
        type_vocab_size=1, pad_token_id=1, position_embedding="rotary",
        rotary_base=10_000.0, rotary_fraction=1.0, norm="post", layer_norm_eps=1e-5,
        moe_every_n_layers=2, num_experts=8, top_k=2, renormalize_topk=False,
    ),
}


def preset(name: str, **overrides: Any) -> EncoderConfig:
  """Returns the named architecture with `overrides` applied."""
  if name not in PRESETS:
    raise KeyError(f"Unknown model preset {name!r}; choose one of {sorted(PRESETS)}.")
  return EncoderConfig.from_dict({**PRESETS[name], **overrides})
