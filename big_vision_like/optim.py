"""optax optimiser from config.optim: AdamW / SGD / LARS, warm-up + decay, masks,
clipping, layer decay, per-group learning-rate multipliers.

Durations may be given in steps or epochs (`warmup_steps` or `warmup_epochs`);
the trainer resolves epochs with the training set size. Frozen parameters
(`config.optim.frozen`) never reach the optimiser: the trainer keeps them out
of the differentiated parameters (`frozen_filter`), so they have no gradient,
no optimiser state and no weight decay.
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
  """'backbone/blocks/0/attn/query/kernel' (without nnx's trailing 'value')."""
  names = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
  return "/".join(names[:-1] if names and names[-1] == "value" else names)


def _compile(pattern: str, field: str) -> re.Pattern:
  try:
    return re.compile(pattern)
  except (re.error, TypeError) as e:
    raise ConfigError(f"{field}: {pattern!r} is not a regex ({e})") from None


def frozen_filter(patterns: Sequence[str]):
  """An nnx filter: the parameters whose path ('backbone/blocks/0/...', as
  `param_names` spells them) matches one of these regexes."""
  compiled = [_compile(p, "config.optim.frozen") for p in patterns]
  return lambda path, _: any(p.search("/".join(map(str, path))) for p in compiled)


def check_patterns(patterns: Sequence[str], names: Sequence[str], field: str) -> None:
  """A regex that matches no parameter is a typo: one-line error naming it."""
  for pattern in patterns:
    if not any(_compile(pattern, field).search(n) for n in names):
      shown = ", ".join(names[:3])
      raise ConfigError(f"{field}: {pattern!r} matches no parameter (they are named like "
                        f"{shown}, ...)")


def decay_mask(params: Any, exclude: Sequence[str]) -> Any:
  """Weight decay on matrices only: not on biases, norms, or excluded embeddings."""
  patterns = [re.compile(p) for p in exclude]

  def decays(path, leaf):
    name = _path_str(path)
    return leaf.ndim >= 2 and not any(p.search(name) for p in patterns)

  return jax.tree_util.tree_map_with_path(decays, params)


def layer_scales(params: Any, decay: float, every: Any = None) -> Any:
  """Per-parameter learning-rate factors decay**(depth + 1 - layer) (BEiT-style fine-tuning).

  Layer 0 is everything before the first block (embeddings); blocks are found
  by a 'blocks' path element followed by an index (or a stacked leading axis
  when layers are scanned); the rest (final norm, head) is layer depth + 1.
  """
  paths = jax.tree_util.tree_flatten_with_path(params if every is None else every)[0]
  depth = 0  # of the whole model (`every`: frozen blocks included)
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


def lr_multipliers(params: Any, rules: Sequence[Sequence[Any]]) -> Any:
  """Per-parameter factors from config.optim.lr_mult ((regex, factor), ...): the
  first rule whose regex matches the path, else 1."""
  rules = [(re.compile(pattern), float(factor)) for pattern, factor in rules]

  def factor(path, leaf):
    del leaf
    name = _path_str(path)
    return jnp.float32(next((f for p, f in rules if p.search(name)), 1.0))

  return jax.tree_util.tree_map_with_path(factor, params)


def _scale_by_tree(scales: Any) -> optax.GradientTransformation:
  def update(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, s: u * s.astype(u.dtype), updates, scales), state
  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def build(optim: Any, params: Any, total_steps: int, steps_per_epoch: int,
          every: Any = None):
  """Returns (optax transformation, learning-rate schedule) for the trainable `params`;
  `every`: all of them, frozen ones too (layer decay counts the model's depth)."""
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
  elif name != "lars":
    raise ConfigError(f"config.optim.name={name!r}; valid: adamw, sgd, lars")
  if optim.get("weight_decay"):
    parts.append(optax.add_decayed_weights(
        optim.weight_decay, mask=decay_mask(params, optim.get("wd_exclude", ()))))
  if name == "lars":
    # optax.lars's order: decay, layer-wise trust ratio, learning rate, momentum;
    # as in MAE's LARS, biases and norms (1-d) get no trust ratio.
    parts.append(optax.masked(
        optax.scale_by_trust_ratio(trust_coefficient=optim.get("trust_coefficient", 0.001),
                                   eps=0.0),
        jax.tree.map(lambda p: p.ndim > 1, params)))
  rules = tuple(optim.get("lr_mult", ()) or ())
  if rules:
    for i, rule in enumerate(rules):
      if not (isinstance(rule, (list, tuple)) and len(rule) == 2
              and isinstance(rule[0], str) and isinstance(rule[1], (int, float))):
        raise ConfigError(f"config.optim.lr_mult[{i}]={rule!r}: want (regex, factor), e.g. "
                          f"config.optim.lr_mult=(('^backbone/', 0.1),)")
    check_patterns([r[0] for r in rules], param_names(params), "config.optim.lr_mult")
    parts.append(_scale_by_tree(lr_multipliers(params, rules)))
  if optim.get("layer_decay"):
    parts.append(_scale_by_tree(layer_scales(params, optim.layer_decay, every)))
  parts.append(optax.scale_by_learning_rate(lr))
  if name == "lars":
    parts.append(optax.trace(decay=optim.get("momentum", 0.9), nesterov=False))
  return optax.chain(*parts), lr


def param_names(params: Any) -> list[str]:
  return [_path_str(path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
