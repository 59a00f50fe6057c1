"""Logical axis names -> mesh axes, for parameters and activations.

Models name the axes of every parameter ('embed', 'mlp', 'heads', ...) and of
activations at block boundaries ('batch', 'seq', 'act_embed'). One table of
rules, data in the config, maps those names to mesh axes; a rule whose mesh axis
is absent (or of size 1) replicates, and a name no rule mentions is an error (a
typo would otherwise replicate silently).

The table is in force through one mechanism, `use_rules`: the trainer enters it
for the whole run, so the train step, the evaluators and the checks before the
run all trace under the config's rules. Parameters are built abstractly without
a mesh (Flax resolves no names) and placed from their names by
`state_shardings`, so Flax's own rule table is not used.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from big_vision_like.registry import ConfigError

# With the default mesh (fsdp and tensor of size 1) this is plain data
# parallelism; growing 'fsdp' or 'tensor' in config.mesh turns on FSDP / TP.
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    # Vocabulary sizes (259 bytes, 32,000 pieces) rarely divide the tensor
    # axis; the table is still split along 'embed' under FSDP.
    ("vocab", None),
    ("classes", None),
    ("inputs", None),  # Perceiver's input channels (pixels + Fourier features)
    ("layers", None),
    ("seq", None),
    ("act_embed", None),
    ("act_mlp", "tensor"),
    ("act_heads", "tensor"),
)

_current_rules: list[Sequence] = [DEFAULT_RULES]


@contextlib.contextmanager
def use_rules(rules: Sequence):
  """Puts `rules` in force for everything traced inside (`constrain`, `kernel_axes`)."""
  _current_rules.append(tuple((str(k), v) for k, v in rules))
  try:
    yield
  finally:
    _current_rules.pop()


def current_rules() -> tuple:
  return tuple(_current_rules[-1])


def unknown_name(name: str, table: dict, what: str) -> ConfigError:
  return ConfigError(
      f"logical axis {name!r} of {what} has no rule in config.sharding_rules (it names "
      f"{', '.join(map(repr, table))}); add ({name!r}, None) to replicate it or map it "
      f"to a mesh axis")


def logical_to_spec(names: Sequence[str | None], mesh: jax.sharding.Mesh | Any,
                    rules: Sequence | None = None, what: str = "an activation") -> P:
  """PartitionSpec for logical axis `names` on `mesh`; each mesh axis used once."""
  table = dict(rules if rules is not None else _current_rules[-1])
  used: set[str] = set()
  spec = []
  for name in names:
    if name is not None and name not in table:
      raise unknown_name(name, table, what)
    target = table.get(name) if name is not None else None
    axes = (target,) if isinstance(target, str) else tuple(target or ())
    axes = tuple(a for a in axes
                 if a in mesh.axis_names and a not in used and mesh.shape[a] > 1)
    used.update(axes)
    spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return P(*spec)


def check_rules(rules: Sequence, mesh: jax.sharding.Mesh) -> None:
  """Every rule must name mesh axes that exist (a typo would silently replicate)."""
  for rule in rules:
    if len(rule) != 2:
      raise ConfigError(f"config.sharding_rules entry {rule!r} is not a "
                        f"(logical_name, mesh_axes) pair")
    name, target = rule
    axes = (target,) if isinstance(target, str) else tuple(target or ())
    for axis in axes:
      if axis not in mesh.axis_names:
        raise ConfigError(f"config.sharding_rules maps {name!r} to mesh axis {axis!r}, "
                          f"which config.mesh does not have (axes: "
                          f"{', '.join(mesh.axis_names)})")


def batch_axes(mesh: jax.sharding.Mesh | Any, rules=None) -> tuple[str, ...]:
  """The mesh axes (of size > 1) the batch is split over: the data-parallel axes."""
  spec = logical_to_spec(("batch",), mesh, rules)[0]
  return () if spec is None else (spec,) if isinstance(spec, str) else tuple(spec)


def data_parallel_size(mesh: jax.sharding.Mesh, rules=None) -> int:
  return math.prod(mesh.shape[a] for a in batch_axes(mesh, rules))


def check_batch(global_batch: int, mesh: jax.sharding.Mesh, rules, field: str) -> None:
  """The batch must split evenly over the data-parallel axes and the processes,
  and each process must feed a contiguous slice of it (its own devices' rows)."""
  size = data_parallel_size(mesh, rules)
  if global_batch % size:
    axes = " x ".join(f"{a}={mesh.shape[a]}" for a in batch_axes(mesh, rules))
    raise ConfigError(f"{field}={global_batch} is not divisible by the data-parallel "
                      f"size {size} (mesh axes {axes})")
  if global_batch % jax.process_count():
    raise ConfigError(f"{field}={global_batch} is not divisible by the "
                      f"{jax.process_count()} processes")
  if jax.process_count() > 1:
    rows = batch_sharding(mesh, 1, rules).addressable_devices_indices_map((global_batch,))
    starts = sorted({idx[0].start or 0 for idx in rows.values()})
    stops = sorted({idx[0].stop or global_batch for idx in rows.values()})
    local = global_batch // jax.process_count()
    if (stops[-1] - starts[0] != local or starts[0] != jax.process_index() * local):
      raise ConfigError(
          f"config.mesh {dict(mesh.shape)} does not give process {jax.process_index()} "
          f"its own slice of the batch (it feeds rows {starts[0]}:{stops[-1]}); put the "
          f"data-parallel axes first and keep 'tensor' within a process")


def batch_sharding(mesh: jax.sharding.Mesh, ndim: int, rules=None) -> NamedSharding:
  """Leading axis split over the batch axes, the rest replicated."""
  return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1),
                                             mesh, rules))


def state_shardings(abstract_state: Any, mesh: jax.sharding.Mesh, rules=None):
  """The state's structure with a NamedSharding in each Variable, from its axis names.

  A dimension that doesn't divide evenly over its mesh axes is an error naming
  the parameter (XLA would pad it silently, and the layout would be wasteful).
  """

  def sharding(path, variable):
    shape = variable.get_value().shape
    names = variable.get_metadata().get("out_sharding") or ()
    names = tuple(names) + (None,) * (len(shape) - len(names))
    where = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
    spec = logical_to_spec(names, mesh, rules, what=f"parameter {where}")
    for dim, (size, axes) in enumerate(zip(shape, spec)):
      axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
      split = math.prod(mesh.shape[a] for a in axes)
      if size % split:
        raise ConfigError(
            f"parameter {where} {tuple(shape)}: dimension {dim} (size {size}, logical "
            f"axis {names[dim]!r}) is not divisible by mesh axes {axes} of size {split}; "
            f"change config.mesh / config.parallelism or config.sharding_rules")
    return variable.replace(NamedSharding(mesh, spec))

  return jax.tree_util.tree_map_with_path(sharding, abstract_state,
                                          is_leaf=lambda x: isinstance(x, nnx.Variable))


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Sharding hint for an activation, a no-op outside a mesh context."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(names, mesh))


def kernel_axes() -> tuple | None:
  """Mesh axes of (batch, heads) for attention kernels that run per shard, or
  None outside a mesh (see `ops.dot_product_attention`)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return None
  spec = logical_to_spec(("batch", "act_heads"), mesh)
  return tuple(spec) + (None,) * (2 - len(spec))


def put_batch(batch: dict, mesh: jax.sharding.Mesh, rules=None) -> dict:
  """Host-local numpy batch -> global arrays split over the batch axes.

  Each process passes its own slice; JAX assembles the global batch.
  """
  return {k: jax.make_array_from_process_local_data(
      batch_sharding(mesh, np.ndim(v), rules), v) for k, v in batch.items()}
