"""timm VisionTransformer weights -> our ViT, so runs can start from timm's hub checkpoints.

`load_timm_vit(state_dict, timm_config)` takes the (numpy) state dict of a timm
`VisionTransformer` and its hub config.json (`architecture`, `pretrained_cfg`,
maybe `model_args`) and returns (our ViT kwargs, our parameters as a pure dict),
like convert_hf's loaders; `convert_hf.assign` puts them into a model.

What the tensors do not say comes from the architecture's factory defaults
(a table for the plain `vit_{size}_patch{P}_{S}`, `deit_*`, `*_dinov2` and
`*_reg4_dinov2` names: heads by size; the registers' place; the giant's
SwiGLU) updated by config.json's `model_args` (what
`timm.create_model` was given on top of them). Other architectures' defaults
(CLIP's eps 1e-5, SigLIP's pooling, ...) are not in config.json, so they are
refused rather than guessed. Every tensor must be mapped and every model_args
option must be one our ViT computes alike, else a one-line ConfigError.

Layout facts: timm fuses query, key and value in `attn.qkv` ([3D, D], rows
q, k, v; `qkv_bias=False` has no bias); its sequence is [class token,
`reg_token` registers, patches] as ours, and its position embedding covers the
prefix tokens too unless `no_embed_class` (we fold those rows into
`cls_token` and `registers`: constants plus constants, the same sum, and
timm resamples only the patch rows as we do); `SwiGLUPacked` (DINOv2 giant)
packs [gate; up] rows in `mlp.fc1` and gates with SiLU, our `mlp='swiglu'`;
exact GELU (`nn.GELU`) and LayerNorm eps 1e-6 by default. At other input
sizes timm resamples the position embedding bicubically (antialiased), and so
do the converted models (`posemb_resample`).
"""
from __future__ import annotations

import re
from typing import Any

import numpy as np

from big_vision_like.models import convert_hf
from big_vision_like.registry import ConfigError

# Heads of timm's plain ViT factories by size name (patch, width, depth are in the tensors).
_HEADS = {"tiny": 3, "small": 6, "base": 12, "large": 16, "huge": 16, "giant": 16,
          "gigantic": 16}
_DINOV2_HEADS = {"small": 6, "base": 12, "large": 16, "giant": 24}
_PLAIN = re.compile(r"(?:vit|deit)_(tiny|small|base|large|huge|giant|gigantic)_patch\d+_(\d+)")
_DINOV2 = re.compile(r"vit_(small|base|large|giant)_patch14_(reg4_)?dinov2")

# model_args that must have these values (the other values change what is computed)
_REQUIRED = {"qk_norm": False, "scale_attn_norm": False, "scale_mlp_norm": False,
             "proj_bias": True, "final_norm": True, "pos_embed": "learn",
             "embed_norm_layer": None, "block_fn": None, "attn_layer": None,
             "embed_layer": None}
# model_args read below, and those that do not change the weights' function
_READ = {"img_size", "patch_size", "in_chans", "num_classes", "embed_dim", "depth", "num_heads",
         "mlp_ratio", "init_values", "class_token", "no_embed_class", "pre_norm", "fc_norm",
         "global_pool", "act_layer", "norm_layer", "qkv_bias", "reg_tokens", "mlp_layer",
         "pool_include_prefix"}
_IGNORED = {"weight_init", "fix_init", "dynamic_img_size", "dynamic_img_pad"}
_ACTIVATIONS = {None: "gelu", "gelu": "gelu", "gelu_tanh": "gelu_tanh",
                "quick_gelu": "quick_gelu"}
# timm's mlp_layer (named by the architecture defaults: a class is no JSON) -> our ViT's mlp
_MLP_LAYERS = {None: "mlp", "SwiGLUPacked": "swiglu"}


def architecture_args(architecture: str) -> dict[str, Any]:
  """The factory defaults of a timm ViT architecture this converter knows."""
  if m := _PLAIN.fullmatch(architecture):
    return {"num_heads": _HEADS[m.group(1)], "img_size": int(m.group(2))}
  if m := _DINOV2.fullmatch(architecture):
    args = {"num_heads": _DINOV2_HEADS[m.group(1)], "init_values": 1e-5, "img_size": 518}
    if m.group(2):  # registers, and no position embedding on any prefix token
      args.update(reg_tokens=4, no_embed_class=True)
    if m.group(1) == "giant":
      args.update(mlp_layer="SwiGLUPacked", act_layer="silu")
    return args
  raise ConfigError(
      f"timm architecture {architecture!r} is not one whose defaults this converter knows "
      f"(vit_{{tiny,small,base,large,huge,giant,gigantic}}_patch{{P}}_{{S}}, "
      f"deit_{{tiny,small,base}}_patch16_{{S}}, "
      f"vit_{{small,base,large,giant}}_patch14_[reg4_]dinov2)")


class _Tensors(dict):
  """The state dict, remembering which tensors were read."""

  def __init__(self, state_dict):
    super().__init__((k, np.asarray(v, np.float32)) for k, v in state_dict.items())
    self.read = set()

  def __getitem__(self, key):
    if key not in self:
      raise ConfigError(f"timm checkpoint has no tensor {key!r} (an option this converter "
                        f"does not map?)")
    self.read.add(key)
    return super().__getitem__(key)


_linear, _norm = convert_hf._linear, convert_hf._norm  # pylint: disable=protected-access  # torch layouts


def _options(timm_config):
  """The architecture's defaults updated by model_args; refuses what our ViT lacks.

  The image size is model_args', else the pretrained_cfg's, else the name's.
  """
  given = dict(timm_config.get("model_args") or {})
  args = dict(architecture_args(timm_config["architecture"]), **given)
  args.setdefault("global_pool", timm_config.get("global_pool", "token"))
  input_size = timm_config.get("pretrained_cfg", {}).get("input_size")
  if "img_size" not in given and input_size:
    args["img_size"] = list(input_size[1:])
  for key, value in args.items():
    if key in _REQUIRED and value != _REQUIRED[key]:
      raise ConfigError(f"timm model_args {key}={value!r} is not mapped onto our ViT "
                        f"(only {key}={_REQUIRED[key]!r})")
    if key not in _REQUIRED and key not in _READ and key not in _IGNORED and (
        not key.endswith("drop_rate")):
      raise ConfigError(f"timm model_args {key}={value!r} is not an option this converter maps")
  _check_mlp(args)
  if args.get("norm_layer") not in (None, "layernorm"):
    raise ConfigError(f"timm model_args norm_layer={args['norm_layer']!r}: only timm's "
                      f"LayerNorm (eps 1e-6) maps")
  return args


def _check_mlp(args):
  """The MLP and its activation must be ones our ViT computes: timm's GluMlp gates with
  act_layer, our SwiGLU with SiLU."""
  layer, act = args.get("mlp_layer"), args.get("act_layer")
  if layer not in _MLP_LAYERS:
    raise ConfigError(f"timm model_args mlp_layer={layer!r} is not mapped onto our ViT "
                      f"(only the plain Mlp and DINOv2 giant's SwiGLUPacked)")
  if _MLP_LAYERS[layer] == "swiglu" and act not in ("silu", "swish"):
    raise ConfigError(f"timm SwiGLUPacked with act_layer={act!r} does not map: our SwiGLU "
                      f"gates with SiLU")
  if _MLP_LAYERS[layer] == "mlp" and act not in _ACTIVATIONS:
    raise ConfigError(f"timm model_args act_layer={act!r}: only "
                      f"{', '.join(k for k in _ACTIVATIONS if k)} map")


def _pool(args, class_token, num_classes, registers):
  """Our `pool` for timm's global_pool (and fc_norm); refuses what our ViT computes otherwise."""
  pool, fc_norm = args["global_pool"], args.get("fc_norm")
  if args.get("pool_include_prefix") and registers and pool in ("avg", "avgmax", "max"):
    raise ConfigError(f"timm pool_include_prefix=True with registers does not map: our "
                      f"'gap' averages the patch tokens only")
  if fc_norm or (fc_norm is None and pool in ("avg", "avgmax", "max")):
    raise ConfigError(f"timm global_pool={pool!r} with fc_norm (the final norm after pooling) "
                      f"does not map: our ViT normalises the tokens before pooling "
                      f"(fc_norm=False does)")
  if pool == "token" or (pool == "avg" and not class_token):
    return "cls" if pool == "token" else "gap"
  if pool == "" and not num_classes:  # timm returns the tokens, the same as ours
    return "cls" if class_token else "gap"
  if pool == "avg":
    raise ConfigError("timm global_pool='avg' with a class token does not map: timm averages "
                      "the patch tokens only, our 'gap' has no class token")
  raise ConfigError(f"timm global_pool={pool!r}{' with a head' if pool == '' else ''} does not "
                    f"map onto our ViT (token, or avg without a class token, do)")


def load_timm_vit(state_dict: dict[str, Any], timm_config: dict[str, Any]):
  """Returns (ViT kwargs, parameters) for a timm VisionTransformer state dict and hub config."""
  sd = _Tensors(state_dict)
  args = _options(timm_config)
  conv = sd["patch_embed.proj.weight"]  # [D, C, p, p]
  width, channels, patch, patch_w = conv.shape
  if patch != patch_w:
    raise ConfigError(f"timm patch_embed.proj has non-square patches {patch}x{patch_w}")
  depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
  class_token = "cls_token" in sd
  registers = sd["reg_token"].shape[1] if "reg_token" in sd else 0
  num_classes = sd["head.weight"].shape[0] if "head.weight" in sd else 0
  qkv_bias = "blocks.0.attn.qkv.bias" in sd
  args = dict({"qkv_bias": True, "reg_tokens": 0}, **args)  # VisionTransformer's defaults
  for key, ours in (("patch_size", patch), ("embed_dim", width), ("depth", depth),
                    ("in_chans", channels), ("num_classes", num_classes),
                    ("class_token", class_token), ("qkv_bias", qkv_bias),
                    ("reg_tokens", registers)):
    if key in args and args[key] != ours:
      raise ConfigError(f"timm model_args {key}={args[key]!r} but the tensors have "
                        f"{key}={ours!r}")
  size = args["img_size"]
  size = (size, size) if isinstance(size, int) else tuple(size)
  pos = sd["pos_embed"]  # [1, (prefix +) N, D]
  tokens = (size[0] // patch) * (size[1] // patch)
  folded = 0 if args.get("no_embed_class", False) else class_token + registers
  if pos.shape[1] != tokens + folded:
    raise ConfigError(f"timm pos_embed has {pos.shape[1]} positions; image size {size} in "
                      f"patches of {patch} gives {tokens}"
                      f"{_prefix_words(class_token, registers) if folded else ''}")
  heads = args["num_heads"]
  if width % heads:
    raise ConfigError(f"timm num_heads={heads} does not divide the width {width}")
  mlp = _MLP_LAYERS[args.get("mlp_layer")]
  mlp_dim = _mlp_dim(sd, mlp)
  layerscale = "blocks.0.ls1.gamma" in sd
  pool = _pool(args, class_token, num_classes, registers)
  kwargs = dict(num_classes=num_classes, patch_size=patch, width=width, depth=depth,
                mlp_dim=mlp_dim, num_heads=heads, channels=channels,
                image_size=size[0] if size[0] == size[1] else size,
                pool=pool, posemb="learn", layerscale=(args.get("init_values") or 1.0)
                if layerscale else None,
                mlp_activation="gelu" if mlp == "swiglu" else _ACTIVATIONS[args.get("act_layer")],
                mlp=mlp, qkv_bias=qkv_bias, num_registers=registers,
                patch_bias="patch_embed.proj.bias" in sd, pre_norm="norm_pre.weight" in sd,
                ln_eps=1e-6, head_zero_init=False, posemb_resample="bicubic_antialias")
  params = {"embedding": _linear_patch(sd, conv, patch * patch * channels, width),
            "pos_embedding": pos[:, folded:], "norm": _norm(sd, "norm"),
            "blocks": {i: _block(sd, f"blocks.{i}", layerscale, qkv_bias, mlp)
                       for i in range(depth)}}
  if class_token:
    params["cls_token"] = sd["cls_token"] + pos[:, :1] if folded else sd["cls_token"]
  if registers:
    start = int(class_token)
    params["registers"] = (sd["reg_token"] + pos[:, start:start + registers] if folded
                           else sd["reg_token"])
  if kwargs["pre_norm"]:
    params["pre_norm"] = _norm(sd, "norm_pre")
  if num_classes:
    params["head"] = _linear(sd, "head")
  unread = sorted(set(sd) - sd.read)
  if unread:
    raise ConfigError(f"timm checkpoint tensors not mapped onto our ViT: "
                      f"{', '.join(unread[:4])}{' ...' if len(unread) > 4 else ''}")
  return kwargs, params


def _prefix_words(class_token, registers):
  words = [" + 1 class token"] if class_token else []
  return "".join(words + ([f" + {registers} registers"] if registers else []))


def _mlp_dim(sd, mlp):
  """Our `mlp_dim`: fc2's input width (SwiGLUPacked's fc1 packs [gate; up], twice as
  many rows). The tensors must be the MLP the architecture names, not guessed from them."""
  fc1, fc2 = sd["blocks.0.mlp.fc1.weight"], sd["blocks.0.mlp.fc2.weight"]
  gated = fc1.shape[0] == 2 * fc2.shape[1]
  if fc1.shape[0] != fc2.shape[1] and not gated:
    raise ConfigError(f"timm blocks.0.mlp has fc1 {fc1.shape} and fc2 {fc2.shape}: neither an "
                      f"Mlp nor a packed SwiGLU")
  if gated != (mlp == "swiglu"):
    raise ConfigError(f"timm blocks.0.mlp is {'gated' if gated else 'not gated'} (fc1 "
                      f"{fc1.shape}, fc2 {fc2.shape}) but the architecture's mlp_layer is "
                      f"{'SwiGLUPacked' if mlp == 'swiglu' else 'Mlp'}")
  return fc2.shape[1]


def _linear_patch(sd, conv, fan_in, width):
  """The patch conv [D, C, p, p] as our patchify matmul [(p, p, C), D]."""
  out = {"kernel": conv.transpose(2, 3, 1, 0).reshape(fan_in, width)}
  if "patch_embed.proj.bias" in sd:
    out["bias"] = sd["patch_embed.proj.bias"]
  return out


def _split(sd, name, parts, bias):
  """A fused torch Linear [n * out, in] as n of our dense layers, rows in order."""
  kernels = np.split(sd[f"{name}.weight"].T, parts, axis=1)
  biases = np.split(sd[f"{name}.bias"], parts) if bias else [None] * parts
  return [{"kernel": k} if b is None else {"kernel": k, "bias": b}
          for k, b in zip(kernels, biases)]


def _block(sd, p, layerscale, qkv_bias, mlp):
  """One timm Block: the fused qkv split into our query, key and value;
  SwiGLUPacked's fc1 into our gate (its first half, the activated one) and fc1."""
  q, k, v = _split(sd, f"{p}.attn.qkv", 3, qkv_bias)
  if mlp == "swiglu":
    gate, up = _split(sd, f"{p}.mlp.fc1", 2, bias=True)
    mlp_params = {"gate": gate, "fc1": up, "fc2": _linear(sd, f"{p}.mlp.fc2")}
  else:
    mlp_params = {"fc1": _linear(sd, f"{p}.mlp.fc1"), "fc2": _linear(sd, f"{p}.mlp.fc2")}
  block = {
      "norm1": _norm(sd, f"{p}.norm1"),
      "norm2": _norm(sd, f"{p}.norm2"),
      "attn": {"query": q, "key": k, "value": v, "out": _linear(sd, f"{p}.attn.proj")},
      "mlp": mlp_params,
  }
  if layerscale:
    block["ls1"] = {"gamma": sd[f"{p}.ls1.gamma"]}
    block["ls2"] = {"gamma": sd[f"{p}.ls2.gamma"]}
  return block
