"""Sparse upcycling: function-preserving with renormalised weights and kept biases;
released settings scale the bias-free dense MLP by the top-k probability mass."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

from moe_embed import inference
from moe_embed.io import hf_import
from moe_embed.model import upcycle
from moe_embed.model.moe_mlp import MoeMlp
from tests.reference_models import TEXTS, minilm_folder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_upcycled_minilm_keeps_the_dense_embeddings(tmp_path):
  folder = minilm_folder()
  proc = subprocess.run(
      [sys.executable, "launch/upcycle.py", f"--model={folder}", "--num_experts=8", "--top_k=2",
       "--moe_every_n_layers=2", f"--out={tmp_path}/moe", "--renormalize_topk", "--keep_biases"],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  dense = inference.load_embedder(folder).encode(TEXTS, show_progress=False)
  moe = inference.load_embedder(f"{tmp_path}/moe")
  assert moe.config.moe_layers == (1, 3, 5)
  got = moe.encode(TEXTS, show_progress=False)
  assert np.sum(dense * got, axis=1).min() >= 0.99999


def test_released_settings_scale_the_bias_free_mlp_by_topk_mass():
  params, config, _ = hf_import.load_hf_folder(minilm_folder())
  moe_params, moe_config = upcycle.upcycle(params, config, seed=4)
  layer = moe_params["encoder"]["layer_1"]["mlp"]
  assert not np.any(layer["bias"]) and "w1_bias" not in layer
  x = np.random.default_rng(0).normal(size=(2, 7, config.hidden_size)).astype(np.float32)
  mask = np.ones((2, 7), bool)
  y, _ = MoeMlp(moe_config).apply({"params": layer}, jnp.asarray(x), jnp.asarray(mask))
  dense = params["encoder"]["layer_1"]["mlp"]
  h = x.astype(np.float64) @ dense["fc1"]["kernel"]
  mlp = (0.5 * h * (1 + special.erf(h / np.sqrt(2)))) @ dense["fc2"]["kernel"]  # No biases.
  probs = special.softmax(x.astype(np.float64) @ layer["router"]["kernel"], axis=-1)
  mass = np.sort(probs, axis=-1)[..., -2:].sum(-1, keepdims=True)
  np.testing.assert_allclose(np.asarray(y), mlp * mass, rtol=1e-4, atol=1e-5)


def test_noise_breaks_symmetry_and_errors():
  params, config, _ = hf_import.load_hf_folder(minilm_folder())
  noisy, _ = upcycle.upcycle(params, config, noise_std=1e-3)
  w1 = noisy["encoder"]["layer_3"]["mlp"]["w1"]
  assert not np.allclose(w1[0], w1[1])
  np.testing.assert_allclose(w1[0], params["encoder"]["layer_3"]["mlp"]["fc1"]["kernel"], atol=1e-2)
  moe_params, moe_config = upcycle.upcycle(params, config)
  with pytest.raises(ValueError, match="already a mixture of experts"):
    upcycle.upcycle(moe_params, moe_config)
