"""Schedules, the weight-decay mask and layer-wise learning-rate decay."""
import numpy as np
from absl.testing import absltest

import jax
import jax.numpy as jnp
from flax import nnx

from big_vision_like import configuration, optim
from big_vision_like.models import vit


def optim_config(**kw):
  c = configuration.defaults().optim
  c.update(kw)
  return c


def vit_params(scan=False):
  with nnx.use_eager_sharding(False):
    model = vit.ViT(num_classes=3, patch_size=2, width=8, depth=3, num_heads=2,
                    image_size=4, channels=1, scan=scan, rngs=nnx.Rngs(0))
  return nnx.split(model, nnx.Param)[1]


class ScheduleTest(absltest.TestCase):

  def test_warmup_then_cosine_to_floor(self):
    lr = optim.schedule(optim_config(lr=1e-3, warmup_steps=10, min_lr=1e-5), 110, 10)
    self.assertEqual(float(lr(0)), 0.0)
    self.assertAlmostEqual(float(lr(5)), 5e-4, places=8)
    self.assertAlmostEqual(float(lr(10)), 1e-3, places=8)
    self.assertAlmostEqual(float(lr(60)), (1e-3 + 1e-5) / 2, places=7)
    self.assertAlmostEqual(float(lr(110)), 1e-5, places=8)

  def test_warmup_in_epochs(self):
    lr = optim.schedule(optim_config(lr=1.0, warmup_epochs=2.0, min_lr=0.0), 100, 5)
    self.assertAlmostEqual(float(lr(10)), 1.0, places=6)
    self.assertAlmostEqual(float(lr(5)), 0.5, places=6)

  def test_unknown_schedule(self):
    with self.assertRaisesRegex(ValueError, "config.optim.schedule='step'"):
      optim.schedule(optim_config(schedule="step"), 10, 1)


class MaskAndLayerDecayTest(absltest.TestCase):

  def flat(self, tree):
    return {optim._path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}

  def test_decay_only_on_matrices(self):
    mask = self.flat(optim.decay_mask(vit_params(), ("pos_embedding", "cls_token")))
    self.assertTrue(mask["blocks/0/attn/query/kernel"])
    self.assertTrue(mask["head/kernel"])
    self.assertFalse(mask["blocks/0/attn/query/bias"])
    self.assertFalse(mask["blocks/0/norm1/scale"])
    self.assertFalse(mask["pos_embedding"])
    self.assertFalse(mask["cls_token"])

  def test_layer_scales(self):
    scales = self.flat(optim.layer_scales(vit_params(), 0.5))
    self.assertAlmostEqual(float(scales["head/kernel"]), 1.0)
    self.assertAlmostEqual(float(scales["norm/scale"]), 1.0)
    self.assertAlmostEqual(float(scales["blocks/2/mlp/fc1/kernel"]), 0.5)
    self.assertAlmostEqual(float(scales["blocks/0/mlp/fc1/kernel"]), 0.125)
    self.assertAlmostEqual(float(scales["embedding/kernel"]), 0.0625)
    self.assertAlmostEqual(float(scales["pos_embedding"]), 0.0625)
    scanned = self.flat(optim.layer_scales(vit_params(scan=True), 0.5))
    np.testing.assert_allclose(scanned["blocks/mlp/fc1/kernel"].reshape(-1),
                               [0.125, 0.25, 0.5])

  def test_layer_decay_scales_the_updates(self):
    params = vit_params()
    grads = jax.tree.map(jnp.ones_like, params)
    plain, _ = optim.build(optim_config(lr=1.0, weight_decay=0.0, clip_norm=None,
                                        schedule="constant", name="sgd", momentum=0.0),
                           params, 10, 1)
    decayed, _ = optim.build(optim_config(lr=1.0, weight_decay=0.0, clip_norm=None,
                                          schedule="constant", name="sgd", momentum=0.0,
                                          layer_decay=0.5), params, 10, 1)
    u_plain = self.flat(plain.update(grads, plain.init(params), params)[0])
    u_decay = self.flat(decayed.update(grads, decayed.init(params), params)[0])
    key = "blocks/1/attn/key/kernel"
    np.testing.assert_allclose(u_decay[key], 0.25 * u_plain[key])


if __name__ == "__main__":
  absltest.main()
