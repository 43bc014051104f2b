"""Folders written by the flat-layout code (tests/data/workdir_v0) still work.

The fixture holds a training workdir stopped at step 2 of 4 (its checkpoint
has the retired `rng` state field and its model.json an absolute tokenizer
path), the dataset it trained on, a native folder in the old `moe_embed.json`
format saved from the same parameters, and the losses that code reached when
it resumed the workdir to step 4 (reference.json).
"""

import json
import os

import jax
import numpy as np

from moe_embed import inference
from moe_embed.io import model_folder
from moe_embed.train import trainer
from tests.runs import fixture_config


def test_old_workdir_resumes_to_the_same_losses(workdir_v0):
  workdir = os.path.join(workdir_v0, "workdir")
  before, _, _ = model_folder.load_workdir(workdir)
  out = trainer.train_and_evaluate(fixture_config(workdir_v0), workdir)
  assert out["step"] == 4
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  losses = {str(r["step"]): r["loss"] for r in rows if "loss" in r}
  want = json.load(open(os.path.join(workdir_v0, "reference.json")))["resumed_losses"]
  for step, loss in want.items():
    np.testing.assert_allclose(losses[step], loss, rtol=1e-5, err_msg=f"step {step}")
  # The resumed run moved the parameters, and rewrote model.json in the current format.
  after, config, meta = model_folder.load_workdir(workdir)
  assert meta["step"] == 4
  assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)))
  raw = json.load(open(os.path.join(workdir, model_folder.META)))
  assert raw["tokenizer"] == "tokenizer.model"
  assert os.path.exists(os.path.join(workdir, "tokenizer.model"))
  assert config.num_experts == 4 and meta["train_max_length"] == 24
  assert meta["max_length"] == config.max_position_embeddings  # The model's own limit.


def test_old_native_folder_loads_the_same_parameters(workdir_v0):
  from_native, config, meta = model_folder.load_any(os.path.join(workdir_v0, "native"))
  from_workdir, workdir_config, _ = model_folder.load_any(os.path.join(workdir_v0, "workdir"))
  assert config == workdir_config
  assert meta["query_prefix"] == "search_query: " and meta["max_length"] == 64
  flat_a = jax.tree_util.tree_leaves_with_path(from_native)
  flat_b = jax.tree.leaves(from_workdir)
  assert len(flat_a) == len(flat_b)
  for (path, a), b in zip(flat_a, flat_b):
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
  embedder = inference.load_embedder(os.path.join(workdir_v0, "native"))
  emb = embedder.encode(["def sort(items): return sorted(items)"], prefix="query",
                        show_progress=False)
  assert emb.shape == (1, 16) and np.isclose(np.linalg.norm(emb), 1.0, rtol=1e-5)
