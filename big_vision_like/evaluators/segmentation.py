"""Mean IoU and pixel accuracy of a segmenting objective over a split.

A confusion matrix is accumulated on device over valid pixels (labels other
than `ignore_index`; padding examples masked out); IoU_c = TP / (TP + FP + FN),
averaged over the classes that occur in labels or predictions. A pixel with a
NaN logit has no prediction: it counts as a miss (FN) of its true class, where
argmax would credit it to the first NaN's class (class 0 for an all-NaN head).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from big_vision_like import data
from big_vision_like.evaluators import common
from big_vision_like.parallel import sharding


def confusion_matrix(labels, predictions, weights, num_classes: int) -> jax.Array:
  """[true, predicted] counts, weighting each pixel (0 drops it)."""
  index = labels * num_classes + predictions
  counts = jnp.zeros(num_classes * num_classes, jnp.float32).at[index.reshape(-1)].add(
      weights.reshape(-1).astype(jnp.float32))
  return counts.reshape(num_classes, num_classes)


def scores(confusion: np.ndarray, unpredicted: np.ndarray | None = None) -> dict[str, float]:
  """mean IoU, pixel accuracy and per-class IoU; `unpredicted[c]` counts pixels of
  class c without a prediction (misses outside the matrix)."""
  missed = np.zeros(len(confusion)) if unpredicted is None else np.asarray(unpredicted)
  tp = np.diag(confusion)
  union = confusion.sum(0) + confusion.sum(1) + missed - tp
  present = union > 0
  iou = np.where(present, tp / np.maximum(union, 1), 0.0)
  out = {"mean_iou": float(iou[present].mean()) if present.any() else 0.0,
         "pixel_accuracy": float(tp.sum() / max(confusion.sum() + missed.sum(), 1))}
  out.update({f"iou_{c}": float(iou[c]) for c in range(len(iou))})
  return out


class Segmentation:
  """Runs `objective.segment` over a whole split (eval transforms must keep masks)."""

  def __init__(self, data_config, *, mesh, field: str, ignore_index: int = 255):
    self.data_config, self.mesh, self.field = data_config, mesh, field
    self.source = data.build_source(data_config, f"{field}.data")
    self.ignore_index = ignore_index
    self._confusion = None

  def _compile(self, graphdef, num_classes):
    def confusion(state, batch):
      objective = nnx.merge(graphdef, *state)
      logits = objective.segment(batch["image"])
      predicted = ~jnp.isnan(logits).any(-1)
      labels = batch["mask"].astype(jnp.int32)
      valid = (labels != self.ignore_index) & (batch["_mask"][:, None, None] > 0)
      labels = jnp.where(valid, labels, 0)
      missed = jnp.zeros(num_classes, jnp.float32).at[labels.reshape(-1)].add(
          (valid & ~predicted).reshape(-1).astype(jnp.float32))
      return (confusion_matrix(labels, logits.argmax(-1), valid & predicted, num_classes),
              missed)
    return jax.jit(confusion)

  def check(self, graphdef, state, train_image_shape=None) -> None:
    """Fails now if the model can't take this evaluator's images (see common.check_inputs)."""
    common.check_inputs(self.field, self.data_config, self.source, graphdef, state,
                        lambda objective, images: objective.segment(images),
                        train_image_shape)

  def run(self, graphdef, state) -> dict[str, float]:
    if self._confusion is None:
      num_classes = nnx.merge(graphdef, *state).num_classes
      self._confusion = self._compile(graphdef, num_classes)
    total = None
    for batch in data.eval_batches(self.data_config, self.source, f"{self.field}.data"):
      out = self._confusion(state, sharding.put_batch(batch, self.mesh))
      total = out if total is None else jax.tree.map(jnp.add, total, out)
    confusion, missed = (np.asarray(x, np.float64) for x in jax.device_get(total))
    return scores(confusion, missed)
