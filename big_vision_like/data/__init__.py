"""Data sources, transforms and grain pipelines."""
from big_vision_like.data.pipeline import (build_source, eval_batches,
                                           train_dataset, train_iterator)
from big_vision_like.data.sources import SOURCES
from big_vision_like.data.transforms import TRANSFORMS

__all__ = ["SOURCES", "TRANSFORMS", "build_source", "eval_batches",
           "train_dataset", "train_iterator"]
