"""Image-text contrastive pre-training: CLIP (softmax) and SigLIP (sigmoid).

Two towers: the image backbone named by config.model and a text transformer
(config.objective.text), each projected to a shared space and L2-normalised.
The batch carries 'image' and 'text' (int32 tokens from the 'tokenize'
transform). The losses are pure functions of the *global* batch's embeddings.
When the batch is split over devices the objectives use the shard_map versions
in `contrastive_distributed.py` (all-gather for CLIP, a ring of text chunks for
SigLIP), which give the same loss and gradients without a B x B matrix.
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from big_vision_like.models import MODELS, layers
from big_vision_like.models.text import TextTransformer
from big_vision_like.objectives import contrastive_distributed as distributed
from big_vision_like.objectives.base import Objective, no_accumulation, normalize
from big_vision_like.parallel import sharding
from big_vision_like.registry import ConfigError, check_kwargs


def clip_loss(image_emb: jax.Array, text_emb: jax.Array, log_scale: jax.Array,
              positives: jax.Array | None = None) -> jax.Array:
  """Symmetric InfoNCE: image i's positive is text i, every other text a negative.

  `positives` [B, B] (boolean, diagonal set) spreads the target over several
  positives, e.g. every caption of the same class.
  """
  logits = jnp.exp(log_scale) * image_emb @ text_emb.T
  if positives is None:
    labels = jnp.arange(logits.shape[0])
    return 0.5 * (optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
                  + optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean())
  targets = positives / positives.sum(-1, keepdims=True)
  targets_t = positives.T / positives.T.sum(-1, keepdims=True)
  return 0.5 * (optax.softmax_cross_entropy(logits, targets).mean()
                + optax.softmax_cross_entropy(logits.T, targets_t).mean())


def siglip_loss(image_emb: jax.Array, text_emb: jax.Array, log_t: jax.Array,
                bias: jax.Array, positives: jax.Array | None = None) -> jax.Array:
  """Pairwise sigmoid loss: every (image, text) pair is its own binary problem.

  Summed over texts, averaged over images (Zhai et al. 2023). `positives`
  [B, B] marks the pairs labelled +1 (the diagonal by default).
  """
  logits = jnp.exp(log_t) * image_emb @ text_emb.T + bias
  if positives is None:
    positives = jnp.eye(logits.shape[0], dtype=bool)
  labels = 2.0 * positives - 1.0
  return -jax.nn.log_sigmoid(labels * logits).sum(-1).mean()


def _needs_text(config: Any, objective: str) -> None:
  steps = [t.get("name") for t in (config.input.transforms or ())]
  if "tokenize" not in steps:
    raise ConfigError(
        f"config.objective.name={objective!r} trains on image-text pairs but "
        f"config.input.transforms has no 'tokenize' step to make batch['text'] "
        f"(use source 'coco_captions', or 'class_caption' + 'tokenize' on labelled data)")


class TwoTower(Objective):
  """The image and text towers and their projections; subclasses define the loss."""
  name = "two_tower"
  # The tokenizer sizes the text tower; the transforms must tokenize captions.
  reads = ("input.tokenizer", "input.transforms", "input.batch_size",
           "optim.grad_accum_steps")

  def __init__(self, config: Any, *, text: dict | None = None, embed_dim: int = 0,
               image_projection: bool = True, text_projection_bias: bool = False,
               same_label_positives: bool = False, distributed_loss: bool = True,
               rngs: nnx.Rngs):
    """`embed_dim=0` uses the image tower's width; `image_projection=False`
    uses the pooled image features as the embedding (SigLIP's MAP head output).
    `same_label_positives`: with class-name captions, pairs of the same label
    are positives rather than negatives (needs batch['label']).
    `distributed_loss`: with the batch split over devices, compute the loss
    with shard_map (False: the dense loss, XLA lays out the B x B logits)."""
    from big_vision_like.data.tokenizers import build_tokenizer  # pylint: disable=g-import-not-at-top
    _needs_text(config, self.name)
    no_accumulation(config, self.name, "every other example is a negative")
    self.same_label_positives = same_label_positives
    self.distributed_loss = distributed_loss
    model = dict(config.model)
    if model.get("num_classes"):
      raise ConfigError(f"config.model.num_classes must be 0 for {self.name!r}: the image "
                        f"tower outputs features, not class logits")
    self.backbone = MODELS.build(model.pop("name"), model, field="config.model", rngs=rngs)
    tokenizer = build_tokenizer(config.input.tokenizer)
    text = dict(text or {})
    check_kwargs(TextTransformer, text, "config.objective.text", what="the text tower",
                 skip=("rngs", "vocab_size", "max_len"))
    self.text_tower = TextTransformer(vocab_size=tokenizer.vocab_size,
                                      max_len=tokenizer.max_len, rngs=rngs, **text)
    image_width = self.backbone.width
    embed_dim = embed_dim or image_width
    if not image_projection and embed_dim != image_width:
      raise ConfigError(f"config.objective.embed_dim={embed_dim} differs from the image "
                        f"tower's width {image_width} but image_projection is off")
    self.image_proj = (layers.dense(image_width, embed_dim, ("embed", None), use_bias=False,
                                    rngs=rngs) if image_projection else None)
    self.text_proj = layers.dense(self.text_tower.width, embed_dim, ("embed", None),
                                  use_bias=text_projection_bias, rngs=rngs)

  def features(self, images, *, train=False, rng=None):
    return self.backbone(images, train=train, rng=rng)[1]["pre_logits"]

  def embed_image(self, images, *, train=False, rng=None):
    x = self.features(images, train=train, rng=rng)
    return normalize(self.image_proj(x) if self.image_proj is not None else x)

  def embed_text(self, tokens):
    return normalize(self.text_proj(self.text_tower(tokens)[0]))

  def pair_loss(self, image_emb, text_emb, labels=None):
    """(loss, metrics) with 'i2t_accuracy' and 't2i_accuracy' among the metrics."""
    raise NotImplementedError

  def loss_axes(self) -> tuple[str, ...]:
    """The mesh axes the batch is split over when tracing under a mesh, if the
    shard_map loss is on; () means the dense loss."""
    if not self.distributed_loss:
      return ()
    mesh = jax.sharding.get_abstract_mesh()
    return () if mesh.empty else sharding.batch_axes(mesh)

  def loss(self, batch, *, rng, train):
    if "text" not in batch:
      raise ConfigError(f"objective {self.name!r} needs batch['text']; the batch has "
                        f"{sorted(batch)}")
    image_emb = self.embed_image(batch["image"], train=train, rng=rng)
    text_emb = self.embed_text(batch["text"])
    labels = None
    if self.same_label_positives:
      if "label" not in batch:
        raise ConfigError(f"config.objective.same_label_positives needs batch['label']; "
                          f"the batch has {sorted(batch)}")
      labels = batch["label"]
    loss, metrics = self.pair_loss(image_emb, text_emb, labels)
    metrics.update(loss=loss)
    return loss, metrics


def _positives(labels):
  return None if labels is None else labels[:, None] == labels[None, :]


def _retrieval_accuracy(image_emb, text_emb, labels):
  """In-batch retrieval: the most similar text (image) is a positive. Without
  labels, duplicate captions (class names) make it an underestimate."""
  sims = image_emb @ text_emb.T
  ids = jnp.arange(sims.shape[0]) if labels is None else labels
  return {"i2t_accuracy": (ids[sims.argmax(1)] == ids).mean(),
          "t2i_accuracy": (ids[sims.argmax(0)] == ids).mean()}


class Clip(TwoTower):
  name = "clip"

  def __init__(self, config: Any, *, temperature: float = 0.07, max_scale: float = 100.0,
               rngs: nnx.Rngs, **kwargs):
    """Logit scale learned in log space from 1/temperature, clipped at max_scale."""
    super().__init__(config, rngs=rngs, **kwargs)
    self.log_scale = nnx.Param(jnp.asarray(math.log(1.0 / temperature), jnp.float32))
    self.max_log_scale = math.log(max_scale)

  def pair_loss(self, image_emb, text_emb, labels=None):
    log_scale = jnp.minimum(self.log_scale[...], self.max_log_scale)
    metrics = {"scale": jnp.exp(log_scale)}
    axes = self.loss_axes()
    if axes:
      loss, i2t, t2i = distributed.clip_loss_gathered(image_emb, text_emb, log_scale, labels,
                                                      axes=axes)
      return loss, dict(metrics, i2t_accuracy=i2t, t2i_accuracy=t2i)
    loss = clip_loss(image_emb, text_emb, log_scale, _positives(labels))
    return loss, dict(metrics, **_retrieval_accuracy(image_emb, text_emb, labels))

  def after_update(self, step):
    # Clamp the parameter itself (as CLIP does) so it can come back below the cap.
    self.log_scale[...] = jnp.minimum(self.log_scale[...], self.max_log_scale)


class Siglip(TwoTower):
  name = "siglip"

  def __init__(self, config: Any, *, init_temperature: float = 10.0, init_bias: float = -10.0,
               rngs: nnx.Rngs, **kwargs):
    """Learned temperature t (in log space, init log 10) and bias (init -10)."""
    super().__init__(config, rngs=rngs, **kwargs)
    self.log_t = nnx.Param(jnp.asarray(math.log(init_temperature), jnp.float32))
    self.bias = nnx.Param(jnp.asarray(init_bias, jnp.float32))

  def pair_loss(self, image_emb, text_emb, labels=None):
    log_t, bias = self.log_t[...], self.bias[...]
    metrics = {"temperature": jnp.exp(log_t), "bias": bias}
    axes = self.loss_axes()
    if axes:
      loss, i2t, t2i = distributed.siglip_loss_ring(image_emb, text_emb, log_t, bias, labels,
                                                    axes=axes)
      return loss, dict(metrics, i2t_accuracy=i2t, t2i_accuracy=t2i)
    loss = siglip_loss(image_emb, text_emb, log_t, bias, _positives(labels))
    return loss, dict(metrics, **_retrieval_accuracy(image_emb, text_emb, labels))
