"""Swin + FPN decoder (cross-attention from deep to shallow) on Oxford-IIIT Pet segmentation.

  python -m main --config=configs/swin_fpn_pets.py --workdir=/tmp/swin_fpn_pets \
      --config.input.data_dir=/path/to/oxford_pets3.tar

96x96 inputs, patch 4 -> 24x24 tokens, windows of 6, three stages (24, 12, 6),
an FPN over the stages; pet vs background with the trimap border ignored.
`:smoke` runs a tiny model for a few steps.
"""
from big_vision_like import configuration
from big_vision_like.configs import common


SIZE = 96


def get_config(arg: str | None = None):
  config = common.pets_segmentation(SIZE)
  config.model = dict(name="swin", num_classes=0, patch_size=4, window_size=6,
                      embed_dim=48, depths=(2, 2, 2), num_heads=(2, 4, 8),
                      image_size=SIZE, drop_path=0.1)
  config.objective = dict(name="segmentation", num_classes=2, head="fpn",
                          head_args={"dim": 64, "num_heads": 2})

  if arg == "smoke":
    configuration.smoke(config, embed_dim=8, depths=(1, 1, 1), num_heads=(1, 1, 2))
    config.objective.head_args = {"dim": 8, "num_heads": 1}
    config.evals.test.data.batch_size = 100
  elif arg:
    raise ValueError(f"swin_fpn_pets accepts 'smoke' or nothing, got {arg!r}")
  return config
