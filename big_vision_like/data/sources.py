"""Random-access data sources: `len(source)` and `source[i] -> {'image', 'label'}`.

'image' is a uint8 [H, W, C] array or encoded bytes (decoded by the 'decode'
transform); 'label' an int. Image-text sources give 'text' (a list of
captions) instead of 'label'. Sources with named labels have `classes`.
Sources that read files add PATH_KEY ('_path'), the file's location, so that
errors name the file; preprocessing drops it before batching.
Sources are picklable so grain worker processes can use them. Each one reads
a public layout as it is distributed.
"""
from __future__ import annotations

import functools
import gzip
import io
import json
import os
import struct
import tarfile
from typing import Sequence

import numpy as np
from PIL import Image

from big_vision_like.data import records
from big_vision_like.registry import ConfigError, Registry, first_line

SOURCES = Registry("data source", "config.input.source")
PATH_KEY = "_path"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")


@SOURCES.register("digits")
class DigitsSource:
  """scikit-learn's bundled 8x8 digits (1,797 real images, no download).

  Fixed split: a seeded permutation, 80% train (1,437) / 20% test (360).
  """
  num_classes = 10
  classes = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

  def __init__(self, split: str, data_dir: str | None = None):
    del data_dir  # bundled with scikit-learn
    from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
    if split not in ("train", "test"):
      raise ConfigError(f"split={split!r} is not a digits split; valid: train, test")
    digits = load_digits()
    order = np.random.RandomState(0).permutation(len(digits.target))
    n_train = int(0.8 * len(order))
    idx = order[:n_train] if split == "train" else order[n_train:]
    images = np.round(digits.images[idx] * (255.0 / 16.0)).astype(np.uint8)
    self.images = images[..., None]
    self.labels = digits.target[idx].astype(np.int32)

  def __len__(self):
    return len(self.labels)

  def __getitem__(self, i):
    return {"image": self.images[i], "label": self.labels[i]}


def _read_idx(path: str) -> np.ndarray:
  """Reads an IDX file (big-endian header, uint8 payload), gzipped or not."""
  opener = gzip.open if path.endswith(".gz") else open
  try:
    with opener(path, "rb") as f:
      data = f.read()
  except (OSError, EOFError) as e:
    raise ConfigError(f"cannot read IDX file {path}: {e}") from e
  if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] != 0x08:
    raise ConfigError(f"{path} is not a uint8 IDX file (bad magic number)")
  ndim = data[3]
  shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
  payload = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
  if payload.size != int(np.prod(shape)):
    raise ConfigError(f"{path} is truncated: header says {shape}, "
                      f"found {payload.size} values")
  return payload.reshape(shape)


@SOURCES.register("idx")
class IdxSource:
  """MNIST-style IDX files: `{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`.

  The files hold no label names; `classes` (e.g. Fashion-MNIST's 'T-shirt/top',
  'Trouser', ...) names them for captions and zero-shot evaluation.
  """

  PREFIX = {"train": "train", "test": "t10k"}

  def __init__(self, split: str, data_dir: str, classes: tuple = ()):
    if split not in self.PREFIX:
      raise ConfigError(f"split={split!r} is not an IDX split; valid: train, test")
    images = self._find(data_dir, f"{self.PREFIX[split]}-images-idx3-ubyte")
    labels = self._find(data_dir, f"{self.PREFIX[split]}-labels-idx1-ubyte")
    self.images = _read_idx(images)[..., None]
    self.labels = _read_idx(labels).astype(np.int32)
    if len(self.images) != len(self.labels):
      raise ConfigError(f"{images} has {len(self.images)} images but {labels} "
                        f"has {len(self.labels)} labels")
    self.num_classes = int(self.labels.max()) + 1
    self.classes = tuple(str(c) for c in (classes or ()))
    if self.classes and len(self.classes) < self.num_classes:
      raise ConfigError(f"classes has {len(self.classes)} names but {labels} has "
                        f"labels up to {self.num_classes - 1}")

  @staticmethod
  def _find(data_dir: str, stem: str) -> str:
    for name in (stem + ".gz", stem):
      if os.path.exists(os.path.join(data_dir, name)):
        return os.path.join(data_dir, name)
    raise ConfigError(f"no {stem}[.gz] in {data_dir}")

  def __len__(self):
    return len(self.labels)

  def __getitem__(self, i):
    return {"image": self.images[i], "label": self.labels[i]}


def pil_reason(error: Exception) -> str:
  """PIL's complaint on one line, without the BytesIO repr it names the file by."""
  if isinstance(error, Image.UnidentifiedImageError):
    return "not an image in any format PIL reads"
  return " ".join(str(error).split()) or type(error).__name__


@functools.lru_cache(maxsize=2)
def _scan_tar(path: str, mtime_ns: int, size: int) -> tuple[str, dict]:
  """('tar', {file: (offset, size)}) or, compressed, ('tar_mem', {file: bytes}): one
  scan per archive (and version of it) per process, though the train split, the
  test split and the class list each open it."""
  del mtime_ns, size  # the cache key: a rewritten archive is scanned again
  if not tarfile.is_tarfile(path):
    raise ConfigError(f"{path} is neither a directory nor a tar archive")
  compressed = path.endswith(("gz", "bz2", "xz"))
  files = {}
  with tarfile.open(path) as tar:
    for member in tar:
      if member.isfile():
        files[member.name] = (tar.extractfile(member).read() if compressed
                              else (member.offset_data, member.size))
  return ("tar_mem" if compressed else "tar"), files


class FileTree:
  """Files of a directory, a .tar or a compressed tar, by relative '/' path.

  A directory or plain tar is read lazily (a tar by file offset); a compressed
  tar cannot seek, so all its files are read into memory once per process and
  kept (`_scan_tar`, two archives at most: fine for CIFAR-size data; use a plain
  tar, a directory or ArrayRecord for larger sets).
  """

  def __init__(self, path: str, keep=lambda name: True, seen=None):
    """`seen(name)`, when given, is called for every file, kept or not (listing
    the rest costs nothing: the walk or tar scan visits them anyway)."""
    seen = seen or (lambda name: None)
    self.path = path
    self._file = None
    self._blobs: dict[str, bytes] = {}
    self._offsets: dict[str, tuple[int, int]] = {}
    if os.path.isdir(path):
      self.kind = "dir"
      self.names = sorted(
          os.path.relpath(os.path.join(d, f), path).replace(os.sep, "/")
          for d, _, files in os.walk(path) for f in files)
      for name in self.names:
        seen(name)
      self.names = [n for n in self.names if keep(n)]
      return
    try:
      stat = os.stat(path)
      self.kind, files = _scan_tar(path, stat.st_mtime_ns, stat.st_size)
    except (tarfile.TarError, OSError, EOFError) as e:
      raise ConfigError(f"cannot read tar archive {path}: {e}") from e
    for name in files:
      seen(name)
    kept = {name: where for name, where in files.items() if keep(name)}
    if self.kind == "tar_mem":
      self._blobs = kept
    else:
      self._offsets = kept
    self.names = sorted(kept)

  def location(self, name: str) -> str:
    """Where `name` is, for messages: a path, or `archive.tar:member`."""
    if self.kind == "dir":
      return os.path.join(self.path, name)
    return f"{self.path}:{name}"

  def read(self, name: str) -> bytes:
    if self.kind == "dir":
      with open(os.path.join(self.path, name), "rb") as f:
        return f.read()
    if self.kind == "tar_mem":
      return self._blobs[name]
    if self._file is None:
      self._file = open(self.path, "rb")
    offset, size = self._offsets[name]
    # Positional read: safe with grain's reader threads sharing the handle.
    return os.pread(self._file.fileno(), size, offset)

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_file"] = None  # open file handles don't cross process boundaries
    return state


@SOURCES.register("image_folder")
class ImageFolderSource:
  """`<root>/<split>/<class>/<image>` as a directory, a .tar, or a .tar.gz.

  Class indices are the same for every split: `classes` in that order when
  given, else the sorted class folders of the split `class_split` ('train'; set
  it for other layouts, e.g. 'training'), so a class missing from the test split
  shifts no label. A class folder that they lack is an error, and so is a
  missing `class_split` when data_dir has other splits (a lone split is its own
  reference). `<root>` may sit at any depth inside a tar (e.g.
  `cifar10/train/cat/0001.jpg`).
  """

  def __init__(self, split: str, data_dir: str, classes: Sequence[str] = (),
               class_split: str = "train"):
    train_classes, splits = set(), set()

    def in_split(name: str, split: str = split) -> bool:
      parts = name.split("/")
      return (len(parts) >= 3 and parts[-3] == split
              and parts[-1].lower().endswith(IMAGE_EXTENSIONS))

    def seen(name: str):
      parts = name.split("/")
      if len(parts) >= 3 and parts[-1].lower().endswith(IMAGE_EXTENSIONS):
        splits.add(parts[-3])
      if in_split(name, class_split):
        train_classes.add(parts[-2])

    self.files = FileTree(data_dir, keep=in_split, seen=seen)
    if not self.files.names:
      raise ConfigError(f"no images under '<root>/{split}/<class>/' in {data_dir}")
    self.names = sorted(self.files.names, key=lambda n: (n.split("/")[-2], n))
    folders = sorted({n.split("/")[-2] for n in self.names})
    if not classes and not train_classes and splits != {split}:
      raise ConfigError(f"no {class_split!r} split in {data_dir} to take the class indices "
                        f"from (it has {', '.join(sorted(splits))}); set class_split to "
                        f"the training split's folder or classes=[...]")
    self.classes = self._classes(classes, train_classes or folders, folders, split)
    self.num_classes = len(self.classes)
    index = {c: i for i, c in enumerate(self.classes)}
    self.labels = np.array([index[n.split("/")[-2]] for n in self.names], np.int32)

  @staticmethod
  def _classes(given: Sequence[str], train: set | list, folders: list, split: str) -> list:
    """The class list, checked against this split's class folders."""
    names = [str(c) for c in given] if given else sorted(train)
    repeated = sorted({c for c in names if names.count(c) > 1})
    if repeated:
      raise ConfigError(f"classes lists {repeated[0]!r} twice")
    known = set(names)
    unknown = [f for f in folders if f not in known]
    if unknown:
      where = ("classes=[...] does not list it" if given else
               "the 'train' split has no such folder; set classes=[...] to list every class")
      raise ConfigError(f"split {split!r} has class folder {unknown[0]!r}, but {where}")
    return names

  def __len__(self):
    return len(self.labels)

  def __getitem__(self, i):
    name = self.names[i]
    return {"image": self.files.read(name), "label": self.labels[i],
            PATH_KEY: self.files.location(name)}


@SOURCES.register("oxford_pets")
class OxfordPetsSource:
  """Oxford-IIIT Pet segmentation: `images/<name>.jpg` + `annotations/trimaps/<name>.png`.

  `data_dir` is the dataset directory (or a tar of it) with
  `annotations/{trainval,test}.txt`. Trimap values 1 (pet), 2 (background),
  3 (border) become mask classes 1, 0 and, by default, 255 = ignored
  (`border_class=2` keeps the border as a third class). 'label' is the breed.
  """
  IGNORE = 255

  def __init__(self, split: str, data_dir: str, border_class: int = IGNORE):
    lists = {"train": "trainval", "trainval": "trainval", "test": "test"}
    if split not in lists:
      raise ConfigError(f"split={split!r} is not an Oxford pets split; valid: train, test")
    self.files = FileTree(data_dir, keep=lambda n: n.endswith((".jpg", ".png", ".txt")))
    by_suffix = {}
    for name in self.files.names:
      by_suffix.setdefault(name.rsplit("/", 2)[-2] + "/" + name.rsplit("/", 1)[-1], name)
    list_name = by_suffix.get(f"annotations/{lists[split]}.txt")
    if list_name is None:
      raise ConfigError(f"no annotations/{lists[split]}.txt in {data_dir}")
    self.items = []
    for line in self.files.read(list_name).decode().splitlines():
      if line.strip() and not line.startswith("#"):
        stem, class_id = line.split()[:2]
        image, trimap = by_suffix.get(f"images/{stem}.jpg"), by_suffix.get(f"trimaps/{stem}.png")
        if image is None or trimap is None:
          raise ConfigError(f"{data_dir}: {stem} is listed but its image or trimap is missing")
        self.items.append((image, trimap, int(class_id) - 1))
    self.num_classes = 2 if border_class == self.IGNORE else 3
    self._lut = np.full(256, self.IGNORE, np.uint8)
    self._lut[[1, 2, 3]] = [1, 0, border_class]

  def __len__(self):
    return len(self.items)

  def __getitem__(self, i):
    image, trimap, label = self.items[i]
    try:
      mask = np.asarray(Image.open(io.BytesIO(self.files.read(trimap))))
    except Exception as e:  # PIL raises several types for a bad file
      raise ConfigError(f"cannot decode trimap {self.files.location(trimap)}: "
                        f"{pil_reason(e)}") from None
    if mask.ndim == 3:
      mask = mask[..., 0]
    return {"image": self.files.read(image), "mask": self._lut[mask],
            "label": np.int32(label), PATH_KEY: self.files.location(image)}


@SOURCES.register("coco_captions")
class CocoCaptionsSource:
  """COCO 2017 captions: `annotations/captions_{split}2017.json` + `{split}2017/<file>`.

  `data_dir` is a directory or a tar; the COCO root may sit at any depth in
  it. Splits 'train' and 'val'; 'test' reads 'val' too (COCO's test images
  have no public captions, and evaluators default to split 'test').
  Elements: {'image': jpeg bytes, 'text': the first `captions_per_image`
  captions (repeated cyclically when an image has fewer), 'image_id': int32},
  sorted by image id. Images without any caption are left out.
  """
  SPLITS = {"train": "train", "val": "val", "test": "val"}

  def __init__(self, split: str, data_dir: str, captions_per_image: int = 5):
    if split not in self.SPLITS:
      raise ConfigError(f"split={split!r} is not a COCO split; valid: train, val, test (= val)")
    if int(captions_per_image) < 1:
      raise ConfigError(f"captions_per_image={captions_per_image} must be >= 1")
    coco_split = self.SPLITS[split]
    annotation = f"annotations/captions_{coco_split}2017.json"
    folder = f"{coco_split}2017/"
    self.files = FileTree(data_dir, keep=lambda n: n.endswith(annotation) or (
        "/" + folder in "/" + n and n.lower().endswith(IMAGE_EXTENSIONS)))
    found = [n for n in self.files.names if n == annotation or n.endswith("/" + annotation)]
    if not found:
      raise ConfigError(f"no {annotation} in {data_dir}")
    root = found[0][:-len(annotation)]
    try:
      info = json.loads(self.files.read(found[0]))
    except ValueError as e:
      raise ConfigError(f"{data_dir}: {found[0]} is not valid JSON: {e}") from None
    self.items = self._items(info, root + folder, int(captions_per_image), data_dir)
    if not self.items:
      raise ConfigError(f"{data_dir}: {found[0]} lists no captioned images")

  def _items(self, info: dict, folder: str, per_image: int, data_dir: str):
    """(image path, captions, image id) of every captioned image, by image id."""
    captions: dict[int, list[str]] = {}
    for ann in info.get("annotations", []):
      captions.setdefault(int(ann["image_id"]), []).append(str(ann["caption"]).strip())
    present = set(self.files.names)
    items = []
    for image in sorted(info.get("images", []), key=lambda im: int(im["id"])):
      texts = captions.get(int(image["id"]))
      if not texts:
        continue
      path = folder + image["file_name"]
      if path not in present:
        raise ConfigError(f"{data_dir}: {path} is listed in the captions but missing")
      texts = [texts[i % len(texts)] for i in range(per_image)]
      items.append((path, texts, int(image["id"])))
    return items

  def __len__(self):
    return len(self.items)

  def __getitem__(self, i):
    path, texts, image_id = self.items[i]
    return {"image": self.files.read(path), "text": list(texts),
            "image_id": np.int32(image_id), PATH_KEY: self.files.location(path)}


@SOURCES.register("array_record")
class ArrayRecordSource:
  """`<data_dir>/<split>.array_record` written by `python -m big_vision_like.data.convert`."""

  def __init__(self, split: str, data_dir: str):
    import grain  # pylint: disable=g-import-not-at-top
    path = os.path.join(data_dir, f"{split}.array_record")
    if not os.path.exists(path):
      raise ConfigError(f"no {split}.array_record in {data_dir}")
    info_path = os.path.join(data_dir, "info.json")
    info = json.load(open(info_path)) if os.path.exists(info_path) else {}
    self.num_classes = info.get("num_classes", 0)
    self.classes = info.get("classes")
    self.path = path
    self._records = grain.sources.ArrayRecordDataSource([path])

  def __len__(self):
    return len(self._records)

  def __getitem__(self, i):
    return {**records.decode_record(self._records[i]), PATH_KEY: f"{self.path} record {i}"}


@SOURCES.register("tfds")
class TfdsSource:
  """A prepared TFDS dataset through `tfds.data_source` (ArrayRecord, no TensorFlow)."""

  def __init__(self, split: str, data_dir: str | None = None,
               tfds_name: str = "", image_key: str = "image",
               label_key: str = "label", mask_key: str = "",
               mask_map: tuple = ()):
    """`mask_key` adds a segmentation mask; `mask_map[v]` relabels mask value v
    (e.g. `oxford_iiit_pet` trimaps: mask_key='segmentation_mask',
    mask_map=(255, 1, 0, 255) for pet = 1, background = 0, border ignored)."""
    try:
      import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise ConfigError("source 'tfds' needs tensorflow-datasets: pip install "
                        "'big_vision_like[tfds]'") from None
    if not tfds_name:
      raise ConfigError("config.input.tfds_name must name the TFDS dataset, e.g. 'imagenet2012'")
    try:
      self._source = tfds.data_source(tfds_name, split=split, data_dir=data_dir,
                                      download=False)
      info = tfds.builder(tfds_name, data_dir=data_dir).info
    except Exception as e:  # TFDS raises many types for a missing dataset
      raise ConfigError(
          f"TFDS dataset {tfds_name!r} split {split!r} is not prepared in "
          f"data_dir={data_dir!r}: {first_line(e)}") from e
    self.image_key, self.label_key, self.mask_key = image_key, label_key, mask_key
    self.num_classes = info.features[label_key].num_classes
    self._lut = None
    if mask_map:
      self._lut = np.full(256, 255, np.uint8)
      self._lut[:len(mask_map)] = mask_map

  def __len__(self):
    return len(self._source)

  def __getitem__(self, i):
    record = self._source[i]
    element = {"image": np.asarray(record[self.image_key]),
               "label": np.int32(record[self.label_key])}
    if self.mask_key:
      mask = np.asarray(record[self.mask_key])
      mask = mask[..., 0] if mask.ndim == 3 else mask
      element["mask"] = self._lut[mask] if self._lut is not None else mask
    return element
