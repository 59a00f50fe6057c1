"""CLIP (softmax contrastive) on CIFAR-10 with class-name captions.

  python -m main --config=configs/clip_cifar10.py --workdir=/tmp/clip_cifar10 \
      --config.input.data_dir=/path/to/cifar10_jpeg.tar.gz \
      --config.evals.coco.data.data_dir=/path/to/coco_mini.tar

Each training image is paired with a random prompt for its class ("a blurry
photo of a cat."), tokenized by the file-free byte tokenizer; the towers are a
ViT (patch 4) and a 2-layer text transformer. Evaluated by zero-shot
classification on the test split (template ensemble), kNN on the image
features, and image-text retrieval on the COCO mini val captions — real
captions the model never saw, so that last number is a stress test, not a
benchmark. `:smoke` trains a tiny model on digits for a few steps.
"""
from big_vision_like import configuration
from big_vision_like.configs import common

TEXT_TRANSFORMS = [{"name": "class_caption"}, {"name": "tokenize"}]


def get_config(arg: str | None = None, objective: str = "clip"):
  config = configuration.defaults()
  config.total_epochs = 2.0
  config.log_every_steps = 50
  config.eval_every_steps = 10_000
  config.checkpoint_every_steps = 250

  common.cifar10(config, batch_size=128)
  config.input.transforms = config.input.transforms + TEXT_TRANSFORMS
  config.input.tokenizer.max_len = 48  # the longest prompt is 46 bytes with its EOS
  config.model = dict(name="vit", num_classes=0, patch_size=4, width=128, depth=4,
                      num_heads=4, mlp_dim=256, image_size=32, pool="gap")
  text = dict(width=128, depth=2, num_heads=4, mlp_dim=256)
  if objective == "clip":
    config.objective = dict(name="clip", text=text, embed_dim=128)
  else:  # SigLIP: bidirectional text tower pooled at the EOS, sigmoid loss
    config.objective = dict(name="siglip", text=dict(text, causal=False), embed_dim=128)
  config.optim.lr = 1e-3
  config.optim.weight_decay = 0.05
  config.optim.warmup_steps = 100

  eval_images = common.CIFAR10_EVAL_TRANSFORMS
  config.evals = {
      "zeroshot": {"name": "zeroshot", "data": {"split": "test", "batch_size": 500,
                                                "transforms": eval_images}},
      **common.representation_evals(eval_images, linear_probe=False),
      "coco": {"name": "retrieval", "data": {
          "source": "coco_captions", "data_dir": configuration.OPTIONAL_STR(),
          "split": "val", "batch_size": 79,
          "transforms": [{"name": "decode", "channels": 3}, {"name": "resize", "size": 32},
                         {"name": "normalize"}, {"name": "tokenize", "all_captions": True}]}},
  }
  if arg == "smoke":
    common.pretraining_smoke(
        config, transforms=[{"name": "normalize"}, *TEXT_TRANSFORMS],
        eval_transforms=[{"name": "normalize"}])
    config.objective.text = dict(width=16, depth=1, num_heads=2)
    config.objective.embed_dim = 16
    config.evals.zeroshot = {"name": "zeroshot", "data": {
        "split": "test", "batch_size": 120, "transforms": [{"name": "normalize"}]}}
  elif arg:
    raise ValueError(f"{objective}_cifar10 accepts 'smoke' or nothing, got {arg!r}")
  return config
