"""The supervised objective: targets, mixing, losses."""
import numpy as np
from absl.testing import absltest, parameterized

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from big_vision_like.objectives import supervised
from tests import helpers


def objective(**kw):
  config = helpers.tiny_config()
  with nnx.use_eager_sharding(False):
    return supervised.Supervised(config, rngs=nnx.Rngs(0), **kw)


class SupervisedTest(parameterized.TestCase):

  def test_label_smoothing_targets(self):
    targets = objective(label_smoothing=0.1).targets(jnp.array([2]))
    self.assertAlmostEqual(float(targets[0, 2]), 0.91, places=6)
    self.assertAlmostEqual(float(targets[0, 0]), 0.01, places=6)
    self.assertAlmostEqual(float(targets.sum()), 1.0, places=6)

  @parameterized.parameters((0.8, 0.0), (0.0, 1.0), (0.8, 1.0))
  def test_mixing_keeps_targets_consistent_with_pixels(self, mixup, cutmix):
    """Each mixed image is lam * a + (1 - lam) * b pixel-wise on average; targets match."""
    images = jnp.concatenate([jnp.zeros((1, 8, 8, 1)), jnp.ones((1, 8, 8, 1))])
    targets = jax.nn.one_hot(jnp.array([0, 1]), 2)
    for seed in range(5):
      mixed, mixed_targets = supervised.mix(images, targets, jax.random.key(seed), mixup, cutmix)
      np.testing.assert_allclose(mixed_targets.sum(-1), 1.0, atol=1e-6)
      # image 0 (zeros) mixed with image 1 (ones): mean pixel = weight of image 1
      np.testing.assert_allclose(float(mixed[0].mean()), float(mixed_targets[0, 1]), atol=1e-5)

  def test_softmax_and_sigmoid_losses(self):
    logits = jnp.array([[2.0, -1.0, 0.5]])
    targets = jax.nn.one_hot(jnp.array([0]), 3)
    obj = objective()
    np.testing.assert_allclose(obj.cross_entropy(logits, targets),
                               optax.softmax_cross_entropy(logits, targets))
    obj = objective(loss="sigmoid")
    expected = -(jnp.log(jax.nn.sigmoid(2.0)) + jnp.log(1 - jax.nn.sigmoid(-1.0))
                 + jnp.log(1 - jax.nn.sigmoid(0.5)))
    np.testing.assert_allclose(obj.cross_entropy(logits, targets), [expected], rtol=1e-6)

  def test_loss_and_metrics(self):
    obj = objective(mixup_alpha=0.2)
    batch = {"image": jnp.zeros((4, 8, 8, 1)), "label": jnp.arange(4)}
    loss, metrics = obj.loss(batch, rng=jax.random.key(0), train=True)
    # zero-initialised head: uniform predictions, loss = log(10)
    self.assertAlmostEqual(float(loss), float(np.log(10)), places=5)
    self.assertIn("accuracy", metrics)

  def test_missing_num_classes(self):
    config = helpers.tiny_config()
    config.model.num_classes = 0
    with self.assertRaisesRegex(ValueError, "config.model.num_classes must be set"):
      supervised.Supervised(config, rngs=nnx.Rngs(0))


if __name__ == "__main__":
  absltest.main()
