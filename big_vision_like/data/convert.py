"""Converts any registered data source into ArrayRecord files for fast random access.

  python -m big_vision_like.data.convert --source=image_folder \
      --data_dir=/data/cifar10_jpeg.tar.gz --splits=train,test --out=/data/cifar10_ar

writes `<out>/<split>.array_record` and `<out>/info.json` (class names, sizes);
train from it with `--config.input.source=array_record --config.input.data_dir=<out>`.
Encoded images (JPEG, PNG) are stored as they are; decoded arrays are stored as
lossless PNG, so the 'decode' transform reads every converted dataset.
"""
from __future__ import annotations

import json
import os
import sys

from absl import app, flags

from big_vision_like.data.pipeline import build_source
from big_vision_like.data.records import encode_record


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


def _define_flags():
  """The command's flags, defined only when it runs (importing the library defines
  none, so it can't clash with a program's own --source or --out)."""
  flags.DEFINE_string("source", "image_folder", "Registered source to read.")
  flags.DEFINE_string("data_dir", None, "The source's data_dir.")
  flags.DEFINE_list("splits", ["train", "test"], "Splits to convert.")
  flags.DEFINE_string("out", None, "Output directory.")


def main(argv):
  del argv
  from big_vision_like.registry import ConfigError  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  if not f.out:
    sys.exit("error: --out is required")
  try:
    convert(f.source, f.data_dir, f.splits, f.out)
  except ConfigError as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
