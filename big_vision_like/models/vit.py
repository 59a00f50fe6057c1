"""Vision Transformer (Dosovitskiy et al. 2021) in Flax NNX.

Variants by name ('Ti/16', 'S/16', 'B/16', 'L/16', 'H/14'); any patch size down
to 1 (pixel tokens) and any input size: the learned position embedding is
resampled when the token grid differs from the one it was built for (bilinear,
or torch's bicubic as HF / timm do: `posemb_resample`).

`__call__(images, train=..., rng=...)` returns (logits, intermediates) where
intermediates holds 'tokens' (final-norm patch tokens, [B, N, D]), 'grid'
(the token grid (h, w)) and 'pre_logits' ([B, D]) for dense heads and probes.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from big_vision_like.models import layers
from big_vision_like.parallel import sharding
from big_vision_like.registry import ConfigError

#            width, depth, mlp_dim, heads
VARIANTS = {
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "M": (512, 12, 2048, 8),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
    "H": (1280, 32, 5120, 16),
}


def parse_variant(variant: str) -> dict:
  """'S/16' -> dict(width=384, depth=12, mlp_dim=1536, num_heads=6, patch_size=16)."""
  name, _, patch = variant.partition("/")
  if name not in VARIANTS or (patch and not patch.isdigit()):
    raise ConfigError(f"config.model.variant={variant!r} is not a ViT variant; "
                      f"use one of {', '.join(VARIANTS)} with an optional /patch, e.g. 'S/16'")
  width, depth, mlp_dim, heads = VARIANTS[name]
  out = dict(width=width, depth=depth, mlp_dim=mlp_dim, num_heads=heads)
  if patch:
    out["patch_size"] = int(patch)
  return out


class Block(nnx.Module):
  """Pre-norm transformer block with optional LayerScale and stochastic depth.

  `mlp='swiglu'` puts a `layers.SwiGLU` of width `mlp_dim` in place of the MLP.
  """

  def __init__(self, width, mlp_dim, num_heads, *, layerscale, attention,
               ln_eps, rngs, dtype, param_dtype, activation="gelu", qkv_bias=True,
               mlp="mlp"):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.norm1 = layers.layer_norm(width, eps=ln_eps, **kw)
    self.attn = layers.Attention(width, num_heads, implementation=attention,
                                 qkv_bias=qkv_bias, **kw)
    self.norm2 = layers.layer_norm(width, eps=ln_eps, **kw)
    self.mlp = (layers.SwiGLU(width, mlp_dim, **kw) if mlp == "swiglu"
                else layers.Mlp(width, mlp_dim, activation=activation, **kw))
    self.ls1 = layers.LayerScale(width, layerscale, param_dtype) if layerscale else None
    self.ls2 = layers.LayerScale(width, layerscale, param_dtype) if layerscale else None

  def __call__(self, x, drop_rate, rng, train, mask=None):
    rng1, rng2 = jax.random.split(rng)
    y = self.attn(self.norm1(x), mask=mask)
    y = self.ls1(y) if self.ls1 is not None else y
    x = x + layers.drop_path(y, drop_rate, rng1, train)
    y = self.mlp(self.norm2(x))
    y = self.ls2(y) if self.ls2 is not None else y
    x = x + layers.drop_path(y, drop_rate, rng2, train)
    return sharding.constrain(x, ("batch", "seq", "act_embed"))


class MAPHead(nnx.Module):
  """Multihead attention pooling: a learned probe attends to the tokens."""

  def __init__(self, width, mlp_dim, num_heads, *, attention, ln_eps, rngs,
               dtype, param_dtype, activation="gelu"):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.probe = nnx.Param(nnx.initializers.xavier_uniform()(
        rngs.params(), (1, 1, width), param_dtype), out_sharding=(None, None, "embed"))
    self.attn = layers.Attention(width, num_heads, implementation=attention, **kw)
    self.norm = layers.layer_norm(width, eps=ln_eps, **kw)
    self.mlp = layers.Mlp(width, mlp_dim, activation=activation, **kw)

  def __call__(self, x):
    probe = jnp.broadcast_to(self.probe[...].astype(x.dtype), (x.shape[0], 1, x.shape[-1]))
    y = self.attn(probe, x)
    return (y + self.mlp(self.norm(y)))[:, 0]


class ViT(nnx.Module):
  """ViT classifier/encoder. `num_classes=0` gives an encoder without a head.

  A backbone (models/backbone.py) with every capability: mask tokens, dropped
  tokens (`embed` + `encode_tokens`), one output token per patch, any input size.

  Options of published DINOv2 models, off by default: `qkv_bias=False`,
  `mlp='swiglu'` (a gated MLP of width `mlp_dim`: its own field, not an
  `mlp_activation`, because it has another parameter and HF keeps it apart from
  hidden_act too) and `num_registers` learned tokens (Darcet et al. 2024) after
  the class token, before the patches, with no position embedding; they are
  prefix tokens: counted in `num_prefix_tokens`, absent from 'tokens', not in
  'gap' pooling, seen by 'map'. `posemb_resample` picks how the position
  embedding follows another input size (`layers.RESAMPLE_METHODS`; HF
  DINOv2's is 'bicubic').
  """
  capabilities = frozenset({"mask_tokens", "drop_tokens", "patch_tokens",
                            "any_image_size"})

  def __init__(self, *, num_classes: int = 0, variant: str | None = None,
               patch_size: int | None = None, width: int | None = None,
               depth: int | None = None, mlp_dim: int | None = None,
               num_heads: int | None = None, image_size: int | tuple = 224,
               channels: int = 3, posemb: str = "learn", pool: str = "cls",
               drop_path: float = 0.0, layerscale: float | None = None,
               ln_eps: float = 1e-6, head_zero_init: bool = True,
               mlp_activation: str = "gelu", patch_bias: bool = True,
               pre_norm: bool = False, qkv_bias: bool = True, mlp: str = "mlp",
               num_registers: int = 0, posemb_resample: str = "bilinear",
               attention: str = "auto", remat: bool = False, scan: bool = False,
               dtype: str = "float32", param_dtype: str = "float32",
               rngs: nnx.Rngs):
    arch = parse_variant(variant) if variant else {}
    given = dict(patch_size=patch_size, width=width, depth=depth,
                 mlp_dim=mlp_dim, num_heads=num_heads)
    arch.update({k: v for k, v in given.items() if v is not None})
    if "mlp_dim" not in arch and "width" in arch:
      arch["mlp_dim"] = 4 * arch["width"]
    for field in given:
      if field not in arch:
        raise ConfigError(f"config.model.{field} is not set and no "
                          f"config.model.variant gives it")
    if pool not in ("cls", "gap", "map"):
      raise ConfigError(f"config.model.pool={pool!r}; valid: cls, gap, map")
    if posemb not in ("learn", "sincos2d"):
      raise ConfigError(f"config.model.posemb={posemb!r}; valid: learn, sincos2d")
    if mlp not in ("mlp", "swiglu"):
      raise ConfigError(f"config.model.mlp={mlp!r}; valid: mlp, swiglu")
    if posemb_resample not in layers.RESAMPLE_METHODS:
      raise ConfigError(f"config.model.posemb_resample={posemb_resample!r}; valid: "
                        f"{', '.join(layers.RESAMPLE_METHODS)}")
    if num_registers < 0:
      raise ConfigError(f"config.model.num_registers={num_registers} must be >= 0")
    self.patch_size = arch["patch_size"]
    self.width, self.depth = arch["width"], arch["depth"]
    self.image_size = (image_size,) * 2 if isinstance(image_size, int) else tuple(image_size)
    self.grid = self.patch_grid = self._grid(self.image_size)
    self.channels, self.pool, self.posemb = channels, pool, posemb
    self.posemb_resample, self.num_registers = posemb_resample, num_registers
    self.num_classes, self.remat, self.scan = num_classes, remat, scan
    self.drop_path = drop_path
    self.dtype = jnp.dtype(dtype)
    param_dtype = jnp.dtype(param_dtype)
    kw = dict(rngs=rngs, dtype=self.dtype, param_dtype=param_dtype)
    width = self.width
    self.embed_width, self.token_stride = width, self.patch_size
    self.num_prefix_tokens = (1 if pool == "cls" else 0) + num_registers

    # Patchify as reshape + matmul: identical to a stride-p conv, and cheap at p=1.
    self.embedding = layers.dense(self.patch_size ** 2 * channels, width,
                                  (None, "embed"), use_bias=patch_bias,
                                  kernel_init=nnx.initializers.lecun_normal(), **kw)
    if posemb == "learn":
      self.pos_embedding = nnx.Param(
          nnx.initializers.normal(0.02)(rngs.params(), (1, np.prod(self.grid), width),
                                        param_dtype), out_sharding=(None, None, "embed"))
    self.cls_token = (nnx.Param(jnp.zeros((1, 1, width), param_dtype),
                                out_sharding=(None, None, "embed"))
                      if pool == "cls" else None)
    init = nnx.initializers.normal(1e-6)  # DINOv2's: near zero, yet not all equal
    self.registers = (nnx.Param(init(rngs.params(), (1, num_registers, width), param_dtype),
                                out_sharding=(None, None, "embed"))
                      if num_registers else None)

    block_args = (width, arch["mlp_dim"], arch["num_heads"])
    if mlp_activation not in layers.ACTIVATIONS:
      raise ConfigError(f"config.model.mlp_activation={mlp_activation!r}; valid: "
                        f"{', '.join(layers.ACTIVATIONS)}")
    block_kw = dict(layerscale=layerscale, attention=attention, ln_eps=ln_eps,
                    dtype=self.dtype, param_dtype=param_dtype, activation=mlp_activation,
                    qkv_bias=qkv_bias, mlp=mlp)
    if scan:
      @nnx.vmap(in_axes=0, out_axes=0,
                transform_metadata={nnx.PARTITION_NAME: "layers"})
      def make_blocks(key):
        return Block(*block_args, rngs=nnx.Rngs(key), **block_kw)
      self.blocks = make_blocks(jax.random.split(rngs.params(), self.depth))
    else:
      self.blocks = nnx.List([Block(*block_args, rngs=rngs, **block_kw)
                              for _ in range(self.depth)])
    # OpenAI CLIP normalises the tokens before the first block too.
    self.pre_norm = layers.layer_norm(width, eps=ln_eps, **kw) if pre_norm else None
    self.norm = layers.layer_norm(width, eps=ln_eps, **kw)
    self.map_head = (MAPHead(*block_args, attention=attention, ln_eps=ln_eps,
                             activation=mlp_activation, **kw)
                     if pool == "map" else None)
    if num_classes:
      head_init = (nnx.initializers.zeros_init() if head_zero_init
                   else nnx.initializers.xavier_uniform())
      self.head = layers.dense(width, num_classes, ("embed", "classes"),
                               kernel_init=head_init, **kw)
    else:
      self.head = None

  def _grid(self, image_hw) -> tuple[int, int]:
    h, w = image_hw
    p = self.patch_size
    if h % p or w % p:
      raise ConfigError(
          f"image size {h}x{w} is not divisible by config.model.patch_size={p}; "
          f"resize or crop the input to a multiple of {p}")
    return h // p, w // p

  def patchify(self, images: jax.Array) -> jax.Array:
    """[B, H, W, C] -> [B, H/p * W/p, p*p*C] in row-major patch order."""
    self._grid(images.shape[1:3])  # a clear error for an indivisible size
    x = layers.patchify(images, self.patch_size)
    return x.reshape(x.shape[0], -1, x.shape[-1])

  def embed(self, images: jax.Array, token_mask: jax.Array | None = None,
            mask_token: jax.Array | None = None) -> tuple[jax.Array, tuple[int, int]]:
    """Patch tokens plus position embedding, [B, N, D], and the token grid.

    Where `token_mask` [B, N] is true the patch embedding is replaced by
    `mask_token` [D] before the position embedding is added (SimMIM, iBOT).
    """
    if images.ndim != 4 or images.shape[-1] != self.channels:
      raise ConfigError(f"ViT expects images [batch, height, width, {self.channels}] "
                        f"(config.model.channels), got shape {tuple(images.shape)}")
    grid = self._grid(images.shape[1:3])
    x = self.embedding(self.patchify(images.astype(self.dtype)))
    if token_mask is not None:
      x = jnp.where(token_mask[..., None], mask_token.astype(x.dtype), x)
    if self.posemb == "learn":
      pe = layers.resample_posemb(self.pos_embedding[...], self.grid, grid,
                                  self.posemb_resample)
    else:
      pe = layers.sincos_2d(*grid, self.width)
    return x + pe.astype(x.dtype), grid

  def encode(self, x: jax.Array, *, train: bool, rng: jax.Array | None) -> jax.Array:
    """Runs the transformer blocks on tokens [B, N, D] (with a class token if any)."""
    rates = jnp.linspace(0.0, self.drop_path, self.depth)
    drop = train and rng is not None and self.drop_path > 0
    keys = jax.random.split(rng if drop else jax.random.key(0), self.depth)

    def apply(block, x, rate, key):
      return block(x, rate, key, drop)

    if self.remat:
      apply = nnx.remat(apply, prevent_cse=not self.scan)
    if self.scan:
      graphdef, params = nnx.split(self.blocks)

      def body(x, inputs):
        block_params, rate, key = inputs
        return apply(nnx.merge(graphdef, block_params), x, rate, key), None

      x, _ = jax.lax.scan(body, x, (params, rates, keys))
      return x
    for i, block in enumerate(self.blocks):
      x = apply(block, x, rates[i], keys[i])
    return x

  def encode_tokens(self, x: jax.Array, *, train: bool = False,
                    rng: jax.Array | None = None) -> jax.Array:
    """Any subset of `embed`'s tokens [B, K, D] -> the final-norm sequence
    [B, num_prefix_tokens + K, D] (the 'drop_tokens' capability: MAE)."""
    return self.norm(self.encode(self.add_cls(x), train=train, rng=rng))

  def add_cls(self, x: jax.Array) -> jax.Array:
    """Prepends the prefix tokens, class token then registers (those the model
    has), and normalises (CLIP)."""
    prefix = [t for t in (self.cls_token, self.registers) if t is not None]
    if prefix:
      prefix = [jnp.broadcast_to(t[...].astype(x.dtype), (x.shape[0],) + t.shape[1:])
                for t in prefix]
      x = jnp.concatenate(prefix + [x], axis=1)
    if self.pre_norm is not None:
      x = self.pre_norm(x)
    return sharding.constrain(x, ("batch", "seq", "act_embed"))

  def __call__(self, images: jax.Array, *, train: bool = False,
               rng: jax.Array | None = None, token_mask: jax.Array | None = None,
               mask_token: jax.Array | None = None):
    x, grid = self.embed(images, token_mask, mask_token)
    x = self.encode_tokens(x, train=train, rng=rng)
    tokens = x[:, self.num_prefix_tokens:]
    if self.pool == "cls":
      pre_logits = x[:, 0]
    elif self.pool == "gap":
      pre_logits = tokens.mean(axis=1)
    else:
      pre_logits = self.map_head(x)
    out = {"tokens": tokens, "grid": grid, "pre_logits": pre_logits}
    logits = self.head(pre_logits) if self.head is not None else pre_logits
    return logits.astype(jnp.float32), out
