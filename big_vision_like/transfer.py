"""Start a run from another run's checkpoint: `config.init`, applied at step 0 only.

Pre-train, then transfer: a run of any objective can start from the encoder of
another run of this codebase (`config.init.path`, a workdir; `DIR:STEP` for
another step than its newest). A resume never reads `init`: it restores the
run's own checkpoint (train.py calls `apply` only when there is none).

What is read: the source run's `config.json` says how to build its objective;
an abstract build of it (no optimiser, no arrays) gives the checkpoint's tree,
and Orbax's partial restore (`PyTreeRestore(partial_restore=True)`, through
`Checkpointer.read_partial`) reads just the parameters that are loaded,
verified against the checkpoint's fingerprints. A source run that kept EMA
parameters is read from them (what it evaluated).

Which part goes where: `config.init.source` of the checkpoint (default: its
objective's `backbone_path`, DINO's teacher) into `config.init.target` of this
run (default: this objective's `backbone_path`), in its trainable params and
its other state alike. Leaf by leaf, by relative path:
  - same path and shape: loaded (cast to this run's dtype);
  - a classification head ('head' in the path) whose class count differs:
    left at init (zero-initialised), logged;
  - a learned position embedding of another token grid: resampled bilinearly
    (`models.layers.resample_posemb`), logged;
  - any other shape difference: a one-line ConfigError with both shapes;
  - no such parameter in the source, or a `config.init.skip` regex matches
    its path ('backbone/head/kernel'): left at init, logged (a regex that
    matches nothing is an error).
"""
from __future__ import annotations

import json
import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging
from flax import nnx

from big_vision_like import checkpoint as checkpoint_lib
from big_vision_like import workdir as workdir_lib
from big_vision_like.models import layers
from big_vision_like.registry import ConfigError, first_line

_SHOWN = 4  # names shown per row of the log table


def split_path(spec: str) -> tuple[str, int | None]:
  """'DIR' -> (DIR, None); 'DIR:STEP' -> (DIR, STEP). A ':' inside gs:// is no step."""
  head, sep, tail = spec.rpartition(":")
  if sep and tail.isdigit() and head and not head.endswith(":/"):
    return head, int(tail)
  return spec, None


def _subtree(spec: str) -> tuple[str, ...]:
  return tuple(k for k in spec.strip("/").split("/") if k)


def _name(keys) -> str:
  return "/".join(str(k) for k in keys)


def _keys(path) -> tuple:
  """A tree path as plain keys, list indices as ints (as module attributes index)."""
  keys = (checkpoint_lib._key(k) for k in path)  # pylint: disable=protected-access
  return tuple(int(k) if k.isdigit() else k for k in keys)


def read_source_config(workdir: str) -> ml_collections.ConfigDict:
  """The source run's config, from the config.json it wrote; one-line errors for a
  directory that is not a workdir of this codebase."""
  where = f"config.init.path={workdir!r}"
  root = workdir_lib.path(workdir)
  if not root.is_dir():
    raise ConfigError(f"{where}: no such directory")
  missing = [n for n in ("config.json", "checkpoints") if not (root / n).exists()]
  if missing:
    raise ConfigError(f"{where} is not a workdir of this codebase (it has no "
                      f"{' and no '.join(missing)})")
  try:
    return ml_collections.ConfigDict(json.loads((root / "config.json").read_text()))
  except Exception as e:  # pylint: disable=broad-except
    raise ConfigError(f"{where}: cannot read its config.json: {first_line(e)}") from None


def _abstract_objective(config):
  """The objective of `config`, shapes only (no arrays, no mesh)."""
  from big_vision_like import train  # pylint: disable=g-import-not-at-top  # train imports us
  with jax.sharding.use_abstract_mesh(train._NO_MESH), nnx.use_eager_sharding(False):  # pylint: disable=protected-access
    return nnx.eval_shape(lambda: train.build_objective(config, config.seed, 1))


def _leaves(tree, section: str, prefix: tuple) -> dict[tuple, tuple]:
  """{path relative to `prefix`: (full checkpoint path, leaf)} of the state leaves
  under `prefix` (paths without nnx's trailing 'value')."""
  found = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    keys = _keys(path)
    inner = keys[:-1] if keys and keys[-1] == "value" else keys
    if inner[:len(prefix)] == prefix:
      found[inner[len(prefix):]] = ((section,) + keys, leaf)
  return found


def _children(trees, prefix: tuple) -> list[str]:
  """The names one level below the longest existing part of `prefix`, for errors."""
  names = set()
  for tree in trees:
    for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]:
      keys = [checkpoint_lib._key(k) for k in path]  # pylint: disable=protected-access
      depth = 0
      while depth < len(prefix) and depth < len(keys) and keys[depth] == str(prefix[depth]):
        depth += 1
      if depth < len(keys):
        names.add(_name(keys[:depth + 1]))
  return sorted(names)


def _module_at(objective, keys):
  """The submodule at `keys` (attributes or list indices)."""
  node = objective
  for k in keys:
    node = node[k] if isinstance(k, int) else getattr(node, k)
  return node


def _grid_of(objective, prefix: tuple, rel: tuple):
  owner = _module_at(objective, prefix + rel[:-1])
  grid = getattr(owner, "grid", None)
  return tuple(grid) if grid is not None else None


def _nested(flat: dict[tuple, Any]) -> dict:
  tree: dict = {}
  for keys, leaf in flat.items():
    node = tree
    for k in keys[:-1]:
      node = node.setdefault(k, {})
    node[keys[-1]] = leaf
  return tree


def apply(config, trainer, state: dict) -> dict:
  """`state` (this run's fresh, sharded init) with the parameters `config.init`
  names replaced by the checkpoint's; logs one table of what happened."""
  spec = config.init.path
  workdir, step = split_path(spec)
  source_config = read_source_config(workdir)
  directory = str(workdir_lib.path(workdir, "checkpoints"))
  reader = checkpoint_lib.Checkpointer(directory, asynchronous=False, read_only=True)
  try:
    steps = reader.all_steps()
    if not steps:
      raise ConfigError(f"config.init.path={spec!r}: {directory} holds no checkpoint yet")
    if step is None:
      step = steps[-1]
    elif step not in steps:
      raise ConfigError(f"config.init.path={spec!r}: no checkpoint {step} in {directory}; "
                        f"it has {', '.join(map(str, steps))}")
    state = _apply(config, trainer, state, source_config, reader, step)
  finally:
    reader.close()
  return state


def _apply(config, trainer, state, source_config, reader, step):
  source_obj = _abstract_objective(source_config)
  target_obj = trainer.abstract_objective
  source = _subtree(config.init.source) or tuple(source_obj.backbone_path)
  target = _subtree(config.init.target) or tuple(target_obj.backbone_path)
  _, src_params, src_other = nnx.split(source_obj, source_obj.trainable, ...)
  params_section = "ema_params" if source_config.get("optim", {}).get("ema_decay") else "params"
  have = {**_leaves(src_params, params_section, source), **_leaves(src_other, "other", source)}
  if not have:
    raise ConfigError(
        f"config.init.source={_name(source)!r} is not in the checkpoint {reader.path(step)} "
        f"(objective {source_config.objective.name!r}); it has: "
        f"{', '.join(_children([src_params, src_other], source))}")
  sections = ("params", "other")
  want = {s: _leaves(state[s], s, target) for s in sections}
  if not any(want.values()):
    raise ConfigError(
        f"config.init.target={_name(target)!r} is not in this run (objective "
        f"{config.objective.name!r}); it has: "
        f"{', '.join(_children([state[s] for s in sections], target))}")
  skip = [re.compile(p) for p in config.init.skip]

  rows = {"loaded": [], "resampled": [], "left at init": [], "skipped": []}
  # full target path -> (full source path, source leaf, None or (old, new) grids)
  moves: dict[tuple, tuple] = {}
  for section in sections:
    for rel, (full, leaf) in want[section].items():
      name = _name(target + rel)
      if any(p.search(name) for p in skip):
        rows["skipped"].append(name)
        continue
      if rel not in have:
        rows["left at init"].append(f"{name} (not in the source)")
        continue
      src_full, src_leaf = have[rel]
      if tuple(src_leaf.shape) == tuple(leaf.shape):
        moves[full] = (src_full, src_leaf, None)
        rows["loaded"].append(name)
        continue
      old, new = tuple(src_leaf.shape), tuple(leaf.shape)
      if "head" in rel and len(old) == len(new) and old[:-1] == new[:-1]:
        rows["left at init"].append(f"{name} (classes {old[-1]} -> {new[-1]})")
        continue
      grids = (_grid_of(source_obj, source, rel), _grid_of(target_obj, target, rel))
      if (rel[-1] == "pos_embedding" and None not in grids and len(old) == len(new) == 3
          and old[0] == new[0] == 1 and old[2] == new[2]
          and old[1] == grids[0][0] * grids[0][1] and new[1] == grids[1][0] * grids[1][1]):
        moves[full] = (src_full, src_leaf, grids)
        rows["resampled"].append(f"{name} (grid {grids[0][0]}x{grids[0][1]} -> "
                                 f"{grids[1][0]}x{grids[1][1]}, bilinear)")
        continue
      raise ConfigError(
          f"config.init: {name} has shape {old} in {reader.path(step)} but {new} in this "
          f"run; change config.model to match, or list it in config.init.skip")
  for pattern in skip:
    if not any(pattern.search(name) for name in rows["skipped"]):
      raise ConfigError(f"config.init.skip regex {pattern.pattern!r} matches no parameter "
                        f"of {_name(target)!r} in this run")
  if not moves:
    raise ConfigError(
        f"config.init: nothing of {_name(source)!r} in {reader.path(step)} "
        f"(model {source_config.model.name!r}) matches {_name(target)!r} of this run "
        f"(model {config.model.name!r}): is it another backbone family?")

  # Restore only what is loaded, replicated (a resampled one changes shape first).
  replicated = jax.sharding.NamedSharding(trainer.mesh, jax.sharding.PartitionSpec())
  abstract = {src: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=replicated)
              for src, leaf, _ in moves.values()}
  restored = _flat_by_keys(reader.read_partial(step, _nested(abstract)))

  def replace(section, tree):
    def one(path, leaf):
      full = (section,) + _keys(path)
      if full not in moves:
        return leaf
      src_full, _, grids = moves[full]
      value = restored[src_full]
      if grids is not None:
        value = layers.resample_posemb(value, *grids)
      # A copy of its own: params and EMA params are donated separately.
      return jax.device_put(jnp.asarray(value, leaf.dtype), leaf.sharding, may_alias=False)
    return jax.tree_util.tree_map_with_path(one, tree)

  state = dict(state)
  for section in sections:
    state[section] = replace(section, state[section])
  if "ema_params" in state:  # EMA parameters start equal to the loaded ones
    state["ema_params"] = replace("params", state["ema_params"])

  unused = len(have) - len({src for src, _, _ in moves.values()})
  lines = [f"Initialised from {reader.path(step)} (objective "
           f"{source_config.objective.name!r}, {_name(source)!r} -> {_name(target)!r}; "
           f"{unused} source parameters unused):"]
  for what, names in rows.items():
    more = f", ... ({len(names) - _SHOWN} more)" if len(names) > _SHOWN else ""
    lines.append(f"  {what:<13} {len(names):>4}  {', '.join(names[:_SHOWN])}{more}".rstrip())
  logging.info("\n".join(lines))
  return state


def _flat_by_keys(tree) -> dict[tuple, jax.Array]:
  return {_keys(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
