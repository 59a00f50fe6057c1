"""Orbax checkpoints that always resume, and never resume from garbage.

One checkpoint holds everything needed to continue exactly: the train state
(params, optimiser state, objective state, step, RNG, EMA), the data
iterator's position, and a small JSON `meta` item: a fingerprint of every
state leaf and the facts about the run that give the data position its
meaning (batch size, seed, number of examples, processes).

Saves are asynchronous and atomic (Orbax writes to a temporary directory and
renames it), so a run killed mid-save leaves the previous checkpoint intact; a
save that fails in the background (a full disk) is reported at the next check
with one line naming the checkpoint and the error.

Restoring is all or nothing, newest checkpoint first:
- a checkpoint of another config (a parameter or optimiser entry that one side
  lacks, a shape that differs) or of another run layout (batch size, seed,
  dataset size, processes) is a `ConfigError` naming the difference; nothing
  is moved;
- a checkpoint that fails to read, whose restored bytes don't match the
  fingerprint written with it (flipped bytes in an array file: Orbax and
  TensorStore keep no checksum of the data), or that holds NaN/inf parameters
  is corrupt: it is moved aside (renamed `<step>.corrupt`, nothing deleted),
  the data iterator is put back where it was, and the previous one is tried.

The fingerprint is our own because the storage layers have none to verify:
per leaf, the sum over elements of (bits x an odd multiplier of the element's
index) modulo 2^32, computed on device in one jitted pass. Any single changed
element changes it (odd multipliers are invertible mod 2^32).
"""
from __future__ import annotations

import errno
import re
from typing import Any, Callable

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from big_vision_like import workdir as workdir_lib
from big_vision_like.registry import ConfigError, first_line
from big_vision_like.parallel import distributed
from big_vision_like.workdir import StorageError, WriteError


# Which config fields shape each part of the state, for mismatch messages.
_SECTION_FIELDS = {"params": "config.model / config.objective / config.optim.frozen",
                   "other": "config.objective / config.optim.frozen",
                   "opt_state": "config.optim",
                   "ema_params": "config.optim.ema_decay"}


class CheckpointReadError(StorageError):
  """A checkpoint could not be read for a reason outside its files (memory,
  permissions); it is left in place."""


class CheckpointWriteError(WriteError):
  """A checkpoint could not be written (full disk, lost permissions); the ones
  saved before it are intact."""


def _key(k) -> str:
  return str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))


def _flat(tree) -> dict[str, Any]:
  return {"/".join(_key(k) for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _shapes(tree) -> dict[str, tuple]:
  """{leaf path: (shape, dtype name)}; Orbax would cast another dtype silently."""
  return {name: (tuple(leaf.shape), np.dtype(leaf.dtype).name)
          for name, leaf in _flat(tree).items()}


_NOT_THE_FILES = {errno.ENOMEM, errno.EACCES, errno.EPERM, errno.EAGAIN, errno.ETIMEDOUT,
                  errno.ENOLCK, errno.ESTALE, errno.EMFILE, errno.ENFILE}


def _not_the_files(e: BaseException) -> bool:
  """A restore that failed for a reason outside the checkpoint (memory, permissions,
  a flaky mount): moving it aside would lose a good checkpoint."""
  if isinstance(e, MemoryError) or "RESOURCE_EXHAUSTED" in str(e):
    return True
  return isinstance(e, OSError) and e.errno in _NOT_THE_FILES


def _write_reason(e: BaseException) -> str:
  """TensorStore's long write errors as 'path: reason'."""
  text = str(e)
  found = re.search(r'writing local file "([^"]+)".*?: ([^:\[\]]+?) \[os_error_code', text)
  return f"{found.group(1)}: {found.group(2)}" if found else first_line(e)


def _leaf_fingerprint(x: jax.Array) -> jax.Array:
  bits = jnp.dtype(x.dtype).itemsize * 8
  if x.dtype == jnp.bool_:
    u = x.astype(jnp.uint32)
  elif bits == 64:  # -> [..., 2] uint32
    u = jax.lax.bitcast_convert_type(x, jnp.uint32)
  else:
    u = jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{bits}")).astype(jnp.uint32)
  index = jnp.zeros(u.shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(u.ndim)):  # the row-major index, without a reshape
    index = index + jax.lax.broadcasted_iota(jnp.uint32, u.shape, axis) * jnp.uint32(stride)
    stride = (stride * u.shape[axis]) % (1 << 32)
  odd = index * jnp.uint32(2) + jnp.uint32(1)
  return jnp.sum(u * odd * jnp.uint32(0x9E3779B1), dtype=jnp.uint32)


_fingerprints = jax.jit(lambda tree: jax.tree.map(_leaf_fingerprint, tree))


def _local(tree) -> dict[str, np.ndarray]:
  """Replicated scalars of a jitted result, as numpy (this process's copy)."""
  flat = _flat(tree)
  values = jax.device_get([v.addressable_data(0) for v in flat.values()])
  return dict(zip(flat, values))


def fingerprint(state: Any) -> dict[str, int]:
  """{leaf path: uint32 fingerprint of its bits} of a (possibly sharded) state."""
  return {name: int(v) for name, v in _local(_fingerprints(state)).items()}


_all_finite = jax.jit(lambda tree: jax.tree.map(lambda v: jnp.isfinite(v).all(), tree))


def _nonfinite(state: Any) -> list[str]:
  """Paths of floating-point leaves that hold NaN or inf."""
  floats = {n: v for n, v in _flat(state).items() if jnp.issubdtype(v.dtype, jnp.floating)}
  return [n for n, ok in _local(_all_finite(floats)).items() if not ok]


class Checkpointer:

  def __init__(self, directory: str, *, keep: int = 3, asynchronous: bool = True,
               read_only: bool = False):
    """`read_only`: for tools reading another run's checkpoints while it may be
    writing them (no clean-up of its temporary directories, nothing created).
    `directory` may be remote (gs://...): every path goes through etils.epath,
    as Orbax's own do."""
    self.directory = str(workdir_lib.path(directory))
    self.read_only = read_only
    self._options = ocp.CheckpointManagerOptions(
        max_to_keep=None if read_only else keep, create=not read_only,
        cleanup_tmp_directories=not read_only, save_interval_steps=0 if read_only else 1,
        read_only=read_only, enable_async_checkpointing=asynchronous)
    self._manager = self._open()
    self._saving: int | None = None  # the step of the last save not yet checked
    self._reported = False  # a write error was raised: close() doesn't log it again

  def _open(self) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(self.directory, options=self._options,
                                 item_names=("state", "data", "meta"))

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def path(self, step: int) -> str:
    return str(workdir_lib.path(self.directory, str(step)))

  # -- saving ----------------------------------------------------------------

  def save(self, step: int, state: Any, data_iterator, run: dict | None = None) -> None:
    """Starts writing checkpoint `step` (in the background when asynchronous).

    `run` is stored beside the state and handed back by `restore`, for the
    caller to check that a resume means what it says.
    """
    self.wait()  # Orbax would wait for the previous save anyway; its error is its own
    meta = {"fingerprint": fingerprint(state), "run": dict(run or {}),
            "data_position": data_iterator.get_state()}
    try:
      self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          data=grain.checkpoint.CheckpointSave(data_iterator),
          meta=ocp.args.JsonSave(meta)), force=True)
    except Exception as e:  # a synchronous save, or the start of an async one
      raise self._write_error(step, e) from None
    self._saving = step
    self.check_for_errors()

  def check_for_errors(self) -> None:
    """Raises CheckpointWriteError if a background save has failed."""
    try:
      self._manager.check_for_errors()
    except Exception as e:
      raise self._write_error(self._saving, e) from None

  def _write_error(self, step: int | None, e: BaseException) -> CheckpointWriteError:
    self._reported = True
    kept = [s for s in self.all_steps() if s != step]
    where = self.path(step) if step is not None else self.directory
    newest = f"the newest intact one is {self.path(kept[-1])}" if kept else "none was saved before"
    return CheckpointWriteError(
        f"cannot write checkpoint {where}: {_write_reason(e)}; {newest}. Free space (or "
        f"fix the permissions) and run the same command to resume.")

  # -- restoring -------------------------------------------------------------

  def restore(self, abstract_state: Any, data_iterator,
              check_run: Callable[[int, dict], None] | None = None):
    """(state, step, run) from the newest checkpoint that reads back intact, or None.

    `abstract_state` carries the target shardings, so a checkpoint written on
    one device layout restores onto another. `check_run(step, run)` may raise
    ConfigError to refuse a checkpoint whose run facts differ. The data
    iterator is moved only when the whole checkpoint restores.
    """
    if self.read_only:
      raise ValueError("restore() may move checkpoints aside; use read() when read_only")
    fresh = data_iterator.get_state()
    for step in reversed(self.all_steps()):
      try:
        self._check_matches(step, abstract_state)
      except ConfigError:
        raise
      except Exception:  # unreadable metadata: let the restore below report it
        pass
      failure = None
      try:
        meta = self._read_meta(step)
        if check_run is not None:
          check_run(step, meta.get("run", {}))
        restored = self._read_state(step, abstract_state, meta)
        self._manager.restore(step, args=ocp.args.Composite(
            data=grain.checkpoint.CheckpointRestore(data_iterator)))
        self._verify_position(data_iterator, meta)
      except ConfigError:
        raise
      except Exception as e:  # Orbax / tensorstore raise many error types
        if _not_the_files(e):
          data_iterator.set_state(fresh)
          raise CheckpointReadError(
              f"cannot read checkpoint {self.path(step)}: {first_line(e)}; nothing was "
              f"moved: fix the cause and run the same command again") from None
        failure = first_line(e)
      # Every process must take the same checkpoint (each reads its own data position).
      if not distributed.any_process(failure is not None):
        return restored, step, meta.get("run", {})
      data_iterator.set_state(fresh)
      self._move_aside(step, failure or "it failed to restore on another process")
    data_iterator.set_state(fresh)
    return None

  def read(self, step: int, abstract_state: Any) -> Any:
    """The verified state of checkpoint `step` alone (no data position), for tools
    that read a run; a checkpoint that fails to verify is a ConfigError, left in place."""
    self._check_matches(step, abstract_state)
    try:
      return self._read_state(step, abstract_state, self._read_meta(step))
    except Exception as e:  # pylint: disable=broad-except
      raise ConfigError(f"checkpoint {self.path(step)} is corrupt or incomplete: "
                        f"{first_line(e)}") from None

  def read_partial(self, step: int, abstract_subset: dict) -> dict:
    """Only the leaves of `abstract_subset` (nested dicts of ShapeDtypeStructs with
    shardings, a subset of the state's tree) from checkpoint `step`, verified against
    their fingerprints: Orbax's partial restore reads nothing else (no optimiser state).
    For transfer (`transfer.py`); a checkpoint that fails to verify is a ConfigError."""
    path = str(workdir_lib.path(self.path(step), "state"))
    try:
      with ocp.PyTreeCheckpointer() as reader:
        restored = reader.restore(path, args=ocp.args.PyTreeRestore(
            item=abstract_subset, partial_restore=True,
            restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_subset)))
      self._verify(restored, self._read_meta(step))  # the subset's leaves only
    except Exception as e:  # pylint: disable=broad-except
      raise ConfigError(f"checkpoint {self.path(step)} is corrupt or incomplete: "
                        f"{first_line(e)}") from None
    return restored

  def _read_state(self, step: int, abstract_state: Any, meta: dict) -> Any:
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state)))["state"]
    self._verify(restored, meta)
    return restored

  @staticmethod
  def _verify_position(data_iterator, meta: dict) -> None:
    """The data position restored equals the one saved (process 0's, in the meta)."""
    saved = meta.get("data_position")
    if saved is not None and jax.process_index() == 0:
      if data_iterator.get_state() != saved:
        raise ValueError(f"the data position read back is {data_iterator.get_state()}, "
                         f"but {saved} was written")

  def _read_meta(self, step: int) -> dict:
    if not workdir_lib.path(self.path(step), "meta").is_dir():
      logging.warning("Checkpoint %s has no fingerprint (written by an older version); "
                      "its contents cannot be verified.", self.path(step))
      return {}
    return self._manager.restore(step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore()))["meta"] or {}

  def _verify(self, restored: Any, meta: dict) -> None:
    expected = meta.get("fingerprint")
    if expected is not None:
      actual = fingerprint(restored)
      changed = sorted(n for n in actual if expected.get(n) != actual[n])
      if changed:
        raise ValueError(f"{len(changed)} arrays differ from what was written "
                         f"(first: {changed[0]}): the files were changed after the save")
    bad = _nonfinite(restored)
    if bad:
      raise ValueError(f"{len(bad)} arrays hold NaN/inf (first: {bad[0]})")

  def _move_aside(self, step: int, reason: str) -> None:
    aside, n = self.path(step) + ".corrupt", 1
    while workdir_lib.path(aside).exists():  # an earlier fault of a checkpoint with this step
      n += 1
      aside = f"{self.path(step)}.corrupt{n}"
    logging.error("Checkpoint %s is corrupt or incomplete (%s); moved it to %s and "
                  "trying the previous one.", self.path(step), reason, aside)
    if jax.process_index() == 0:  # remote: a copy of each object, then a delete
      workdir_lib.path(self.path(step)).rename(aside)
    self._manager.close()
    self._manager = self._open()

  def _check_matches(self, step: int, abstract_state: Any) -> None:
    """A checkpoint of another config is an error naming the first difference (not a
    corrupt file to skip): the user changed the config or the workdir."""
    with ocp.StandardCheckpointer() as reader:
      # A str: given an epath.Path, later reads in this process saw the bytes as they
      # were before a change on disk (test_faults' flipped bit read back unflipped).
      metadata = reader.metadata(str(workdir_lib.path(self.path(step), "state")))
    tree = getattr(getattr(metadata, "item_metadata", metadata), "tree", metadata)
    saved = _shapes(tree)
    expected = _shapes(abstract_state)
    order = lambda n: (not n.startswith("params/"), n)  # noqa: E731
    fix = "use another --workdir or the original config"
    missing = sorted(set(expected) - set(saved), key=order)
    extra = sorted(set(saved) - set(expected), key=order)
    if missing or extra:
      parts = []
      if extra:
        parts.append(f"it has {len(extra)} entries this config lacks (first: {extra[0]})")
      if missing:
        parts.append(f"it lacks {len(missing)} entries this config has (first: {missing[0]})")
      fields = sorted({_SECTION_FIELDS.get(n.split("/")[0], "config") for n in missing + extra})
      raise ConfigError(f"checkpoint {self.path(step)} was written by a different config: "
                        f"{'; '.join(parts)} (see {', '.join(fields)}); {fix}")
    for name in sorted(expected, key=order):
      if saved[name] != expected[name]:
        (shape, dtype), (want_shape, want_dtype) = saved[name], expected[name]
        what = (f"shape {shape} there but {want_shape}" if shape != want_shape else
                f"dtype {dtype} there but {want_dtype}")
        raise ConfigError(f"checkpoint {self.path(step)} does not match the config: {name} "
                          f"has {what} in the config; {fix}")

  def wait(self) -> None:
    """Waits for the pending save; raises CheckpointWriteError if it failed."""
    try:
      self._manager.wait_until_finished()
    except Exception as e:
      raise self._write_error(self._saving, e) from None
    self.check_for_errors()

  def close(self) -> None:
    """Waits for a pending save; a failure was (or is now) reported once, not re-raised."""
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      if not self._reported:
        logging.error("%s", self._write_error(self._saving, e))
    try:
      self._manager.close()
    except Exception as e:  # pylint: disable=broad-except
      logging.error("closing the checkpoint manager: %s", first_line(e))
