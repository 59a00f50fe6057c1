"""What a run promises when things go wrong: never silently wrong, nothing lost.

Checkpoints
- Flipped bytes inside an array file are detected (a fingerprint written with each
  checkpoint), the checkpoint is moved aside, and the previous one is used: the
  result equals resuming from that previous one directly. `train.load_trained`
  (notebooks, tools) refuses such a checkpoint too.
- When every checkpoint is bad, the fresh start is really fresh: parameters equal a
  run in an empty workdir, bit for bit (the data position is not left behind), also
  when the bad part is the saved data position itself.
- A second fault of the same step is moved aside beside the first (`.corrupt2`); a
  restore that fails for a reason outside the files (out of memory, permissions)
  moves nothing and says so.
- A config change that alters the state's tree (EMA turned off, another optimiser)
  or a dtype is a one-line error naming what differs; nothing is moved aside.
- A resume with another batch size, seed, number of grain workers, or a total_steps
  below the checkpoint is refused; a longer total_steps is allowed and reported in
  one line with the lr before and after.
- NaN on the first step after a restore never calls that checkpoint "good"
  (tests/test_train.py::test_nan_loss_stops_naming_step_and_checkpoint).

Workdir and files
- A workdir is owned by one run at a time; the lock of a run killed by SIGKILL does
  not stay stuck.
- metrics.jsonl is rewritten atomically on resume.
- A write that fails (a file-size limit standing in for a full disk) stops the run at
  once with one line naming the checkpoint and the error; the checkpoint saved before
  is intact and the rerun resumes from it. An unwritable workdir is one line at start.

Evaluators and data
- The checkpoint of a step is saved before that step's evaluation, so an evaluator
  that crashes loses nothing, and the resumed run evaluates that step first.
- An evaluator whose images the model can't take fails at start, before training.
- Labels >= num_classes: an error at start where the source lists its labels, at the
  batch otherwise.
- SIGTERM before the training loop exits 0 with the "run the same command" line.

Bad values in configs and bad data files: tests/test_faults_config.py and
tests/test_faults_data.py.
"""
import glob
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from unittest import mock

import jax
import numpy as np
from absl.testing import absltest, parameterized

from big_vision_like import checkpoint as checkpoint_lib
from big_vision_like import metrics as metrics_lib
from big_vision_like import train
from big_vision_like.data import sources
from big_vision_like.evaluators import classification
from big_vision_like.registry import ConfigError
from big_vision_like.workdir import WorkdirLock
from tests import helpers


def _run(workdir, **overrides):
  defaults = {"total_steps": 6, "checkpoint_every_steps": 3, "log_every_steps": 3}
  return train.train_and_evaluate(helpers.tiny_config(**{**defaults, **overrides}), workdir)


def _params(workdir, step=None):
  return jax.tree.leaves(helpers.restore_params(workdir, step)[1])


def _assert_same(test, a, b):
  test.assertLen(a, len(b))
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)


def _flip_a_bit_that_reads_back(workdir, step):
  """Flips one bit of an array file such that the checkpoint still reads back without
  error but with other values: the fault Orbax and TensorStore don't detect."""
  original = jax.tree.leaves(helpers.restore_state(workdir, step)[1])
  files = sorted(glob.glob(os.path.join(workdir, "checkpoints", str(step), "state",
                                        "ocdbt.process_0", "d", "*")), key=os.path.getsize)
  blob = bytearray(open(files[-1], "rb").read())  # the largest: the arrays' chunks
  for at in range(97, len(blob), 97):
    blob[at] ^= 0x04
    with open(files[-1], "wb") as f:
      f.write(blob)
    try:
      restored = jax.tree.leaves(helpers.restore_state(workdir, step)[1])
      if any(not np.array_equal(a, b, equal_nan=True) for a, b in zip(original, restored)):
        return
    except Exception:  # pylint: disable=broad-except  (detected by the storage layer)
      pass
    blob[at] ^= 0x04
  raise AssertionError("no single-bit flip read back undetected")


class CorruptCheckpointTest(absltest.TestCase):

  def test_flipped_bytes_are_detected_and_the_previous_checkpoint_used(self):
    workdir = self.create_tempdir().full_path
    _run(workdir)
    reference = self.create_tempdir().full_path
    shutil.copytree(workdir, reference, dirs_exist_ok=True)
    shutil.rmtree(os.path.join(reference, "checkpoints", "6"))
    _flip_a_bit_that_reads_back(workdir, 6)
    with self.assertRaisesRegex(ConfigError, r"checkpoints/6 is corrupt or incomplete: \d+ "
                                r"arrays differ from what was written"):
      train.load_trained(helpers.tiny_config(), workdir)  # tools verify too

    with self.assertLogs(level="ERROR") as logs:
      _run(workdir, total_steps=9)
    self.assertRegex("\n".join(logs.output),
                     r"checkpoints/6 is corrupt or incomplete \(\d+ arrays differ from "
                     r"what was written \(first: ")
    self.assertTrue(os.path.isdir(os.path.join(workdir, "checkpoints", "6.corrupt")))
    _run(reference, total_steps=9)
    _assert_same(self, _params(workdir, 9), _params(reference, 9))

  def test_when_every_checkpoint_is_bad_the_fresh_start_is_fresh(self):
    workdir = self.create_tempdir().full_path
    _run(workdir)
    for path in glob.glob(os.path.join(workdir, "checkpoints", "*", "state", "**"),
                          recursive=True):
      if os.path.isfile(path):
        with open(path, "wb") as f:
          f.write(b"corrupt")
    fresh = self.create_tempdir().full_path
    _run(fresh)
    with self.assertLogs(level="ERROR"):
      _run(workdir)
    self.assertEqual(sorted(os.listdir(os.path.join(workdir, "checkpoints"))),
                     ["3", "3.corrupt", "6", "6.corrupt"])
    _assert_same(self, _params(workdir, 6), _params(fresh, 6))


  def test_a_tampered_data_position_is_detected_and_the_fresh_start_is_fresh(self):
    workdir = self.create_tempdir().full_path
    _run(workdir)
    for path in glob.glob(os.path.join(workdir, "checkpoints", "*", "data", "*.json")):
      with open(path, "w") as f:
        f.write('{"next_index": 12345}')  # valid, so the data restore itself succeeds
    fresh = self.create_tempdir().full_path
    _run(fresh)
    with self.assertLogs(level="ERROR") as logs:
      _run(workdir)
    self.assertIn("the data position read back is {'next_index': 12345}", "\n".join(logs.output))
    _assert_same(self, _params(workdir, 6), _params(fresh, 6))

  def test_a_second_fault_of_the_same_step_keeps_both_copies(self):
    workdir = self.create_tempdir().full_path
    _run(workdir, total_steps=3)
    for attempt in range(2):
      for path in glob.glob(os.path.join(workdir, "checkpoints", "3", "state", "*")):
        if os.path.isfile(path):
          with open(path, "wb") as f:
            f.write(b"corrupt")
      with self.assertLogs(level="ERROR"):
        _run(workdir, total_steps=3)
    self.assertEqual(sorted(os.listdir(os.path.join(workdir, "checkpoints"))),
                     ["3", "3.corrupt", "3.corrupt2"])

  def test_a_failure_outside_the_files_moves_nothing(self):
    workdir = self.create_tempdir().full_path
    _run(workdir, total_steps=3)
    oom = RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.0GiB")
    with mock.patch.object(checkpoint_lib.Checkpointer, "_read_state", side_effect=oom):
      with self.assertRaisesRegex(checkpoint_lib.CheckpointReadError,
                                  r"cannot read checkpoint .*checkpoints/3: RESOURCE_EXHAUSTED.*"
                                  r"nothing was moved"):
        _run(workdir, total_steps=6)
    self.assertEqual(os.listdir(os.path.join(workdir, "checkpoints")), ["3"])


class ChangedConfigTest(absltest.TestCase):

  def _assert_untouched(self, workdir, steps):
    self.assertEqual(sorted(os.listdir(os.path.join(workdir, "checkpoints"))), steps)

  def test_ema_turned_off_is_a_config_error_not_corruption(self):
    workdir = self.create_tempdir().full_path
    _run(workdir, total_steps=3, **{"optim.ema_decay": 0.9})
    with self.assertRaisesRegex(ConfigError, r"checkpoints/3 was written by a different config: "
                                r"it has \d+ entries this config lacks \(first: ema_params/.*"
                                r"config\.optim\.ema_decay"):
      _run(workdir, total_steps=6)
    self._assert_untouched(workdir, ["3"])

  def test_another_dtype_is_a_config_error_not_a_silent_cast(self):
    workdir = self.create_tempdir().full_path
    _run(workdir, total_steps=3)
    with self.assertRaisesRegex(ConfigError, r"does not match the config: params/.* has dtype "
                                r"float32 there but bfloat16 in the config"):
      _run(workdir, **{"model.param_dtype": "bfloat16"})
    self._assert_untouched(workdir, ["3"])

  def test_another_optimiser_is_a_config_error(self):
    workdir = self.create_tempdir().full_path
    _run(workdir, total_steps=3)
    with self.assertRaisesRegex(ConfigError, r"different config: .*opt_state.*config\.optim"):
      _run(workdir, total_steps=6, **{"optim.name": "sgd"})
    self._assert_untouched(workdir, ["3"])

  def test_another_batch_size_or_seed_is_refused(self):
    workdir = self.create_tempdir().full_path
    _run(workdir, total_steps=3)
    with self.assertRaisesRegex(ConfigError, r"checkpoint 3 in this workdir was written with "
                                r"config.input.batch_size 64, this run has 32"):
      _run(workdir, **{"input.batch_size": 32})
    with self.assertRaisesRegex(ConfigError, r"written with config.seed 0, this run has 1"):
      _run(workdir, seed=1)
    with self.assertRaisesRegex(ConfigError, r"checkpoint 3 .* is past config.total_steps=2"):
      _run(workdir, total_steps=2)
    with self.assertRaisesRegex(ConfigError, r"written with config.input.num_workers 0, this "
                                r"run has 1: grain saves one position per worker"):
      _run(workdir, **{"input.num_workers": 1})
    self._assert_untouched(workdir, ["3"])

  def test_a_longer_run_continues_and_says_how_the_schedule_changes(self):
    workdir = self.create_tempdir().full_path
    config = helpers.tiny_config(total_steps=4, **{"optim.warmup_steps": 0})
    train.train_and_evaluate(config, workdir)
    longer = helpers.tiny_config(total_steps=8, **{"optim.warmup_steps": 0})
    with self.assertLogs(level="WARNING") as logs:
      train.train_and_evaluate(longer, workdir)
    lr = lambda total, step: float(train.optim.schedule(  # noqa: E731
        helpers.tiny_config(**{"optim.warmup_steps": 0}).optim, total, 22)(step))
    self.assertIn(f"config.total_steps is 8, the checkpoint's run had 4: from step 4 on, the "
                  f"lr schedule is that of a 8-step run (lr {lr(4, 4):.2e} there -> "
                  f"{lr(8, 4):.2e} now)", "\n".join(logs.output))
    self.assertIn(8, helpers.train_losses(workdir))


class WorkdirTest(absltest.TestCase):

  def test_a_workdir_is_owned_by_one_run(self):
    workdir = self.create_tempdir().full_path
    held = WorkdirLock(workdir)
    try:
      with self.assertRaisesRegex(ConfigError, rf"--workdir={workdir} is in use by another "
                                  rf"run \(pid {os.getpid()} on .* since .*\)"):
        _run(workdir)
      self.assertFalse(os.path.exists(os.path.join(workdir, "checkpoints")))
    finally:
      held.release()
    _run(workdir, total_steps=2)

  def test_a_killed_run_leaves_no_stuck_lock(self):
    workdir = self.create_tempdir().full_path
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from big_vision_like.workdir import "
         "WorkdirLock; WorkdirLock(sys.argv[1]); print('held', flush=True); time.sleep(600)",
         workdir], cwd=helpers.REPO, stdout=subprocess.PIPE, text=True)
    self.assertEqual(holder.stdout.readline().strip(), "held")
    with self.assertRaisesRegex(ConfigError, "in use by another run"):
      WorkdirLock(workdir)
    holder.kill()  # SIGKILL: no cleanup
    holder.wait()
    holder.stdout.close()
    WorkdirLock(workdir).release()

  def test_metrics_are_rewritten_atomically_on_resume(self):
    workdir = self.create_tempdir().full_path
    path = os.path.join(workdir, "metrics.jsonl")
    history = "".join(f'{{"step": {s}, "train/loss": 1.0}}\n' for s in range(1, 11))
    with open(path, "w") as f:
      f.write(history)
    # Killed in the middle of the rewrite: the history is still all there.
    with mock.patch.object(metrics_lib.os, "fsync", side_effect=KeyboardInterrupt):
      with self.assertRaises(KeyboardInterrupt):
        metrics_lib.MetricWriter(workdir, 5)
    self.assertEqual(open(path).read(), history)
    metrics_lib.MetricWriter(workdir, 5).close()
    self.assertEqual([r["step"] for r in helpers.read_metrics(workdir)], [1, 2, 3, 4, 5])

  def test_only_the_closed_loop_echo_of_a_failed_save_is_dropped(self):
    sys.path.insert(0, helpers.REPO)
    import main  # pylint: disable=g-import-not-at-top
    seen = []
    hook = main._quiet_closed_loops(lambda *args: seen.append(args))  # pylint: disable=protected-access
    hook(RuntimeError, RuntimeError("Event loop is closed"), None)
    self.assertEqual(seen, [])
    real = RuntimeError("a real bug")
    hook(RuntimeError, real, None)
    self.assertIs(seen[0][1], real)

  def test_an_unwritable_workdir_is_one_line_at_start(self):
    blocker = os.path.join(self.create_tempdir().full_path, "a_file")
    open(blocker, "w").close()
    with self.assertRaisesRegex(ConfigError, rf"--workdir={blocker}/run is not writable: "):
      _run(os.path.join(blocker, "run"))

  def test_a_failed_write_stops_the_run_at_once_and_keeps_earlier_checkpoints(self):
    workdir = self.create_tempdir().full_path
    flags = ("--config.total_steps=9", "--config.checkpoint_every_steps=3",
             "--config.eval_every_steps=1000", "--config.log_every_steps=1")
    proc = helpers.run_main(workdir, "--config.total_steps=3", *flags[1:])
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    limit = 20_000  # bytes per file: metrics and config fit, a checkpoint's arrays don't

    def small_files():
      resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
               JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-m", "main", "--config=configs/default.py:smoke",
         f"--workdir={workdir}", *flags], cwd=helpers.REPO, env=env, capture_output=True,
        text=True, timeout=300, preexec_fn=small_files)
    self.assertEqual(proc.returncode, 1, proc.stderr[-3000:])
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    self.assertLen(errors, 1, proc.stderr[-3000:])
    self.assertRegex(errors[0], r"cannot write checkpoint .*checkpoints/6: .*File too large.*"
                     r"the newest intact one is .*checkpoints/3\. Free space")
    self.assertNotIn("Traceback", proc.stderr)
    self.assertFalse(os.path.exists(os.path.join(workdir, "checkpoints", "9")))
    self.assertFalse([r for r in helpers.read_metrics(workdir)
                      if r["step"] > 3 and "eval/test/accuracy" in r], "evaluated on")
    proc = helpers.run_main(workdir, *flags)
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    self.assertRegex(proc.stderr, r"Resumed from .*checkpoints/3 at step 3")


class EvaluatorAndDataTest(parameterized.TestCase):

  def test_the_checkpoint_is_saved_before_an_evaluator_crashes(self):
    workdir = self.create_tempdir().full_path
    with mock.patch.object(classification.Classification, "run",
                           side_effect=RuntimeError("evaluator bug")):
      with self.assertRaisesRegex(RuntimeError, "evaluator bug"):
        _run(workdir, total_steps=4, eval_every_steps=4, checkpoint_every_steps=4)
    self.assertEqual(os.listdir(os.path.join(workdir, "checkpoints")), ["4"])

  def test_a_resume_evaluates_the_step_whose_evaluation_was_lost(self):
    workdir = self.create_tempdir().full_path
    with mock.patch.object(classification.Classification, "run",
                           side_effect=RuntimeError("evaluator bug")):
      with self.assertRaises(RuntimeError):
        _run(workdir, total_steps=8, eval_every_steps=4, checkpoint_every_steps=4)
    _run(workdir, total_steps=8, eval_every_steps=4, checkpoint_every_steps=4)
    evaluated = [r["step"] for r in helpers.read_metrics(workdir) if "eval/test/accuracy" in r]
    self.assertEqual(evaluated, [4, 8])

  def test_eval_images_the_model_cannot_take_fail_before_training(self):
    workdir = self.create_tempdir().full_path
    transforms = [{"name": "decode", "channels": 3}, {"name": "normalize"}]
    with self.assertRaisesRegex(ConfigError, r"config\.evals\.test: the model cannot take its "
                                r"images \(split 'test', 8x8x3 after config\.evals\.test\."
                                r"data\.transforms; training images are 8x8x1\): "):
      _run(workdir, **{"evals.test.data.transforms": transforms})
    self.assertFalse(os.path.exists(os.path.join(workdir, "checkpoints")))

  def test_labels_beyond_num_classes_listed_by_the_source_fail_at_start(self):
    workdir = self.create_tempdir().full_path
    with self.assertRaisesRegex(
        ConfigError, r"config.input \(split 'train'\) has label [5-9] but "
                     r"config.model.num_classes=5 allows 0..4; fix the data"):
      _run(workdir, **{"model.num_classes": 5})

  def test_labels_beyond_num_classes_fail_at_the_batch_otherwise(self):
    workdir = self.create_tempdir().full_path
    with self.assertRaisesRegex(ConfigError, r"the training batch of step 1 has label [5-9] "
                                r"but config.model.num_classes=5"):
      _run(workdir, **{"model.num_classes": 5, "input.source": _UNLISTED, "evals": {}})

  @parameterized.named_parameters(("while_importing", False), ("while_building", True))
  def test_sigterm_before_the_loop_exits_cleanly(self, after_start):
    workdir = self.create_tempdir().full_path
    runner = helpers.start_main(workdir)
    if after_start:  # the trainer's own handler: the workdir is locked, data being read
      deadline = time.time() + 120
      line = ""
      while "Mesh" not in line and time.time() < deadline:
        line = runner.stderr.readline()
    else:  # main's handler, before jax is even imported
      time.sleep(1.0)
    runner.send_signal(signal.SIGTERM)
    _, stderr = runner.communicate(timeout=120)
    runner.stdout.close()
    self.assertEqual(runner.returncode, 0, stderr[-3000:])
    self.assertIn("SIGTERM before training started: nothing to save; run the same command "
                  "to resume.", stderr)
    self.assertFalse(glob.glob(os.path.join(workdir, "checkpoints", "[0-9]*")))
    if not after_start:  # main's own handler answered: the trainer never started
      self.assertNotIn("Mesh", stderr)


class _DigitsWithoutLabelList(sources.DigitsSource):
  """Digits whose labels are known only element by element (like a tar of images)."""

  def __init__(self, split, data_dir=None):
    super().__init__(split, data_dir)
    self._labels = self.__dict__.pop("labels")

  def __getitem__(self, i):
    return {"image": self.images[i], "label": self._labels[i]}

  def __len__(self):
    return len(self._labels)


_UNLISTED = "test_digits_without_label_list"
if _UNLISTED not in sources.SOURCES:
  sources.SOURCES.register(_UNLISTED)(_DigitsWithoutLabelList)


if __name__ == "__main__":
  absltest.main()
