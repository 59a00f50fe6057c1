"""The trainer's config fields, their defaults, and validation before anything runs.

Experiment configs in configs/ start from `defaults()` and change what they
need. `validate` rejects a field that doesn't exist anywhere (a typo) or a value out
of range (a 0 batch, a negative step count) with a one-line error naming it; fields
of a model, objective, evaluator, source or transform are checked against that
component's signature.
"""
from __future__ import annotations

import difflib
import math
from typing import Any

import ml_collections
from ml_collections import config_dict

from big_vision_like.parallel.mesh import DEFAULT_MESH
from big_vision_like.parallel.sharding import DEFAULT_RULES
from big_vision_like.registry import ConfigError

# Overridable on the command line although unset by default.
OPTIONAL_INT = lambda: config_dict.placeholder(int)  # noqa: E731
OPTIONAL_FLOAT = lambda: config_dict.placeholder(float)  # noqa: E731
OPTIONAL_STR = lambda: config_dict.placeholder(str)  # noqa: E731


def defaults() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_steps = OPTIONAL_INT()  # or total_epochs
  c.total_epochs = OPTIONAL_FLOAT()
  c.log_every_steps = 50
  c.eval_every_steps = 500
  c.eval_at_start = False  # also evaluate the initial state (a fine-tuning's start point)
  c.checkpoint_every_steps = 500
  c.keep_checkpoints = 3
  c.async_checkpoints = True

  c.input = ml_collections.ConfigDict()
  c.input.source = "digits"
  c.input.data_dir = OPTIONAL_STR()
  c.input.split = "train"
  c.input.batch_size = 128  # global batch, over all devices and processes
  c.input.transforms = [{"name": "normalize"}]
  c.input.num_workers = 0  # grain worker processes; 0 reads in this process
  c.input.worker_buffer_size = 2
  c.input.prefetch_threads = 2
  # Text -> ids for the 'tokenize' transform: 'bytes' (no files) or
  # 'sentencepiece' (path = the .model file).
  c.input.tokenizer = ml_collections.ConfigDict({"name": "bytes", "max_len": 32, "path": ""})

  c.model = ml_collections.ConfigDict({"name": "vit"})
  c.objective = ml_collections.ConfigDict({"name": "supervised"})

  c.optim = ml_collections.ConfigDict()
  c.optim.name = "adamw"
  c.optim.lr = 1e-3
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.momentum = 0.9  # sgd and lars
  c.optim.trust_coefficient = 0.001  # lars only
  c.optim.weight_decay = 0.05
  c.optim.wd_exclude = ("pos_embedding", "cls_token", "probe")  # regexes on param paths
  c.optim.clip_norm = 1.0
  c.optim.schedule = "cosine"
  c.optim.warmup_steps = 0
  c.optim.warmup_epochs = OPTIONAL_FLOAT()
  c.optim.min_lr = 1e-6
  c.optim.layer_decay = OPTIONAL_FLOAT()
  c.optim.ema_decay = OPTIONAL_FLOAT()
  c.optim.grad_accum_steps = 1
  # Regexes on parameter paths ('backbone/', 'backbone/blocks/[0-5]/'): frozen ones
  # get no gradient, no optimiser state and no weight decay.
  c.optim.frozen = ()
  # ((regex, factor), ...): learning-rate multipliers, the first match wins
  # (('^backbone/', 0.1),); they multiply layer_decay's.
  c.optim.lr_mult = ()

  # Start from another run's checkpoint at step 0 (transfer.py; a resume ignores it).
  # path: a workdir of this codebase (`DIR:STEP` for another step than its newest)
  # or a HuggingFace / timm checkpoint directory (config.json + *.safetensors);
  # source / target: subtrees ('backbone', 'teacher/backbone'), '' = each objective's
  # backbone; skip: regexes of target parameter paths left at their init.
  c.init = ml_collections.ConfigDict()
  c.init.path = ""
  c.init.source = ""
  c.init.target = ""
  c.init.skip = ()
  # True: config.model takes the checkpoint's architecture (all but num_classes,
  # image_size, drop_path, head_zero_init, dtypes, attention, remat, scan).
  c.init.model = False

  # name -> evaluator config; data fields default to config.input's.
  c.evals = ml_collections.ConfigDict()

  # Device layout: config.parallelism names a preset ('dp', 'fsdp', 'tp',
  # 'fsdp_tp', 'hybrid'; tensor axis of size tensor_parallel), or leave it unset
  # and size the axes of config.mesh yourself.
  c.parallelism = OPTIONAL_STR()
  c.tensor_parallel = 2
  c.mesh = DEFAULT_MESH
  c.sharding_rules = DEFAULT_RULES
  return c


_OPEN_SECTIONS = ("model", "objective", "evals")  # checked by their registries


def _check_known(config: Any, reference: Any, prefix: str) -> None:
  for key in config.keys():
    if key not in reference:
      close = difflib.get_close_matches(key, list(reference.keys()), n=1)
      hint = f"; did you mean {prefix}{close[0]}?" if close else ""
      raise ConfigError(f"{prefix}{key} is not a config field{hint}")
    if prefix == "config." and key in _OPEN_SECTIONS:
      continue
    if isinstance(reference[key], ml_collections.ConfigDict) and key != "input":
      _check_known(config[key], reference[key], f"{prefix}{key}.")


def _check_number(field: str, value: Any, low: float, strict: bool, bound: str) -> None:
  """Raises ConfigError unless `value` is a finite number above `low` (or equal to it if
  not `strict`): a 0 batch or a negative step count would otherwise "run" silently."""
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise ConfigError(f"config.{field}={value!r} must be a number ({bound})")
  if not math.isfinite(value) or value < low or (strict and value == low):
    raise ConfigError(f"config.{field}={value} must be {bound}")


# field: (lowest value, whether it is excluded, what the error says it must be)
_RANGES = {
    "total_steps": (0, False, "positive (or 0 to unset it)"),
    "total_epochs": (0, False, "positive and finite (or 0 to unset it)"),
    "keep_checkpoints": (1, False, "at least 1"),
    "input.batch_size": (0, True, "positive"),
    "optim.lr": (0, True, "positive and finite"),
    "optim.min_lr": (0, False, "zero or more"),
    "optim.warmup_steps": (0, False, "zero or more"),
    "optim.warmup_epochs": (0, False, "zero or more"),
    "optim.grad_accum_steps": (1, False, "at least 1"),
}
_REQUIRED = ("input.batch_size", "optim.lr", "optim.grad_accum_steps")  # the others may be None


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError for the first unknown, out-of-range or inconsistent field."""
  _check_known(config, defaults(), "config.")
  for field, (low, strict, bound) in _RANGES.items():
    section, _, leaf = field.rpartition(".")
    value = (config[section] if section else config).get(leaf)
    if value is not None or field in _REQUIRED:
      _check_number(field, value, low, strict, bound)
  if (not config.total_steps) == (not config.total_epochs):  # 0 unsets one from the CLI
    raise ConfigError(f"set exactly one of config.total_steps ({config.total_steps}) and "
                      f"config.total_epochs ({config.total_epochs}); 0 unsets one, e.g. "
                      f"--config.total_epochs=0 --config.total_steps=100")
  for field in ("log_every_steps", "eval_every_steps", "checkpoint_every_steps"):
    if int(config[field]) <= 0:
      raise ConfigError(f"config.{field}={config[field]} must be positive")
  accum = config.optim.grad_accum_steps
  if config.input.batch_size % accum:
    raise ConfigError(f"config.input.batch_size={config.input.batch_size} is not "
                      f"divisible by config.optim.grad_accum_steps={accum}")
  for name, ev in config.evals.items():
    if "name" not in ev:
      raise ConfigError(f"config.evals.{name}.name is not set (the evaluator type)")
    batch_size = (ev.get("data") or {}).get("batch_size")
    if batch_size is not None:  # unset: config.input's
      _check_number(f"evals.{name}.data.batch_size", batch_size, 0, True, "positive")


def smoke(config: ml_collections.ConfigDict, *, steps: int = 4, batch_size: int = 16,
          **model) -> ml_collections.ConfigDict:
  """The `:smoke` setting every config offers: a tiny model for a few steps.

  A ViT becomes width 16, depth 1; `model` sets other fields (a patch size that
  fits the data, or the tiny architecture of another backbone).
  """
  config.total_epochs = None
  config.total_steps = steps
  config.log_every_steps = max(1, steps // 2)
  config.eval_every_steps = steps
  config.checkpoint_every_steps = max(1, steps // 2)
  config.input.batch_size = batch_size
  config.input.num_workers = 0
  config.optim.grad_accum_steps = min(config.optim.grad_accum_steps, 2)
  if config.model.name == "vit":
    model = {**dict(variant=None, width=16, depth=1, num_heads=2, mlp_dim=32), **model}
  with config.unlocked():
    for key, value in model.items():
      config.model[key] = value
  return config
