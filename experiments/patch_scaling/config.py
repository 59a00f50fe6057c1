"""Patch-size scaling: one ViT trained at patch 8 / 4 / 2 / 1 (see README.md here).

  python -m main --config=experiments/patch_scaling/config.py:cifar10 \
      --config.model.patch_size=2 --workdir=/tmp/ps/cifar10_p2_s0

`arg` is `<dataset>[,gpu]`: `cifar10` (32x32 RGB) or `fashion_mnist` (28x28,
zero-padded to 32x32 so that patch 8 divides it; the digit-like content stays
28x28). Every point of the sweep has the same model (only the patch embedding's
input size and the number of positions change), the same optimiser and the same
number of training images; smaller patches cost more compute per image, which
is the point of the study. `gpu` is the larger setting for an accelerator.
"""
from big_vision_like import configuration
from configs import common

# Model, batch and length per setting; every point of a sweep uses one of them.
SETTINGS = {
    # On a 2-core CPU: ~20 min per patch-1 run (~20 img/s), ~2 min at patch 2.
    "cpu": dict(width=32, depth=3, num_heads=2, mlp_dim=128, batch_size=64,
                total_steps=300),
    # ViT-S, ~200 epochs of CIFAR-10 (~166 of Fashion-MNIST): for an accelerator.
    "gpu": dict(width=384, depth=12, num_heads=6, mlp_dim=1536, batch_size=256,
                total_steps=39_000),
    "smoke": dict(width=16, depth=1, num_heads=1, mlp_dim=32, batch_size=16,
                  total_steps=4),
}


def get_config(arg: str | None = None):
  parts = (arg or "cifar10").split(",")
  dataset, setting = parts[0], (parts[1] if len(parts) > 1 else "cpu")
  if setting not in SETTINGS:
    raise ValueError(f"patch_scaling setting must be one of {sorted(SETTINGS)}, "
                     f"got {setting!r}")
  s = SETTINGS[setting]
  config = configuration.defaults()
  config.total_steps = s["total_steps"]
  config.log_every_steps = 50
  config.eval_every_steps = s["total_steps"]  # test metrics once, at the end
  config.checkpoint_every_steps = 100

  if dataset == "cifar10":
    common.cifar10(config, batch_size=s["batch_size"])
    channels = 3
  elif dataset == "fashion_mnist":
    config.input.source = "idx"
    config.input.batch_size = s["batch_size"]
    # pad 28 -> 32 (+2 of random shift for training); the test images are only padded.
    config.input.transforms = [
        {"name": "random_crop", "size": 32, "padding": 4, "pad_mode": "constant"},
        {"name": "flip_lr"},
        {"name": "normalize"},
    ]
    config.evals = {"test": {"name": "classification", "data": {
        "split": "test", "batch_size": 500,
        "transforms": [{"name": "random_crop", "size": 32, "padding": 2, "pad_mode": "constant"},
                       {"name": "normalize"}]}}}
    channels = 1
  else:
    raise ValueError(f"patch_scaling dataset must be 'cifar10' or 'fashion_mnist', "
                     f"got {dataset!r}")

  config.model = dict(name="vit", num_classes=10, patch_size=4, image_size=32,
                      channels=channels, width=s["width"], depth=s["depth"],
                      num_heads=s["num_heads"], mlp_dim=s["mlp_dim"], pool="gap",
                      posemb="learn", dtype="float32", attention="auto")
  config.objective = dict(name="supervised", label_smoothing=0.0)
  config.optim.lr = 1e-3
  config.optim.weight_decay = 0.05
  config.optim.warmup_steps = s["total_steps"] // 20
  return config
