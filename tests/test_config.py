"""Bad input gets a one-line error naming the field, path or value, before anything runs."""
import os
import subprocess
import sys
import textwrap

from absl.testing import absltest, parameterized

from big_vision_like import cli, configuration, train
from big_vision_like.registry import ConfigError
from tests import helpers


class ValidateTest(parameterized.TestCase):

  @parameterized.parameters(
      ("total_stepz", 5, r"config.total_stepz is not a config field; did you mean config.total_steps\?"),
      ("optim.learning_rate", 0.1, r"config.optim.learning_rate is not a config field"),
  )
  def test_unknown_fields(self, key, value, message):
    config = helpers.tiny_config()
    with config.unlocked():
      target = config
      *parents, leaf = key.split(".")
      for p in parents:
        target = target[p]
      target[leaf] = value
    with self.assertRaisesRegex(ConfigError, message):
      configuration.validate(config)

  def test_steps_or_epochs(self):
    config = helpers.tiny_config()
    config.total_epochs = 2.0
    with self.assertRaisesRegex(ConfigError, r"exactly one of config.total_steps \(6\) and "
                                r"config.total_epochs \(2.0\); 0 unsets one"):
      configuration.validate(config)
    config.total_steps = 0  # as --config.total_steps=0 does
    configuration.validate(config)

  def test_accumulation_must_divide_batch(self):
    config = helpers.tiny_config(**{"optim.grad_accum_steps": 3})
    with self.assertRaisesRegex(ConfigError, "batch_size=64 is not divisible by config.optim.grad_accum_steps=3"):
      configuration.validate(config)

  def test_component_fields_are_checked_against_signatures(self):
    workdir = self.create_tempdir().full_path
    cases = [
        ({"model.dpeth": 2}, "config.model.dpeth is not a field of model 'vit'"),
        ({"objective.label_smooth": 0.1}, "config.objective.label_smooth is not a field of objective 'supervised'"),
        ({"objective.name": "simclr"}, "config.objective.name='simclr' is not a known objective; valid names: clip, dino, ibot, mae, probe, segmentation, siglip, .*supervised"),
        ({"evals.test.name": "nearest"}, "config.evals.test.name='nearest' is not a known evaluator; valid names: classification, knn, linear_probe, retrieval, segmentation, zeroshot"),
        ({"evals.test.top_k": (1,)}, "config.evals.test.top_k is not a field of evaluator 'classification'"),
    ]
    for overrides, message in cases:
      config = helpers.tiny_config()
      with config.unlocked():
        for key, value in overrides.items():
          section, leaf = key.rsplit(".", 1)
          target = config
          for p in section.split("."):
            target = target[p]
          target[leaf] = value
      with self.subTest(overrides=overrides):
        with self.assertRaisesRegex(ConfigError, message):
          train.train_and_evaluate(config, workdir)
        self.assertFalse(os.path.exists(os.path.join(workdir, "checkpoints")))


class CommandLineErrorsTest(parameterized.TestCase):
  """The CLI prints one line (no traceback) and exits non-zero."""

  @parameterized.named_parameters(
      ("typo_override", ("--config.total_stepz=5",), 2, "total_stepz"),
      ("typo_in_dict", ("--config.model.dtyp=float32",), 2,
       "--config.model.dtyp: config.model has no field 'dtyp'; did you mean "
       "config.model.dtype?"),
      ("new_field_in_dict", ("--config.model.remat_policy=x",), 2,
       "--config.model.remat_policy: config.model has no field 'remat_policy'; an override "
       "can only set fields the config file defines"),
      ("unknown_model", ("--config.model.name=vitt",), 1,
       "config.model.name='vitt' is not a known model; valid names: perceiver, swin, vit"),
      ("missing_dataset", ("--config.input.source=idx", "--config.input.data_dir=/no/such/dir"), 1,
       "config.input.data_dir='/no/such/dir' does not exist"),
      ("image_size_vs_patch", ("--config.model.patch_size=3",), 1,
       "image size 8x8 is not divisible by config.model.patch_size=3"),
      ("batch_vs_devices", ("--config.input.batch_size=12",), 1,
       "config.input.batch_size=12 is not divisible by the data-parallel size 8 "
       "(mesh axes data=8)"),
      ("mesh_vs_devices", ("--config.parallelism=tp", "--config.tensor_parallel=3"), 1,
       "config.mesh [('data', -1), ('fsdp', 1), ('tensor', 3)] does not divide 8 devices"),
  )
  def test_one_line_error(self, flags, code, message):
    workdir = self.create_tempdir().full_path
    proc = helpers.run_main(workdir, *flags, devices=8)
    self.assertEqual(proc.returncode, code, proc.stderr[-2000:])
    self.assertNotIn("Traceback", proc.stderr)
    error_lines = [l for l in proc.stderr.splitlines() if l.startswith("error: ")]
    self.assertLen(error_lines, 1, proc.stderr[-2000:])
    self.assertIn(message, error_lines[0])


class ConfigByNameTest(absltest.TestCase):
  """--config takes a bundled name as well as a file, inside the repository or not."""

  def parse(self, argument):
    return cli._ConfigFileParser("config").parse(argument)  # pylint: disable=protected-access

  def test_bundled_names_are_the_configs_files(self):
    names = cli.bundled_names()
    self.assertContainsSubset(["default", "vit_cifar10", "vit_i1k", "siglip_cifar10"], names)
    self.assertNotIn("common", names)  # a helper module, no get_config
    self.assertEqual(os.path.realpath(os.path.join(helpers.REPO, "configs")),
                     os.path.realpath(cli.BUNDLED_CONFIGS))

  def test_a_name_loads_the_bundled_file_with_its_arg(self):
    self.assertEqual(self.parse("default:smoke").total_steps, 6)
    self.assertEqual(self.parse("default").total_steps, 1200)
    self.assertEqual(self.parse("default.py:smoke").total_steps, 6)
    smoke = self.parse("vit_cifar10:smoke")  # imports big_vision_like.configs.common
    self.assertEqual((smoke.input.source, smoke.model.patch_size), ("image_folder", 8))

  def test_an_unknown_name_lists_the_bundled_ones(self):
    with self.assertRaisesRegex(cli._ConfigFileError,  # pylint: disable=protected-access
                                r"^defualt is neither a file nor a bundled config; bundled "
                                r"configs: .*\bdefault, .*vit_cifar10"):
      self.parse("defualt")

  def test_a_path_with_a_directory_is_never_a_name(self):
    with self.assertRaisesRegex(cli._ConfigFileError,  # pylint: disable=protected-access
                                r"^configs/default_x.py does not exist$"):
      self.parse("configs/default_x.py")

  def test_a_local_file_wins_over_a_bundled_name(self):
    here = self.create_tempdir()
    here.create_file("default", textwrap.dedent("""\
        from big_vision_like.configs import default
        def get_config(arg=None):
          config = default.get_config("smoke")
          config.total_steps = 3
          return config
        """))
    cwd = os.getcwd()
    os.chdir(here.full_path)
    try:
      self.assertEqual(self.parse("default").total_steps, 3)
    finally:
      os.chdir(cwd)

  def test_the_package_command_runs_a_config_file_outside_the_repository(self):
    """`python -m big_vision_like` from another directory, with a config of the user's
    that builds on the bundled ones (a bundled name from /tmp, non-editable: .ci/run)."""
    elsewhere = self.create_tempdir()
    external = elsewhere.create_file("mine.py", textwrap.dedent("""\
        from big_vision_like.configs import common  # noqa: F401 (a bundled helper)
        from big_vision_like.configs import default
        def get_config(arg=None):
          return default.get_config(arg)
        """)).full_path
    workdir = os.path.join(elsewhere.full_path, "run")
    proc = subprocess.run(
        [sys.executable, "-m", "big_vision_like", f"--config={external}:smoke",
         f"--workdir={workdir}", "--config.total_steps=2",
         "--config.evals.test.data.batch_size=120"],
        cwd=elsewhere.full_path, env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=""),
        capture_output=True, text=True, timeout=300)
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    self.assertIn("final eval/test/accuracy", proc.stdout)
    self.assertEqual(helpers.read_metrics(workdir)[-1]["step"], 2)

if __name__ == "__main__":
  absltest.main()
