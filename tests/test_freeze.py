"""config.optim.frozen, per-group learning rates (lr_mult), LARS, and the linear-probe
objective: frozen parameters stay bit-equal, have no optimiser state, cost no
backward pass; multipliers scale exactly their group's updates."""
import jax
import numpy as np
import optax
from absl.testing import absltest

from big_vision_like import optim, train
from big_vision_like.parallel import mesh as mesh_lib
from big_vision_like.parallel import sharding
from big_vision_like.registry import ConfigError
from tests import helpers, test_optim

BACKBONE_BUT_HEAD = "^backbone/(?!head/)"


def tiny(**overrides):
  config = helpers.tiny_config(**{"optim.warmup_steps": 0, **overrides})
  config.evals = {}
  return config


def batch(n=16, size=8, classes=10, seed=0):
  rng = np.random.default_rng(seed)
  return {"image": rng.normal(size=(n, size, size, 1)).astype(np.float32),
          "label": rng.integers(0, classes, n).astype(np.int32)}


def run_steps(config, steps=3):
  """(trainer, initial state, state after `steps` train steps) on host arrays."""
  mesh = mesh_lib.make_mesh(mesh_lib.config_axes(config))
  with jax.set_mesh(mesh), sharding.use_rules(config.sharding_rules):
    trainer = train.Trainer(config, mesh, steps_per_epoch=10)
    state = trainer.init_state()
    first = jax.device_get(state)
    b = batch(config.input.batch_size)
    for _ in range(steps):
      state, _ = trainer.train_step(state, b)
    return trainer, first, jax.device_get(state)


def named(tree):
  return {optim._path_str(p): np.asarray(v)  # pylint: disable=protected-access
          for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


class FrozenTest(absltest.TestCase):

  def test_frozen_parameters_are_bit_equal_and_have_no_optimiser_state(self):
    config = tiny(**{"optim.frozen": (BACKBONE_BUT_HEAD,), "optim.ema_decay": 0.9})
    with self.assertLogs(level="INFO") as logs:
      trainer, first, last = run_steps(config)
    self.assertEqual(set(named(last["params"])),
                     {"backbone/head/kernel", "backbone/head/bias"})
    frozen_before, frozen_after = named(first["other"]), named(last["other"])
    self.assertIn("backbone/blocks/0/attn/query/kernel", frozen_after)
    for name, value in frozen_before.items():
      np.testing.assert_array_equal(frozen_after[name], value, err_msg=name)
    head = named(last["params"])["backbone/head/kernel"]
    self.assertGreater(np.abs(head - named(first["params"])["backbone/head/kernel"]).max(), 0)
    # Adam's two moments exist for the two head parameters only.
    moments = [x for x in jax.tree.leaves(last["opt_state"]) if np.ndim(x) > 0]
    self.assertLen(moments, 4)
    self.assertEqual(set(named(last["ema_params"])), set(named(last["params"])))
    total = sum(v.size for v in {**frozen_before, **named(first["params"])}.values())
    trained = sum(v.size for v in named(first["params"]).values())
    self.assertTrue(any(f"Training {trained:,} of {total:,} parameters; frozen by "
                        f"config.optim.frozen: {total - trained:,}" in line
                        for line in logs.output), logs.output)

  def test_a_frozen_backbone_skips_its_backward_pass(self):
    def flops(config):
      mesh = mesh_lib.make_mesh(mesh_lib.config_axes(config))
      with jax.set_mesh(mesh), sharding.use_rules(config.sharding_rules):
        trainer = train.Trainer(config, mesh, steps_per_epoch=10)
        b = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                         batch(config.input.batch_size))
        compiled = trainer.train_step.lower(trainer.abstract_state, b).compile()
        return compiled.cost_analysis()["flops"]
    full = flops(tiny())
    frozen = flops(tiny(**{"optim.frozen": (BACKBONE_BUT_HEAD,)}))
    # Forward only (~1/3 of forward + backward), plus the head's gradient.
    self.assertLess(frozen, 0.5 * full, (frozen, full))

  def test_a_regex_that_matches_nothing_is_a_one_line_error(self):
    with self.assertRaisesRegex(ConfigError, r"^config.optim.frozen: 'encoder/' matches no "
                                r"parameter \(they are named like backbone/[^\n]*$"):
      run_steps(tiny(**{"optim.frozen": ("encoder/",)}), steps=0)
    with self.assertRaisesRegex(ConfigError, "config.optim.lr_mult: 'encoder/' matches no"):
      run_steps(tiny(**{"optim.lr_mult": (("encoder/", 0.1),)}), steps=0)
    with self.assertRaisesRegex(ConfigError, r"^config.optim.lr_mult\[0\]='\^backbone/': "
                                r"want \(regex, factor\), e.g. "):
      run_steps(tiny(**{"optim.lr_mult": ("^backbone/", 0.1)}), steps=0)
    with self.assertRaisesRegex(ConfigError, r"^config.optim.frozen: '\(' is not a regex"):
      run_steps(tiny(**{"optim.frozen": ("(",)}), steps=0)


  def test_frozen_with_gradient_accumulation(self):
    config = tiny(**{"optim.frozen": (BACKBONE_BUT_HEAD,), "optim.grad_accum_steps": 2})
    _, first, last = run_steps(config, steps=2)
    for name, value in named(first["other"]).items():
      np.testing.assert_array_equal(named(last["other"])[name], value, err_msg=name)
    self.assertFalse(np.array_equal(named(last["params"])["backbone/head/kernel"],
                                    named(first["params"])["backbone/head/kernel"]))


class LearningRateMultiplierTest(absltest.TestCase):

  def test_layer_decay_counts_the_frozen_blocks(self):
    every = test_optim.vit_params()  # depth 3
    trained = {k: v for k, v in named(every).items() if not k.startswith("blocks/0/")}
    scales = named(optim.layer_scales(every, 0.5))
    partial = named(optim.layer_scales(
        {k: v for k, v in every.items() if k != "blocks"} | {"blocks": {
            i: b for i, b in every["blocks"].items() if i != 0}}, 0.5, every))
    self.assertEqual(set(partial), set(trained))
    for name, value in partial.items():
      self.assertEqual(float(value), float(scales[name]), name)

  def test_a_group_multiplier_scales_exactly_its_updates(self):
    plain = {"optim.name": "sgd", "optim.momentum": 0.0, "optim.weight_decay": 0.0,
             "optim.clip_norm": None, "optim.schedule": "constant", "optim.lr": 0.5}
    _, first, base = run_steps(tiny(**plain), steps=1)
    rules = (("^backbone/blocks/", 0.1), ("^backbone/", 2.0))
    _, _, scaled = run_steps(tiny(**{**plain, "optim.lr_mult": rules}), steps=1)
    start, base, scaled = named(first["params"]), named(base["params"]), named(scaled["params"])
    for name, value in start.items():
      factor = 0.1 if name.startswith("backbone/blocks/") else 2.0
      np.testing.assert_allclose(scaled[name] - value, factor * (base[name] - value),
                                 rtol=1e-5, atol=1e-7, err_msg=name)


class LarsTest(absltest.TestCase):

  def test_lars_is_optax_lars_without_trust_ratio_on_biases_and_norms(self):
    config = tiny().optim
    config.update(name="lars", lr=0.3, momentum=0.9, weight_decay=0.01, clip_norm=None,
                  schedule="constant", trust_coefficient=0.002, wd_exclude=())
    rng = np.random.default_rng(0)
    params = {"w": rng.normal(size=(4, 3)).astype(np.float32),
              "b": rng.normal(size=(3,)).astype(np.float32)}
    tx, _ = optim.build(config, params, total_steps=10, steps_per_epoch=1)
    matrices = {"w": True, "b": False}
    reference = optax.lars(0.3, weight_decay=0.01, weight_decay_mask=matrices,
                           trust_coefficient=0.002, eps=0.0, trust_ratio_mask=matrices,
                           momentum=0.9)
    ours, theirs = tx.init(params), reference.init(params)
    for step in range(3):
      grads = jax.tree.map(lambda p, s=step: np.cos(p * (s + 1)).astype(np.float32), params)
      u1, ours = tx.update(grads, ours, params)
      u2, theirs = reference.update(grads, theirs, params)
      jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), u1, u2)
    self.assertGreater(float(np.abs(u1["w"]).max()), 0.0)


class ProbeObjectiveTest(absltest.TestCase):

  def test_probe_trains_head_and_batchnorm_statistics_only(self):
    config = tiny(**{"objective": {"name": "probe"}, "optim.name": "lars",
                     "optim.lr": 0.1, "optim.weight_decay": 0.0})
    _, first, last = run_steps(config)
    self.assertEqual(set(named(last["params"])), {"head/kernel", "head/bias"})
    before, after = named(first["other"]), named(last["other"])
    for name, value in before.items():
      if name.startswith("backbone/"):
        np.testing.assert_array_equal(after[name], value, err_msg=name)
    self.assertNotIn("norm/scale", after)  # BatchNorm without affine parameters
    self.assertGreater(np.abs(after["norm/mean"] - before["norm/mean"]).max(), 0)
    head, head0 = named(last["params"])["head/kernel"], named(first["params"])["head/kernel"]
    self.assertLess(np.abs(head0).max(), 0.021)  # truncated normal, std 0.01
    self.assertGreater(np.abs(head - head0).max(), 0)

  def test_probe_needs_classes(self):
    with self.assertRaisesRegex(ConfigError, "config.model.num_classes must be set"):
      run_steps(tiny(**{"objective": {"name": "probe"}, "model.num_classes": 0}), steps=0)


if __name__ == "__main__":
  absltest.main()
