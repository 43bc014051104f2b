"""A workdir is not lost or silently changed: digests, a changed config, two runs, resource faults."""

import glob
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_embed.io import checkpoints
from moe_embed.train.step import TrainState


def _state(step, seed):
  rng = np.random.default_rng(seed)
  model = {"w": jnp.asarray(rng.normal(size=(64, 256)), jnp.float32),
           "b": jnp.asarray(rng.normal(size=(256,)), jnp.bfloat16)}
  return TrainState(step=jnp.asarray(step, jnp.int32), params={"model": model},
                    opt_state={"mu": jax.tree.map(lambda x: x * 0.1, model)})


def test_random_bytes_in_a_checkpoint_are_detected_and_the_older_one_restores(tmp_path, caplog):
  workdir = str(tmp_path / "w")
  manager = checkpoints.make_manager(workdir, keep=5)
  for step in (1, 2):
    checkpoints.save(manager, step, _state(step, seed=step), {"step": step})
  manager.wait_until_finished()
  newest, _ = checkpoints.latest_params(workdir)
  older = jax.device_get(_state(1, seed=1).params["model"])
  step2 = os.path.join(checkpoints.checkpoint_dir(workdir), "2")
  pristine = str(tmp_path / "pristine")
  shutil.copytree(step2, pristine)
  # The array data is the largest file; its bytes hold the (zstd-compressed) chunks.
  data_file = max(glob.glob(os.path.join(step2, "state", "**", "d", "*"), recursive=True),
                  key=os.path.getsize)
  metadata = os.path.join(step2, "state", "_METADATA")
  rng = np.random.default_rng(0)
  places = [(data_file, f) for f in (0.05, 0.3, 0.5, 0.7, 0.95)] + [(metadata, 0.5)]
  for path, where in places:
    shutil.rmtree(step2)
    shutil.copytree(pristine, step2)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
      f.seek(int(size * where))
      f.write(rng.bytes(min(64, size - int(size * where))))
    caplog.clear()
    params, step = checkpoints.latest_params(workdir)
    assert step == 1, (path, where)  # Detected, and the older checkpoint was read instead.
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(older)):
      np.testing.assert_array_equal(got, want)
    damaged = [r for r in caplog.records if "Checkpoint 2" in r.getMessage()]
    assert len(damaged) == 1 and "is damaged" in damaged[0].getMessage(), caplog.text
    assert "\n" not in damaged[0].getMessage()
  assert os.path.isdir(step2)  # Readers do not change the workdir.
  # Training moves the damaged step aside and resumes from the older one.
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _state(0, seed=0))
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                     sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])),
      abstract)
  state, data_state, step = checkpoints.restore(checkpoints.make_manager(workdir), abstract)
  assert step == 1 and data_state == {"step": 1} and int(state.step) == 1
  assert os.path.isdir(step2 + ".damaged") and not os.path.exists(step2)
  # The untouched checkpoint restored the same arrays as before damage was done.
  shutil.copytree(pristine, step2)
  params, step = checkpoints.latest_params(workdir)
  assert step == 2
  for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(newest)):
    np.testing.assert_array_equal(got, want)


def test_digest_does_not_depend_on_the_sharding():
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  state = _state(3, seed=3)
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "expert"))
  sharded = jax.device_put(state, NamedSharding(mesh, P()))
  sharded = sharded.replace(params={"model": {
      "w": jax.device_put(state.params["model"]["w"], NamedSharding(mesh, P("data", "expert"))),
      "b": jax.device_put(state.params["model"]["b"], NamedSharding(mesh, P("expert")))}})
  assert checkpoints.array_digest(state) == checkpoints.array_digest(sharded)
  flipped = np.array(state.params["model"]["w"])
  flipped.view(np.uint32)[5, 7] ^= 1 << 3  # One bit of one word.
  changed = state.replace(params={"model": {**state.params["model"], "w": jnp.asarray(flipped)}})
  a, b = checkpoints.array_digest(state), checkpoints.array_digest(changed)
  assert [k for k in a if a[k] != b[k]] == ["params/model/w"]
