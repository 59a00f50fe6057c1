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
into a CLIP / SigLIP run, both towers, projections and temperature.

The two config.model must describe the same architecture (class defaults
filled in), but for the run's own fields (RUN_FIELDS) and FREE_FIELDS: same
shapes can still mean another function (an activation, an epsilon).
`init.model=True` takes the checkpoint's instead (`resolve_model`). Then leaf
by leaf, by relative path:
  - same path and shape: loaded (cast to this run's dtype); indexed blocks
    into scanned ones (`scan=True`, stacked on axis 0) or back: restacked;
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
import inspect
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
from big_vision_like.models import vit as vit_lib
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


def resolve_model(config, workdir: str | None = None) -> None:
  """`config.init.model=True`: this run's config.model takes the checkpoint's
  architecture (every field but RUN_FIELDS), so a fine-tuning of a published
  checkpoint needs no hand-copied widths, depths, epsilons. A resume takes it from
  the run's own config.json: it never reads `init`."""
  if not (config.init.path and config.init.get("model")):
    return
  if workdir is not None and has_checkpoint(workdir):
    model = read_source_config(workdir).model.to_dict()
  else:
    model = open_source(config.init.path).model
  model = {k: v for k, v in model.items() if k not in RUN_FIELDS}
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
class Move:
  """One target leaf: from which source leaves (full key, shape), and how."""
  sources: list[tuple[tuple, Any]]
  how: tuple = ()  # () copy; ('grid', old, new); ('table', old, new); ('stack',); ('index', i)


@dataclasses.dataclass
class Plan:
  """What `apply` does: target full key -> Move."""
  source: Source
  moves: dict[tuple, Move]
  rows: dict[str, list[str]]
  source_paths: tuple
  target_paths: tuple
  unused: list[str]


# Fields of config.model that may differ from the checkpoint's besides RUN_FIELDS:
# they change no parameter's meaning (pooling reads the same tokens; the resampling
# method only applies at other sizes; windows resample their bias tables).
FREE_FIELDS = ("pool", "posemb_resample", "window_size")


def _architecture(model: dict) -> dict:
  """`model` with its class's defaults filled in and a ViT variant spelt out: what
  the parameters mean, comparable between two configs."""
  name = model.get("name")
  try:
    signature = inspect.signature(MODELS.get(name).__init__)
  except Exception:  # pylint: disable=broad-except  # an unknown name errs elsewhere
    return dict(model)
  arch = {k: p.default for k, p in signature.parameters.items()
          if p.default is not inspect.Parameter.empty}
  arch.update(json.loads(json.dumps(model)))  # tuples and lists alike
  if name == "vit":
    for key, value in (vit_lib.parse_variant(arch["variant"]) if arch.get("variant")
                       else {}).items():
      arch[key] = value if arch.get(key) is None else arch[key]
    if arch.get("mlp_dim") is None and arch.get("width"):
      arch["mlp_dim"] = 4 * arch["width"]
  for key in ("variant",) + RUN_FIELDS + FREE_FIELDS:
    arch.pop(key, None)
  return arch


def _check_architecture(config, source: Source) -> None:
  """Parameters of the same shapes can mean another function (an activation, a norm's
  epsilon): the checkpoint's config.model and this run's must agree but for
  RUN_FIELDS and FREE_FIELDS."""
  theirs, ours = _architecture(source.model), _architecture(config.model.to_dict())
  differ = [k for k in sorted(set(theirs) | set(ours)) if theirs.get(k) != ours.get(k)]
  if "name" in differ:
    differ = ["name"]
  if differ:
    k = differ[0]
    more = f" (also {', '.join(differ[1:])})" if len(differ) > 1 else ""
    raise ConfigError(
        f"config.init: this run's config.model.{k}={ours.get(k)!r} but the checkpoint's "
        f"is {theirs.get(k)!r}{more} ({source.where}); set it, or "
        f"--config.init.model=True to take the checkpoint's architecture")


def plan(config, target_objective=None) -> Plan:
  """Checks `config.init` against this run's architecture and shapes
  (`target_objective`, abstract; built from `config` if not given); reads no
  arrays and writes nothing."""
  source = open_source(config.init.path)
  target_obj = target_objective or _abstract_objective(config)
  if config.init.source in ("", WHOLE) and config.init.target in ("", WHOLE):
    _check_architecture(config, source)  # the backbones: config.model on both sides
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
  moves: dict[tuple, Move] = {}
  for target in targets:
    want = {s: _leaves(tree, s, target) for s, tree in sections.items()}
    if not any(want.values()):
      raise ConfigError(
          f"config.init.target={_name(target)!r} is not in this run (objective "
          f"{config.objective.name!r}); it has: "
          f"{', '.join(_children(sections.values(), target))}")
    for section in sections:
      for rel, (full, leaf) in want[section].items():
        name = _name(target + rel)
        if any(p.search(name) for p in skip):
          rows["skipped"].append(name)
          continue
        move, row, note = _plan_leaf(source, src, target, rel, leaf, have, target_obj)
        rows[row].append(f"{name} ({note})" if note else name)
        if move is not None:
          moves[full] = move
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
  used = {key for m in moves.values() for key, _ in m.sources}
  unused = [_name(src + rel) for rel, (key, _) in have.items() if key not in used]
  return Plan(source=source, moves=moves, rows=rows, source_paths=src, target_paths=targets,
              unused=unused)


def _restack(rel: tuple, shape: tuple, have: dict):
  """A Move between indexed blocks ('blocks/3/...') and scanned ones ('blocks/...',
  stacked on axis 0: `scan=True`), or None."""
  if "blocks" not in rel:
    return None
  at = rel.index("blocks") + 1
  if at < len(rel) and isinstance(rel[at], int):  # indexed here, stacked there?
    stacked = have.get(rel[:at] + rel[at + 1:])
    if stacked and tuple(stacked[1].shape[1:]) == shape and rel[at] < stacked[1].shape[0]:
      return Move([stacked], ("index", rel[at]))
    return None
  depth = shape[0] if shape else 0
  parts = [have.get(rel[:at] + (i,) + rel[at:]) for i in range(depth)]
  if (depth and all(p is not None and tuple(p[1].shape) == shape[1:] for p in parts)
      and rel[:at] + (depth,) + rel[at:] not in have):
    return Move(parts, ("stack",))
  return None


def _plan_leaf(source, src, target, rel, leaf, have, target_obj):
  """(Move or None, row of the log table, note) for one target leaf."""
  new = tuple(leaf.shape)
  if rel not in have:
    move = _restack(rel, new, have)
    if move is None:
      return None, "left at init", "not in the source"
    return move, "loaded", f"{move.how[0]}ed blocks"
  src_full, src_leaf = have[rel]
  old = tuple(src_leaf.shape)
  if old == new:
    return Move([(src_full, src_leaf)]), "loaded", ""
  if "head" in rel and len(old) == len(new) and old[:-1] == new[:-1]:
    return None, "left at init", f"classes {old[-1]} -> {new[-1]}"
  grids = (_grid_of(source.objective, src + rel[:-1]), _grid_of(target_obj, target + rel[:-1]))
  if (rel[-1] == "pos_embedding" and None not in grids and len(old) == len(new) == 3
      and old[0] == new[0] == 1 and old[2] == new[2]
      and old[1] == grids[0][0] * grids[0][1] and new[1] == grids[1][0] * grids[1][1]):
    return (Move([(src_full, src_leaf)], ("grid",) + grids), "resampled",
            f"grid {grids[0][0]}x{grids[0][1]} -> {grids[1][0]}x{grids[1][1]}, "
            f"{source.resample}")
  windows = (getattr(_module_at(source.objective, src + rel[:-1]), "window", None),
             getattr(_module_at(target_obj, target + rel[:-1]), "window", None))
  if (rel[-1] == "bias_table" and None not in windows and len(old) == len(new) == 2
      and old[1] == new[1] and old[0] == (2 * windows[0] - 1) ** 2
      and new[0] == (2 * windows[1] - 1) ** 2):
    sides = tuple((2 * w - 1,) * 2 for w in windows)
    return (Move([(src_full, src_leaf)], ("table",) + sides), "resampled",
            f"window {windows[0]} -> {windows[1]}, bicubic")
  hint = (f"the checkpoint's model is {source.model}" if source.sections.keys() == {"hf"}
          else "change config.model to match")
  raise ConfigError(
      f"config.init: {_name(target + rel)} has shape {old} in {source.where} but {new} in "
      f"this run (config.model); {hint}, or list it in config.init.skip")


# -- applying it --------------------------------------------------------------


def _value(move: Move, restored: dict, method: str):
  """The target leaf's value from its source leaves."""
  values = [restored[key] for key, _ in move.sources]
  kind = move.how[0] if move.how else "copy"
  if kind == "copy":
    return values[0]
  if kind == "stack":
    return jnp.stack(values)
  if kind == "index":
    return values[0][move.how[1]]
  value = jnp.asarray(values[0], jnp.float32)
  if kind == "table":  # [(2w-1)^2, heads] as a grid
    return layers.resample_posemb(value[None], *move.how[1:], method="bicubic")[0]
  return layers.resample_posemb(value, *move.how[1:], method=method)


def apply(config, trainer, state: dict, init_plan: Plan | None = None) -> dict:
  """`state` (this run's fresh, sharded init) with the parameters `config.init`
  names replaced by the checkpoint's; logs one table of what happened. The
  plan's source arrays are released afterwards."""
  init_plan = init_plan or plan(config, trainer.abstract_objective)
  moves = init_plan.moves
  # Read only what is loaded, replicated (a resampled one changes shape first).
  replicated = jax.sharding.NamedSharding(trainer.mesh, jax.sharding.PartitionSpec())
  abstract = {key: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=replicated)
              for move in moves.values() for key, leaf in move.sources}
  restored = init_plan.source.read(abstract)
  method = init_plan.source.resample

  def replace(section, tree):
    def one(path, leaf):
      full = (section,) + _keys(path)
      if full not in moves:
        return leaf
      value = _value(moves[full], restored, method)
      # A copy of its own: params and EMA params are donated separately.
      return jax.device_put(jnp.asarray(value, leaf.dtype), leaf.sharding, may_alias=False)
    return jax.tree_util.tree_map_with_path(one, tree)

  state = dict(state)
  for section in ("params", "other"):
    state[section] = replace(section, state[section])
  if "ema_params" in state:  # EMA parameters start equal to the loaded ones
    state["ema_params"] = replace("params", state["ema_params"])
  _log(init_plan)
  init_plan.source.read = None  # its arrays (an HF checkpoint's) are in the state now
  _hf_source.cache_clear()
  return state


def _log(init_plan: Plan) -> None:
  source, unused = init_plan.source, init_plan.unused
  targets = ", ".join(map(_name, init_plan.target_paths))
  lines = [f"Initialised from {source.where} ({source.summary}, "
           f"{_name(init_plan.source_paths)!r} -> {targets!r}; "
           f"{len(unused)} source parameters unused):"]
  for what, names in {**init_plan.rows, "unused": unused}.items():
    more = f", ... ({len(names) - _SHOWN} more)" if len(names) > _SHOWN else ""
    lines.append(f"  {what:<13} {len(names):>4}  {', '.join(names[:_SHOWN])}{more}".rstrip())
  logging.info("\n".join(lines))


def _flat_by_keys(tree) -> dict[tuple, jax.Array]:
  return {_keys(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
