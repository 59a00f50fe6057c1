"""The ops attention entry point against a float64 numpy reference."""
import numpy as np
from absl.testing import absltest, parameterized

import jax
import jax.numpy as jnp

from big_vision_like import ops


def reference(q, k, v, bias=None, mask=None):
  q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  if bias is not None:
    logits = logits + np.asarray(bias, np.float64)
  if mask is not None:
    logits = np.where(mask, logits, -np.inf)
  logits -= logits.max(-1, keepdims=True)
  weights = np.exp(logits)
  weights /= weights.sum(-1, keepdims=True)
  return np.einsum("bhqk,bkhd->bqhd", weights, v)


class AttentionTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("self", 2, 7, 7, 3, 16, False, False),
      ("cross_unequal_lengths", 2, 5, 11, 2, 32, False, False),
      ("bias", 3, 9, 9, 4, 8, True, False),
      ("key_padding_mask", 2, 6, 10, 2, 16, False, True),
      ("bias_and_mask", 1, 4, 13, 2, 64, True, True),
  )
  def test_matches_float64_reference(self, b, lq, lk, h, d, with_bias, with_mask):
    rng = np.random.default_rng(0)
    q, k, v = (rng.normal(size=s).astype(np.float32)
               for s in ((b, lq, h, d), (b, lk, h, d), (b, lk, h, d)))
    bias = rng.normal(size=(1, h, lq, lk)).astype(np.float32) if with_bias else None
    mask = None
    if with_mask:
      lengths = rng.integers(1, lk + 1, size=b)
      mask = (np.arange(lk)[None, :] < lengths[:, None])[:, None, None, :]
    out = ops.dot_product_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                                    bias=bias, mask=mask, implementation="xla")
    self.assertEqual(out.shape, (b, lq, h, d))
    np.testing.assert_allclose(out, reference(q, k, v, bias, mask), atol=2e-5, rtol=2e-5)

  def test_bf16_inputs_keep_float32_softmax(self):
    rng = np.random.default_rng(1)
    q, k, v = (rng.normal(size=(2, 16, 2, 32)).astype(np.float32) for _ in range(3))
    out = ops.dot_product_attention(*(jnp.asarray(t, jnp.bfloat16) for t in (q, k, v)))
    self.assertEqual(out.dtype, jnp.bfloat16)
    np.testing.assert_allclose(np.asarray(out, np.float32), reference(q, k, v),
                               atol=3e-2, rtol=3e-2)

  def test_auto_equals_xla(self):
    x = jax.random.normal(jax.random.key(0), (2, 8, 2, 16))
    np.testing.assert_array_equal(ops.dot_product_attention(x, x, x, implementation="auto"),
                                  ops.dot_product_attention(x, x, x, implementation="xla"))

  def test_unknown_implementation_lists_valid(self):
    x = jnp.zeros((1, 4, 1, 8))
    with self.assertRaisesRegex(ValueError, "'flash3' is unknown; valid: auto, xla"):
      ops.dot_product_attention(x, x, x, implementation="flash3")

  def test_shape_mismatch_is_an_error(self):
    with self.assertRaisesRegex(ValueError, "shapes disagree"):
      ops.dot_product_attention(jnp.zeros((1, 4, 2, 8)), jnp.zeros((1, 5, 2, 4)),
                                jnp.zeros((1, 5, 2, 4)))


if __name__ == "__main__":
  absltest.main()
