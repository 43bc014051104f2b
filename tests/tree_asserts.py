"""Comparing parameter, gradient and statistics trees leaf by leaf, shared by the step tests."""

import jax
import numpy as np


def assert_trees_close(a, b, rtol=1e-5, atol=2e-6):
  """Same structure and every leaf close; a failure names the leaf's path."""
  flat_a, flat_b = jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)
  assert len(flat_a) == len(flat_b)
  for (path, x), y in zip(flat_a, flat_b):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol,
                               err_msg=jax.tree_util.keystr(path))
