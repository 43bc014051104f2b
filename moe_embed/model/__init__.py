"""The embedding model: a bidirectional encoder whose MLPs may be routed experts.

  config       EncoderConfig (every architecture variant is a field) and presets
  layers       embeddings, rotary positions, attention, dense MLP
  moe_mlp      the Flax MoE layer over the pure functions of `moe_embed.moe`
  encoder      Encoder (ids -> hidden states) and EmbeddingModel (-> unit vectors)
  pooling      masked mean pooling, L2 normalisation, Matryoshka truncation
  param_count  total and active (per token) parameter counts
  upcycle      a dense model's parameters -> an MoE model's (sparse upcycling)

Imports: `moe_embed.moe`, and this package's modules in the order listed.
Parameters carry logical axis names ('vocab', 'embed', 'heads', 'kv', 'mlp',
'exp'); `moe_embed.partitioning` maps them onto a mesh.
"""
