"""Supervised classification: softmax (or sigmoid) cross-entropy with label
smoothing, and mixup / cutmix on device."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from big_vision_like.models import MODELS
from big_vision_like.objectives.base import Objective
from big_vision_like.registry import ConfigError


def mix(images: jax.Array, targets: jax.Array, rng: jax.Array, mixup_alpha: float,
        cutmix_alpha: float) -> tuple[jax.Array, jax.Array]:
  """Mixup or cutmix (chosen at random when both are on) with the reversed batch."""
  k_choose, k_lam, k_box = jax.random.split(rng, 3)
  other_images, other_targets = images[::-1], targets[::-1]

  def mixup(_):
    lam = jax.random.beta(k_lam, mixup_alpha, mixup_alpha)
    return lam * images + (1 - lam) * other_images, lam

  def cutmix(_):
    lam = jax.random.beta(k_lam, cutmix_alpha, cutmix_alpha)
    h, w = images.shape[1:3]
    cut = jnp.sqrt(1.0 - lam)
    ch, cw = (cut * h).astype(jnp.int32), (cut * w).astype(jnp.int32)
    cy, cx = (jax.random.randint(k_box, (2,), 0, jnp.array([h, w])))
    y0, y1 = jnp.clip(cy - ch // 2, 0, h), jnp.clip(cy + ch // 2, 0, h)
    x0, x1 = jnp.clip(cx - cw // 2, 0, w), jnp.clip(cx + cw // 2, 0, w)
    yy, xx = jnp.arange(h)[:, None], jnp.arange(w)[None, :]
    inside = ((yy >= y0) & (yy < y1) & (xx >= x0) & (xx < x1))[None, :, :, None]
    lam = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)  # the area actually kept
    return jnp.where(inside, other_images, images), lam

  if mixup_alpha > 0 and cutmix_alpha > 0:
    mixed, lam = jax.lax.cond(jax.random.bernoulli(k_choose), mixup, cutmix, None)
  elif mixup_alpha > 0:
    mixed, lam = mixup(None)
  else:
    mixed, lam = cutmix(None)
  return mixed.astype(images.dtype), lam * targets + (1 - lam) * other_targets


class Supervised(Objective):
  """Image classification with the backbone named by config.model."""

  def __init__(self, config: Any, *, label_smoothing: float = 0.0,
               loss: str = "softmax", mixup_alpha: float = 0.0,
               cutmix_alpha: float = 0.0, rngs: nnx.Rngs):
    if loss not in ("softmax", "sigmoid"):
      raise ConfigError(f"config.objective.loss={loss!r}; valid: softmax, sigmoid")
    model = dict(config.model)
    if not model.get("num_classes"):
      raise ConfigError("config.model.num_classes must be set for the supervised objective")
    self.num_classes = model["num_classes"]
    self.backbone = MODELS.build(model.pop("name"), model, field="config.model", rngs=rngs)
    self.label_smoothing, self.loss_kind = label_smoothing, loss
    self.mixup_alpha, self.cutmix_alpha = mixup_alpha, cutmix_alpha

  def targets(self, labels: jax.Array) -> jax.Array:
    onehot = jax.nn.one_hot(labels, self.num_classes)
    if self.label_smoothing:
      onehot = optax.smooth_labels(onehot, self.label_smoothing)
    return onehot

  def cross_entropy(self, logits: jax.Array, targets: jax.Array) -> jax.Array:
    if self.loss_kind == "sigmoid":
      return optax.sigmoid_binary_cross_entropy(logits, targets).sum(-1)
    return optax.softmax_cross_entropy(logits, targets)

  def loss(self, batch, *, rng, train):
    images, labels = batch["image"], batch["label"]
    targets = self.targets(labels)
    k_mix, k_model = jax.random.split(rng)
    if train and (self.mixup_alpha > 0 or self.cutmix_alpha > 0):
      images, targets = mix(images, targets, k_mix, self.mixup_alpha, self.cutmix_alpha)
    logits, _ = self.backbone(images, train=train, rng=k_model)
    loss = self.cross_entropy(logits, targets).mean()
    accuracy = (logits.argmax(-1) == labels).mean()
    return loss, {"loss": loss, "accuracy": accuracy}

  def label_ranges(self):
    return {"label": (self.num_classes, (), "config.model.num_classes")}

  def classify(self, images):
    return self.backbone(images, train=False)[0]

  def features(self, images):
    return self.backbone(images, train=False)[1]["pre_logits"]
