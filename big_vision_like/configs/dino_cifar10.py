"""DINO (or iBOT) self-distillation of a ViT on CIFAR-10.

  python -m main --config=configs/dino_cifar10.py --workdir=/tmp/dino_cifar10 \
      --config.input.data_dir=/path/to/cifar10_jpeg.tar.gz
  python -m main --config=configs/dino_cifar10.py:ibot --workdir=/tmp/ibot_cifar10 \
      --config.input.data_dir=/path/to/cifar10_jpeg.tar.gz

Multi-crop: 2 global 32x32 crops (teacher and student) and 4 local 16x16
crops (student only; the position embedding is resampled to their 4x4 grid),
with DINO's colour jitter, blur and solarisation. The teacher is an EMA of the
student; kNN accuracy of the teacher's features is the headline number.
`:ibot` adds masked patch distillation. `:smoke` (or `:ibot_smoke`) trains a
tiny model on digits for a few steps.
"""
from big_vision_like import configuration
from big_vision_like.configs import common


def get_config(arg: str | None = None):
  objective = "ibot" if arg and arg.startswith("ibot") else "dino"
  smoke = arg in ("smoke", "ibot_smoke")
  if arg not in (None, "smoke", "ibot", "ibot_smoke"):
    raise ValueError(f"dino_cifar10 accepts 'smoke', 'ibot', 'ibot_smoke' or nothing, "
                     f"got {arg!r}")
  config = configuration.defaults()
  config.total_steps = 800
  config.log_every_steps = 50
  config.eval_every_steps = 10_000
  config.checkpoint_every_steps = 200

  common.cifar10(config, batch_size=128)
  config.input.transforms = [
      {"name": "decode", "channels": 3},
      {"name": "multi_crop", "global_size": 32, "local_size": 16, "num_local": 4,
       "global_scale": (0.35, 1.0), "local_scale": (0.1, 0.35)},
  ]
  config.model = dict(name="vit", num_classes=0, patch_size=4, width=128, depth=6,
                      num_heads=4, mlp_dim=256, image_size=32, pool="cls")
  config.objective = dict(name=objective, out_dim=4096, hidden_dim=512, bottleneck_dim=128,
                          momentum_teacher=0.99, teacher_temp=0.04,
                          freeze_last_layer_steps=100)
  config.optim.lr = 5e-4
  config.optim.weight_decay = 0.04
  config.optim.clip_norm = 3.0
  config.optim.warmup_steps = 100
  config.evals = common.representation_evals(common.CIFAR10_EVAL_TRANSFORMS,
                                             linear_probe=False)
  if smoke:
    common.pretraining_smoke(
        config, transforms=[{"name": "multi_crop", "global_size": 8, "local_size": 4,
                             "num_local": 2}],
        eval_transforms=[{"name": "normalize"}])
    config.objective.update(out_dim=64, hidden_dim=32, bottleneck_dim=16)
  return config
