"""A device mesh from the config: named axes, sizes, -1 for 'the rest'."""
from __future__ import annotations

from typing import Sequence

import jax
import numpy as np

from big_vision_like.registry import ConfigError

# Every mesh has these axes (size 1 when unused), so one table of sharding
# rules serves data parallel, FSDP and tensor parallel alike.
DEFAULT_MESH = (("data", -1), ("fsdp", 1), ("tensor", 1))

# config.parallelism: a named layout instead of explicit sizes. `tensor` is
# config.tensor_parallel; 'hybrid' shards parameters within a process (FSDP over
# its local devices) and replicates them across processes (data parallel).
PRESETS = {
    "dp": lambda tensor: (("data", -1), ("fsdp", 1), ("tensor", 1)),
    "fsdp": lambda tensor: (("data", 1), ("fsdp", -1), ("tensor", 1)),
    "tp": lambda tensor: (("data", -1), ("fsdp", 1), ("tensor", tensor)),
    "fsdp_tp": lambda tensor: (("data", 1), ("fsdp", -1), ("tensor", tensor)),
    "hybrid": lambda tensor: (("data", -1), ("fsdp", jax.local_device_count() // tensor),
                              ("tensor", tensor)),
}


def config_axes(config) -> tuple:
  """The mesh axes a config asks for: config.parallelism's preset, else config.mesh."""
  name = config.get("parallelism")
  if not name:
    return tuple(tuple(a) for a in config.mesh)
  if name not in PRESETS:
    raise ConfigError(f"config.parallelism={name!r} is not a preset; valid: "
                      f"{', '.join(PRESETS)} (or leave it unset and size config.mesh)")
  if tuple(tuple(a) for a in config.mesh) != DEFAULT_MESH:
    raise ConfigError(f"set config.parallelism={name!r} or config.mesh="
                      f"{tuple(tuple(a) for a in config.mesh)}, not both")
  tensor = int(config.get("tensor_parallel") or 1)
  if tensor < 1:
    raise ConfigError(f"config.tensor_parallel={tensor} must be >= 1")
  return PRESETS[name](tensor)


def mesh_shape(axes: Sequence[Sequence], num_devices: int) -> tuple[tuple[str, int], ...]:
  """Resolves one -1 size so the sizes multiply to `num_devices`."""
  names = [str(a[0]) for a in axes]
  sizes = [int(a[1]) for a in axes]
  if len(set(names)) != len(names):
    raise ConfigError(f"config.mesh repeats an axis name: {names}")
  if sizes.count(-1) > 1:
    raise ConfigError(f"config.mesh may use -1 for one axis only: {list(axes)}")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if num_devices % known:
      raise ConfigError(f"config.mesh {list(axes)} does not divide {num_devices} devices")
    sizes[sizes.index(-1)] = num_devices // known
  if int(np.prod(sizes)) != num_devices:
    raise ConfigError(f"config.mesh {list(axes)} needs {int(np.prod(sizes))} devices, "
                     f"but {num_devices} are available")
  return tuple(zip(names, sizes))


def make_mesh(axes: Sequence[Sequence] = DEFAULT_MESH,
              devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """Builds a mesh with Auto axis types: sharding constraints are hints to XLA."""
  devices = list(devices if devices is not None else jax.devices())
  shape = mesh_shape(axes, len(devices))
  names = tuple(n for n, _ in shape)
  sizes = tuple(s for _, s in shape)
  return jax.make_mesh(sizes, names, devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(names))
