"""Our models compute what the HuggingFace reference computes (float32, 1e-5).

Fixtures are randomly initialised HF models with an input and their outputs,
written by tests/fixtures/make_hf_fixtures.py (re-run it to regenerate).
"""
import json
import os

import numpy as np
from absl.testing import absltest, parameterized

import jax
from flax import nnx

from big_vision_like.models import convert_hf, perceiver, swin, vit
from big_vision_like.registry import ConfigError

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def load_fixture(name):
  with np.load(os.path.join(FIXTURES, f"hf_{name}.npz")) as f:
    arrays = dict(f)
  config = json.loads(arrays.pop("config_json").tobytes())
  params = {k[len("param/"):]: v for k, v in arrays.items() if k.startswith("param/")}
  outputs = {k[len("output/"):]: v for k, v in arrays.items() if k.startswith("output/")}
  return config, params, arrays["input/pixel_values_nhwc"], outputs


def legacy_names(state_dict):
  """The same weights under transformers-4 names (as most published checkpoints have)."""
  out = {}
  for key, value in state_dict.items():
    for new, old in ((".attention.q_proj", ".attention.attention.query"),
                     (".attention.k_proj", ".attention.attention.key"),
                     (".attention.v_proj", ".attention.attention.value"),
                     (".attention.o_proj", ".attention.output.dense"),
                     (".mlp.fc1", ".intermediate.dense"), (".mlp.fc2", ".output.dense")):
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


if __name__ == "__main__":
  absltest.main()
