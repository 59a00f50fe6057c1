"""ViT on Fashion-MNIST, read from the original IDX files.

  python -m main --config=configs/vit_fashion_mnist.py --workdir=/tmp/fmnist \
      --config.input.data_dir=/path/to/fashion_mnist

`data_dir` holds train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz,
t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz. Patch 4 on 28x28
gives 49 tokens. `:smoke` runs a tiny model for a few steps.
"""
from big_vision_like import configuration


def get_config(arg: str | None = None):
  config = configuration.defaults()
  config.total_epochs = 15.0
  config.log_every_steps = 100
  config.eval_every_steps = 2000
  config.checkpoint_every_steps = 1000

  config.input.source = "idx"
  config.input.batch_size = 128
  config.input.transforms = [
      {"name": "random_crop", "size": 28, "padding": 2, "pad_mode": "constant"},
      {"name": "flip_lr"},
      {"name": "normalize"},
  ]
  config.model = dict(name="vit", num_classes=10, patch_size=4, width=128, depth=6,
                      num_heads=4, mlp_dim=256, image_size=28, channels=1, pool="gap")
  config.objective = dict(name="supervised", label_smoothing=0.1)
  config.optim.lr = 1e-3
  config.optim.weight_decay = 0.05
  config.optim.warmup_epochs = 1.0
  config.evals = {"test": {"name": "classification", "data": {
      "split": "test", "batch_size": 500, "transforms": [{"name": "normalize"}]}}}

  if arg == "smoke":
    configuration.smoke(config, patch_size=7)
    config.evals.test.data.batch_size = 1000
  elif arg:
    raise ValueError(f"vit_fashion_mnist accepts 'smoke' or nothing, got {arg!r}")
  return config
