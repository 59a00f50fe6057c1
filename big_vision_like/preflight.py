"""What is checked before a run trains, and when it resumes.

Each check turns a run that would be silently wrong into a one-line error at
start: labels beyond the objective's classes, evaluator images the model can't
take, or a checkpoint whose data position would mean something else in this run
(another batch size, seed, data size, worker or process count). The trainer
calls these; they read a `Trainer` (its label ranges, shapes and schedule) but
change nothing.
"""
from __future__ import annotations

import jax
import numpy as np
from absl import logging

from big_vision_like import data
from big_vision_like.registry import ConfigError


def _first_out_of_range(values: np.ndarray, num_classes: int, allowed) -> int | None:
  """About 1 ms per million mask pixels on one CPU core, overlapping the device step."""
  bad = (values < 0) | (values >= num_classes)
  for value in allowed:
    bad &= values != value
  return int(values[bad].flat[0]) if bad.any() else None


def check_labels(values, ranges_key: str, limits, where: str) -> None:
  """ConfigError naming a value of `values` outside [0, num_classes) (and not allowed)."""
  num_classes, allowed, field = limits
  value = _first_out_of_range(np.asarray(values), num_classes, allowed)
  if value is not None:
    also = f" (or {', '.join(map(str, allowed))})" if allowed else ""
    raise ConfigError(f"{where} has {ranges_key} {value} but {field}={num_classes} allows "
                      f"0..{num_classes - 1}{also}; fix the data or {field}")


def source_labels(trainer, config, train_source, evaluators) -> bool:
  """Labels out of range, found before training where the sources list their labels;
  True if the training labels were all checked here (no need to check each batch)."""
  limits = trainer.label_ranges.get("label")
  if limits is None:
    return False
  sources = [(train_source, f"config.input (split {config.input.split!r})")]
  for name, (evaluator, _) in evaluators.items():
    if config.evals[name].name == "classification" and hasattr(evaluator, "source"):
      sources.append((evaluator.source, f"config.evals.{name}"))
  checked = []
  for source, where in sources:
    labels = getattr(source, "labels", None)
    listed = isinstance(labels, np.ndarray) and labels.size > 0
    if listed:
      check_labels(labels, "label", limits, where)
    checked.append(listed)
  return checked[0]


def evaluator_inputs(config, trainer, train_source, evaluators) -> None:
  """One batch of each evaluator's data through the model's shapes, before training:
  a test split the model can't take fails now, not after the training it would end."""
  def train_shape():
    first = data.train_dataset(config.input, train_source, config.seed)[0]
    image = first.get("image") if isinstance(first, dict) else None
    return tuple(np.shape(image)[1:]) if image is not None else None

  state = trainer.eval_state(trainer.abstract_state)
  for evaluator, _ in evaluators.values():
    if hasattr(evaluator, "check"):
      evaluator.check(trainer.graphdef, state, train_shape)


def run_facts(config, trainer, num_examples: int, step: int) -> dict:
  """What gives a checkpoint's data position its meaning, and where the schedule was."""
  return {"batch_size": int(config.input.batch_size), "seed": int(config.seed),
          "num_examples": int(num_examples), "process_count": jax.process_count(),
          "num_workers": int(config.input.num_workers or 0),
          "total_steps": int(trainer.total_steps), "lr": float(trainer.lr_fn(step))}


def resume_checker(config, trainer, num_examples: int):
  """Refuses a resume that would make the run not what its config says."""
  now = run_facts(config, trainer, num_examples, 0)
  fields = {"batch_size": "config.input.batch_size", "seed": "config.seed",
            "num_examples": "the number of training examples",
            "process_count": "the number of processes",
            "num_workers": "config.input.num_workers"}
  why = {"batch_size": "the saved data position counts batches of the old size",
         "seed": "the data order and random numbers would change mid-run",
         "num_examples": "the saved data position would point at other examples "
                         "(the training split changed)",
         "process_count": "the data positions are saved per process",
         "num_workers": "grain saves one position per worker process (the batches "
                        "are the same, but the saved position can't be carried over)"}

  def check(step: int, saved: dict) -> None:
    for key, field in fields.items():
      if key in saved and saved[key] != now[key]:
        raise ConfigError(f"checkpoint {step} in this workdir was written with {field} "
                          f"{saved[key]}, this run has {now[key]}: {why[key]}; resume "
                          f"with {saved[key]} or use another --workdir")
    if step > trainer.total_steps:
      raise ConfigError(f"checkpoint {step} in this workdir is past config.total_steps="
                        f"{trainer.total_steps}; raise it or use another --workdir")

  return check


def report_resume(config, trainer, ckpt, start: int, saved: dict) -> None:
  logging.info("Resumed from %s at step %d of %d.", ckpt.path(start), start,
               trainer.total_steps)
  before = saved.get("total_steps")
  if before is not None and before != trainer.total_steps:
    logging.warning(
        "config.total_steps is %d, the checkpoint's run had %d: from step %d on, the "
        "lr schedule is that of a %d-step run (lr %.2e there -> %.2e now).",
        trainer.total_steps, before, start, trainer.total_steps, saved.get("lr", float("nan")),
        float(trainer.lr_fn(start)))
