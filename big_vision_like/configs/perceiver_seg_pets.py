"""Perceiver IO dense prediction: one output query per position, Oxford-IIIT Pet segmentation.

  python -m main --config=configs/perceiver_seg_pets.py --workdir=/tmp/perceiver_seg_pets \
      --config.input.data_dir=/path/to/oxford_pets3.tar

96x96 inputs in [-1, 1] as 4x4 patches (576 input tokens, projected to 64
channels) with Fourier features; 128 latents of width 128; 2 blocks x 2 latent
self-attention layers (shared); the decoder's queries are the Fourier features
of every patch position concatenated with that patch's features, cross-attend
to the latents and predict pet / background, upsampled to the pixels. float32
(on an accelerator add --config.model.dtype=bfloat16). `:smoke` runs a tiny
model for a few steps.
"""
from big_vision_like import configuration
from big_vision_like.configs import common


SIZE = 96


def get_config(arg: str | None = None):
  config = common.pets_segmentation(SIZE)
  config.model = dict(name="perceiver", num_classes=2, image_size=SIZE, preprocessor="patches",
                      patch_size=4, prep_channels=64, posemb="fourier", num_bands=16,
                      num_latents=128, latent_dim=128, num_blocks=2, self_attends_per_block=2,
                      self_heads=4, cross_heads=1, decoder="dense", dense_stride=1,
                      dense_concat_inputs=True)
  config.objective = dict(name="segmentation", num_classes=2, head="none")
  config.optim.wd_exclude = ("latents", "query")

  if arg == "smoke":
    configuration.smoke(config, num_latents=4, latent_dim=16, num_blocks=1,
                        self_attends_per_block=1, self_heads=2, num_bands=4, prep_channels=8)
    config.evals.test.data.batch_size = 100
  elif arg:
    raise ValueError(f"perceiver_seg_pets accepts 'smoke' or nothing, got {arg!r}")
  return config
