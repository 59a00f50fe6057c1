"""Transformer text encoder: the text tower of CLIP / SigLIP.

Tokens are int32 [B, L] with 0 as padding and an EOS after the text (see
data/tokenizers.py). CLIP's tower is causal and pools at the EOS; SigLIP's is
bidirectional and pools the last position. `__call__` returns (pooled [B, D],
tokens [B, L, D]); the projection to the shared space belongs to the objective.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from big_vision_like.models import layers
from big_vision_like.models.vit import Block
from big_vision_like.registry import ConfigError

POOLS = ("eos", "last", "first", "mean")


class TextTransformer(nnx.Module):

  def __init__(self, *, vocab_size: int, max_len: int, width: int = 512, depth: int = 12,
               num_heads: int = 8, mlp_dim: int | None = None, causal: bool = True,
               pool: str = "eos", mask_padding: bool = True, activation: str = "gelu",
               ln_eps: float = 1e-5, attention: str = "auto", remat: bool = False,
               dtype: str = "float32", param_dtype: str = "float32", rngs: nnx.Rngs):
    """`mask_padding` hides padding keys from attention (SigLIP's public
    checkpoints were trained with it off: their padding tokens are attended)."""
    if pool not in POOLS:
      raise ConfigError(f"config.objective.text.pool={pool!r}; valid: {', '.join(POOLS)}")
    if activation not in layers.ACTIVATIONS:
      raise ConfigError(f"config.objective.text.activation={activation!r}; valid: "
                        f"{', '.join(layers.ACTIVATIONS)}")
    self.vocab_size, self.max_len, self.width = vocab_size, max_len, width
    self.causal, self.pool, self.mask_padding, self.remat = causal, pool, mask_padding, remat
    self.dtype = jnp.dtype(dtype)
    param_dtype = jnp.dtype(param_dtype)
    kw = dict(rngs=rngs, dtype=self.dtype, param_dtype=param_dtype)
    self.token_embedding = nnx.Embed(
        vocab_size, width, dtype=self.dtype, param_dtype=param_dtype,
        embedding_init=nnx.with_partitioning(nnx.initializers.normal(0.02),
                                             ("vocab", "embed")), rngs=rngs)
    self.pos_embedding = nnx.Param(
        nnx.initializers.normal(0.01)(rngs.params(), (1, max_len, width), param_dtype),
        out_sharding=(None, None, "embed"))
    self.blocks = nnx.List([
        Block(width, mlp_dim or 4 * width, num_heads, layerscale=None, attention=attention,
              ln_eps=ln_eps, activation=activation, **kw) for _ in range(depth)])
    self.norm = layers.layer_norm(width, eps=ln_eps, **kw)

  def __call__(self, tokens: jax.Array, *, train: bool = False,
               rng: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    del train, rng  # no dropout in the text tower
    if tokens.ndim != 2 or tokens.shape[1] > self.max_len:
      raise ConfigError(f"text tokens must be [batch, <= {self.max_len}] "
                        f"(config.input.tokenizer.max_len), got shape {tuple(tokens.shape)}")
    length = tokens.shape[1]
    x = self.token_embedding(tokens) + self.pos_embedding[:, :length].astype(self.dtype)
    valid = tokens != 0
    mask = jnp.ones((1, 1, length, length), bool)
    if self.causal:
      mask = mask & jnp.tril(jnp.ones((length, length), bool))[None, None]
    if self.mask_padding:
      mask = mask & valid[:, None, None, :]
    apply = lambda block, x: block(x, 0.0, jax.random.key(0), False, mask=mask)
    if self.remat:
      apply = nnx.remat(apply)
    for block in self.blocks:
      x = apply(block, x)
    x = self.norm(x)
    if self.pool == "eos":  # the last non-padding token is the EOS
      eos = jnp.maximum(valid.sum(-1) - 1, 0)
      pooled = jnp.take_along_axis(x, eos[:, None, None], axis=1)[:, 0]
    elif self.pool == "last":
      pooled = x[:, -1]
    elif self.pool == "first":
      pooled = x[:, 0]
    else:
      weights = valid[..., None].astype(x.dtype)
      pooled = (x * weights).sum(1) / jnp.maximum(weights.sum(1), 1)
    return pooled, x
