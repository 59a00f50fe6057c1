"""Top-k accuracy and cross-entropy of a classifying objective on a held-out split."""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from big_vision_like import data
from big_vision_like.evaluators import common
from big_vision_like.parallel import sharding


class Classification:
  """Runs `objective.classify` over a whole split; padding examples are masked out.

  Top-k counts a hit where the label is among the k classes top_k would pick
  (ties go to the lower index, as argmax; a NaN label logit is always a miss).
  """

  def __init__(self, data_config, *, mesh, field: str, topk: Sequence[int] = (1, 5)):
    self.data_config, self.mesh, self.field = data_config, mesh, field
    self.source = data.build_source(data_config, f"{field}.data")
    self.topk = tuple(k for k in topk if k <= getattr(self.source, "num_classes", k))
    self._sums = None

  def _compile(self, graphdef):
    topk = self.topk

    def sums(state, batch):
      objective = nnx.merge(graphdef, *state)
      logits = objective.classify(batch["image"])
      labels, mask = batch["label"], batch["_mask"]
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
      ranks = common.label_ranks(logits, labels)
      out = {"loss": (loss * mask).sum(), "count": mask.sum()}
      for k in topk:
        out[f"top{k}"] = ((ranks < k) * mask).sum()
      return out

    return jax.jit(sums)

  def check(self, graphdef, state, train_image_shape=None) -> None:
    """Fails now if the model can't take this evaluator's images (see common.check_inputs)."""
    common.check_inputs(self.field, self.data_config, self.source, graphdef, state,
                        lambda objective, images: objective.classify(images),
                        train_image_shape)

  def run(self, graphdef, state) -> dict[str, float]:
    if self._sums is None:
      self._sums = self._compile(graphdef)
    totals = None
    for batch in data.eval_batches(self.data_config, self.source, f"{self.field}.data"):
      out = self._sums(state, sharding.put_batch(batch, self.mesh))
      totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
    totals = jax.tree.map(lambda x: float(np.asarray(x)), totals)
    count = max(totals.pop("count"), 1.0)
    metrics = {"loss": totals.pop("loss") / count}
    for k in self.topk:
      metrics["accuracy" if k == 1 else f"top{k}_accuracy"] = totals[f"top{k}"] / count
    return metrics
