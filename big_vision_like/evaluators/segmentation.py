"""Mean IoU and pixel accuracy of a segmenting objective over a split.

A confusion matrix is accumulated on device over valid pixels (labels other
than `ignore_index`; padding examples masked out); IoU_c = TP / (TP + FP + FN),
averaged over the classes that occur in labels or predictions.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from big_vision_like import data
from big_vision_like.parallel import sharding


def confusion_matrix(labels, predictions, weights, num_classes: int) -> jax.Array:
  """[true, predicted] counts, weighting each pixel (0 drops it)."""
  index = labels * num_classes + predictions
  counts = jnp.zeros(num_classes * num_classes, jnp.float32).at[index.reshape(-1)].add(
      weights.reshape(-1).astype(jnp.float32))
  return counts.reshape(num_classes, num_classes)


def scores(confusion: np.ndarray) -> dict[str, float]:
  tp = np.diag(confusion)
  union = confusion.sum(0) + confusion.sum(1) - tp
  present = union > 0
  iou = np.where(present, tp / np.maximum(union, 1), 0.0)
  out = {"mean_iou": float(iou[present].mean()) if present.any() else 0.0,
         "pixel_accuracy": float(tp.sum() / max(confusion.sum(), 1))}
  out.update({f"iou_{c}": float(iou[c]) for c in range(len(iou))})
  return out


class Segmentation:
  """Runs `objective.segment` over a whole split (eval transforms must keep masks)."""

  def __init__(self, data_config, *, mesh, field: str, ignore_index: int = 255):
    self.data_config, self.mesh, self.field = data_config, mesh, field
    self.source = data.build_source(data_config, field)
    self.ignore_index = ignore_index
    self._confusion = None

  def _compile(self, graphdef, num_classes):
    def confusion(state, batch):
      objective = nnx.merge(graphdef, *state)
      predictions = objective.segment(batch["image"]).argmax(-1)
      labels = batch["mask"].astype(jnp.int32)
      valid = (labels != self.ignore_index) & (batch["_mask"][:, None, None] > 0)
      return confusion_matrix(jnp.where(valid, labels, 0), predictions, valid, num_classes)
    return jax.jit(confusion)

  def run(self, graphdef, state) -> dict[str, float]:
    if self._confusion is None:
      num_classes = nnx.merge(graphdef, *state).num_classes
      self._confusion = self._compile(graphdef, num_classes)
    total = None
    for batch in data.eval_batches(self.data_config, self.source, self.field):
      out = self._confusion(state, sharding.put_batch(batch, self.mesh))
      total = out if total is None else total + out
    return scores(np.asarray(jax.device_get(total), np.float64))
