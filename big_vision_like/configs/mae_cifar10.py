"""MAE (masked autoencoder) pre-training of a ViT on CIFAR-10, or on Fashion-MNIST.

  python -m main --config=configs/mae_cifar10.py --workdir=/tmp/mae_cifar10 \
      --config.input.data_dir=/path/to/cifar10_jpeg.tar.gz
  python -m main --config=configs/mae_cifar10.py:fashion_mnist --workdir=/tmp/mae_fmnist \
      --config.input.data_dir=/path/to/fashion_mnist

75% of the 64 patches (patch 4) are hidden; the encoder sees the other 16,
a 2-block decoder predicts the hidden patches' per-patch normalised pixels.
The frozen encoder is evaluated by kNN and a linear probe. `:smoke` trains a
tiny model on digits for a few steps.
"""
from big_vision_like import configuration
from big_vision_like.configs import common


def get_config(arg: str | None = None):
  config = configuration.defaults()
  config.total_epochs = 4.0
  config.log_every_steps = 50
  config.eval_every_steps = 10_000
  config.checkpoint_every_steps = 250

  common.cifar10(config, batch_size=128)
  eval_images = common.CIFAR10_EVAL_TRANSFORMS
  config.model = dict(common.CIFAR10_VIT, num_classes=0)
  config.objective = dict(name="mae", mask_ratio=0.75, norm_pix=True, decoder_width=128,
                          decoder_depth=2, decoder_heads=4)
  config.optim.lr = 1.5e-3
  config.optim.b2 = 0.95
  config.optim.weight_decay = 0.05
  config.optim.warmup_steps = 200

  if arg == "fashion_mnist":
    config.input.source = "idx"
    config.input.transforms = [{"name": "random_crop", "size": 28, "padding": 2},
                               {"name": "normalize"}]
    config.model.update(patch_size=4, image_size=28, channels=1)
    eval_images = [{"name": "normalize"}]
  config.evals = common.representation_evals(eval_images)
  if arg == "smoke":
    common.pretraining_smoke(config, transforms=[{"name": "normalize"}],
                             eval_transforms=[{"name": "normalize"}])
    config.objective.update(decoder_width=16, decoder_depth=1, decoder_heads=2)
  elif arg not in (None, "fashion_mnist"):
    raise ValueError(f"mae_cifar10 accepts 'smoke', 'fashion_mnist' or nothing, got {arg!r}")
  return config
