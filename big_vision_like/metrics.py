"""Metrics to metrics.jsonl, TensorBoard and the console (process 0 only)."""
from __future__ import annotations

import json
import os
from typing import Any

import jax
from absl import logging

from big_vision_like.workdir import WriteError


class MetricWriter:
  """Appends one JSON object per logged step; on resume, drops records after the restored step.

  The drop rewrites the file atomically (a temporary file renamed over it), so a
  kill at any moment leaves either the old history or the new one, never less.
  """

  def __init__(self, workdir: str, start_step: int):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    self.keys_at_start: set[str] = set()  # what was logged at the resumed step
    if not self.enabled:
      return
    if os.path.exists(self.path):
      with open(self.path) as f:
        lines = list(f)
      kept = [line for line in lines if line.strip() and _step_of(line) <= start_step]
      if kept != lines:
        self._replace(kept)
      for line in kept:
        if _step_of(line) == start_step:
          self.keys_at_start.update(json.loads(line))
    try:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"),
                               purge_step=start_step + 1 if start_step else None)
    except ImportError:
      logging.warning("tensorboardX is not installed; no TensorBoard events are written.")

  def _replace(self, lines: list[str]) -> None:
    tmp = self.path + ".tmp"
    try:
      with open(tmp, "w") as f:
        f.writelines(line if line.endswith("\n") else line + "\n" for line in lines)
        f.flush()
        os.fsync(f.fileno())
      os.replace(tmp, self.path)
    except OSError as e:
      raise WriteError(f"cannot write {tmp}: {e.strerror or e}; {self.path} is "
                       f"unchanged") from None

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
    try:
      with open(self.path, "a") as f:
        f.write(json.dumps(record) + "\n")
    except OSError as e:
      raise WriteError(f"cannot write {self.path}: {e.strerror or e}") from None
    if self._tb is not None:
      for key, value in record.items():
        if key != "step" and isinstance(value, (int, float)):
          self._tb.add_scalar(key, value, step)
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      try:
        self._tb.close()
      except OSError as e:
        logging.error("cannot write TensorBoard events: %s", e)


def _step_of(line: str) -> int:
  try:
    return int(json.loads(line).get("step", 0))
  except (ValueError, AttributeError):
    return 1 << 62  # an unreadable line (a killed write) is dropped


def _plain(value):
  try:
    return float(value)
  except (TypeError, ValueError):
    return str(value)
