"""CLIP-style prompt templates, shared by the class_caption transform and zero-shot eval.

Training captions and zero-shot class embeddings must be built the same way,
so both go through `class_prompt`.
"""
from __future__ import annotations

DEFAULT_TEMPLATES = (
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a photo of the large {}.",
    "a photo of the small {}.",
    "a close-up photo of a {}.",
    "a bright photo of a {}.",
    "a low resolution photo of a {}.",
    "a good photo of a {}.",
)


def class_prompt(template: str, class_name: str) -> str:
  """`template` with its '{}' replaced by the class name ('_' read as a space)."""
  return template.format(str(class_name).replace("_", " "))
