"""A workdir belongs to one run at a time.

Two runs on one workdir would resume from and overwrite each other's
checkpoints and interleave their metrics. The first process of a run takes an
exclusive `flock` on `<workdir>/.lock` (the kernel releases it when the process
dies, even by kill -9, so a killed run never leaves it stuck) and writes who
holds it there, for the refusal message of the next one. Creating the lock file
is also the start-up check that the workdir is writable.

`flock` is advisory and local to a machine (and to NFS mounts that support
it); on object stores there is no lock.
"""
from __future__ import annotations

import datetime
import fcntl
import os
import socket

from absl import logging

from big_vision_like.registry import ConfigError

LOCK_NAME = ".lock"


class StorageError(OSError):
  """A file of the run could not be read or written; its message is one line naming
  the path, and nothing saved before is lost."""


class WriteError(StorageError):
  """A file of the run could not be written (a full disk, lost permissions)."""


class WorkdirLock:
  """Holds `<workdir>/.lock` until `release()` (or the process's death)."""

  def __init__(self, workdir: str):
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

  def release(self) -> None:
    if self._fd is not None:
      os.close(self._fd)  # closing the descriptor drops the flock
      self._fd = None
