"""Weighted k-NN classification on frozen features (the DINO protocol).

Features are L2-normalised; each test example takes its k most cosine-similar
train examples, which vote for their labels with weight exp(sim / temperature);
the class with the largest summed weight is the prediction. Train features
are extracted once per run; similarities are computed on device in blocks of
test rows.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from big_vision_like.evaluators import common
from big_vision_like.registry import ConfigError


@functools.partial(jax.jit, static_argnames=("k", "num_classes", "topk"))
def knn_ranking(queries, keys, key_labels, *, k: int, temperature: float,
                num_classes: int, topk: int):
  """[rows, topk] classes ranked by summed exp(sim / T) over the k nearest keys."""
  sims = common.l2_normalize(queries) @ keys.T  # keys come normalised
  top_sims, top_idx = jax.lax.top_k(sims, k)
  weights = jnp.exp(top_sims / temperature)
  votes = (jax.nn.one_hot(key_labels[top_idx], num_classes) * weights[..., None]).sum(1)
  return jax.lax.top_k(votes, topk)[1]


class KNN(common.FrozenFeatures):
  """k-NN accuracy of `objective.features` on a split, fitting on `train_split`."""

  def __init__(self, data_config, *, mesh, field: str, k: int = 20,
               temperature: float = 0.07, train_split: str = "train",
               max_train_examples: int | None = None):
    if int(k) < 1:
      raise ConfigError(f"{field}.k={k!r} must be >= 1")
    if not float(temperature) > 0:
      raise ConfigError(f"{field}.temperature={temperature!r} must be > 0")
    super().__init__(data_config, mesh=mesh, field=field, train_split=train_split,
                     max_train_examples=max_train_examples)
    self.k, self.temperature = int(k), float(temperature)

  def run(self, graphdef, state) -> dict[str, float]:
    train, test, classes = self.train_and_test(graphdef, state)
    keys = common.l2_normalize(jnp.asarray(train["features"]))
    key_labels = jnp.asarray(train["label"])
    topk = min(5, classes)
    rank = functools.partial(knn_ranking, keys=keys, key_labels=key_labels,
                             k=min(self.k, len(keys)), temperature=self.temperature,
                             num_classes=classes, topk=topk)
    predicted = common.map_blocks(rank, test["features"], common.rows_per_block(len(keys)))
    return common.topk_metrics(predicted, test["label"], (1, 5), classes)
