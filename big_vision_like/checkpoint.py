"""Orbax checkpoints that always resume.

One checkpoint holds everything needed to continue exactly: the train state
(params, optimiser state, objective state, step, RNG, EMA) and the data
iterator's position. Saves are asynchronous and atomic (Orbax writes to a
temporary directory and renames it), so a run killed mid-save leaves the
previous checkpoint intact. A checkpoint that fails to restore is moved aside
(renamed `<step>.corrupt`, nothing deleted) and the previous one is used.
"""
from __future__ import annotations

import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging

from big_vision_like.registry import ConfigError


def _key(k) -> str:
  return str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))


def _shapes(tree) -> dict[str, tuple]:
  return {"/".join(_key(k) for k in path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


class Checkpointer:

  def __init__(self, directory: str, *, keep: int = 3, asynchronous: bool = True):
    self.directory = os.path.abspath(directory)
    self._options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, cleanup_tmp_directories=True,
        enable_async_checkpointing=asynchronous)
    self._manager = self._open()

  def _open(self) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(self.directory, options=self._options,
                                 item_names=("state", "data"))

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def path(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def save(self, step: int, state: Any, data_iterator) -> None:
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(data_iterator)), force=True)

  def restore(self, abstract_state: Any, data_iterator) -> tuple[Any, int] | None:
    """Restores the newest checkpoint that reads back; None if there is none.

    `abstract_state` carries the target shardings, so a checkpoint written on
    one device layout restores onto another.
    """
    for step in reversed(self.all_steps()):
      try:
        self._check_matches(step, abstract_state)
      except ConfigError:
        raise
      except Exception:  # unreadable metadata: let the restore below report it
        pass
      try:
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=grain.checkpoint.CheckpointRestore(data_iterator)))
        return restored["state"], step
      except Exception as e:  # Orbax / tensorstore raise many error types
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        aside = self.path(step) + ".corrupt"
        logging.error("Checkpoint %s is corrupt or incomplete (%s); moved it to "
                      "%s and trying the previous one.", self.path(step), reason, aside)
        if jax.process_index() == 0:
          os.replace(self.path(step), aside)
        self._manager.close()
        self._manager = self._open()
    return None

  def _check_matches(self, step: int, abstract_state: Any) -> None:
    """A checkpoint of another config is an error naming the first differing parameter
    (not a corrupt file to skip): the user changed the config or the workdir."""
    with ocp.StandardCheckpointer() as reader:
      metadata = reader.metadata(os.path.join(self.path(step), "state"))
    tree = getattr(getattr(metadata, "item_metadata", metadata), "tree", metadata)
    saved = _shapes(tree)
    expected = _shapes(abstract_state)
    for name in sorted(expected, key=lambda n: (not n.startswith("params/"), n)):
      if name not in saved:
        raise ConfigError(f"checkpoint {self.path(step)} was written by a different config: "
                          f"it has no {name}; use another --workdir or the original config")
      if saved[name] != expected[name]:
        raise ConfigError(f"checkpoint {self.path(step)} does not match the config: {name} "
                          f"has shape {saved[name]} there but {expected[name]} in the config; "
                          f"use another --workdir or the original config")

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
