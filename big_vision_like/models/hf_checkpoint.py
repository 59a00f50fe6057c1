"""HuggingFace and timm checkpoint directories -> our config.model and parameters, offline.

A directory as `huggingface-cli download REPO` leaves it: config.json and the weights
in safetensors (`model.safetensors`, or shards listed by `model.safetensors.index.json`).
`read(path)` gives a `Checkpoint` (config + numpy tensors), `convert(checkpoint)` a
`Converted` (config.model, config.objective, parameters rooted at the objective: put
them in with `convert_hf.assign`).

The `safetensors` package parses the files (no torch, and no reader of ours: the format
is theirs to get right); we only name numpy's dtype for each of its dtypes, bfloat16 and
float8 (ml_dtypes) included, which `safetensors.numpy` lacks. Files are read through
etils.epath, so a path may be remote (gs://...) as well as local; each file is read
whole into memory.

config.json tells the two libraries apart: transformers writes `model_type`, timm
`architecture` (+ `pretrained_cfg`, `model_args`). The conversion itself is
convert_hf's (transformers) and convert_timm's (timm); an architecture they do not
map exactly is a one-line ConfigError, never a silently different model.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

import ml_dtypes
import numpy as np
import safetensors

from big_vision_like import workdir
from big_vision_like.models import convert_hf, convert_timm
from big_vision_like.registry import ConfigError, first_line

_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
           "BF16": ml_dtypes.bfloat16, "F8_E4M3": ml_dtypes.float8_e4m3fn,
           "F8_E5M2": ml_dtypes.float8_e5m2, "I64": np.int64, "I32": np.int32,
           "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
SINGLE, INDEX = "model.safetensors", "model.safetensors.index.json"


@dataclasses.dataclass
class Checkpoint:
  """What a checkpoint directory holds. `model_type` is timm's architecture for timm."""
  path: str
  kind: str  # 'transformers' or 'timm'
  model_type: str
  config: dict[str, Any]
  tensors: dict[str, np.ndarray]


@dataclasses.dataclass
class Converted:
  """Our config.model (with `name`), config.objective (None for a backbone alone) and
  the parameters rooted at the objective (`{'backbone': ...}` for a backbone).
  `unused` names the checkpoint's tensors that are not loaded (a pooler, a projection)."""
  model: dict[str, Any]
  objective: dict[str, Any] | None
  params: dict[str, Any]
  description: str
  unused: tuple[str, ...] = ()


def is_checkpoint_directory(path) -> bool:
  """A directory with config.json and weights (safetensors, an index or pytorch_model.bin)."""
  root = workdir.path(path)
  try:
    return (root / "config.json").exists() and any(
        n.endswith(".safetensors") or n == INDEX or n.startswith("pytorch_model.bin")
        for n in (p.name for p in root.iterdir()))
  except OSError:
    return False


def read(path) -> Checkpoint:
  """Reads config.json and every tensor of a HuggingFace / timm checkpoint directory."""
  root = workdir.path(path)
  if not root.is_dir():
    raise ConfigError(f"checkpoint directory {path}: no such directory")
  if not (root / "config.json").exists():
    raise ConfigError(f"checkpoint directory {path} has no config.json (not a HuggingFace or "
                      f"timm checkpoint as `huggingface-cli download` leaves it)")
  try:
    config = json.loads((root / "config.json").read_text())
  except ValueError as e:
    raise ConfigError(f"{path}/config.json is not JSON: {first_line(e)}") from None
  if "architecture" in config:
    kind, model_type = "timm", config["architecture"]
  elif "model_type" in config:
    kind, model_type = "transformers", config["model_type"]
  else:
    raise ConfigError(f"{path}/config.json has neither `model_type` (transformers) nor "
                      f"`architecture` (timm)")
  return Checkpoint(str(root), kind, model_type, config, _read_tensors(root, path, config))


def _read_tensors(root, path, config) -> dict[str, np.ndarray]:
  """model.safetensors, else the shards model.safetensors.index.json names."""
  names = {p.name for p in root.iterdir()}
  others = sorted(n for n in names if n.endswith(".safetensors"))
  if SINGLE in names:
    files, weight_map = [SINGLE], None
  elif INDEX in names:
    try:
      weight_map = json.loads((root / INDEX).read_text())["weight_map"]
    except (ValueError, KeyError) as e:
      raise ConfigError(f"{path}/{INDEX} has no JSON weight_map: {first_line(e)}") from None
    files = sorted(set(weight_map.values()))
    missing = [f for f in files if f not in names]
    if missing:
      raise ConfigError(f"{path}: shard {missing[0]} named by {INDEX} is missing "
                        f"({len(missing)} of {len(files)} shards missing)")
  elif len(others) == 1:
    files, weight_map = others, None
  elif others:
    raise ConfigError(f"{path} has several safetensors files and no {INDEX}: "
                      f"{', '.join(others)}; which one is the model is not known")
  elif any(n.startswith("pytorch_model.bin") for n in names):
    if "architecture" in config:
      convert = ("with timm: `timm.models.save_for_hf(timm.create_model('local-dir:DIR', "
                 "pretrained=True), OUT, safe_serialization=True)`")
    else:
      model_class = (config.get("architectures") or ["AutoModel"])[0]
      convert = (f"with transformers: `{model_class}.from_pretrained(DIR).save_pretrained(OUT, "
                 f"safe_serialization=True)`")
    raise ConfigError(
        f"{path} has only pytorch_model.bin; this codebase reads safetensors without torch: "
        f"download them with `huggingface-cli download REPO --include '*.safetensors' "
        f"config.json`, or convert once {convert}")
  else:
    raise ConfigError(f"{path} has config.json but no weights (model.safetensors or {INDEX})")
  tensors = {}
  for name in files:
    tensors.update(_load(root / name, f"{path}/{name}"))
  if weight_map is not None and set(weight_map) != set(tensors):
    absent = sorted(set(weight_map) - set(tensors)) or sorted(set(tensors) - set(weight_map))
    raise ConfigError(f"{path}: the shards do not hold the tensors {INDEX} lists "
                      f"(e.g. {absent[0]!r})")
  return tensors


def _load(file, where) -> dict[str, np.ndarray]:
  try:
    items = safetensors.deserialize(file.read_bytes())
  except Exception as e:  # pylint: disable=broad-except  # safetensors' error types vary
    raise ConfigError(f"{where} is not a readable safetensors file: {first_line(e)}") from None
  out = {}
  for name, view in items:
    if view["dtype"] not in _DTYPES:
      raise ConfigError(f"{where}: tensor {name} has dtype {view['dtype']}, which is not read")
    out[name] = np.frombuffer(view["data"], _DTYPES[view["dtype"]]).reshape(view["shape"])
  return out


# -- convert: config.json's model_type picks a convert_hf loader ---------------------------
#
# A backbone loader returns (model kwargs, backbone parameters), an objective loader
# (config.model, config.objective, parameters of the objective).

_BACKBONES = {
    "vit": ("vit", convert_hf.load_hf_vit),
    "swin": ("swin", convert_hf.load_hf_swin),
    "perceiver": ("perceiver", convert_hf.load_hf_perceiver),
    "dinov2": ("vit", convert_hf.load_hf_dinov2),
    "dinov2_with_registers": ("vit", convert_hf.load_hf_dinov2),
    "clip_vision_model": ("vit", convert_hf.load_hf_clip_vision),
    "siglip_vision_model": ("vit", convert_hf.load_hf_siglip_vision),
}
_OBJECTIVES = {
    "clip": convert_hf.load_hf_clip,
    "siglip": convert_hf.load_hf_siglip,
    "vit_mae": convert_hf.load_hf_mae,
}
# The HF classes of each model_type that convert (config.json's `architectures`).
_ARCHITECTURES = {
    "vit": {"ViTModel", "ViTForImageClassification", "ViTForMaskedImageModeling"},
    "swin": {"SwinModel", "SwinForImageClassification", "SwinForMaskedImageModeling"},
    "perceiver": {"PerceiverForImageClassificationLearned",
                  "PerceiverForImageClassificationFourier"},
    "dinov2": {"Dinov2Model"},
    "dinov2_with_registers": {"Dinov2WithRegistersModel"},
    "clip_vision_model": {"CLIPVisionModel", "CLIPVisionModelWithProjection"},
    "siglip_vision_model": {"SiglipVisionModel"},
    "clip": {"CLIPModel"},
    "siglip": {"SiglipModel"},
    "vit_mae": {"ViTMAEForPreTraining"},
}
# Tensors the loaders leave out, by model_type (prefixes).
_UNUSED = {
    "vit": ("pooler.", "vit.pooler.", "vit.embeddings.mask_token", "decoder."),
    "swin": ("swin.embeddings.mask_token", "decoder."),
    "dinov2": ("embeddings.mask_token", "dinov2.embeddings.mask_token"),
    "dinov2_with_registers": ("embeddings.mask_token",
                              "dinov2_with_registers.embeddings.mask_token"),
    "clip_vision_model": ("visual_projection.",),
}
# config.json options the loaders do not read but that change the model (value that maps).
_OPTIONS = {"vit": {"qkv_bias": True}, "swin": {"qkv_bias": True}}


def convert(checkpoint: Checkpoint) -> Converted:
  """Our config.model, config.objective and parameters for a checkpoint read by `read`."""
  if checkpoint.kind == "timm":
    kwargs, params = _call(checkpoint, convert_timm.load_timm_vit)
    model = dict(name="vit", **kwargs)
    return Converted(model, None, {"backbone": params},
                     f"timm {checkpoint.model_type}, {_size(model)}")
  c, model_type = checkpoint.config, checkpoint.model_type
  if model_type not in _BACKBONES and model_type not in _OBJECTIVES:
    raise ConfigError(f"{checkpoint.path}: HF model_type {model_type!r} has no converter; "
                      f"handled: {', '.join(sorted({**_BACKBONES, **_OBJECTIVES}))} and timm "
                      f"VisionTransformer")
  architecture = (c.get("architectures") or [model_type])[0]
  handled = sorted(_ARCHITECTURES[model_type])
  refused = [a for a in c.get("architectures") or () if a not in handled]
  if refused:
    raise ConfigError(f"{checkpoint.path}: HF {refused[0]} (model_type {model_type!r}) does not "
                      f"convert; of that model_type: {', '.join(handled)}")
  for key, value in _OPTIONS.get(model_type, {}).items():
    if c.get(key, value) != value:
      raise ConfigError(f"{checkpoint.path}: HF {model_type} {key}={c[key]!r} is not mapped "
                        f"(only {key}={value!r})")
  prefixes = _UNUSED.get(model_type)
  unused = tuple(sorted(k for k in checkpoint.tensors if prefixes and k.startswith(prefixes)))
  what = f"HF {architecture} (model_type {model_type!r})"
  if model_type in _BACKBONES:
    name, load = _BACKBONES[model_type]
    kwargs, params = _call(checkpoint, load)
    model, objective, params = dict(name=name, **kwargs), None, {"backbone": params}
  else:
    model, objective, params = _call(checkpoint, _OBJECTIVES[model_type])
    what += f", objective {objective['name']!r}"
  return Converted(model, objective, params, f"{what}, {_size(model)}", unused)


def _call(checkpoint, load):
  """A loader on the checkpoint; its errors as one line naming the directory."""
  try:
    return load(checkpoint.tensors, checkpoint.config)
  except ConfigError as e:
    raise ConfigError(f"{checkpoint.path}: {first_line(e)}") from None
  except KeyError as e:
    raise ConfigError(f"{checkpoint.path}: the {checkpoint.kind} {checkpoint.model_type!r} "
                      f"converter needs {e.args[0]!r}, which neither config.json nor the "
                      f"weights have") from None


def _size(model) -> str:
  if "depths" in model:  # swin
    return f"depths {tuple(model['depths'])}, width {model['embed_dim']}"
  if "latent_dim" in model:  # perceiver
    return (f"{model['num_blocks']} x {model['self_attends_per_block']} latent layers, "
            f"width {model['latent_dim']}")
  depth = model["depth"]
  return f"{depth} layer{'s' if depth != 1 else ''}, width {model['width']}"
