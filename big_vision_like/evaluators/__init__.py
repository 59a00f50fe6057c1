"""Evaluators by name: `config.evals.<name>.name` picks one; results log as eval/<name>/<metric>."""
from big_vision_like.evaluators.classification import Classification
from big_vision_like.evaluators.segmentation import Segmentation
from big_vision_like.registry import Registry

EVALUATORS = Registry("evaluator", "config.evals.<name>.name")
EVALUATORS.register("classification")(Classification)
EVALUATORS.register("segmentation")(Segmentation)

__all__ = ["EVALUATORS"]
