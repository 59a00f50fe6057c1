"""Sharding by configuration, multi-device and multi-process runs.

The 8-device checks run once in a subprocess (tests/multidevice_checks.py, virtual
CPU devices); the multi-process checks start `python -m main` twice on localhost.
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
from absl.testing import absltest, parameterized
from flax import nnx
from jax.sharding import AbstractMesh

from big_vision_like import train
from big_vision_like.parallel import mesh as mesh_lib
from big_vision_like.parallel import sharding
from big_vision_like.registry import ConfigError
from tests import helpers


def abstract_mesh(data=1, fsdp=1, tensor=1):
  return AbstractMesh((data, fsdp, tensor), ("data", "fsdp", "tensor"))


class LayoutConfigTest(parameterized.TestCase):

  @parameterized.parameters(
      ("dp", 2, (("data", -1), ("fsdp", 1), ("tensor", 1))),
      ("fsdp", 2, (("data", 1), ("fsdp", -1), ("tensor", 1))),
      ("tp", 4, (("data", -1), ("fsdp", 1), ("tensor", 4))),
      ("fsdp_tp", 2, (("data", 1), ("fsdp", -1), ("tensor", 2))),
  )
  def test_presets_set_the_mesh(self, name, tensor, axes):
    config = helpers.tiny_config(parallelism=name, tensor_parallel=tensor)
    self.assertEqual(mesh_lib.config_axes(config), axes)

  def test_preset_sizes_on_eight_devices(self):
    config = helpers.tiny_config(parallelism="fsdp_tp", tensor_parallel=2)
    self.assertEqual(mesh_lib.mesh_shape(mesh_lib.config_axes(config), 8),
                     (("data", 1), ("fsdp", 4), ("tensor", 2)))

  def test_unknown_preset_and_preset_with_mesh_are_errors(self):
    with self.assertRaisesRegex(ConfigError, r"config.parallelism='fsdpp' is not a preset; "
                                r"valid: dp, fsdp, tp, fsdp_tp, hybrid"):
      mesh_lib.config_axes(helpers.tiny_config(parallelism="fsdpp"))
    config = helpers.tiny_config(parallelism="fsdp", mesh=(("data", 2), ("fsdp", 4)))
    with self.assertRaisesRegex(ConfigError, r"set config.parallelism='fsdp' or config.mesh"):
      mesh_lib.config_axes(config)

  def test_mesh_that_does_not_match_the_devices(self):
    with self.assertRaisesRegex(ConfigError, r"config.mesh \[\('data', 2\), \('fsdp', 4\)\] "
                                r"needs 8 devices, but 1 are available"):
      mesh_lib.make_mesh((("data", 2), ("fsdp", 4)))
    with self.assertRaisesRegex(ConfigError, r"does not divide 6 devices"):
      mesh_lib.mesh_shape((("data", -1), ("tensor", 4)), 6)

  def test_rule_naming_an_unknown_mesh_axis(self):
    rules = dict(sharding.DEFAULT_RULES, mlp="model").items()
    with self.assertRaisesRegex(ConfigError, r"maps 'mlp' to mesh axis 'model', which "
                                r"config.mesh does not have \(axes: data, fsdp, tensor\)"):
      sharding.check_rules(tuple(rules), abstract_mesh())

  def test_batch_not_divisible_by_the_data_parallel_size(self):
    with self.assertRaisesRegex(ConfigError, r"config.input.batch_size=12 is not divisible by "
                                r"the data-parallel size 8 \(mesh axes data=2 x fsdp=4\)"):
      sharding.check_batch(12, abstract_mesh(data=2, fsdp=4), sharding.DEFAULT_RULES,
                           "config.input.batch_size")
    # tensor parallelism replicates the batch: 4-way data parallel only
    sharding.check_batch(12, abstract_mesh(data=4, tensor=2), sharding.DEFAULT_RULES, "b")

  def test_parameter_dimension_not_divisible_by_its_axis(self):
    config = helpers.tiny_config(**{"model.width": 12, "model.num_heads": 2,
                                    "model.mlp_dim": 24})
    with nnx.use_eager_sharding(False):
      abstract = nnx.eval_shape(lambda: train.build_objective(config, 0))
    _, params, _ = train._split(abstract)
    with self.assertRaisesRegex(
        ConfigError, r"parameter .*: dimension \d \(size 12, logical axis 'embed'\) is not "
        r"divisible by mesh axes \('fsdp',\) of size 8"):
      sharding.state_shardings(params, abstract_mesh(fsdp=8), sharding.DEFAULT_RULES)
    sharding.state_shardings(params, abstract_mesh(fsdp=4), sharding.DEFAULT_RULES)  # fine


class MultiDeviceTest(parameterized.TestCase):
  """Results of tests/multidevice_checks.py on 8 virtual CPU devices."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    with tempfile.TemporaryDirectory() as tmp:
      out = os.path.join(tmp, "results.json")
      env = dict(os.environ, JAX_PLATFORMS="cpu",
                 XLA_FLAGS="--xla_force_host_platform_device_count=8")
      proc = subprocess.run([sys.executable, "tests/multidevice_checks.py", out], cwd=helpers.REPO,
                            env=env, capture_output=True, text=True, timeout=900)
      if proc.returncode:
        raise AssertionError(f"multidevice_checks.py failed:\n{proc.stderr[-4000:]}")
      with open(out) as f:
        cls.results = json.load(f)

  def test_eight_devices(self):
    self.assertEqual(self.results["devices"], 8)

  @parameterized.parameters(("supervised", "dp"), ("supervised", "fsdp"), ("supervised", "tp"),
                            ("supervised", "fsdp_tp"), ("siglip", "dp"), ("siglip", "fsdp_tp"),
                            ("perceiver", "dp"), ("perceiver", "fsdp_tp"))
  def test_losses_do_not_depend_on_the_layout(self, objective, layout):
    reference = self.results["layouts"][f"{objective}/one_device"]["losses"]
    losses = self.results["layouts"][f"{objective}/{layout}"]["losses"]
    self.assertLess(reference[-1], reference[0] - 0.005)  # the steps did train
    np.testing.assert_allclose(losses, reference, rtol=2e-6)

  def test_fsdp_divides_parameter_and_optimizer_bytes(self):
    size = lambda name: self.results["layouts"][f"supervised/{name}"]["state_bytes_per_device"]
    self.assertEqual(size("dp"), size("one_device"))
    # 8-way FSDP: all but the few small tensors without an 'embed' axis are split.
    self.assertGreater(size("dp") / size("fsdp"), 6.0)
    self.assertLess(size("tp"), size("dp"))  # heads and MLP split in two
    self.assertGreater(size("tp"), size("dp") / 2 - 1)
    self.assertLess(size("fsdp_tp"), size("tp") / 2)

  def test_sharded_contrastive_losses_match_the_dense_ones(self):
    cases = self.results["contrastive"]
    self.assertLen(cases, 12)  # clip/siglip x 3 meshes x (pairs, same-label positives)
    for name, case in cases.items():
      with self.subTest(name):
        self.assertAlmostEqual(case["loss"], case["reference"], delta=1e-5 * case["reference"])
        self.assertLess(max(case["grad_max_abs_diff"]), 2e-5)
        self.assertEqual(case["accuracy"], case["reference_accuracy"])
    accuracies = [a for c in cases.values() for a in c["reference_accuracy"]]
    self.assertTrue(any(0.0 < a < 1.0 for a in accuracies))  # retrieval is not trivial

  def test_pallas_kernel_runs_per_shard(self):
    """Under data x fsdp x tensor, the kernel sees its own examples and heads: same
    loss and gradients (bias included) as the XLA reference, and no input gathered
    (without shard_map XLA replicates the kernel's inputs: 21 all-gathers)."""
    np.testing.assert_allclose(self.results["layouts"]["supervised_pallas/fsdp_tp"]["losses"],
                               self.results["layouts"]["supervised/one_device"]["losses"],
                               rtol=1e-5)  # and in the trainer: a ViT under FSDP x TP
    case = self.results["kernels"]
    self.assertEqual(case["kernel_axes"], [["data", "fsdp"], "tensor"])
    self.assertAlmostEqual(case["loss"], case["reference"], delta=1e-5 * case["reference"])
    self.assertLess(max(case["grad_max_abs_diff"]), 5e-5)
    self.assertEqual(case["all_gathers"], 0)

  def test_checkpoint_restores_under_other_meshes(self):
    restored = self.results["restore"]
    self.assertEqual(restored["fsdp4_tensor2"]["devices"], 8)
    self.assertIn("P('fsdp', 'tensor')", restored["fsdp4_tensor2"]["param_specs"])
    self.assertEqual(restored["one_device"]["devices"], 1)
    for case in restored.values():
      self.assertEqual(case["step"], 2)
      self.assertEqual(case["max_abs_diff"], 0.0)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def start_processes(workdir, *flags, num=2, devices=4, config="configs/default.py:smoke",
                    heartbeat=60):
  """`num` processes of one run on localhost, `devices` CPU devices each."""
  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  return [subprocess.Popen(
      [sys.executable, "-m", "main", f"--config={config}", f"--workdir={workdir}",
       f"--coordinator_address=localhost:{port}", f"--num_processes={num}",
       f"--process_id={i}", f"--heartbeat_timeout_seconds={heartbeat}", *flags],
      cwd=helpers.REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(num)]


def finish(processes, timeout=600):
  outputs = [p.communicate(timeout=timeout) for p in processes]
  for p, (_, err) in zip(processes, outputs):
    if p.returncode:
      raise AssertionError(f"process exited with {p.returncode}:\n{err[-3000:]}")
  return outputs


class MultiProcessTest(absltest.TestCase):

  def test_two_processes_train_like_one_and_resume(self):
    flags = ("--config.checkpoint_every_steps=3", "--config.log_every_steps=1")
    one = self.create_tempdir().full_path
    result = helpers.run_main(one, *flags, "--config.total_steps=9", devices=8)
    self.assertEqual(result.returncode, 0, result.stderr[-3000:])

    two = self.create_tempdir().full_path
    outputs = finish(start_processes(two, *flags, "--config.total_steps=9"))
    self.assertIn("final eval/test/accuracy", outputs[0][0])
    self.assertNotIn("final eval", outputs[1][0])  # only process 0 reports
    # Both processes' input positions are in the checkpoint.
    self.assertEqual(sorted(os.listdir(os.path.join(two, "checkpoints", "6", "data"))),
                     ["commit_success.txt", "process_0-of-2.json", "process_1-of-2.json"])
    np.testing.assert_allclose(list(helpers.train_losses(two).values()),
                               list(helpers.train_losses(one).values()), rtol=2e-6)
    # What a job killed after its step-6 checkpoint leaves; both processes resume,
    # this time in the 'hybrid' layout (FSDP x TP inside each process, data
    # parallel across them): the checkpoint is resharded on restore.
    shutil.rmtree(os.path.join(two, "checkpoints", "9"))
    outputs = finish(start_processes(two, *flags, "--config.total_steps=9",
                                     "--config.parallelism=hybrid"))
    self.assertIn("Mesh {'data': 2, 'fsdp': 2, 'tensor': 2}", outputs[0][1])
    self.assertIn("Resumed from", outputs[0][1])
    self.assertIn("at step 6 of 9", outputs[0][1])

    expected, got = helpers.train_losses(one), helpers.train_losses(two)
    self.assertEqual(sorted(got), list(range(1, 10)))
    np.testing.assert_allclose([got[s] for s in range(1, 10)],
                               [expected[s] for s in range(1, 10)], rtol=2e-6)
    # The evaluator aggregates both processes' halves of the test set.
    final_eval = lambda workdir: [r for r in helpers.read_metrics(workdir)
                                  if "eval/test/loss" in r][-1]
    for key in ("eval/test/loss", "eval/test/accuracy"):
      self.assertAlmostEqual(final_eval(two)[key], final_eval(one)[key], places=5)
    _, params_one = helpers.restore_params(one, 9)
    _, params_two = helpers.restore_params(two, 9)
    for a, b in zip(jax.tree.leaves(params_one), jax.tree.leaves(params_two)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)

  def test_a_workdir_in_use_stops_every_process_at_once(self):
    from big_vision_like.workdir import WorkdirLock  # pylint: disable=g-import-not-at-top
    workdir = self.create_tempdir().full_path
    held = WorkdirLock(workdir)  # another run owns it
    try:
      processes = start_processes(workdir, heartbeat=60)
      outputs = [p.communicate(timeout=120) for p in processes]
    finally:
      held.release()
    for p in processes:
      self.assertEqual(p.returncode, 1)
    self.assertIn("is in use by another run", outputs[0][1])
    self.assertIn("process 0 could not claim --workdir", outputs[1][1])

  def test_a_dead_process_stops_the_others(self):
    workdir = self.create_tempdir().full_path
    processes = start_processes(workdir, "--config.total_steps=100000",
                                "--config.log_every_steps=1", config="configs/default.py",
                                heartbeat=10)
    try:
      metrics = os.path.join(workdir, "metrics.jsonl")
      deadline = time.time() + 300
      while not os.path.exists(metrics) and time.time() < deadline:
        self.assertIsNone(processes[0].poll(), "process 0 stopped before training")
        time.sleep(1)
      processes[1].kill()
      killed = time.time()
      _, err = processes[0].communicate(timeout=120)
      waited = time.time() - killed
    finally:
      for p in processes:
        p.kill()
    self.assertNotEqual(processes[0].returncode, 0)
    self.assertLess(waited, 60)
    self.assertIn("another task died", err)

  def test_incomplete_distributed_flags_are_one_line_errors(self):
    result = helpers.run_main(self.create_tempdir().full_path, "--num_processes=2")
    self.assertEqual(result.returncode, 1)
    self.assertIn("error: a multi-process run needs --coordinator_address, --num_processes "
                  "and --process_id", result.stderr)


if __name__ == "__main__":
  absltest.main()
