"""Which malloc the process runs on, and why it matters for training on CPU.

XLA's CPU runtime allocates a step's temporaries (1.3 GB for the 32x32 ViT at
batch 128) afresh at every execution. glibc's malloc serves blocks over 32 MB
with a new mmap and unmaps them on free, so the kernel faults in and zeroes
every page again each step: ~360,000 page faults and ~0.4 of 2 cores in the
kernel. tcmalloc (or jemalloc) keeps the freed memory and the faults go away.
A process cannot swap its allocator once started, so `python -m main` restarts
itself once with tcmalloc preloaded when one is installed (`restart_with_tcmalloc`,
before jax is imported), and otherwise logs how to get it (`hint`). README
"CPU speed" has the measured difference.
"""
from __future__ import annotations

import os
import sys

# Set in the restarted process: one restart at most, and the log says why.
RESTARTED = "BVL_RESTARTED_WITH_TCMALLOC"
# "0" keeps `main` on the allocator it was started with.
SWITCH = "BVL_TCMALLOC"

# File names as Debian / Ubuntu / conda ship them.
KNOWN = {"tcmalloc": ("libtcmalloc_minimal.so", "libtcmalloc.so"),
         "jemalloc": ("libjemalloc.so",)}
_SEARCH_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib",
                "/usr/local/lib", os.path.join(sys.prefix, "lib"))


def active(maps_path: str = "/proc/self/maps") -> str:
  """'tcmalloc', 'jemalloc', or 'system' (glibc, or a platform without /proc)."""
  try:
    with open(maps_path) as f:
      maps = f.read()
  except OSError:
    return "system"
  for name, files in KNOWN.items():
    if any(f in maps for f in files):
      return name
  return "system"


def installed(kinds=tuple(KNOWN)) -> str | None:
  """Path of an installed tcmalloc or jemalloc shared library, tcmalloc first."""
  for files in (KNOWN[kind] for kind in kinds):
    for directory in _SEARCH_DIRS:
      try:
        names = sorted(os.listdir(directory))
      except OSError:
        continue
      for name in names:
        if name.startswith(files):
          return os.path.join(directory, name)
  return None


def hint(platform: str) -> str | None:
  """One line for the log when a CPU run is on glibc malloc, else None."""
  if platform != "cpu" or not sys.platform.startswith("linux") or active() != "system":
    return None
  library = installed()
  how = (f"LD_PRELOAD={library} python -m main ..." if library else
         "apt install libtcmalloc-minimal4: python -m main then restarts itself with it")
  return ("Training on CPU with glibc malloc: each step's buffers are page-faulted in "
          f"afresh; tcmalloc made steps 1.2-1.4x faster in our benchmarks ({how}; README 'CPU speed').")


def restart_with_tcmalloc(environ=os.environ, execve=os.execve) -> None:
  """Re-executes this same command (pid, argv and the rest of the environment
  kept) with an installed tcmalloc preloaded, if the process runs on glibc's
  malloc on Linux. Returns when there is nothing to do, the switch is "0", this
  is already the restarted process, or the exec fails (the hint then says what
  to do). Only tcmalloc: jemalloc still faulted 71k pages per step."""
  if (not sys.platform.startswith("linux") or environ.get(SWITCH) == "0"
      or environ.get(RESTARTED) or active() != "system"):
    return
  library = installed(("tcmalloc",))
  if library is None:
    return
  env = dict(environ)
  env["LD_PRELOAD"] = " ".join(filter(None, (library, environ.get("LD_PRELOAD"))))
  env[RESTARTED] = library
  sys.stdout.flush()
  sys.stderr.flush()
  try:
    execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
  except OSError:
    return


def restarted_note() -> str | None:
  """One line for the log of a process that `restart_with_tcmalloc` started."""
  library = os.environ.get(RESTARTED)
  if not library:
    return None
  state = "active" if active() == "tcmalloc" else "NOT loaded (the dynamic loader refused it)"
  return (f"Restarted with {library} preloaded ({state}): XLA's CPU step buffers are "
          f"reused instead of page-faulted in afresh; {SWITCH}=0 to keep glibc malloc.")
