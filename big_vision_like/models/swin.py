"""Swin Transformer (Liu et al. 2021) in Flax NNX.

Hierarchical stages of windowed attention; every second block shifts the
windows by half a window (cyclic roll) with a mask so that tokens never attend
across the borders the roll created; a learned relative-position bias per head;
patch merging (2x2 -> linear 4C -> 2C) between stages. Attention goes through
the shared `ops` entry point with an additive bias (relative bias + shift mask)
over a batch of windows.

`__call__(images, train=..., rng=...)` returns (logits, intermediates) with
'stages' (the feature map [B, h, w, C] of every stage, before merging, for
dense heads), 'tokens' (final-norm tokens [B, N, C]), 'grid' and 'pre_logits'.
Matches HF transformers' SwinModel (tests/test_parity.py).
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from big_vision_like.models import layers
from big_vision_like.parallel import sharding
from big_vision_like.registry import ConfigError

#          embed_dim, depths, heads
VARIANTS = {
    "T": (96, (2, 2, 6, 2), (3, 6, 12, 24)),
    "S": (96, (2, 2, 18, 2), (3, 6, 12, 24)),
    "B": (128, (2, 2, 18, 2), (4, 8, 16, 32)),
    "L": (192, (2, 2, 18, 2), (6, 12, 24, 48)),
}


def relative_position_index(window: int) -> np.ndarray:
  """[W*W, W*W] index into the (2W-1)^2 bias table for each (query, key) pair."""
  coords = np.stack(np.meshgrid(np.arange(window), np.arange(window), indexing="ij"))
  coords = coords.reshape(2, -1)
  rel = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0) + (window - 1)
  return rel[..., 0] * (2 * window - 1) + rel[..., 1]


def shift_mask(height: int, width: int, window: int, shift: int) -> np.ndarray:
  """[num_windows, W*W, W*W]: 0 within a region, -100 across regions the roll joined."""
  regions = np.zeros((height, width), np.int32)
  bands = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
  label = 0
  for hs in bands:
    for ws in bands:
      regions[hs, ws] = label
      label += 1
  windows = window_partition(regions[None, :, :, None], window)[..., 0]  # [nW, W*W]
  return np.where(windows[:, :, None] != windows[:, None, :], -100.0, 0.0).astype(np.float32)


def window_partition(x, window: int):
  """[B, H, W, C] -> [B * H/W * W/W, window*window, C] (row-major windows)."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // window, window, w // window, window, c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(-1, window * window, c)


def window_merge(windows, window: int, h: int, w: int):
  """Inverse of window_partition."""
  c = windows.shape[-1]
  x = windows.reshape(-1, h // window, w // window, window, window, c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(-1, h, w, c)


class WindowAttention(layers.Attention):
  """Multi-head attention inside windows with a learned relative-position bias."""

  def __init__(self, width, num_heads, window, *, attention, rngs, dtype, param_dtype):
    super().__init__(width, num_heads, implementation=attention, rngs=rngs, dtype=dtype,
                     param_dtype=param_dtype)
    self.window = window
    self.bias_table = nnx.Param(
        nnx.initializers.truncated_normal(0.02)(rngs.params(), ((2 * window - 1) ** 2, num_heads),
                                                param_dtype), out_sharding=(None, "heads"))

  def __call__(self, windows, mask=None):
    """windows [B*nW, N, C]; mask [nW, N, N] additive, or None."""
    n = windows.shape[1]
    index = relative_position_index(self.window).reshape(-1)
    bias = self.bias_table[...][index].reshape(n, n, self.num_heads).transpose(2, 0, 1)[None]
    if mask is not None:  # windows of one image repeat: tile the mask over the batch
      num_windows = mask.shape[0]
      bias = bias + jnp.asarray(mask)[:, None]
      bias = jnp.tile(bias, (windows.shape[0] // num_windows, 1, 1, 1))
    return self.attend(windows, bias=bias.astype(jnp.float32))


class SwinBlock(nnx.Module):

  def __init__(self, width, num_heads, window, shift, mlp_ratio, *, attention, ln_eps,
               rngs, dtype, param_dtype):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.window, self.shift = window, shift
    self.norm1 = layers.layer_norm(width, eps=ln_eps, **kw)
    self.attn = WindowAttention(width, num_heads, window, attention=attention, **kw)
    self.norm2 = layers.layer_norm(width, eps=ln_eps, **kw)
    self.mlp = layers.Mlp(width, int(width * mlp_ratio), **kw)

  def __call__(self, x, drop_rate, rng, train):
    """x [B, H, W, C]."""
    b, h, w, c = x.shape
    rng1, rng2 = jax.random.split(rng)
    y = self.norm1(x)
    if self.shift:
      y = jnp.roll(y, (-self.shift, -self.shift), axis=(1, 2))
    mask = shift_mask(h, w, self.window, self.shift) if self.shift else None
    y = window_merge(self.attn(window_partition(y, self.window), mask), self.window, h, w)
    if self.shift:
      y = jnp.roll(y, (self.shift, self.shift), axis=(1, 2))
    x = x + layers.drop_path(y, drop_rate, rng1, train)
    x = x + layers.drop_path(self.mlp(self.norm2(x)), drop_rate, rng2, train)
    return sharding.constrain(x, ("batch", None, None, "act_embed"))


class PatchMerging(nnx.Module):
  """2x2 neighbours -> 4C (HF order: (0,0), (1,0), (0,1), (1,1)) -> norm -> linear 2C."""

  def __init__(self, width, *, ln_eps, rngs, dtype, param_dtype):
    self.norm = layers.layer_norm(4 * width, eps=ln_eps, rngs=rngs, dtype=dtype,
                                  param_dtype=param_dtype)
    self.reduction = layers.dense(4 * width, 2 * width, ("embed", "mlp"), use_bias=False,
                                  rngs=rngs, dtype=dtype, param_dtype=param_dtype)

  def __call__(self, x):
    x = jnp.concatenate([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2],
                         x[:, 1::2, 1::2]], axis=-1)
    return self.reduction(self.norm(x))


class Stage(nnx.Module):

  def __init__(self, blocks: list, merge):
    self.blocks = nnx.List(blocks)
    self.merge = merge


class Swin(nnx.Module):
  """Swin classifier/encoder. `num_classes=0` gives an encoder without a head.

  A backbone (models/backbone.py) that takes mask tokens; built for one input
  size, its tokens are those of the last stage (stride patch_size * 2^(stages-1)).
  """
  capabilities = frozenset({"mask_tokens", "stages"})

  def __init__(self, *, num_classes: int = 0, variant: str | None = None,
               patch_size: int = 4, window_size: int = 7, embed_dim: int | None = None,
               depths: Sequence[int] | None = None, num_heads: Sequence[int] | None = None,
               mlp_ratio: float = 4.0, image_size: int | tuple = 224, channels: int = 3,
               drop_path: float = 0.1, ln_eps: float = 1e-5, attention: str = "auto",
               remat: bool = False, head_zero_init: bool = True, dtype: str = "float32",
               param_dtype: str = "float32", rngs: nnx.Rngs):
    if variant is not None:
      if variant not in VARIANTS:
        raise ConfigError(f"config.model.variant={variant!r} is not a Swin variant; "
                          f"valid: {', '.join(VARIANTS)}")
      embed_dim, depths, num_heads = (embed_dim or VARIANTS[variant][0],
                                      depths or VARIANTS[variant][1],
                                      num_heads or VARIANTS[variant][2])
    if embed_dim is None or depths is None or num_heads is None:
      raise ConfigError("config.model needs variant= or embed_dim, depths and num_heads")
    if len(depths) != len(num_heads):
      raise ConfigError(f"config.model.depths {tuple(depths)} and num_heads "
                        f"{tuple(num_heads)} must have one entry per stage")
    self.patch_size, self.channels, self.num_classes = patch_size, channels, num_classes
    self.image_size = (image_size,) * 2 if isinstance(image_size, int) else tuple(image_size)
    self.dtype, self.remat = jnp.dtype(dtype), remat
    self.drop_path, self.num_blocks = drop_path, sum(depths)
    param_dtype = jnp.dtype(param_dtype)
    kw = dict(rngs=rngs, dtype=self.dtype, param_dtype=param_dtype)
    grid = self.patch_grid = self._grid(self.image_size)
    self.patch_embed = layers.dense(patch_size ** 2 * channels, embed_dim, (None, "embed"),
                                    kernel_init=nnx.initializers.lecun_normal(), **kw)
    self.patch_norm = layers.layer_norm(embed_dim, eps=ln_eps, **kw)
    stages, width, self.widths = [], embed_dim, []
    for i, (depth, heads) in enumerate(zip(depths, num_heads)):
      # As in the reference: windows no larger than the feature map, no shift then.
      window = min(window_size, *grid)
      for size in grid:
        if size % window:
          raise ConfigError(
              f"stage {i} feature map {grid[0]}x{grid[1]} is not divisible by "
              f"config.model.window_size={window}; use an image size that is "
              f"patch_size * 2^stage * window_size compatible")
      shift = 0 if min(grid) <= window_size else window // 2
      blocks = [SwinBlock(width, heads, window, shift if j % 2 else 0, mlp_ratio,
                          attention=attention, ln_eps=ln_eps, **kw) for j in range(depth)]
      last = i == len(depths) - 1
      merge = None if last else PatchMerging(width, ln_eps=ln_eps, **kw)
      stages.append(Stage(blocks, merge))
      self.widths.append(width)
      if not last:
        grid, width = (grid[0] // 2, grid[1] // 2), width * 2
    self.stages = nnx.List(stages)
    self.width, self.grid, self.embed_width = width, grid, embed_dim
    self.token_stride = patch_size * 2 ** (len(depths) - 1)
    self.norm = layers.layer_norm(width, eps=ln_eps, **kw)
    self.head = (layers.dense(width, num_classes, ("embed", "classes"),
                              kernel_init=(nnx.initializers.zeros_init() if head_zero_init
                                           else nnx.initializers.xavier_uniform()), **kw)
                 if num_classes else None)

  def _grid(self, image_hw):
    h, w = image_hw
    p = self.patch_size
    if h % p or w % p:
      raise ConfigError(f"image size {h}x{w} is not divisible by "
                        f"config.model.patch_size={p}")
    return h // p, w // p

  def __call__(self, images, *, train: bool = False, rng: jax.Array | None = None,
               token_mask: jax.Array | None = None, mask_token: jax.Array | None = None):
    """`token_mask` [B, H/p * W/p] replaces those patch embeddings by `mask_token`
    (SimMIM: a hierarchical encoder can't drop tokens, so it sees mask tokens)."""
    if images.ndim != 4 or images.shape[-1] != self.channels:
      raise ConfigError(f"Swin expects images [batch, height, width, {self.channels}] "
                        f"(config.model.channels), got shape {tuple(images.shape)}")
    if tuple(images.shape[1:3]) != self.image_size:
      raise ConfigError(f"Swin was built for {self.image_size[0]}x{self.image_size[1]} "
                        f"images (config.model.image_size), got "
                        f"{images.shape[1]}x{images.shape[2]}")
    b = images.shape[0]
    gh, gw = self._grid(images.shape[1:3])
    x = self.patch_norm(self.patch_embed(layers.patchify(images.astype(self.dtype),
                                                         self.patch_size)))
    if token_mask is not None:
      x = jnp.where(token_mask.reshape(b, gh, gw, 1), mask_token.astype(x.dtype), x)
    drop = train and rng is not None and self.drop_path > 0
    keys = jax.random.split(rng if drop else jax.random.key(0), self.num_blocks)
    rates = np.linspace(0.0, self.drop_path, self.num_blocks)

    def apply(block, x, rate, key):
      return block(x, rate, key, drop)

    if self.remat:
      apply = nnx.remat(apply)
    stages, index = [], 0
    for stage in self.stages:
      for block in stage.blocks:
        x = apply(block, x, rates[index], keys[index])
        index += 1
      stages.append(x)
      if stage.merge is not None:
        x = stage.merge(x)
    grid = x.shape[1:3]
    tokens = self.norm(x.reshape(b, -1, x.shape[-1]))
    pre_logits = tokens.mean(axis=1)
    out = {"stages": stages, "tokens": tokens, "grid": grid, "pre_logits": pre_logits}
    logits = self.head(pre_logits) if self.head is not None else pre_logits
    return logits.astype(jnp.float32), out
