"""Every backbone keeps the contract of models/backbone.py, every objective names its
backbone the same way, and the capabilities a backbone declares are the ones it has."""
from __future__ import annotations

from absl.testing import absltest, parameterized
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from big_vision_like import configuration, train
from big_vision_like.models import MODELS, backbone as backbone_lib
from big_vision_like.objectives import OBJECTIVES
from big_vision_like.registry import ConfigError

TINY = {
    "vit": dict(name="vit", patch_size=2, width=16, depth=1, mlp_dim=32, num_heads=2,
                image_size=8, channels=1),
    "vit_gap": dict(name="vit", patch_size=2, width=16, depth=1, mlp_dim=32, num_heads=2,
                    image_size=8, channels=1, pool="gap"),
    "swin": dict(name="swin", patch_size=2, embed_dim=16, depths=(1, 1), num_heads=(2, 2),
                 window_size=2, image_size=8, channels=1),
    "perceiver": dict(name="perceiver", image_size=8, channels=1, num_latents=4,
                      latent_dim=16, num_blocks=1, self_attends_per_block=1, self_heads=2,
                      num_bands=2, qk_channels=8),
}


def build(kind, **changes):
  args = dict(TINY[kind], **{"num_classes": 0, **changes})
  with nnx.use_eager_sharding(False):
    return MODELS.build(args.pop("name"), args, rngs=nnx.Rngs(0))


def images(model, size=None):
  h, w = size or model.image_size
  return jax.random.normal(jax.random.key(1), (2, h, w, model.channels))


class ContractTest(parameterized.TestCase):

  @parameterized.parameters("vit", "vit_gap", "swin", "perceiver")
  def test_outputs_and_attributes(self, kind):
    model = build(kind)
    output, out = model(images(model))
    self.assertEqual(out["pre_logits"].shape, (2, model.width))
    np.testing.assert_array_equal(output, out["pre_logits"])  # no head: pre_logits
    self.assertEqual(tuple(out["grid"]), tuple(model.grid))
    for name in ("width", "channels", "image_size", "patch_size", "grid"):
      self.assertTrue(hasattr(model, name), name)
    self.assertLessEqual(model.capabilities, set(backbone_lib.CAPABILITIES))
    if "tokens" in out:
      self.assertEqual(out["tokens"].shape[-1], model.width)
    with_head = build(kind, num_classes=3)
    logits, _ = with_head(images(with_head))
    self.assertEqual((logits.shape, logits.dtype), ((2, 3), jnp.float32))

  @parameterized.parameters("vit", "vit_gap", "swin")
  def test_mask_tokens_replace_the_masked_patches(self, kind):
    model = build(kind)
    self.assertIn("mask_tokens", model.capabilities)
    x = images(model)
    n = int(np.prod(model.patch_grid))
    mask = jnp.zeros((2, n), bool).at[:, 0].set(True)
    token = jnp.ones((model.embed_width,))
    _, out = model(x, token_mask=mask, mask_token=token)
    # What is under a masked patch no longer matters; the output grid is the
    # image over token_stride.
    p = model.patch_size
    _, changed = model(x.at[:, :p, :p].add(3.0), token_mask=mask, mask_token=token)
    np.testing.assert_allclose(out["tokens"], changed["tokens"], atol=1e-5)
    _, unmasked = model(x)
    self.assertGreater(float(jnp.abs(out["tokens"] - unmasked["tokens"]).max()), 1e-4)
    self.assertEqual(tuple(out["grid"]), tuple(s // model.token_stride for s in x.shape[1:3]))

  @parameterized.parameters("vit", "vit_gap")
  def test_encode_tokens_of_all_patches_is_the_forward_pass(self, kind):
    model = build(kind)
    self.assertIn("drop_tokens", model.capabilities)
    x = images(model)
    tokens, grid = model.embed(x)
    self.assertEqual(tokens.shape[1], int(np.prod(grid)))
    encoded = model.encode_tokens(tokens)
    _, out = model(x)
    np.testing.assert_allclose(encoded[:, model.num_prefix_tokens:][:, -out["tokens"].shape[1]:],
                               out["tokens"], atol=1e-5)
    subset = model.encode_tokens(tokens[:, :3])
    self.assertEqual(subset.shape, (2, model.num_prefix_tokens + 3, model.width))

  @parameterized.parameters("vit", "perceiver")
  def test_any_image_size(self, kind):
    model = build(kind)
    self.assertIn("any_image_size", model.capabilities)
    _, out = model(images(model, (4, 4)))
    self.assertEqual(out["pre_logits"].shape, (2, model.width))

  def test_declared_capabilities_are_exact(self):
    # Those a backbone does not declare, it really lacks.
    swin = build("swin")
    with self.assertRaisesRegex(ConfigError, "Swin was built for 8x8"):
      swin(images(swin, (4, 4)))
    self.assertFalse(hasattr(swin, "encode_tokens"))
    _, out = swin(images(swin))
    self.assertNotEqual(out["tokens"].shape[1], int(np.prod(swin.patch_grid)))  # not per patch
    learned = build("perceiver", posemb="learn")
    self.assertNotIn("any_image_size", learned.capabilities)
    with self.assertRaisesRegex(ConfigError, "learned Perceiver position embeddings"):
      learned(images(learned, (4, 4)))

  def test_stages_of_a_hierarchy(self):
    swin = build("swin")
    _, out = swin(images(swin))
    self.assertEqual([s.shape[-1] for s in out["stages"]], list(swin.widths))
    self.assertEqual(out["stages"][-1].shape[1:3], tuple(swin.grid))
    _, vit_out = build("vit")(images(build("vit")))
    self.assertNotIn("stages", vit_out)
    from big_vision_like.models.heads import HEADS  # pylint: disable=g-import-not-at-top
    with self.assertRaisesRegex(ConfigError, r"^config.objective.head='fpn' needs a backbone "
                                             r"that can give the feature map of every stage of "
                                             r"a hierarchy; config.model.name='vit' cannot "
                                             r"\(backbones that can: swin\)$"):
      HEADS.build("fpn", {}, backbone=build("vit"), num_classes=2, rngs=nnx.Rngs(0))

  def test_require_names_the_capability_and_who_has_it(self):
    with self.assertRaisesRegex(
        ConfigError, r"^objective 'x' needs a backbone that can encode a subset of its patch "
                     r"tokens; config.model.name='perceiver' cannot \(backbones that can: vit\)$"):
      backbone_lib.require(build("perceiver"), "drop_tokens", by="objective 'x'",
                           name="perceiver")
    with self.assertRaisesRegex(ConfigError, r"'perceiver' cannot here \(backbones that can: "
                                             r"perceiver, vit\)"):
      backbone_lib.require(build("perceiver", posemb="learn"), "any_image_size", by="y",
                           name="perceiver")


def objective_config(name, objective, model="vit"):
  config = configuration.defaults()
  config.input.transforms = [{"name": "normalize"}]
  config.model = dict(TINY[model], num_classes=0)
  config.objective = dict(name=name, **objective)
  if name in ("supervised", "probe"):
    config.model.num_classes = 3
  if name in ("clip", "siglip"):
    config.input.transforms = [{"name": "normalize"}, {"name": "tokenize"}]
    config.input.tokenizer = dict(name="bytes", max_len=8)
    config.objective.text = dict(width=16, depth=1, num_heads=2)
  if name in ("dino", "ibot"):
    config.input.transforms = [{"name": "multi_crop", "global_size": 8, "local_size": 4,
                                "num_local": 0}]
    config.objective.update(out_dim=8, hidden_dim=8, bottleneck_dim=4)
  return config


OBJECTIVE_CASES = {
    "supervised": {}, "clip": {}, "siglip": {}, "mae": dict(decoder_width=8, decoder_depth=1,
                                                          decoder_heads=2),
    "simmim": dict(mask_unit=2), "dino": {}, "ibot": {},
    "segmentation": dict(num_classes=3), "probe": {},
}


class ObjectiveBackboneTest(parameterized.TestCase):

  def test_every_objective_is_covered(self):
    self.assertCountEqual(OBJECTIVE_CASES, OBJECTIVES.names())

  @parameterized.parameters(*OBJECTIVE_CASES)
  def test_backbone_is_found_the_same_way(self, name):
    config = objective_config(name, OBJECTIVE_CASES[name])
    with nnx.use_eager_sharding(False):
      objective = train.build_objective(config, seed=0, total_steps=10)
    backbone = objective.backbone
    self.assertIn("mask_tokens", backbone.capabilities)  # the ViT of the config
    # `backbone_path` leads to the same module in the objective's state.
    state = nnx.state(objective)
    for key in objective.backbone_path:
      state = state[key]
    jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(state),
                 nnx.to_pure_dict(nnx.state(backbone)))

  def test_objectives_see_only_the_config_they_declare(self):
    config = objective_config("supervised", {})
    view = train._objective_view(config, OBJECTIVES.get("supervised").reads)
    self.assertEqual(set(view.keys()), {"model", "objective"})
    dino = train._objective_view(objective_config("dino", {}),
                                 OBJECTIVES.get("dino").reads)
    self.assertEqual(set(dino.keys()), {"model", "objective", "input", "optim"})
    self.assertEqual(set(dino.input.keys()), {"transforms", "batch_size"})
    self.assertEqual(dino.optim.grad_accum_steps, 1)
    self.assertIsInstance(dino, ml_collections.ConfigDict)


if __name__ == "__main__":
  absltest.main()
