"""Training objectives by name: `config.objective.name` picks one."""
from big_vision_like.objectives.base import Objective
from big_vision_like.objectives.segmentation import Segmentation
from big_vision_like.objectives.supervised import Supervised
from big_vision_like.registry import Registry

OBJECTIVES = Registry("objective", "config.objective.name")
OBJECTIVES.register("supervised")(Supervised)
OBJECTIVES.register("segmentation")(Segmentation)

__all__ = ["OBJECTIVES", "Objective"]
