"""Training objectives by name: `config.objective.name` picks one."""
from big_vision_like.objectives.base import Objective
from big_vision_like.objectives.contrastive import Clip, Siglip
from big_vision_like.objectives.distillation import Distillation, IBot
from big_vision_like.objectives.masked import Mae, SimMim
from big_vision_like.objectives.probe import Probe
from big_vision_like.objectives.segmentation import Segmentation
from big_vision_like.objectives.supervised import Supervised
from big_vision_like.registry import Registry

OBJECTIVES = Registry("objective", "config.objective.name")
OBJECTIVES.register("supervised")(Supervised)
OBJECTIVES.register("probe")(Probe)
OBJECTIVES.register("segmentation")(Segmentation)
OBJECTIVES.register("clip")(Clip)
OBJECTIVES.register("siglip")(Siglip)
OBJECTIVES.register("mae")(Mae)
OBJECTIVES.register("simmim")(SimMim)
OBJECTIVES.register("dino")(Distillation)
OBJECTIVES.register("ibot")(IBot)

__all__ = ["OBJECTIVES", "Objective"]
