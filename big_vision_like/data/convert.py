"""Converts any registered data source into ArrayRecord files for fast random access.

  python -m big_vision_like.data.convert --source=image_folder \
      --data_dir=/data/cifar10_jpeg.tar.gz --splits=train,test --out=/data/cifar10_ar

writes `<out>/<split>.array_record` and `<out>/info.json` (class names, sizes);
train from it with `--config.input.source=array_record --config.input.data_dir=<out>`.
Encoded images (JPEG, PNG) are stored as they are; decoded arrays are stored as
lossless PNG, so the 'decode' transform reads every converted dataset.
"""
from __future__ import annotations

import io
import json
import os
import struct
import sys

import numpy as np
from absl import app, flags
from PIL import Image

from big_vision_like.data.pipeline import build_source


def encode_record(element: dict) -> bytes:
  """[4-byte header length][JSON header: label][encoded image bytes]."""
  image = element["image"]
  if not isinstance(image, (bytes, np.bytes_)):
    array = np.asarray(image)
    buf = io.BytesIO()
    Image.fromarray(array[..., 0] if array.ndim == 3 and array.shape[-1] == 1
                    else array).save(buf, format="PNG")
    image = buf.getvalue()
  header = json.dumps({"label": int(element["label"])}).encode()
  return struct.pack("<I", len(header)) + header + bytes(image)


def decode_record(record: bytes) -> dict:
  (length,) = struct.unpack("<I", record[:4])
  header = json.loads(record[4:4 + length])
  return {"image": record[4 + length:], "label": np.int32(header["label"])}


def convert(source_name: str, data_dir: str | None, splits: list[str], out: str,
            extra: dict | None = None) -> dict:
  from array_record.python.array_record_module import ArrayRecordWriter  # pylint: disable=g-import-not-at-top
  os.makedirs(out, exist_ok=True)
  info = {"source": source_name, "splits": {}}
  for split in splits:
    source = build_source({"source": source_name, "data_dir": data_dir, "split": split,
                           **(extra or {})}, "--data_dir")
    path = os.path.join(out, f"{split}.array_record")
    writer = ArrayRecordWriter(path, "group_size:1")
    for i in range(len(source)):
      writer.write(encode_record(source[i]))
    writer.close()
    info["splits"][split] = len(source)
    info["num_classes"] = int(getattr(source, "num_classes", 0))
    if hasattr(source, "classes"):
      info["classes"] = list(source.classes)
    print(f"{split}: {len(source)} records -> {path}")
  with open(os.path.join(out, "info.json"), "w") as f:
    json.dump(info, f, indent=2)
  return info


_SOURCE = flags.DEFINE_string("source", "image_folder", "Registered source to read.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "The source's data_dir.")
_SPLITS = flags.DEFINE_list("splits", ["train", "test"], "Splits to convert.")
_OUT = flags.DEFINE_string("out", None, "Output directory.")


def main(argv):
  del argv
  from big_vision_like.registry import ConfigError  # pylint: disable=g-import-not-at-top
  if not _OUT.value:
    sys.exit("error: --out is required")
  try:
    convert(_SOURCE.value, _DATA_DIR.value, _SPLITS.value, _OUT.value)
  except ConfigError as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  app.run(main)
