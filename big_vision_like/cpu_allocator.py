"""Which malloc the process runs on, and why it matters for training on CPU.

XLA's CPU runtime allocates a step's temporaries (1.3 GB for the 32x32 ViT at
batch 128) afresh at every execution. glibc's malloc serves blocks over 32 MB
with a new mmap and unmaps them on free, so the kernel faults in and zeroes
every page again each step: ~360,000 page faults and ~0.4 of 2 cores in the
kernel. tcmalloc (or jemalloc) keeps the freed memory and the faults go away.
The process cannot swap its allocator once started, so `main` only says so
(`hint`); README "CPU speed" has the measured difference and the command.
"""
from __future__ import annotations

import os
import sys

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


def installed() -> str | None:
  """Path of an installed tcmalloc or jemalloc shared library, tcmalloc first."""
  for files in KNOWN.values():
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
         "apt install libtcmalloc-minimal4, then LD_PRELOAD=<its .so> python -m main ...")
  return ("Training on CPU with glibc malloc: each step's buffers are page-faulted in "
          f"afresh; tcmalloc made steps 1.2-1.4x faster in our benchmarks ({how}; README 'CPU speed').")
