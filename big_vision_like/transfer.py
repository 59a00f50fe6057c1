"""Start a run from a pre-trained checkpoint: `config.init`, applied at step 0 only.

Pre-train, then transfer: a run of any objective can start from the encoder of
another run of this codebase, or of a HuggingFace / timm checkpoint directory.
`config.init.path` is detected by what it is:
  - a workdir of this codebase (its newest checkpoint; `DIR:STEP` for another).
    Its `config.json` says how to build its objective; an abstract build (no
    arrays) gives the checkpoint's tree, and Orbax's partial restore
    (`Checkpointer.read_partial`) reads just the parameters that are loaded,
    verified against their fingerprints. A run that kept EMA parameters is read
    from them (what it evaluated);
  - a checkpoint directory as `huggingface-cli download` leaves it (config.json +
    safetensors; `models/hf_checkpoint.py` reads and converts it, no torch).

`plan` decides everything from shapes before anything is written to the
workdir (train.py calls it before claiming the workdir, and only for a run
that has no checkpoint yet: a resume restores its own and never reads `init`);
`apply` then reads the arrays into the fresh state.

Which part goes where: `config.init.source` of the checkpoint (default: its
objective's `backbone_path`, DINO's teacher) into `config.init.target` of this
run (default: this objective's `init_targets`, its backbone; DINO's student
and teacher), in its trainable params and its other state alike (frozen
parameters included). 'all' is the whole objective: a CLIP / SigLIP checkpoint
into a CLIP / SigLIP run, both towers, projections and temperature. Leaf by leaf, by relative path:
  - same path and shape: loaded (cast to this run's dtype);
  - a classification head ('head' in the path) whose class count differs:
    left at init (zero-initialised), logged;
  - a learned position embedding of another token grid: resampled, logged:
    as the source family does it (`layers.resample_posemb`): bicubic as torch
    computes it for HF checkpoints (transformers' `interpolate_pos_encoding`),
    with antialiasing for timm's and DINOv2-with-registers (timm's
    `resample_abs_pos_embed`), for ours the source ViT's `posemb_resample`
    (bilinear by default, as it runs at another input size);
  - a Swin relative-position bias table for another window size: resampled as a
    (2w-1) x (2w-1) grid per head, bicubic as torch computes it (timm's
    `resize_rel_pos_bias_table_simple`; timm's checkpoint filter uses BEiT's
    geometric interpolation instead, not reproduced here), logged;
  - any other shape difference: a one-line ConfigError with both shapes;
  - no such parameter in the source, or a `config.init.skip` regex matches
    its path ('backbone/head/kernel'): left at init, logged (a regex that
    matches nothing is an error).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import re
import types
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from big_vision_like import checkpoint as checkpoint_lib
from big_vision_like import workdir as workdir_lib
from big_vision_like.models import MODELS, hf_checkpoint, layers
from big_vision_like.registry import ConfigError, first_line

_SHOWN = 4  # names shown per row of the log table
_ROWS = ("loaded", "resampled", "left at init", "skipped")


def split_path(spec: str) -> tuple[str, int | None]:
  """'DIR' -> (DIR, None); 'DIR:STEP' -> (DIR, STEP). A ':' inside gs:// is no step."""
  head, sep, tail = spec.rpartition(":")
  if sep and tail.isdigit() and head and not head.endswith(":/"):
    return head, int(tail)
  return spec, None


WHOLE = "all"  # init.source / init.target: the whole objective (both towers of a CLIP)


def _subtree(spec: str) -> tuple[str, ...]:
  return tuple(k for k in spec.strip("/").split("/") if k)


def _name(keys) -> str:
  return "/".join(str(k) for k in keys) or WHOLE


def _keys(path) -> tuple:
  """A tree path as plain keys, list indices as ints (as module attributes index)."""
  keys = (checkpoint_lib._key(k) for k in path)  # pylint: disable=protected-access
  return tuple(int(k) if k.isdigit() else k for k in keys)


def has_checkpoint(workdir: str) -> bool:
  """Whether `workdir` holds a checkpoint already (a resume), read without writing."""
  directory = workdir_lib.path(workdir, "checkpoints")
  return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())


# -- sources ------------------------------------------------------------------


@dataclasses.dataclass
class Source:
  """What `config.init.path` holds, as shapes: enough to plan without reading arrays."""
  where: str  # the checkpoint's path, for the log and errors
  summary: str  # "objective 'mae'", "HF ViTModel (model_type 'vit')"
  model: dict  # its config.model: hints when this run's differs
  objective: Any  # abstract: `backbone_path`, and module grids for resampling
  sections: dict[str, Any]  # section name -> tree of shapes, as the checkpoint names them
  read: Callable[[dict], dict]  # {full key: ShapeDtypeStruct} -> {full key: array}
  resample: str  # the position-embedding resampling of this family


def read_source_config(workdir: str) -> ml_collections.ConfigDict:
  """The source run's config, from the config.json it wrote."""
  where = f"config.init.path={workdir!r}"
  try:
    text = workdir_lib.path(workdir, "config.json").read_text()
    return ml_collections.ConfigDict(json.loads(text))
  except Exception as e:  # pylint: disable=broad-except
    raise ConfigError(f"{where}: cannot read its config.json: {first_line(e)}") from None


def open_source(spec: str) -> Source:
  """The Source that `config.init.path=spec` names; one-line errors for anything else."""
  directory, step = split_path(spec)
  where = f"config.init.path={spec!r}"
  root = workdir_lib.path(directory)
  if not root.is_dir():
    raise ConfigError(f"{where}: no such directory")
  if (root / "checkpoints").is_dir() and (root / "config.json").exists():
    return _workdir_source(spec, directory, step)
  if hf_checkpoint.is_checkpoint_directory(root):
    if step is not None:
      raise ConfigError(f"{where}: a HuggingFace / timm checkpoint directory has no steps")
    return _hf_source(directory)
  raise ConfigError(f"{where} is neither a workdir of this codebase (config.json + "
                    f"checkpoints/) nor a HuggingFace / timm checkpoint directory "
                    f"(config.json + *.safetensors); it has: "
                    f"{', '.join(sorted(p.name for p in root.iterdir())[:8]) or 'nothing'}")


def _abstract(build: Callable[[], Any]):
  """What `build` makes, shapes only (no arrays, no mesh: no axis names resolved)."""
  from big_vision_like import train  # pylint: disable=g-import-not-at-top  # train imports us
  with jax.sharding.use_abstract_mesh(train._NO_MESH), nnx.use_eager_sharding(False):  # pylint: disable=protected-access
    return nnx.eval_shape(build)


def _abstract_objective(config):
  """The objective of `config`, shapes only."""
  from big_vision_like import train  # pylint: disable=g-import-not-at-top
  return _abstract(lambda: train.build_objective(config, config.seed, 1))


def _state_sections(config, objective) -> dict[str, Any]:
  """{'params': trainable, 'other': the rest} of `objective` as its runs save them."""
  from big_vision_like import train  # pylint: disable=g-import-not-at-top
  _, params, other = train._split(objective, train.frozen_of(config))  # pylint: disable=protected-access
  return {"params": params, "other": other}


def _workdir_source(spec: str, directory: str, step: int | None) -> Source:
  config = read_source_config(directory)
  checkpoints = str(workdir_lib.path(directory, "checkpoints"))
  reader = checkpoint_lib.Checkpointer(checkpoints, asynchronous=False, read_only=True)
  try:
    steps = reader.all_steps()
  finally:
    reader.close()
  if not steps:
    raise ConfigError(f"config.init.path={spec!r}: {checkpoints} holds no checkpoint yet")
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise ConfigError(f"config.init.path={spec!r}: no checkpoint {step} in {checkpoints}; "
                      f"it has {', '.join(map(str, steps))}")
  objective = _abstract_objective(config)
  sections = _state_sections(config, objective)
  if config.get("optim", {}).get("ema_decay"):  # what the run evaluated
    sections["ema_params"] = sections.pop("params")

  def read(abstract: dict) -> dict:
    ckpt = checkpoint_lib.Checkpointer(checkpoints, asynchronous=False, read_only=True)
    try:
      return _flat_by_keys(ckpt.read_partial(step, _nested(abstract)))
    finally:
      ckpt.close()

  return Source(where=f"{checkpoints}/{step}", summary=f"objective {config.objective.name!r}",
                model=config.model.to_dict(), objective=objective, sections=sections,
                read=read, resample=config.model.get("posemb_resample", "bilinear"))


@functools.lru_cache(maxsize=1)  # resolve_model, then plan: one read of the files
def _hf_source(directory: str) -> Source:
  checkpoint = hf_checkpoint.read(directory)
  converted = hf_checkpoint.convert(checkpoint)
  arrays = {_keys(path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(converted.params)[0]}
  model = dict(converted.model)
  name = model.pop("name")
  backbone = _abstract(lambda: MODELS.build(name, dict(model), field="the checkpoint",
                                             rngs=nnx.Rngs(0)))
  shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in arrays.items()}
  return Source(
      where=str(workdir_lib.path(directory)), summary=converted.description,
      model=dict(converted.model), objective=types.SimpleNamespace(
          backbone=backbone, backbone_path=("backbone",)),
      sections={"hf": _nested(shapes)},
      read=lambda abstract: {k: arrays[k[1:]] for k in abstract},
      resample=converted.model.get("posemb_resample") or (
          "bicubic_antialias" if checkpoint.kind == "timm" else "bicubic"))


# Fields of config.model that stay this run's with `config.init.model`: the task
# (classes, input size, a fresh head's init) and how it runs, not the architecture.
RUN_FIELDS = ("num_classes", "image_size", "drop_path", "head_zero_init", "dtype",
              "param_dtype", "attention", "remat", "scan")


def resolve_model(config) -> None:
  """`config.init.model=True`: this run's config.model takes the checkpoint's
  architecture (every field but RUN_FIELDS), so a fine-tuning of a published
  checkpoint needs no hand-copied widths, depths, epsilons."""
  if not (config.init.path and config.init.get("model")):
    return
  model = {k: v for k, v in open_source(config.init.path).model.items()
           if k not in RUN_FIELDS}
  keep = {k: config.model[k] for k in RUN_FIELDS if k in config.model}
  if model.get("name") != config.model.get("name"):
    keep = {k: v for k, v in keep.items() if k in ("num_classes", "image_size")}
  with config.unlocked():
    config.model = ml_collections.ConfigDict({**model, **keep})


# -- the plan -----------------------------------------------------------------


def _leaves(tree, section: str, prefix: tuple) -> dict[tuple, tuple]:
  """{path relative to `prefix`: (full path, leaf)} of the leaves under `prefix`
  (paths without nnx's trailing 'value')."""
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
      keys = [str(k) for k in _keys(path)]
      depth = 0
      while depth < len(prefix) and depth < len(keys) and keys[depth] == str(prefix[depth]):
        depth += 1
      if depth < len(keys):
        names.add(_name(keys[:depth + 1]))
  return sorted(names)


def _module_at(objective, keys):
  """The submodule at `keys` (attributes or list indices), or None."""
  node = objective
  for k in keys:
    try:
      node = node[k] if isinstance(k, int) else getattr(node, k)
    except (AttributeError, IndexError, KeyError, TypeError):
      return None
  return node


def _grid_of(objective, keys):
  grid = getattr(_module_at(objective, keys), "grid", None)
  return tuple(grid) if grid is not None else None


def _nested(flat: dict[tuple, Any]) -> dict:
  tree: dict = {}
  for keys, leaf in flat.items():
    node = tree
    for k in keys[:-1]:
      node = node.setdefault(k, {})
    node[keys[-1]] = leaf
  return tree


@dataclasses.dataclass
class Plan:
  """What `apply` does: target full key -> (source full key, source shape, grids)."""
  source: Source
  moves: dict[tuple, tuple]
  rows: dict[str, list[str]]
  source_paths: tuple
  target_paths: tuple
  unused: int


def plan(config, target_objective=None) -> Plan:
  """Checks `config.init` against this run's shapes (`target_objective`, abstract;
  built from `config` if not given); reads no arrays and writes nothing."""
  source = open_source(config.init.path)
  target_obj = target_objective or _abstract_objective(config)
  src = _subtree(config.init.source) or tuple(source.objective.backbone_path)
  if config.init.source == WHOLE:
    src = ()
  targets = ((_subtree(config.init.target),) if config.init.target
             else tuple(tuple(t) for t in target_obj.init_targets))
  if config.init.target == WHOLE:
    targets = ((),)
  have = {}
  for section, tree in source.sections.items():
    have.update(_leaves(tree, section, src))
  if not have:
    raise ConfigError(
        f"config.init.source={_name(src)!r} is not in the checkpoint {source.where} "
        f"({source.summary}); it has: {', '.join(_children(source.sections.values(), src))}")
  sections = _state_sections(config, target_obj)
  skip = [re.compile(p) for p in config.init.skip]
  rows = {row: [] for row in _ROWS}
  moves: dict[tuple, tuple] = {}
  for target in targets:
    want = {s: _leaves(tree, s, target) for s, tree in sections.items()}
    if not any(want.values()):
      raise ConfigError(
          f"config.init.target={_name(target)!r} is not in this run (objective "
          f"{config.objective.name!r}); it has: "
          f"{', '.join(_children(sections.values(), target))}")
    for section in sections:
      for rel, (full, leaf) in want[section].items():
        _plan_leaf(config, source, src, target, rel, full, leaf, have, skip, rows, moves,
                   target_obj)
  for pattern in skip:
    if not any(pattern.search(name) for name in rows["skipped"]):
      raise ConfigError(f"config.init.skip regex {pattern.pattern!r} matches no parameter "
                        f"of {', '.join(map(_name, targets))!r} in this run")
  if not moves:
    raise ConfigError(
        f"config.init: nothing of {_name(src)!r} in {source.where} ({source.summary}, "
        f"model {source.model.get('name')!r}) matches "
        f"{', '.join(map(_name, targets))!r} of this run (model {config.model.name!r}): "
        f"is it another backbone family?")
  used = {m[0] for m in moves.values()}
  return Plan(source=source, moves=moves, rows=rows, source_paths=src, target_paths=targets,
              unused=len(have) - len(used))


def _plan_leaf(config, source, src, target, rel, full, leaf, have, skip, rows, moves,
               target_obj):
  name = _name(target + rel)
  if any(p.search(name) for p in skip):
    rows["skipped"].append(name)
    return
  if rel not in have:
    rows["left at init"].append(f"{name} (not in the source)")
    return
  src_full, src_leaf = have[rel]
  old, new = tuple(src_leaf.shape), tuple(leaf.shape)
  if old == new:
    moves[full] = (src_full, src_leaf, None)
    rows["loaded"].append(name)
    return
  if "head" in rel and len(old) == len(new) and old[:-1] == new[:-1]:
    rows["left at init"].append(f"{name} (classes {old[-1]} -> {new[-1]})")
    return
  grids = (_grid_of(source.objective, src + rel[:-1]), _grid_of(target_obj, target + rel[:-1]))
  if (rel[-1] == "pos_embedding" and None not in grids and len(old) == len(new) == 3
      and old[0] == new[0] == 1 and old[2] == new[2]
      and old[1] == grids[0][0] * grids[0][1] and new[1] == grids[1][0] * grids[1][1]):
    moves[full] = (src_full, src_leaf, grids)
    rows["resampled"].append(f"{name} (grid {grids[0][0]}x{grids[0][1]} -> "
                             f"{grids[1][0]}x{grids[1][1]}, {source.resample})")
    return
  windows = (getattr(_module_at(source.objective, src + rel[:-1]), "window", None),
             getattr(_module_at(target_obj, target + rel[:-1]), "window", None))
  if (rel[-1] == "bias_table" and None not in windows and len(old) == len(new) == 2
      and old[1] == new[1] and old[0] == (2 * windows[0] - 1) ** 2
      and new[0] == (2 * windows[1] - 1) ** 2):
    sides = tuple((2 * w - 1,) * 2 for w in windows)
    moves[full] = (src_full, src_leaf, ("table",) + sides)
    rows["resampled"].append(f"{name} (window {windows[0]} -> {windows[1]}, bicubic)")
    return
  hint = (f"the checkpoint's model is {source.model}" if source.sections.keys() == {"hf"}
          else "change config.model to match")
  raise ConfigError(
      f"config.init: {name} has shape {old} in {source.where} but {new} in this run "
      f"(config.model); {hint}, or list it in config.init.skip")


# -- applying it --------------------------------------------------------------


def apply(config, trainer, state: dict, init_plan: Plan | None = None) -> dict:
  """`state` (this run's fresh, sharded init) with the parameters `config.init`
  names replaced by the checkpoint's; logs one table of what happened."""
  init_plan = init_plan or plan(config, trainer.abstract_objective)
  moves = init_plan.moves
  # Read only what is loaded, replicated (a resampled one changes shape first).
  replicated = jax.sharding.NamedSharding(trainer.mesh, jax.sharding.PartitionSpec())
  abstract = {src: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=replicated)
              for src, leaf, _ in moves.values()}
  restored = init_plan.source.read(abstract)

  def replace(section, tree):
    def one(path, leaf):
      full = (section,) + _keys(path)
      if full not in moves:
        return leaf
      src_full, _, grids = moves[full]
      value = restored[src_full]
      if grids is not None and grids[0] == "table":  # [(2w-1)^2, heads] as a grid
        value = layers.resample_posemb(jnp.asarray(value, jnp.float32)[None], *grids[1:],
                                       method="bicubic")[0]
      elif grids is not None:
        value = layers.resample_posemb(jnp.asarray(value, jnp.float32), *grids,
                                       method=init_plan.source.resample)
      # A copy of its own: params and EMA params are donated separately.
      return jax.device_put(jnp.asarray(value, leaf.dtype), leaf.sharding, may_alias=False)
    return jax.tree_util.tree_map_with_path(one, tree)

  state = dict(state)
  for section in ("params", "other"):
    state[section] = replace(section, state[section])
  if "ema_params" in state:  # EMA parameters start equal to the loaded ones
    state["ema_params"] = replace("params", state["ema_params"])
  _log(init_plan)
  _hf_source.cache_clear()  # the checkpoint's arrays are in the state now
  return state


def _log(init_plan: Plan) -> None:
  source = init_plan.source
  targets = ", ".join(map(_name, init_plan.target_paths))
  lines = [f"Initialised from {source.where} ({source.summary}, "
           f"{_name(init_plan.source_paths)!r} -> {targets!r}; "
           f"{init_plan.unused} source parameters unused):"]
  for what, names in init_plan.rows.items():
    more = f", ... ({len(names) - _SHOWN} more)" if len(names) > _SHOWN else ""
    lines.append(f"  {what:<13} {len(names):>4}  {', '.join(names[:_SHOWN])}{more}".rstrip())
  logging.info("\n".join(lines))


def _flat_by_keys(tree) -> dict[tuple, jax.Array]:
  return {_keys(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
