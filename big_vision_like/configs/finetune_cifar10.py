"""Fine-tune a pre-trained ViT on CIFAR-10 (MAE's fine-tuning recipe), or train the
same model from scratch with the same budget.

  python -m main --config=configs/mae_cifar10.py --workdir=/tmp/mae_cifar10 \
      --config.input.data_dir=/path/to/cifar10_jpeg.tar.gz
  python -m main --config=configs/finetune_cifar10.py --workdir=/tmp/finetune_cifar10 \
      --config.init.path=/tmp/mae_cifar10 --config.input.data_dir=/path/to/cifar10_jpeg.tar.gz
  python -m main --config=configs/finetune_cifar10.py:scratch --workdir=/tmp/scratch_cifar10 \
      --config.input.data_dir=/path/to/cifar10_jpeg.tar.gz

`config.init.path` is any run whose backbone is this ViT (patch 4, width 128,
depth 6: `mae_cifar10`, `vit_cifar10`, `dino_cifar10`, ...); its backbone is
loaded at step 0 and the 10-class head starts at zero (transfer.py logs the
table). MAE's recipe, scaled to this model: AdamW, layer-wise lr decay 0.75,
drop path 0.1, label smoothing 0.1, mixup 0.8 / cutmix 1.0, warm-up. `:scratch`
is the same run without `init` and without layer decay (which only makes sense
for a pre-trained backbone). `:smoke` runs a tiny model for a few steps.
"""
from big_vision_like import configuration
from big_vision_like.configs import common


def get_config(arg: str | None = None):
  config = configuration.defaults()
  config.total_epochs = 2.0
  config.log_every_steps = 100
  config.eval_every_steps = 390
  config.checkpoint_every_steps = 500

  common.cifar10(config, batch_size=128)
  config.model = dict(common.CIFAR10_VIT, num_classes=10, drop_path=0.1)
  config.objective = dict(name="supervised", label_smoothing=0.1, mixup_alpha=0.8,
                          cutmix_alpha=1.0)
  config.optim.lr = 1e-3
  config.optim.b2 = 0.999
  config.optim.weight_decay = 0.05
  config.optim.warmup_epochs = 0.25
  config.optim.layer_decay = 0.75
  config.init.path = "/tmp/mae_cifar10"  # the pre-training run of the docstring

  if arg in ("scratch", "smoke"):
    config.init.path = ""
    config.optim.layer_decay = None
  if arg == "smoke":
    configuration.smoke(config, patch_size=8)
    config.evals.test.data.batch_size = 1000
  elif arg not in (None, "scratch"):
    raise ValueError(f"finetune_cifar10 accepts 'scratch', 'smoke' or nothing, got {arg!r}")
  return config
