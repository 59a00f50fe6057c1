"""Data settings shared by several configs (what is read and how it is augmented).

Configs import this as `from big_vision_like.configs import common`, which works
from the repository root (`configs/` links to this folder) and from an installed
package alike. No config holds a data path:
pass `--config.input.data_dir=...` (a run without it stops with one line naming
the field and the layout the source reads).
"""
from big_vision_like import configuration


def cifar10(config, *, batch_size: int):
  """CIFAR-10 image folder / tar: random crop (pad 4) + flip; test split for eval."""
  config.input.source = "image_folder"
  config.input.batch_size = batch_size
  config.input.transforms = [
      {"name": "decode", "channels": 3},
      {"name": "random_crop", "size": 32, "padding": 4},
      {"name": "flip_lr"},
      {"name": "normalize"},
  ]
  config.evals = {"test": {"name": "classification", "data": {
      "split": "test", "batch_size": 500,
      "transforms": [{"name": "decode", "channels": 3}, {"name": "normalize"}]}}}
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
  config.evals = {"test": {"name": "segmentation", "data": {
      "split": "test", "batch_size": 50,
      "transforms": [{"name": "decode", "channels": 3}, {"name": "resize", "size": size},
                     {"name": "normalize"}]}}}
  return config


# The ViT that mae_cifar10 pre-trains and finetune_cifar10 / probe_cifar10 load: one
# definition, so the transfer configs build the pre-trained architecture.
CIFAR10_VIT = dict(name="vit", patch_size=4, width=128, depth=6, num_heads=4, mlp_dim=256,
                   image_size=32, pool="gap")

CIFAR10_EVAL_TRANSFORMS = [{"name": "decode", "channels": 3}, {"name": "normalize"}]


def representation_evals(transforms, *, train_examples: int | None = 10000,
                         batch_size: int = 500, linear_probe: bool = True) -> dict:
  """kNN (and a linear probe) on frozen features: train split -> test split."""
  data = {"split": "test", "batch_size": batch_size, "transforms": transforms}
  evals = {"knn": {"name": "knn", "data": data, "max_train_examples": train_examples}}
  if linear_probe:
    evals["linear_probe"] = {"name": "linear_probe", "data": data,
                             "max_train_examples": train_examples}
  return evals


def pretraining_smoke(config, *, transforms, eval_transforms, steps: int = 4):
  """The `:smoke` setting of the pre-training configs: digits (bundled, 8x8
  grayscale, with class names), a tiny ViT with patch 2, kNN eval."""
  configuration.smoke(config, steps=steps, batch_size=16, patch_size=2, image_size=8,
                      channels=1)
  config.input.source = "digits"
  config.input.data_dir = None
  config.input.transforms = transforms
  config.evals = representation_evals(eval_transforms, train_examples=None, batch_size=120,
                                      linear_probe=False)
  return config
