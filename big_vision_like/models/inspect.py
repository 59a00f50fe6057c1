"""Looking inside a trained ViT: attention weights and token similarity.

Training never materialises attention probabilities (the chunked and Pallas
implementations don't have them), so `attention_maps` recomputes them block by
block from the model's own parameters, in plain XLA. Meant for a few images in
a notebook: pixel tokens at 64x64 give 4,096^2 weights per head and block.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from big_vision_like.models import vit as vit_lib


def blocks(model: vit_lib.ViT) -> list[vit_lib.Block]:
  """The model's blocks as a list, also when they are stacked for `scan`."""
  if not model.scan:
    return list(model.blocks)
  graphdef, state = nnx.split(model.blocks)
  return [nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], state))
          for i in range(model.depth)]


def attention_maps(model: vit_lib.ViT, images: jax.Array) -> list[jax.Array]:
  """Softmax attention weights [batch, heads, tokens, tokens] of every block,
  in evaluation mode; tokens in the model's order (class token first if any)."""
  if not isinstance(model, vit_lib.ViT):
    raise TypeError(f"attention_maps needs a ViT, got {type(model).__name__}")
  x, _ = model.embed(images)
  x = model.add_cls(x)
  maps = []
  for block in blocks(model):
    h = block.norm1(x)
    heads = block.attn.num_heads
    split = lambda t: t.reshape(t.shape[:-1] + (heads, -1)).astype(jnp.float32)
    q, k = split(block.attn.query(h)), split(block.attn.key(h))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(q.shape[-1])
    maps.append(jax.nn.softmax(logits, axis=-1))
    x = block(x, 0.0, jax.random.key(0), False)
  return maps


def token_similarity(model: vit_lib.ViT, images: jax.Array) -> jax.Array:
  """Cosine similarity [batch, tokens, tokens] of the final (normalised) patch tokens."""
  _, aux = model(images)
  tokens = aux["tokens"].astype(jnp.float32)
  tokens = tokens / jnp.linalg.norm(tokens, axis=-1, keepdims=True)
  return jnp.einsum("bnd,bmd->bnm", tokens, tokens)
