"""HuggingFace transformers weights -> our parameters, so runs can start from published models.

`load_hf_vit(state_dict, hf_config)` takes a (numpy) state dict of
`ViTModel` / `ViTForImageClassification` in either transformers 4 naming
(`encoder.layer.N.attention.attention.query`) or 5 naming
(`layers.N.attention.q_proj`) and a config dict, and returns (our model
kwargs, our parameters as a pure dict). `assign(model, params)` puts them into a
model, naming the first parameter whose shape disagrees.

Layout facts handled here: torch Linear weights are [out, in] (ours [in, out]);
the patch conv [D, C, p, p] becomes our patchify matmul [(p, p, C), D]; HF adds a
position embedding to the class token, which we fold into `cls_token`; HF ViT
uses exact GELU and layer-norm eps 1e-12 by default.
"""
from __future__ import annotations

import re
from typing import Any

import jax
import numpy as np
from flax import nnx

from big_vision_like.registry import ConfigError

# transformers 4 names -> transformers 5 names
_LEGACY = [
    (r"encoder\.layer\.(\d+)\.attention\.attention\.query", r"layers.\1.attention.q_proj"),
    (r"encoder\.layer\.(\d+)\.attention\.attention\.key", r"layers.\1.attention.k_proj"),
    (r"encoder\.layer\.(\d+)\.attention\.attention\.value", r"layers.\1.attention.v_proj"),
    (r"encoder\.layer\.(\d+)\.attention\.output\.dense", r"layers.\1.attention.o_proj"),
    (r"encoder\.layer\.(\d+)\.intermediate\.dense", r"layers.\1.mlp.fc1"),
    (r"encoder\.layer\.(\d+)\.output\.dense", r"layers.\1.mlp.fc2"),
    (r"encoder\.layer\.(\d+)\.", r"layers.\1."),
]


def _normalise_names(state_dict: dict[str, Any]) -> dict[str, np.ndarray]:
  out = {}
  for key, value in state_dict.items():
    key = key[len("vit."):] if key.startswith("vit.") else key
    for pattern, replacement in _LEGACY:
      key = re.sub(pattern, replacement, key)
    out[key] = np.asarray(value, np.float32)
  return out


# transformers 4 Swin names -> transformers 5 names
_LEGACY_SWIN = [
    (r"attention\.self\.query", "attention.q_proj"),
    (r"attention\.self\.key", "attention.k_proj"),
    (r"attention\.self\.value", "attention.v_proj"),
    (r"attention\.self\.relative_position_bias_table",
     "attention.relative_position_bias.relative_position_bias_table"),
    (r"attention\.output\.dense", "attention.o_proj"),
    (r"(blocks\.\d+)\.intermediate\.dense", r"\1.mlp.fc1"),
    (r"(blocks\.\d+)\.output\.dense", r"\1.mlp.fc2"),
]


def _linear(sd, name):
  return {"kernel": sd[f"{name}.weight"].T, "bias": sd[f"{name}.bias"]}


def _norm(sd, name):
  return {"scale": sd[f"{name}.weight"], "bias": sd[f"{name}.bias"]}


def load_hf_vit(state_dict: dict[str, Any], hf_config: dict[str, Any]):
  """Returns (ViT kwargs, parameters) for an HF ViT state dict and config."""
  sd = _normalise_names(state_dict)
  if hf_config.get("hidden_act", "gelu") != "gelu":
    raise ConfigError(f"HF ViT hidden_act={hf_config['hidden_act']!r}: only exact 'gelu' maps")
  width, depth = hf_config["hidden_size"], hf_config["num_hidden_layers"]
  patch, channels = hf_config["patch_size"], hf_config.get("num_channels", 3)
  num_classes = sd["classifier.weight"].shape[0] if "classifier.weight" in sd else 0
  kwargs = dict(num_classes=num_classes, patch_size=patch, width=width, depth=depth,
                mlp_dim=hf_config["intermediate_size"],
                num_heads=hf_config["num_attention_heads"],
                image_size=hf_config["image_size"], channels=channels, pool="cls",
                posemb="learn", ln_eps=hf_config.get("layer_norm_eps", 1e-12),
                head_zero_init=False)
  conv = sd["embeddings.patch_embeddings.projection.weight"]  # [D, C, p, p]
  pos = sd["embeddings.position_embeddings"]  # [1, 1 + N, D], class token first
  params = {
      "embedding": {"kernel": conv.transpose(2, 3, 1, 0).reshape(patch * patch * channels, width),
                    "bias": sd["embeddings.patch_embeddings.projection.bias"]},
      "cls_token": sd["embeddings.cls_token"] + pos[:, :1],
      "pos_embedding": pos[:, 1:],
      "norm": _norm(sd, "layernorm"),
      "blocks": {},
  }
  for i in range(depth):
    p = f"layers.{i}"
    params["blocks"][i] = {
        "norm1": _norm(sd, f"{p}.layernorm_before"),
        "norm2": _norm(sd, f"{p}.layernorm_after"),
        "attn": {"query": _linear(sd, f"{p}.attention.q_proj"),
                 "key": _linear(sd, f"{p}.attention.k_proj"),
                 "value": _linear(sd, f"{p}.attention.v_proj"),
                 "out": _linear(sd, f"{p}.attention.o_proj")},
        "mlp": {"fc1": _linear(sd, f"{p}.mlp.fc1"), "fc2": _linear(sd, f"{p}.mlp.fc2")},
    }
  if num_classes:
    params["head"] = _linear(sd, "classifier")
  return kwargs, params


def assign(model: nnx.Module, params: dict[str, Any], where: str = "checkpoint") -> None:
  """Copies a pure-dict of parameters into `model`, checking every path and shape."""
  _, state = nnx.split(model)
  expected = {tuple(str(k) for k in path): var for path, var in nnx.to_flat_state(state)}
  given = {tuple(str(k) for k in path): value for path, value in
           _flatten(params)}
  for path, var in expected.items():
    if not isinstance(var, nnx.Param):
      continue
    name = "/".join(path)
    if path not in given:
      raise ConfigError(f"{where} has no parameter {name} (shape {var.get_value().shape})")
    value = np.asarray(given.pop(path))
    if value.shape != var.get_value().shape:
      raise ConfigError(f"{where} parameter {name} has shape {value.shape} but the config "
                        f"builds {var.get_value().shape}")
    var.set_value(jax.numpy.asarray(value, var.get_value().dtype))
  if given:
    raise ConfigError(f"{where} has parameters the model lacks: "
                      f"{', '.join('/'.join(p) for p in sorted(given))[:300]}")


def _flatten(tree, prefix=()):
  for key, value in tree.items():
    if isinstance(value, dict):
      yield from _flatten(value, prefix + (key,))
    else:
      yield prefix + (key,), value


def load_hf_swin(state_dict: dict[str, Any], hf_config: dict[str, Any]):
  """Returns (Swin kwargs, parameters) for an HF Swin state dict and config."""
  sd = {}
  for key, value in state_dict.items():
    key = key[len("swin."):] if key.startswith("swin.") else key
    for pattern, replacement in _LEGACY_SWIN:
      key = re.sub(pattern, replacement, key)
    sd[key] = np.asarray(value, np.float32)
  if hf_config.get("hidden_act", "gelu") != "gelu" or hf_config.get("use_absolute_embeddings"):
    raise ConfigError("HF Swin with hidden_act other than 'gelu' or absolute position "
                      "embeddings does not map onto our Swin")
  depths, patch = list(hf_config["depths"]), hf_config["patch_size"]
  channels, embed = hf_config.get("num_channels", 3), hf_config["embed_dim"]
  num_classes = sd["classifier.weight"].shape[0] if "classifier.weight" in sd else 0
  kwargs = dict(num_classes=num_classes, patch_size=patch, window_size=hf_config["window_size"],
                embed_dim=embed, depths=tuple(depths), num_heads=tuple(hf_config["num_heads"]),
                mlp_ratio=hf_config.get("mlp_ratio", 4.0), image_size=hf_config["image_size"],
                channels=channels, ln_eps=hf_config.get("layer_norm_eps", 1e-5),
                head_zero_init=False, drop_path=0.0)
  conv = sd["embeddings.patch_embeddings.projection.weight"]
  params = {
      "patch_embed": {"kernel": conv.transpose(2, 3, 1, 0).reshape(patch * patch * channels, embed),
                      "bias": sd["embeddings.patch_embeddings.projection.bias"]},
      "patch_norm": _norm(sd, "embeddings.norm"),
      "norm": _norm(sd, "layernorm"),
      "stages": {},
  }
  for i, depth in enumerate(depths):
    stage = {"blocks": {}}
    for j in range(depth):
      p = f"encoder.layers.{i}.blocks.{j}"
      stage["blocks"][j] = {
          "norm1": _norm(sd, f"{p}.layernorm_before"),
          "norm2": _norm(sd, f"{p}.layernorm_after"),
          "attn": {"query": _linear(sd, f"{p}.attention.q_proj"),
                   "key": _linear(sd, f"{p}.attention.k_proj"),
                   "value": _linear(sd, f"{p}.attention.v_proj"),
                   "out": _linear(sd, f"{p}.attention.o_proj"),
                   "bias_table": sd[f"{p}.attention.relative_position_bias."
                                    "relative_position_bias_table"]},
          "mlp": {"fc1": _linear(sd, f"{p}.mlp.fc1"), "fc2": _linear(sd, f"{p}.mlp.fc2")},
      }
    if i < len(depths) - 1:
      p = f"encoder.layers.{i}.downsample"
      stage["merge"] = {"norm": _norm(sd, f"{p}.norm"),
                        "reduction": {"kernel": sd[f"{p}.reduction.weight"].T}}
    params["stages"][i] = stage
  if num_classes:
    params["head"] = _linear(sd, "classifier")
  return kwargs, params


def _perceiver_layer(sd, prefix, cross: bool):
  a = f"{prefix}.attention"
  layer = {
      "norm_q": _norm(sd, f"{a}.self.layernorm1"),
      "query": _linear(sd, f"{a}.self.query"),
      "key": _linear(sd, f"{a}.self.key"),
      "value": _linear(sd, f"{a}.self.value"),
      "out": _linear(sd, f"{a}.output.dense"),
      "norm_mlp": _norm(sd, f"{prefix}.layernorm"),
      "mlp": {"fc1": _linear(sd, f"{prefix}.mlp.dense1"),
              "fc2": _linear(sd, f"{prefix}.mlp.dense2")},
  }
  if cross:
    layer["norm_kv"] = _norm(sd, f"{a}.self.layernorm2")
  return layer


def load_hf_perceiver(state_dict: dict[str, Any], hf_config: dict[str, Any]):
  """Returns (Perceiver kwargs, parameters) for HF PerceiverForImageClassification
  Learned (conv1x1 + learned positions) or Fourier (pixels + Fourier features)."""
  sd = {k[len("perceiver."):] if k.startswith("perceiver.") else k: np.asarray(v, np.float32)
        for k, v in state_dict.items()}
  if hf_config.get("hidden_act", "gelu") != "gelu":
    raise ConfigError(f"HF Perceiver hidden_act={hf_config['hidden_act']!r}: only exact 'gelu' maps")
  if hf_config.get("v_channels") not in (None, hf_config.get("qk_channels")):
    raise ConfigError("HF Perceiver with v_channels != qk_channels does not map")
  learned = "input_preprocessor.convnet_1x1.weight" in sd
  size = hf_config["image_size"]
  decode = "decoder.decoder.decoding_cross_attention"
  kwargs = dict(
      num_classes=sd["decoder.decoder.final_layer.weight"].shape[0], image_size=size,
      channels=3, num_latents=hf_config["num_latents"], latent_dim=hf_config["d_latents"],
      num_blocks=hf_config["num_blocks"],
      self_attends_per_block=hf_config["num_self_attends_per_block"],
      self_heads=hf_config["num_self_attention_heads"],
      cross_heads=hf_config["num_cross_attention_heads"],
      qk_channels=hf_config.get("qk_channels"),
      self_widening=hf_config.get("self_attention_widening_factor", 1),
      cross_widening=hf_config.get("cross_attention_widening_factor", 1),
      decoder="class", ln_eps=1e-5)
  params = {
      "latents": sd["embeddings.latents"],
      "encode_cross": _perceiver_layer(sd, "encoder.cross_attention", cross=True),
      "self_attends": {i: _perceiver_layer(sd, f"encoder.self_attends.{i}", cross=False)
                       for i in range(hf_config["num_self_attends_per_block"])},
      "query": sd["decoder.decoder.output_position_encodings.position_embeddings"],
      "decode_cross": _perceiver_layer(sd, decode, cross=True),
      "head": _linear(sd, "decoder.decoder.final_layer"),
  }
  if learned:
    conv = sd["input_preprocessor.convnet_1x1.weight"]  # [out, C, 1, 1]
    kwargs.update(preprocessor="conv1x1", prep_channels=conv.shape[0], posemb="learn",
                  posemb_channels=sd["input_preprocessor.position_embeddings."
                                     "position_embeddings"].shape[1])
    params["prep"] = {"kernel": conv[:, :, 0, 0].T,
                      "bias": sd["input_preprocessor.convnet_1x1.bias"]}
    params["pos_embedding"] = sd["input_preprocessor.position_embeddings.position_embeddings"]
    params["pos_proj"] = _linear(sd, "input_preprocessor.positions_projection")
  else:  # transformers hard-codes these for the Fourier image classifier
    kwargs.update(preprocessor="pixels", posemb="fourier", num_bands=64,
                  max_resolution=(224, 224))
  return kwargs, params
