"""Image <-> text retrieval recall@k with an image-text (CLIP / SigLIP) objective.

Batches carry 'image' and 'text' int32 [B, captions, L] (every caption of the
image, e.g. from the `tokenize` transform with all_captions=True). A caption
row that is all padding (0) is absent, so images may have different numbers
of captions. Image -> text: an image's query succeeds at k if any of its
captions is among the k captions most similar to it. Text -> image: a
caption's query succeeds at k if its image is among the k most similar
images. Ties are resolved in favour of the correct answer.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from big_vision_like import data
from big_vision_like.evaluators import common
from big_vision_like.registry import ConfigError


def embed_fn(graphdef):
  """Jitted (state, batch) -> image [B, E], captions [B, n, E] and caption validity."""
  def embed(state, batch):
    objective = nnx.merge(graphdef, *state)
    text = batch["text"]
    b, n, length = text.shape
    valid = (text != 0).any(-1)
    captions = objective.embed_text(text.reshape(b * n, length)).astype(jnp.float32)
    captions = jnp.where(valid[..., None], captions.reshape(b, n, -1), 0.0)
    return {"image": objective.embed_image(batch["image"]).astype(jnp.float32),
            "text": captions, "valid": valid}
  return jax.jit(embed)


@jax.jit
def ranks(images, image_valid, texts, text_valid, text_owner, text_own_sim, first_image):
  """Ranks of the correct answers for one block of images.

  Returns each image's i2t rank (how many valid captions score above its best
  own caption) and, per caption, how many images of the block score above
  the caption's own image (summed over blocks, its t2i rank).
  """
  sims = images @ texts.T  # [rows, captions]
  rows = jnp.arange(images.shape[0]) + first_image
  own = text_owner[None, :] == rows[:, None]
  best_own = jnp.where(own & text_valid, sims, -jnp.inf).max(1)
  i2t = ((sims > best_own[:, None]) & text_valid).sum(1)
  above = (sims > text_own_sim[None, :]) & ~own & image_valid[:, None]
  return i2t, above.sum(0)


def recalls(images: np.ndarray, texts: np.ndarray, valid: np.ndarray,
            ks: Sequence[int]) -> dict[str, float]:
  """i2t / t2i recall@k from images [N, E], texts [N, n, E], valid [N, n]."""
  n_images, n_captions = valid.shape
  flat_texts = jnp.asarray(texts.reshape(n_images * n_captions, -1))
  flat_valid = jnp.asarray(valid.reshape(-1))
  owner = jnp.repeat(jnp.arange(n_images), n_captions)
  own_sim = jnp.einsum("ncd,nd->nc", jnp.asarray(texts), jnp.asarray(images)).reshape(-1)
  rows = common.rows_per_block(len(flat_texts))
  padded = np.concatenate([images, np.zeros((-n_images % rows, images.shape[1]),
                                            images.dtype)])
  image_valid = np.arange(len(padded)) < n_images
  i2t, t2i = [], jnp.zeros(len(flat_texts), jnp.int32)
  for start in range(0, len(padded), rows):
    block_i2t, block_t2i = ranks(padded[start:start + rows], image_valid[start:start + rows],
                                 flat_texts, flat_valid, owner, own_sim, start)
    i2t.append(np.asarray(block_i2t))
    t2i = t2i + block_t2i
  i2t = np.concatenate(i2t)[:n_images]
  has_caption = valid.any(1)
  t2i = np.asarray(t2i)[valid.reshape(-1)]
  out = {}
  for k in ks:
    out[f"i2t_recall@{k}"] = float((i2t[has_caption] < k).mean())
    out[f"t2i_recall@{k}"] = float((t2i < k).mean())
  return out


class Retrieval:
  """Recall@k of image->text and text->image retrieval over a captioned split."""

  def __init__(self, data_config, *, mesh, field: str, ks: Sequence[int] = (1, 5)):
    ks = tuple(int(k) for k in ks)
    if not ks or min(ks) < 1:
      raise ConfigError(f"{field}.ks={ks!r} must be positive ranks, e.g. (1, 5)")
    self.data_config, self.mesh, self.field, self.ks = data_config, mesh, field, ks
    self.source = data.build_source(data_config, field)
    self._embed = None

  def run(self, graphdef, state) -> dict[str, float]:
    if self._embed is None:
      self._embed = embed_fn(graphdef)
    out = common.map_split(self._embed, state, self.data_config, self.source, self.field,
                           self.mesh, ("image", "text"))
    if not out["valid"].any():
      raise ConfigError(f"{self.field}: every caption of split "
                        f"{self.data_config.get('split')!r} is empty (all padding)")
    return recalls(out["image"], out["text"], out["valid"], self.ks)
