"""One table of sharding rules, in force for every trace of a run: a logical axis
name without a rule is an error at start, and evaluators trace under the
config's rules, not the default table."""
from unittest import mock

from absl.testing import absltest
import jax
import jax.numpy as jnp
from flax import nnx

from big_vision_like import train
from big_vision_like.models import layers
from big_vision_like.parallel import mesh as mesh_lib
from big_vision_like.parallel import sharding
from big_vision_like.registry import ConfigError
from tests import helpers


class UnknownNameTest(absltest.TestCase):

  def test_a_parameter_axis_without_a_rule_fails_at_start_naming_it(self):
    config = helpers.tiny_config()
    # A table that forgot 'mlp': the MLP kernels would silently replicate.
    config.sharding_rules = [r for r in config.sharding_rules if r[0] != "mlp"]
    mesh = mesh_lib.make_mesh()
    with jax.set_mesh(mesh), self.assertRaisesRegex(
        ConfigError, r"^logical axis 'mlp' of parameter backbone/blocks/0/mlp/fc1/bias has "
                     r"no rule in config.sharding_rules .*; add \('mlp', None\) to replicate "
                     r"it or map it to a mesh axis$"):
      train.Trainer(config, mesh, steps_per_epoch=1)

  def test_an_activation_axis_without_a_rule_fails_when_traced(self):
    mesh = mesh_lib.make_mesh()
    with jax.set_mesh(mesh), sharding.use_rules([("batch", "data")]):
      with self.assertRaisesRegex(ConfigError, r"logical axis 'act_typo' of an activation"):
        jax.jit(lambda x: sharding.constrain(x, ("batch", "act_typo")))(jnp.ones((2, 4)))
      # Outside any mesh a hint is a no-op whatever its names.
    self.assertEqual(sharding.constrain(jnp.ones(2), ("nonsense",)).shape, (2,))


class RulesInForceTest(absltest.TestCase):

  def test_evaluators_trace_under_the_configs_rules(self):
    config = helpers.tiny_config(total_steps=2, eval_every_steps=2,
                                 checkpoint_every_steps=2)
    marker = ("marker_axis", None)  # only the config's table has it
    config.sharding_rules = list(config.sharding_rules) + [marker]
    seen = []
    plain = layers.Mlp.__call__

    def spy(self, x):
      seen.append(marker in sharding.current_rules())
      return plain(self, x)

    with mock.patch.object(layers.Mlp, "__call__", spy):
      train.train_and_evaluate(config, self.create_tempdir().full_path)
    # Traces of the train step, the evaluator's checks and its eval step.
    self.assertGreaterEqual(len(seen), 3)
    self.assertTrue(all(seen), seen)
    self.assertNotIn(marker, sharding.current_rules())  # the run's table is gone after


if __name__ == "__main__":
  absltest.main()
