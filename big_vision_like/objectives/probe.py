"""Linear probe as a training run: a frozen backbone under a new linear head.

The protocol of MAE's linear probing (and of DINO's): the backbone runs in
inference mode (no drop path) and is never differentiated or updated (its
parameters are not in `trainable`, so they have no gradient, no optimiser
state, no weight decay); its pooled features go through a BatchNorm without
affine parameters (`norm='batchnorm'`, MAE's choice, which makes the probe
insensitive to the feature scale) and a linear layer (MAE's init: truncated
normal, std 0.01). Start
it from a pre-trained run with `config.init.path` (transfer.py loads the
backbone); LARS (`config.optim.name='lars'`) is MAE's probe optimiser.
"""
from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from big_vision_like.models import MODELS
from big_vision_like.models import layers
from big_vision_like.objectives.base import TRAINABLE
from big_vision_like.objectives.supervised import Supervised
from big_vision_like.registry import ConfigError


class Probe(Supervised):
  """Cross-entropy on a linear head over the frozen backbone's `pre_logits`."""
  trainable = nnx.All(TRAINABLE, nnx.Not(nnx.PathContains("backbone")))

  def __init__(self, config: Any, *, norm: str = "batchnorm", label_smoothing: float = 0.0,
               rngs: nnx.Rngs):
    if norm not in ("batchnorm", "none"):
      raise ConfigError(f"config.objective.norm={norm!r}; valid: batchnorm, none")
    model = dict(config.model)
    self.num_classes = model.get("num_classes") or 0
    if not self.num_classes:
      raise ConfigError("config.model.num_classes must be set for the probe's head (the "
                        "backbone itself is built without one)")
    model["num_classes"] = 0
    self.backbone = MODELS.build(model.pop("name"), model, field="config.model", rngs=rngs)
    width = self.backbone.width
    self.norm = (nnx.BatchNorm(width, use_bias=False, use_scale=False, momentum=0.9,
                               epsilon=1e-6, rngs=rngs) if norm == "batchnorm" else None)
    # MAE's probe head init: LARS scales each step by the weight's norm, so a zero
    # kernel would take one unscaled first step.
    self.head = layers.dense(width, self.num_classes, ("embed", "classes"),
                             kernel_init=nnx.initializers.truncated_normal(0.01), rngs=rngs)
    self.label_smoothing, self.loss_kind = label_smoothing, "softmax"
    self.mixup_alpha = self.cutmix_alpha = 0.0

  def _logits(self, images, train: bool):
    features = jax.lax.stop_gradient(self.features(images))
    if self.norm is not None:
      features = self.norm(features, use_running_average=not train)
    return self.head(features)

  def loss(self, batch, *, rng, train):
    del rng
    logits = self._logits(batch["image"], train)
    loss = self.cross_entropy(logits, self.targets(batch["label"])).mean()
    accuracy = (logits.argmax(-1) == batch["label"]).mean()
    return loss, {"loss": loss, "accuracy": accuracy}

  def classify(self, images):
    return self._logits(images, train=False)
