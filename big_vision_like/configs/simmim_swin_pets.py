"""SimMIM pre-training of the Swin of `swin_fpn_pets` on the Oxford-IIIT Pet images,
then its segmentation fine-tuning from that checkpoint (the hierarchical encoder +
FPN + masked-image-modelling recipe).

  python -m main --config=configs/simmim_swin_pets.py --workdir=/tmp/simmim_swin_pets \
      --config.input.data_dir=/path/to/oxford_pets3.tar
  python -m main --config=configs/swin_fpn_pets.py --workdir=/tmp/swin_fpn_from_simmim \
      --config.init.path=/tmp/simmim_swin_pets --config.input.data_dir=/path/to/oxford_pets3.tar

60% of the 96x96 image is masked in blocks of 32x32 pixels (SimMIM's mask
unit); the encoder sees mask tokens there and a linear layer predicts the raw
pixels of the masked patches. Only the training images are read (no masks, no
labels); kNN on the breeds (37 classes) watches the features. `:smoke` runs a
tiny model for a few steps.
"""
from big_vision_like import configuration
from big_vision_like.configs import common, swin_fpn_pets


def get_config(arg: str | None = None):
  config = common.pets_segmentation(swin_fpn_pets.SIZE, epochs=100.0)
  config.model = swin_fpn_pets.get_config().model
  config.model.drop_path = 0.0
  config.objective = dict(name="simmim", mask_ratio=0.6)
  config.optim.lr = 1e-3
  config.optim.b2 = 0.95  # SimMIM's (and MAE's) Adam
  test = config.evals.test.data
  config.evals = common.representation_evals(test.transforms, linear_probe=False,
                                             batch_size=test.batch_size)

  if arg == "smoke":
    configuration.smoke(config, embed_dim=8, depths=(1, 1, 1), num_heads=(1, 1, 2))
  elif arg:
    raise ValueError(f"simmim_swin_pets accepts 'smoke' or nothing, got {arg!r}")
  return config
