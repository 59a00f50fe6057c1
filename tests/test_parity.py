"""Our models compute what the HuggingFace reference computes (float32, 1e-5).

Fixtures are randomly initialised HF models with an input and their outputs,
written by tests/fixtures/make_hf_fixtures.py (re-run it to regenerate).
"""
import json
import os

import numpy as np
from absl.testing import absltest, parameterized

import jax
import jax.numpy as jnp
from flax import nnx

from big_vision_like import train
from big_vision_like.models import convert_hf, perceiver, swin, vit
from big_vision_like.objectives import masked
from big_vision_like.registry import ConfigError
from tests import helpers

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def load_arrays(name):
  """(HF config, state dict, inputs, outputs) of a fixture."""
  with np.load(os.path.join(FIXTURES, f"hf_{name}.npz")) as f:
    arrays = dict(f)
  config = json.loads(arrays.pop("config_json").tobytes())
  part = lambda prefix: {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
  return config, part("param/"), part("input/"), part("output/")


def load_fixture(name):
  config, params, inputs, outputs = load_arrays(name)
  return config, params, inputs["pixel_values_nhwc"], outputs


def legacy_names(state_dict, mlp=True):
  """The same weights under transformers-4 names (as most published checkpoints have).

  DINOv2's MLP kept its names (`mlp=False`).
  """
  renames = [(".attention.q_proj", ".attention.attention.query"),
             (".attention.k_proj", ".attention.attention.key"),
             (".attention.v_proj", ".attention.attention.value"),
             (".attention.o_proj", ".attention.output.dense")]
  if mlp:
    renames += [(".mlp.fc1", ".intermediate.dense"), (".mlp.fc2", ".output.dense")]
  out = {}
  for key, value in state_dict.items():
    for new, old in renames:
      key = key.replace(new, old)
    out[key.replace("vit.layers.", "vit.encoder.layer.")] = value
  return out


class ViTParityTest(parameterized.TestCase):

  @parameterized.product(name=["vit_a", "vit_b"], legacy=[False, True])
  def test_matches_hf_vit(self, name, legacy):
    config, state_dict, images, expected = load_fixture(name)
    if legacy:
      state_dict = legacy_names(state_dict)
    kwargs, params = convert_hf.load_hf_vit(state_dict, config)
    with nnx.use_eager_sharding(False):
      model = vit.ViT(**kwargs, rngs=nnx.Rngs(0))
    convert_hf.assign(model, params, where=f"HF {name}")
    logits, aux = model(jax.numpy.asarray(images))
    np.testing.assert_allclose(logits, expected["logits"], atol=1e-5, rtol=0)
    tokens = np.concatenate([np.asarray(aux["pre_logits"])[:, None], aux["tokens"]], axis=1)
    np.testing.assert_allclose(tokens, expected["last_hidden_state"], atol=1e-5, rtol=0)

  def test_shape_mismatch_names_the_parameter(self):
    config, state_dict, _, _ = load_fixture("vit_a")
    kwargs, params = convert_hf.load_hf_vit(state_dict, config)
    kwargs["mlp_dim"] = 32
    with nnx.use_eager_sharding(False):
      model = vit.ViT(**kwargs, rngs=nnx.Rngs(0))
    with self.assertRaisesRegex(ConfigError, r"parameter blocks/0/mlp/fc1/bias has shape "
                                r"\(64,\) but the config builds \(32,\)"):
      convert_hf.assign(model, params, where="checkpoint")


def legacy_swin_names(state_dict):
  out = {}
  for key, value in state_dict.items():
    for new, old in ((".attention.q_proj", ".attention.self.query"),
                     (".attention.k_proj", ".attention.self.key"),
                     (".attention.v_proj", ".attention.self.value"),
                     (".attention.relative_position_bias.relative_position_bias_table",
                      ".attention.self.relative_position_bias_table"),
                     (".attention.o_proj", ".attention.output.dense"),
                     (".mlp.fc1", ".intermediate.dense"), (".mlp.fc2", ".output.dense")):
      key = key.replace(new, old)
    out[key] = value
  return out


class SwinParityTest(parameterized.TestCase):

  @parameterized.product(name=["swin_a", "swin_b"], legacy=[False, True])
  def test_matches_hf_swin(self, name, legacy):
    config, state_dict, images, expected = load_fixture(name)
    if legacy:
      state_dict = legacy_swin_names(state_dict)
    kwargs, params = convert_hf.load_hf_swin(state_dict, config)
    with nnx.use_eager_sharding(False):
      model = swin.Swin(**kwargs, rngs=nnx.Rngs(0))
    convert_hf.assign(model, params, where=f"HF {name}")
    logits, aux = model(jax.numpy.asarray(images))
    np.testing.assert_allclose(logits, expected["logits"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(aux["tokens"], expected["last_hidden_state"], atol=1e-5, rtol=0)
    for i, stage in enumerate(aux["stages"]):  # HF reports each stage after its merge
      merge = model.stages[i].merge
      ours = merge(stage) if merge is not None else stage
      np.testing.assert_allclose(ours, expected[f"stage_{i}"], atol=1e-5, rtol=0)


class PerceiverParityTest(parameterized.TestCase):

  @parameterized.parameters("perceiver_learned", "perceiver_fourier")
  def test_matches_hf_perceiver(self, name):
    config, state_dict, images, expected = load_fixture(name)
    kwargs, params = convert_hf.load_hf_perceiver(state_dict, config)
    with nnx.use_eager_sharding(False):
      model = perceiver.Perceiver(**kwargs, rngs=nnx.Rngs(0))
    convert_hf.assign(model, params, where=f"HF {name}")
    logits, aux = model(jax.numpy.asarray(images))
    np.testing.assert_allclose(aux["latents"], expected["latents"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(logits, expected["logits"], atol=1e-5, rtol=0)

  def test_other_preprocessors_refused(self):
    """ConvProcessing's conv + batch norm (its Fourier features at 56 x 56) is not read
    as the Fourier classifier's raw pixels."""
    config, state_dict, _, _ = load_fixture("perceiver_fourier")
    state_dict["perceiver.input_preprocessor.convnet.conv.weight"] = np.ones((64, 3, 7, 7))
    with self.assertRaisesRegex(ConfigError, r"^HF Perceiver preprocessor tensor "
                                r"input_preprocessor.convnet.conv.weight does not map"):
      convert_hf.load_hf_perceiver(state_dict, config)


def build_objective(model, objective, text_len=None):
  """Our objective from a converter's config fields, on the tiny default config.

  Image-text objectives get the bytes tokenizer (vocab 259) at the fixture's length.
  """
  config = helpers.tiny_config()
  config.model = model
  config.objective = objective
  if text_len:
    config.input.transforms = [{"name": "tokenize"}]
    config.input.tokenizer.max_len = text_len
  with nnx.use_eager_sharding(False):
    return train.build_objective(config, seed=0)


class ImageTextParityTest(parameterized.TestCase):
  """Our clip / siglip objectives embed and score pairs as HF CLIPModel / SiglipModel."""

  def check(self, name, load, logits_fn):
    config, state_dict, inputs, expected = load_arrays(name)
    model, objective, params = load(state_dict, config)
    obj = build_objective(model, objective, config["text_config"]["max_position_embeddings"])
    convert_hf.assign(obj, params, where=f"HF {name}")
    image = obj.embed_image(jnp.asarray(inputs["pixel_values_nhwc"]))
    text = obj.embed_text(jnp.asarray(inputs["input_ids"]))
    np.testing.assert_allclose(image, expected["image_embeds"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(text, expected["text_embeds"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(logits_fn(obj, image, text), expected["logits_per_image"],
                               atol=1e-5, rtol=0)
    loss, _ = obj.pair_loss(image, text)
    np.testing.assert_allclose(loss, expected["loss"], atol=1e-5, rtol=0)

  def test_matches_hf_clip(self):
    self.check("clip", convert_hf.load_hf_clip,
               lambda obj, image, text: jnp.exp(obj.log_scale[...]) * image @ text.T)

  def test_matches_hf_siglip(self):
    self.check("siglip", convert_hf.load_hf_siglip,
               lambda obj, image, text: jnp.exp(obj.log_t[...]) * image @ text.T + obj.bias[...])


def legacy_dinov2_names(state_dict, prefix=""):
  """transformers-4 names, as published checkpoints have them: the attention renamed
  and a SwiGLU packed into `weights_in` (gate rows first) and `weights_out`."""
  out = legacy_names(state_dict, mlp=False)
  for key in [k for k in out if ".mlp.gate_proj." in k]:
    p, kind = key.split(".mlp.gate_proj.")
    out[f"{p}.mlp.weights_in.{kind}"] = np.concatenate(
        [out.pop(key), out.pop(f"{p}.mlp.up_proj.{kind}")])
    out[f"{p}.mlp.weights_out.{kind}"] = out.pop(f"{p}.mlp.down_proj.{kind}")
  return {prefix + k: v for k, v in out.items()}


class Dinov2ParityTest(parameterized.TestCase):
  """Dinov2Model, its SwiGLU / bias-free variant and Dinov2WithRegistersModel: the whole
  sequence [class, registers, patches], with a mask, and at other input sizes
  (HF's bicubic position resampling, antialiased for the registers model)."""

  @parameterized.product(name=["dinov2", "dinov2_swiglu", "dinov2_registers"],
                         legacy=[False, True])
  def test_matches_hf_dinov2(self, name, legacy):
    config, state_dict, inputs, expected = load_arrays(name)
    mask_token = jnp.asarray(state_dict["embeddings.mask_token"][0])
    if legacy:  # with the prefix a *ForImageClassification checkpoint's backbone has
      state_dict = legacy_dinov2_names(
          state_dict, "dinov2_with_registers." if "registers" in name else "dinov2.")
    kwargs, params = convert_hf.load_hf_dinov2(state_dict, config)
    with nnx.use_eager_sharding(False):
      model = vit.ViT(**kwargs, rngs=nnx.Rngs(0))
    convert_hf.assign(model, params, where=f"HF {name}")

    def check(images, want, **mask):
      x, _ = model.embed(jnp.asarray(images), **mask)
      np.testing.assert_allclose(model.encode_tokens(x), want, atol=1e-5, rtol=0)
      _, aux = model(jnp.asarray(images), **mask)
      np.testing.assert_allclose(aux["pre_logits"], want[:, 0], atol=1e-5, rtol=0)
      np.testing.assert_allclose(aux["tokens"], want[:, model.num_prefix_tokens:], atol=1e-5,
                                 rtol=0)

    check(inputs["pixel_values_nhwc"], expected["last_hidden_state"])
    # bool_masked_pos: the mask token replaces patch embeddings before the positions
    check(inputs["pixel_values_nhwc"], expected["masked_last_hidden_state"],
          token_mask=jnp.asarray(inputs["bool_masked_pos"]), mask_token=mask_token)
    for size in ("large", "small"):
      if f"pixel_values_{size}_nhwc" in inputs:
        check(inputs[f"pixel_values_{size}_nhwc"], expected[f"{size}_last_hidden_state"])

  def test_options_of_the_variants(self):
    config, state_dict, _, _ = load_arrays("dinov2_swiglu")
    kwargs, params = convert_hf.load_hf_dinov2(state_dict, config)
    self.assertEqual((kwargs["mlp"], kwargs["mlp_dim"], kwargs["qkv_bias"]), ("swiglu", 48, False))
    self.assertNotIn("bias", params["blocks"][0]["attn"]["query"])
    config, state_dict, _, _ = load_arrays("dinov2_registers")
    kwargs, _ = convert_hf.load_hf_dinov2(state_dict, config)
    self.assertEqual((kwargs["num_registers"], kwargs["posemb_resample"]),
                     (4, "bicubic_antialias"))
    with self.assertRaisesRegex(ConfigError, r"^HF DINOv2 config num_register_tokens=2 does not "
                                             r"match the checkpoint's embeddings.register_tokens"):
      convert_hf.load_hf_dinov2(state_dict, dict(config, num_register_tokens=2))


class MaeParityTest(parameterized.TestCase):
  """Same noise, same mask: our mae predicts HF ViTMAEForPreTraining's patches and loss."""

  @parameterized.product(name=["mae_a", "mae_b"], legacy=[False, True])
  def test_matches_hf_mae(self, name, legacy):
    config, state_dict, inputs, expected = load_arrays(name)
    if legacy:
      state_dict = legacy_names(state_dict)
    model, objective, params = convert_hf.load_hf_mae(state_dict, config)
    obj = build_objective(model, objective)
    convert_hf.assign(obj, params, where=f"HF {name}")
    images = jnp.asarray(inputs["pixel_values_nhwc"])
    pred, mask = obj.predict(images, jax.random.key(0), noise=jnp.asarray(inputs["noise"]))
    np.testing.assert_array_equal(mask, expected["mask"])
    np.testing.assert_allclose(pred, expected["logits"], atol=1e-5, rtol=0)
    loss = masked.masked_mse(pred, masked.pixel_targets(images, obj.patch, obj.norm_pix), mask)
    np.testing.assert_allclose(loss, expected["loss"], atol=1e-5, rtol=0)

  def test_decoder_class_position_must_be_zero(self):
    config, state_dict, _, _ = load_arrays("mae_a")
    state_dict["decoder.decoder_pos_embed"] = state_dict["decoder.decoder_pos_embed"] + 0.1
    with self.assertRaisesRegex(ConfigError, "non-zero class-token position"):
      convert_hf.load_hf_mae(state_dict, config)


if __name__ == "__main__":
  absltest.main()
