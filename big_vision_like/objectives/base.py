"""The objective interface: the unit of variation of the one trainer.

An objective is an nnx.Module that owns its models, its loss and any extra
state (an EMA teacher, a centre, a learnable temperature). The trainer takes
gradients with respect to the `nnx.Param`s that `trainable` selects and
carries every other variable through the step; it never branches on which
objective runs.

Every objective has one image backbone (models/backbone.py), reachable the same
way in all of them: `objective.backbone`, at `objective.backbone_path` in the
objective's state and so in a checkpoint's (params and other state merged), so
that transfer and export find it without knowing the objective.

An objective is built as `Objective(config, **config.objective, rngs=...)` and
may read only `config.model` and the sections it lists in `reads` (the trainer
passes it nothing else), so what it depends on is part of its interface.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


# Parameters under a 'teacher' attribute are updated by the objective itself
# (an EMA of the student), so the optimiser never sees them.
TRAINABLE = nnx.All(nnx.Param, nnx.Not(nnx.PathContains("teacher")))


class Objective(nnx.Module):
  """Subclasses build their models in __init__(config, ..., rngs) and define `loss`."""
  trainable = TRAINABLE
  # The run's length, set by the trainer once the objective is built, for objectives
  # with schedules of their own (a teacher's momentum); read it after __init__.
  total_steps: int = 0
  # Where `self.backbone` is in the objective's state (DINO: the teacher's).
  backbone_path: tuple[str, ...] = ("backbone",)
  # Where config.init loads a pre-trained backbone by default (transfer.py).
  init_targets: tuple[tuple[str, ...], ...] = (("backbone",),)
  # Config fields (dotted, e.g. 'input.transforms') besides config.model and
  # config.objective that __init__ reads; the trainer passes it only these.
  reads: tuple[str, ...] = ()

  def loss(self, batch: dict[str, jax.Array], *, rng: jax.Array,
           train: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Returns (scalar loss, metrics); metrics are averaged over the step."""
    raise NotImplementedError

  def label_ranges(self) -> dict[str, tuple[int, tuple[int, ...], str]]:
    """{batch key: (number of classes, other allowed values, the config field that
    sets it)} for the trainer to check on the host: a label >= num_classes would
    otherwise train silently (one_hot of it is all zeros)."""
    return {}

  def after_update(self, step: jax.Array) -> None:
    """Called in the jitted step after the optimiser update (e.g. EMA teachers)."""

  # Evaluators ask for these; an objective provides the ones that make sense.
  def classify(self, images: jax.Array) -> jax.Array:
    raise NotImplementedError(f"objective {type(self).__name__} has no classifier")

  def features(self, images: jax.Array) -> jax.Array:
    """The representation [B, D] that kNN and linear probes read."""
    raise NotImplementedError(f"objective {type(self).__name__} has no image features")

  def embed_image(self, images: jax.Array) -> jax.Array:
    """L2-normalised image embeddings [B, E] in a shared image-text space."""
    raise NotImplementedError(f"objective {type(self).__name__} has no image-text space")

  def embed_text(self, tokens: jax.Array) -> jax.Array:
    """L2-normalised text embeddings [B, E] of int32 tokens [B, L]."""
    raise NotImplementedError(f"objective {type(self).__name__} has no text tower")


def normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def ema_update(teacher: nnx.Module, student: nnx.Module, momentum: jax.Array) -> None:
  """teacher <- momentum * teacher + (1 - momentum) * student, leaf by leaf."""
  student_params = nnx.state(student, nnx.Param)
  teacher_params = nnx.state(teacher, nnx.Param)
  new = jax.tree.map(
      lambda t, s: (momentum * t + (1.0 - momentum) * s).astype(t.dtype),
      teacher_params, student_params)
  nnx.update(teacher, new)


def no_accumulation(config, objective: str, why: str) -> None:
  """Objectives whose loss couples the examples of a batch can't be split into
  microbatches without changing what they compute."""
  if int(config.optim.grad_accum_steps) > 1:
    from big_vision_like.registry import ConfigError  # pylint: disable=g-import-not-at-top
    raise ConfigError(
        f"config.optim.grad_accum_steps={config.optim.grad_accum_steps} with objective "
        f"{objective!r}: its loss uses the whole batch ({why}), so microbatches would "
        f"change it; use a smaller config.input.batch_size or more devices instead")
