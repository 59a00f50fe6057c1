"""Decoder-free segmentation: a linear head on ViT tokens, Oxford-IIIT Pet (pet vs background).

  python -m main --config=configs/vit_seg_pets.py --workdir=/tmp/vit_seg_pets \
      --config.input.data_dir=/path/to/oxford_pets3.tar

`data_dir` is the Oxford pets layout (images/, annotations/trimaps/,
annotations/{trainval,test}.txt) as a directory or tar; the trimap border is
ignored. Images are resized to 96x96 (patch 8: 144 tokens); the head is one
linear layer per token, upsampled bilinearly to the pixels. `:smoke` runs a
tiny model for a few steps.
"""
from big_vision_like import configuration
from big_vision_like.configs import common


SIZE = 96


def get_config(arg: str | None = None):
  config = common.pets_segmentation(SIZE)
  config.model = dict(name="vit", num_classes=0, patch_size=8, width=128, depth=4,
                      num_heads=4, mlp_dim=256, image_size=SIZE, pool="gap",
                      posemb="learn")
  config.objective = dict(name="segmentation", num_classes=2, head="linear")

  if arg == "smoke":
    configuration.smoke(config, patch_size=16)
    config.evals.test.data.batch_size = 100
  elif arg:
    raise ValueError(f"vit_seg_pets accepts 'smoke' or nothing, got {arg!r}")
  return config
