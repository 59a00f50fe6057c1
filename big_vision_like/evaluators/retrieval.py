"""Image <-> text retrieval recall@k with an image-text (CLIP / SigLIP) objective.

Batches carry 'image' and 'text' int32 [B, captions, L] (every caption of the
image, e.g. from the `tokenize` transform with all_captions=True). A caption
row that is all padding (0) is absent, so images may have different numbers
of captions. Image -> text: an image's query succeeds at k if any of its
captions is among the k captions most similar to it. Text -> image: a
caption's query succeeds at k if its image is among the k most similar
images. "Most similar" is top_k's order: equal similarities go to the lower
index (caption or image), NaN ranks first, and a correct answer with a NaN
similarity is a miss, so collapsed or NaN embeddings score no better than chance.
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
def similarities(images, texts):
  """[rows, captions]; both passes call this one program, so their ties agree bit for bit."""
  return images @ texts.T


@jax.jit
def own_similarity(sims, text_owner, first_image):
  """Per caption, its similarity to its own image if that image is in this block, else 0."""
  rows = jnp.arange(sims.shape[0]) + first_image
  return jnp.where(text_owner[None, :] == rows[:, None], sims, 0.0).sum(0)


@jax.jit
def ranks(sims, image_valid, text_valid, text_owner, text_own_sim, first_image):
  """Ranks of the correct answers for one block of images.

  Returns each image's i2t rank (how many valid captions of other images rank
  ahead of its best own caption; NEVER without a non-NaN own caption) and, per
  caption, how many images of the block rank ahead of the caption's own image
  (summed over blocks, its t2i rank). Ahead: a larger similarity, an equal one
  at a lower index, or NaN.
  """
  rows = jnp.arange(sims.shape[0]) + first_image
  captions = jnp.arange(sims.shape[1])
  own = text_owner[None, :] == rows[:, None]
  nan = jnp.isnan(sims)
  own_sims = jnp.where(own & text_valid & ~nan, sims, -jnp.inf)
  best = own_sims.max(1, keepdims=True)
  best_index = jnp.where(own_sims == best, captions, sims.shape[1]).min(1, keepdims=True)
  i2t_ahead = (sims > best) | ((sims == best) & (captions < best_index)) | nan
  i2t = (i2t_ahead & ~own & text_valid).sum(1)
  i2t = jnp.where((own & text_valid & ~nan).any(1), i2t, common.NEVER)
  t2i_ahead = ((sims > text_own_sim) | ((sims == text_own_sim) & (rows[:, None] < text_owner))
               | nan)
  return i2t, (t2i_ahead & ~own & image_valid[:, None]).sum(0)


def recalls(images: np.ndarray, texts: np.ndarray, valid: np.ndarray,
            ks: Sequence[int]) -> dict[str, float]:
  """i2t / t2i recall@k from images [N, E], texts [N, n, E], valid [N, n]."""
  n_images, n_captions = valid.shape
  flat_texts = jnp.asarray(texts.reshape(n_images * n_captions, -1))
  flat_valid = jnp.asarray(valid.reshape(-1))
  owner = jnp.repeat(jnp.arange(n_images), n_captions)
  rows = common.rows_per_block(len(flat_texts))
  padded = np.concatenate([images, np.zeros((-n_images % rows, images.shape[1]),
                                            images.dtype)])
  image_valid = np.arange(len(padded)) < n_images
  starts = range(0, len(padded), rows)
  # Pass 1: each caption's own similarity, from the same matmul as pass 2's.
  own_sim = jnp.zeros(len(flat_texts), jnp.float32)
  for start in starts:
    own_sim = own_sim + own_similarity(similarities(padded[start:start + rows], flat_texts),
                                       owner, start)
  i2t, t2i = [], jnp.zeros(len(flat_texts), jnp.int32)
  for start in starts:
    block_i2t, block_t2i = ranks(similarities(padded[start:start + rows], flat_texts),
                                 image_valid[start:start + rows], flat_valid, owner,
                                 own_sim, start)
    i2t.append(np.asarray(block_i2t))
    t2i = t2i + block_t2i
  i2t = np.concatenate(i2t)[:n_images]
  has_caption = valid.any(1)
  t2i = np.where(np.isnan(np.asarray(own_sim)), common.NEVER, np.asarray(t2i))
  t2i = t2i[valid.reshape(-1)]
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
    self.source = data.build_source(data_config, f"{field}.data")
    self._embed = None

  def check(self, graphdef, state, train_image_shape=None) -> None:
    """Fails now if the model can't take this evaluator's images (see common.check_inputs)."""
    common.check_inputs(self.field, self.data_config, self.source, graphdef, state,
                        lambda objective, images: objective.embed_image(images),
                        train_image_shape)

  def run(self, graphdef, state) -> dict[str, float]:
    if self._embed is None:
      self._embed = embed_fn(graphdef)
    out = common.map_split(self._embed, state, self.data_config, self.source, self.field,
                           self.mesh, ("image", "text"))
    if not out["valid"].any():
      raise ConfigError(f"{self.field}: every caption of split "
                        f"{self.data_config.get('split')!r} is empty (all padding)")
    return recalls(out["image"], out["text"], out["valid"], self.ks)
