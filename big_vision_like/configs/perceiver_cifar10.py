"""Perceiver IO image classifier on CIFAR-10 (a 'PerceiverIO vision encoder' recipe, CPU-sized).

  python -m main --config=configs/perceiver_cifar10.py --workdir=/tmp/perceiver_cifar10 \
      --config.input.data_dir=/path/to/cifar10_jpeg.tar.gz

Pixels in [-1, 1] with 2-D Fourier features (32 bands) as a 1,024-token input
array; 128 latents of width 256 cross-attend to it once, then 2 blocks x 4
latent self-attention layers (weights shared across blocks); one learned query
decodes the class. AdamW, warm-up + cosine to 1e-6, weight decay 0.05, clipping
1.0, bf16 compute with float32 parameters, global batch 256 through 2
accumulated microbatches. `:smoke` runs a tiny model for a few steps.
"""
from big_vision_like import configuration
from big_vision_like.configs import common


def get_config(arg: str | None = None):
  config = configuration.defaults()
  config.total_epochs = 30.0
  config.log_every_steps = 50
  config.eval_every_steps = 1000
  config.checkpoint_every_steps = 500

  common.cifar10(config, batch_size=256)
  config.model = dict(name="perceiver", num_classes=10, image_size=32, preprocessor="pixels",
                      posemb="fourier", num_bands=32, num_latents=128, latent_dim=256,
                      num_blocks=2, self_attends_per_block=4, self_heads=8, cross_heads=1,
                      decoder="class", dtype="bfloat16", param_dtype="float32")
  config.objective = dict(name="supervised", label_smoothing=0.1)
  config.optim.lr = 1e-3
  config.optim.min_lr = 1e-6
  config.optim.weight_decay = 0.05
  config.optim.clip_norm = 1.0
  config.optim.warmup_epochs = 2.0
  config.optim.grad_accum_steps = 2
  config.optim.wd_exclude = ("latents", "query", "pos_embedding")

  if arg == "smoke":
    configuration.smoke(config, num_latents=4, latent_dim=16, num_blocks=1,
                        self_attends_per_block=1, self_heads=2, num_bands=4)
    config.evals.test.data.batch_size = 1000
  elif arg:
    raise ValueError(f"perceiver_cifar10 accepts 'smoke' or nothing, got {arg!r}")
  return config
