"""ViT-S/16 on ImageNet-1k with the DeiT recipe, through TFDS (`imagenet2012`).

  python -m main --config=configs/vit_i1k.py --workdir=gs://bucket/vit_s16 \
      --config.input.data_dir=/path/to/tensorflow_datasets

Needs the prepared TFDS dataset (ArrayRecord; `tfds build imagenet2012` with
the manual download) and `pip install "big_vision_like[tfds,gcs]"` (TFDS; gcsfs
and google-cloud-storage for the gs:// workdir). Recipe (Touvron et al. 2021): 300 epochs, global batch
1024, AdamW lr 1e-3 (5 warm-up epochs, cosine to 1e-6), weight decay 0.05,
global-norm clipping 1.0, label smoothing 0.1, mixup 0.8 / cutmix 1.0,
stochastic depth 0.1, bf16 compute with float32 parameters. The global batch
is reached through gradient accumulation (`config.optim.grad_accum_steps`,
4 here, i.e. 256 images per device-pass); set it to 1 on hardware that fits
the whole batch. `:smoke` runs a tiny model for two steps (tests use TFDS mock
data).
"""
from big_vision_like import configuration


def get_config(arg: str | None = None):
  config = configuration.defaults()
  config.total_epochs = 300.0
  config.log_every_steps = 100
  config.eval_every_steps = 2500
  config.checkpoint_every_steps = 1000

  config.input.source = "tfds"
  config.input.tfds_name = "imagenet2012"
  config.input.split = "train"
  config.input.batch_size = 1024
  config.input.num_workers = 8
  config.input.transforms = [
      {"name": "decode", "channels": 3},
      {"name": "random_resized_crop", "size": 224, "scale": (0.08, 1.0)},
      {"name": "flip_lr"},
      {"name": "normalize"},
  ]
  config.model = dict(name="vit", variant="S/16", num_classes=1000, image_size=224,
                      pool="cls", posemb="learn", drop_path=0.1, dtype="bfloat16",
                      param_dtype="float32")
  config.objective = dict(name="supervised", label_smoothing=0.1, mixup_alpha=0.8,
                          cutmix_alpha=1.0)
  config.optim.lr = 1e-3
  config.optim.weight_decay = 0.05
  config.optim.clip_norm = 1.0
  config.optim.warmup_epochs = 5.0
  config.optim.min_lr = 1e-6
  config.optim.grad_accum_steps = 4
  config.evals = {"val": {"name": "classification", "data": {
      "split": "validation", "batch_size": 1000,
      "transforms": [{"name": "decode", "channels": 3}, {"name": "resize_small", "size": 256},
                     {"name": "center_crop", "size": 224}, {"name": "normalize"}]}}}

  if arg == "smoke":  # 32x32 images, two steps with 2 accumulated microbatches
    configuration.smoke(config, steps=2, batch_size=8, patch_size=16, image_size=32)
    config.input.transforms[1]["size"] = 32
    config.evals.val.data.transforms[1]["size"] = 36
    config.evals.val.data.transforms[2]["size"] = 32
    config.evals.val.data.batch_size = 8
  elif arg:
    raise ValueError(f"vit_i1k accepts 'smoke' or nothing, got {arg!r}")
  return config
