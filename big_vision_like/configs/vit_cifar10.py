"""ViT on CIFAR-10 from an image-folder tree, or a tar / tar.gz of it.

  python -m main --config=configs/vit_cifar10.py --workdir=/tmp/cifar10 \
      --config.input.data_dir=/path/to/cifar10_jpeg.tar.gz

The layout is `<root>/{train,test}/<class>/<image>`. Patch 4 on 32x32 gives
64 tokens; the model (width 128, depth 6, 4 heads) and the 10-epoch budget are
sized to train in about half an hour on a 2-core CPU. On an accelerator, raise
`--config.total_epochs` (ViTs on CIFAR-10 keep improving to 100+ epochs) and the
width (`--config.model.width=192 --config.model.mlp_dim=768`).
`:smoke` runs a tiny model for a few steps.
"""
from big_vision_like import configuration
from big_vision_like.configs import common


def get_config(arg: str | None = None):
  config = configuration.defaults()
  config.total_epochs = 6.0
  config.log_every_steps = 100
  config.eval_every_steps = 2000
  config.checkpoint_every_steps = 1000

  common.cifar10(config, batch_size=128)
  config.model = dict(name="vit", num_classes=10, patch_size=4, width=128, depth=6,
                      num_heads=4, mlp_dim=256, image_size=32, channels=3, pool="gap",
                      dtype="float32")
  config.objective = dict(name="supervised", label_smoothing=0.1)
  config.optim.lr = 1e-3
  config.optim.weight_decay = 0.05
  config.optim.warmup_epochs = 1.0

  if arg == "smoke":
    configuration.smoke(config, patch_size=8)
    config.evals.test.data.batch_size = 1000
  elif arg:
    raise ValueError(f"vit_cifar10 accepts 'smoke' or nothing, got {arg!r}")
  return config
