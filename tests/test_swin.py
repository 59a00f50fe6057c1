"""Swin: variant shapes, the shifted-window mask, stages for dense heads, bad input."""
import numpy as np
from absl.testing import absltest, parameterized

import jax
import jax.numpy as jnp
from flax import nnx

from big_vision_like.models import swin
from big_vision_like.registry import ConfigError


def tiny(**kw):
  args = dict(num_classes=4, patch_size=2, window_size=4, embed_dim=8, depths=(2, 2),
              num_heads=(2, 2), image_size=32, drop_path=0.0, head_zero_init=False)
  args.update(kw)
  with nnx.use_eager_sharding(False):
    return swin.Swin(**args, rngs=nnx.Rngs(0))


class SwinTest(parameterized.TestCase):

  @parameterized.parameters(("T", 768), ("S", 768), ("B", 1024), ("L", 1536))
  def test_variant_shapes(self, variant, width):
    with nnx.use_eager_sharding(False):
      model = nnx.eval_shape(lambda: swin.Swin(num_classes=10, variant=variant,
                                               image_size=224, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    logits, aux = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state,
                                 jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32))
    self.assertEqual(logits.shape, (2, 10))
    self.assertEqual([s.shape[1:3] for s in aux["stages"]], [(56, 56), (28, 28), (14, 14), (7, 7)])
    self.assertEqual([s.shape[-1] for s in aux["stages"]], [width // 8, width // 4, width // 2, width])
    self.assertEqual(aux["tokens"].shape, (2, 49, width))

  def test_other_window_and_image_sizes(self):
    model = tiny(window_size=2, image_size=(16, 32), patch_size=2)
    logits, aux = model(jnp.ones((1, 16, 32, 3)))
    self.assertEqual(logits.shape, (1, 4))
    self.assertEqual(aux["stages"][0].shape, (1, 8, 16, 8))
    self.assertEqual(aux["stages"][1].shape, (1, 4, 8, 16))

  def test_shifted_windows_never_cross_the_borders_the_roll_created(self):
    """d out[p] / d in[q] of a shifted block's attention is non-zero iff p and q
    share a window of the rolled map AND come from the same side of the wrap."""
    size, window, shift = 8, 4, 2
    block = tiny(window_size=window).stages[0].blocks[1]
    self.assertEqual(block.shift, shift)

    def attention_only(x):  # [H, W, C] -> [H, W, C], the block's windowed attention
      y = jnp.roll(x[None], (-shift, -shift), axis=(1, 2))
      mask = swin.shift_mask(size, size, window, shift)
      y = swin.window_merge(block.attn(swin.window_partition(y, window), mask), window, size, size)
      return jnp.roll(y, (shift, shift), axis=(1, 2))[0]

    x = jax.random.normal(jax.random.key(0), (size, size, 8))
    jac = jax.jacobian(lambda x: attention_only(x).sum(-1))(x)  # [H, W, H, W, C]
    depends = np.abs(np.asarray(jac)).sum(-1) > 1e-12

    rolled = (np.arange(size) - shift) % size  # position in the rolled map
    win = rolled // window
    side = (np.arange(size) < shift).astype(int)  # wrapped rows/cols form their own region
    for r1 in range(size):
      for c1 in range(size):
        expected = ((win[r1] == win[:, None]) & (win[c1] == win[None, :])
                    & (side[r1] == side[:, None]) & (side[c1] == side[None, :]))
        np.testing.assert_array_equal(depends[r1, c1], expected, err_msg=f"query ({r1},{c1})")

  def test_relative_position_index(self):
    index = swin.relative_position_index(2)
    # pairs (0,0)->(1,1) and (1,1)->(0,0) differ by (-1,-1) and (+1,+1)
    self.assertEqual(index[0, 3], 0)
    self.assertEqual(index[3, 0], 8)
    self.assertTrue((np.diag(index) == 4).all())

  def test_drop_path_only_in_training(self):
    model = tiny(drop_path=0.5)
    x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
    np.testing.assert_array_equal(model(x)[0], model(x, train=False, rng=jax.random.key(2))[0])
    self.assertFalse(np.allclose(model(x, train=True, rng=jax.random.key(2))[0],
                                 model(x, train=True, rng=jax.random.key(3))[0]))

  def test_classifier_under_the_supervised_objective(self):
    from big_vision_like.objectives.supervised import Supervised  # pylint: disable=g-import-not-at-top
    from tests import helpers  # pylint: disable=g-import-not-at-top
    config = helpers.tiny_config()
    config.model = dict(name="swin", num_classes=10, patch_size=2, window_size=2, embed_dim=8,
                        depths=(1, 1), num_heads=(1, 2), image_size=8, channels=1)
    with nnx.use_eager_sharding(False):
      objective = Supervised(config, rngs=nnx.Rngs(0))
    batch = {"image": jnp.zeros((2, 8, 8, 1)), "label": jnp.array([1, 2])}
    loss, _ = objective.loss(batch, rng=jax.random.key(0), train=True)
    self.assertAlmostEqual(float(loss), float(np.log(10)), places=5)  # zero-init head

  def test_bad_inputs(self):
    with self.assertRaisesRegex(ConfigError, "not divisible by config.model.window_size=3"):
      tiny(window_size=3)
    with self.assertRaisesRegex(ConfigError, "not divisible by config.model.patch_size=2"):
      tiny(image_size=31)
    with self.assertRaisesRegex(ConfigError, "built for 32x32 images"):
      tiny()(jnp.ones((1, 64, 64, 3)))
    with self.assertRaisesRegex(ConfigError, "'Q' is not a Swin variant"):
      tiny(variant="Q")


if __name__ == "__main__":
  absltest.main()
