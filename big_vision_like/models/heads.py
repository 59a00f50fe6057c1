"""Dense-prediction heads that read a backbone's intermediates.

A head maps (intermediates, image size) to per-pixel logits [B, H, W, classes].
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from big_vision_like.models import backbone as backbone_lib, layers
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

  def __init__(self, backbone, num_classes: int, *, rngs: nnx.Rngs, norm: bool = True):
    width = backbone.width
    self.norm = layers.layer_norm(width, rngs=rngs) if norm else None
    self.proj = layers.dense(width, num_classes, ("embed", "classes"), rngs=rngs)

  def __call__(self, intermediates: dict, hw: tuple[int, int]) -> jax.Array:
    tokens = intermediates["tokens"].astype(jnp.float32)
    gh, gw = intermediates["grid"]
    tokens = tokens.reshape(tokens.shape[0], gh, gw, tokens.shape[-1])
    if self.norm is not None:
      tokens = self.norm(tokens)
    return upsample(self.proj(tokens), hw)


class _CrossAttentionFuse(nnx.Module):
  """Shallow tokens (queries) attend to the deeper level's tokens, residually."""

  def __init__(self, dim: int, num_heads: int, *, rngs: nnx.Rngs):
    self.norm_q = layers.layer_norm(dim, rngs=rngs)
    self.norm_kv = layers.layer_norm(dim, rngs=rngs)
    self.attn = layers.Attention(dim, num_heads, rngs=rngs)
    self.norm_mlp = layers.layer_norm(dim, rngs=rngs)
    self.mlp = layers.Mlp(dim, 2 * dim, rngs=rngs)

  def __call__(self, shallow: jax.Array, deep: jax.Array) -> jax.Array:
    b, h, w, d = shallow.shape
    q = shallow.reshape(b, h * w, d)
    kv = self.norm_kv(deep.reshape(b, -1, d))
    q = q + self.attn(self.norm_q(q), kv)
    q = q + self.mlp(self.norm_mlp(q))
    return q.reshape(b, h, w, d)


@HEADS.register("fpn")
class FPNHead(nnx.Module):
  """FPN over a hierarchical backbone's stages, with cross-attention from deep to shallow.

  Each stage is projected to `dim`; going from the deepest stage up, the coarser
  map is upsampled and added to the finer one, whose tokens then cross-attend
  to the coarser level's tokens (global context at linear cost in the finer
  map's size). The finest level predicts the classes, upsampled to the pixels.
  """

  def __init__(self, backbone, num_classes: int, *, rngs: nnx.Rngs, dim: int = 64,
               num_heads: int = 2):
    backbone_lib.require(backbone, "stages", by="config.objective.head='fpn'")
    widths = list(backbone.widths)
    self.laterals = nnx.List([layers.dense(w, dim, ("embed", "mlp"), rngs=rngs)
                              for w in widths])
    self.fuse = nnx.List([_CrossAttentionFuse(dim, num_heads, rngs=rngs)
                          for _ in widths[:-1]])
    self.norm = layers.layer_norm(dim, rngs=rngs)
    self.proj = layers.dense(dim, num_classes, ("embed", "classes"), rngs=rngs)

  def __call__(self, intermediates: dict, hw: tuple[int, int]) -> jax.Array:
    stages = [s.astype(jnp.float32) for s in intermediates["stages"]]
    levels = [lateral(s) for lateral, s in zip(self.laterals, stages)]
    x = levels[-1]
    for i in range(len(levels) - 2, -1, -1):
      finer = levels[i] + upsample(x, levels[i].shape[1:3])
      x = self.fuse[i](finer, x)
    return upsample(self.proj(self.norm(x)), hw)
