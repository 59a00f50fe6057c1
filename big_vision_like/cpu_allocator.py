"""Which malloc the process runs on, and why it matters for training on CPU.

XLA's CPU runtime allocates a step's temporaries (1.3 GB for the 32x32 ViT at
batch 128) afresh at every execution. glibc's malloc serves blocks over 32 MB
with a new mmap and unmaps them on free, so the kernel faults in and zeroes
every page again each step: ~360,000 page faults and ~0.4 of 2 cores in the
kernel. tcmalloc (or jemalloc) keeps the freed memory and the faults go away.
A process cannot swap its allocator once started, so `python -m main` restarts
itself once with tcmalloc preloaded when one is installed and the process is
meant for CPU (`restart_with_tcmalloc`, before jax is imported; a GPU / TPU
process is never re-executed: `accelerator`), and otherwise logs how to get it
(`hint`). docs/cpu_speed.md has the measured difference.
"""
from __future__ import annotations

import importlib.util
import os
import pkgutil
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


# Packages that make a GPU or TPU jax's default platform once installed.
ACCELERATOR_PACKAGES = ("jax_cuda12_plugin", "jax_cuda13_plugin", "libtpu")


def _importable(name: str) -> bool:
  try:
    return importlib.util.find_spec(name) is not None
  except (ImportError, ValueError):
    return False


def accelerator(environ=os.environ) -> str | None:
  """Why this process will run jax on a GPU or TPU, from what is knowable before
  jax is imported, or None for a CPU process: JAX_PLATFORMS (or the older
  JAX_PLATFORM_NAME) naming another platform first; when neither is set, an
  installed jax_cuda12_plugin / jax_cuda13_plugin / libtpu, or any PJRT plugin
  in the jax_plugins namespace (ROCm, ...). JAX_PLATFORMS=cpu is CPU whatever
  is installed."""
  for variable in ("JAX_PLATFORMS", "JAX_PLATFORM_NAME"):
    if value := environ.get(variable, "").strip():
      first = value.split(",")[0].strip().lower()
      return None if first == "cpu" else f"{variable}={value}"
  for name in ACCELERATOR_PACKAGES:
    if _importable(name):
      return f"{name} is installed"
  if _importable("jax_plugins"):
    where = importlib.util.find_spec("jax_plugins").submodule_search_locations or []
    if plugins := sorted(m.name for m in pkgutil.iter_modules(where)):
      return f"jax_plugins.{plugins[0]} is installed"
  return None


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
  if library:
    how = f"LD_PRELOAD={library} python -m main ..."
  elif reason := accelerator():
    how = (f"apt install libtcmalloc-minimal4 and set JAX_PLATFORMS=cpu: python -m main "
           f"restarts itself with it only then, as {reason}")
  else:
    how = "apt install libtcmalloc-minimal4: python -m main then restarts itself with it"
  return ("Training on CPU with glibc malloc: each step's buffers are page-faulted in "
          f"afresh; tcmalloc made steps 1.2-1.4x faster in our benchmarks ({how}; "
          "docs/cpu_speed.md).")


def restart_with_tcmalloc(environ=os.environ, execve=os.execve) -> None:
  """Re-executes this same command (pid, argv and the rest of the environment
  kept) with an installed tcmalloc preloaded, if the process runs on glibc's
  malloc on Linux and is meant for CPU (`accelerator`). Returns when there is
  nothing to do, the switch is "0", this is already the restarted process, the
  process is for a GPU / TPU, or the exec fails (the hint then says what to do).
  Only tcmalloc: jemalloc still faulted 71k pages per step."""
  if (not sys.platform.startswith("linux") or environ.get(SWITCH) == "0"
      or environ.get(RESTARTED) or active() != "system" or accelerator(environ)):
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
