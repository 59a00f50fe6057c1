"""Weighted k-NN classification on frozen features (the DINO protocol).

Features are L2-normalised; each test example takes its k most cosine-similar
train examples, which vote for their labels with weight exp(sim / temperature);
the class with the largest summed weight is the prediction (equal votes go to
the lower class index; a NaN among a query's neighbours' similarities is a
miss). Train features are extracted once per run; similarities are computed on
device in blocks of test rows.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from big_vision_like.evaluators import common
from big_vision_like.registry import ConfigError


@functools.partial(jax.jit, static_argnames=("k", "num_classes"))
def knn_votes(queries, keys, key_labels, *, k: int, temperature: float, num_classes: int):
  """[rows, classes] summed exp(sim / T) of the k nearest keys, per class; all NaN
  for a query with a NaN among them (it has no prediction)."""
  sims = common.l2_normalize(queries) @ keys.T  # keys come normalised
  top_sims, top_idx = jax.lax.top_k(sims, k)
  weights = jnp.exp(top_sims / temperature)
  votes = (jax.nn.one_hot(key_labels[top_idx], num_classes) * weights[..., None]).sum(1)
  return jnp.where(jnp.isnan(weights).any(-1, keepdims=True), jnp.nan, votes)


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
    vote = functools.partial(knn_votes, keys=keys, key_labels=key_labels,
                             k=min(self.k, len(keys)), temperature=self.temperature,
                             num_classes=classes)
    votes = common.map_blocks(vote, test["features"], common.rows_per_block(len(keys)))
    ranks = common.label_ranks(votes, test["label"])
    return common.topk_metrics(ranks, (1, 5), classes)
