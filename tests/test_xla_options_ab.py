"""benchmarks/xla_options_ab.py: its options reach XLA, and bad ones fail in one line."""
import jax
import numpy as np
from absl.testing import absltest

from benchmarks import xla_options_ab
from big_vision_like import train
from big_vision_like.parallel import mesh as mesh_lib
from big_vision_like.parallel import sharding
from tests import helpers


class ParseOptionsTest(absltest.TestCase):

  def test_booleans_text_and_empty_values(self):
    self.assertEqual(
        xla_options_ab.parse_options(["xla_cpu_enable_fast_math=true",
                                      "xla_cpu_use_onednn=False",
                                      "xla_cpu_prefer_vector_width=512",
                                      "xla_cpu_experimental_ynn_fusion_type="]),
        {"xla_cpu_enable_fast_math": True, "xla_cpu_use_onednn": False,
         "xla_cpu_prefer_vector_width": "512", "xla_cpu_experimental_ynn_fusion_type": ""})

  def test_bad_entry_is_named(self):
    for entry in ("xla_cpu_enable_fast_math", "fast_math=true"):
      with self.assertRaisesRegex(ValueError, f"'{entry}'"):
        xla_options_ab.parse_options([entry])


class CompiledStepsTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.mesh = mesh_lib.make_mesh()
    self.enter_context(jax.set_mesh(self.mesh))
    self.trainer = train.Trainer(helpers.tiny_config(), self.mesh, steps_per_epoch=10)
    rng = np.random.default_rng(0)
    self.batch = sharding.put_batch(
        {"image": rng.normal(size=(16, 8, 8, 1)).astype(np.float32),
         "label": np.arange(16, dtype=np.int32) % 10}, self.mesh)

  def test_option_changes_the_program_not_the_result(self):
    state = self.trainer.init_state()
    steps = xla_options_ab.compiled_steps(
        self.trainer, state, self.batch,
        {"xla_cpu_experimental_ynn_fusion_type": ""}, control=True)
    self.assertEqual(set(steps), {"A", "B", "A'"})
    self.assertIn("ynn_fusion", steps["A"].as_text())
    self.assertNotIn("ynn_fusion", steps["B"].as_text())  # the option reached XLA
    self.assertEqual(steps["A"].as_text(), steps["A'"].as_text())
    losses = {key: float(step(self.trainer.init_state(), self.batch)[1]["train/loss"])
              for key, step in steps.items()}
    self.assertAlmostEqual(losses["A"], losses["B"], places=5)
    self.assertEqual(losses["A"], losses["A'"])

  def test_unknown_option_is_one_line_naming_it(self):
    state = self.trainer.init_state()
    with self.assertRaisesRegex(ValueError, r"^--options: .*'xla_cpu_no_such_option'$"):
      xla_options_ab.compiled_steps(self.trainer, state, self.batch,
                                    {"xla_cpu_no_such_option": True}, control=False)


if __name__ == "__main__":
  absltest.main()
