"""pytest runs absltest cases without absl's main: mark absl flags as parsed
(absltest's temp dirs and grain's worker processes read them).

Compiled XLA programs are cached on disk for the session (a fresh directory,
removed at exit): the many `python -m main` subprocesses of the suite compile
the same small programs again and again.
"""
import atexit
import os
import shutil
import tempfile

from absl import flags

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _CACHE = tempfile.mkdtemp(prefix="bvl-jax-cache-")
  atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE  # inherited by subprocesses
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

if not flags.FLAGS.is_parsed():
  flags.FLAGS.mark_as_parsed()
