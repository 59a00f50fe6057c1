"""Preprocessing as plain config data: a list of {'name': ..., **kwargs}.

Each transform maps an element dict to an element dict on the host (numpy /
PIL). Geometric transforms apply the same operation to 'image' and, when
present, 'mask' (segmentation), so image and labels stay aligned. Random
transforms draw from the numpy Generator grain seeds per element and epoch,
which makes the pipeline deterministic and resumable.
"""
from __future__ import annotations

import io
import math
from typing import Any, Callable, Sequence

import grain
import numpy as np
from PIL import Image

from big_vision_like.registry import ConfigError, Registry, check_kwargs

TRANSFORMS = Registry("transform", "transforms[].name")
GEOMETRIC_KEYS = ("image", "mask")


def _geometric(element: dict, fn: Callable[[np.ndarray, bool], np.ndarray]) -> dict:
  """Applies fn(array, is_mask) to the image and any mask alike."""
  out = dict(element)
  for key in GEOMETRIC_KEYS:
    if key in out:
      out[key] = fn(out[key], key == "mask")
  return out


def _pil_resize(array: np.ndarray, hw: tuple[int, int], is_mask: bool,
                method: str) -> np.ndarray:
  squeeze = array.ndim == 3 and array.shape[-1] == 1
  img = Image.fromarray(array[..., 0] if squeeze else array)
  resample = Image.NEAREST if is_mask else {
      "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC,
      "nearest": Image.NEAREST, "area": Image.BOX}[method]
  out = np.asarray(img.resize((hw[1], hw[0]), resample))
  return out[..., None] if squeeze else out


def _hw(size) -> tuple[int, int]:
  return (int(size), int(size)) if np.isscalar(size) else (int(size[0]), int(size[1]))


@TRANSFORMS.register("decode")
def decode(element, rng, channels: int = 3):
  """Encoded bytes (or an array) -> uint8 [H, W, channels]."""
  del rng
  image = element["image"]
  if isinstance(image, (bytes, np.bytes_)):
    try:
      pil = Image.open(io.BytesIO(image))
      pil = pil.convert("L" if channels == 1 else "RGB")
    except Exception as e:
      raise ValueError(f"cannot decode image of label {element.get('label')}: {e}") from e
    image = np.asarray(pil)
  image = np.asarray(image)
  if image.ndim == 2:
    image = image[..., None]
  if image.shape[-1] == 1 and channels == 3:
    image = np.repeat(image, 3, axis=-1)
  elif image.shape[-1] == 3 and channels == 1:
    image = np.asarray(Image.fromarray(image).convert("L"))[..., None]
  mask = element.get("mask")
  if mask is not None and np.shape(mask)[:2] != image.shape[:2]:
    raise ValueError(f"segmentation mask is {np.shape(mask)[0]}x{np.shape(mask)[1]} but its "
                     f"image is {image.shape[0]}x{image.shape[1]} (label "
                     f"{element.get('label')}); masks must match their images")
  return {**element, "image": image}


@TRANSFORMS.register("resize")
def resize(element, rng, size, method: str = "bilinear"):
  """Resize to size x size (or (h, w)), ignoring the aspect ratio."""
  del rng
  return _geometric(element, lambda a, m: _pil_resize(a, _hw(size), m, method))


@TRANSFORMS.register("resize_small")
def resize_small(element, rng, size: int, method: str = "bilinear"):
  """Resize so the shorter side is `size`, keeping the aspect ratio."""
  del rng
  h, w = element["image"].shape[:2]
  ratio = size / min(h, w)
  hw = (max(size, round(h * ratio)), max(size, round(w * ratio)))
  return _geometric(element, lambda a, m: _pil_resize(a, hw, m, method))


@TRANSFORMS.register("center_crop")
def center_crop(element, rng, size):
  del rng
  ch, cw = _hw(size)
  h, w = element["image"].shape[:2]
  if h < ch or w < cw:
    raise ValueError(f"center_crop size {ch}x{cw} is larger than the image {h}x{w}")
  top, left = (h - ch) // 2, (w - cw) // 2
  return _geometric(element, lambda a, m: a[top:top + ch, left:left + cw])


@TRANSFORMS.register("random_crop")
def random_crop(element, rng, size, padding: int = 0, pad_mode: str = "reflect"):
  """Pads by `padding` on each side then crops size x size at random (CIFAR style)."""
  ch, cw = _hw(size)

  def pad(a, is_mask):
    if not padding:
      return a
    widths = ((padding, padding), (padding, padding)) + ((0, 0),) * (a.ndim - 2)
    return np.pad(a, widths, mode="constant" if is_mask else pad_mode)

  element = _geometric(element, pad)
  h, w = element["image"].shape[:2]
  if h < ch or w < cw:
    raise ValueError(f"random_crop size {ch}x{cw} is larger than the image {h}x{w}")
  top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
  return _geometric(element, lambda a, m: a[top:top + ch, left:left + cw])


@TRANSFORMS.register("random_resized_crop")
def random_resized_crop(element, rng, size, scale: Sequence[float] = (0.08, 1.0),
                        ratio: Sequence[float] = (3 / 4, 4 / 3),
                        method: str = "bilinear"):
  """Inception-style crop of random area and aspect ratio, resized to `size`."""
  h, w = element["image"].shape[:2]
  area = h * w
  for _ in range(10):
    target = area * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
    cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
    if 0 < cw <= w and 0 < ch <= h:
      top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
      break
  else:  # fall back to a central crop with the closest allowed aspect ratio
    aspect = min(max(w / h, ratio[0]), ratio[1])
    cw, ch = (w, round(w / aspect)) if w / h < aspect else (round(h * aspect), h)
    cw, ch = min(cw, w), min(ch, h)
    top, left = (h - ch) // 2, (w - cw) // 2
  out_hw = _hw(size)
  return _geometric(element, lambda a, m: _pil_resize(
      a[top:top + ch, left:left + cw], out_hw, m, method))


@TRANSFORMS.register("flip_lr")
def flip_lr(element, rng, p: float = 0.5):
  if rng.random() >= p:
    return element
  return _geometric(element, lambda a, m: a[:, ::-1])


@TRANSFORMS.register("normalize")
def normalize(element, rng, mean: Sequence[float] | None = None,
              std: Sequence[float] | None = None):
  """uint8 -> float32: to [-1, 1] by default, or (x/255 - mean) / std."""
  del rng
  image = element["image"].astype(np.float32)
  if mean is None and std is None:
    image = image / 127.5 - 1.0
  else:
    mean = np.asarray(mean if mean is not None else 0.0, np.float32)
    std = np.asarray(std if std is not None else 1.0, np.float32)
    image = (image / 255.0 - mean) / std
  return {**element, "image": image}


class Preprocess(grain.transforms.RandomMap):
  """A list of transform specs as one grain random map (picklable for workers)."""

  def __init__(self, specs: Sequence[Any], field: str):
    self.steps = []
    for i, spec in enumerate(specs or ()):
      spec = dict(spec)
      name = spec.pop("name", None)
      if name is None:
        raise ConfigError(f"{field}[{i}] has no 'name'; valid names: "
                          f"{', '.join(TRANSFORMS.names())}")
      if name not in TRANSFORMS:
        raise ConfigError(f"{field}[{i}].name={name!r} is not a known transform; "
                          f"valid names: {', '.join(TRANSFORMS.names())}")
      check_kwargs(TRANSFORMS.get(name), spec, f"{field}[{i}]",
                   what=f"transform {name!r}", skip=("element", "rng"))
      self.steps.append((name, spec))

  def random_map(self, element, rng: np.random.Generator):
    for name, kwargs in self.steps:
      element = TRANSFORMS.get(name)(element, rng, **kwargs)
    element["label"] = np.int32(element["label"])
    return element
