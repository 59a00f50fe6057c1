"""Logical axis names -> mesh axes, for parameters and activations.

Models name the axes of every parameter ('embed', 'mlp', 'heads', ...) and of
activations at block boundaries ('batch', 'seq', 'act_embed'). One table of
rules, data in the config, maps those names to mesh axes; a name without a
rule, or whose mesh axis is absent, is replicated.
"""
from __future__ import annotations

import contextlib
from typing import Any, Sequence

import jax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

# With the default mesh (fsdp and tensor of size 1) this is plain data
# parallelism; growing 'fsdp' or 'tensor' in config.mesh turns on FSDP / TP.
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("classes", None),
    ("layers", None),
    ("seq", None),
    ("act_embed", None),
    ("act_mlp", "tensor"),
    ("act_heads", "tensor"),
)

_current_rules: list[Sequence] = [DEFAULT_RULES]


@contextlib.contextmanager
def axis_rules(rules: Sequence):
  """Sets the rules used by `constrain` while tracing a model."""
  _current_rules.append(tuple((str(k), v) for k, v in rules))
  try:
    yield
  finally:
    _current_rules.pop()


def logical_to_spec(names: Sequence[str | None], mesh: jax.sharding.Mesh | Any,
                    rules: Sequence | None = None) -> P:
  """PartitionSpec for logical axis `names` on `mesh`; each mesh axis used once."""
  table = dict(rules if rules is not None else _current_rules[-1])
  used: set[str] = set()
  spec = []
  for name in names:
    target = table.get(name) if name is not None else None
    axes = (target,) if isinstance(target, str) else tuple(target or ())
    axes = tuple(a for a in axes
                 if a in mesh.axis_names and a not in used and mesh.shape[a] > 1)
    used.update(axes)
    spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return P(*spec)


def batch_sharding(mesh: jax.sharding.Mesh, ndim: int, rules=None) -> NamedSharding:
  """Leading axis split over the batch axes, the rest replicated."""
  return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1),
                                             mesh, rules))


def state_shardings(abstract_state: Any, mesh: jax.sharding.Mesh, rules=None):
  """The state's structure with a NamedSharding in each Variable, from its axis names."""

  def sharding(variable):
    names = variable.get_metadata().get("out_sharding") or ()
    names = tuple(names) + (None,) * (variable.get_value().ndim - len(names))
    return variable.replace(NamedSharding(mesh, logical_to_spec(names, mesh, rules)))

  return jax.tree.map(sharding, abstract_state,
                      is_leaf=lambda x: isinstance(x, nnx.Variable))


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Sharding hint for an activation, a no-op outside a mesh context."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(names, mesh))


def put_batch(batch: dict, mesh: jax.sharding.Mesh, rules=None) -> dict:
  """Host-local numpy batch -> global arrays split over the batch axes.

  Each process passes its own slice; JAX assembles the global batch.
  """
  return {k: jax.make_array_from_process_local_data(
      batch_sharding(mesh, v.ndim, rules), v) for k, v in batch.items()}


def flax_rules(mesh: jax.sharding.Mesh, rules=None) -> tuple:
  """The rules resolved for `mesh`, in the form `nnx.logical_axis_rules` takes.

  Flax consults them when it attaches shardings to abstract variables
  (`nnx.eval_shape` under a mesh) or shards them eagerly.
  """
  table = rules if rules is not None else _current_rules[-1]
  resolved = []
  for name, _ in table:
    spec = logical_to_spec((name,), mesh, table)
    resolved.append((name, spec[0] if len(spec) else None))
  return tuple(resolved)
