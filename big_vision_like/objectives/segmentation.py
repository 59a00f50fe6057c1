"""Semantic segmentation: per-pixel cross-entropy of a backbone plus a dense head.

The batch carries 'image' [B, H, W, C] and 'mask' [B, H, W] of class ids,
`ignore_index` where the label is unknown (e.g. the pets trimap border).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from big_vision_like.models import MODELS
from big_vision_like.models.heads import HEADS
from big_vision_like.objectives.base import Objective
from big_vision_like.registry import ConfigError


class Segmentation(Objective):

  def __init__(self, config: Any, *, num_classes: int, head: str = "linear",
               head_args: dict | None = None, ignore_index: int = 255,
               rngs: nnx.Rngs):
    """`head='none'` uses a backbone that predicts per-pixel logits itself
    (Perceiver IO's dense decoder); other heads read the backbone's intermediates."""
    model = dict(config.model)
    if head == "none":
      if model.get("num_classes") != num_classes:
        raise ConfigError(f"with config.objective.head='none' the backbone predicts the "
                          f"pixels: set config.model.num_classes={num_classes}")
    elif model.get("num_classes"):
      raise ConfigError("config.model.num_classes must be 0 for segmentation (the head "
                        "predicts config.objective.num_classes classes per pixel)")
    self.backbone = MODELS.build(model.pop("name"), model, field="config.model", rngs=rngs)
    self.head = None if head == "none" else HEADS.build(
        head, dict(head_args or {}), field="config.objective.head_args",
        backbone=self.backbone, num_classes=num_classes, rngs=rngs)
    self.num_classes, self.ignore_index = num_classes, ignore_index

  def segment(self, images: jax.Array, *, train: bool = False,
              rng: jax.Array | None = None) -> jax.Array:
    """Per-pixel logits [B, H, W, classes] at the input resolution."""
    output, intermediates = self.backbone(images, train=train, rng=rng)
    if self.head is None:
      if output.shape[1:3] != images.shape[1:3]:
        raise ConfigError(f"config.objective.head='none' needs a backbone with per-pixel "
                          f"output; got shape {tuple(output.shape)}")
      return output
    return self.head(intermediates, images.shape[1:3])

  def loss(self, batch, *, rng, train):
    logits = self.segment(batch["image"], train=train, rng=rng)
    mask = batch["mask"].astype(jnp.int32)
    valid = mask != self.ignore_index
    labels = jnp.where(valid, mask, 0)
    per_pixel = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    count = jnp.maximum(valid.sum(), 1)
    loss = jnp.where(valid, per_pixel, 0.0).sum() / count
    accuracy = jnp.where(valid, logits.argmax(-1) == labels, False).sum() / count
    return loss, {"loss": loss, "pixel_accuracy": accuracy}

  def label_ranges(self):
    return {"mask": (self.num_classes, (self.ignore_index,), "config.objective.num_classes")}

  def features(self, images):
    return self.backbone(images, train=False)[1]["pre_logits"]
