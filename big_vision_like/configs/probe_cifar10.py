"""Linear probe of a pre-trained ViT on CIFAR-10 as a training run (MAE's protocol).

  python -m main --config=configs/mae_cifar10.py --workdir=/tmp/mae_cifar10 \
      --config.input.data_dir=/path/to/cifar10_jpeg.tar.gz
  python -m main --config=configs/probe_cifar10.py --workdir=/tmp/probe_cifar10 \
      --config.init.path=/tmp/mae_cifar10 --config.input.data_dir=/path/to/cifar10_jpeg.tar.gz

The `probe` objective (objectives/probe.py): the backbone loaded from
`config.init.path` runs frozen in inference mode (no gradient, no optimiser
state); its pooled features pass a BatchNorm without affine parameters and a
linear head. LARS with no weight decay as MAE's linear probing (which trains
90 epochs; 2 here). Any run whose
backbone is this ViT works as the source, e.g. `dino_cifar10`'s teacher.
`:smoke` runs a tiny random backbone for a few steps.
"""
from big_vision_like import configuration
from big_vision_like.configs import common


def get_config(arg: str | None = None):
  config = configuration.defaults()
  config.total_epochs = 2.0
  config.log_every_steps = 100
  config.eval_every_steps = 390
  config.checkpoint_every_steps = 500

  common.cifar10(config, batch_size=256)
  config.model = dict(common.CIFAR10_VIT, num_classes=10)
  config.objective = dict(name="probe", norm="batchnorm")
  config.optim.name = "lars"
  # MAE's lr (0.1 x its batch 16,384 / 256), not rescaled to this batch: LARS makes
  # each step relative to the layer's weight norm; at 0.1 the head barely moved
  # in 2 epochs (24.2%, docs/results.md).
  config.optim.lr = 6.4
  config.optim.momentum = 0.9
  config.optim.weight_decay = 0.0
  config.optim.clip_norm = None
  config.optim.warmup_epochs = 0.2
  config.init.path = "/tmp/mae_cifar10"  # the pre-training run of the docstring

  if arg == "smoke":
    config.init.path = ""
    configuration.smoke(config, patch_size=8)
    config.evals.test.data.batch_size = 1000
  elif arg:
    raise ValueError(f"probe_cifar10 accepts 'smoke' or nothing, got {arg!r}")
  return config
