"""Helpers shared by the representation evaluators (kNN, linear probe, zero-shot, retrieval).

These evaluators embed a whole split once, then score the embeddings on the
host or in a second jitted pass, so the per-batch work is "run a jitted
function, drop the padding, keep numpy".
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from big_vision_like import data
from big_vision_like.parallel import sharding
from big_vision_like.registry import ConfigError, first_line

# Elements of one [rows, keys] similarity block; bounds device memory (512 MiB in f32).
SIMILARITY_BUDGET = 2 ** 27


class Subset:
  """A fixed random subset of `n` examples (seed 0), in source order.

  Sources are often sorted by class (image folders), so the first n examples
  could miss most classes; a seeded sample keeps every class in proportion.
  """

  def __init__(self, source: Any, n: int):
    self.source = source
    if n >= len(source):
      self.indices = np.arange(len(source))
    else:
      self.indices = np.sort(np.random.default_rng(0).permutation(len(source))[:n])
    self.num_classes = getattr(source, "num_classes", 0)
    self.classes = getattr(source, "classes", ())

  def __len__(self):
    return len(self.indices)

  def __getitem__(self, i):
    return self.source[int(self.indices[i])]


# What an evaluator reads unless its `data` says otherwise.
EVAL_DATA_DEFAULTS = {"split": "test", "transforms": [{"name": "normalize"}], "num_workers": 0}


def data_config(input_config, data, field: str) -> ml_collections.ConfigDict:
  """An evaluator's data settings (`config.evals.<name>.data`), merged in one place:

  1. config.input, source-specific fields included, when the evaluator reads the
     same source (no `data.source`, or the same one); nothing of it otherwise;
  2. the evaluation defaults: the test split, `normalize` only, no worker
     processes, config.input's batch size;
  3. `data` itself.
  The tokenizer is always config.input's: the text tower's vocabulary.
  """
  data = {k: v for k, v in dict(data or {}).items() if v is not None}  # None: unset
  if "tokenizer" in data:
    raise ConfigError(f"{field}.tokenizer: evaluators tokenize with config.input.tokenizer "
                      f"(the text tower's vocabulary); remove it")
  same_source = data.get("source", input_config.source) == input_config.source
  merged = dict(input_config) if same_source else {}
  merged.update(EVAL_DATA_DEFAULTS, batch_size=input_config.batch_size)
  merged.update(data, tokenizer=dict(input_config.tokenizer))
  return ml_collections.ConfigDict(merged)


def split_config(data_config, split: str) -> ml_collections.ConfigDict:
  """The evaluator's data config for another split (same source, dir and transforms)."""
  config = dict(data_config)
  config["split"] = split
  return ml_collections.ConfigDict(config)


def build_train_source(data_config, field: str, train_split: str,
                       max_train_examples: int | None):
  """The labelled split that kNN / linear probes fit on, optionally truncated."""
  source = data.build_source(split_config(data_config, train_split), f"{field}.data")
  if max_train_examples is not None:
    if int(max_train_examples) < 1:
      raise ConfigError(f"{field}.max_train_examples={max_train_examples!r} must be >= 1")
    source = Subset(source, int(max_train_examples))
  return source


def num_classes(source, *label_arrays: np.ndarray) -> int:
  """The source's `num_classes`, or max label + 1 when it has none."""
  n = getattr(source, "num_classes", 0) or 0
  top = max((int(a.max()) + 1 for a in label_arrays if a.size), default=0)
  return max(int(n), top)


def _to_numpy(x) -> np.ndarray:
  """A (possibly multi-process) global array as the full numpy array on every host."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def map_split(fn: Callable, state, data_config, source, field: str, mesh,
              keys: Sequence[str]) -> dict[str, np.ndarray]:
  """Runs jitted `fn(state, batch) -> {name: [B, ...]}` over one pass of `source`.

  `batch` holds `keys` (array fields only, placed with `put_batch`) and
  `_mask`; the outputs of padding examples are dropped and the rest
  concatenated in batch order. Each output is converted one batch late so the
  host overlaps with the device.
  """
  chunks: dict[str, list[np.ndarray]] = {}
  pending = None

  def collect(out):
    out = {k: _to_numpy(v) for k, v in out.items()}
    keep = out.pop("_mask") > 0
    for k, v in out.items():
      chunks.setdefault(k, []).append(v[keep])

  for batch in data.eval_batches(data_config, source, f"{field}.data"):
    arrays = sharding.put_batch({k: np.asarray(batch[k]) for k in (*keys, "_mask")}, mesh)
    out = dict(fn(state, arrays), _mask=arrays["_mask"])
    if pending is not None:
      collect(pending)
    pending = out
  if pending is None:
    raise ConfigError(f"{field}: split {data_config.get('split')!r} has no examples")
  collect(pending)
  return {k: np.concatenate(v) for k, v in chunks.items()}


def l2_normalize(x: jax.Array, axis: int = -1) -> jax.Array:
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


def rows_per_block(num_keys: int, limit: int = 4096) -> int:
  """Query rows per similarity block so that rows x keys stays within budget."""
  return int(np.clip(SIMILARITY_BUDGET // max(num_keys, 1), 1, limit))


def map_blocks(fn: Callable, queries: np.ndarray, rows: int) -> np.ndarray:
  """Applies jitted `fn` to fixed-size row blocks of `queries` (one compile) and concatenates."""
  n = len(queries)
  padded = np.concatenate([queries, np.zeros((-n % rows, *queries.shape[1:]), queries.dtype)])
  outs = [fn(padded[i:i + rows]) for i in range(0, len(padded), rows)]
  return np.concatenate([np.asarray(o) for o in outs])[:n]


# A rank no k reaches: where the label's own score is NaN.
NEVER = np.iinfo(np.int32).max


def label_ranks(scores, labels) -> jax.Array:
  """Each label's 0-based place among the classes in the order argmax / top_k pick them.

  That order is by decreasing score, ties to the lower index, NaN ahead of every
  number; a NaN label score, or a label outside the scored classes, is never a
  hit (rank NEVER). A strict `>` count would rank a tie or a NaN first, so an
  all-zero or NaN head would score 100%.
  """
  scores, labels = jnp.asarray(scores), jnp.asarray(labels).astype(jnp.int32)
  num = scores.shape[-1]
  known = (labels >= 0) & (labels < num)
  own = jnp.take_along_axis(scores, jnp.clip(labels, 0, num - 1)[:, None], -1)
  ahead = ((scores > own) | ((scores == own) & (jnp.arange(num) < labels[:, None]))
           | jnp.isnan(scores))
  rank = ahead.sum(-1, dtype=jnp.int32)
  return jnp.where(known & ~jnp.isnan(own[:, 0]), rank, NEVER)


def topk_metrics(ranks: np.ndarray, ks: Sequence[int], num_classes: int) -> dict[str, float]:
  """accuracy / topK_accuracy from each example's `label_ranks`.

  K larger than the number of classes is skipped (it would always be 1).
  """
  ranks = np.asarray(ranks)
  return {"accuracy" if k == 1 else f"top{k}_accuracy": float((ranks < k).mean())
          for k in ks if k <= num_classes}


def _hwc(shape) -> str:
  return "x".join(str(d) for d in shape)


def check_inputs(field: str, data_config, source, graphdef, state, apply: Callable,
                 train_image_shape: Callable[[], tuple | None] | None = None) -> None:
  """One batch of an evaluator's data, traced through `apply(objective, images)`
  (shapes only, no compute), so that images the model can't take fail at start,
  not after training. `train_image_shape()`, for the message, is called on failure."""
  batch = next(data.eval_batches(data_config, source, f"{field}.data"), None)
  if batch is None:
    raise ConfigError(f"{field}: split {data_config.get('split')!r} has no examples")
  images = np.asarray(batch["image"])
  spec = jax.ShapeDtypeStruct(images.shape, images.dtype)
  try:
    jax.eval_shape(lambda st, x: apply(nnx.merge(graphdef, *st), x), state, spec)
  except Exception as e:  # pylint: disable=broad-except  (shape errors of any model)
    shape = train_image_shape() if train_image_shape else None
    trained = f"; training images are {_hwc(shape)}" if shape else ""
    raise ConfigError(f"{field}: the model cannot take its images (split "
                      f"{data_config.get('split')!r}, {_hwc(images.shape[1:])} after "
                      f"{field}.data.transforms{trained}): {first_line(e, 200)}") from None


class FrozenFeatures:
  """Base of the evaluators that fit on frozen `objective.features` of a train
  split and score the evaluator's split (kNN, linear probe)."""

  def __init__(self, data_config, *, mesh, field: str, train_split: str,
               max_train_examples: int | None):
    self.data_config, self.mesh, self.field = data_config, mesh, field
    self.source = data.build_source(data_config, f"{field}.data")
    self.train_source = build_train_source(data_config, field, train_split,
                                           max_train_examples)
    self.train_config = split_config(data_config, train_split)
    self._features = None

  def check(self, graphdef, state, train_image_shape=None) -> None:
    for config, source in ((self.train_config, self.train_source),
                           (self.data_config, self.source)):
      check_inputs(self.field, config, source, graphdef, state,
                   lambda objective, images: objective.features(images), train_image_shape)

  def train_and_test(self, graphdef, state) -> tuple[dict, dict, int]:
    """Features (float32) and labels of both splits, and the number of classes."""
    if self._features is None:
      def features(state, batch):
        objective = nnx.merge(graphdef, *state)
        return {"features": objective.features(batch["image"]).astype(jnp.float32),
                "label": batch["label"]}
      self._features = jax.jit(features)
    train, test = (map_split(self._features, state, config, source, self.field, self.mesh,
                             ("image", "label"))
                   for config, source in ((self.train_config, self.train_source),
                                          (self.data_config, self.source)))
    return train, test, num_classes(self.source, train["label"], test["label"])
