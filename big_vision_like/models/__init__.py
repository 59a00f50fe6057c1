"""Backbones by name: `config.model.name` picks one, the rest of config.model are its arguments.

What every backbone provides (outputs, attributes, capabilities): models/backbone.py.
"""
from big_vision_like.models import perceiver, swin, vit
from big_vision_like.registry import Registry

MODELS = Registry("model", "config.model.name")
MODELS.register("vit")(vit.ViT)
MODELS.register("swin")(swin.Swin)
MODELS.register("perceiver")(perceiver.Perceiver)

__all__ = ["MODELS"]
