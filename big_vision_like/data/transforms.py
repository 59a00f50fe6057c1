"""Preprocessing as plain config data: a list of {'name': ..., **kwargs}.

Each transform maps an element dict to an element dict on the host (numpy /
PIL). Geometric transforms apply the same operation to 'image' and, when
present, 'mask' (segmentation), so image and labels stay aligned. Random
transforms draw from the numpy Generator grain seeds per element and epoch,
which makes the pipeline deterministic and resumable.

A transform parameter named like a CONTEXT_KEYS entry ('tokenizer',
'classes') is filled in by the pipeline from the data config and the source,
never from the transform's spec.

An example a transform cannot use (an undecodable image, one smaller than the
crop) raises BadExample, a one-line ConfigError naming the example's file
(the source's '_path'), which preprocessing drops before batching.
"""
from __future__ import annotations

import inspect
import io
import math
from typing import Any, Callable, Sequence

import grain
import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from big_vision_like.data.prompts import DEFAULT_TEMPLATES, class_prompt
from big_vision_like.data.sources import PATH_KEY, pil_reason
from big_vision_like.registry import ConfigError, Registry, check_kwargs

TRANSFORMS = Registry("transform", "transforms[].name")
GEOMETRIC_KEYS = ("image", "mask")
# Transform parameters the pipeline fills in, and where their values come from.
CONTEXT_KEYS = {"tokenizer": "the data config's 'tokenizer' field",
                "classes": "the data source's class names"}
ON_ERROR = ("raise", "skip")  # decode's choices for an undecodable image


class BadExample(ConfigError):
  """One example's data is unusable (not the config); the message names its file."""


class UndecodableImage(BadExample):
  """`decode` cannot read the image."""


class SkippedImage(UndecodableImage):
  """`decode(on_error='skip')` cannot read the image: the pipeline substitutes another."""


def _which(element: dict) -> str:
  """The example's file for messages, or its label where the source reads no files."""
  path = element.get(PATH_KEY)
  return str(path) if path else f"of label {element.get('label')}"


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
def decode(element, rng, channels: int = 3, on_error: str = "raise"):
  """Encoded bytes (or an array) -> uint8 [H, W, channels].

  An undecodable image (corrupt, truncated, empty, not an image) raises an
  error naming its file; on_error='skip' lets the pipeline replace the
  example by the next readable one and count it (for large web datasets).
  """
  del rng
  image = element["image"]
  if isinstance(image, (bytes, np.bytes_)):
    try:
      pil = Image.open(io.BytesIO(image))
      pil = pil.convert("L" if channels == 1 else "RGB")
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, zlib.error)
      error = SkippedImage if on_error == "skip" else UndecodableImage
      raise error(f"cannot decode image {_which(element)}: {pil_reason(e)}") from None
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
    raise BadExample(f"segmentation mask is {np.shape(mask)[0]}x{np.shape(mask)[1]} but its "
                     f"image is {image.shape[0]}x{image.shape[1]} (image {_which(element)}); "
                     "masks must match their images")
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
    raise BadExample(f"center_crop size {ch}x{cw} is larger than image {_which(element)} "
                     f"({h}x{w}); resize it first (e.g. resize_small)")
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
    padded = f", {h}x{w} with padding {padding}" if padding else ""
    raise BadExample(f"random_crop size {ch}x{cw} is larger than image {_which(element)} "
                     f"({h - 2 * padding}x{w - 2 * padding}{padded}); resize it first "
                     "(e.g. resize_small)")
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


def _uint8_image(element: dict, what: str) -> np.ndarray:
  image = element["image"]
  if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3:
    raise ValueError(f"{what} needs a decoded uint8 [H, W, C] image; put 'decode' "
                     f"before it (got {type(image).__name__} {getattr(image, 'dtype', '')})")
  return image


def _to_pil(image: np.ndarray) -> Image.Image:
  return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)


def _from_pil(pil: Image.Image) -> np.ndarray:
  out = np.asarray(pil)
  return out[..., None] if out.ndim == 2 else out


def _factor(rng: np.random.Generator, strength: float) -> float:
  return float(rng.uniform(max(0.0, 1.0 - strength), 1.0 + strength))


def _shift_hue(pil: Image.Image, shift: float) -> Image.Image:
  """Rotates the hue by `shift` of a full turn (torchvision's adjust_hue)."""
  h, s, v = pil.convert("HSV").split()
  h = (np.asarray(h, np.int32) + round(shift * 255)) % 256
  return Image.merge("HSV", (Image.fromarray(h.astype(np.uint8)), s, v)).convert("RGB")


@TRANSFORMS.register("color_jitter")
def color_jitter(element, rng, brightness: float = 0.4, contrast: float = 0.4,
                 saturation: float = 0.2, hue: float = 0.1, p: float = 0.8):
  """With probability p, torchvision-style ColorJitter: the four adjustments in
  random order; factors uniform in [1 - x, 1 + x], hue shifted by [-hue, hue]."""
  if rng.random() >= p:
    return element
  pil = _to_pil(_uint8_image(element, "color_jitter"))
  for op in rng.permutation(4):
    if op == 0 and brightness:
      pil = ImageEnhance.Brightness(pil).enhance(_factor(rng, brightness))
    elif op == 1 and contrast:
      pil = ImageEnhance.Contrast(pil).enhance(_factor(rng, contrast))
    elif op == 2 and saturation and pil.mode == "RGB":
      pil = ImageEnhance.Color(pil).enhance(_factor(rng, saturation))
    elif op == 3 and hue and pil.mode == "RGB":
      pil = _shift_hue(pil, rng.uniform(-hue, hue))
  return {**element, "image": _from_pil(pil)}


@TRANSFORMS.register("grayscale")
def grayscale(element, rng, p: float = 0.2):
  """With probability p, grey levels in every channel (the channel count is kept)."""
  if rng.random() >= p:
    return element
  image = _uint8_image(element, "grayscale")
  grey = np.asarray(_to_pil(image).convert("L"))[..., None]
  return {**element, "image": np.repeat(grey, image.shape[-1], axis=-1)}


@TRANSFORMS.register("gaussian_blur")
def gaussian_blur(element, rng, p: float = 0.5, sigma: Sequence[float] = (0.1, 2.0)):
  """With probability p, a Gaussian blur of standard deviation uniform in `sigma`."""
  if rng.random() >= p:
    return element
  low, high = (sigma, sigma) if np.isscalar(sigma) else sigma
  radius = float(rng.uniform(low, high))
  pil = _to_pil(_uint8_image(element, "gaussian_blur"))
  return {**element, "image": _from_pil(pil.filter(ImageFilter.GaussianBlur(radius)))}


@TRANSFORMS.register("solarize")
def solarize(element, rng, p: float = 0.2, threshold: int = 128):
  """With probability p, inverts the pixels >= threshold."""
  if rng.random() >= p:
    return element
  image = _uint8_image(element, "solarize")
  return {**element, "image": np.where(image >= threshold, 255 - image, image)}


def _dino_view(image, rng, size, scale, blur_p, solarize_p, mean, std) -> np.ndarray:
  """One augmented multi-crop view, normalised to float32."""
  view = random_resized_crop({"image": image}, rng, size, scale=scale, method="bicubic")
  view = flip_lr(view, rng)
  view = color_jitter(view, rng, p=0.8)
  view = grayscale(view, rng, p=0.2)
  view = gaussian_blur(view, rng, p=blur_p)
  view = solarize(view, rng, p=solarize_p)
  return normalize(view, None, mean=mean, std=std)["image"]


@TRANSFORMS.register("multi_crop")
def multi_crop(element, rng, global_size, local_size, num_local: int = 6,
               global_scale: Sequence[float] = (0.4, 1.0),
               local_scale: Sequence[float] = (0.05, 0.4),
               mean: Sequence[float] | None = None, std: Sequence[float] | None = None):
  """DINO multi-crop: 2 global and `num_local` local views of one decoded image.

  'image' becomes float32 [2, global, global, C]; 'local_crops' float32
  [num_local, local, local, C] (absent when num_local is 0). Global view 1 is
  always blurred, view 2 rarely (p=0.1) and sometimes solarised (p=0.2);
  local views are blurred with p=0.5. Any 'mask' is dropped.
  """
  if int(num_local) < 0:
    raise ConfigError(f"multi_crop num_local={num_local} must be >= 0")
  image = _uint8_image(element, "multi_crop")
  views = [_dino_view(image, rng, global_size, global_scale, 1.0, 0.0, mean, std),
           _dino_view(image, rng, global_size, global_scale, 0.1, 0.2, mean, std)]
  local = [_dino_view(image, rng, local_size, local_scale, 0.5, 0.0, mean, std)
           for _ in range(int(num_local))]
  out = {k: v for k, v in element.items() if k not in ("mask", "local_crops")}
  out["image"] = np.stack(views)
  if local:
    out["local_crops"] = np.stack(local)
  return out


@TRANSFORMS.register("class_caption")
def class_caption(element, rng, classes, templates: Sequence[str] = DEFAULT_TEMPLATES):
  """element['text'] = a random prompt template filled with the label's class name."""
  if not classes:
    raise ConfigError("class_caption needs class names: the data source has none "
                      "(image_folder and array_record have them; idx takes classes=(...))")
  if not templates:
    raise ConfigError("class_caption templates is empty")
  label = int(element["label"])
  if not 0 <= label < len(classes):
    raise ValueError(f"class_caption: label {label} has no name among {len(classes)} classes")
  template = templates[int(rng.integers(len(templates)))]
  return {**element, "text": class_prompt(template, classes[label])}


@TRANSFORMS.register("tokenize")
def tokenize(element, rng, tokenizer, key: str = "text", all_captions: bool = False):
  """element[key] (a str or a list of captions) -> int32 element['text'].

  A list gives one caption drawn at random, or with all_captions every one of
  them as [n, max_len] (for retrieval evaluation). The raw text is removed.
  """
  if tokenizer is None:
    raise ConfigError("tokenize needs a tokenizer: set the data config's 'tokenizer' "
                      "field, e.g. {'name': 'bytes', 'max_len': 32}")
  if key not in element:
    raise ValueError(f"tokenize: the element has no {key!r} field "
                     f"(it has {', '.join(sorted(element))})")
  text = element[key]
  captions = [text] if isinstance(text, str) else [str(t) for t in text]
  if not captions:
    raise ValueError(f"tokenize: element[{key!r}] holds no caption")
  if all_captions:
    tokens = tokenizer.encode_batch(captions)
  else:
    pick = int(rng.integers(len(captions))) if len(captions) > 1 else 0
    tokens = tokenizer.encode(captions[pick])
  out = {k: v for k, v in element.items() if k != key}
  out["text"] = tokens
  return out


def _is_text(value) -> bool:
  """Python strings or lists of them: raw text that cannot go into a batch."""
  if isinstance(value, str):
    return True
  return isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)


def _has_value(value) -> bool:
  return value is not None and (not isinstance(value, (tuple, list)) or len(value) > 0)


def _context_params(fn: Callable) -> tuple[str, ...]:
  return tuple(n for n in inspect.signature(fn).parameters if n in CONTEXT_KEYS)


def _missing_context(key: str, data_field: str) -> str:
  if key == "tokenizer":
    return (f"a tokenizer: set {data_field}.tokenizer, e.g. "
            "{'name': 'bytes', 'max_len': 32}")
  return ("class names, but the data source has none (image_folder and "
          "array_record have them; idx takes classes=(...))")


class Preprocess(grain.transforms.RandomMap):
  """A list of transform specs as one grain random map (picklable for workers).

  `context` ({'tokenizer': Tokenizer, 'classes': names}) feeds transforms that
  take a parameter of that name; when it is given, a transform whose context
  value is missing is rejected here rather than on the first element.
  `skips_undecodable`: a 'decode' step has on_error='skip' (the pipeline then
  substitutes examples it skips).
  """

  def __init__(self, specs: Sequence[Any], field: str, context: dict | None = None):
    data_field = field.rsplit(".", 1)[0]
    self.steps = []
    self.skips_undecodable = False
    for i, spec in enumerate(specs or ()):
      spec = dict(spec)
      name = spec.pop("name", None)
      if name is None:
        raise ConfigError(f"{field}[{i}] has no 'name'; valid names: "
                          f"{', '.join(TRANSFORMS.names())}")
      if name not in TRANSFORMS:
        raise ConfigError(f"{field}[{i}].name={name!r} is not a known transform; "
                          f"valid names: {', '.join(TRANSFORMS.names())}")
      for key in CONTEXT_KEYS:
        if key in spec:
          raise ConfigError(f"{field}[{i}].{key} cannot be set in a transform: it "
                            f"comes from {CONTEXT_KEYS[key]}")
      fn = TRANSFORMS.get(name)
      check_kwargs(fn, spec, f"{field}[{i}]", what=f"transform {name!r}",
                   skip=("element", "rng", *CONTEXT_KEYS))
      if name == "decode":
        on_error = spec.get("on_error", "raise")
        if on_error not in ON_ERROR:
          raise ConfigError(f"{field}[{i}].on_error={on_error!r} is not one of "
                            f"{', '.join(ON_ERROR)}")
        self.skips_undecodable |= on_error == "skip"
      for key in _context_params(fn):
        if context is not None and not _has_value(context.get(key)):
          raise ConfigError(f"{field}[{i}]: transform {name!r} needs "
                            f"{_missing_context(key, data_field)}")
        spec[key] = (context or {}).get(key)
      self.steps.append((name, spec))

  def random_map(self, element, rng: np.random.Generator):
    for name, kwargs in self.steps:
      try:
        element = TRANSFORMS.get(name)(element, rng, **kwargs)
      except ConfigError:  # names the example itself where it is about one
        raise
      except Exception as e:  # an unexpected failure: say where, keep the traceback
        e.add_note(f"in transform {name!r}, example {_which(element)}")
        raise
    element = {k: v for k, v in element.items() if k != PATH_KEY and not _is_text(v)}
    if "label" in element:
      element["label"] = np.int32(element["label"])
    return element

