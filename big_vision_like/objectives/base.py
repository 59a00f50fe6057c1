"""The objective interface: the unit of variation of the one trainer.

An objective is an nnx.Module that owns its models, its loss and any extra
state (an EMA teacher, a centre, a learnable temperature). The trainer takes
gradients with respect to its `nnx.Param`s and carries every other variable
through the step; it never branches on which objective runs.
"""
from __future__ import annotations

import jax
from flax import nnx


class Objective(nnx.Module):
  """Subclasses build their models in __init__(config, ..., rngs) and define `loss`."""

  def loss(self, batch: dict[str, jax.Array], *, rng: jax.Array,
           train: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Returns (scalar loss, metrics); metrics are averaged over the step."""
    raise NotImplementedError

  def after_update(self, step: jax.Array) -> None:
    """Called in the jitted step after the optimiser update (e.g. EMA teachers)."""

  # Evaluators ask for these; an objective provides the ones that make sense.
  def classify(self, images: jax.Array) -> jax.Array:
    raise NotImplementedError(f"objective {type(self).__name__} has no classifier")
