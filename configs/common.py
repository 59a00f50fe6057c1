"""Data settings shared by several configs (what is read and how it is augmented).

Configs import this as `from configs import common`; `python -m main` runs from
the repository root, which is on the import path.
"""
from big_vision_like import configuration

CIFAR10_DIR = "../shared/data/cifar10_jpeg.tar.gz"
PETS_DIR = "../shared/data/oxford_pets3.tar"


def cifar10(config, *, batch_size: int):
  """CIFAR-10 image folder / tar: random crop (pad 4) + flip; test split for eval."""
  config.input.source = "image_folder"
  config.input.data_dir = CIFAR10_DIR
  config.input.batch_size = batch_size
  config.input.transforms = [
      {"name": "decode", "channels": 3},
      {"name": "random_crop", "size": 32, "padding": 4},
      {"name": "flip_lr"},
      {"name": "normalize"},
  ]
  config.evals = {"test": {"name": "classification", "split": "test", "batch_size": 500,
                           "transforms": [{"name": "decode", "channels": 3},
                                          {"name": "normalize"}]}}
  return config


def pets_segmentation(size: int, *, batch_size: int = 32, epochs: float = 100.0):
  """Oxford-IIIT Pet (pet vs background, border ignored) at size x size, with the
  schedule the three segmentation configs share."""
  config = configuration.defaults()
  config.total_epochs = epochs
  config.log_every_steps = 20
  config.eval_every_steps = 200
  config.checkpoint_every_steps = 200
  config.input.source = "oxford_pets"
  config.input.data_dir = PETS_DIR
  config.input.batch_size = batch_size
  config.input.transforms = [
      {"name": "decode", "channels": 3},
      {"name": "random_resized_crop", "size": size, "scale": (0.3, 1.0)},
      {"name": "flip_lr"},
      {"name": "normalize"},
  ]
  config.optim.lr = 1e-3
  config.optim.min_lr = 1e-6
  config.optim.weight_decay = 0.05
  config.optim.warmup_epochs = 5.0
  config.evals = {"test": {"name": "segmentation", "split": "test", "batch_size": 50,
                           "transforms": [{"name": "decode", "channels": 3},
                                          {"name": "resize", "size": size},
                                          {"name": "normalize"}]}}
  return config
