"""InfoNCE, hard negatives, symmetric term and Matryoshka against a NumPy reference."""

import jax.numpy as jnp
import numpy as np
import pytest

from moe_embed.train import losses


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _np_info_nce(q, p, n, t, symmetric=False):
  """Per-query loop: candidates are all positives then all negatives, label = own positive."""
  b = q.shape[0]
  docs = p if n is None else np.concatenate([p, n.reshape(-1, n.shape[-1])])
  total = 0.0
  for i in range(b):
    scores = docs @ q[i] / t
    total += np.log(np.sum(np.exp(scores - scores.max()))) + scores.max() - scores[i]
  loss = total / b
  if symmetric:
    back = 0.0
    for i in range(b):
      scores = q @ p[i] / t
      back += np.log(np.sum(np.exp(scores - scores.max()))) + scores.max() - scores[i]
    loss = 0.5 * (loss + back / b)
  return loss


@pytest.mark.parametrize("num_neg", [0, 3])
@pytest.mark.parametrize("symmetric", [False, True])
def test_info_nce_matches_numpy(num_neg, symmetric):
  rng = np.random.default_rng(num_neg + 10 * symmetric)
  b, d = 6, 16
  q, p = _unit(rng.normal(size=(b, d))), _unit(rng.normal(size=(b, d)))
  n = _unit(rng.normal(size=(b, num_neg, d))) if num_neg else None
  got = losses.info_nce(jnp.asarray(q), jnp.asarray(p), None if n is None else jnp.asarray(n),
                        0.05, symmetric)
  np.testing.assert_allclose(float(got), _np_info_nce(q, p, n, 0.05, symmetric), rtol=1e-5)


def test_hard_negative_labels_point_at_positives():
  """A query equal to its positive and far from its hard negative gets a near-zero loss."""
  d = 8
  eye = np.eye(d)
  q = eye[:3]
  n = -eye[:3][:, None, :]  # Opposite direction: the worst-scoring candidates.
  got = losses.info_nce(jnp.asarray(q), jnp.asarray(q), jnp.asarray(n), 0.01)
  assert float(got) < 1e-6
  # Swapping positive and negative must give a large loss: labels cannot drift.
  bad = losses.info_nce(jnp.asarray(q), jnp.asarray(-q), jnp.asarray(q[:, None]), 0.01)
  assert float(bad) > 50


def test_matryoshka_is_weighted_sum_of_truncated_losses():
  rng = np.random.default_rng(0)
  b, d = 5, 12
  q, p = _unit(rng.normal(size=(b, d))), _unit(rng.normal(size=(b, d)))
  n = _unit(rng.normal(size=(b, 2, d)))
  got = losses.matryoshka_info_nce(jnp.asarray(q), jnp.asarray(p), jnp.asarray(n), 0.1,
                                   (12, 4), (1.0, 0.5))
  want = (_np_info_nce(q, p, n, 0.1)
          + 0.5 * _np_info_nce(_unit(q[:, :4]), _unit(p[:, :4]), _unit(n[..., :4]), 0.1))
  np.testing.assert_allclose(float(got), want, rtol=1e-5)

