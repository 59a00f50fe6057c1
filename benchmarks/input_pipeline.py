"""Does the input pipeline keep up with the training step? Loader images/s per config.

  python -m benchmarks.input_pipeline --config=configs/vit_cifar10.py --batches=50

Pulls --batches batches from the exact iterator `main` trains from (grain:
decode, augmentations, batching, worker processes as configured) after
--warmup batches, and prints images/s. Compare with the step's images/s from
benchmarks/train_throughput.py (or metrics.jsonl): the loader must be faster,
or the trainer waits on it.
"""
from __future__ import annotations

import time

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from big_vision_like import data

_CONFIG = config_flags.DEFINE_config_file("config", "configs/vit_cifar10.py", "Config file.")
_BATCHES = flags.DEFINE_integer("batches", 50, "Timed batches.")
_WARMUP = flags.DEFINE_integer("warmup", 5, "Untimed batches first (worker start-up).")


def main(argv):
  del argv
  config = _CONFIG.value
  source = data.build_source(config.input, "config.input")
  iterator = data.train_iterator(config.input, source, config.seed)
  try:
    for _ in range(_WARMUP.value):
      next(iterator)
    times = []
    for _ in range(_BATCHES.value):
      t = time.perf_counter()
      batch = next(iterator)
      times.append(time.perf_counter() - t)
  finally:
    if hasattr(iterator, "close"):
      iterator.close()
  size = len(next(iter(batch.values())))
  total = sum(times)
  print(f"| config | batch | batches | loader images/s | median ms/batch | slowest ms |")
  print("|---|---|---|---|---|---|")
  print(f"| {config.model.get('name')} / {config.input.source} | {size} | {len(times)} | "
        f"{size * len(times) / total:.0f} | {1e3 * np.median(times):.1f} | "
        f"{1e3 * max(times):.1f} |")


if __name__ == "__main__":
  app.run(main)
