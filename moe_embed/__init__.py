"""moe-embed: sparse Mixture-of-Experts text embedding models in JAX/Flax.

Packages, lowest first (each may import only those before it, plus the shared
leaves `partitioning` and `tokenizers`; tests/test_layout.py checks this):

  moe         routing, router statistics, experts, grouped matmul, expert parallelism
  model       the Flax encoder and embedding model, configs, upcycling
  io          the model-folder format, Orbax checkpoints, Hugging Face import/export
  evaluation  BEIR retrieval evaluation
  data        datasets, the batch iterator, the embedded corpus, mining
  inference   Embedder: texts -> embeddings
  train       losses, optimizer, train step and the training job

Leaves any of them may import: `storage` (gs:// and the storage emulator; every
path may be a gs:// URI), `validation` (unknown fields with the nearest name,
Matryoshka widths), `partitioning`, `tokenizers` and `cli`.
"""

from moe_embed import storage as _storage

_storage.use_emulator()  # Before any storage client reads its settings.
