"""The training command: flags -> config -> `train.train_and_evaluate`.

Three ways to call it, one code path:

  python -m main --config=configs/default.py --workdir=/tmp/run   # repository root
  python -m big_vision_like --config=default --workdir=/tmp/run   # installed, anywhere
  bvl-train --config=vit_cifar10:smoke --workdir=/tmp/run         # installed, anywhere

`--config` takes a file (`path.py[:arg]`, inside the repository or not) or the
name of a bundled config (`big_vision_like/configs/<name>.py`). Any config field
can be overridden, e.g. --config.total_steps=100. Running the same command again
resumes from the newest checkpoint in the workdir, which may be local or remote
(`gs://...`, with the `[gcs]` extra). On Linux with glibc's malloc and tcmalloc
installed, a CPU run restarts itself once with tcmalloc preloaded (1.2-1.4x
faster CPU steps; BVL_TCMALLOC=0 turns that off).

Multi-process: run the same command in every process with
--coordinator_address=HOST:PORT --num_processes=N --process_id=I (or the
JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID variables, or
--distributed on SLURM / Open MPI / Cloud TPU, where JAX detects them).

Importing this module loads only the standard library and absl.flags, and
defines no flag: `main()` installs the early SIGTERM handler and restarts under
tcmalloc before jax is imported, then defines the flags and runs.
"""
import functools
import importlib.machinery
import importlib.util
import os
import re
import signal
import sys
import traceback

from absl import flags  # light: no jax

PREEMPTED_EARLY = ("SIGTERM before training started: nothing to save; run the same "
                   "command to resume.")
BUNDLED_CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


def main(argv=None) -> None:
  """The console script's entry point, and what `python -m main` / `-m big_vision_like` run."""
  signal.signal(signal.SIGTERM, _sigterm_before_training)
  from big_vision_like import cpu_allocator  # pylint: disable=g-import-not-at-top
  cpu_allocator.restart_with_tcmalloc()  # before jax allocates anything
  from absl import app  # pylint: disable=g-import-not-at-top
  app.run(functools.partial(_run, _define_flags()), argv=argv, flags_parser=_parse_flags)


def _sigterm_before_training(signum, frame):
  """Until the trainer takes over SIGTERM (imports, flag parsing), there is nothing to
  save: exit at once, successfully, as a preempted run does."""
  del signum, frame
  print(PREEMPTED_EARLY, file=sys.stderr, flush=True)
  os._exit(0)  # pylint: disable=protected-access


# -- configs ---------------------------------------------------------------------


def bundled_names() -> list[str]:
  """The configs shipped with the package (files here that define get_config)."""
  names = []
  for f in sorted(os.listdir(BUNDLED_CONFIGS)):
    if f.endswith(".py") and not f.startswith("_"):
      with open(os.path.join(BUNDLED_CONFIGS, f)) as text:
        if "def get_config(" in text.read():
          names.append(f[:-3])
  return names


class _ConfigFileError(Exception):
  """A --config that is missing or fails to load (not a ValueError, which absl
  would wrap in its own message)."""


def resolve_config(path: str) -> str:
  """The file a --config value names: the path itself if it exists or has a
  directory part, else the bundled config of that name (`.py` optional)."""
  if not path:
    raise _ConfigFileError("no file given; use --config=file.py[:arg] or a bundled name")
  if os.path.exists(path) or os.sep in path or "/" in path:
    return path
  names = bundled_names()
  name = path.removesuffix(".py")
  if name in names:
    return os.path.join(BUNDLED_CONFIGS, name + ".py")
  raise _ConfigFileError(f"{path} is neither a file nor a bundled config; bundled "
                         f"configs: {', '.join(names)}")


class _ConfigFileParser(flags.ArgumentParser):
  """Loads file.py[:arg] (or a bundled name[:arg]) as ml_collections does, but a
  missing file or an error in it is one line naming the file and line, not a
  traceback (or two chained ones)."""

  def __init__(self, name: str):
    self.name = name

  def flag_type(self):
    return "config object"

  def parse(self, argument):
    path, *arg = argument.split(":", 1)
    path = resolve_config(path)
    if not os.path.exists(path):
      raise _ConfigFileError(f"{path} does not exist")
    if os.path.isdir(path):
      raise _ConfigFileError(f"{path} is a directory, not a config file")
    try:
      name = f"{self.name}_config"
      spec = importlib.util.spec_from_file_location(  # any extension, as ml_collections
          name, path, loader=importlib.machinery.SourceFileLoader(name, path))
      module = importlib.util.module_from_spec(spec)
      sys.modules[name] = module  # as ml_collections' loader does
      spec.loader.exec_module(module)
      if not hasattr(module, "get_config"):
        raise _ConfigFileError(f"{path} defines no get_config()")
      config = module.get_config(*arg)
    except _ConfigFileError:
      raise
    except Exception as e:  # the user's code: name where it failed
      raise _ConfigFileError(_where(e, path)) from e
    if config is None:
      raise _ConfigFileError(f"{path}: get_config() returned None; is a return missing?")
    if callable(getattr(config, "lock", None)):  # overrides may set only existing fields
      config.lock()
    return config


def _where(e: Exception, path: str) -> str:
  """'file:line: Type: message' for the innermost line of the config file (or the
  file with the syntax error) that raised `e`."""
  message = " ".join(str(e.msg if isinstance(e, SyntaxError) else e).split())
  if isinstance(e, SyntaxError) and e.filename:
    where = f"{e.filename}:{e.lineno}" if e.lineno else e.filename
  else:
    lines = [f.lineno for f in traceback.extract_tb(e.__traceback__)
             if os.path.abspath(f.filename) == os.path.abspath(path)]
    where = f"{path}:{lines[-1]}" if lines else path
  return f"{where}: {type(e).__name__}" + (f": {message}" if message else "")


# -- flags -----------------------------------------------------------------------


@functools.cache
def _define_flags() -> dict:
  """The command's absl flags (defined once, on the first call): {name: holder}."""
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  holders = {
      "config": config_flags.DEFINE_config_file(
          "config", None, "Experiment config: a file (path.py[:arg]) or a bundled name "
          "(default, vit_cifar10:smoke, ...)."),
      "workdir": flags.DEFINE_string(
          "workdir", None, "Directory for checkpoints, metrics and logs (local or gs://...)."),
      "coordinator_address": flags.DEFINE_string(
          "coordinator_address", None, "host:port of process 0, for a multi-process run."),
      "num_processes": flags.DEFINE_integer("num_processes", None, "Processes in the run."),
      "process_id": flags.DEFINE_integer("process_id", None, "This process's index."),
      "distributed": flags.DEFINE_bool(
          "distributed", False, "Start the distributed runtime with the cluster's own settings."),
      "heartbeat_timeout_seconds": flags.DEFINE_integer(
          "heartbeat_timeout_seconds", 60,
          "A process silent this long counts as dead; the others stop with an error."),
  }
  # ml_collections' own loader defers a missing file's error to the first access (two
  # chained tracebacks) and puts the traceback of any other into the flag's message.
  flags.FLAGS["config"].parser = _ConfigFileParser("config")
  flags.mark_flags_as_required(["config", "workdir"])
  return holders


def _parse_flags(argv):
  """absl flag parsing, but a bad flag or config override is one line, not a traceback."""
  try:
    return flags.FLAGS(argv)
  except _ConfigFileError as e:
    print(f"error: --config: {e}", file=sys.stderr)
    sys.exit(2)
  except Exception as e:  # config_flags raises AttributeError/KeyError for typos
    message = " ".join(str(e).replace("\\n", " ").strip("'\"").split())
    # ml_collections' KeyError names only the key ("'dtyp' Did you mean ..."):
    # say which override it came from.
    key = re.match(r"""^[\\'"]*(\w+)[\\'"]*( Did you mean "(\w+)")?""", message)
    overrides = [a.split("=")[0][2:] for a in argv if a.startswith("--config.")]
    named = [o for o in overrides if key and o.endswith("." + key.group(1))]
    if named:
      parent = named[0].rsplit(".", 1)[0]
      message = f"--{named[0]}: {parent} has no field {key.group(1)!r}; " + (
          f"did you mean {parent}.{key.group(3)}?" if key.group(3) else
          "an override can only set fields the config file defines")
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


# -- the run ---------------------------------------------------------------------


class _QuietLibraries:
  """Hides Orbax's and grain's INFO chatter so the console shows training progress."""

  def filter(self, record):
    noisy = ("/orbax/" in record.pathname or "/grain/" in record.pathname)
    if noisy and record.exc_info:  # e.g. a failed background save: the run reports
      record.exc_info = record.exc_text = None  # it in one line; no tracebacks
    return record.levelno >= 30 or not noisy


def _quiet_closed_loops(hook):
  """After a failed background save, TensorStore still calls back into Orbax's closed
  asyncio loop and prints "RuntimeError: Event loop is closed" once per array. The
  run has already said what failed, in one line: drop that echo, nothing else."""
  def filtered(*args):
    error = args[0].exc_value if len(args) == 1 else args[1]
    if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
      hook(*args)
  return filtered


def _run(flag, argv):
  del argv
  # pylint: disable=g-import-not-at-top
  import jax
  from absl import logging
  from big_vision_like import train
  from big_vision_like.parallel import distributed
  # pylint: enable=g-import-not-at-top
  logging.get_absl_handler().addFilter(_QuietLibraries())
  sys.excepthook = _quiet_closed_loops(sys.excepthook)
  sys.unraisablehook = _quiet_closed_loops(sys.unraisablehook)
  try:
    if distributed.initialize(flag["coordinator_address"].value, flag["num_processes"].value,
                              flag["process_id"].value, auto=flag["distributed"].value,
                              heartbeat_timeout_seconds=flag["heartbeat_timeout_seconds"].value):
      if jax.process_index() > 0:  # process 0 speaks for the run
        logging.set_verbosity(logging.WARNING)
    config = flag["config"].value
    metrics = train.train_and_evaluate(config, flag["workdir"].value)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # training is over: no early handler
  except train.RUN_ERRORS as e:
    logging.error("%s", e)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  if jax.process_index() == 0:
    for key, value in sorted(metrics.items()):
      print(f"final {key} = {value:.4f}")
