"""Metrics to metrics.jsonl, TensorBoard and the console (process 0 only)."""
from __future__ import annotations

import json
import os
from typing import Any

import jax
from absl import logging

from big_vision_like import workdir as workdir_lib
from big_vision_like.registry import first_line
from big_vision_like.workdir import WriteError


class MetricWriter:
  """Appends one JSON object per logged step; on resume, drops records after the restored step.

  The drop rewrites the file atomically (a temporary file renamed over it), so a
  kill at any moment leaves either the old history or the new one, never less.
  In a remote workdir (gs://...) objects cannot be appended to (gcsfs's "a" mode
  silently overwrites), so the writer keeps the history and uploads all of it at
  each write: an object is replaced whole or not at all, the same guarantee.
  """

  def __init__(self, workdir: str, start_step: int):
    self.enabled = jax.process_index() == 0
    self.remote = workdir_lib.is_remote(workdir)
    self._file = workdir_lib.path(workdir, "metrics.jsonl")
    self.path = str(self._file)
    self._lines: list[str] = []  # remote: the history uploaded at each write
    self._tb = None
    self.keys_at_start: set[str] = set()  # what was logged at the resumed step
    if not self.enabled:
      return
    if self._file.exists():
      try:
        lines = self._file.read_text().splitlines(keepends=True)
      except Exception as e:  # pylint: disable=broad-except  # remote: many types
        raise workdir_lib.StorageError(f"cannot read {self.path}: {first_line(e)}") from None
      kept = [line if line.endswith("\n") else line + "\n"
              for line in lines if line.strip() and _step_of(line) <= start_step]
      if kept != lines:
        self._replace(kept)
      self._lines = kept if self.remote else []
      for line in kept:
        if _step_of(line) == start_step:
          self.keys_at_start.update(json.loads(line))
    self._tb = _summary_writer(workdir, start_step)

  def _replace(self, lines: list[str]) -> None:
    if self.remote:  # one upload replaces the object atomically
      self._upload(lines)
      return
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

  def _upload(self, lines: list[str]) -> None:
    try:
      self._file.write_text("".join(lines))
    except Exception as e:  # pylint: disable=broad-except  # remote: many types
      raise WriteError(f"cannot write {self.path}: {first_line(e)}") from None

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
    line = json.dumps(record) + "\n"
    if self.remote:
      self._upload(self._lines + [line])
      self._lines.append(line)
    else:
      try:
        with open(self.path, "a") as f:
          f.write(line)
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


def _summary_writer(workdir: str, start_step: int):
  """tensorboardX's writer of `<workdir>/tensorboard`, or None (with a warning) when
  tensorboardX is missing or cannot write to this kind of remote path."""
  try:
    # pylint: disable=g-import-not-at-top
    from tensorboardX import SummaryWriter
    from tensorboardX import record_writer
  except ImportError:
    logging.warning("tensorboardX is not installed; no TensorBoard events are written.")
    return None
  directory = str(workdir_lib.path(workdir, "tensorboard"))
  scheme = directory.split("://")[0] if workdir_lib.is_remote(directory) else None
  if scheme is not None and scheme not in record_writer.REGISTERED_FACTORIES:
    logging.warning("tensorboardX cannot write to %s:// (only %s); no TensorBoard events "
                    "are written, metrics.jsonl has every metric.", scheme,
                    ", ".join(f"{k}://" for k in sorted(record_writer.REGISTERED_FACTORIES)))
    return None
  try:  # gs:// needs google-cloud-storage (the [gcs] extra), s3:// needs boto3
    return SummaryWriter(directory, purge_step=start_step + 1 if start_step else None)
  except ImportError as e:
    logging.warning("no TensorBoard events are written: %s", first_line(e))
    return None


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
