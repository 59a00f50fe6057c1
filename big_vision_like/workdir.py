"""A workdir belongs to one run at a time.

Two runs on one workdir would resume from and overwrite each other's
checkpoints and interleave their metrics. The first process of a run takes an
exclusive `flock` on `<workdir>/.lock` (the kernel releases it when the process
dies, even by kill -9, so a killed run never leaves it stuck) and writes who
holds it there, for the refusal message of the next one. Creating the lock file
is also the start-up check that the workdir is writable.

`flock` is advisory and local to a machine (and to NFS mounts that support
it). A remote workdir (`gs://...`, any `scheme://` that etils.epath serves)
has no lock: object stores have no flock, and a lock object that a killed run
leaves behind would need a staleness rule that can itself be wrong. There the
first process still writes `.lock` (who ran last, and the writability check)
and logs one line saying that nothing stops a second run.

Every file of the run goes through `path()`: etils.epath, the file API Orbax
uses, so one path string means the same place to the metrics, config.json,
the lock and the checkpoints.
"""
from __future__ import annotations

import datetime
import fcntl
import os
import re
import socket

from absl import logging
from etils import epath

from big_vision_like.registry import ConfigError, first_line

LOCK_NAME = ".lock"


def is_remote(workdir) -> bool:
  """A `scheme://...` path (gs://, s3://, ...), not a plain local one."""
  return re.match(r"^[A-Za-z][A-Za-z0-9+.-]+://", os.fspath(workdir)) is not None


def path(workdir, *parts: str) -> epath.Path:
  """`workdir/parts...` as an epath.Path; a local path is made absolute."""
  workdir = os.fspath(workdir)
  base = epath.Path(workdir if is_remote(workdir) else os.path.abspath(workdir))
  return base.joinpath(*parts)


class StorageError(OSError):
  """A file of the run could not be read or written; its message is one line naming
  the path, and nothing saved before is lost."""


class WriteError(StorageError):
  """A file of the run could not be written (a full disk, lost permissions)."""


class WorkdirLock:
  """Holds `<workdir>/.lock` until `release()` (or the process's death)."""

  def __init__(self, workdir: str):
    self._fd = None
    if is_remote(workdir):
      self._note_remote(workdir)
      return
    self.workdir = os.path.abspath(workdir)
    self.path = os.path.join(self.workdir, LOCK_NAME)
    try:
      os.makedirs(self.workdir, exist_ok=True)
      self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
      raise ConfigError(f"--workdir={workdir} is not writable: {e.strerror or e} "
                        f"({e.filename or self.path})") from None
    try:
      fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(self._fd, 4096, 0).decode(errors="replace").strip() or "unknown"
      os.close(self._fd)
      raise ConfigError(f"--workdir={workdir} is in use by another run ({holder}); wait "
                        f"for it to finish, stop it, or use another --workdir") from None
    except OSError as e:  # Lustre without -o flock (ENOSYS), NFS without lockd (ENOLCK)
      logging.warning("cannot lock %s (%s): this filesystem has no flock, so nothing "
                      "stops a second run on this workdir", self.path, e.strerror or e)
    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    try:
      os.ftruncate(self._fd, 0)
      os.pwrite(self._fd, f"pid {os.getpid()} on {socket.gethostname()} since {stamp}\n"
                .encode(), 0)
    except OSError as e:
      os.close(self._fd)
      raise WriteError(f"cannot write {self.path}: {e.strerror or e}") from None

  def _note_remote(self, workdir: str) -> None:
    """No lock: write who runs (checking that the workdir is writable) and say so."""
    self.workdir, self.path = workdir, str(path(workdir, LOCK_NAME))
    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    try:  # no mkdir: object stores have no directories (gcsfs's would create a bucket)
      path(workdir, LOCK_NAME).write_text(
          f"pid {os.getpid()} on {socket.gethostname()} since {stamp}\n")
    except Exception as e:  # pylint: disable=broad-except  # each file system its own types
      raise ConfigError(f"--workdir={workdir} is not writable: {first_line(e)} "
                        f"({self.path})") from None
    logging.warning("--workdir=%s is remote: there is no lock, so nothing stops a second "
                    "run on it; start one run per workdir.", workdir)

  def release(self) -> None:
    if self._fd is not None:
      os.close(self._fd)  # closing the descriptor drops the flock
      self._fd = None
