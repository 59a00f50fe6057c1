"""Pixel tokens: a ViT with patch size 1 segments Oxford-IIIT Pet at 64x64 (4,096 tokens).

  python -m main --config=configs/vit_pixels.py --workdir=/tmp/vit_pixels \
      --config.input.data_dir=/path/to/oxford_pets3.tar

Every pixel is a token and predicts its own label through one linear layer:
the decoder-free limit of the patch-size finding (no decoder, no upsampling).
4,096 tokens make attention the cost: the chunked attention keeps it
O(sequence) in memory (a 4,096^2 logit matrix per head never exists), and
`scan` + `remat` recompute each block in the backward pass, so a step holds
one block's activations instead of all of them. On a GPU set
`--config.model.attention=pallas` (or leave `auto`) and raise the batch.
`:smoke` runs a tiny model on 16x16 crops for a few steps.
"""
from big_vision_like.configs import common
from big_vision_like import configuration

SIZE = 64


def get_config(arg: str | None = None):
  config = common.pets_segmentation(SIZE, batch_size=8, epochs=4.0)
  config.optim.warmup_epochs = 1.0
  config.log_every_steps = 10
  config.eval_every_steps = 150
  config.checkpoint_every_steps = 50
  config.model = dict(name="vit", num_classes=0, patch_size=1, width=64, depth=4,
                      num_heads=2, mlp_dim=128, image_size=SIZE, pool="gap",
                      posemb="learn", attention="chunked", remat=True, scan=True)
  config.objective = dict(name="segmentation", num_classes=2, head="linear")
  config.evals.test.data.batch_size = 25

  if arg == "smoke":
    configuration.smoke(config, steps=2, batch_size=4, image_size=16)
    for transforms in (config.input.transforms, config.evals.test.data.transforms):
      for t in transforms:
        if "size" in t:
          t["size"] = 16
  elif arg:
    raise ValueError(f"vit_pixels accepts 'smoke' or nothing, got {arg!r}")
  return config
