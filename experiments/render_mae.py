"""Renders an MAE run's reconstructions of test images to a PNG.

  python experiments/render_mae.py --config=configs/mae_cifar10.py --workdir=/tmp/mae \
      --out=/tmp/mae_reconstructions.png

One row per image: input | masked input (75% of the patches hidden) |
reconstruction with the visible patches pasted back.
"""
import os
import sys

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from big_vision_like import data, evaluators, train  # pylint: disable=wrong-import-position
from big_vision_like.objectives import masked  # pylint: disable=wrong-import-position

_CONFIG = config_flags.DEFINE_config_file("config", None, "the run's config file")
_WORKDIR = flags.DEFINE_string("workdir", None, "the run's workdir (with checkpoints/)")
_OUT = flags.DEFINE_string("out", "mae_reconstructions.png", "PNG to write")
_NUM = flags.DEFINE_integer("num", 8, "how many test images")
_SCALE = flags.DEFINE_integer("scale", 4, "pixel upscaling for viewing")


def main(argv):
  del argv
  config = _CONFIG.value
  objective, step = train.load_trained(config, _WORKDIR.value)
  name = next(iter(config.evals))  # the first evaluator's test data, fewer images
  data_config = evaluators.data_config(config.input, config.evals[name].get("data"),
                                       f"config.evals.{name}.data")
  data_config.batch_size = _NUM.value
  source = data.build_source(data_config, f"config.evals.{name}.data")
  images = next(data.eval_batches(data_config, source, f"config.evals.{name}.data"))
  recon, mask = jax.jit(objective.reconstruct)(images["image"], jax.random.key(0))
  grid = masked.render(images["image"], np.asarray(recon), np.asarray(mask), _NUM.value)
  grid = np.repeat(np.repeat(grid, _SCALE.value, 0), _SCALE.value, 1)
  Image.fromarray(grid).save(_OUT.value)
  print(f"wrote {_OUT.value}: {_NUM.value} test images, checkpoint step {step}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
