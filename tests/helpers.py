"""Shared test helpers: tiny configs and running `python -m main` in a subprocess."""
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**overrides):
  """The digits default shrunk to a model that trains in seconds."""
  sys.path.insert(0, REPO)
  from configs import default  # pylint: disable=g-import-not-at-top
  config = default.get_config("smoke")
  config.log_every_steps = 1
  for key, value in overrides.items():
    target = config
    *parents, leaf = key.split(".")
    for p in parents:
      target = target[p]
    target[leaf] = value
  return config


def config_from(spec: str):
  """The config of `configs/<file>.py[:arg]`, as main.py would load it."""
  sys.path.insert(0, REPO)
  import importlib  # pylint: disable=g-import-not-at-top
  path, _, arg = spec.partition(":")
  module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
  return module.get_config(arg or None)


def run_main(workdir, *flags, devices=1, config="configs/default.py:smoke", timeout=300,
             env=None):
  """Runs the CLI as a user would; returns the CompletedProcess."""
  full_env = dict(os.environ, **(env or {}))
  full_env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  full_env["JAX_PLATFORMS"] = "cpu"
  return subprocess.run(
      [sys.executable, "-m", "main", f"--config={config}", f"--workdir={workdir}", *flags],
      cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)


def start_main(workdir, *flags, devices=1, config="configs/default.py:smoke"):
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu")
  return subprocess.Popen(
      [sys.executable, "-m", "main", f"--config={config}", f"--workdir={workdir}", *flags],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


def train_losses(workdir):
  return {r["step"]: r["train/loss"] for r in read_metrics(workdir) if "train/loss" in r}


def restore_params(workdir, step=None):
  """Reads a checkpoint's parameters back onto this process's first device, without
  the trainer (whatever devices wrote it)."""
  step, state = restore_state(workdir, step)
  return step, state["params"]


def restore_state(workdir, step=None):
  """The whole train state of a checkpoint, as restore_params reads it."""
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  directory = os.path.join(workdir, "checkpoints")
  step = step if step is not None else max(
      int(d) for d in os.listdir(directory) if d.isdigit())
  path = os.path.join(directory, str(step), "state")
  here = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  with ocp.StandardCheckpointer() as ckptr:
    metadata = ckptr.metadata(path)
    tree = getattr(getattr(metadata, "item_metadata", metadata), "tree", metadata)
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=here), tree)
    state = ckptr.restore(path, target)
  return step, state
