"""Bad values and bad config files get one line each, naming the file, field and value.

- A batch size (config.input's or an evaluator's) and config.optim.lr must be positive
  (lr also finite); total_steps / total_epochs may be 0 (unset) but not negative, and
  total_epochs not inf or NaN; warmup and min_lr may not be negative; keep_checkpoints
  and grad_accum_steps are at least 1. validate() names the field and the value.
- `--config.total_steps=-5` stops with that line instead of "training" to accuracy 1.0.
- `--config=` naming a missing file says that it does not exist.
- A config's own error for a bad `:arg` is one line naming the file.
- An error inside a config file (NameError, SyntaxError, a failed import) is one line:
  file:line, the exception's type and message.
None of these prints a traceback, and all stop before the workdir is written.
"""
import os
import textwrap

from absl.testing import absltest, parameterized

from big_vision_like import configuration
from big_vision_like.registry import ConfigError
from tests import helpers


class ValueRangeTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("zero_batch", {"input.batch_size": 0}, "config.input.batch_size=0 must be positive"),
      ("negative_batch", {"input.batch_size": -8}, "config.input.batch_size=-8 must be positive"),
      ("negative_steps", {"total_steps": -5},
       "config.total_steps=-5 must be positive (or 0 to unset it)"),
      ("negative_epochs", {"total_steps": 0, "total_epochs": -1.0},
       "config.total_epochs=-1.0 must be positive and finite (or 0 to unset it)"),
      ("inf_epochs", {"total_steps": 0, "total_epochs": float("inf")},
       "config.total_epochs=inf must be positive and finite (or 0 to unset it)"),
      ("nan_epochs", {"total_steps": 0, "total_epochs": float("nan")},
       "config.total_epochs=nan must be positive and finite (or 0 to unset it)"),
      ("zero_lr", {"optim.lr": 0.0}, "config.optim.lr=0.0 must be positive and finite"),
      ("negative_lr", {"optim.lr": -1e-3}, "config.optim.lr=-0.001 must be positive and finite"),
      ("nan_lr", {"optim.lr": float("nan")}, "config.optim.lr=nan must be positive and finite"),
      ("negative_min_lr", {"optim.min_lr": -1e-6}, "config.optim.min_lr=-1e-06 must be zero or more"),
      ("negative_warmup_steps", {"optim.warmup_steps": -1},
       "config.optim.warmup_steps=-1 must be zero or more"),
      ("negative_warmup_epochs", {"optim.warmup_epochs": -0.5},
       "config.optim.warmup_epochs=-0.5 must be zero or more"),
      ("zero_keep_checkpoints", {"keep_checkpoints": 0}, "config.keep_checkpoints=0 must be at least 1"),
      ("zero_grad_accum", {"optim.grad_accum_steps": 0},
       "config.optim.grad_accum_steps=0 must be at least 1"),
      ("zero_eval_batch", {"evals.test.data.batch_size": 0},
       "config.evals.test.data.batch_size=0 must be positive"),
      ("negative_eval_batch", {"evals.test.data.batch_size": -1},
       "config.evals.test.data.batch_size=-1 must be positive"),
  )
  def test_out_of_range_value_is_named(self, overrides, message):
    config = helpers.tiny_config(**overrides)
    with self.assertRaises(ConfigError) as caught:
      configuration.validate(config)
    self.assertEqual(str(caught.exception), message)

  @parameterized.named_parameters(
      ("steps_unset_by_zero", {"total_steps": 0, "total_epochs": 2.0}),
      ("epochs_unset_by_zero", {"total_epochs": 0.0}),
      ("min_lr_zero", {"optim.min_lr": 0.0}),
      ("no_warmup", {"optim.warmup_steps": 0, "optim.warmup_epochs": 0.0}),
      ("constant_schedule", {"optim.schedule": "constant"}),
      ("one_checkpoint", {"keep_checkpoints": 1}),
      ("eval_batch_from_input", {"evals.test.data.batch_size": None}),
  )
  def test_legitimate_values_still_pass(self, overrides):
    configuration.validate(helpers.tiny_config(**overrides))


class CommandLineTest(parameterized.TestCase):
  """`python -m main` prints one `error:` line, no traceback, and writes nothing."""

  def _run(self, *flags, config="configs/default.py:smoke"):
    workdir = os.path.join(self.create_tempdir().full_path, "run")
    proc = helpers.run_main(workdir, *flags, config=config, timeout=120)
    self.assertNotIn("Traceback", proc.stderr)
    errors = [l for l in proc.stderr.splitlines() if l.startswith("error: ")]
    self.assertLen(errors, 1, proc.stderr[-2000:])
    self.assertFalse(os.path.exists(workdir), "the run started")
    self.assertNotIn("final ", proc.stdout)
    return proc.returncode, errors[0]

  def _config_file(self, text):
    path = os.path.join(self.create_tempdir().full_path, "my_config.py")
    with open(path, "w") as f:
      f.write(textwrap.dedent(text))
    return path

  @parameterized.named_parameters(
      ("negative_steps", "--config.total_steps=-5",
       "error: config.total_steps=-5 must be positive (or 0 to unset it)"),
      ("zero_lr", "--config.optim.lr=0", "error: config.optim.lr=0.0 must be positive and finite"),
  )
  def test_out_of_range_override_stops_before_training(self, flag, message):
    code, error = self._run(flag)
    self.assertEqual(code, 1)
    self.assertEqual(error, message)

  def test_missing_config_file_is_named(self):
    code, error = self._run(config="configs/nope.py")
    self.assertEqual(code, 2)
    self.assertEqual(error, "error: --config: configs/nope.py does not exist")

  def test_bad_config_arg_is_the_configs_own_message(self):
    code, error = self._run(config="configs/default.py:bogus")
    self.assertEqual(code, 2)
    self.assertRegex(error, r"^error: --config: configs/default\.py:\d+: ValueError: "
                     r"configs/default\.py accepts 'smoke' or nothing, got 'bogus'$")

  @parameterized.named_parameters(
      ("name_error", """\
          from big_vision_like import configuration

          def get_config(arg=None):
            config = configuration.defaults()
            return foo
          """, ":5: NameError: name 'foo' is not defined"),
      ("syntax_error", """\
          def get_config(arg=None)
            return None
          """, ":1: SyntaxError: "),
      ("failed_import", """\
          from configs import nope
          """, ":1: ImportError: cannot import name 'nope' from 'configs'"),
      ("no_get_config", """\
          CONFIG = {}
          """, " defines no get_config()"),
      ("returns_none", """\
          def get_config(arg=None):
            del arg
          """, ": get_config() returned None; is a return missing?"),
  )
  def test_error_in_config_file_names_file_and_line(self, text, message):
    path = self._config_file(text)
    code, error = self._run(config=path)
    self.assertEqual(code, 2)
    self.assertStartsWith(error, f"error: --config: {path}{message}")


if __name__ == "__main__":
  absltest.main()
