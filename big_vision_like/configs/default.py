"""The embedded default: a ViT with pixel tokens (patch size 1) on scikit-learn's digits.

Real data bundled with scikit-learn (8x8 grayscale, 1,437 train / 360 test,
fixed split), so it runs anywhere with no download:

  python -m main --config=configs/default.py --workdir=/tmp/default

`--config=configs/default.py:smoke` runs a tiny model for a few steps.
"""
from big_vision_like import configuration


def get_config(arg: str | None = None):
  config = configuration.defaults()
  config.seed = 0
  config.total_steps = 1200
  config.log_every_steps = 100
  config.eval_every_steps = 500
  config.checkpoint_every_steps = 500

  config.input.source = "digits"
  config.input.batch_size = 64
  config.input.transforms = [
      {"name": "random_crop", "size": 8, "padding": 1, "pad_mode": "constant"},
      {"name": "normalize"},
  ]
  config.model = dict(name="vit", num_classes=10, patch_size=1, width=64, depth=3,
                      num_heads=4, mlp_dim=128, image_size=8, channels=1, pool="gap",
                      posemb="sincos2d", dtype="float32")
  config.objective = dict(name="supervised", label_smoothing=0.1)
  config.optim.lr = 2e-3
  config.optim.weight_decay = 0.05
  config.optim.warmup_steps = 100
  config.evals = {"test": {"name": "classification", "data": {
      "split": "test", "batch_size": 360, "transforms": [{"name": "normalize"}]}}}

  if arg == "smoke":
    configuration.smoke(config, steps=6, batch_size=64)
  elif arg:
    raise ValueError(f"configs/default.py accepts 'smoke' or nothing, got {arg!r}")
  return config
