"""The pre-training objectives: losses against direct formulas, their state
(teacher, centre, temperature), bad-input errors, and exact resume for each."""
import importlib
import os
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl.testing import absltest, parameterized
from flax import nnx

from big_vision_like import train
from big_vision_like.models.text import TextTransformer
from big_vision_like.objectives import contrastive, distillation, masked
from big_vision_like.registry import ConfigError
from tests import helpers

sys.path.insert(0, helpers.REPO)

# (config module, argument) of each pre-training objective's smoke setting.
SMOKE = {
    "clip": ("clip_cifar10", "smoke"),
    "siglip": ("siglip_cifar10", "smoke"),
    "mae": ("mae_cifar10", "smoke"),
    "dino": ("dino_cifar10", "smoke"),
    "ibot": ("dino_cifar10", "ibot_smoke"),
}


def smoke_config(objective):
  module, arg = SMOKE[objective]
  return importlib.import_module(f"configs.{module}").get_config(arg)


def build(config, steps=10):
  with nnx.use_eager_sharding(False):
    return train.build_objective(config, 0, total_steps=steps)


def text_tower(**kw):
  with nnx.use_eager_sharding(False):
    return TextTransformer(vocab_size=50, max_len=8, width=16, num_heads=2,
                           rngs=nnx.Rngs(0), **kw)


def unit_rows(rng, n, d):
  x = rng.normal(size=(n, d))
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def log_softmax(x, axis):
  x = x - x.max(axis, keepdims=True)
  return x - np.log(np.exp(x).sum(axis, keepdims=True))


class LossTest(absltest.TestCase):

  def test_clip_loss_matches_numpy(self):
    rng = np.random.default_rng(0)
    img, txt, log_scale = unit_rows(rng, 6, 5), unit_rows(rng, 6, 5), 2.3
    logits = np.exp(log_scale) * img @ txt.T
    expected = -0.5 * (np.diag(log_softmax(logits, 1)).mean()
                       + np.diag(log_softmax(logits, 0)).mean())
    got = contrastive.clip_loss(jnp.asarray(img), jnp.asarray(txt), jnp.asarray(log_scale))
    np.testing.assert_allclose(got, expected, rtol=1e-5)

  def test_siglip_loss_matches_numpy(self):
    rng = np.random.default_rng(1)
    img, txt, t, b = unit_rows(rng, 5, 4), unit_rows(rng, 5, 4), np.log(10.0), -10.0
    expected = 0.0
    for i in range(5):
      for j in range(5):
        z = np.exp(t) * img[i] @ txt[j] + b
        label = 1.0 if i == j else -1.0
        expected += np.log1p(np.exp(-label * z))
    got = contrastive.siglip_loss(jnp.asarray(img), jnp.asarray(txt), jnp.asarray(t),
                                  jnp.asarray(b))
    np.testing.assert_allclose(got, expected / 5, rtol=1e-5)

  def test_same_label_positives(self):
    rng = np.random.default_rng(5)
    img, txt = unit_rows(rng, 4, 3), unit_rows(rng, 4, 3)
    labels = np.array([0, 1, 0, 2])
    pos = labels[:, None] == labels[None]
    logits = np.exp(1.5) * img @ txt.T
    soft = lambda l, p: -(p / p.sum(1, keepdims=True) * log_softmax(l, 1)).sum(1).mean()
    expected = 0.5 * (soft(logits, pos) + soft(logits.T, pos.T))
    got = contrastive.clip_loss(jnp.asarray(img), jnp.asarray(txt), jnp.asarray(1.5),
                                jnp.asarray(pos))
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    z = np.exp(2.0) * img @ txt.T - 1.0
    expected = np.log1p(np.exp(-(2.0 * pos - 1) * z)).sum(1).mean()
    got = contrastive.siglip_loss(jnp.asarray(img), jnp.asarray(txt), jnp.asarray(2.0),
                                  jnp.asarray(-1.0), jnp.asarray(pos))
    np.testing.assert_allclose(got, expected, rtol=1e-5)

  def test_masked_loss_counts_only_masked_patches(self):
    rng = np.random.default_rng(2)
    pred, target = rng.normal(size=(2, 6, 3)), rng.normal(size=(2, 6, 3))
    mask = np.array([[1, 0, 0, 1, 0, 0], [0, 1, 1, 0, 0, 0]], np.float32)
    got = masked.masked_mse(jnp.asarray(pred), jnp.asarray(target), jnp.asarray(mask))
    per_patch = ((pred - target) ** 2).mean(-1)
    np.testing.assert_allclose(got, per_patch[mask > 0].mean(), rtol=1e-5)
    # Changing a visible patch's prediction changes nothing.
    pred[0, 1] += 100.0
    np.testing.assert_allclose(
        masked.masked_mse(jnp.asarray(pred), jnp.asarray(target), jnp.asarray(mask)), got,
        rtol=1e-6)

  def test_random_masking_keeps_the_lowest_noise(self):
    noise = jax.random.uniform(jax.random.key(0), (3, 16))
    ids_keep, mask, ids_restore = masked.random_masking(noise, 0.75)
    self.assertEqual(ids_keep.shape, (3, 4))
    np.testing.assert_array_equal(mask.sum(1), [12, 12, 12])
    for b in range(3):
      expected = set(np.argsort(np.asarray(noise[b]))[:4])
      self.assertEqual(set(np.asarray(ids_keep[b])), expected)
      self.assertTrue(all(mask[b, i] == 0 for i in expected))
      np.testing.assert_array_equal(np.argsort(np.asarray(ids_restore[b])),
                                    np.argsort(np.asarray(noise[b])))

  def test_norm_pix_targets_are_standardised_per_patch(self):
    images = jax.random.normal(jax.random.key(1), (2, 8, 8, 3)) * 3 + 1
    target = np.asarray(masked.pixel_targets(images, 4, norm_pix=True))
    np.testing.assert_allclose(target.mean(-1), 0, atol=1e-5)
    np.testing.assert_allclose(target.std(-1, ddof=1), 1, atol=1e-3)
    raw = np.asarray(masked.pixel_targets(images, 4, norm_pix=False))
    np.testing.assert_allclose(raw[0, 1], np.asarray(images)[0, :4, 4:8].reshape(-1))

  def test_sinkhorn_balances_prototypes(self):
    logits = jax.random.normal(jax.random.key(2), (32, 8)) * 3
    q = np.asarray(distillation.sinkhorn_knopp(logits, iterations=50))
    np.testing.assert_allclose(q.sum(1), 1.0, rtol=1e-4)
    np.testing.assert_allclose(q.sum(0), 32 / 8, rtol=1e-3)

  def test_koleo_matches_numpy(self):
    x = np.random.default_rng(3).normal(size=(7, 4))
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    dist = np.linalg.norm(unit[:, None] - unit[None], axis=-1) + np.eye(7) * 10
    expected = -np.log(dist.min(1) + 1e-8).mean()
    np.testing.assert_allclose(distillation.koleo(jnp.asarray(x)), expected, rtol=1e-5)

  def test_pair_cross_entropy_skips_same_crop(self):
    rng = np.random.default_rng(4)
    q = np.exp(log_softmax(rng.normal(size=(3, 2, 5)), -1))
    logp = log_softmax(rng.normal(size=(3, 4, 5)), -1)
    total, pairs = 0.0, 0
    for t in range(2):
      for v in range(4):
        if t != v:
          total += -(q[:, t] * logp[:, v]).sum(-1).mean()
          pairs += 1
    got = distillation.cross_entropy_pairs(jnp.asarray(q), jnp.asarray(logp))
    np.testing.assert_allclose(got, total / pairs, rtol=1e-5)

  def test_teacher_momentum_and_temperature_schedules(self):
    m = lambda s: float(distillation.cosine_momentum(jnp.asarray(s), 100, 0.996))
    self.assertAlmostEqual(m(0), 0.996, places=6)
    self.assertAlmostEqual(m(50), 0.998, places=6)
    self.assertAlmostEqual(m(100), 1.0, places=6)
    t = lambda s: float(distillation.teacher_temperature(jnp.asarray(s), 10, 0.04, 0.07))
    self.assertAlmostEqual(t(0), 0.04, places=6)
    self.assertAlmostEqual(t(5), 0.055, places=6)
    self.assertAlmostEqual(t(30), 0.07, places=6)


class TextTowerTest(absltest.TestCase):

  def test_causal_tower_pools_at_the_eos_and_ignores_what_follows(self):
    tower = text_tower(depth=2, causal=True)
    tokens = jnp.array([[5, 6, 7, 2, 0, 0, 0, 0]])
    pooled, states = tower(tokens)
    np.testing.assert_allclose(pooled, states[:, 3], atol=1e-6)  # pooled at the EOS
    _, states2 = tower(tokens.at[0, 2].set(9))
    np.testing.assert_allclose(states[:, :2], states2[:, :2], atol=1e-6)  # causal
    self.assertFalse(np.allclose(states[:, 3], states2[:, 3]))

  def test_bidirectional_tower_sees_the_whole_text(self):
    tower = text_tower(depth=1, causal=False)
    a = tower(jnp.array([[5, 6, 7, 2, 0, 0, 0, 0]]))[1][:, 0]
    b = tower(jnp.array([[5, 6, 8, 2, 0, 0, 0, 0]]))[1][:, 0]
    self.assertFalse(np.allclose(a, b))


class ObjectiveStateTest(absltest.TestCase):

  def _dino_batch(self, config):
    rng = np.random.default_rng(0)
    crop = config.input.transforms[0]
    g, l = crop["global_size"], crop["local_size"]
    return {"image": jnp.asarray(rng.normal(size=(4, 2, g, g, 1)), jnp.float32),
            "local_crops": jnp.asarray(rng.normal(size=(4, crop["num_local"], l, l, 1)),
                                       jnp.float32)}

  def test_dino_centre_moves_by_its_momentum(self):
    config = smoke_config("dino")
    objective = build(config)
    batch = self._dino_batch(config)
    before = np.asarray(objective.center[...])
    objective.loss(batch, rng=jax.random.key(0), train=True)
    flat = batch["image"].reshape((-1,) + batch["image"].shape[2:])
    teacher = objective.teacher
    logits = np.asarray(teacher.head(teacher.backbone(flat)[1]["pre_logits"]))
    expected = 0.9 * before + 0.1 * logits.mean(0, keepdims=True)
    np.testing.assert_allclose(objective.center[...], expected, rtol=1e-5, atol=1e-6)
    objective.loss(batch, rng=jax.random.key(0), train=False)  # eval leaves it alone
    np.testing.assert_allclose(objective.center[...], expected, rtol=1e-5, atol=1e-6)

  def test_teacher_is_an_ema_of_the_student_and_gets_no_gradient(self):
    config = smoke_config("dino")
    config.total_steps = 10
    mesh = train.mesh_lib.make_mesh(config.mesh)
    with jax.set_mesh(mesh):
      trainer = train.Trainer(config, mesh, steps_per_epoch=10)
      state = trainer.init_state()
      paths = [jax.tree_util.keystr(p) for p, _ in
               jax.tree_util.tree_flatten_with_path(state["params"])[0]]
      self.assertFalse(any("teacher" in p for p in paths), paths[:5])
      teacher_before = nnx.state(nnx.merge(trainer.graphdef, state["params"],
                                           state["other"]).teacher, nnx.Param)
      teacher_before = jax.tree.map(np.asarray, teacher_before)
      batch = {k: np.asarray(v) for k, v in self._dino_batch(config).items()}
      state, _ = trainer.train_step(state, train.sharding.put_batch(batch, mesh))
      objective = nnx.merge(trainer.graphdef, state["params"], state["other"])
      m = float(distillation.cosine_momentum(jnp.asarray(0), 10, 0.99))
      expected = jax.tree.map(lambda t, s: m * t + (1 - m) * np.asarray(s), teacher_before,
                              nnx.state(objective.student, nnx.Param))
      jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                   expected, nnx.state(objective.teacher, nnx.Param))
      self.assertEqual(int(objective.step[...]), 1)

  def test_mae_reconstruction_pastes_visible_patches(self):
    objective = build(smoke_config("mae"))
    images = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
    recon, mask = objective.reconstruct(images, jax.random.key(1))
    self.assertEqual(recon.shape, images.shape)
    self.assertAlmostEqual(float(mask.mean()), 0.75)
    visible = np.asarray(mask) == 0
    np.testing.assert_allclose(np.asarray(recon)[visible], np.asarray(images)[visible],
                               atol=1e-6)
    grid = masked.render(np.asarray(images), np.asarray(recon), np.asarray(mask))
    self.assertEqual(grid.shape, (16, 24, 3))
    self.assertEqual(grid.dtype, np.uint8)

  def test_swin_is_pretrained_with_mask_tokens(self):
    config = smoke_config("mae")
    config.objective = dict(name="simmim", mask_ratio=0.75)
    config.model = dict(name="swin", num_classes=0, patch_size=2, embed_dim=16, depths=(1, 1),
                        num_heads=(2, 2), window_size=2, image_size=8, channels=1)
    objective = build(config)
    images = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
    pred, mask = objective.predict(images, jax.random.key(1))
    self.assertEqual(pred.shape, (2, 16, 4))
    self.assertAlmostEqual(float(mask.mean()), 0.75)
    # Masks come in blocks of the last stage's stride (2x2 tokens here).
    blocks = np.asarray(mask).reshape(2, 2, 2, 2, 2).transpose(0, 1, 3, 2, 4).reshape(2, 4, 4)
    self.assertTrue(np.all(blocks.min(-1) == blocks.max(-1)))
    # The mask depends on the rng only, and predictions on visible pixels only:
    # changing the pixels of a masked block leaves every prediction unchanged.
    block = int(np.argmax(blocks[0, :, 0]))  # a masked 4x4-pixel block of example 0
    r, c = divmod(block, 2)
    changed = images.at[0, 4 * r:4 * r + 4, 4 * c:4 * c + 4].add(5.0)
    pred2, mask2 = objective.predict(changed, jax.random.key(1))
    np.testing.assert_array_equal(mask, mask2)
    np.testing.assert_allclose(pred, pred2, atol=1e-5)
    loss, _ = objective.loss({"image": images}, rng=jax.random.key(1), train=True)
    self.assertTrue(np.isfinite(float(loss)))

  def test_simmim_on_a_vit_predicts_masked_patches_from_mask_tokens(self):
    config = smoke_config("mae")
    config.objective = dict(name="simmim", mask_ratio=0.5, mask_unit=2)
    objective = build(config)
    images = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
    pred, mask = objective.predict(images, jax.random.key(1))
    n = int(np.prod(objective.grid))
    self.assertEqual(pred.shape, (2, n, objective.patch ** 2))
    self.assertAlmostEqual(float(mask.mean()), 0.5)
    # The encoder saw mask tokens: the pixels under a masked patch change nothing.
    patch = int(np.argmax(np.asarray(mask[0])))
    r, c = divmod(patch, objective.grid[1])
    p = objective.patch
    changed = images.at[0, p * r:p * r + p, p * c:p * c + p].add(5.0)
    np.testing.assert_allclose(pred, objective.predict(changed, jax.random.key(1))[0],
                               atol=1e-5)

  def test_clip_temperature_is_learned_and_clipped(self):
    config = smoke_config("clip")
    objective = build(config)
    self.assertAlmostEqual(float(jnp.exp(objective.log_scale[...])), 1 / 0.07, places=3)
    objective.log_scale[...] = jnp.asarray(10.0)
    _, metrics = objective.pair_loss(jnp.eye(3), jnp.eye(3))
    self.assertAlmostEqual(float(metrics["scale"]), 100.0, places=3)
    objective.after_update(jnp.asarray(0))  # the parameter itself is clamped
    self.assertAlmostEqual(float(objective.log_scale[...]), np.log(100.0), places=5)
    siglip = build(smoke_config("siglip"))
    self.assertAlmostEqual(float(jnp.exp(siglip.log_t[...])), 10.0, places=4)
    self.assertAlmostEqual(float(siglip.bias[...]), -10.0)


TINY_SWIN = {"model": dict(name="swin", num_classes=0, patch_size=2, embed_dim=16, depths=(1,),
                           num_heads=(2,), window_size=4, image_size=8, channels=1)}


class BadInputTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("mae_with_perceiver", "mae", {"model": dict(name="perceiver", num_classes=0)},
       "objective 'mae' needs a backbone that can encode a subset of its patch tokens; "
       "config.model.name='perceiver' cannot"),
      ("mae_with_swin", "mae", TINY_SWIN,
       r"config.model.name='swin' cannot \(backbones that can: vit\); objective 'simmim' "
       r"needs only mask tokens"),
      ("siglip_without_text", "siglip", {"input.transforms": [{"name": "normalize"}]},
       "no 'tokenize' step"),
      ("dino_without_multi_crop", "dino", {"input.transforms": [{"name": "normalize"}]},
       "needs the 'multi_crop' transform"),
      ("clip_with_classifier", "clip", {"model.num_classes": 10},
       "config.model.num_classes must be 0 for 'clip'"),
      ("ibot_with_swin", "ibot", TINY_SWIN,
       r"objective 'ibot' \(it masks patch tokens\) needs a backbone that can output one "
       r"token per input patch; config.model.name='swin' cannot \(backbones that can: vit\)"),
      ("dino_local_crops_with_swin", "dino", TINY_SWIN,
       r"objective 'dino' with local crops needs a backbone that can take images of another "
       r"size.*config.model.name='swin' cannot \(backbones that can: perceiver, vit\); or "
       r"set num_local=0"),
      ("siglip_with_accumulation", "siglip", {"optim.grad_accum_steps": 2},
       "grad_accum_steps=2 with objective 'siglip'"),
      ("dino_with_accumulation", "dino", {"optim.grad_accum_steps": 2},
       "grad_accum_steps=2 with objective 'dino'"),
      ("clip_field_typo", "clip", {"objective.temprature": 0.1},
       "config.objective.temprature is not a field of objective 'clip'; valid fields: "
       "temperature, max_scale, text, embed_dim"),
      ("clip_text_typo", "clip", {"objective.text": dict(widht=16)},
       "config.objective.text.widht is not a field of the text tower"),
  )
  def test_fails_at_start(self, objective, overrides, message):
    config = smoke_config(objective)
    with config.unlocked():
      for key, value in overrides.items():
        target = config
        *parents, leaf = key.split(".")
        for p in parents:
          target = target[p]
        target[leaf] = value
    with self.assertRaisesRegex(ConfigError, message):
      train.train_and_evaluate(config, self.create_tempdir().full_path)


def read_state(workdir, step):
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(os.path.join(workdir, "checkpoints", str(step), "state"))


class ResumeTest(parameterized.TestCase):
  """Stopping after a checkpoint and starting again gives the same run, state
  included (teacher, centre, temperature, optimiser)."""

  @parameterized.named_parameters((name, name) for name in SMOKE)
  def test_exact_resume(self, objective):
    config = smoke_config(objective)
    config.total_steps, config.checkpoint_every_steps = 6, 3
    config.keep_checkpoints, config.log_every_steps = 10, 1
    config.evals = {}  # evaluators are tested elsewhere; this is about the state
    straight = self.create_tempdir().full_path
    train.train_and_evaluate(config, straight)
    # What a run killed after its step-3 checkpoint leaves behind.
    resumed = os.path.join(self.create_tempdir().full_path, "run")
    shutil.copytree(straight, resumed)
    shutil.rmtree(os.path.join(resumed, "checkpoints", "6"))
    with self.assertLogs(level="INFO") as logs:
      train.train_and_evaluate(config, resumed)
    self.assertTrue(any("Resumed from" in m and "at step 3 of 6" in m for m in logs.output),
                    logs.output[:5])
    a, b = read_state(straight, 6), read_state(resumed, 6)
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    self.assertLen(leaves_b, len(leaves_a))
    for x, y in zip(leaves_a, leaves_b):
      np.testing.assert_array_equal(x, y)
    self.assertEqual(helpers.train_losses(straight), helpers.train_losses(resumed))
    self.assertIn("other", a)


if __name__ == "__main__":
  absltest.main()
