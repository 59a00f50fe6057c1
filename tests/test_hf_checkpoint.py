"""HuggingFace / timm checkpoint directories read, convert and compute what the reference
computes (float32, 1e-5), and every refusal is one line naming what is wrong.

Fixtures are tiny random models saved by save_pretrained / timm's save_for_hf, with an
input and the reference outputs: tests/fixtures/make_hf_dirs.py (re-run it to regenerate).
"""
import json
import os
import shutil
from unittest import mock

import numpy as np
import safetensors
import safetensors.numpy
from absl.testing import absltest, parameterized

import jax
import jax.numpy as jnp
import ml_dtypes
from flax import nnx

from big_vision_like import train, transfer
from big_vision_like.models import MODELS, convert_hf, hf_checkpoint
from big_vision_like.objectives import masked
from big_vision_like.registry import ConfigError
from tests import fake_gcs, helpers, test_parity

DIRS = os.path.join(os.path.dirname(__file__), "fixtures", "hf_dirs")
NAMES = ["vit", "vit_sharded", "dinov2", "clip_vision", "siglip_vision", "timm_vit",
         "timm_vit_b", "timm_vit_gap", "timm_vit_reg", "timm_vit_reg_g"]


def build(converted):
  """Our backbone from the converted config.model, with the converted parameters.

  Built abstractly (no init): `assign` sets every parameter or names the one missing.
  """
  model = dict(converted.model)
  name = model.pop("name")
  with nnx.use_eager_sharding(False):
    backbone = nnx.eval_shape(lambda: MODELS.build(name, model, rngs=nnx.Rngs(0)))
  convert_hf.assign(backbone, converted.params["backbone"], where=converted.description)
  return backbone


def build_objective(converted):
  """The converted objective on the tiny default config, built abstractly as `build`."""
  config = helpers.tiny_config()
  config.model, config.objective = converted.model, converted.objective
  with nnx.use_eager_sharding(False):
    objective = nnx.eval_shape(lambda: train.build_objective(config, seed=0))
  convert_hf.assign(objective, converted.params, where=converted.description)
  return objective


def forward(backbone, images):
  """`backbone(images)`, jitted: one compilation is quicker here than op-by-op dispatch."""
  graphdef, state = nnx.split(backbone)
  return jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))(state, images)


class ParityTest(parameterized.TestCase):

  @parameterized.named_parameters((name, name) for name in NAMES)
  def test_matches_reference(self, name):
    directory = os.path.join(DIRS, name)
    self.assertTrue(hf_checkpoint.is_checkpoint_directory(directory))
    converted = hf_checkpoint.convert(hf_checkpoint.read(directory))
    self.assertIsNone(converted.objective)
    with np.load(os.path.join(directory, "expected.npz")) as f:
      expected = dict(f)
    logits, aux = forward(build(converted), jnp.asarray(expected["pixel_values_nhwc"]))
    np.testing.assert_allclose(aux["tokens"], expected["tokens"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(aux["pre_logits"], expected["pre_logits"], atol=1e-5, rtol=0)
    if "logits" in expected:
      np.testing.assert_allclose(logits, expected["logits"], atol=1e-5, rtol=0)

  def test_description_and_unused(self):
    converted = hf_checkpoint.convert(hf_checkpoint.read(os.path.join(DIRS, "vit")))
    self.assertEqual(converted.description,
                     "HF ViTForImageClassification (model_type 'vit'), 2 layers, width 32")
    converted = hf_checkpoint.convert(hf_checkpoint.read(os.path.join(DIRS, "dinov2")))
    self.assertEqual(converted.unused, ("embeddings.mask_token",))

  def test_sharded_reads_as_one_file(self):
    one, sharded = (hf_checkpoint.read(os.path.join(DIRS, n)) for n in ("vit", "vit_sharded"))
    self.assertGreater(len(os.listdir(os.path.join(DIRS, "vit_sharded"))), 4)
    self.assertEqual(sorted(one.tensors), sorted(sharded.tensors))
    for key, value in one.tensors.items():
      np.testing.assert_array_equal(sharded.tensors[key], value, err_msg=key)

  def test_bfloat16_tensors(self):
    directory = self.create_tempdir().full_path
    shutil.copy(os.path.join(DIRS, "vit", "config.json"), directory)
    value = np.arange(6, dtype=np.float32).reshape(2, 3).astype(ml_dtypes.bfloat16)
    if hasattr(safetensors, "TensorSpec"):  # safetensors >= 0.8
      spec = safetensors.TensorSpec(dtype="bfloat16", shape=[2, 3], data_ptr=value.ctypes.data,
                                    data_len=value.nbytes)
    else:
      spec = {"dtype": "BF16", "shape": [2, 3], "data": value.tobytes()}
    safetensors.serialize_file({"x": spec}, os.path.join(directory, "model.safetensors"))
    tensors = hf_checkpoint.read(directory).tensors
    self.assertEqual(tensors["x"].dtype, ml_dtypes.bfloat16)
    np.testing.assert_array_equal(tensors["x"].astype(np.float32), value.astype(np.float32))


class RemoteTest(absltest.TestCase):

  def test_reads_from_a_bucket(self):
    """gs:// through etils.epath (gcsfs), against tests/fake_gcs.py."""
    self.enter_context(mock.patch.dict(os.environ))  # restored after the test
    with fake_gcs.FakeGcs(["bkt"]) as gcs:
      os.environ.update(gcs.environment())
      self.addCleanup(_forget_gcsfs_clients)  # they would keep this server's address
      source = os.path.join(DIRS, "vit_sharded")
      for name in os.listdir(source):
        with open(os.path.join(source, name), "rb") as f:
          gcs.objects[("bkt", f"ckpt/{name}")] = (f.read(), 1)
      self.assertTrue(hf_checkpoint.is_checkpoint_directory("gs://bkt/ckpt"))
      remote = hf_checkpoint.read("gs://bkt/ckpt")
      self.assertFalse(hf_checkpoint.is_checkpoint_directory("gs://bkt/none"))
      with self.assertRaisesRegex(ConfigError, r"gs://bkt/none: no such directory"):
        hf_checkpoint.read("gs://bkt/none")
      self.assertEqual(gcs.errors, [])
    self.assertEqual(remote.path, "gs://bkt/ckpt")
    local = hf_checkpoint.read(source).tensors
    self.assertEqual(sorted(remote.tensors), sorted(local))
    for key, value in local.items():
      np.testing.assert_array_equal(remote.tensors[key], value, err_msg=key)


def _forget_gcsfs_clients():
  import gcsfs  # pylint: disable=g-import-not-at-top
  gcsfs.GCSFileSystem.clear_instance_cache()


class VisionTowerTest(parameterized.TestCase):
  """The vision-only loaders give the image tower of load_hf_clip / load_hf_siglip."""

  @parameterized.product(name=["clip", "siglip"], prefixed=[True, False])
  def test_equals_image_tower(self, name, prefixed):
    config, state_dict, _, _ = test_parity.load_arrays(name)
    full = {"clip": convert_hf.load_hf_clip, "siglip": convert_hf.load_hf_siglip}[name]
    alone = {"clip": convert_hf.load_hf_clip_vision,
             "siglip": convert_hf.load_hf_siglip_vision}[name]
    model, _, params = full(state_dict, config)
    vision = {k if prefixed else k[len("vision_model."):]: v for k, v in state_dict.items()
              if k.startswith("vision_model.")}
    kwargs, backbone = alone(vision, config["vision_config"])
    self.assertEqual(dict(name="vit", **kwargs), model)
    self.assertEqual(sorted(flat(backbone)), sorted(flat(params["backbone"])))
    for path, value in flat(params["backbone"]).items():
      np.testing.assert_array_equal(flat(backbone)[path], value, err_msg=str(path))


def flat(tree):
  return dict(convert_hf._flatten(tree))  # pylint: disable=protected-access


# What transformers 5.24's save_pretrained writes for ViTMAEForPreTraining -> the other
# namings of the same tensors: the published one (transformers 4, which 5 reads too:
# only the decoder's layers differ) and transformers 5's in-memory one.
_MAE_NAMES = {
    "transformers_4": [("decoder.decoder_encoder.layer.", "decoder.decoder_layers.")],
    "in_memory": [("decoder.decoder_encoder.layer.", "decoder.decoder_layers."),
                  ("vit.encoder.layer.", "vit.layers."),
                  (".attention.attention.query.", ".attention.q_proj."),
                  (".attention.attention.key.", ".attention.k_proj."),
                  (".attention.attention.value.", ".attention.v_proj."),
                  (".attention.output.dense.", ".attention.o_proj."),
                  (".intermediate.dense.", ".mlp.fc1."), (".output.dense.", ".mlp.fc2.")],
}


class MaeDirectoryTest(parameterized.TestCase):
  """ViTMAEForPreTraining as save_pretrained leaves it: our mae objective, the same
  noise and mask, computes HF's encoder output, patches and loss."""

  def test_matches_reference(self):
    converted = hf_checkpoint.convert(hf_checkpoint.read(os.path.join(DIRS, "vit_mae")))
    self.assertEqual(converted.objective["name"], "mae")
    with np.load(os.path.join(DIRS, "vit_mae", "expected.npz")) as f:
      expected = dict(f)
    graphdef, state = nnx.split(build_objective(converted))

    @jax.jit
    def run(state, images, noise):
      obj = nnx.merge(graphdef, state)
      pred, mask = obj.predict(images, jax.random.key(0), noise=noise)
      loss = masked.masked_mse(pred, masked.pixel_targets(images, obj.patch, obj.norm_pix),
                               mask)
      x, _ = obj.backbone.embed(images)
      keep, _, _ = masked.random_masking(noise, obj.mask_ratio)
      encoded = obj.backbone.encode_tokens(jnp.take_along_axis(x, keep[..., None], axis=1))
      return pred, mask, loss, encoded

    pred, mask, loss, encoded = run(state, jnp.asarray(expected["pixel_values_nhwc"]),
                                    jnp.asarray(expected["noise"]))
    np.testing.assert_array_equal(mask, expected["mask"])
    np.testing.assert_allclose(pred, expected["logits"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(loss, expected["loss"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(encoded, expected["encoded"], atol=1e-5, rtol=0)

  @parameterized.parameters("transformers_4", "in_memory")
  def test_other_names_convert_identically(self, naming):
    source = os.path.join(DIRS, "vit_mae")
    tensors = safetensors.numpy.load_file(os.path.join(source, "model.safetensors"))
    self.assertTrue(any(k.startswith("decoder.decoder_encoder.layer.0.") for k in tensors))
    renamed = {}
    for key, value in tensors.items():
      for old, new in _MAE_NAMES[naming]:
        key = key.replace(old, new)
      renamed[key] = value
    directory = self.create_tempdir().full_path
    shutil.copy(os.path.join(source, "config.json"), directory)
    safetensors.numpy.save_file(renamed, os.path.join(directory, "model.safetensors"))
    want = hf_checkpoint.convert(hf_checkpoint.read(source))
    got = hf_checkpoint.convert(hf_checkpoint.read(directory))
    self.assertEqual((got.model, got.objective), (want.model, want.objective))
    self.assertEqual(sorted(flat(got.params)), sorted(flat(want.params)))
    for path, value in flat(want.params).items():
      np.testing.assert_array_equal(flat(got.params)[path], value, err_msg=str(path))

  def test_init_takes_the_encoder(self):
    """config.init.path at it: this run's backbone loads the whole encoder, nothing else."""
    converted = hf_checkpoint.convert(hf_checkpoint.read(os.path.join(DIRS, "vit_mae")))
    config = helpers.tiny_config(**{"init.path": os.path.join(DIRS, "vit_mae")})
    config.model = dict(converted.model, num_classes=3)
    plan = transfer.plan(config)
    encoder = {("hf", "backbone") + path for path in flat(converted.params["backbone"])}
    self.assertEqual({key for move in plan.moves.values() for key, _ in move.sources},
                     encoder)
    self.assertEqual(plan.unused, [])  # of the backbone
    self.assertEqual(plan.rows["left at init"],
                     ["backbone/head/bias (not in the source)",
                      "backbone/head/kernel (not in the source)"])


class DispatchTest(parameterized.TestCase):
  """convert() gives what convert_hf's loader for the model_type gives."""

  @parameterized.named_parameters(
      ("vit", "vit_a", "load_hf_vit", "vit"), ("swin", "swin_a", "load_hf_swin", "swin"),
      ("perceiver", "perceiver_learned", "load_hf_perceiver", "perceiver"),
      ("clip", "clip", "load_hf_clip", None), ("siglip", "siglip", "load_hf_siglip", None),
      ("mae", "mae_a", "load_hf_mae", None))
  def test_same_as_loader(self, fixture, loader, backbone):
    config, state_dict, _, _ = test_parity.load_arrays(fixture)
    directory = self.create_tempdir()
    directory.create_file("config.json", json.dumps(config))
    safetensors.numpy.save_file(state_dict, os.path.join(directory.full_path, "model.safetensors"))
    converted = hf_checkpoint.convert(hf_checkpoint.read(directory.full_path))
    expected = getattr(convert_hf, loader)(state_dict, config)
    if backbone:  # (kwargs, backbone params)
      expected = (dict(name=backbone, **expected[0]), None, {"backbone": expected[1]})
    self.assertEqual(converted.model, expected[0])
    self.assertEqual(converted.objective, expected[1])
    self.assertEqual(sorted(flat(converted.params)), sorted(flat(expected[2])))
    for path, value in flat(expected[2]).items():
      np.testing.assert_array_equal(flat(converted.params)[path], value, err_msg=str(path))

  def test_clip_with_projection(self):
    plain = hf_checkpoint.convert(hf_checkpoint.read(os.path.join(DIRS, "clip_vision")))
    directory = copy_dir(self, "clip_vision",
                         {"architectures": ["CLIPVisionModelWithProjection"]},
                         {"visual_projection.weight": np.ones((8, 16), np.float32)})
    converted = hf_checkpoint.convert(hf_checkpoint.read(directory))
    self.assertEqual(converted.unused, ("visual_projection.weight",))
    self.assertEqual(converted.model, plain.model)
    self.assertEqual(sorted(flat(converted.params)), sorted(flat(plain.params)))


def copy_dir(test, name, config=None, tensors=None):
  """A copy of fixture `name` with config.json updated by `config` and tensors by `tensors`
  (a value None removes the tensor)."""
  directory = test.create_tempdir().full_path
  source = os.path.join(DIRS, name)
  with open(os.path.join(source, "config.json")) as f:
    cfg = json.load(f)
  for key, value in (config or {}).items():
    target, *path, leaf = cfg, *key.split(".")
    for part in path:
      target = target.setdefault(part, {})
    target[leaf] = value
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(cfg, f)
  state = safetensors.numpy.load_file(os.path.join(source, "model.safetensors"))
  state.update(tensors or {})
  safetensors.numpy.save_file({k: v for k, v in state.items() if v is not None},
                              os.path.join(directory, "model.safetensors"))
  return directory


class ErrorTest(parameterized.TestCase):

  def assert_one_line(self, regex, directory, step="convert"):
    with self.assertRaisesRegex(ConfigError, regex) as caught:
      checkpoint = hf_checkpoint.read(directory)
      if step == "convert":
        hf_checkpoint.convert(checkpoint)
    self.assertNotIn("\n", str(caught.exception))

  def test_no_directory(self):
    missing = os.path.join(self.create_tempdir().full_path, "nope")
    self.assertFalse(hf_checkpoint.is_checkpoint_directory(missing))
    self.assert_one_line(r"nope: no such directory", missing)

  def test_no_config(self):
    directory = self.create_tempdir().full_path
    shutil.copy(os.path.join(DIRS, "vit", "model.safetensors"), directory)
    self.assertFalse(hf_checkpoint.is_checkpoint_directory(directory))
    self.assert_one_line(r"has no config.json", directory)

  @parameterized.named_parameters(
      ("transformers", {"model_type": "vit"}, r"with transformers: `AutoModel.from_pretrained"),
      ("timm", {"architecture": "vit_base_patch16_224"},
       r"with timm: `timm.models.save_for_hf\(timm.create_model\('local-dir:DIR'"))
  def test_pytorch_bin_only(self, config, how):
    directory = self.create_tempdir()
    directory.create_file("config.json", json.dumps(config))
    directory.create_file("pytorch_model.bin", "not really")
    self.assertTrue(hf_checkpoint.is_checkpoint_directory(directory.full_path))
    self.assert_one_line(r"has only pytorch_model.bin; this codebase reads safetensors without "
                         r"torch: download them with `huggingface-cli download REPO --include "
                         r"'\*.safetensors' config.json`, or convert once " + how +
                         r".*OUT, safe_serialization=True\)`$", directory.full_path)

  def test_unknown_model_type(self):
    directory = copy_dir(self, "vit", {"model_type": "bert", "architectures": ["BertModel"]})
    self.assert_one_line(r"model_type 'bert' has no converter; handled: clip, "
                         r"clip_vision_model, .*vit_mae and timm VisionTransformer", directory)

  def test_missing_shard(self):
    directory = self.create_tempdir().full_path
    for name in os.listdir(os.path.join(DIRS, "vit_sharded")):
      if name != "model-00002-of-00003.safetensors":
        shutil.copy(os.path.join(DIRS, "vit_sharded", name), directory)
    self.assert_one_line(r"shard model-00002-of-00003.safetensors named by "
                         r"model.safetensors.index.json is missing", directory, step="read")

  def test_architecture_of_model_type_refused(self):
    directory = copy_dir(self, "siglip_vision", {
        "model_type": "siglip", "architectures": ["SiglipForImageClassification"]})
    self.assert_one_line(r"SiglipForImageClassification \(model_type 'siglip'\) does not "
                         r"convert; of that model_type: SiglipModel", directory)

  def test_hf_option_refused(self):
    self.assert_one_line(r"HF vit qkv_bias=False is not mapped",
                         copy_dir(self, "vit", {"qkv_bias": False}))

  def test_hf_missing_tensor(self):
    directory = copy_dir(self, "vit", tensors={"vit.layernorm.weight": None})
    self.assert_one_line(r"converter needs 'layernorm.weight', which neither config.json nor "
                         r"the weights have", directory)

  @parameterized.named_parameters(
      ("unknown_architecture", {"architecture": "vit_base_patch16_clip_224"}, None,
       r"timm architecture 'vit_base_patch16_clip_224' is not one whose defaults"),
      ("qkv_bias", {"model_args.qkv_bias": False}, None,
       r"timm model_args qkv_bias=False but the tensors have qkv_bias=True"),
      ("reg_tokens", {"model_args.reg_tokens": 4}, None,
       r"timm model_args reg_tokens=4 but the tensors have reg_tokens=0"),
      ("unknown_option", {"model_args.attn_layer": "diff"}, None,
       r"timm model_args attn_layer='diff' is not mapped"),
      ("activation", {"model_args.act_layer": "silu"}, None,
       r"act_layer='silu': only gelu, gelu_tanh, quick_gelu map"),
      ("fc_norm", {"model_args.global_pool": "avg"}, None,
       r"global_pool='avg' with fc_norm .* does not map"),
      ("avg_with_class_token", {"model_args.global_pool": "avg", "model_args.fc_norm": False},
       None, r"global_pool='avg' with a class token does not map"),
      ("map", {"model_args.global_pool": "map"}, None, r"global_pool='map' does not map"),
      ("extra_tensor", None, {"blocks.0.attn.q_norm.weight": np.ones(8, np.float32)},
       r"tensors not mapped onto our ViT: blocks.0.attn.q_norm.weight"),
      ("no_qkv_bias", None, {"blocks.0.attn.qkv.bias": None, "blocks.1.attn.qkv.bias": None},
       r"timm model_args qkv_bias=True but the tensors have qkv_bias=False"),
      ("gated_tensors", None, {"blocks.0.mlp.fc1.weight": np.ones((128, 32), np.float32)},
       r"blocks.0.mlp is gated \(fc1 \(128, 32\), fc2 \(32, 64\)\) but the "
       r"architecture's mlp_layer is Mlp"),
      ("wrong_image_size", {"model_args.img_size": 64}, None,
       r"pos_embed has 17 positions; image size \(64, 64\) in patches of 8 gives 64 \+ 1"),
  )
  def test_timm_refusals(self, config, tensors, regex):
    self.assert_one_line(regex, copy_dir(self, "timm_vit", config, tensors))

  @parameterized.named_parameters(
      ("pool_include_prefix", "timm_vit_reg",
       {"model_args.class_token": False, "model_args.global_pool": "avg",
        "model_args.fc_norm": False, "model_args.pool_include_prefix": True},
       {"cls_token": None}, r"pool_include_prefix=True with registers does not map"),
      ("registers_without_positions", "timm_vit_reg", {"model_args.no_embed_class": False},
       None, r"pos_embed has 16 positions; .* gives 16 \+ 1 class token \+ 2 registers$"),
      ("swiglu_activation", "timm_vit_reg_g", {"model_args.act_layer": "gelu"}, None,
       r"SwiGLUPacked with act_layer='gelu' does not map: our SwiGLU gates with SiLU"),
      ("not_gated", "timm_vit_reg_g", {"architecture": "vit_large_patch14_reg4_dinov2"},
       None, r"blocks.0.mlp is gated .* but the architecture's mlp_layer is Mlp"),
      ("gated_expected", "timm_vit_reg", {"architecture": "vit_giant_patch14_reg4_dinov2"},
       None,
       r"blocks.0.mlp is not gated .* but the architecture's mlp_layer is SwiGLUPacked"),
  )
  def test_timm_register_and_swiglu_refusals(self, name, config, tensors, regex):
    self.assert_one_line(regex, copy_dir(self, name, config, tensors))

  def test_timm_registers_from_the_name(self):
    """vit_*_patch14_reg4_dinov2: 4 registers, no position embedding on the prefix;
    the giant's SwiGLUPacked; bias-free query / key / value from the tensors."""
    reg = hf_checkpoint.convert(hf_checkpoint.read(os.path.join(DIRS, "timm_vit_reg"))).model
    self.assertEqual((reg["num_registers"], reg["qkv_bias"], reg["mlp"], reg["layerscale"]),
                     (2, False, "mlp", 0.1))
    giant = hf_checkpoint.convert(hf_checkpoint.read(os.path.join(DIRS, "timm_vit_reg_g")))
    self.assertEqual((giant.model["num_registers"], giant.model["mlp"],
                      giant.model["mlp_dim"]), (4, "swiglu", 24))
    self.assertIn("gate", giant.params["backbone"]["blocks"][0]["mlp"])

  def test_timm_heads_from_the_name(self):
    """Without model_args, heads come from the architecture (tiny: 3 of width 32: refused)."""
    directory = copy_dir(self, "timm_vit", {"model_args": {}})
    self.assert_one_line(r"timm num_heads=3 does not divide the width 32", directory)
    directory = copy_dir(self, "timm_vit", {"model_args": {},
                                            "architecture": "vit_large_patch8_32"})
    converted = hf_checkpoint.convert(hf_checkpoint.read(directory))
    self.assertEqual(converted.model["num_heads"], 16)
    self.assertEqual(converted.model["image_size"], 32)  # from pretrained_cfg.input_size


if __name__ == "__main__":
  absltest.main()
