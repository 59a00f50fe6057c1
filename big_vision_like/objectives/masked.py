"""Masked image modelling: MAE (dropped tokens) and SimMIM (mask tokens).

MAE (He et al. 2022): a random 75% of the patches are dropped, the encoder
sees only the visible ones, a light decoder fills in mask tokens and predicts
the pixels; the loss counts masked patches only. It needs a backbone that can
encode a subset of its tokens ('drop_tokens': ViT).

SimMIM (Xie et al. 2022): the encoder sees every patch, a learned mask token in
place of the masked ones, and a linear decoder predicts the pixels from its
output tokens; it needs only 'mask_tokens', so hierarchical encoders (Swin),
which can't drop tokens, pre-train this way (ViT too).

Both predict per-patch pixels (optionally normalised per patch, `norm_pix`) and
share the loss, the reconstructions for viewing and the features for probes.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from big_vision_like.models import MODELS, backbone as backbone_lib, layers
from big_vision_like.models.vit import Block
from big_vision_like.objectives.base import Objective
from big_vision_like.registry import ConfigError


def patchify(images: jax.Array, patch: int) -> jax.Array:
  """[B, H, W, C] -> [B, N, p*p*C], patches row-major, pixels (row, col, channel)."""
  x = layers.patchify(images, patch)
  return x.reshape(x.shape[0], -1, x.shape[-1])


def unpatchify(patches: jax.Array, grid: tuple[int, int], patch: int) -> jax.Array:
  return layers.unpatchify(patches.reshape(patches.shape[0], *grid, -1), patch)


def pixel_targets(images: jax.Array, patch: int, norm_pix: bool) -> jax.Array:
  target = patchify(images.astype(jnp.float32), patch)
  if norm_pix:  # unbiased variance, as the reference implementation
    mean = target.mean(-1, keepdims=True)
    var = target.var(-1, keepdims=True, ddof=1)
    target = (target - mean) / jnp.sqrt(var + 1e-6)
  return target


def masked_mse(pred: jax.Array, target: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean squared error per patch, averaged over the masked patches (mask = 1) only."""
  per_patch = ((pred - target) ** 2).mean(-1)
  return (per_patch * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def random_masking(noise: jax.Array, mask_ratio: float):
  """Per example, keeps the patches with the smallest noise.

  Returns (ids_keep [B, K], mask [B, N] with 1 = masked, ids_restore [B, N]).
  """
  n = noise.shape[1]
  keep = int(n * (1 - mask_ratio))
  ids_shuffle = jnp.argsort(noise, axis=1)
  ids_restore = jnp.argsort(ids_shuffle, axis=1)
  mask = jnp.ones_like(noise).at[:, :keep].set(0.0)
  mask = jnp.take_along_axis(mask, ids_restore, axis=1)
  return ids_shuffle[:, :keep], mask, ids_restore


def block_grid(grid: tuple[int, int], unit: int) -> tuple[int, int]:
  return -(-grid[0] // unit), -(-grid[1] // unit)


def block_mask(rng: jax.Array, batch: int, grid: tuple[int, int], unit: int,
               mask_ratio: float) -> jax.Array:
  """[B, N] token mask made of whole unit x unit blocks (SimMIM's mask patches)."""
  coarse = block_grid(grid, unit)
  _, mask, _ = random_masking(jax.random.uniform(rng, (batch, coarse[0] * coarse[1])),
                              mask_ratio)
  mask = mask.reshape(batch, *coarse)
  fine = jnp.repeat(jnp.repeat(mask, unit, 1), unit, 2)[:, :grid[0], :grid[1]]
  return fine.reshape(batch, -1)


class MaeDecoder(nnx.Module):
  """Mask tokens back in place, a few transformer blocks, a pixel predictor."""

  def __init__(self, encoder_width: int, num_patches: int, grid, out_dim: int, *,
               width: int, depth: int, num_heads: int, posemb: str, ln_eps: float,
               rngs: nnx.Rngs):
    if posemb not in ("sincos2d", "learn"):
      raise ConfigError(f"config.objective.decoder_posemb={posemb!r}; valid: sincos2d, learn")
    self.embed = layers.dense(encoder_width, width, ("embed", None), rngs=rngs)
    self.mask_token = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (width,)))
    pe = (layers.sincos_2d(*grid, width) if posemb == "sincos2d" else
          nnx.initializers.normal(0.02)(rngs.params(), (1, num_patches, width)))
    # Fixed sin-cos embeddings are a constant, not a parameter.
    self.pos_embedding = nnx.Param(pe) if posemb == "learn" else nnx.Variable(pe)
    self.blocks = nnx.List([Block(width, 4 * width, num_heads, layerscale=None,
                                  attention="auto", ln_eps=ln_eps, rngs=rngs,
                                  dtype=jnp.float32, param_dtype=jnp.float32)
                            for _ in range(depth)])
    self.norm = layers.layer_norm(width, eps=ln_eps, rngs=rngs)
    self.pred = layers.dense(width, out_dim, (None, None), rngs=rngs)

  def __call__(self, latent: jax.Array, ids_restore: jax.Array, num_prefix: int):
    x = self.embed(latent)
    prefix, visible = x[:, :num_prefix], x[:, num_prefix:]
    b, n = ids_restore.shape
    masks = jnp.broadcast_to(self.mask_token[...], (b, n - visible.shape[1], x.shape[-1]))
    x = jnp.concatenate([visible, masks], axis=1)
    x = jnp.take_along_axis(x, ids_restore[..., None], axis=1) + self.pos_embedding[...]
    x = jnp.concatenate([prefix, x], axis=1)
    for block in self.blocks:
      x = block(x, 0.0, jax.random.key(0), False)
    return self.pred(self.norm(x))[:, num_prefix:]


class _MaskedModeling(Objective):
  """What MAE and SimMIM share: the pixel loss, reconstructions and features.
  Subclasses build `self.backbone` and define `predict`."""

  def _build_backbone(self, config, needs: str, mask_ratio: float, norm_pix: bool, rngs):
    if not 0.0 < mask_ratio < 1.0:
      raise ConfigError(f"config.objective.mask_ratio={mask_ratio} must be in (0, 1)")
    model = dict(config.model)
    name = model.pop("name")
    if model.get("num_classes"):
      raise ConfigError(f"config.model.num_classes must be 0 for {self.name!r}: the "
                        f"encoder is pre-trained without a classifier")
    self.backbone = MODELS.build(name, model, field="config.model", rngs=rngs)
    hint = "; objective 'simmim' needs only mask tokens" if needs == "drop_tokens" else ""
    backbone_lib.require(self.backbone, needs, by=f"objective {self.name!r}", name=name,
                         hint=hint)
    self.mask_ratio, self.norm_pix = mask_ratio, norm_pix
    self.patch = self.backbone.patch_size
    self.grid = tuple(self.backbone.patch_grid if needs == "mask_tokens"
                      else self.backbone.grid)

  def predict(self, images: jax.Array, rng: jax.Array, *, train: bool = False,
              noise: jax.Array | None = None):
    """(predicted patches [B, N, p*p*C], mask [B, N] with 1 = masked); `noise`
    [B, N] picks the masked patches (the smallest are kept), for tests."""
    raise NotImplementedError

  def loss(self, batch, *, rng, train):
    images = batch["image"]
    pred, mask = self.predict(images, rng, train=train)
    loss = masked_mse(pred.astype(jnp.float32),
                      pixel_targets(images, self.patch, self.norm_pix), mask)
    return loss, {"loss": loss, "mask_fraction": mask.mean()}

  def reconstruct(self, images: jax.Array, rng: jax.Array):
    """(reconstruction, mask) as images [B, H, W, C] and [B, H, W], visible
    patches pasted from the input, for viewing."""
    pred, mask = self.predict(images, rng)
    if self.norm_pix:  # undo the per-patch normalisation with the true statistics
      target = patchify(images.astype(jnp.float32), self.patch)
      mean = target.mean(-1, keepdims=True)
      std = jnp.sqrt(target.var(-1, keepdims=True, ddof=1) + 1e-6)
      pred = pred * std + mean
    patches = jnp.where(mask[..., None] > 0, pred, patchify(images, self.patch))
    grid = (images.shape[1] // self.patch, images.shape[2] // self.patch)
    pixel_mask = unpatchify(jnp.repeat(mask[..., None], self.patch ** 2, -1), grid,
                            self.patch)[..., 0]
    return unpatchify(patches, grid, self.patch), pixel_mask

  def features(self, images):
    """The encoder on the whole image (no masking): its pooled representation."""
    return self.backbone(images)[1]["pre_logits"]


class Mae(_MaskedModeling):
  """`mae`: the encoder sees the visible patches only; a decoder predicts the rest."""
  name = "mae"

  def __init__(self, config: Any, *, mask_ratio: float = 0.75, norm_pix: bool = False,
               decoder_width: int = 512, decoder_depth: int = 8, decoder_heads: int = 16,
               decoder_posemb: str = "sincos2d", decoder_ln_eps: float = 1e-6,
               rngs: nnx.Rngs):
    """`decoder_ln_eps`: HF's ViTMAE port uses 1e-12 where the original MAE uses 1e-6."""
    self._build_backbone(config, "drop_tokens", mask_ratio, norm_pix, rngs)
    self.decoder = MaeDecoder(
        self.backbone.width, int(np.prod(self.grid)), self.grid,
        self.patch ** 2 * self.backbone.channels, width=decoder_width, depth=decoder_depth,
        num_heads=decoder_heads, posemb=decoder_posemb, ln_eps=decoder_ln_eps, rngs=rngs)

  def predict(self, images, rng, *, train=False, noise=None):
    k_mask, k_model = jax.random.split(rng)
    if noise is None:
      noise = jax.random.uniform(k_mask, (images.shape[0], int(np.prod(self.grid))))
    x, _ = self.backbone.embed(images)
    ids_keep, mask, ids_restore = random_masking(noise, self.mask_ratio)
    x = jnp.take_along_axis(x, ids_keep[..., None], axis=1)
    latent = self.backbone.encode_tokens(x, train=train, rng=k_model)
    pred = self.decoder(latent, ids_restore, self.backbone.num_prefix_tokens)
    return pred, mask


class SimMim(_MaskedModeling):
  """`simmim`: mask tokens in place of the masked patches, a linear pixel decoder."""
  name = "simmim"

  def __init__(self, config: Any, *, mask_ratio: float = 0.6, norm_pix: bool = False,
               mask_unit: int = 0, rngs: nnx.Rngs):
    """`mask_unit`: masks come in blocks of that many patches a side (default: one
    block per output token, e.g. 8x8 patches for Swin-T's 32-pixel tokens)."""
    self._build_backbone(config, "mask_tokens", mask_ratio, norm_pix, rngs)
    self.stride = self.backbone.token_stride
    self.mask_unit = mask_unit or max(1, self.stride // self.patch)
    blocks = block_grid(self.grid, self.mask_unit)
    if blocks[0] * blocks[1] < 4:
      raise ConfigError(
          f"objective 'simmim' masks blocks of {self.mask_unit}x{self.mask_unit} "
          f"patches, but the {self.grid[0]}x{self.grid[1]} patch grid holds only "
          f"{blocks[0] * blocks[1]}; set a smaller config.objective.mask_unit")
    self.mask_token = nnx.Param(jnp.zeros((self.backbone.embed_width,)))
    self.decoder = layers.dense(self.backbone.width, self.stride ** 2 * self.backbone.channels,
                                ("embed", None), rngs=rngs)

  def predict(self, images, rng, *, train=False, noise=None):
    k_mask, k_model = jax.random.split(rng)
    b = images.shape[0]
    mask = (block_mask(k_mask, b, self.grid, self.mask_unit, self.mask_ratio)
            if noise is None else random_masking(noise, self.mask_ratio)[1])
    _, out = self.backbone(images, train=train, rng=k_model, token_mask=mask > 0,
                           mask_token=self.mask_token[...])
    tokens = out["tokens"][:, -int(np.prod(out["grid"])):]  # drop any class token
    pixels = unpatchify(self.decoder(tokens), tuple(out["grid"]), self.stride)
    return patchify(pixels, self.patch), mask


def render(images: np.ndarray, reconstructions: np.ndarray, masks: np.ndarray,
           max_rows: int = 8) -> np.ndarray:
  """A uint8 grid, one row per example: input | masked input | reconstruction.

  Images are in the [-1, 1] range of the default 'normalize' transform.
  """
  to_uint8 = lambda x: np.clip((np.asarray(x) + 1.0) * 127.5, 0, 255).astype(np.uint8)
  rows = []
  for image, recon, mask in list(zip(images, reconstructions, masks))[:max_rows]:
    masked = np.where(np.asarray(mask)[..., None] > 0, -1.0, image)
    rows.append(np.concatenate([to_uint8(image), to_uint8(masked), to_uint8(recon)], axis=1))
  grid = np.concatenate(rows, axis=0)
  return np.repeat(grid, 3, -1) if grid.shape[-1] == 1 else grid
