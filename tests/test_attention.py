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

  @parameterized.product(
      shape=[(2, 7, 7, 3, 16, False, False),    # self-attention
             (2, 5, 11, 2, 32, False, False),   # cross-attention, unequal lengths
             (3, 9, 9, 4, 8, True, False),      # additive bias
             (2, 6, 10, 2, 16, False, True),    # key padding mask
             (1, 37, 53, 2, 64, True, True),    # odd lengths, several chunks
             (2, 40, 33, 2, 128, True, True)],  # head dim 128
      implementation=["xla", "chunked", "pallas"])
  def test_matches_float64_reference(self, shape, implementation):
    b, lq, lk, h, d, with_bias, with_mask = shape
    rng = np.random.default_rng(0)
    q, k, v = (rng.normal(size=s).astype(np.float32)
               for s in ((b, lq, h, d), (b, lk, h, d), (b, lk, h, d)))
    bias = rng.normal(size=(1, h, lq, lk)).astype(np.float32) if with_bias else None
    mask = None
    if with_mask:
      lengths = rng.integers(1, lk + 1, size=b)
      mask = (np.arange(lk)[None, :] < lengths[:, None])[:, None, None, :]
    out = ops.dot_product_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                                    bias=bias, mask=mask, implementation=implementation)
    self.assertEqual(out.shape, (b, lq, h, d))
    np.testing.assert_allclose(out, reference(q, k, v, bias, mask), atol=2e-5, rtol=2e-5)

  @parameterized.parameters(
      ((1, 2, 19, 23),),   # full bias
      ((1, 2, 1, 23),),    # broadcast over queries
      ((3, 1, 19, 23),),   # per example, shared over heads
  )
  def test_chunked_gradients_match_xla(self, bias_shape):
    """Gradients for q, k, v and the bias (Swin learns its bias) through the custom VJP."""
    rng = np.random.default_rng(2)
    q = jnp.asarray(rng.normal(size=(3, 19, 2, 16)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(3, 23, 2, 16)), jnp.float32) for _ in range(2))
    bias = jnp.asarray(rng.normal(size=bias_shape), jnp.float32)
    mask = jnp.asarray(np.arange(23)[None, None, None, :] < np.array([23, 5, 17])[:, None, None, None])
    target = jnp.asarray(rng.normal(size=(3, 19, 2, 16)), jnp.float32)

    from big_vision_like.ops.chunked import chunked_attention  # pylint: disable=g-import-not-at-top
    from big_vision_like.ops.pallas_attention import pallas_attention  # pylint: disable=g-import-not-at-top
    implementations = {
        "xla": lambda q, k, v, bias: ops.dot_product_attention(
            q, k, v, bias=bias, mask=mask, implementation="xla"),
        # small chunks: several blocks in both directions, with padding
        "chunked": lambda q, k, v, bias: chunked_attention(
            q, k, v, bias, mask, 16 ** -0.5, q_chunk=8, k_chunk=5),
        "pallas": lambda q, k, v, bias: pallas_attention(
            q, k, v, bias, mask, 16 ** -0.5, block_q=16, block_k=16),
    }
    grads = {name: jax.grad(lambda *a: ((f(*a) - target) ** 2).sum(), argnums=(0, 1, 2, 3))(
        q, k, v, bias) for name, f in implementations.items()}
    for name in ("chunked", "pallas"):
      for a, b in zip(grads["xla"], grads[name]):
        self.assertEqual(a.shape, b.shape)
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=2e-5, err_msg=name)

  def test_chunked_memory_is_linear_in_sequence(self):
    """XLA's own memory analysis of the compiled forward+backward (compile only)."""
    def temp_bytes(impl, length):
      x = jax.ShapeDtypeStruct((1, length, 2, 32), jnp.float32)
      f = jax.jit(jax.grad(lambda q, k, v: ops.dot_product_attention(
          q, k, v, implementation=impl).sum(), argnums=(0, 1, 2)))
      return f.lower(x, x, x).compile().memory_analysis().temp_size_in_bytes

    xla, chunked = temp_bytes("xla", 4096), temp_bytes("chunked", 4096)
    self.assertGreater(xla, 4096 * 4096 * 2 * 4)  # the [H, L, L] logits exist
    self.assertLess(chunked, xla / 8)

  @parameterized.parameters("xla", "chunked", "pallas")
  def test_bf16_inputs_keep_float32_softmax(self, implementation):
    rng = np.random.default_rng(1)
    q, k, v = (rng.normal(size=(2, 33, 2, 32)).astype(np.float32) for _ in range(3))
    out = ops.dot_product_attention(*(jnp.asarray(t, jnp.bfloat16) for t in (q, k, v)),
                                    implementation=implementation)
    self.assertEqual(out.dtype, jnp.bfloat16)
    np.testing.assert_allclose(np.asarray(out, np.float32), reference(q, k, v),
                               atol=3e-2, rtol=3e-2)

  def test_auto_equals_xla_for_short_sequences(self):
    x = jax.random.normal(jax.random.key(0), (2, 8, 2, 16))
    np.testing.assert_array_equal(ops.dot_product_attention(x, x, x, implementation="auto"),
                                  ops.dot_product_attention(x, x, x, implementation="xla"))

  def test_unknown_or_unavailable_implementation(self):
    x = jnp.zeros((1, 4, 1, 8))
    with self.assertRaisesRegex(ValueError, "'flash3' is unknown; valid: auto, chunked, cudnn, pallas, xla"):
      ops.dot_product_attention(x, x, x, implementation="flash3")
    if jax.default_backend() == "cpu":
      with self.assertRaisesRegex(ValueError, "'cudnn' is not available on cpu; available "
                                  "there: auto, xla, chunked, pallas"):
        ops.dot_product_attention(x, x, x, implementation="cudnn")

  def test_shape_mismatch_is_an_error(self):
    with self.assertRaisesRegex(ValueError, "shapes disagree"):
      ops.dot_product_attention(jnp.zeros((1, 4, 2, 8)), jnp.zeros((1, 5, 2, 4)),
                                jnp.zeros((1, 5, 2, 4)))


if __name__ == "__main__":
  absltest.main()


class EveryModelEveryImplementationTest(parameterized.TestCase):
  """Models choose attention by name; every implementation gives the same output."""

  @parameterized.parameters("vit", "swin", "perceiver")
  def test_same_output(self, name):
    from flax import nnx  # pylint: disable=g-import-not-at-top
    from big_vision_like.models import MODELS  # pylint: disable=g-import-not-at-top
    kwargs = {
        "vit": dict(num_classes=3, patch_size=2, width=16, depth=2, num_heads=2,
                    image_size=8, pool="map", head_zero_init=False),
        "swin": dict(num_classes=3, patch_size=1, window_size=4, embed_dim=8, depths=(2, 1),
                     num_heads=(2, 2), image_size=8, drop_path=0.0, head_zero_init=False),
        "perceiver": dict(num_classes=3, image_size=8, num_latents=4, latent_dim=16,
                          num_blocks=1, self_attends_per_block=1, self_heads=2, num_bands=4),
    }[name]
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    outputs = {}
    for implementation in ("xla", "chunked", "pallas"):
      with nnx.use_eager_sharding(False):
        model = MODELS.build(name, dict(kwargs, attention=implementation), rngs=nnx.Rngs(0))
      outputs[implementation] = model(x)[0]
    for implementation in ("chunked", "pallas"):
      np.testing.assert_allclose(outputs["xla"], outputs[implementation], atol=1e-5,
                                 rtol=1e-5, err_msg=implementation)
