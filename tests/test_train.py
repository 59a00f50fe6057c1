"""The trainer end to end: learning, outputs, device-count invariance, exact
resume after SIGKILL, SIGTERM, NaN losses, corrupt checkpoints, accumulation."""
import glob
import os
import signal
import time

import numpy as np
from absl.testing import absltest

import jax
import jax.numpy as jnp

from big_vision_like import train
from big_vision_like.parallel import mesh as mesh_lib
from big_vision_like.parallel import sharding
from tests import helpers


class TrainInProcessTest(absltest.TestCase):

  def test_loss_decreases_and_outputs_are_written(self):
    workdir = self.create_tempdir().full_path
    config = helpers.tiny_config(total_steps=40, eval_every_steps=20,
                                 checkpoint_every_steps=20,
                                 **{"optim.lr": 1e-2, "optim.warmup_steps": 5,
                                    "model.patch_size": 4, "model.width": 32})
    final = train.train_and_evaluate(config, workdir)
    records = helpers.read_metrics(workdir)
    losses = helpers.train_losses(workdir)
    self.assertLess(np.mean([losses[s] for s in range(31, 41)]),
                    np.mean([losses[s] for s in range(1, 11)]) - 0.15)
    last = [r for r in records if r["step"] == 40]
    merged = {k: v for r in last for k, v in r.items()}
    for key in ("train/loss", "lr", "images_per_sec", "eval/test/accuracy",
                "eval/test/top5_accuracy", "eval/test/loss"):
      self.assertIn(key, merged)
    self.assertEqual(final["eval/test/accuracy"], merged["eval/test/accuracy"])
    self.assertGreater(final["eval/test/accuracy"], 0.15)  # 10 classes: chance is 0.1
    self.assertTrue(glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*")))
    self.assertTrue(os.path.exists(os.path.join(workdir, "config.json")))
    self.assertEqual(sorted(os.listdir(os.path.join(workdir, "checkpoints"))), ["20", "40"])
    # Running the finished run again evaluates its final state again.
    self.assertEqual(train.train_and_evaluate(config, workdir), final)
    objective, step = train.load_trained(config, workdir)
    self.assertEqual(step, 40)
    _, saved = helpers.restore_params(workdir, 40)
    np.testing.assert_array_equal(objective.backbone.head.kernel[...],
                                  saved["backbone"]["head"]["kernel"]["value"])

  def test_gradient_accumulation_equals_full_batch(self):
    """One step on 16 examples = 4 accumulated microbatches of 4 (no randomness)."""
    mesh = mesh_lib.make_mesh()
    batch_np = {"image": np.random.default_rng(0).normal(size=(16, 8, 8, 1)).astype(np.float32),
                "label": np.arange(16, dtype=np.int32) % 10}
    results = []
    with jax.set_mesh(mesh):
      for accum in (1, 4):
        config = helpers.tiny_config(**{"input.batch_size": 16,
                                        "optim.grad_accum_steps": accum})
        trainer = train.Trainer(config, mesh, steps_per_epoch=10)
        state = trainer.init_state()
        state, metrics = trainer.train_step(state, sharding.put_batch(batch_np, mesh))
        results.append((jax.device_get(state["params"]), float(metrics["train/loss"])))
    (p1, l1), (p4, l4) = results
    self.assertAlmostEqual(l1, l4, places=5)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p4)):
      np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)

  def test_nan_loss_stops_naming_step_and_checkpoint(self):
    workdir = self.create_tempdir().full_path
    train.train_and_evaluate(helpers.tiny_config(total_steps=4, checkpoint_every_steps=2),
                             workdir)
    # Resume with input that makes the loss NaN (x / 0): the run must stop at
    # step 4 and keep the good checkpoint from step 4 untouched.
    bad = helpers.tiny_config(total_steps=8, checkpoint_every_steps=2,
                              **{"input.transforms": [{"name": "normalize", "mean": [0.0],
                                                       "std": [0.0]}]})
    with self.assertRaisesRegex(train.NonFiniteLossError,
                                r"NaN/inf at step 4, the first step after restoring "
                                r".*checkpoints/4; .* suspect the input data"):
      train.train_and_evaluate(bad, workdir)
    self.assertEqual(sorted(os.listdir(os.path.join(workdir, "checkpoints"))), ["2", "4"])

  def test_ema_and_layer_decay(self):
    workdir = self.create_tempdir().full_path
    config = helpers.tiny_config(total_steps=6, **{"optim.ema_decay": 0.9,
                                                   "optim.layer_decay": 0.75})
    final = train.train_and_evaluate(config, workdir)
    self.assertIn("eval/test/accuracy", final)
    mesh = mesh_lib.make_mesh()
    with jax.set_mesh(mesh):
      trainer = train.Trainer(config, mesh, steps_per_epoch=10)
      restored, step, _ = train.checkpoint_lib.Checkpointer(
          os.path.join(workdir, "checkpoints")).restore(
              trainer.abstract_state, train.data.train_iterator(
                  config.input, train.data.build_source(config.input, "c"), 0))
    self.assertEqual(step, 6)
    diffs = [float(jnp.abs(a - b).max()) for a, b in zip(
        jax.tree.leaves(restored["params"]), jax.tree.leaves(restored["ema_params"]))]
    self.assertGreater(max(diffs), 0.0)


class TrainSubprocessTest(absltest.TestCase):
  """Runs `python -m main` as a user does."""

  def test_one_and_eight_devices_give_the_same_losses(self):
    losses = []
    for devices in (1, 8):
      workdir = self.create_tempdir().full_path
      proc = helpers.run_main(workdir, "--config.total_steps=8", "--config.log_every_steps=1",
                              devices=devices)
      self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
      self.assertIn(f"over {devices} devices", proc.stderr)
      losses.append(helpers.train_losses(workdir))
    self.assertEqual(sorted(losses[0]), list(range(1, 9)))
    for step in losses[0]:
      self.assertAlmostEqual(losses[0][step], losses[1][step], places=5)

  def test_exact_resume_after_sigkill(self):
    flags = ("--config.total_steps=300", "--config.checkpoint_every_steps=5",
             "--config.keep_checkpoints=100", "--config.eval_every_steps=1000",
             "--config.log_every_steps=10")
    straight = self.create_tempdir().full_path
    proc = helpers.run_main(straight, *flags)
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])

    killed = self.create_tempdir().full_path
    runner = helpers.start_main(killed, *flags)
    first = os.path.join(killed, "checkpoints", "5")
    deadline = time.time() + 120
    while not os.path.exists(first) and time.time() < deadline and runner.poll() is None:
      time.sleep(0.01)
    runner.kill()  # SIGKILL: no chance to clean up
    runner.communicate()
    steps = [int(d) for d in os.listdir(os.path.join(killed, "checkpoints")) if d.isdigit()]
    self.assertNotIn(300, steps, "the run finished before it could be killed")
    proc = helpers.run_main(killed, *flags)
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    self.assertIn("Resumed from", proc.stderr)

    step_a, params_a = helpers.restore_params(straight, 300)
    step_b, params_b = helpers.restore_params(killed, 300)
    leaves_a, leaves_b = jax.tree.leaves(params_a), jax.tree.leaves(params_b)
    self.assertLen(leaves_b, len(leaves_a))
    for a, b in zip(leaves_a, leaves_b):
      np.testing.assert_array_equal(a, b)
    self.assertEqual(helpers.train_losses(straight), helpers.train_losses(killed))

  def test_sigterm_saves_and_exits_cleanly(self):
    workdir = self.create_tempdir().full_path
    runner = helpers.start_main(workdir, "--config.total_steps=100000",
                                "--config.checkpoint_every_steps=50",
                                "--config.eval_every_steps=100000")
    first = os.path.join(workdir, "checkpoints", "50")
    deadline = time.time() + 120
    while not os.path.exists(first) and time.time() < deadline:
      time.sleep(0.05)
    runner.send_signal(signal.SIGTERM)
    _, stderr = runner.communicate(timeout=60)
    self.assertEqual(runner.returncode, 0, stderr[-3000:])
    self.assertIn("SIGTERM: saved", stderr)
    steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints"))
                   if d.isdigit())
    self.assertGreater(steps[-1], 50)
    self.assertLess(steps[-1], 100000)

  def test_corrupt_latest_checkpoint_falls_back_to_previous(self):
    workdir = self.create_tempdir().full_path
    proc = helpers.run_main(workdir, "--config.total_steps=6", "--config.checkpoint_every_steps=3")
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    for path in glob.glob(os.path.join(workdir, "checkpoints", "6", "state", "**", "*"),
                          recursive=True):
      if os.path.isfile(path):
        with open(path, "wb") as f:
          f.write(b"corrupt")
    # A save killed half-way leaves Orbax's temporary directory behind.
    half_written = os.path.join(workdir, "checkpoints", "9.orbax-checkpoint-tmp-1700000000")
    os.makedirs(os.path.join(half_written, "state"))
    with open(os.path.join(half_written, "state", "partial"), "wb") as f:
      f.write(b"half")
    proc = helpers.run_main(workdir, "--config.total_steps=9", "--config.checkpoint_every_steps=3")
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    self.assertRegex(proc.stderr, r"Checkpoint .*checkpoints/6 is corrupt or incomplete")
    self.assertTrue(os.path.isdir(os.path.join(workdir, "checkpoints", "9")))
    self.assertIn("Resumed from", proc.stderr)
    self.assertRegex(proc.stderr, r"checkpoints/3 at step 3")
    self.assertTrue(os.path.isdir(os.path.join(workdir, "checkpoints", "6.corrupt")))
    self.assertIn(9, helpers.train_losses(workdir))

  def test_checkpoint_of_another_config_is_a_clear_error(self):
    workdir = self.create_tempdir().full_path
    proc = helpers.run_main(workdir, "--config.total_steps=2")
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    proc = helpers.run_main(workdir, "--config.total_steps=4", "--config.model.mlp_dim=48")
    self.assertEqual(proc.returncode, 1, proc.stderr[-3000:])
    self.assertRegex(proc.stderr, r"error: checkpoint .*checkpoints/2 does not match the config: "
                     r"params/backbone/blocks/0/mlp/fc1/bias/value has shape \(32,\) there "
                     r"but \(48,\) in the config")
    self.assertTrue(os.path.isdir(os.path.join(workdir, "checkpoints", "2")))  # untouched

  def test_restore_onto_a_different_number_of_devices(self):
    workdir = self.create_tempdir().full_path
    proc = helpers.run_main(workdir, "--config.total_steps=4", "--config.log_every_steps=2",
                            devices=1)
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    proc = helpers.run_main(workdir, "--config.total_steps=8", "--config.log_every_steps=2",
                            devices=8)
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    self.assertIn("Resumed from", proc.stderr)
    self.assertIn("over 8 devices", proc.stderr)
    self.assertEqual(sorted(helpers.train_losses(workdir)), [2, 4, 6, 8])


if __name__ == "__main__":
  absltest.main()
