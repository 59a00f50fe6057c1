"""Zero-shot classification with an image-text (CLIP / SigLIP) objective.

Each class is embedded as the mean of `objective.embed_text` over prompt
templates ("a photo of a {}."), re-normalised; an image is assigned the class
whose embedding has the largest dot product with `objective.embed_image`
(equal scores go to the lower class index; a NaN score is always a miss).
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from big_vision_like import data
from big_vision_like.data.prompts import DEFAULT_TEMPLATES, class_prompt
from big_vision_like.data.tokenizers import build_tokenizer
from big_vision_like.evaluators import common
from big_vision_like.registry import ConfigError

TEXT_ROWS = 256  # texts embedded per jitted call


def text_fn(graphdef):
  def embed(state, tokens):
    return nnx.merge(graphdef, *state).embed_text(tokens).astype(jnp.float32)
  return jax.jit(embed)


def classify_fn(graphdef):
  """Jitted (state, batch, class embeddings) -> each image's `label_ranks`."""
  def classify(state, batch, class_embeddings):
    objective = nnx.merge(graphdef, *state)
    scores = objective.embed_image(batch["image"]).astype(jnp.float32) @ class_embeddings.T
    return {"rank": common.label_ranks(scores, batch["label"])}
  return jax.jit(classify)


def class_embeddings(embed, tokens: np.ndarray, num_classes: int) -> np.ndarray:
  """[classes, E] from `embed` of [classes * templates, L] tokens (class-major)."""
  texts = common.map_blocks(embed, tokens, TEXT_ROWS)
  mean = texts.reshape(num_classes, -1, texts.shape[-1]).mean(1)
  return mean / np.maximum(np.linalg.norm(mean, axis=-1, keepdims=True), 1e-12)


class ZeroShot:
  """Zero-shot accuracy over a labelled split whose class names are known."""

  def __init__(self, data_config, *, mesh, field: str, classes: Sequence[str] = (),
               templates: Sequence[str] = ()):
    self.data_config, self.mesh, self.field = data_config, mesh, field
    self.source = data.build_source(data_config, f"{field}.data")
    self.classes = [str(c) for c in (classes or getattr(self.source, "classes", None) or ())]
    if not self.classes:
      raise ConfigError(f"{field}.classes is not set and source "
                        f"{data_config.get('source')!r} has no class names")
    self.templates = [str(t) for t in (templates or DEFAULT_TEMPLATES)]
    bad = [t for t in self.templates if "{}" not in t]
    if bad:
      raise ConfigError(f"{field}.templates has {bad[0]!r} without a '{{}}' for the class name")
    spec = data_config.get("tokenizer")
    if not spec:
      raise ConfigError(f"{field}.tokenizer is not set; zero-shot needs the text "
                        "tokenizer, e.g. {'name': 'bytes', 'max_len': 32}")
    tokenizer = build_tokenizer(spec, f"{field}.tokenizer")
    self.tokens = tokenizer.encode_batch(
        [class_prompt(t, c) for c in self.classes for t in self.templates])
    self._embed = self._classify = None

  def check(self, graphdef, state, train_image_shape=None) -> None:
    """Fails now if the model can't take this evaluator's images (see common.check_inputs)."""
    common.check_inputs(self.field, self.data_config, self.source, graphdef, state,
                        lambda objective, images: objective.embed_image(images),
                        train_image_shape)

  def run(self, graphdef, state) -> dict[str, float]:
    num_classes = len(self.classes)
    ks = (1, 5) if num_classes >= 5 else (1,)
    if self._embed is None:
      self._embed = text_fn(graphdef)
      self._classify = classify_fn(graphdef)
    embeddings = jnp.asarray(class_embeddings(
        lambda tokens: self._embed(state, tokens), self.tokens, num_classes))
    out = common.map_split(lambda s, batch: self._classify(s, batch, embeddings), state,
                           self.data_config, self.source, self.field, self.mesh,
                           ("image", "label"))
    return common.topk_metrics(out["rank"], ks, num_classes)
