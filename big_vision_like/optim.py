"""optax optimiser from config.optim: AdamW, warm-up + decay, masks, clipping, layer decay.

Durations may be given in steps or epochs (`warmup_steps` or `warmup_epochs`);
the trainer resolves epochs with the training set size.
"""
from __future__ import annotations

import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from big_vision_like.registry import ConfigError


def schedule(optim: Any, total_steps: int, steps_per_epoch: int) -> optax.Schedule:
  """Linear warm-up from 0 to `lr`, then cosine / linear decay to `min_lr`, or constant."""
  warmup = optim.get("warmup_steps") or 0
  if optim.get("warmup_epochs"):
    warmup = int(round(optim.warmup_epochs * steps_per_epoch))
  warmup = min(int(warmup), total_steps)
  lr, floor, kind = optim.lr, optim.get("min_lr", 0.0) or 0.0, optim.get("schedule", "cosine")
  decay_steps = max(total_steps - warmup, 1)
  if kind == "cosine":
    decay = optax.cosine_decay_schedule(lr, decay_steps, alpha=floor / lr if lr else 0.0)
  elif kind == "linear":
    decay = optax.linear_schedule(lr, floor, decay_steps)
  elif kind == "constant":
    decay = optax.constant_schedule(lr)
  else:
    raise ConfigError(f"config.optim.schedule={kind!r}; valid: cosine, linear, constant")
  if not warmup:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])


def _path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))
                  for k in path)


def decay_mask(params: Any, exclude: Sequence[str]) -> Any:
  """Weight decay on matrices only: not on biases, norms, or excluded embeddings."""
  patterns = [re.compile(p) for p in exclude]

  def decays(path, leaf):
    name = _path_str(path)
    return leaf.ndim >= 2 and not any(p.search(name) for p in patterns)

  return jax.tree_util.tree_map_with_path(decays, params)


def layer_scales(params: Any, decay: float) -> Any:
  """Per-parameter learning-rate factors decay**(depth + 1 - layer) (BEiT-style fine-tuning).

  Layer 0 is everything before the first block (embeddings); blocks are found
  by a 'blocks' path element followed by an index (or a stacked leading axis
  when layers are scanned); the rest (final norm, head) is layer depth + 1.
  """
  paths = jax.tree_util.tree_flatten_with_path(params)[0]
  depth = 0
  for path, leaf in paths:
    names = _path_str(path).split("/")
    if "blocks" in names:
      nxt = names[names.index("blocks") + 1]
      depth = max(depth, int(nxt) + 1 if nxt.isdigit() else leaf.shape[0])
  if not depth:
    raise ConfigError("config.optim.layer_decay needs a model with 'blocks'")

  def scale(path, leaf):
    names = _path_str(path).split("/")
    if "blocks" in names:
      nxt = names[names.index("blocks") + 1]
      if nxt.isdigit():
        return jnp.float32(decay ** (depth - int(nxt)))
      per_layer = decay ** (depth - np.arange(depth, dtype=np.float32))
      return jnp.asarray(per_layer.reshape((-1,) + (1,) * (leaf.ndim - 1)))
    first = any(n in ("embedding", "pos_embedding", "cls_token") for n in names)
    return jnp.float32(decay ** (depth + 1) if first else 1.0)

  return jax.tree_util.tree_map_with_path(scale, params)


def _scale_by_tree(scales: Any) -> optax.GradientTransformation:
  def update(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, s: u * s.astype(u.dtype), updates, scales), state
  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def build(optim: Any, params: Any, total_steps: int, steps_per_epoch: int):
  """Returns (optax transformation, learning-rate schedule)."""
  lr = schedule(optim, total_steps, steps_per_epoch)
  name = optim.get("name", "adamw")
  parts = []
  if optim.get("clip_norm"):
    parts.append(optax.clip_by_global_norm(optim.clip_norm))
  if name == "adamw":
    parts.append(optax.scale_by_adam(b1=optim.get("b1", 0.9), b2=optim.get("b2", 0.999),
                                     eps=optim.get("eps", 1e-8)))
  elif name == "sgd":
    parts.append(optax.trace(decay=optim.get("momentum", 0.9), nesterov=False))
  else:
    raise ConfigError(f"config.optim.name={name!r}; valid: adamw, sgd")
  if optim.get("weight_decay"):
    parts.append(optax.add_decayed_weights(
        optim.weight_decay, mask=decay_mask(params, optim.get("wd_exclude", ()))))
  if optim.get("layer_decay"):
    parts.append(_scale_by_tree(layer_scales(params, optim.layer_decay)))
  parts.append(optax.scale_by_learning_rate(lr))
  return optax.chain(*parts), lr
