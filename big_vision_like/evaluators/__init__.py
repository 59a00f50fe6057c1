"""Evaluators by name: `config.evals.<name>.name` picks one; results log as eval/<name>/<metric>.

`config.evals.<name>.data` holds its data settings, merged with config.input's by
`data_config`; its other fields are the evaluator's arguments.
"""
from big_vision_like.evaluators.classification import Classification
from big_vision_like.evaluators.common import data_config
from big_vision_like.evaluators.knn import KNN
from big_vision_like.evaluators.linear_probe import LinearProbe
from big_vision_like.evaluators.retrieval import Retrieval
from big_vision_like.evaluators.segmentation import Segmentation
from big_vision_like.evaluators.zeroshot import ZeroShot
from big_vision_like.registry import Registry

EVALUATORS = Registry("evaluator", "config.evals.<name>.name")
EVALUATORS.register("classification")(Classification)
EVALUATORS.register("segmentation")(Segmentation)
EVALUATORS.register("knn")(KNN)
EVALUATORS.register("linear_probe")(LinearProbe)
EVALUATORS.register("zeroshot")(ZeroShot)
EVALUATORS.register("retrieval")(Retrieval)

__all__ = ["EVALUATORS", "data_config"]
