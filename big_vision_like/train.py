"""The one training loop, for every objective.

config -> mesh -> data pipeline and objective (which builds its models) ->
jitted train step -> metrics, evaluators, checkpoints. The objective is split
once into a graph definition and its state; the step is a pure function of the
state, jitted with explicit shardings and buffer donation. Running the same
command again resumes from the newest good checkpoint (`checkpoint.py`); what is
checked before training and at a resume is in `preflight.py`.
"""
from __future__ import annotations

import math
import signal
import time
from typing import Any


import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx

from big_vision_like import checkpoint as checkpoint_lib
from big_vision_like import configuration, cpu_allocator, data, optim, preflight, transfer
from big_vision_like import evaluators as evaluators_lib
from big_vision_like.evaluators import EVALUATORS
from big_vision_like.metrics import MetricWriter
from big_vision_like.objectives import OBJECTIVES
from big_vision_like.parallel import distributed
from big_vision_like.parallel import mesh as mesh_lib
from big_vision_like.parallel import sharding
from big_vision_like.registry import ConfigError, check_kwargs, first_line
from big_vision_like import workdir as workdir_lib
from big_vision_like.workdir import StorageError, WorkdirLock, WriteError


class NonFiniteLossError(FloatingPointError):
  """The loss or gradients became NaN/inf; the run stops without saving them."""


# An empty mesh: abstract builds under it attach no shardings.
_NO_MESH = jax.sharding.AbstractMesh((), ())

# What stops a run with a one-line message (main prints it, exit status 1).
RUN_ERRORS = (ConfigError, NonFiniteLossError, StorageError)


# ----------------------------------------------------------------------------
# Building the pieces
# ----------------------------------------------------------------------------

def build_objective(config, seed: int, total_steps: int | None = None):
  """The objective named by config.objective (it builds its own models), told the
  run's length (`Objective.total_steps`, for schedules of its own)."""
  kwargs = dict(config.objective)
  name = kwargs.pop("name")
  view = _objective_view(config, getattr(OBJECTIVES.get(name), "reads", ()))
  objective = OBJECTIVES.build(name, kwargs, field="config.objective", config=view,
                               rngs=nnx.Rngs(seed))
  objective.total_steps = int(total_steps or resolve_steps(config, 1))
  return objective


def _objective_view(config, reads: tuple[str, ...]) -> ml_collections.ConfigDict:
  """config.model, config.objective and the fields the objective declares in
  `Objective.reads`: all it may see of the config."""
  view = {"model": config.model.to_dict(), "objective": config.objective.to_dict()}
  for dotted in reads:
    *sections, field = dotted.split(".")
    source, target = config, view
    for section in sections:
      source, target = source[section], target.setdefault(section, {})
    value = source[field]
    target[field] = value.to_dict() if hasattr(value, "to_dict") else value
  return ml_collections.ConfigDict(view)


def _split(objective, frozen=None):
  """graphdef, trainable params, and everything else (objective state, and the
  parameters the `frozen` filter takes out: no gradient, no optimiser state)."""
  trainable = objective.trainable
  if frozen is not None:
    trainable = nnx.All(trainable, nnx.Not(frozen))
  return nnx.split(objective, trainable, ...)


def frozen_of(config):
  """The nnx filter of config.optim.frozen, or None."""
  patterns = tuple(config.optim.get("frozen", ()) or ())
  return optim.frozen_filter(patterns) if patterns else None


def check_frozen(config, abstract) -> None:
  """Each config.optim.frozen regex matches a trainable parameter of `abstract`."""
  if config.optim.get("frozen"):
    every = nnx.state(abstract, abstract.trainable)
    optim.check_patterns(config.optim.frozen, optim.param_names(every), "config.optim.frozen")


def _check_before_writing(config, workdir: str):
  """Refuses what the config alone shows is wrong before the workdir is touched
  (frozen regexes, config.init); returns the init plan of a run that starts now."""
  if not (config.optim.get("frozen") or config.init.path):
    return None
  abstract = transfer._abstract_objective(config)  # pylint: disable=protected-access
  check_frozen(config, abstract)
  if config.init.path and not transfer.has_checkpoint(workdir):
    return transfer.plan(config, abstract)
  return None


def _count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def resolve_steps(config, steps_per_epoch: int) -> int:
  if config.total_steps:
    return int(config.total_steps)
  return max(1, int(math.ceil(config.total_epochs * steps_per_epoch)))


def build_evaluators(config, mesh) -> dict[str, Any]:
  """Evaluators from config.evals: `data` holds an evaluator's data settings
  (merged with config.input's by `evaluators.data_config`), every other field
  but `name` and `every_steps` is an argument of the evaluator."""
  evaluators = {}
  for name, ev in config.evals.items():
    ev = dict(ev)
    field = f"config.evals.{name}"
    kind = ev.pop("name")
    if kind not in EVALUATORS:
      raise ConfigError(f"{field}.name={kind!r} is not a known evaluator; "
                        f"valid names: {', '.join(EVALUATORS.names())}")
    every = ev.pop("every_steps", None) or config.eval_every_steps
    data_config = evaluators_lib.data_config(config.input, ev.pop("data", None), f"{field}.data")
    for key in ev:
      if key in data.pipeline.PIPELINE_FIELDS:
        raise ConfigError(f"{field}.{key} is a data setting: set {field}.data.{key} "
                          f"(an evaluator's data settings live in its 'data' sub-config)")
    factory = EVALUATORS.get(kind)
    check_kwargs(factory, ev, field, what=f"evaluator {kind!r}",
                 skip=("data_config", "mesh", "field"))
    sharding.check_batch(data_config.batch_size, mesh, config.sharding_rules,
                         f"{field}.data.batch_size")
    evaluators[name] = (factory(data_config, mesh=mesh, field=field, **ev), int(every))
  return evaluators


class Trainer:
  """Holds the compiled step and the sharded state layout for one config."""

  def __init__(self, config, mesh, steps_per_epoch: int):
    self.config, self.mesh, self.steps_per_epoch = config, mesh, steps_per_epoch
    self.rules = tuple(tuple(r) for r in config.sharding_rules)
    self.total_steps = resolve_steps(config, steps_per_epoch)
    self.accum = int(config.optim.grad_accum_steps)
    sharding.check_rules(self.rules, mesh)
    sharding.check_batch(config.input.batch_size, mesh, self.rules, "config.input.batch_size")
    if self.accum > 1:
      sharding.check_batch(config.input.batch_size // self.accum, mesh, self.rules,
                           "config.input.batch_size / config.optim.grad_accum_steps")

    # Shape-first: build the objective abstractly (no mesh: Flax resolves no
    # axis names), derive shardings from the logical axis names with the config's
    # rules, then create the real state directly sharded.
    with jax.sharding.use_abstract_mesh(_NO_MESH), nnx.use_eager_sharding(False):
      abstract = nnx.eval_shape(
          lambda: build_objective(config, config.seed, self.total_steps))
    self.abstract_objective = abstract  # shapes only; transfer maps onto it
    self.frozen = frozen_of(config)
    check_frozen(config, abstract)
    self.graphdef, abs_params, abs_other = self._split(abstract)
    self._log_trainable(abstract, abs_params)
    self.label_ranges = abstract.label_ranges()
    self.tx, self.lr_fn = optim.build(config.optim, abs_params, self.total_steps,
                                      steps_per_epoch, nnx.state(abstract, abstract.trainable))
    self.ema_decay = config.optim.ema_decay

    abs_state = jax.eval_shape(self._init_state)
    param_shardings = sharding.state_shardings(abs_params, mesh, self.rules)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    self.state_shardings = {
        "step": replicated, "rng": replicated, "nonfinite_step": replicated,
        "params": param_shardings,
        "other": sharding.state_shardings(abs_other, mesh, self.rules),
        "opt_state": optax.tree_map_params(
            self.tx, lambda _, s: s, abs_state["opt_state"], param_shardings,
            transform_non_params=lambda _: replicated,
            is_leaf=lambda x: isinstance(x, nnx.Variable)),
    }
    if self.ema_decay:
      self.state_shardings["ema_params"] = param_shardings
    self.abstract_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        abs_state, self.state_shardings)
    self.init_state = jax.jit(self._init_state, out_shardings=self.state_shardings)
    self.train_step = jax.jit(self._train_step, donate_argnums=(0,),
                              out_shardings=(self.state_shardings, replicated))

  def _split(self, objective):
    return _split(objective, self.frozen)

  def _log_trainable(self, abstract, params) -> None:
    total, trained = _count(nnx.state(abstract, nnx.Param)), _count(params)
    frozen = (f"; frozen by config.optim.frozen: "
              f"{_count(nnx.state(abstract, nnx.All(abstract.trainable, self.frozen))):,}"
              if self.frozen is not None else "")
    logging.info("Training %s of %s parameters%s.", f"{trained:,}", f"{total:,}", frozen)

  # -- pure functions, jitted above -----------------------------------------

  def _init_state(self):
    with nnx.use_eager_sharding(False):
      objective = build_objective(self.config, self.config.seed, self.total_steps)
    _, params, other = self._split(objective)
    state = {
        "step": jnp.zeros((), jnp.int32),
        "rng": jax.random.key_data(jax.random.key(self.config.seed)),
        "nonfinite_step": jnp.full((), -1, jnp.int32),
        "params": params, "other": other, "opt_state": self.tx.init(params),
    }
    if self.ema_decay:
      state["ema_params"] = params
    return state

  def _loss_and_grads(self, params, other, batch, rng):
    def loss_fn(params, other):
      # copy=True: fresh Variables at this trace level, so the objective may
      # update its state (a DINO centre) inside the differentiated function.
      objective = nnx.merge(self.graphdef, params, other, copy=True)
      loss, metrics = objective.loss(batch, rng=rng, train=True)
      _, _, other = self._split(objective)
      return loss, (metrics, other)

    (loss, (metrics, other)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, other)
    return loss, metrics, other, grads

  def _train_step(self, state, batch):
    with sharding.use_rules(self.rules):  # also when a test calls it outside `run`
      return self._train_step_inner(state, batch)

  def _train_step_inner(self, state, batch):
    step = state["step"]
    rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), step)
    params, other = state["params"], state["other"]
    if self.accum == 1:
      loss, metrics, other, grads = self._loss_and_grads(params, other, batch, rng)
    else:
      # Microbatch j takes examples j, j + accum, ... so each stays spread over
      # every device; peak memory is that of one microbatch.
      def to_micro(x):
        x = x.reshape((x.shape[0] // self.accum, self.accum) + x.shape[1:]).swapaxes(0, 1)
        return sharding.constrain(x, (None, "batch") + (None,) * (x.ndim - 2))

      micro = jax.tree.map(to_micro, batch)

      def body(carry, inputs):
        grads_sum, loss_sum, metrics_sum, other = carry
        mb, i = inputs
        loss, metrics, other, grads = self._loss_and_grads(
            params, other, mb, jax.random.fold_in(rng, i))
        add = lambda a, b: jax.tree.map(jnp.add, a, b)
        return (add(grads_sum, grads), loss_sum + loss, add(metrics_sum, metrics),
                other), None

      _, metric_shapes, _, grad_shapes = jax.eval_shape(
          self._loss_and_grads, params, other,
          jax.tree.map(lambda x: x[0], micro), rng)
      zeros = lambda t: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), t)
      init = (zeros(grad_shapes), jnp.zeros((), jnp.float32), zeros(metric_shapes), other)
      (grads, loss, metrics, other), _ = jax.lax.scan(
          body, init, (micro, jnp.arange(self.accum)))
      scale = 1.0 / self.accum
      grads = jax.tree.map(lambda g: g * scale, grads)
      loss, metrics = loss * scale, jax.tree.map(lambda m: m * scale, metrics)

    grad_norm = optax.global_norm(grads)
    updates, opt_state = self.tx.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
    # A non-finite loss leaves params and optimiser state untouched and records
    # the step; the host stops the run at its next check.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    new_params, opt_state = keep(new_params, params), keep(opt_state, state["opt_state"])

    objective = nnx.merge(self.graphdef, new_params, other)
    objective.after_update(step)
    _, new_params, other = self._split(objective)

    new_state = dict(state, step=step + 1, params=new_params, other=other,
                     opt_state=opt_state,
                     nonfinite_step=jnp.where((state["nonfinite_step"] < 0) & ~finite,
                                              step, state["nonfinite_step"]))
    if self.ema_decay:
      new_state["ema_params"] = optax.incremental_update(
          new_params, state["ema_params"], 1.0 - self.ema_decay)
    out = {"train/loss": loss, "lr": self.lr_fn(step), "grad_norm": grad_norm}
    out.update({f"train/{k}": v for k, v in metrics.items() if k != "loss"})
    return new_state, out

  def eval_state(self, state):
    """(params, other) that evaluators merge with the graphdef; EMA params if kept."""
    return (state.get("ema_params", state["params"]), state["other"])


# ----------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------

class _Preempted(BaseException):
  """SIGTERM before the loop started: nothing to save. A BaseException, so that no
  `except Exception` on the way (a checkpoint restore) mistakes it for a fault."""


class _Terminate:
  """SIGTERM before the loop raises _Preempted (nothing to save yet); in the loop it
  sets a flag, and the loop saves a checkpoint and exits cleanly."""

  def __init__(self):
    self.requested = False
    self.in_loop = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread: leave signals alone
      self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True
    if not self.in_loop:
      raise _Preempted()

  def start_loop(self) -> None:
    self.in_loop = True
    if self.requested:
      raise _Preempted()

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _fmt_time(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def _save_config(config, workdir: str) -> None:
  """config.json, replaced whole: renamed over locally, one upload remotely."""
  if jax.process_index() == 0:
    path = workdir_lib.path(workdir, "config.json")
    text = config.to_json_best_effort(indent=2, sort_keys=True)
    try:
      if workdir_lib.is_remote(workdir):
        path.write_text(text)
      else:
        path.with_name("config.json.tmp").write_text(text)
        path.with_name("config.json.tmp").replace(path)
    except Exception as e:  # pylint: disable=broad-except  # remote file systems: many types
      reason = e.strerror if isinstance(e, OSError) and e.strerror else first_line(e)
      raise WriteError(f"cannot write {path}: {reason}") from None


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains (or resumes) the run in `workdir`; returns the final evaluation metrics."""
  with _Terminate() as term:
    try:
      return _train_and_evaluate(config, workdir, term)
    except _Preempted:
      logging.warning("SIGTERM before training started: nothing to save; run the same "
                      "command to resume.")
      return {}


def _train_and_evaluate(config, workdir: str, term: _Terminate) -> dict[str, float]:
  transfer.resolve_model(config, workdir)  # config.init.model: the checkpoint's architecture
  configuration.validate(config)
  init_plan = _check_before_writing(config, workdir)
  lock, error = None, None
  if jax.process_index() == 0:
    try:
      lock = WorkdirLock(workdir)
    except RUN_ERRORS as e:
      error = e
  if distributed.any_process(error is not None):  # the other processes stop too
    raise error or ConfigError(f"process 0 could not claim --workdir={workdir} (its log "
                               f"says why)")
  try:
    return _run(config, workdir, term, init_plan)
  finally:
    if lock is not None:
      lock.release()


def _run(config, workdir: str, term: _Terminate, init_plan=None) -> dict[str, float]:
  mesh = mesh_lib.make_mesh(mesh_lib.config_axes(config))
  logging.info("Mesh %s over %d devices (%s), %d process(es).", dict(mesh.shape),
               jax.device_count(), jax.devices()[0].platform, jax.process_count())
  if allocator_note := cpu_allocator.restarted_note():
    logging.info(allocator_note)
  if allocator_hint := cpu_allocator.hint(jax.devices()[0].platform):
    logging.warning(allocator_hint)

  # The config's sharding rules are in force for every trace of the run: the
  # train step's, the evaluators' and the checks' before the first step.
  with jax.set_mesh(mesh), sharding.use_rules(config.sharding_rules):
    train_source = data.build_source(config.input, "config.input")
    steps_per_epoch = max(1, len(train_source) // config.input.batch_size)
    trainer = Trainer(config, mesh, steps_per_epoch)
    evaluators = build_evaluators(config, mesh)
    batch_checks = dict(trainer.label_ranges)
    if preflight.source_labels(trainer, config, train_source, evaluators):
      batch_checks.pop("label")  # all of them checked already
    preflight.evaluator_inputs(config, trainer, train_source, evaluators)
    iterator = data.train_iterator(config.input, train_source, config.seed)
    ckpt = checkpoint_lib.Checkpointer(str(workdir_lib.path(workdir, "checkpoints")),
                                       keep=config.keep_checkpoints,
                                       asynchronous=config.async_checkpoints)
    writer = None
    try:
      restored = ckpt.restore(trainer.abstract_state, iterator,
                              preflight.resume_checker(config, trainer, len(train_source)))
      saved = {}
      if restored is None:
        state, start = trainer.init_state(), 0
        if config.init.path:  # step 0 only: a resume restores the run's own checkpoint
          state = transfer.apply(config, trainer, state, init_plan)
        logging.info("Starting %s: %d steps (%.1f epochs of %d examples).",
                     "from config.init" if config.init.path else "from scratch",
                     trainer.total_steps, trainer.total_steps / steps_per_epoch,
                     len(train_source))
      else:
        state, start, saved = restored
        preflight.report_resume(config, trainer, ckpt, start, saved)
      _save_config(config, workdir)
      writer = MetricWriter(workdir, start)
      facts = lambda step: preflight.run_facts(config, trainer, len(train_source), step)  # noqa: E731
      return _loop(config, trainer, state, start, iterator, evaluators, ckpt, writer,
                   mesh, term, facts, batch_checks,
                   restored_from=(start, bool(saved)) if restored else None)
    finally:
      if writer is not None:
        writer.close()
      ckpt.close()
      if hasattr(iterator, "close"):
        iterator.close()


def load_trained(config: ml_collections.ConfigDict, workdir: str, step: int | None = None):
  """(objective, step): a run's checkpoint (newest by default) as a live objective,
  with the EMA parameters if the run kept them. For notebooks and tools; reads only."""
  configuration.validate(config)
  mesh = mesh_lib.make_mesh(mesh_lib.config_axes(config))
  directory = workdir_lib.path(workdir, "checkpoints")  # local or remote
  steps = sorted(int(d.name) for d in directory.iterdir() if d.name.isdigit()) \
      if directory.is_dir() else []
  if not steps:
    raise ConfigError(f"no checkpoint in {directory}")
  step = steps[-1] if step is None else step
  if step not in steps:
    raise ConfigError(f"no checkpoint {step} in {directory}; it has "
                      f"{', '.join(map(str, steps))}")
  with jax.set_mesh(mesh):
    trainer = Trainer(config, mesh, steps_per_epoch=1)  # shapes don't depend on it
    reader = checkpoint_lib.Checkpointer(directory, asynchronous=False, read_only=True)
    try:
      state = reader.read(step, trainer.abstract_state)
    finally:
      reader.close()
    return nnx.merge(trainer.graphdef, *trainer.eval_state(state)), step


def _check_finite(state, ckpt, restored_from: tuple[int, bool] | None) -> None:
  """`restored_from`: (step, whether its fingerprint was verified) of the restore."""
  bad = int(state["nonfinite_step"])
  if bad < 0:
    return
  if restored_from is not None and bad == restored_from[0]:
    # Not "good": it produced the NaN on its very first step.
    how = ("reads back exactly as it was written and its values are finite, so suspect "
           "the input data or the config changes of this run" if restored_from[1] else
           "has finite values but no fingerprint to verify (an older version wrote it)")
    raise NonFiniteLossError(
        f"loss or gradients became NaN/inf at step {bad}, the first step after "
        f"restoring {ckpt.path(bad)}; that checkpoint {how}; parameters from before "
        f"that step were kept.")
  good = ckpt.latest_step()
  where = ckpt.path(good) + f" (step {good})" if good is not None else "none"
  raise NonFiniteLossError(
      f"loss or gradients became NaN/inf at step {bad}; parameters from before "
      f"that step were kept; last good checkpoint: {where}. Lower config.optim.lr "
      f"or check the input data.")


def _stop_requested(term: _Terminate, step: int, every: int) -> bool:
  """SIGTERM seen here (one process) or by any process, agreed at log steps so that
  every process saves the same checkpoint (saving is collective)."""
  if jax.process_count() == 1:
    return term.requested
  return step % every == 0 and distributed.any_process(term.requested)


def _check_batch(batch, checks, step: int) -> None:
  for key, limits in checks.items():
    if key in batch:
      preflight.check_labels(batch[key], key, limits, f"the training batch of step {step}")


def _loop(config, trainer, state, start, iterator, evaluators, ckpt, writer, mesh,
          term, facts, batch_checks, restored_from):
  total = trainer.total_steps
  batch_size = config.input.batch_size
  final: dict[str, float] = {}
  term.start_loop()
  # Checkpoints are saved before their step's evaluations: a run stopped between
  # the two evaluates that step now (the final step is evaluated again below).
  logged = lambda name: any(k.startswith(f"eval/{name}/") for k in writer.keys_at_start)  # noqa: E731
  missed = [name for name, (_, every) in evaluators.items()
            if 0 < start < total and start % every == 0  # process 0 has the log: it decides
            and distributed.any_process(jax.process_index() == 0 and not logged(name))]
  if missed:
    _evaluate(missed, evaluators, trainer, state, writer, start, total)
  if start == 0 and config.eval_at_start:  # what config.init loaded, before any step
    fresh = [name for name in evaluators  # not yet, by a run killed before its checkpoint
             if distributed.any_process(jax.process_index() == 0 and not logged(name))]
    if fresh:
      _evaluate(fresh, evaluators, trainer, state, writer, 0, total)
  mark_time, mark_step, excluded = time.perf_counter(), start, 0.0
  first_step_time = None
  for step in range(start + 1, total + 1):
    batch = next(iterator)
    _check_batch(batch, batch_checks, step)
    state, metrics = trainer.train_step(state, sharding.put_batch(batch, mesh, trainer.rules))
    if first_step_time is None:  # exclude compilation from throughput
      jax.block_until_ready(metrics)
      first_step_time = time.perf_counter()
      mark_time, mark_step = first_step_time, step

    last = step == total
    stop = _stop_requested(term, step, config.log_every_steps)
    if step % config.log_every_steps == 0 or last or stop:
      metrics = jax.device_get(metrics)
      _check_finite(state, ckpt, restored_from)
      ckpt.check_for_errors()
      now = time.perf_counter()
      elapsed = max(now - mark_time - excluded, 1e-9)
      steps_done = max(step - mark_step, 1)
      sec_per_step = elapsed / steps_done
      record = {k: float(v) for k, v in metrics.items()}
      record["images_per_sec"] = steps_done * batch_size / elapsed
      record["steps_per_sec"] = steps_done / elapsed
      record["epoch"] = step / trainer.steps_per_epoch
      writer.write(step, record)
      logging.info("step %d/%d | loss %.4f | lr %.2e | %.1f img/s | ETA %s",
                   step, total, record["train/loss"], record["lr"],
                   record["images_per_sec"], _fmt_time((total - step) * sec_per_step))
      mark_time, mark_step, excluded = now, step, 0.0

    pause = time.perf_counter()
    # Save before evaluating: an evaluator that crashes never loses this step.
    if step % config.checkpoint_every_steps == 0 or last or stop:
      _check_finite(state, ckpt, restored_from)
      ckpt.save(step, state, iterator, facts(step))
    due = [name for name, (_, every) in evaluators.items() if step % every == 0 or last]
    if due and not stop:  # preempted: exit within the grace period; evaluated on resume
      results = _evaluate(due, evaluators, trainer, state, writer, step, total)
      if last:
        final = results
    excluded += time.perf_counter() - pause
    if stop:
      ckpt.wait()
      logging.warning("SIGTERM: saved %s at step %d; run the same command to resume.",
                      ckpt.path(step), step)
      return final
  ckpt.wait()
  if start >= total:  # running a finished run again re-evaluates its final state
    logging.info("Already trained to step %d; evaluating the final state.", total)
    final = _evaluate(list(evaluators), evaluators, trainer, state, writer, total, total)
  return final


def _evaluate(names, evaluators, trainer, state, writer, step, total) -> dict[str, float]:
  results = {}
  for name in names:
    evaluator = evaluators[name][0]
    for key, value in evaluator.run(trainer.graphdef, trainer.eval_state(state)).items():
      results[f"eval/{name}/{key}"] = value
  writer.write(step, results)
  logging.info("step %d/%d | %s", step, total,
               " | ".join(f"{k} {v:.4f}" for k, v in sorted(results.items())))
  return results
