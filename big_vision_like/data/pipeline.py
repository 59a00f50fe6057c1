"""grain pipelines: an endless, resumable training iterator and one-pass eval batches.

Training: source -> shuffle (by seed, reshuffled each epoch) -> repeat ->
transforms -> this process's rows of each global batch -> batch. Batching happens on the MapDataset, so
batch i is the same whatever the number of worker processes, and the
iterator's state (saved in checkpoints) is just a position. With
`decode(on_error='skip')`, an example whose image cannot be decoded is
replaced by the next one in that order that decodes (training), or by padding
(evaluation), and each skipped file is logged once with a running count.
"""
from __future__ import annotations

import dataclasses
import inspect
import os
import threading
from typing import Any, Iterator

import grain
import jax
from absl import flags, logging
import numpy as np

from big_vision_like.data.sources import SOURCES
from big_vision_like.data.tokenizers import build_tokenizer
from big_vision_like.data.transforms import Preprocess, SkippedImage
from big_vision_like.registry import ConfigError, check_kwargs

_SKIP_LOCK = threading.Lock()  # grain's reader threads share a pipeline's skip log

# Fields of config.input (and of an evaluator's data config) that the pipeline
# itself uses; every other field is an argument of the chosen source.
PIPELINE_FIELDS = ("source", "data_dir", "split", "batch_size", "transforms",
                   "num_workers", "worker_buffer_size", "prefetch_threads",
                   "tokenizer")


def _needs_data_dir(factory) -> bool:
  parameter = inspect.signature(factory).parameters.get("data_dir")
  return parameter is not None and parameter.default is inspect.Parameter.empty


def build_source(data: Any, field: str):
  """The source named by `data.source` for `data.split`, with a clear error for a bad path."""
  data = dict(data)
  name = data.get("source")
  if name not in SOURCES:
    raise ConfigError(f"{field}.source={name!r} is not a known data source; "
                      f"valid names: {', '.join(SOURCES.names())}")
  factory = SOURCES.get(name)
  data_dir = data.get("data_dir")
  if not data_dir and _needs_data_dir(factory):
    layout = (factory.__doc__ or "").strip().splitlines()[0].rstrip(".")
    raise ConfigError(f"{field}.data_dir is not set: source {name!r} reads {layout}; "
                      f"pass --{field}.data_dir=PATH")
  if data_dir is not None:
    data_dir = os.path.expanduser(str(data_dir))
    if not os.path.exists(data_dir):
      raise ConfigError(f"{field}.data_dir={data_dir!r} does not exist "
                        f"(needed by source {name!r})")
    if not os.access(data_dir, os.R_OK):
      raise ConfigError(f"{field}.data_dir={data_dir!r} is not readable")
  extra = {k: v for k, v in data.items() if k not in PIPELINE_FIELDS}
  check_kwargs(factory, extra, field, what=f"source {name!r}",
               skip=("split", "data_dir"))
  try:
    return factory(split=data["split"], data_dir=data_dir, **extra)
  except ConfigError as e:
    raise ConfigError(f"{field} (source {name!r}, data_dir={data_dir!r}): {e}") from None


def preprocess(data: Any, source, field: str) -> Preprocess:
  """The transforms of `data`, with their context: the tokenizer and class names."""
  spec = data.get("tokenizer")
  tokenizer = None
  if spec and dict(spec).get("name"):
    tokenizer = build_tokenizer(spec, f"{field}.tokenizer")
  context = {"tokenizer": tokenizer,
             "classes": tuple(getattr(source, "classes", None) or ())}
  return Preprocess(data.get("transforms"), f"{field}.transforms", context)


def local_batch_size(global_batch: int, field: str) -> int:
  """This process's share of the global batch (the trainer checks the mesh split)."""
  n = jax.process_count()
  if global_batch % n:
    raise ConfigError(f"{field}.batch_size={global_batch} is not divisible by the "
                      f"{n} processes")
  return global_batch // n


@dataclasses.dataclass
class _ProcessRows:
  """This process's rows of each global batch of `ds` (read lazily, nothing else).

  The global order (shuffle, augmentation seeds) is the same whatever the number
  of processes, so 2 processes x 4 devices see the batches 1 x 8 sees.
  """
  ds: Any
  global_batch: int
  local_batch: int
  process_index: int

  def __len__(self):
    return len(self.ds) // self.global_batch * self.local_batch

  def __getitem__(self, i):
    batch, row = divmod(i, self.local_batch)
    return self.ds[batch * self.global_batch + self.process_index * self.local_batch + row]


@dataclasses.dataclass
class _SkipUndecodable:
  """`ds` with each example that `decode` skipped replaced by the next one of `ds`
  that decodes, or in evaluation by padding (the same example with `_mask` 0).

  The stand-in depends on the index alone, so batch i is the same with any
  number of workers and after a resume; a skipped example's stand-in appears
  twice in that epoch, augmented alike.
  """
  ds: Any
  tries: int
  as_padding: bool = False
  skipped: set = dataclasses.field(default_factory=set)  # messages, in this process

  def __len__(self):
    return len(self.ds)

  def __getitem__(self, i):
    for j in range(self.tries):
      try:
        element = self.ds[(i + j) % len(self.ds)]
      except SkippedImage as e:
        self._log(str(e))
        continue
      if j and self.as_padding:
        element = {**element, "_mask": np.float32(0)}
      return element
    raise ConfigError(f"the {self.tries} examples tried in a row from example {i} all "
                      "have undecodable images; is the data_dir right?")

  def _log(self, message: str):
    with _SKIP_LOCK:
      if message in self.skipped:
        return
      self.skipped.add(message)
      count = len(self.skipped)
    logging.warning("skipped an example (decode on_error='skip'): %s; %d undecodable "
                    "file(s) skipped so far", message, count)


def _preprocessed(ds, data: Any, source, field: str, tries: int, as_padding: bool = False):
  """`ds` through the transforms, with skipped examples substituted if decode skips."""
  transforms = preprocess(data, source, field)
  ds = ds.random_map(transforms)
  if transforms.skips_undecodable:
    ds = grain.MapDataset.source(_SkipUndecodable(ds, tries, as_padding))
  return ds


def train_dataset(data: Any, source, seed: int, field: str = "config.input"):
  """An infinite MapDataset of this process's training batches."""
  batch = local_batch_size(data.batch_size, field)
  if len(source) < data.batch_size:
    raise ConfigError(f"{field}.batch_size={data.batch_size} is larger than the "
                      f"{len(source)} training examples")
  ds = grain.MapDataset.source(source).seed(seed).shuffle().repeat()
  ds = _preprocessed(ds, data, source, field, tries=len(source))
  if jax.process_count() > 1:
    ds = grain.MapDataset.source(
        _ProcessRows(ds, data.batch_size, batch, jax.process_index()))
  return ds.batch(batch, drop_remainder=True)


def train_iterator(data: Any, source, seed: int, field: str = "config.input"):
  """A checkpointable iterator (grain DatasetIterator) over training batches."""
  ds = train_dataset(data, source, seed, field).to_iter_dataset(
      grain.ReadOptions(num_threads=data.get("prefetch_threads", 2) or 1,
                        prefetch_buffer_size=2))
  workers = int(data.get("num_workers") or 0)
  if workers > 0:
    if not flags.FLAGS.is_parsed():  # grain's workers read absl flags (notebooks, tests)
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=workers,
        per_worker_buffer_size=int(data.get("worker_buffer_size") or 2)))
  return iter(ds)


@dataclasses.dataclass
class _Padded:
  """Pads a source to a multiple of the batch; padding is marked with _mask=0."""
  source: Any
  length: int

  def __len__(self):
    return self.length

  def __getitem__(self, i):
    real = i < len(self.source)
    # Padding repeats the source from its start (masked out): consecutive padding
    # rows are different examples, so a skipped undecodable one is soon replaced.
    element = dict(self.source[i if real else i % len(self.source)])
    element["_mask"] = np.float32(real)
    return element


def eval_batches(data: Any, source, field: str) -> Iterator[dict]:
  """One pass over this process's shard, padded to full batches with `_mask`."""
  batch = local_batch_size(data.batch_size, field)
  shard = grain.MapDataset.source(source)[jax.process_index()::jax.process_count()]
  # All processes run the same number of batches (collectives must match).
  per_process = -(-len(source) // jax.process_count())
  padded = -(-per_process // batch) * batch
  ds = grain.MapDataset.source(_Padded(shard, padded)).seed(0)
  ds = _preprocessed(ds, data, source, field, tries=padded, as_padding=True)
  ds = ds.batch(batch, drop_remainder=True)
  return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=2)))
