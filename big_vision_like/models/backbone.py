"""The backbone contract: what objectives, heads and tools may rely on.

A backbone is any image model in `MODELS` (ViT, Swin, Perceiver IO) that keeps
this contract; no code outside a backbone's own file `isinstance`s one or calls
its private methods.

Call: `backbone(images [B, H, W, C], *, train=False, rng=None)` returns
`(output, intermediates)`: `output` is the class logits with a head
(`num_classes > 0`, float32) and `pre_logits` without one. `intermediates`:
  - 'pre_logits' [B, width]: the pooled representation (probes, kNN, CLIP);
  - 'grid' (h, w): the token grid of this input;
  - 'tokens' [B, h*w (+ prefix, see below), width]: final-norm output tokens
    (ViT: one per patch; Swin: the last stage's; Perceiver: its dense
    decoder's per-position logits, when it has one);
  - 'stages' [B, h_i, w_i, widths[i]] per stage, with the 'stages' capability.

Attributes every backbone has: `width` (of 'pre_logits' and 'tokens'),
`channels`, `image_size` (H, W it was built for), `patch_size`, `grid` (the
token grid at `image_size`) and `capabilities`, a frozenset of names below.

Capabilities (what masked modelling and self-distillation need):
  - 'mask_tokens': `backbone(images, token_mask=[B, N] bool, mask_token=[embed_width])`
    replaces the patch embeddings where the mask is true (SimMIM, iBOT).
    Promises `patch_grid` (the (h, w) of those N patch embeddings),
    `embed_width`, and `token_stride` (input pixels per output token side).
  - 'drop_tokens': `embed(images) -> (tokens [B, N, D], grid)` (patch tokens
    with position embeddings), `encode_tokens(tokens [B, K, D], train=, rng=)`
    on any subset of them -> [B, num_prefix_tokens + K, width] (MAE).
  - 'patch_tokens': 'tokens' are one per patch of `patch_grid`, row-major, so a
    token mask lines up with them (iBOT's patch loss).
  - 'any_image_size': inputs of other sizes than `image_size` (DINO's local crops).
  - 'stages': a hierarchy: intermediates carry 'stages', `widths` their widths
    (FPN-style heads).
"""
from __future__ import annotations

from big_vision_like.registry import ConfigError

CAPABILITIES = {
    "mask_tokens": "take mask tokens in place of patch embeddings",
    "drop_tokens": "encode a subset of its patch tokens",
    "patch_tokens": "output one token per input patch",
    "any_image_size": "take images of another size than it was built for",
    "stages": "give the feature map of every stage of a hierarchy",
}


def require(backbone, *needed: str, by: str, name: str | None = None,
            hint: str = "") -> None:
  """A one-line ConfigError when `backbone` lacks one of the `needed` capabilities:
  `by` says who needs it, `name` is config.model.name, `hint` what to do instead."""
  for capability in needed:
    if capability not in CAPABILITIES:
      raise ValueError(f"unknown backbone capability {capability!r}")
    if capability not in getattr(backbone, "capabilities", ()):
      from big_vision_like.models import MODELS  # pylint: disable=g-import-not-at-top
      able = [n for n in MODELS.names()
              if capability in getattr(MODELS.get(n), "capabilities", ())]
      raise ConfigError(
          f"{by} needs a backbone that can {CAPABILITIES[capability]}; "
          f"config.model.name={name or type(backbone).__name__.lower()!r} cannot"
          f"{' here' if capability in getattr(type(backbone), 'capabilities', ()) else ''}"
          f" (backbones that can: {', '.join(able) or 'none'}){hint}")
