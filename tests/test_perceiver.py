"""Perceiver IO: inputs of different lengths, decoders, position encodings, bad input."""
import numpy as np
from absl.testing import absltest, parameterized

import jax
import jax.numpy as jnp
from flax import nnx

from big_vision_like.models import perceiver
from big_vision_like.registry import ConfigError


def tiny(**kw):
  args = dict(num_classes=3, image_size=8, num_latents=4, latent_dim=16, num_blocks=2,
              self_attends_per_block=1, self_heads=2, num_bands=4)
  args.update(kw)
  with nnx.use_eager_sharding(False):
    return perceiver.Perceiver(**args, rngs=nnx.Rngs(0))


class PerceiverTest(parameterized.TestCase):

  def test_fourier_inputs_of_different_lengths(self):
    """The same weights read 8x8 = 64 or 12x20 = 240 inputs: cost linear in the input."""
    model = tiny()
    for hw in ((8, 8), (12, 20)):
      logits, aux = model(jnp.ones((2, *hw, 3)))
      self.assertEqual(logits.shape, (2, 3))
      self.assertEqual(aux["latents"].shape, (2, 4, 16))
      self.assertEqual(aux["grid"], hw)

  @parameterized.parameters(("pixels", 1, 8), ("conv1x1", 1, 8), ("patches", 2, 4))
  def test_preprocessors(self, preprocessor, patch, grid):
    model = tiny(preprocessor=preprocessor, patch_size=patch, prep_channels=8, posemb="learn",
                 posemb_channels=8)
    logits, aux = model(jax.random.normal(jax.random.key(0), (2, 8, 8, 3)))
    self.assertEqual(logits.shape, (2, 3))
    self.assertEqual(aux["grid"], (grid, grid))

  def test_weights_are_shared_across_blocks(self):
    one, three = tiny(num_blocks=1), tiny(num_blocks=3)
    self.assertEqual(jax.tree.map(jnp.shape, nnx.state(one, nnx.Param)),
                     jax.tree.map(jnp.shape, nnx.state(three, nnx.Param)))
    x = jax.random.normal(jax.random.key(1), (1, 8, 8, 3))
    self.assertFalse(np.allclose(one(x)[1]["latents"], three(x)[1]["latents"]))

  @parameterized.parameters(1, 2)
  def test_dense_decoder_predicts_every_pixel(self, stride):
    model = tiny(decoder="dense", preprocessor="patches", patch_size=2, prep_channels=8,
                 dense_stride=stride)
    logits, aux = model(jax.random.normal(jax.random.key(2), (2, 8, 8, 3)))
    self.assertEqual(logits.shape, (2, 8, 8, 3))
    self.assertEqual(aux["tokens"].shape, (2, 4 // stride, 4 // stride, 3))

  def test_fourier_feature_layout(self):
    pos = perceiver.linear_positions(2, 3)
    np.testing.assert_allclose(pos[:3], [[-1, -1], [-1, 0], [-1, 1]])
    feats = perceiver.fourier_features(pos, 2, (4, 6))
    self.assertEqual(feats.shape, (6, 2 + 8))
    # sin block: dim 0 bands (1, 2) then dim 1 bands (1, 3); cos block after it
    np.testing.assert_allclose(feats[5, 2:6], np.sin(np.pi * np.array([1 * 1, 2 * 1, 1 * 1, 3 * 1])),
                               atol=1e-6)
    np.testing.assert_allclose(feats[5, 6:], np.cos(np.pi * np.array([1, 2, 1, 3])), atol=1e-6)

  def test_bad_inputs(self):
    with self.assertRaisesRegex(ConfigError, "learned Perceiver position embeddings are for a 8x8"):
      tiny(posemb="learn")(jnp.ones((1, 10, 10, 3)))
    with self.assertRaisesRegex(ConfigError, "not divisible by config.model.patch_size=3"):
      tiny(preprocessor="patches", patch_size=3)
    with self.assertRaisesRegex(ConfigError, "needs config.model.num_classes"):
      tiny(decoder="dense", num_classes=0)
    with self.assertRaisesRegex(ConfigError, "preprocessor='conv'"):
      tiny(preprocessor="conv")


if __name__ == "__main__":
  absltest.main()
