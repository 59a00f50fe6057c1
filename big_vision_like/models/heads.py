"""Dense-prediction heads that read a backbone's intermediates.

A head maps (intermediates, image size) to per-pixel logits [B, H, W, classes].
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from big_vision_like.models import layers
from big_vision_like.registry import Registry

HEADS = Registry("head", "config.objective.head")


def upsample(logits: jax.Array, hw: tuple[int, int]) -> jax.Array:
  """Bilinear resize of [B, h, w, C] logits to the image size."""
  if logits.shape[1:3] == tuple(hw):
    return logits
  return jax.image.resize(logits, (logits.shape[0], *hw, logits.shape[-1]), "bilinear")


@HEADS.register("linear")
class LinearHead(nnx.Module):
  """Decoder-free: one linear layer on the final tokens, upsampled (ViT with small patches)."""

  def __init__(self, width: int, num_classes: int, *, rngs: nnx.Rngs, norm: bool = True):
    self.norm = layers.layer_norm(width, rngs=rngs) if norm else None
    self.proj = layers.dense(width, num_classes, ("embed", "classes"), rngs=rngs)

  def __call__(self, intermediates: dict, hw: tuple[int, int]) -> jax.Array:
    tokens = intermediates["tokens"].astype(jnp.float32)
    gh, gw = intermediates["grid"]
    tokens = tokens.reshape(tokens.shape[0], gh, gw, tokens.shape[-1])
    if self.norm is not None:
      tokens = self.norm(tokens)
    return upsample(self.proj(tokens), hw)
