"""Perceiver IO (Jaegle et al. 2021) for images, in Flax NNX.

A fixed latent array cross-attends to the input array (pixels or patches with
a position encoding), so cost is linear in the input size; a stack of latent
self-attention layers does the work (the same weights repeated `num_blocks`
times, as in the paper); an output-query decoder cross-attends to the latents:
one learned query for a class ('class'), or one query per output position
built from Fourier position encodings ('dense', per-pixel logits).

Matches HF transformers' PerceiverForImageClassificationLearned / Fourier
(tests/test_parity.py). Note the reference's layer norms use eps 1e-5, and its
Fourier features are ordered [pos, sin(dim-major bands), cos(...)].
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from big_vision_like.models import layers
from big_vision_like.parallel import sharding
from big_vision_like.registry import ConfigError


def linear_positions(height: int, width: int) -> np.ndarray:
  """[H*W, 2] positions in [-1, 1], row-major."""
  ys, xs = np.meshgrid(np.linspace(-1, 1, height), np.linspace(-1, 1, width), indexing="ij")
  return np.stack([ys, xs], -1).reshape(-1, 2).astype(np.float32)


def fourier_features(positions: np.ndarray, num_bands: int,
                     max_resolution: tuple[int, int]) -> np.ndarray:
  """[N, 2 + 4 * num_bands]: positions, then sin and cos of pi * f * pos, f linear in
  [1, resolution / 2] per dimension (dimension-major)."""
  bands = np.stack([np.linspace(1.0, r / 2, num_bands) for r in max_resolution])  # [2, K]
  features = (positions[:, :, None] * bands[None]).reshape(len(positions), -1)
  return np.concatenate([positions, np.sin(np.pi * features), np.cos(np.pi * features)],
                        -1).astype(np.float32)


class PerceiverLayer(layers.Attention):
  """(Cross-)attention with an optional query residual, then a residual MLP."""

  def __init__(self, q_dim: int, kv_dim: int | None, num_heads: int, *,
               qk_channels: int | None = None, widening: int = 1,
               query_residual: bool = True, ln_eps: float, attention: str,
               kv_axis: str = "embed", rngs: nnx.Rngs, dtype, param_dtype):
    """`kv_axis`: logical name of the key/value inputs' channels ('inputs' for
    the encoder's pixels + Fourier features: an odd width, never split)."""
    cross = kv_dim is not None
    kv_dim = kv_dim if cross else q_dim
    qk = qk_channels or kv_dim
    if qk % num_heads:
      raise ConfigError(f"Perceiver attention channels {qk} are not divisible by "
                        f"{num_heads} heads")
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    super().__init__(q_dim, num_heads, kv_width=kv_dim, qk_width=qk, kv_axis=kv_axis,
                     implementation=attention, **kw)
    self.query_residual = query_residual
    self.norm_q = layers.layer_norm(q_dim, eps=ln_eps, **kw)
    self.norm_kv = layers.layer_norm(kv_dim, eps=ln_eps, axis=kv_axis, **kw) if cross else None
    self.norm_mlp = layers.layer_norm(q_dim, eps=ln_eps, **kw)
    self.mlp = layers.Mlp(q_dim, widening * q_dim, **kw)

  def __call__(self, x, inputs=None, mask=None):
    q_in = self.norm_q(x)
    kv_in = self.norm_kv(inputs) if self.norm_kv is not None else q_in
    out = self.attend(q_in, kv_in, mask=mask)
    if self.query_residual:
      out = out + x
    out = out + self.mlp(self.norm_mlp(out))
    return sharding.constrain(out, ("batch", None, "act_embed"))


class Perceiver(nnx.Module):
  """Perceiver IO image encoder with a classification or dense decoder.

  A backbone (models/backbone.py) without patch tokens (it attends from latents);
  with Fourier position encodings it takes any input size.
  """
  capabilities = frozenset({"any_image_size"})

  def __init__(self, *, num_classes: int = 0, image_size: int | tuple = 224,
               channels: int = 3, preprocessor: str = "pixels", patch_size: int = 1,
               prep_channels: int = 256, posemb: str = "fourier", num_bands: int = 64,
               max_resolution: tuple | None = None, posemb_channels: int = 256,
               project_posemb: bool = True, num_latents: int = 512,
               latent_dim: int = 1024, num_blocks: int = 8, self_attends_per_block: int = 6,
               self_heads: int = 8, cross_heads: int = 1, qk_channels: int | None = None,
               self_widening: int = 1, cross_widening: int = 1, decoder: str = "class",
               decoder_heads: int = 1, dense_stride: int = 1,
               dense_concat_inputs: bool = True, ln_eps: float = 1e-5,
               attention: str = "auto", remat: bool = False, dtype: str = "float32",
               param_dtype: str = "float32", rngs: nnx.Rngs):
    if preprocessor not in ("pixels", "conv1x1", "patches"):
      raise ConfigError(f"config.model.preprocessor={preprocessor!r}; valid: pixels, conv1x1, patches")
    if posemb not in ("fourier", "learn"):
      raise ConfigError(f"config.model.posemb={posemb!r}; valid: fourier, learn")
    if decoder not in ("class", "dense"):
      raise ConfigError(f"config.model.decoder={decoder!r}; valid: class, dense")
    if decoder == "dense" and not num_classes:
      raise ConfigError("a dense Perceiver decoder needs config.model.num_classes (per pixel)")
    self.image_size = (image_size,) * 2 if isinstance(image_size, int) else tuple(image_size)
    self.channels, self.preprocessor, self.patch_size = channels, preprocessor, patch_size
    self.posemb, self.num_blocks, self.decoder = posemb, num_blocks, decoder
    self.num_classes, self.remat, self.dense_stride = num_classes, remat, dense_stride
    self.dense_concat_inputs = dense_concat_inputs
    self.dtype = jnp.dtype(dtype)
    self.width = latent_dim
    param_dtype = jnp.dtype(param_dtype)
    kw = dict(rngs=rngs, dtype=self.dtype, param_dtype=param_dtype)
    layer_kw = dict(ln_eps=ln_eps, attention=attention, **kw)
    p = patch_size if preprocessor == "patches" else 1
    self.grid = self._grid(self.image_size)
    if posemb == "learn":  # learned encodings exist for one input grid only
      self.capabilities = frozenset()
    self.max_resolution = tuple(max_resolution or self.grid)
    self.num_bands = num_bands

    if preprocessor == "pixels":
      self.prep, feature_dim = None, channels
    else:
      self.prep = layers.dense(p * p * channels, prep_channels, (None, "embed"), **kw)
      feature_dim = prep_channels
    if posemb == "learn":
      self.pos_embedding = nnx.Param(
          nnx.initializers.normal(0.02)(rngs.params(), (int(np.prod(self.grid)), posemb_channels),
                                        param_dtype), out_sharding=(None, "embed"))
      self.pos_proj = (layers.dense(posemb_channels, posemb_channels, ("embed", "mlp"), **kw)
                       if project_posemb else None)
      pos_dim = posemb_channels
    else:
      pos_dim = 2 + 4 * num_bands
    input_dim = feature_dim + pos_dim

    self.latents = nnx.Param(nnx.initializers.truncated_normal(0.02)(
        rngs.params(), (num_latents, latent_dim), param_dtype), out_sharding=(None, "embed"))
    self.encode_cross = PerceiverLayer(latent_dim, input_dim, cross_heads,
                                       qk_channels=qk_channels, widening=cross_widening,
                                       kv_axis="inputs", **layer_kw)
    self.self_attends = nnx.List([
        PerceiverLayer(latent_dim, None, self_heads, qk_channels=qk_channels,
                       widening=self_widening, **layer_kw)
        for _ in range(self_attends_per_block)])

    if decoder == "class":
      self.query = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (1, latent_dim),
                                                           param_dtype),
                             out_sharding=(None, "embed"))
      query_dim = latent_dim
    else:
      self.query = None
      query_dim = pos_dim if posemb == "fourier" else 2 + 4 * num_bands
      query_dim += feature_dim if dense_concat_inputs else 0
    self.decode_cross = (PerceiverLayer(query_dim, latent_dim, decoder_heads,
                                        query_residual=decoder == "class", **layer_kw)
                         if num_classes else None)
    self.head = (layers.dense(query_dim, num_classes, ("embed", "classes"), **kw)
                 if num_classes else None)

  def _grid(self, image_hw):
    h, w = image_hw
    p = self.patch_size if self.preprocessor == "patches" else 1
    if h % p or w % p:
      raise ConfigError(f"image size {h}x{w} is not divisible by config.model.patch_size={p}")
    return h // p, w // p

  def _features(self, images):
    """[B, H, W, C] -> per-position features [B, h, w, F] (before position encoding)."""
    self._grid(images.shape[1:3])  # a clear error for an indivisible size
    x = images.astype(self.dtype)
    if self.preprocessor == "patches":
      x = layers.patchify(x, self.patch_size)
    return self.prep(x) if self.prep is not None else x

  def _position_encoding(self, grid):
    if self.posemb == "learn":
      if tuple(grid) != self.grid:
        raise ConfigError(f"learned Perceiver position embeddings are for a "
                          f"{self.grid[0]}x{self.grid[1]} input grid, got {grid[0]}x{grid[1]}")
      pos = self.pos_embedding[...]
      return self.pos_proj(pos) if self.pos_proj is not None else pos
    return jnp.asarray(fourier_features(linear_positions(*grid), self.num_bands,
                                        self.max_resolution))

  def __call__(self, images, *, train: bool = False, rng: jax.Array | None = None):
    del train, rng  # no stochastic layers
    if images.ndim != 4 or images.shape[-1] != self.channels:
      raise ConfigError(f"Perceiver expects images [batch, height, width, {self.channels}] "
                        f"(config.model.channels), got shape {tuple(images.shape)}")
    b = images.shape[0]
    features = self._features(images)
    grid = features.shape[1:3]
    pos = self._position_encoding(grid).astype(features.dtype)
    flat = features.reshape(b, -1, features.shape[-1])
    inputs = jnp.concatenate([flat, jnp.broadcast_to(pos, (b,) + pos.shape)], -1)

    z = jnp.broadcast_to(self.latents[...].astype(self.dtype), (b,) + self.latents.shape)
    z = self.encode_cross(z, inputs)
    apply = nnx.remat(lambda layer, z: layer(z)) if self.remat else (lambda layer, z: layer(z))
    for _ in range(self.num_blocks):  # the same weights every block
      for layer in self.self_attends:
        z = apply(layer, z)
    out = {"latents": z, "grid": grid, "pre_logits": z.mean(axis=1)}
    if self.decode_cross is None:
      return out["pre_logits"].astype(jnp.float32), out

    if self.decoder == "class":
      queries = jnp.broadcast_to(self.query[...].astype(self.dtype), (b,) + self.query.shape)
      decoded = self.decode_cross(queries, z)
      out["pre_logits"] = decoded[:, 0]
      return self.head(decoded[:, 0]).astype(jnp.float32), out

    # Dense: one query per output position (every `dense_stride` pixels of the
    # input grid) from its Fourier features, plus that position's input features.
    s = self.dense_stride
    qh, qw = grid[0] // s, grid[1] // s
    query_pos = jnp.asarray(fourier_features(linear_positions(qh, qw), self.num_bands,
                                             self.max_resolution)).astype(z.dtype)
    queries = jnp.broadcast_to(query_pos, (b,) + query_pos.shape)
    if self.dense_concat_inputs:
      local = features[:, ::s, ::s][:, :qh, :qw].reshape(b, qh * qw, -1)
      queries = jnp.concatenate([queries, local.astype(z.dtype)], -1)
    logits = self.head(self.decode_cross(queries, z)).reshape(b, qh, qw, -1)
    out["tokens"] = logits
    h, w = images.shape[1:3]
    if (qh, qw) != (h, w):
      logits = jax.image.resize(logits, (b, h, w, logits.shape[-1]), "bilinear")
    return logits.astype(jnp.float32), out
