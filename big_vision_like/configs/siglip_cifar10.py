"""SigLIP (pairwise sigmoid loss) on CIFAR-10 with class-name captions.

  python -m main --config=configs/siglip_cifar10.py --workdir=/tmp/siglip_cifar10 \
      --config.input.data_dir=/path/to/cifar10_jpeg.tar.gz \
      --config.evals.coco.data.data_dir=/path/to/coco_mini.tar

The same data, towers, budget and evaluators as configs/clip_cifar10.py; only
the loss (and a bidirectional text tower) differ, so the two compare directly.
`:smoke` trains a tiny model on digits for a few steps.
"""
from big_vision_like.configs import clip_cifar10


def get_config(arg: str | None = None):
  return clip_cifar10.get_config(arg, objective="siglip")
