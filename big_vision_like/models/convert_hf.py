"""HuggingFace transformers weights -> our parameters, so runs can start from published models.

`load_hf_vit(state_dict, hf_config)` takes a (numpy) state dict of
`ViTModel` / `ViTForImageClassification` in either transformers 4 naming
(`encoder.layer.N.attention.attention.query`) or 5 naming
(`layers.N.attention.q_proj`) and a config dict, and returns (our model
kwargs, our parameters as a pure dict). `assign(model, params)` puts them into a
model, naming the first parameter whose shape disagrees. `load_hf_dinov2`
works the same way; `load_hf_clip`, `load_hf_siglip` and `load_hf_mae` return
the config.model and config.objective that build the matching objective, and
the parameters of the whole objective.

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
                head_zero_init=False, posemb_resample="bicubic")
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
    params["blocks"][i] = _vit_block(sd, f"layers.{i}")
  if num_classes:
    params["head"] = _linear(sd, "classifier")
  return kwargs, params


def _vit_block(sd, p, norms=("layernorm_before", "layernorm_after"), attn="attention",
               attn_out="o_proj"):
  """One HF pre-norm block (ViT naming by default) as our `vit.Block`."""
  return {
      "norm1": _norm(sd, f"{p}.{norms[0]}"),
      "norm2": _norm(sd, f"{p}.{norms[1]}"),
      "attn": {"query": _linear(sd, f"{p}.{attn}.q_proj"),
               "key": _linear(sd, f"{p}.{attn}.k_proj"),
               "value": _linear(sd, f"{p}.{attn}.v_proj"),
               "out": _linear(sd, f"{p}.{attn}.{attn_out}")},
      "mlp": {"fc1": _linear(sd, f"{p}.mlp.fc1"), "fc2": _linear(sd, f"{p}.mlp.fc2")},
  }


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


_LEARNED_PREP = {f"input_preprocessor.{n}" for n in (
    "convnet_1x1.weight", "convnet_1x1.bias", "position_embeddings.position_embeddings",
    "positions_projection.weight", "positions_projection.bias")}


def load_hf_perceiver(state_dict: dict[str, Any], hf_config: dict[str, Any]):
  """Returns (Perceiver kwargs, parameters) for HF PerceiverForImageClassification
  Learned (conv1x1 + learned positions) or Fourier (pixels + Fourier features).

  The Fourier classifier's features are not in its config: transformers fixes them
  (64 bands, max resolution 224 x 224, positions concatenated, sine and cosine), so
  every such checkpoint has those. Another preprocessor (ConvProcessing's conv +
  batch norm, Fourier at 56 x 56) is refused by its tensors.
  """
  sd = {k[len("perceiver."):] if k.startswith("perceiver.") else k: np.asarray(v, np.float32)
        for k, v in state_dict.items()}
  if hf_config.get("hidden_act", "gelu") != "gelu":
    raise ConfigError(f"HF Perceiver hidden_act={hf_config['hidden_act']!r}: only exact 'gelu' maps")
  if hf_config.get("v_channels") not in (None, hf_config.get("qk_channels")):
    raise ConfigError("HF Perceiver with v_channels != qk_channels does not map")
  learned = "input_preprocessor.convnet_1x1.weight" in sd
  other = sorted(k for k in sd if k.startswith("input_preprocessor.")
                 and k not in (_LEARNED_PREP if learned else ()))
  if other:
    raise ConfigError(f"HF Perceiver preprocessor tensor {other[0]} does not map: only the "
                      f"image classifiers Learned (conv1x1) and Fourier (raw pixels) do")
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


# -- Pre-training models: CLIP, SigLIP, DINOv2, MAE ---------------------------
#
# The image-text and MAE converters return (config.model, config.objective,
# parameters of the whole objective); DINOv2 returns (ViT kwargs, parameters)
# like load_hf_vit. Put the parameters in with `assign`.

# HF hidden_act -> our activation name (both tanh forms are the same function)
_ACTIVATIONS = {"gelu": "gelu", "quick_gelu": "quick_gelu",
                "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}

# transformers 4 block names -> 5, for DINOv2 and the MAE encoder and decoder. The MAE
# decoder's layers are `decoder.decoder_layers.N` in both, but transformers 5's
# save_pretrained writes `decoder.decoder_encoder.layer.N` (its ViT rule `encoder.layer.`
# <-> `layers.` reversed inside `decoder_layers.`; seen with 5.24), which it reads back.
_LEGACY_BLOCK = [
    (r"\.attention\.attention\.query\.", ".attention.q_proj."),
    (r"\.attention\.attention\.key\.", ".attention.k_proj."),
    (r"\.attention\.attention\.value\.", ".attention.v_proj."),
    (r"\.attention\.output\.dense\.", ".attention.o_proj."),
    (r"\.intermediate\.dense\.", ".mlp.fc1."),
    (r"\.output\.dense\.", ".mlp.fc2."),
    (r"^vit\.encoder\.layer\.", "vit.layers."),
    (r"^decoder\.decoder_encoder\.layer\.", "decoder.decoder_layers."),
]


def _rename(state_dict, rules=(), strip=""):
  out = {}
  for key, value in state_dict.items():
    key = key[len(strip):] if strip and key.startswith(strip) else key
    for pattern, replacement in rules:
      key = re.sub(pattern, replacement, key)
    out[key] = np.asarray(value, np.float32)
  return out


def _activation(hf_config, what):
  act = hf_config.get("hidden_act", "gelu")
  if act not in _ACTIVATIONS:
    raise ConfigError(f"HF {what} hidden_act={act!r}: only {', '.join(_ACTIVATIONS)} map")
  return _ACTIVATIONS[act]


def _patch(sd, name, patch, channels):
  """The patch conv [D, C, p, p] as our patchify matmul [(p, p, C), D], bias if any."""
  conv = sd[f"{name}.weight"]
  out = {"kernel": conv.transpose(2, 3, 1, 0).reshape(patch * patch * channels, conv.shape[0])}
  if f"{name}.bias" in sd:
    out["bias"] = sd[f"{name}.bias"]
  return out


def _arch(c):
  return dict(width=c["hidden_size"], depth=c["num_hidden_layers"],
              num_heads=c["num_attention_heads"], mlp_dim=c["intermediate_size"])


def _image_arch(c):
  return dict(num_classes=0, patch_size=c["patch_size"], image_size=c["image_size"],
              channels=c.get("num_channels", 3), posemb="learn", head_zero_init=False,
              posemb_resample="bicubic", **_arch(c))  # interpolate_pos_encoding's


def _clip_blocks(sd, prefix, depth):
  """CLIP / SigLIP encoder layers (layer_norm1/2, self_attn.*_proj) as our blocks."""
  return {i: _vit_block(sd, f"{prefix}.encoder.layers.{i}", norms=("layer_norm1", "layer_norm2"),
                        attn="self_attn", attn_out="out_proj") for i in range(depth)}


def _clip_text(sd, tc, what, **options):
  """(config.objective.text, params) of a CLIP / SigLIP text_model, ours a TextTransformer.

  Its vocabulary and length are config.input.tokenizer's: that must have HF's
  vocab_size and max_len = max_position_embeddings (`assign` names the
  parameter otherwise).
  """
  text = dict(_arch(tc), activation=_activation(tc, what), ln_eps=tc["layer_norm_eps"],
              **options)
  params = {
      "token_embedding": {"embedding": sd["text_model.embeddings.token_embedding.weight"]},
      "pos_embedding": sd["text_model.embeddings.position_embedding.weight"][None],
      "blocks": _clip_blocks(sd, "text_model", tc["num_hidden_layers"]),
      "norm": _norm(sd, "text_model.final_layer_norm"),
  }
  return text, params


def load_hf_clip(state_dict: dict[str, Any], hf_config: dict[str, Any]):
  """(config.model, config.objective, parameters) of our `clip` for an HF CLIPModel.

  Our text tower pools at the last non-padding token, HF at the first
  `eos_token_id` (or, when that is 2, at the largest id): the same token for
  texts laid out as ours are (ids, EOS, 0 padding) whose EOS id is the one HF
  looks for. HF's class token gets a position embedding: folded into `cls_token`.
  """
  sd = _rename(state_dict)
  vc, tc = hf_config["vision_config"], hf_config["text_config"]
  kwargs, image = load_hf_clip_vision(sd, vc)
  text, text_params = _clip_text(sd, tc, "CLIP text", causal=True, pool="eos",
                                 mask_padding=True)
  objective = dict(name="clip", embed_dim=hf_config["projection_dim"], text=text)
  params = {"backbone": image, "text_tower": text_params,
            "image_proj": {"kernel": sd["visual_projection.weight"].T},
            "text_proj": {"kernel": sd["text_projection.weight"].T},
            "log_scale": sd["logit_scale"].reshape(())}
  return dict(name="vit", **kwargs), objective, params


def load_hf_siglip(state_dict: dict[str, Any], hf_config: dict[str, Any]):
  """(config.model, config.objective, parameters) of our `siglip` for an HF SiglipModel.

  The image embedding is the MAP head's output (no projection), so the image
  tower must have that head (load_hf_siglip_vision refuses it otherwise).
  """
  sd = _rename(state_dict)
  vc, tc = hf_config["vision_config"], hf_config["text_config"]
  if tc.get("projection_size", tc["hidden_size"]) != vc["hidden_size"]:
    raise ConfigError(f"HF SigLIP text projection_size={tc['projection_size']} differs from "
                      f"the image width {vc['hidden_size']}; our siglip embeds in the image width")
  kwargs, image = load_hf_siglip_vision(sd, vc)
  text, text_params = _clip_text(sd, tc, "SigLIP text", causal=False, pool="last",
                                 mask_padding=False)
  objective = dict(name="siglip", image_projection=False, text_projection_bias=True, text=text)
  params = {"backbone": image, "text_tower": text_params,
            "text_proj": _linear(sd, "text_model.head"),
            "log_t": sd["logit_scale"].reshape(()), "bias": sd["logit_bias"].reshape(())}
  return dict(name="vit", **kwargs), objective, params


def _swiglu_hidden(width: int, mlp_ratio: float) -> int:
  """HF `Dinov2SwiGLUFFN`'s width: 2/3 of int(width * mlp_ratio), rounded up to 8s."""
  return (int(int(width * mlp_ratio) * 2 / 3) + 7) // 8 * 8


def _dinov2_block(sd, p, *, qkv_bias: bool, swiglu: bool):
  """One Dinov2Layer as our `vit.Block`. HF's SwiGLU is packed in transformers 4
  names (`weights_in` = [gate; up] rows, `weights_out`), split in 5's
  (`gate_proj`, `up_proj`, `down_proj`); ours is (gate, fc1, fc2)."""
  qkv = (lambda name: _linear(sd, name)) if qkv_bias else (
      lambda name: {"kernel": sd[f"{name}.weight"].T})
  a = f"{p}.attention"
  block = {
      "norm1": _norm(sd, f"{p}.norm1"),
      "norm2": _norm(sd, f"{p}.norm2"),
      "attn": {"query": qkv(f"{a}.q_proj"), "key": qkv(f"{a}.k_proj"),
               "value": qkv(f"{a}.v_proj"), "out": _linear(sd, f"{a}.o_proj")},
      "ls1": {"gamma": sd[f"{p}.layer_scale1.lambda1"]},
      "ls2": {"gamma": sd[f"{p}.layer_scale2.lambda1"]},
  }
  m = f"{p}.mlp"
  if not swiglu:
    block["mlp"] = {"fc1": _linear(sd, f"{m}.fc1"), "fc2": _linear(sd, f"{m}.fc2")}
  elif f"{m}.weights_in.weight" in sd:
    gate, up = np.split(sd[f"{m}.weights_in.weight"].T, 2, axis=1)
    gate_bias, up_bias = np.split(sd[f"{m}.weights_in.bias"], 2)
    block["mlp"] = {"gate": {"kernel": gate, "bias": gate_bias},
                    "fc1": {"kernel": up, "bias": up_bias},
                    "fc2": _linear(sd, f"{m}.weights_out")}
  else:
    block["mlp"] = {"gate": _linear(sd, f"{m}.gate_proj"), "fc1": _linear(sd, f"{m}.up_proj"),
                    "fc2": _linear(sd, f"{m}.down_proj")}
  return block


def load_hf_dinov2(state_dict: dict[str, Any], hf_config: dict[str, Any]):
  """Returns (ViT kwargs, parameters) for an HF Dinov2Model or Dinov2WithRegistersModel
  (transformers 4 or 5 names), SwiGLU and bias-free query/key/value included.

  The mask token is not a ViT parameter: pass `embeddings.mask_token[0]` as
  `mask_token=` with `token_mask=` (HF's bool_masked_pos). At other input sizes
  the position embedding resamples as HF's does: bicubic, antialiased for the
  registers model (`posemb_resample`).
  """
  registers_model = (hf_config.get("model_type") == "dinov2_with_registers"
                     or any(k.endswith("embeddings.register_tokens") for k in state_dict))
  strip = "dinov2_with_registers." if registers_model else "dinov2."
  sd = _rename(state_dict, _LEGACY_BLOCK, strip=strip)
  num_registers = hf_config.get("num_register_tokens", 0) if registers_model else 0
  has_registers = "embeddings.register_tokens" in sd
  if bool(num_registers) != has_registers or (
      has_registers and sd["embeddings.register_tokens"].shape[1] != num_registers):
    raise ConfigError(f"HF DINOv2 config num_register_tokens={num_registers} does not match the "
                      f"checkpoint's embeddings.register_tokens "
                      f"{sd['embeddings.register_tokens'].shape if has_registers else '(absent)'}")
  patch, channels = hf_config["patch_size"], hf_config.get("num_channels", 3)
  width, ratio = hf_config["hidden_size"], hf_config.get("mlp_ratio", 4)
  swiglu, qkv_bias = bool(hf_config.get("use_swiglu_ffn")), hf_config.get("qkv_bias", True)
  kwargs = dict(num_classes=0, patch_size=patch, width=width,
                depth=hf_config["num_hidden_layers"],
                mlp_dim=_swiglu_hidden(width, ratio) if swiglu else int(width * ratio),
                num_heads=hf_config["num_attention_heads"], image_size=hf_config["image_size"],
                channels=channels, pool="cls", posemb="learn",
                layerscale=hf_config.get("layerscale_value", 1.0),
                # HF's SwiGLU ignores hidden_act (always SiLU)
                mlp_activation="gelu" if swiglu else _activation(hf_config, "DINOv2"),
                mlp="swiglu" if swiglu else "mlp", qkv_bias=qkv_bias,
                num_registers=num_registers,
                posemb_resample="bicubic_antialias" if registers_model else "bicubic",
                ln_eps=hf_config.get("layer_norm_eps", 1e-6), head_zero_init=False)
  pos = sd["embeddings.position_embeddings"]  # [1, 1 + N, D], class token first
  params = {
      "embedding": _patch(sd, "embeddings.patch_embeddings.projection", patch, channels),
      "cls_token": sd["embeddings.cls_token"] + pos[:, :1],
      "pos_embedding": pos[:, 1:],
      "norm": _norm(sd, "layernorm"),
      "blocks": {i: _dinov2_block(sd, f"encoder.layer.{i}", qkv_bias=qkv_bias, swiglu=swiglu)
                 for i in range(kwargs["depth"])},
  }
  if num_registers:
    params["registers"] = sd["embeddings.register_tokens"]
  return kwargs, params


def load_hf_mae(state_dict: dict[str, Any], hf_config: dict[str, Any]):
  """(config.model, config.objective, parameters) of our `mae` for HF ViTMAEForPreTraining,
  in the published (transformers 4) names, transformers 5's in-memory ones or what its
  save_pretrained writes (`_LEGACY_BLOCK`).

  HF's fixed sin-cos tables are not our sincos2d (other frequencies, h/w
  order), so both load as learned position embeddings. Our decoder adds none
  to the class token: HF's must be zero there, as in the published tables.
  """
  sd = _rename(state_dict, _LEGACY_BLOCK)
  c = hf_config
  if _activation(c, "ViTMAE") != "gelu" or not c.get("qkv_bias", True):
    raise ConfigError("HF ViTMAE maps only with exact GELU and query/key/value biases")
  width = c["decoder_hidden_size"]
  if c["decoder_intermediate_size"] != 4 * width:
    raise ConfigError(f"HF ViTMAE decoder_intermediate_size={c['decoder_intermediate_size']}: "
                      f"our decoder's MLP is 4 x decoder_hidden_size = {4 * width}")
  dpos = sd["decoder.decoder_pos_embed"]  # [1, 1 + N, width], class token first
  if np.any(dpos[:, 0]):
    raise ConfigError("HF ViTMAE decoder_pos_embed has a non-zero class-token position; our "
                      "decoder adds no position embedding to the class token")
  eps = c.get("layer_norm_eps", 1e-12)
  patch, channels = c["patch_size"], c.get("num_channels", 3)
  model = dict(name="vit", pool="cls", ln_eps=eps, **_image_arch(c))
  objective = dict(name="mae", mask_ratio=c.get("mask_ratio", 0.75),
                   norm_pix=c.get("norm_pix_loss", False), decoder_width=width,
                   decoder_depth=c["decoder_num_hidden_layers"],
                   decoder_heads=c["decoder_num_attention_heads"], decoder_posemb="learn",
                   decoder_ln_eps=eps)
  pos = sd["vit.embeddings.position_embeddings"]
  encoder = {
      "embedding": _patch(sd, "vit.embeddings.patch_embeddings.projection", patch, channels),
      "cls_token": sd["vit.embeddings.cls_token"] + pos[:, :1],
      "pos_embedding": pos[:, 1:],
      "norm": _norm(sd, "vit.layernorm"),
      "blocks": {i: _vit_block(sd, f"vit.layers.{i}") for i in range(c["num_hidden_layers"])},
  }
  decoder = {
      "embed": _linear(sd, "decoder.decoder_embed"),
      "mask_token": sd["decoder.mask_token"].reshape(-1),
      "pos_embedding": dpos[:, 1:],
      "blocks": {i: _vit_block(sd, f"decoder.decoder_layers.{i}")
                 for i in range(c["decoder_num_hidden_layers"])},
      "norm": _norm(sd, "decoder.decoder_norm"),
      "pred": _linear(sd, "decoder.decoder_pred"),
  }
  return model, objective, {"backbone": encoder, "decoder": decoder}


# -- Image towers: CLIPVisionModel(WithProjection), SiglipVisionModel ----------
#
# (ViT kwargs, parameters) like load_hf_vit, for checkpoints without a text
# tower; load_hf_clip / load_hf_siglip build their image tower with them.

def _vision_model(state_dict):
  """transformers 4 (and WithProjection) save the tower under `vision_model.`,
  transformers 5's CLIPVisionModel / SiglipVisionModel without it: ours with it."""
  sd = _rename(state_dict)
  if any(k.startswith("vision_model.") for k in sd):
    return sd
  return {f"vision_model.{k}": v for k, v in sd.items()}


def load_hf_clip_vision(state_dict: dict[str, Any], hf_config: dict[str, Any]):
  """Returns (ViT kwargs, parameters) for an HF CLIPVisionModel(WithProjection).

  WithProjection's `visual_projection` is not a ViT parameter (our clip
  objective holds it as image_proj): it is not loaded.
  """
  sd, vc, v = _vision_model(state_dict), hf_config, "vision_model"
  kwargs = dict(pool="cls", pre_norm=True, patch_bias=False,
                mlp_activation=_activation(vc, "CLIP vision"), ln_eps=vc["layer_norm_eps"],
                **_image_arch(vc))
  pos = sd[f"{v}.embeddings.position_embedding.weight"]  # [1 + N, D], class token first
  params = {
      "embedding": _patch(sd, f"{v}.embeddings.patch_embedding", vc["patch_size"],
                          vc.get("num_channels", 3)),
      "cls_token": (sd[f"{v}.embeddings.class_embedding"] + pos[0])[None, None],
      "pos_embedding": pos[None, 1:],
      "pre_norm": _norm(sd, f"{v}.pre_layrnorm"),
      "blocks": _clip_blocks(sd, v, vc["num_hidden_layers"]),
      "norm": _norm(sd, f"{v}.post_layernorm"),
  }
  return kwargs, params


def load_hf_siglip_vision(state_dict: dict[str, Any], hf_config: dict[str, Any]):
  """Returns (ViT kwargs, parameters) for an HF SiglipVisionModel (its MAP head included);
  torch's MultiheadAttention packs its query, key and value into one in_proj, split here."""
  sd, vc, v = _vision_model(state_dict), hf_config, "vision_model"
  if not vc.get("vision_use_head", True):
    raise ConfigError("HF SigLIP vision_use_head=False does not map: our siglip image tower "
                      "pools with the attention-pooling (MAP) head")
  kwargs = dict(pool="map", mlp_activation=_activation(vc, "SigLIP vision"),
                ln_eps=vc["layer_norm_eps"], **_image_arch(vc))
  h = f"{v}.head"
  query, key, value = np.split(sd[f"{h}.attention.in_proj_weight"].T, 3, axis=1)
  query_bias, key_bias, value_bias = np.split(sd[f"{h}.attention.in_proj_bias"], 3)
  params = {
      "embedding": _patch(sd, f"{v}.embeddings.patch_embedding", vc["patch_size"],
                          vc.get("num_channels", 3)),
      "pos_embedding": sd[f"{v}.embeddings.position_embedding.weight"][None],
      "blocks": _clip_blocks(sd, v, vc["num_hidden_layers"]),
      "norm": _norm(sd, f"{v}.post_layernorm"),
      "map_head": {
          "probe": sd[f"{h}.probe"],
          "attn": {"query": {"kernel": query, "bias": query_bias},
                   "key": {"kernel": key, "bias": key_bias},
                   "value": {"kernel": value, "bias": value_bias},
                   "out": _linear(sd, f"{h}.attention.out_proj")},
          "norm": _norm(sd, f"{h}.layernorm"),
          "mlp": {"fc1": _linear(sd, f"{h}.mlp.fc1"), "fc2": _linear(sd, f"{h}.mlp.fc2")},
      },
  }
  return kwargs, params
